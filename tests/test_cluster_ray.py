"""Multi-node Ray, on this machine.

(a) Ray's own multi-node harness (``ray.cluster_utils.Cluster``): a head without resources and
    two nodes with one faked GPU each. A sweep on the generator pool spreads over both nodes
    (each generations row records its node), and removing one node in the middle of the sweep
    ends with exactly the planned rows, none twice.
(b) A cluster started the way ``ray start`` (and KubeRay) runs it: a head process and a worker
    process, token authentication on (``RAY_AUTH_MODE=token`` and one ``RAY_AUTH_TOKEN`` on
    every node and driver, Ray's supported way to join nodes), whose processes have none of the
    store's or weights' variables (no ``AWS_*``, no ``FASTFACE_*``). ``fastface evaluate --config
    configs/ci.yaml`` with ``RAY_ADDRESS`` joins it instead of starting a local Ray and writes to an
    ``s3://`` root (moto) with a PostgreSQL catalog: the actors get the store's settings and
    credentials from the driver through Ray's runtime_env (actors/worker_env.py), every row is
    stored, and the secret is in no row, no report file and nothing printed. The cluster is
    stopped afterwards and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    fixed_agent_ports,
    free_port,
    ray_start_node,
    start_session_ray,
    stop_process_groups,
    stop_session_ray,
)

from storage import Catalog, Store
from storage.catalog_spec import CATALOG_ENV

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent


def sql(store: Store, query: str) -> list[dict]:
    with Catalog(store) as catalog:
        return catalog.query(query).to_pylist()


# -- (a) ray.cluster_utils.Cluster ------------------------------------------------------------------
def start_harness(attempts: int = 3):
    """Head (no CPUs/GPUs) + two nodes (1 CPU, 1 faked GPU each), tried again when a node does not come up in time.

    A failed try's processes (children of this process started by it) are killed before the next one.
    """
    import psutil
    from ray.cluster_utils import Cluster

    me = psutil.Process()
    for attempt in range(attempts):
        before = {child.pid for child in me.children(recursive=True)}
        harness = Cluster()
        try:
            harness.add_node(num_cpus=0, num_gpus=0, include_dashboard=False, **fixed_agent_ports())  # the head
            workers = [harness.add_node(num_cpus=1, num_gpus=1, **fixed_agent_ports()) for _ in range(2)]
            return harness, workers
        except Exception:
            try:
                harness.shutdown()
            except Exception:
                pass
            for child in me.children(recursive=True):
                if child.pid not in before:
                    child.kill()
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs/GPUs: it only coordinates) + two nodes with 1 CPU and 1 faked GPU each; this process is the driver.

    The session's local Ray (tests/conftest.py) is shut down for the module and started again after it.
    """
    had_session_ray = stop_session_ray()
    harness, workers = start_harness()
    try:
        ray.init(address=harness.address, log_to_driver=False)
        harness.wait_for_nodes()
        yield harness, workers
    finally:
        ray.shutdown()
        harness.shutdown()
        if had_session_ray:
            start_session_ray()


def test_sweep_spreads_over_nodes_and_survives_a_lost_node(cluster, tmp_path, tiny_models):
    from metrics_fixtures import sample_photo
    from test_actors import (  # noqa: F401
        STEPS,
        identity_row,
        make_examples,
        raw_generation_counts,
        slow_tiny_factory,
    )

    from actors.pool import GeneratorPools, PoolOptions

    harness, workers = cluster
    identities = [identity_row("hanks", sample_photo("Tom_Hanks_54745.png")),
                  identity_row("t1", sample_photo("t1.jpg"))]
    examples = make_examples(identities)  # 8 examples
    store = Store(str(tmp_path / "store"))
    store.append("identities", identities, "dataset")
    options = {"pipeline_factory": slow_tiny_factory, "tiny_root": str(tiny_models.sdxl.parent.parent),
               "identity_cache_dir": str(tmp_path / "identity-cache")}
    by_id = {node.node_id: node for node in workers}
    seen: set[str] = set()
    removed: list[str] = []

    def lose_a_node(event: dict) -> None:
        """Once both nodes have delivered rows, remove the node that delivered this batch.

        Each actor takes two batches at a time (``WorkerSpec.concurrency``) and runs them one after
        the other (each ≥ 1 s: ``slow_tiny_factory``), and rows are reported as each batch is
        written (``write_interval_s=0``), so the node whose batch just came back still has its next
        one running. The OTHER node need not: when one actor starts late, the first may have run
        every batch left by the time the late one's first row arrives (a CI run hit exactly that).
        """
        nodes = {row.get("node") for row in event["rows"]} - {None}  # a failed row names no node
        seen.update(nodes)
        if not removed and len(seen) == 2 and len(nodes) == 1:
            busy = nodes.pop()
            harness.remove_node(by_id[busy])
            removed.append(busy)

    # No watchdog here (tests/test_pool_watchdog.py has it): on a starved CI machine its 30 s floor can
    # fire on the slowed batches, and this test is about the lost node alone.
    with GeneratorPools(store, options=options, pool=PoolOptions(write_interval_s=0.0, stuck_factor=None),
                        batch_size=1, identities=identities) as pools:
        assert ray.cluster_resources().get("GPU") == 2.0
        summary = pools.generate(examples, on_batch=lose_a_node)
    assert removed, "the sweep ended before both nodes had delivered a row"
    assert summary["workers"] == 2  # one actor per faked GPU, one GPU per node
    assert summary["actor_restarts"] >= 1 and summary["retried"] >= 1
    assert summary["ok"] == 8 and summary["failed"] == 0
    assert raw_generation_counts(store) == (8, 8)  # exactly the planned rows, none twice
    per_node = {row["node"]: row["n"] for row in sql(store, "SELECT node, count(*) AS n FROM generations GROUP BY node")}
    assert set(per_node) == set(by_id) and sum(per_node.values()) == 8  # both nodes made images


# -- (b) `ray start` processes ----------------------------------------------------------------------
def node_ports() -> list[str]:
    """`ray start` flags for fixed free agent ports (see conftest.fixed_agent_ports)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@pytest.fixture
def ray_processes(tmp_path):
    """A head and a worker node as `ray start --block` processes (1 CPU + 1 faked GPU each), token auth on."""
    import psutil

    # The nodes' own environment lacks every store and weight setting: the actors get the driver's.
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith(("AWS_", "FASTFACE_"))}
    # Every node and every driver of the cluster: the same mode and token (here a fresh one, never ~/.ray's).
    # (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 comes from tests/conftest.py: nodes stop without a 30 s drain.)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    procs = []
    try:
        head, address = ray_start_node(tmp_path / "head.log", num_cpus=1, num_gpus=1, env=env)
        procs.append(head)
        worker, _ = ray_start_node(tmp_path / "worker.log", num_cpus=1, num_gpus=1, address=address, env=env)
        procs.append(worker)
        yield {"address": address, "env": env, "procs": procs}
    finally:
        descendants = []
        for proc in procs:
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        stop_process_groups(list(reversed(procs)))  # `ray start --block` stops its node's processes on SIGTERM
        _, alive = psutil.wait_procs(descendants, timeout=30)
        for leftover in alive:
            leftover.kill()
        assert not alive, f"processes of the stopped cluster still running: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def postgres():
    from storage_support import postgres_server

    with postgres_server() as new_database:
        yield new_database


def test_evaluate_joins_a_cluster_started_with_ray_start(ray_processes, postgres, prefect_server, fastface_cache,
                                                          tmp_path, monkeypatch):
    """`fastface evaluate` through infra/ray-driver.sh (what the Prefect Kubernetes job runs): a driver on the cluster,
    writing to S3 with a PostgreSQL catalog from actors on nodes that have neither's settings."""
    import uuid

    from storage_support import create_bucket, moto_endpoint

    endpoint, bucket = moto_endpoint(), "fastface-cluster"
    create_bucket(endpoint, bucket)
    secret = f"fastface-secret-{uuid.uuid4().hex}"  # moto takes any keys; this one is findable
    store_env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                 "FASTFACE_S3_ENDPOINT_URL": endpoint, CATALOG_ENV: f"postgres:{postgres('fastface_cluster')}"}
    root = f"s3://{bucket}/{uuid.uuid4().hex[:8]}/ci"
    env = dict(ray_processes["env"], RAY_ADDRESS=ray_processes["address"], PYTHONPATH=str(REPO),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               # a Prefect API, as the Kubernetes job has (the session's server)
               PREFECT_API_URL=prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]),
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               RAY_DRIVER_NODE_ARGS=" ".join(["--node-ip-address=127.0.0.1", *node_ports()]), **store_env)
    command = ["bash", str(REPO / "infra" / "ray-driver.sh"), sys.executable, "-m", "fastface.cli", "evaluate",
               "--config", str(REPO / "configs" / "ci.yaml"), "--root", root,
               "--set", f"execution.cache_dir={json.dumps(str(fastface_cache))}", "--set", "execution.num_workers=2"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # It joined the running cluster (head, worker and its own resource-less node), no local Ray of its own.
    assert f"joined the cluster at {ray_processes['address']} (3 nodes, 2 CPUs, 2 GPUs)" in output, output[-3000:]
    for key, value in store_env.items():
        monkeypatch.setenv(key, value)
    store = Store(root)
    per_node = sql(store, "SELECT node, count(*) AS n FROM generations GROUP BY node")
    assert len(per_node) == 2 and sum(row["n"] for row in per_node) == 8  # both `ray start` nodes made images
    assert sql(store, "SELECT count(*) AS n FROM metrics_raw")[0]["n"] == 32
    # the secret reached the actors, and nothing else: no row, no report file, no printed line holds it
    assert secret not in output
    for table in ("runs", "identities", "prompts", "examples", "generations", "metrics"):
        assert not sql(store, f"SELECT 1 FROM {table}_raw t WHERE CAST(t AS VARCHAR) LIKE '%{secret}%'")
    reports = store.fs.find(f"{store.root}/reports")
    assert reports and all(secret.encode() not in store.fs.cat_file(path) for path in reports)
    assert all(proc.poll() is None for proc in ray_processes["procs"])  # the cluster outlives its driver

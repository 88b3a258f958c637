"""Pools that ask an autoscaler for GPUs, on Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER=1``).

A head with one CPU and no GPU runs the autoscaler with a GPU node type (``min_workers: 0``,
``max_workers: 3``); ``fastface evaluate`` on configs/ci.yaml asking for 3 workers of one GPU each
makes it start GPU nodes, the images come from at least two of them, and once the run has ended
and withdrawn its request the nodes are removed. A run on real weights with no GPU anywhere fails
in one line naming ``execution.device``.

The head is a ``ray start --head --block`` process group of our own (the fake nodes are processes
it starts), stopped whole afterwards; ``AutoscalingCluster.start()/shutdown()`` would run
``ray stop --force``, which stops every Ray on the machine. The fake nodes reach the GCS through
the provider's ``gcs_address`` (a free port, not 6379).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, stop_process_groups

from storage import Catalog, Store

REPO = Path(__file__).resolve().parent.parent
IDLE_TIMEOUT_S = 15


def autoscaling_config(gcs_address: str) -> dict:
    """The fake multi-node provider's cluster config: a CPU head and a GPU node type from 0 to 3."""
    return {
        "cluster_name": "fastface-autoscaling-test", "max_workers": 3, "upscaling_speed": 3.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 3},
        },
        "head_node_type": "ray.head.default", "auth": {"ssh_user": "ray"}, "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def alive_nodes(env: dict, address: str) -> list[dict]:
    """The cluster's live nodes (id, GPUs), read by a short driver of its own (this process may hold another Ray)."""
    code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'gpus': n['Resources'].get('GPU', 0)} "
            "for n in ray.nodes() if n['Alive']]))" % address)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def autoscaling_head(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PYTHONPATH=str(REPO))
    import ray._private.services as services

    address = f"{services.get_node_ip_address()}:{port}"
    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(autoscaling_config(address)))
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--num-gpus=0", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
         f"--autoscaling-config={config}"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(1)
        yield {"address": address, "env": env}
    finally:
        stop_process_groups([head])
        log.close()


def test_pools_ask_the_autoscaler_for_gpu_nodes(autoscaling_head, prefect_server, fastface_cache, tmp_path):
    env, address = autoscaling_head["env"], autoscaling_head["address"]
    (head,) = alive_nodes(env, address)
    assert head["gpus"] == 0  # no GPU anywhere before the run
    root = tmp_path / "root"
    run_env = dict(env, RAY_ADDRESS=address, PREFECT_API_URL=prefect_server["url"],  # the session's Prefect server
                   PREFECT_HOME=str(prefect_server["home"]), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    command = [sys.executable, "-m", "fastface.cli", "evaluate", "--config", str(REPO / "configs" / "ci.yaml"),
               "--root", str(root), "--set", f"execution.cache_dir={json.dumps(str(fastface_cache))}",
               "--set", "execution.num_workers=3", "--set", "execution.gpus_per_worker=1"]
    done = subprocess.run(command, env=run_env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    with Catalog(Store(str(root))) as catalog:
        per_node = {r["node"]: r["n"] for r in catalog.rows("SELECT node, count(*) AS n FROM generations GROUP BY node")}
        assert catalog.rows("SELECT count(*) AS n FROM metrics_raw") == [{"n": 32}]
    assert sum(per_node.values()) == 8 and len(per_node) >= 2, per_node  # rows from ≥ 2 autoscaled nodes
    assert head["id"] not in per_node
    # The run withdrew its request and killed its actors: the idle GPU nodes are removed (not before they
    # have been idle for IDLE_TIMEOUT_S: the first look is then; each look is a Python process with Ray).
    deadline = time.monotonic() + IDLE_TIMEOUT_S + 150
    time.sleep(IDLE_TIMEOUT_S)
    while len(nodes := alive_nodes(env, address)) > 1:
        assert time.monotonic() < deadline, f"autoscaled nodes still up: {nodes}"
        time.sleep(5)
    assert [n["id"] for n in nodes] == [head["id"]]


def test_real_weights_without_any_gpu_fail_in_one_line(prefect_server, tmp_path):
    """A local Ray of the run's own on this GPU-less machine: the run stops before any work, naming the setting."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PREFECT_API_URL=prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "fastface.cli", "evaluate", "--config", str(REPO / "configs" / "ci.yaml"),
               "--root", str(tmp_path / "root"), "--set", "weights=real", "--set", "sweep.models=[hyper]",
               "--set", "sweep.size=1024", "--set", "face_backend=insightface", "--set", "execution.gpu_wait_s=2"]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and "no GPU in the Ray cluster after 2 s" in errors[0], errors
    assert "set execution.device: cpu" in errors[0]
    assert not (tmp_path / "root" / "images").exists()  # nothing was made

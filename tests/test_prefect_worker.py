"""Prefect for real: a server, a process work pool, `evaluate` deployed from prefect.yaml (with its schedule),
runs executed by `prefect worker start`.

- Two runs of configs/ci.yaml triggered together: both complete, every example is generated once
  (counted over all generations rows, failed included: the run lock of flows/run_lock.py), and the
  run's artifacts are read back by key through the Prefect client.
- The worker is SIGKILLed (with its flow-run process) during generation; a new worker runs the
  deployment again and the store ends with exactly the planned rows, none twice.

The flow runs join this session's Ray (RAY_ADDRESS) so no Ray is started per run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for_stored_rows
from test_flows_chain import prefect_server, raw_counts  # noqa: F401  (fixture)

from storage import Store

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENT = "evaluate/nightly-smoke"


def prefect_cli(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_API_URL=server["url"], PREFECT_HOME=str(server["home"]), FASTFACE_REPO=str(REPO))
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    if check:
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


class Worker:
    """`prefect worker start` of the process pool, in its own process group (killed whole, flow runs included)."""

    def __init__(self, server, ray_address: str, log: Path, limit: int = 2) -> None:
        env = dict(os.environ, PREFECT_API_URL=server["url"], PREFECT_HOME=str(server["home"]), PYTHONPATH=str(REPO),
                   FASTFACE_REPO=str(REPO), RAY_ADDRESS=ray_address, PREFECT_WORKER_QUERY_SECONDS="1",
                   PREFECT_WORKER_PREFETCH_SECONDS="1")
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "fastface-process", "--limit", str(limit)],
            env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        import psutil

        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        os.killpg(self.proc.pid, signal.SIGKILL)
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def deployed(prefect_server):  # noqa: F811
    """The process pool and the `nightly-smoke` deployment of prefect.yaml, parameters pointed at configs/ci.yaml."""
    prefect_cli(prefect_server, "work-pool", "create", "fastface-process", "--type", "process")
    prefect_cli(prefect_server, "deploy", "--prefect-file", "prefect.yaml", "--name", "nightly-smoke")
    return prefect_server


def trigger(root: Path, cache_dir: str, **overrides) -> str:
    from prefect.deployments import run_deployment

    params = {"config": "configs/ci.yaml", "root": str(root),
              "overrides": {"execution.cache_dir": cache_dir, **overrides}}
    return str(run_deployment(DEPLOYMENT, parameters=params, timeout=0).id)


def wait_for_runs(run_ids: list[str], timeout: float, log: Path) -> list:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = [client.read_flow_run(run_id) for run_id in run_ids]
            if all(run.state is not None and run.state.is_final() for run in runs):
                return runs
            time.sleep(2)
    pytest.fail(f"flow runs not finished in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def test_worker_runs_the_deployment_and_resumes_after_being_killed(deployed, ray_cluster, fastface_cache, tmp_path):
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert deployment.work_pool_name == "fastface-process"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]  # prefect.yaml's schedule
    ray_address = ray_cluster.get_runtime_context().gcs_address
    cache = str(fastface_cache)

    # Two runs of one config at once: both complete, each example is generated once.
    worker = Worker(deployed, ray_address, tmp_path / "worker-1.log")
    try:
        root = tmp_path / "together"
        runs = wait_for_runs([trigger(root, cache), trigger(root, cache)], 400, tmp_path / "worker-1.log")
        assert all(run.state.is_completed() for run in runs), [run.state for run in runs]
        counts = raw_counts(str(root))
        assert counts["generations"] == (8, 8) and counts["metrics"] == (32, 32) and counts["examples"] == (8, 8)
        with get_client(sync_client=True) as client:  # artifacts by key: one run made the 8 images, the other none
            tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ci-generation"])))
        assert sorted(json.loads(t.data)[0]["ok"] for t in tables) == [0, 8]
        assert Artifact.get("ci-summary").type == "markdown" and Artifact.get("ci-table").type == "table"

        # Killed during generation (worker and flow-run process, SIGKILL) ...
        root = tmp_path / "killed"
        overrides = {"execution.batch_size": 1, "sweep.ip_adapter_scales": [0.5, 0.8]}
        trigger(root, cache, **overrides)
        wait_for_stored_rows(root, "generations", 1, timeout=300)  # generation has started: a row is committed
    finally:
        worker.kill()
    killed_rows = raw_counts(str(root))["generations"][0]
    planned = 16
    assert 1 <= killed_rows < planned, (tmp_path / "worker-1.log").read_text()[-3000:]

    # ... and run again by a new worker: exactly the planned rows, none twice.
    worker = Worker(deployed, ray_address, tmp_path / "worker-2.log")
    try:
        (run,) = wait_for_runs([trigger(root, cache, **overrides)], 400, tmp_path / "worker-2.log")
    finally:
        worker.kill()
    assert run.state.is_completed(), run.state
    counts = raw_counts(str(root))
    assert counts["generations"] == (planned, planned) and counts["metrics"] == (planned * 4, planned * 4)
    assert len(Store(str(root)).image_ids("ci")) == planned

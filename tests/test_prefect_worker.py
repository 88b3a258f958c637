"""Prefect for real: a server, a process work pool, `evaluate` deployed from prefect.yaml (with its schedule),
runs executed by `prefect worker start`.

- Runs are started through the API with the config given as values (its content, not a file path);
  a second run of the deployment triggered while the first works is cancelled by the deployment's
  concurrency limit (prefect.yaml: CANCEL_NEW) without the worker starting a process for it.
- The worker is SIGKILLed (with its flow-run process) during the first run's generation; a new
  worker runs the deployment again: the run is named after the config, the store ends with exactly
  the planned rows, none twice, and the run's artifacts are read back by key through the client.
- A run that fails posts to the failure webhook (FASTFACE_FAILURE_WEBHOOK), served on 127.0.0.1.

The flow runs join this session's Ray (RAY_ADDRESS) so no Ray is started per run.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

import pytest
from conftest import wait_for_stored_rows
from test_flows_chain import raw_counts

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

    def __init__(self, server, ray_address: str, log: Path, limit: int = 2, **extra_env: str) -> None:
        env = dict(os.environ, PREFECT_API_URL=server["url"], PREFECT_HOME=str(server["home"]), PYTHONPATH=str(REPO),
                   FASTFACE_REPO=str(REPO), RAY_ADDRESS=ray_address, PREFECT_WORKER_QUERY_SECONDS="1",
                   PREFECT_WORKER_PREFETCH_SECONDS="1", **extra_env)
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
def deployed(prefect_server):
    """The process pool and the `nightly-smoke` deployment of prefect.yaml, parameters pointed at configs/ci.yaml."""
    prefect_cli(prefect_server, "work-pool", "create", "fastface-process", "--type", "process")
    prefect_cli(prefect_server, "deploy", "--prefect-file", "prefect.yaml", "--name", "nightly-smoke")
    return prefect_server


def trigger(root: Path, cache_dir: str, *, config: str | dict = "configs/ci.yaml", **overrides) -> str:
    from prefect.deployments import run_deployment

    params = {"config": config, "root": str(root),
              "overrides": {"execution.cache_dir": cache_dir, **overrides}}
    return str(run_deployment(DEPLOYMENT, parameters=params, timeout=0).id)


class Webhook:
    """A JSON webhook on 127.0.0.1 that keeps what it receives."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def wait_while_running(run_id: str, timeout: float = 120) -> None:
    """Until the run is RUNNING (its process started) or final."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state
            if state is not None and (state.is_running() or state.is_final()):
                return
            time.sleep(1)
    pytest.fail(f"flow run {run_id} did not start in {timeout:.0f} s")


def release_killed_run(run_id: str) -> None:
    """A SIGKILLed flow run stays RUNNING on the server; mark it crashed (what an operator or Prefect's
    zombie detection does) so the deployment's concurrency slot is free for the resumed run."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Crashed(message="worker killed by the test"), force=True)


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
    # The config given as values (its content, not a path); one image per batch, two scales, 128 px:
    # 16 images of ~0.5 s each, a run long enough to be caught working.
    values = yaml.safe_load((REPO / "configs" / "ci.yaml").read_text())
    overrides = {"execution.batch_size": 1, "sweep.ip_adapter_scales": [0.5, 0.8], "sweep.size": 128}
    planned = 16
    root = tmp_path / "store"

    # A run; a second one while it works is cancelled, never started; then the worker is killed
    # (SIGKILL, with its flow-run process) during generation.
    worker = Worker(deployed, ray_address, tmp_path / "worker-1.log")
    try:
        first = trigger(root, cache, config=values, **overrides)
        wait_while_running(first)
        second = trigger(root, cache, config=values, **overrides)
        (cancelled,) = wait_for_runs([second], 200, tmp_path / "worker-1.log")
        assert cancelled.state.is_cancelled() and cancelled.infrastructure_pid is None, cancelled.state
        wait_for_stored_rows(root, "generations", 1, timeout=300)  # generation has started: a row is committed
    finally:
        worker.kill()
    release_killed_run(first)
    killed_rows = raw_counts(str(root))["generations"][0]
    assert 1 <= killed_rows < planned, (tmp_path / "worker-1.log").read_text()[-3000:]

    webhook = Webhook()
    worker = Worker(deployed, ray_address, tmp_path / "worker-2.log", FASTFACE_FAILURE_WEBHOOK=webhook.url)
    try:
        # A run that fails (its root cannot be written) posts to the webhook.
        (failed,) = wait_for_runs([trigger(Path("/proc/fastface-not-writable"), cache, config=values)], 200,
                                  tmp_path / "worker-2.log")
        assert failed.state.is_failed(), failed.state
        deadline = time.monotonic() + 30
        while not webhook.received and time.monotonic() < deadline:
            time.sleep(0.5)
        (posted,) = webhook.received
        assert posted["flow_run_id"] == str(failed.id) and posted["state"] == "Failed" and posted["run"] == "ci"
        assert posted["flow_run"] == failed.name and "failed" in posted["text"]

        # The killed run's deployment run again by the new worker: exactly the planned rows, none twice.
        started = datetime.now(timezone.utc)
        (run,) = wait_for_runs([trigger(root, cache, config=values, **overrides)], 400, tmp_path / "worker-2.log")
    finally:
        worker.kill()
        webhook.close()
    assert run.state.is_completed() and run.name.startswith("ci-"), (run.name, run.state)
    counts = raw_counts(str(root))
    assert counts["generations"] == (planned, planned) and counts["metrics"] == (planned * 4, planned * 4)
    assert counts["examples"] == (planned, planned) and len(Store(str(root)).image_ids("ci")) == planned
    with get_client(sync_client=True) as client:  # artifacts by key (this run's: the server has others')
        tables = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ci-generation"])))
    assert [json.loads(t.data)[0]["ok"] for t in tables if t.created >= started] == [planned - killed_rows]
    assert Artifact.get("ci-summary").type == "markdown" and Artifact.get("ci-table").type == "table"

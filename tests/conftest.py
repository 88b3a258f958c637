"""Shared, session-scoped fixtures: the tiny models are built once per test session."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its workers at nice 15 (the raylet first); on a CI machine shared with other jobs that starves
# the actors behind everything else. The tests' nodes run them at normal priority.
os.environ.setdefault("RAY_worker_niceness", "0")
# On SIGTERM a `ray start --block` node first asks the GCS to drain it (for Ray Serve) for up to 30 s: every
# node the tests stop (the session's head at the end, each cluster test's nodes) waited it out. Off here.
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
# Ray's token authentication, set before Ray is imported (its config is read then): the session's nodes, this
# process and every subprocess that joins them (RAY_ADDRESS) share one token, never ~/.ray's.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))

# The tiny models are dominated by per-op overhead: one intra-op thread is faster and keeps
# Ray workers and pytest from oversubscribing CI's two cores. FASTFACE_TEST_THREADS=2 runs the
# suite with two (float tolerances come from measured noise floors, tests/noise.py, so results
# that round differently with the thread count still pass).
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FASTFACE_TEST_THREADS", "1")))

DATA = Path(__file__).parent / "data"
AUTHORS_E2E = DATA / "authors_e2e"


# Multi-process integration tests (real multi-node Ray, Prefect server + worker, PostgreSQL + S3
# end to end, subprocess runs interrupted or failed on purpose, the scaled-down SDXL benchmark).
# They run by default (CI runs them); FASTFACE_INTEGRATION=0 skips them for a quick local run.
INTEGRATION = (
    "tests/test_cluster_ray.py::test_sweep_spreads_over_nodes_and_survives_a_lost_node",
    "tests/test_storage_postgres.py::test_evaluate_ci_config_on_postgres_catalog_and_s3",
    "tests/test_flows_dataset.py::test_synthesis_renders_on_the_pools_and_the_flow_process_loads_no_model",
    "tests/test_bad_inputs.py::test_subprocess_cases",
    "tests/test_bad_inputs.py::test_a_failed_stage_exits_1_in_one_line",
    "tests/test_pipeline.py::test_bench_sdxl_shaped_path_runs_scaled_down",
    "tests/test_actors.py::test_pools_live_for_the_run_and_load_once_per_actor",
    "tests/test_rehearsal.py::test_rehearsal_runs_every_step_with_exact_rows",
    "tests/test_rehearsal.py::test_plan_says_what_the_run_did",
    "tests/test_store_faults.py::",
    "tests/test_flows_chain.py::test_a_moved_and_a_copied_store_open_report_and_resume_where_they_are",
    "tests/test_autoscaling.py::",
)
# The longest of them (4–8 minutes each on 2 cores: several `fastface evaluate` runs apiece);
# FASTFACE_LONG=0 skips them for a quicker local run. CI runs them (the suite ~13 min on 2 cores).
LONG = (
    "tests/test_cluster_ray.py::test_evaluate_joins_a_cluster_started_with_ray_start",
    "tests/test_prefect_worker.py::",
    "tests/test_bad_inputs.py::test_ctrl_c_stops_within_10_s_and_the_rerun_completes_exactly_the_planned_rows",
)

# The longest files first: with `pytest -n 2 --dist loadfile` (scripts/test.sh) a file runs whole on
# one worker, so a long one started last would leave the other worker idle at the end.
LONGEST_FIRST = ("tests/test_prefect_worker.py", "tests/test_bad_inputs.py", "tests/test_flows_chain.py",
                 "tests/test_cluster_ray.py", "tests/test_autoscaling.py", "tests/test_actors.py",
                 "tests/test_storage_postgres.py", "tests/test_pipeline.py", "tests/test_flows_dataset.py",
                 "tests/test_rehearsal.py", "tests/test_cli.py")


def pytest_collection_modifyitems(config, items):
    slow = os.environ.get("FASTFACE_SLOW") == "1"
    integration = os.environ.get("FASTFACE_INTEGRATION", "1") != "0"
    long = integration and os.environ.get("FASTFACE_LONG", "1") != "0"
    skip_slow = pytest.mark.skip(reason="needs real weights or a GPU; set FASTFACE_SLOW=1")
    skip_integration = pytest.mark.skip(reason="multi-process integration test; FASTFACE_INTEGRATION=0 skips them")
    skip_long = pytest.mark.skip(reason="long integration test (minutes); FASTFACE_LONG=0 skips them")
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(skip_slow)
        if not integration and item.nodeid.startswith(INTEGRATION):
            item.add_marker(skip_integration)
        if not long and item.nodeid.startswith(LONG):
            item.add_marker(skip_long)

    def rank(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside a file is kept


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny SDXL + FaceID-Plus-v2 adapter + CLIP encoder, built from seed 0 and written to disk."""
    from fastface.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    """A FastFacePipeline loaded from the tiny models through the real loaders (float32, CPU)."""
    import torch

    from fastface.pipeline import FastFacePipeline, load_faceid_adapter

    pipe = FastFacePipeline.from_pretrained(tiny_models.sdxl, torch_dtype=torch.float32, default_guidance=1.0)
    pipe.set_progress_bar_config(disable=True)
    return load_faceid_adapter(pipe, tiny_models.adapter, image_encoder=tiny_models.image_encoder)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fixed_agent_ports() -> dict[str, int]:
    """Fixed free ports for a Ray node's agents.

    With port 0 the raylet waits a fixed 15 s for the dashboard agent to write its port file
    and dies when a loaded machine starts the agent slower (ray-project/ray#65983); fixed
    ports also keep nodes on one machine off the default agent port 52365.
    """
    return {"metrics_agent_port": free_port(), "metrics_export_port": free_port(),
            "dashboard_agent_listen_port": free_port(), "runtime_env_agent_port": free_port()}


_SESSION_RAY: dict = {}


def ray_start_node(log_path, *, num_cpus: int, num_gpus: int, address: str | None = None, env: dict | None = None,
                   attempts: int = 5, timeout: float = 180.0):
    """A Ray node as a `ray start --block` process group: a head, or a node joining ``address``.

    Returns ``(process, address of the cluster)``.

    Tried again when the node does not come up: on a loaded machine Ray's dashboard agent can
    start slower than the raylet waits for it (a fixed 15 s, ray-project/ray#65983); a process
    group is stopped whole, so a failed try leaves nothing behind. Agents get fixed free ports.
    Token authentication as the environment says (``RAY_AUTH_MODE``/``RAY_AUTH_TOKEN``).
    """
    import subprocess
    import sys
    import time

    for _ in range(attempts):
        port = free_port()
        ports = fixed_agent_ports()
        role = [f"--address={address}"] if address else [
            "--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
        started = Path(log_path).stat().st_size if Path(log_path).exists() else 0
        log = open(log_path, "a")  # every try's output stays for the diagnosis
        proc = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *role, "--node-ip-address=127.0.0.1",
             f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
             f"--dashboard-agent-grpc-port={ports['metrics_agent_port']}",
             f"--metrics-export-port={ports['metrics_export_port']}",
             f"--dashboard-agent-listen-port={ports['dashboard_agent_listen_port']}",
             f"--runtime-env-agent-port={ports['runtime_env_agent_port']}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if "Ray runtime started" in Path(log_path).read_text(errors="replace")[started:]:
                log.close()
                return proc, address or f"127.0.0.1:{port}"
            time.sleep(0.5)
        stop_process_group(proc)
        log.close()
    raise RuntimeError(f"ray start failed {attempts} times:\n{Path(log_path).read_text()[-3000:]}")


def stop_process_group(proc, timeout: float = 60.0) -> None:
    """SIGTERM a process group (`ray start --block` stops its node's processes), SIGKILL when it lingers."""
    stop_process_groups([proc], timeout)


def stop_process_groups(procs, timeout: float = 60.0) -> None:
    """:func:`stop_process_group` for several groups at once: all are signalled first, then waited for."""
    import signal
    import subprocess
    import time

    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def start_session_ray():
    """The session's local Ray: one node with 2 CPUs and a faked GPU, no dashboard; this process its driver.

    Workers inherit this process's environment (HF_HUB_OFFLINE, the Ray token etc. above), and so
    do subprocesses that join it through RAY_ADDRESS.
    """
    import tempfile

    import ray

    log = Path(tempfile.mkdtemp(prefix="fastface-ray-")) / "head.log"
    proc, address = ray_start_node(log, num_cpus=2, num_gpus=1)
    try:
        ray.init(address=address, log_to_driver=False)
    except BaseException:
        stop_process_group(proc)
        raise
    _SESSION_RAY["head"] = proc
    return ray


def stop_session_ray() -> bool:
    """Stop the session's Ray if this process started it; True when it did (for a module that needs its own)."""
    import ray

    proc = _SESSION_RAY.pop("head", None)
    if proc is None:
        return False
    ray.shutdown()
    stop_process_group(proc)
    return True


@pytest.fixture(scope="session")
def ray_cluster():
    """ONE local Ray per test session (start-up is slow): 2 CPUs and a faked GPU (see :func:`start_session_ray`)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        start_session_ray()
    yield ray
    stop_session_ray()


@pytest.fixture(scope="session")
def prefect_server_process(tmp_path_factory):
    """ONE Prefect server per test session (start-up costs seconds of CPU): ``prefect server start`` on
    127.0.0.1 with its own PREFECT_HOME. Modules use it through :func:`prefect_server`."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               # The service that frees an expired lease (a killed run's lock, flows/run_lock.py) looks every
               # second instead of every 15 s: the resumed run in test_prefect_worker.py waits out the 60 s
               # lease itself, not up to 15 s more.
               PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS="1")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield {"url": url, "home": home}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def prefect_server(prefect_server_process):
    """The session's Prefect server as this module's API (PREFECT_API_URL; results under its PREFECT_HOME).

    The settings hold for the module only: a module without this fixture runs its flows in Prefect's
    ephemeral mode, as a user without a server does.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    home = prefect_server_process["home"]
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server_process["url"],
                                         PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
            yield prefect_server_process
    finally:
        # Flush Prefect's log and event queues while the server is up (else they retry at exit).
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def fastface_cache(tiny_models, tmp_path_factory):
    """A FASTFACE cache folder whose tiny-model root is the session's tiny models (built once).

    ``tiny-*`` checkpoints build their tiny distilled weights in it on first use; fused
    checkpoints and identity records are cached there too. Pass it as ``cache_dir`` / ``--cache-dir``.
    """
    from fastface.tiny import TINY_VERSION
    from fastface.tiny_checkpoints import ensure_tiny_checkpoints

    cache = tmp_path_factory.mktemp("fastface-cache")
    root = cache / f"tiny-v{TINY_VERSION}"
    root.symlink_to(Path(tiny_models.sdxl).parent.parent, target_is_directory=True)
    ensure_tiny_checkpoints(root)
    return cache


@pytest.fixture(scope="session")
def face_photo():
    """Tom Hanks, from the installed insightface wheel."""
    import importlib.util

    spec = importlib.util.find_spec("insightface")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "Tom_Hanks_54745.png"


def wait_for_stored_rows(root: Path, table: str, at_least: int, timeout: float, alive=lambda: True) -> int:
    """Poll a local store until ``table`` holds ``at_least`` rows (committed: what a reader sees); the count.

    Nothing is created before the run has made its catalog (a Store on a missing root would
    create one), and the poll stops early when ``alive()`` turns false (the writer ended).
    Opening a Store costs ~0.45 s of CPU (DuckDB, the lake attached): for ``generations`` the
    table is counted only once an image file is there (the generator stores a batch's images
    before the driver appends their rows), so the poll does not eat a core while the run starts.
    """
    import time

    from storage import Store
    from storage.layout import CATALOG_FILE

    def ready() -> bool:
        if not (Path(root) / CATALOG_FILE).exists():
            return False
        return table != "generations" or any((Path(root) / "images").glob("*/*.png"))

    deadline = time.monotonic() + timeout
    rows = 0
    while time.monotonic() < deadline and alive():
        if ready():
            try:
                rows = Store(str(root)).count(table)
            except Exception:  # noqa: BLE001 - the writer is creating the tables; look again
                rows = 0
            if rows >= at_least:
                return rows
        time.sleep(0.2)
    return rows

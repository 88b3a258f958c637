"""flows.run_lock on a temporary Prefect server: a file lock the OS releases however its holder ends.

(The Prefect-server path, a global concurrency limit with a lease, is exercised by
tests/test_prefect_worker.py: a worker killed during a run, the deployment run again, which waits for
the killed run's lease to lapse and then stores exactly the planned rows.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows import run_lock

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from pathlib import Path
from flows.run_lock import file_lock
with file_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def hold_in_a_child(path: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_killed_holder_frees_the_lock_and_a_live_one_makes_others_wait(tmp_path):
    path = tmp_path / "locks" / "fastface-run-ci-0123abcd.lock"
    child = hold_in_a_child(path)
    try:
        started = time.monotonic()
        with pytest.raises(run_lock.RunLockTimeout, match="another run holds"), \
                run_lock.file_lock(path, timeout_seconds=1.0, poll_s=0.1):
            pass
        assert time.monotonic() - started >= 1.0  # it waited for the live holder
    finally:
        child.send_signal(signal.SIGKILL)  # killed: no cleanup code of its own runs
        child.wait()
    started = time.monotonic()
    with run_lock.file_lock(path, timeout_seconds=5.0, poll_s=0.1):
        assert time.monotonic() - started < 2.0  # free at once, no lease to wait out


def test_runs_on_a_temporary_server_take_the_file_lock_under_prefect_home(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_HOME, temporary_settings

    monkeypatch.setattr(run_lock, "on_temporary_server", lambda: True)
    with temporary_settings({PREFECT_HOME: str(tmp_path / "home")}):
        with run_lock.run_lock("CI run", "/data/root/") as name:
            path = tmp_path / "home" / "run-locks" / f"{name}.lock"
            assert name == run_lock.lock_name("CI run", "/data/root") and path.is_file()
            with pytest.raises(run_lock.RunLockTimeout):  # a second holder waits (flock is per open file)
                with run_lock.file_lock(path, timeout_seconds=0.3, poll_s=0.1):
                    pass
        with run_lock.file_lock(path, timeout_seconds=0.3):  # released when the block ends
            pass


def test_temporary_servers_are_read_without_importing_the_server(monkeypatch):
    """A process that talks to PREFECT_API_URL never imported Prefect's server app; asking costs no import
    (it would cost ~3 s of CPU in each flow-run process). One that started a temporary server sees it."""
    from flows.interrupt import temporary_servers
    from prefect.server.api.server import SubprocessASGIServer

    name = "prefect.server.api.server"
    module = sys.modules[name]
    monkeypatch.delitem(sys.modules, name)
    assert temporary_servers() == [] and not run_lock.on_temporary_server()
    assert name not in sys.modules
    monkeypatch.setitem(sys.modules, name, module)
    server = object()
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {8123: server})
    assert temporary_servers() == [server] and run_lock.on_temporary_server()

"""Shared pieces of the storage tests: one moto S3 server per test process, and a writer to kill."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

_server = None
_endpoint = None


def moto_endpoint() -> str:
    """Start (once per process) moto's threaded S3 server on a free localhost port; return its URL."""
    global _server, _endpoint
    if _endpoint is None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        _server.start()
        atexit.register(_server.stop)
        _endpoint = f"http://127.0.0.1:{port}"
    return _endpoint


def s3_env(monkeypatch, endpoint: str) -> None:
    """Fake credentials and the endpoint, through the environment only (as in production)."""
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("FASTFACE_S3_ENDPOINT_URL", endpoint)


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}).create_bucket(Bucket=bucket)


WRITER = """
import sys
import pyarrow as pa
from storage.store import Store
n = int(sys.argv[2])
rows = pa.table({
    "example_id": pa.array([f"crash-{i}" for i in range(n)]),
    "metric": pa.array(["clip"] * n),
    "value": pa.array([float(i) for i in range(n)]),
})
Store(sys.argv[1]).append("metrics", rows, run_id="r1")
print("COMMITTED", flush=True)
"""


def kill_writer_at(root: str, point: str, tmp_path, rows: int = 100_000, env: dict | None = None,
                   timeout_s: float = 30.0) -> None:
    """Run a real writer process that pauses at ``point`` in Store's write path, then SIGKILL it there."""
    marker = tmp_path / f"reached-{point}"
    full_env = dict(os.environ, **(env or {}))
    full_env.update(
        FASTFACE_STORAGE_PAUSE_AT=point,
        FASTFACE_STORAGE_PAUSE_MARKER=str(marker),
        FASTFACE_STORAGE_PAUSE_S="600",
    )
    proc = subprocess.Popen([sys.executable, "-c", WRITER, root, str(rows)], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"writer exited early: {proc.stdout.read()!r} {proc.stderr.read()!r}")
            if time.monotonic() > deadline:
                raise AssertionError(f"writer never reached {point!r}")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the writer was not killed at the pause point"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1 (initdb in a temp dir, trust auth).

    Yields ``new_database(name) -> libpq conninfo``: one database per store (a DuckLake catalog
    belongs to one data path).

    Runs the server as the ``postgres`` user when this process is root (PostgreSQL refuses root).
    Skips, saying why, where PostgreSQL is not installed or cannot start.
    """
    import glob
    import pwd
    import shutil
    import tempfile

    import pytest

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        pytest.skip("PostgreSQL is not installed (scripts/ci-deps.sh installs Debian's postgresql package)")
    bindir = os.path.dirname(initdb)
    as_user: list[str] = []
    work = tempfile.mkdtemp(prefix="fastface-pg-")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(work, ignore_errors=True)
            pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
        os.chown(work, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = os.path.join(work, "data"), free_port()

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)

    started = False
    try:
        init = run(f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        if init.returncode != 0:
            pytest.skip(f"initdb failed, cannot start PostgreSQL here: {init.stderr.strip()[-300:]}")
        start = run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(work, "server.log"), "-w", "-t", "60",
                    "-o", f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        if start.returncode != 0:
            log = open(os.path.join(work, "server.log")).read()[-500:] if os.path.exists(
                os.path.join(work, "server.log")) else ""
            pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-300:]} {log}")
        started = True

        def new_database(name: str) -> str:
            created = run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name)
            assert created.returncode == 0, created.stderr
            return f"dbname={name} host=127.0.0.1 port={port} user=postgres"

        def pg_ctl(action: str) -> None:
            """stop / start / restart the server (fault tests): same port, same data."""
            extra = ["-m", "fast"] if action in ("stop", "restart") else []
            options = ["-o", f"-p {port} -k {work} -c listen_addresses=127.0.0.1 -c fsync=off"] \
                if action in ("start", "restart") else []
            done = run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(work, "server.log"), "-w", "-t", "60",
                       *extra, *options, action)
            assert done.returncode == 0, done.stderr

        new_database.pg_ctl = pg_ctl
        yield new_database
    finally:
        if started:
            run(f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(work, ignore_errors=True)

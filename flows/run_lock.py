"""One evaluation of a run at a time: a Prefect global concurrency limit of one slot per (run name, root).

A schedule that fires while the previous run of the same config is still working, or two
people starting the same config, would otherwise plan the same missing images and make them
twice. The second run waits for the slot, then plans against what the first one stored and
finds nothing (or only what is still missing) to do.

The slot is a lease the holder renews while it works; a run that is killed (its worker
lost, the pod evicted) stops renewing and the Prefect server frees the slot after the lease
(:data:`LEASE_SECONDS`, the server's minimum) plus its repossessor interval (15 s by default),
so a killed run delays the next one by about a minute and never blocks it for good.

Runs on a temporary Prefect server (``fastface evaluate`` without ``PREFECT_API_URL``: each
process starts its own server over the SQLite database in ``PREFECT_HOME``) take a file lock
instead, ``<PREFECT_HOME>/run-locks/<lock name>.lock``: a temporary server keeps its leases in
memory, so a run interrupted or killed together with its server would leave the slot taken in
the database with no lease left to expire, and every later run would wait for it forever. The
operating system releases a file lock when its process ends, however it ends; the scope is the
same (processes sharing one ``PREFECT_HOME`` on one machine).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LEASE_SECONDS = 60.0
"""Lease of the run's slot: the shortest the Prefect server accepts (how long a killed run holds it)."""


def lock_name(run_name: str, root: str) -> str:
    """``fastface-run-<run name>-<hash of the root>``: the same run into another root is another lock."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")[:60] or "run"
    return f"fastface-run-{slug}-{hashlib.sha256(root.rstrip('/').encode()).hexdigest()[:8]}"


def ensure_limit(name: str) -> None:
    """Create the one-slot global concurrency limit ``name`` unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass


def on_temporary_server() -> bool:
    """True when this process runs its own temporary Prefect server (no ``PREFECT_API_URL`` was set)."""
    from flows.interrupt import temporary_servers

    return bool(temporary_servers())


class RunLockTimeout(TimeoutError):
    """Another run of the config held the lock for longer than the caller would wait."""


@contextmanager
def file_lock(path: Path, *, timeout_seconds: float | None = None, poll_s: float = 0.5) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` for the block; the OS releases it when the process ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise RunLockTimeout(f"another run holds {path} (waited {timeout_seconds:g} s)") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def run_lock(run_name: str, root: str, *, timeout_seconds: float | None = None) -> Iterator[str]:
    """Hold the run's slot for the block (waits while another run of it holds the slot); yields the lock's name."""
    name = lock_name(run_name, root)
    if on_temporary_server():
        from prefect.settings import PREFECT_HOME

        with file_lock(Path(PREFECT_HOME.value()) / "run-locks" / f"{name}.lock", timeout_seconds=timeout_seconds):
            yield name
        return
    from prefect.concurrency.sync import concurrency

    ensure_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS, strict=True):
        yield name


__all__ = ["LEASE_SECONDS", "RunLockTimeout", "ensure_limit", "file_lock", "lock_name", "on_temporary_server", "run_lock"]

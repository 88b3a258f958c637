"""One evaluation of a run at a time: a Prefect global concurrency limit of one slot per (run name, root).

A schedule that fires while the previous run of the same config is still working, or two
people starting the same config, would otherwise plan the same missing images and make them
twice. The second run waits for the slot, then plans against what the first one stored and
finds nothing (or only what is still missing) to do.

The slot is a lease the holder renews while it works; a run that is killed (its worker
lost, the pod evicted) stops renewing and the Prefect server frees the slot after the lease
(:data:`LEASE_SECONDS`, the server's minimum) plus its repossessor interval (15 s by default),
so a killed run delays the next one by about a minute and never blocks it for good.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
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


@contextmanager
def run_lock(run_name: str, root: str, *, timeout_seconds: float | None = None) -> Iterator[str]:
    """Hold the run's slot for the block (waits while another run of it holds the slot); yields the lock's name."""
    from prefect.concurrency.sync import concurrency

    name = lock_name(run_name, root)
    ensure_limit(name)
    with concurrency(name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=LEASE_SECONDS, strict=True):
        yield name


__all__ = ["LEASE_SECONDS", "ensure_limit", "lock_name", "run_lock"]

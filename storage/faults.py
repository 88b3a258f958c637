"""Faults under the store and how a write meets them: which errors pass (an unreachable S3 endpoint or
catalog database, waited out for :func:`retry_seconds`), which are conflicts between writers (tried
again at once), which end it at once (a full disk); and the tests' pause point in the write path.
"""

from __future__ import annotations

import os
import time
from typing import Callable

from storage.duck import StorageError

PAUSE_AT_ENV = "FASTFACE_STORAGE_PAUSE_AT"
"""Test hook: name of a point in the write path ("in-transaction": rows inserted, not yet
committed) at which the writer touches the file named by ``FASTFACE_STORAGE_PAUSE_MARKER``
and sleeps for ``FASTFACE_STORAGE_PAUSE_S`` seconds (default an hour), so a test can kill it there."""


def pause_point(point: str) -> None:
    if os.environ.get(PAUSE_AT_ENV) != point:
        return
    marker = os.environ.get("FASTFACE_STORAGE_PAUSE_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write(point)
    time.sleep(float(os.environ.get("FASTFACE_STORAGE_PAUSE_S", "3600")))


def retryable(exc: BaseException) -> bool:
    """A write conflict between writers of one catalog (locked, busy, serialisation): try again at once."""
    text = str(exc).lower()
    return any(s in text for s in ("conflict", "locked", "busy", "could not serialize", "retry"))


RETRY_ENV = "FASTFACE_STORAGE_RETRY_S"
"""Seconds a write keeps retrying while the S3 endpoint or the catalog database is unreachable
(default :data:`DEFAULT_RETRY_S`); then it fails with one line and nothing of it is stored."""
DEFAULT_RETRY_S = 120.0
_UNREACHABLE = ("could not connect", "connection refused", "could not establish", "connection reset",
                "connection aborted", "timed out", "timeout", "server closed the connection",
                "connection to server", "terminating connection", "no connection to the server", "broken pipe",
                "connection not open", "connection is closed", "connection has been closed", "service unavailable",
                "slow down", "internal server error", "http 500", "http 502", "http 503", "http 504",
                "endpoint url", "name or service not known", "temporary failure in name resolution")
_NO_SPACE = ("no space left on device", "database or disk is full", "disk full", "enospc")


def unreachable(exc: BaseException) -> bool:
    """A fault of a service under the store (S3 endpoint, catalog database) that may pass: worth waiting for."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return True
    except ImportError:
        pass
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = str(exc).lower()
    permanent = ("does not exist", "authentication failed", "password", "permission denied", "access denied")
    return any(s in text for s in _UNREACHABLE) and not any(s in text for s in permanent) and not no_space(exc)


def no_space(exc: BaseException) -> bool:
    import errno

    return getattr(exc, "errno", None) == errno.ENOSPC or any(s in str(exc).lower() for s in _NO_SPACE)


def retry_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        raise StorageError(f"${RETRY_ENV} must be a number of seconds, got {os.environ[RETRY_ENV]!r}") from None


class Outage:
    """Waiting out an unreachable service (S3, the catalog database): pauses from 0.25 s doubling up to 5 s,
    for at most :func:`retry_seconds` from the first failure; then one line (StorageError)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.pause = 0.25

    def wait(self, failure: Callable[[float], str]) -> None:
        """Sleep before the next try, or raise ``StorageError(failure(seconds waited))`` once the bound is spent."""
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since >= retry_seconds():
            raise StorageError(failure(now - self.since)) from None
        time.sleep(self.pause)
        self.pause = min(self.pause * 2, 5.0)

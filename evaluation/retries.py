"""Which failures a Prefect task retries: only those a second try can change.

A connection that dropped, an actor that died, memory that ran out: retried. A bad
config, a missing file, an unknown name, a photo without a face: the same input fails
the same way, so it fails at once (one error instead of three tries and six tracebacks).
"""

from __future__ import annotations

from typing import Any

_DETERMINISTIC_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                            PermissionError)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can fix: connections, timeouts, dead Ray actors and workers, out of memory."""
    if isinstance(exc, (MemoryError, TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        return not isinstance(exc, _DETERMINISTIC_OS_ERRORS)
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if name == "OutOfMemoryError" and module.startswith("torch"):
        return True
    if module.startswith("ray."):
        return name in ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                        "NodeDiedError", "RaySystemError", "GetTimeoutError", "ObjectLostError",
                        "OwnerDiedError", "OutOfMemoryError")
    if module.startswith(("botocore.", "aiobotocore.", "aiohttp.", "httpx", "httpcore", "urllib3.")):
        return "Credentials" not in name and "ParamValidation" not in name
    if isinstance(exc, RuntimeError) and "actors died" in str(exc):  # actors.pool gave up on a dying pool
        return True
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """``retry_condition_fn`` of the flows' tasks: retry only :func:`is_transient` failures."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - the task's own exception
            exc = raised
        else:
            return False
    return is_transient(exc)


__all__ = ["is_transient", "retry_transient"]

"""Ctrl-C for ``fastface evaluate``: stop within seconds, say what is kept and how to resume, no traceback.

Left to Python and Prefect, a SIGINT to the process group (what a terminal sends) kills
the temporary Prefect server along with the run, and the run then retries calls to it for
minutes, with tracebacks. Every row the store holds is complete (writes are atomic, the
pools append whole batches), so nothing has to be flushed: the handler counts what the
store holds, shuts Ray and the temporary Prefect server down, prints one line and exits
with 130. A second Ctrl-C, or cleanup that hangs, exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Callable

EXIT_INTERRUPTED = 130
CLEANUP_S = 6.0  # counting rows and stopping Ray / Prefect; then exit regardless


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # kills this driver's actors; stops the local cluster when this process started it


def temporary_servers() -> list[Any]:
    """The temporary Prefect servers this process runs (none when it talks to ``PREFECT_API_URL``).

    A process that started one has imported Prefect's server module; one that has not is not
    made to import it (the whole server app: ~3 s of CPU in every flow-run process of a
    deployment, and in a Ctrl-C's cleanup), for an answer known to be "none".
    """
    if "prefect.server.api.server" not in sys.modules:
        return []
    from prefect.server.api.server import SubprocessASGIServer

    return list(SubprocessASGIServer._instances.values())


def stop_temporary_prefect_server() -> None:
    for server in temporary_servers():
        server.stop()


def _run_with_limit(groups: list[list[Callable[[], None]]], seconds: float) -> None:
    """Run each group's steps in order, the groups side by side, for at most ``seconds`` in all."""
    def run(steps: list[Callable[[], None]]) -> None:
        for step in steps:
            try:
                step()
            except BaseException:  # noqa: BLE001 - best effort while exiting
                pass

    workers = [threading.Thread(target=run, args=(steps,), daemon=True) for steps in groups]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + seconds
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))


def install(describe: Callable[[], str], resume_hint: str) -> None:
    """Handle SIGINT/SIGTERM: one line ``interrupted: <describe()>; <resume_hint>``, cleanup, exit 130."""
    state = {"interrupted": False}

    def handler(signum, frame) -> None:
        if state["interrupted"]:
            os._exit(EXIT_INTERRUPTED)
        state["interrupted"] = True
        # Whatever the main thread was doing, exit before the 10 s a user waits for.
        threading.Timer(CLEANUP_S + 2.0, lambda: os._exit(EXIT_INTERRUPTED)).start()
        logging_off()
        kept = {"text": "the store holds every row finished before the interrupt"}

        def count() -> None:
            kept["text"] = describe()

        # Counting reads the store only; it runs beside the cleanup, each with the whole budget (on a
        # loaded machine opening the store alone can take seconds).
        _run_with_limit([[count], [stop_ray, stop_temporary_prefect_server]], CLEANUP_S)
        # Straight to the file descriptor: inside a flow run Prefect's log_prints turns print() into a log call.
        # A progress bar leaves its line open (it redraws with \r): start the message on a line of its own.
        newline = "\n" if _open_progress_bars() else ""
        os.write(2, f"{newline}interrupted: {kept['text']}; {resume_hint}\n".encode())
        os._exit(EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _open_progress_bars() -> bool:
    try:
        from tqdm import tqdm
    except ImportError:
        return False
    return any(not getattr(bar, "disable", False) for bar in list(getattr(tqdm, "_instances", ())))


def logging_off() -> None:
    """Nothing more from Prefect's or Ray's loggers: the one line is the last thing printed."""
    import logging

    logging.disable(logging.CRITICAL)


__all__ = ["EXIT_INTERRUPTED", "install", "temporary_servers"]

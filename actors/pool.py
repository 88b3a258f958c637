"""Ray pools of generator and metric actors that live for a whole flow run: batches in, rows back, the driver writes them.

- :class:`ActorPool` is one pool of actors of one kind (:class:`WorkerSpec`: a plain worker
  class, its batch method and its constructor arguments). Actors start lazily, up to the
  pool's shape (:func:`pool_shape`: one per GPU Ray sees, fractions of a GPU when more
  workers are asked for, else one per ``cpus_per_worker`` CPUs), load their model ONCE and
  are then fed batch after batch, call after call, until :meth:`ActorPool.close`. A flow
  opens its pools once and feeds them shard by shard (:class:`GeneratorPools`,
  :class:`MetricPool`), so N shards on M actors load each model M times, not N × M. Each
  pool keeps ONE queue across calls: the flow queues the next shard (:func:`ahead`) before
  the current shard's call, so actors go on with it instead of draining at the boundary.
- Generator actors take two batches at a time (``WorkerSpec.concurrency``): the next batch
  runs while the previous one's images are stored (:mod:`actors.generator`).
- The DRIVER appends the rows of the batches that finished within ``write_interval_s`` in ONE
  transaction (:meth:`storage.Store.append`, atomic), so a crash never records half a batch,
  and a re-run plans only what is missing.
- Faults: an actor that dies (a killed process, a lost node) has its batch retried on a
  replacement actor (``max_retries`` per batch); when the cluster has shrunk below the
  pool's shape the slot is retired instead of restarted. A CUDA out-of-memory error splits
  the batch in halves, down to one example, which then gets a failed row. A worker
  exception fails its batch's rows and the sweep goes on; an actor that cannot start
  (a bad model name) stops the run with its reason.

Works on a local Ray (``ray.init()``) or an existing cluster (``RAY_ADDRESS``); see
:func:`connect_ray`. Uses Ray directly, not Prefect's task runner, so flows stay thin.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from fastface.extras import require

require("ray", needed_for="the Ray actor pools")

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.generator import BatchKey, GeneratorOptions, GeneratorWorker, failed_generation_rows, identity_index
from actors.scorer import MetricWorker, failed_metric_rows
from actors.worker_env import QUIET_VARS, actor_runtime_env
from storage.plan import plan_missing_metrics
from storage.store import Store

NAMESPACE = "fastface"
"""Ray namespace of the pools' named actors (``fastface-<kind>-<pool>-<slot>.<restart>``)."""

_OOM = "__out_of_memory__"
log = logging.getLogger("fastface.actors")
WATCHDOG_TICK_S = 1.0  # how often the driver looks for a stuck actor while it waits


def connect_ray(address: str | None = None, **init_kwargs: Any) -> dict[str, float]:
    """Join a Ray cluster unless this process already has: ``address``, else ``$RAY_ADDRESS``, else a local one.

    Returns ``ray.cluster_resources()``. ``init_kwargs`` go to ``ray.init`` (``num_cpus``,
    ``num_gpus``, ``runtime_env``, …) and are ignored when Ray is already initialised. A
    cluster with token authentication needs ``RAY_AUTH_MODE=token`` and the cluster's token
    (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) in this process's environment, as on
    every node (see infra/README.md).
    """
    global _connection
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        init_kwargs.setdefault("log_to_driver", _verbose())
        # No address: always a Ray of our own. ray.init() alone would join whatever cluster was
        # last started on this machine (another user's, a test's) — joining one is explicit.
        if not address and not _verbose():
            _silence_token_auth_notice()
        ray.init(address=address or "local", **init_kwargs)
        _connection = f"joined the cluster at {address}" if address else "started a local Ray"
    return ray.cluster_resources()


_connection = "joined an already connected Ray"

#: Ray (≥ 2.5x) turns token authentication on for every new local cluster and logs a WARNING saying
#: so each time; nothing is wrong (the token lives in ~/.ray/auth_token, the cluster is ours alone).
_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropTokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_TOKEN_AUTH_NOTICE)


def _silence_token_auth_notice() -> None:
    """Drop only that notice (token authentication stays on), where Ray logs it."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in logger.filters):
        logger.addFilter(_DropTokenAuthNotice())


def describe_ray() -> str:
    """How this process reached Ray and what the cluster holds, e.g. ``joined the cluster at h:6379 (2 nodes, …)``."""
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return (f"{_connection} ({nodes} node{'' if nodes == 1 else 's'}, {resources.get('CPU', 0):g} CPUs, "
            f"{resources.get('GPU', 0):g} GPUs)")


def _verbose() -> bool:
    """Model-loading bars and worker logs only with FASTFACE_VERBOSE=1 or debug logging."""
    return os.environ.get("FASTFACE_VERBOSE", "") not in ("", "0") or logging.getLogger().isEnabledFor(logging.DEBUG)


def pool_shape(num_workers: int | None = None, *, cpus_per_worker: float = 1.0, use_gpus: bool = True,
               gpus_per_worker: float | None = None) -> tuple[int, float]:
    """``(workers, GPUs per worker)`` for the GPUs Ray sees; ``(n, 0.0)`` on a cluster without GPUs.

    By default one worker per whole GPU. More workers than GPUs share them in equal fractions.
    Without GPUs, one worker per ``cpus_per_worker`` CPUs (at least one). Never more workers
    than the cluster's CPUs can place at ``cpus_per_worker`` each (each actor reserves that many).
    ``use_gpus=False`` shapes a CPU-only pool on any cluster.

    ``gpus_per_worker``: the pool's own request, whatever the cluster holds now — ``num_workers``
    actors (default: as many as the GPUs present fit, at least one) of that many GPUs each. Actors
    the cluster cannot place yet wait as pending demand, which an autoscaler turns into nodes
    (:meth:`ActorPool._ask_for_gpus`), so no cap by the CPUs present either.
    """
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0)) if use_gpus else 0.0
    cpus = float(resources.get("CPU", 1.0))
    if num_workers is not None and int(num_workers) < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if use_gpus and gpus_per_worker:
        workers = int(num_workers) if num_workers is not None else max(1, int(gpus // gpus_per_worker))
        return workers, float(gpus_per_worker)
    # Actors beyond what the CPUs can place would wait forever with batches queued on them.
    cpu_cap = max(1, int(cpus // cpus_per_worker)) if cpus_per_worker > 0 else None
    if gpus > 0:
        workers = int(num_workers) if num_workers is not None else max(1, int(gpus))
    else:
        workers = int(num_workers) if num_workers is not None else (cpu_cap or 1)
    if cpu_cap is not None:
        workers = min(workers, cpu_cap)
    if gpus <= 0:
        return workers, 0.0
    return workers, (1.0 if workers <= gpus else gpus / workers)


class NoGpuError(RuntimeError):
    """A pool that needs GPUs (real weights) found none in the cluster; the message names the setting."""


def ask_for_gpus(workers: int, gpus_each: float, cpus_each: float, *, kind: str = "generator",
                 wait_s: float | None = None) -> None:
    """Ask the cluster's autoscaler for ``workers`` bundles of ``gpus_each`` GPUs (Ray's
    ``request_resources``: the autoscaler adds nodes for them even before the actors exist) and,
    with ``wait_s``, wait that long for the first GPU: none → :class:`NoGpuError` (request withdrawn).
    Withdraw with ``request_resources(bundles=[])`` when the work is done."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": gpus_each, "CPU": cpus_each}] * workers)
    log.info("%s pool: asked the cluster for %d workers with %g GPU each", kind, workers, gpus_each)
    if wait_s is None:
        return
    deadline = time.monotonic() + max(0.0, wait_s)
    while float(ray.cluster_resources().get("GPU", 0.0)) <= 0:
        if time.monotonic() >= deadline:
            request_resources(bundles=[])
            raise NoGpuError(
                f"no GPU in the Ray cluster after {wait_s:g} s (the {kind} pool asks for {workers} workers with "
                f"{gpus_each:g} GPU each): give the cluster GPU nodes or an autoscaler with a GPU node type, "
                "or set execution.device: cpu to run real weights on CPUs")
        time.sleep(1.0)


# -- the actor -------------------------------------------------------------------------------------
class _WorkerActor:
    """Ray actor around a plain worker (:class:`GeneratorWorker`, :class:`MetricWorker`) that loads its models once.

    ``run`` calls the worker's batch method; an out-of-memory error comes back as a marker, not a crash.
    """

    def __init__(self, worker_class: type, method: str, *args: Any, **kwargs: Any) -> None:
        self.node = ray.get_runtime_context().get_node_id()
        if "node" in inspect.signature(worker_class).parameters:  # rows record the Ray node they were made on
            kwargs = dict(kwargs, node=self.node)
        self.worker = worker_class(*args, **kwargs)
        self._method = method

    def run(self, batch: list[dict], method: str | None = None) -> Any:
        try:
            return getattr(self.worker, method or self._method)(batch)
        except Exception as exc:
            torch = sys.modules.get("torch")  # a worker that never imported torch raises no torch error
            if torch is None or not isinstance(exc, torch.OutOfMemoryError):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {_OOM: str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"}

    def describe(self) -> dict:
        return {"pid": os.getpid(), "node": self.node}


# -- the pool --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PoolOptions:
    """Shape and fault tolerance of a pool (``execution`` of the config)."""

    num_workers: int | None = None  # default: one per GPU, else one per cpus_per_worker CPUs
    cpus_per_worker: float = 1.0
    max_retries: int = 2  # re-runs of a batch whose actor died
    use_gpus: bool = True  # False: CPU actors even where GPUs are (face analysis next to a generator pool)
    # GPUs each actor asks for, whatever the cluster holds now (pending actors make an autoscaler add
    # GPU nodes; see pool_shape). None: one actor per GPU present (CPU actors where there is none).
    gpus_per_worker: float | None = None
    # Real weights: a pool that finds no GPU within gpu_wait_s (nodes an autoscaler starts included)
    # fails naming execution.device, instead of running SDXL on CPUs.
    require_gpus: bool = False
    gpu_wait_s: float = 600.0
    # Stuck-actor watchdog: an actor holding a batch longer than stuck_factor × the pool's median
    # batch time (at least stuck_floor_s) is killed; its batches are retried on a new actor like those
    # of an actor that died (no duplicates: a killed batch's rows were never returned). Until an actor
    # has returned its first batch (it loads its models first) the bound is stuck_first_s. None: off.
    stuck_factor: float | None = 10.0
    stuck_floor_s: float = 30.0
    stuck_first_s: float = 900.0
    verbose: bool | None = None  # model-loading bars in the actors; default from FASTFACE_VERBOSE / debug logging
    # The driver appends the rows of the batches that finished within this many seconds in one
    # transaction (one file per run) and keeps the actors fed meanwhile: an append costs about the
    # same for 16 rows as for 500, so one per batch cannot keep up with 64 GPUs. A row waits at
    # most this long to be written; a crash loses at most this much work, never a row twice.
    # 0: one append per batch.
    write_interval_s: float = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What every actor of a pool builds: ``worker_class(*args, worker_id=…, **kwargs)``, fed through ``method``."""

    worker_class: type
    method: str
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    # Batches one actor runs at once (Ray threads in the actor, and batches in flight per actor):
    # 2 for generators that store the previous batch's images while the next one runs. The
    # worker must then be safe to call from two threads (GeneratorWorker serialises its GPU work).
    concurrency: int = 1


@dataclass
class PoolStats:
    """Counts of one pool call (or, summed, of a whole pool's life)."""

    batches: int = 0
    ok: int = 0  # rows recorded without an error
    failed: int = 0  # rows recorded with status failed / an error
    retried: int = 0  # batches re-run after their actor died
    split: int = 0  # batches halved after an out-of-memory error
    actor_restarts: int = 0
    files: int = 0
    workers: int = 0  # the most actors the pool had at once
    actors_started: int = 0  # every start loads the worker's models once
    stuck_killed: int = 0  # actors the watchdog killed for holding a batch too long

    def add(self, other: "PoolStats") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, max(getattr(self, key), value) if key == "workers" else getattr(self, key) + value)


@dataclass(eq=False)
class _Job:
    """One call's batches, or a shard queued ahead of its call: where their results go, and their counts."""

    on_result: Callable[[list[dict], Any], None]
    on_failure: Callable[[list[dict], str], None]
    method: str | None = None
    stats: PoolStats = field(default_factory=PoolStats)
    open: int = 0  # batches queued or in flight
    # (run_id, example_id) of the rows this job writes (record jobs); open in the pool from queueing
    # until the call that claims the job returns, written or not
    keys: set = field(default_factory=set)
    on_batch: Callable[[dict], None] | None = None
    unreported: list = field(default_factory=list)  # rows written before a call claimed the job
    cancelled: bool = False


@dataclass(eq=False)
class _Batch:
    rows: list[dict]
    job: _Job
    attempts: int = 0
    dispatched_at: float = 0.0  # time.monotonic() when it was handed to its current actor


@dataclass(eq=False)
class _Held:
    """Rows of one finished batch, waiting for the next flush (``written``: those already appended)."""

    job: _Job
    store: Store
    table: str
    rows: list[dict]
    written: list = field(default_factory=list)


def _key(row: Mapping[str, Any]) -> tuple[str, str] | None:
    example_id = row.get("example_id")
    return None if example_id is None else (str(row.get("run_id")), str(example_id))


def _last_line(text: str) -> str:
    """The last non-empty line of a Ray error (the exception itself, after Ray's traceback), without colours."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    return lines[-1] if lines else text


def _task_error_text(exc: RayTaskError) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return str(exc).strip().splitlines()[-1]


class ActorPool:
    """Actors of one :class:`WorkerSpec`, started on first use and kept until :meth:`close`.

    :meth:`record` runs batches and appends each one's rows to a store table (one file per
    batch); :meth:`map` runs batches and returns their results (dataset synthesis).
    :meth:`queue` puts the next shard's batches in line behind the current call's, so the
    actors go on with them while the current call's last batches finish (the pool never
    drains at a shard boundary); the :meth:`record` call for those rows later claims them.

    Each actor runs up to ``WorkerSpec.concurrency`` batches at once (a generator's next batch
    starts while the previous one's images are stored); batches go to idle actors first.
    """

    def __init__(self, spec: WorkerSpec, *, kind: str, options: PoolOptions = PoolOptions(),
                 actor_class: type = _WorkerActor) -> None:
        self.spec, self.kind, self.options = spec, kind, options
        self._remote = ray.remote(actor_class)
        # The driver's store settings, credentials and weight locations, for actors on any node.
        self._runtime_env = actor_runtime_env()
        self._requested = False  # an autoscaler request of this pool is open (withdrawn in close())
        self._pool_id = uuid.uuid4().hex[:8]
        self._actors: dict[int, Any] = {}  # slot -> handle
        self._load: dict[int, int] = {}  # slot -> batches in flight on its actor
        self._restarts: dict[int, int] = {}
        self._capacity: int | None = None
        self._gpus_each = 0.0
        self._pending: collections.deque[_Batch] = collections.deque()  # FIFO over calls and queued shards
        self._in_flight: dict[Any, tuple[int, Any, _Batch]] = {}  # ref -> (slot, actor handle, batch)
        self._held: list[_Held] = []  # finished batches' rows, appended by _flush()
        self._flush_due: float | None = None  # when the oldest held batch must be written
        self._open: dict[tuple[str, str], _Job] = {}  # (run_id, example_id) of unreturned jobs -> the job
        self._deaths = 0
        self._durations: collections.deque[float] = collections.deque(maxlen=64)  # seconds of recent batches
        self._warm: set[int] = set()  # slots whose current actor has returned a batch (its models are loaded)
        self.stats = PoolStats()  # the whole life of the pool
        self.closed = False

    # -- actors ----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"fastface-{self.kind}-{self._pool_id}"

    def _shape(self) -> int:
        if self._capacity is None:
            gpus_each = self.options.gpus_per_worker or (1.0 if self.options.require_gpus else None)
            self._capacity, self._gpus_each = pool_shape(self.options.num_workers,
                                                         cpus_per_worker=self.options.cpus_per_worker,
                                                         use_gpus=self.options.use_gpus, gpus_per_worker=gpus_each)
            if self._gpus_each > 0 and self.options.use_gpus and gpus_each:
                self._ask_for_gpus()
        return self._capacity

    def _ask_for_gpus(self) -> None:
        """Tell the autoscaler what the pool needs and, when GPUs are required, wait for the first GPU
        node (:func:`ask_for_gpus`); the request is withdrawn in :meth:`close`, so nodes scale down."""
        self._requested = True
        ask_for_gpus(self._capacity, self._gpus_each, self.options.cpus_per_worker, kind=self.kind,
                     wait_s=self.options.gpu_wait_s if self.options.require_gpus else None)

    def _start(self, slot: int, job: _Job | None = None) -> Any:
        restart = self._restarts.setdefault(slot, 0)
        name = f"{self.name}-{slot}.{restart}"
        verbose = _verbose() if self.options.verbose is None else self.options.verbose
        # Model-loading bars and library logs of every actor would bury the driver's progress display: they
        # are off through the environment the libraries read when imported (an actor imports none to quiet it).
        runtime_env = self._runtime_env if verbose else \
            dict(self._runtime_env, env_vars={**QUIET_VARS, **self._runtime_env.get("env_vars", {})})
        handle = self._remote.options(
            name=name, namespace=NAMESPACE, num_gpus=self._gpus_each, num_cpus=self.options.cpus_per_worker,
            max_restarts=0, max_concurrency=max(1, int(self.spec.concurrency)), runtime_env=runtime_env,
        ).remote(self.spec.worker_class, self.spec.method, *self.spec.args, worker_id=name, **dict(self.spec.kwargs))
        self._actors[slot] = handle
        self._load[slot] = 0
        self.stats.actors_started += 1
        if job is not None:
            job.stats.actors_started += 1
        self.stats.workers = max(self.stats.workers, len(self._actors))
        return handle

    def actors(self) -> dict[str, Any]:
        """Named handles of the live actors (for tests and diagnostics)."""
        return {f"{self.name}-{slot}.{self._restarts[slot]}": handle for slot, handle in self._actors.items()}

    def close(self) -> None:
        """Kill the actors (their models go with them); the pool cannot be used afterwards.

        Batches still queued or running (a shard queued ahead whose call never came) are
        dropped unwritten: their rows are simply missing, and a re-run plans them again.
        """
        for handle in self._actors.values():
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already dead, or Ray is shutting down
                pass
        self._actors.clear()
        self._load.clear()
        self._pending.clear()
        self._in_flight.clear()
        self._held.clear()
        self._open.clear()
        if self._requested:
            self._requested = False
            try:
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=[])  # the nodes it brought may go once idle
            except Exception:  # Ray is shutting down
                pass
        self.closed = True

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- feeding ---------------------------------------------------------------------------------
    def _submit(self, job: _Job, batches: Iterable[list[dict]]) -> None:
        for rows in batches:
            if rows:
                self._pending.append(_Batch(list(rows), job))
                job.open += 1
                job.stats.batches += 1

    def _dispatch(self) -> None:
        """Start actors while more batches wait than actors are idle (up to the pool's shape), then hand
        batches out: to idle actors first, then up to ``concurrency`` per actor."""
        if not self._pending:
            return
        capacity = self._shape()
        idle = sum(1 for load in self._load.values() if load == 0)
        while len(self._pending) > idle and len(self._actors) < capacity:
            slot = next(s for s in range(capacity + len(self._restarts) + 1) if s not in self._actors)
            self._start(slot, self._pending[min(idle, len(self._pending) - 1)].job)
            idle += 1
        depth = max(1, int(self.spec.concurrency))
        while self._pending:
            free = [slot for slot, load in self._load.items() if load < depth]
            if not free:
                return
            slot = min(free, key=lambda s: (self._load[s], s))
            batch = self._pending.popleft()
            handle = self._actors[slot]
            batch.dispatched_at = time.monotonic()
            self._in_flight[handle.run.remote(batch.rows, batch.job.method)] = (slot, handle, batch)
            self._load[slot] += 1

    def _drive(self, jobs: list[_Job]) -> None:
        """Run the pool until ``jobs`` have no batch left, then write what is held.

        Batches of other jobs (shards queued ahead) run on the same actors meanwhile, and
        their rows are written by the same flushes. Held rows are written
        ``write_interval_s`` after the first of them finished (idle actors get new work
        meanwhile), at the end, and when this raises (Ctrl-C too): nothing finished is lost.
        A call that raises drops its jobs' batches still queued or running (their rows are
        not written; a retry plans them again), so no row is ever written twice.
        """
        if self.closed:
            raise RuntimeError(f"{self.kind} pool is closed")
        capacity = self._shape()
        allowed = (max(0, self.options.max_retries) + 1) * max(capacity, 1)
        self._deaths = 0
        try:
            while any(job.open for job in jobs):
                self._dispatch()
                if self._flush_due is not None and time.monotonic() >= self._flush_due:
                    self._flush()
                    continue
                if not self._in_flight:
                    raise RuntimeError(f"{self.kind} pool has no actors left and the cluster has no room for new "
                                       f"ones ({len(self._pending)} batches waiting)")
                timeout = None if self._flush_due is None else max(0.0, self._flush_due - time.monotonic())
                if self.options.stuck_factor:  # wake up to look for a stuck actor
                    timeout = min(timeout if timeout is not None else WATCHDOG_TICK_S, WATCHDOG_TICK_S)
                ready, _ = ray.wait(list(self._in_flight), num_returns=1, timeout=timeout)
                if ready:
                    self._collect(ready[0], allowed)
                else:
                    self._kill_stuck_actors()
            self._dispatch()  # actors freed by the last batches go on with queued work before the append
            self._flush()
        except BaseException:
            try:
                self._flush()
            finally:
                self._cancel(jobs)
            raise
        self._dispatch()

    def stuck_after_s(self, slot: int | None = None) -> float | None:
        """Seconds an actor may hold a batch before the watchdog kills it (None: no watchdog): for an actor
        that has returned a batch, ``stuck_factor`` × the pool's median batch time (at least
        ``stuck_floor_s``); before that (models loading), ``stuck_first_s``."""
        if not self.options.stuck_factor:
            return None
        if slot is not None and slot not in self._warm:
            return self.options.stuck_first_s
        if not self._durations:
            return self.options.stuck_floor_s
        median = sorted(self._durations)[len(self._durations) // 2]
        return max(self.options.stuck_floor_s, self.options.stuck_factor * median)

    def _kill_stuck_actors(self) -> None:
        """Kill each actor whose oldest batch in flight is older than :meth:`stuck_after_s`: its calls then
        end in ``RayActorError`` and :meth:`_collect` retries their batches on a new actor."""
        if not self.options.stuck_factor:
            return
        now = time.monotonic()
        stuck: dict[int, tuple[Any, float]] = {}
        for slot, handle, batch in self._in_flight.values():
            bound = self.stuck_after_s(slot)
            if now - batch.dispatched_at > bound and self._actors.get(slot) is handle:
                stuck[slot] = (handle, bound)
        for slot, (handle, bound) in stuck.items():
            log.warning("%s pool: actor %s held a batch for more than %.0f s (watchdog); killing it, its batches "
                        "are retried", self.kind, slot, bound)
            self.stats.stuck_killed += 1
            self._warm.discard(slot)
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already gone
                pass

    def _collect(self, ref: Any, deaths_allowed: int) -> None:
        """Take one finished call: its rows, or a retry / split / failure of its batch."""
        slot, handle, batch = self._in_flight.pop(ref)
        current = self._actors.get(slot) is handle  # False: an earlier call on this dead actor restarted the slot
        if current:
            self._load[slot] -= 1
        job = batch.job
        try:
            result = ray.get(ref)
            if current:
                if slot in self._warm:  # a first batch's time includes loading the models
                    self._durations.append(time.monotonic() - batch.dispatched_at)
                self._warm.add(slot)
        except RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):  # a config error: every replacement would fail
                raise RuntimeError(f"{self.kind} actor failed to start: {_last_line(str(exc))}") from exc
            if current:
                self._deaths += 1
                job.stats.actor_restarts += 1
                if self._deaths > deaths_allowed:
                    raise RuntimeError(
                        f"{self.kind} actors died {self._deaths} times (limit {deaths_allowed}); giving up"
                    ) from exc
                del self._actors[slot], self._load[slot]
                self._warm.discard(slot)
                self._restarts[slot] += 1
                # A lost node shrinks the cluster: keep only as many actors as it can still place.
                self._capacity = None
                if len(self._actors) < self._shape():
                    self._start(slot, job)
                else:
                    log.warning("%s pool: actor %s lost; the cluster now holds %d actors of this pool",
                                self.kind, slot, self._shape())
            batch.attempts += 1
            if batch.attempts <= self.options.max_retries and not job.cancelled:
                job.stats.retried += 1
                self._pending.appendleft(batch)
                return
            self._finish(batch, failure=f"{self.kind} actor died {batch.attempts} times on this batch: {exc}")
        except RayTaskError as exc:  # the worker raised: the batch fails, the sweep goes on
            self._finish(batch, failure=_task_error_text(exc))
        else:
            if isinstance(result, dict) and _OOM in result:
                if len(batch.rows) > 1 and not job.cancelled:
                    job.stats.split += 1
                    half = (len(batch.rows) + 1) // 2
                    self._pending.appendleft(_Batch(batch.rows[half:], job, batch.attempts))
                    self._pending.appendleft(_Batch(batch.rows[:half], job, batch.attempts))
                    job.open += 1  # two batches in place of one
                    return
                self._finish(batch, failure=f"out of memory at batch size 1: {result[_OOM]}")
            else:
                self._finish(batch, result=result)

    def _finish(self, batch: _Batch, *, result: Any = None, failure: str | None = None) -> None:
        job = batch.job
        job.open -= 1
        if job.cancelled:  # its call raised: the rows are not written (a retry plans them again)
            return
        if failure is not None:
            job.on_failure(batch.rows, failure)
        else:
            job.on_result(batch.rows, result)

    def _hold(self, job: _Job, store: Store, table: str, batch: list[dict], rows: list[dict]) -> None:
        self._held.append(_Held(job, store, table, list(rows)))
        if self._flush_due is None:
            self._flush_due = time.monotonic() + max(0.0, self.options.write_interval_s)

    def _flush(self) -> None:
        """Append the held rows: one transaction (one file) per store, table and run."""
        self._flush_due = None
        if not self._held:
            return
        groups: dict[tuple[int, str, str], list[_Held]] = {}
        for held in self._held:
            for run_id in dict.fromkeys(row["run_id"] for row in held.rows):
                groups.setdefault((id(held.store), held.table, run_id), []).append(held)
        written: dict[_Job, list[dict]] = {}
        try:
            for (_, table, run_id), entries in groups.items():
                rows = [row for held in entries for row in held.rows if row["run_id"] == run_id]
                if entries[0].store.append(table, rows, run_id) is not None:
                    entries[0].job.stats.files += 1
                # Written: out of the held rows at once, so the flush on the way out of a failed
                # append of another run's rows never appends these a second time.
                for held in entries:
                    held.written += [row for row in held.rows if row["run_id"] == run_id]
                    held.rows = [row for row in held.rows if row["run_id"] != run_id]
                    if not held.rows:
                        self._done(held)
                        written.setdefault(held.job, []).extend(held.written)
        finally:
            self._held = [held for held in self._held if held.rows]
        for job, rows in written.items():
            self._report(job, rows)

    def _done(self, held: _Held) -> None:
        """All rows of a held batch are written: counted. (Its keys stay open until the call that claimed
        its job returns, so a shard queued ahead and written before its call is not run again by that call.)"""
        failed = sum(1 for row in held.written if row.get("status") == "failed" or row.get("error") is not None)
        held.job.stats.failed += failed
        held.job.stats.ok += len(held.written) - failed

    def _report(self, job: _Job, rows: list[dict]) -> None:
        if job.on_batch is None:  # a shard queued ahead: reported when its call claims it
            job.unreported += rows
            return
        job.on_batch({"kind": self.kind, "rows": rows, "ok": job.stats.ok, "failed": job.stats.failed})

    def _release(self, job: _Job) -> None:
        """The job's rows are written and its call returns: its keys may be queued again (a later re-plan)."""
        for key in job.keys:
            if self._open.get(key) is job:
                del self._open[key]

    def _cancel(self, jobs: list[_Job]) -> None:
        """Drop ``jobs``' batches still queued, running or held unwritten; their keys can be planned again."""
        for job in jobs:
            job.cancelled = True
        self._pending = collections.deque(batch for batch in self._pending if not batch.job.cancelled)
        self._held = [held for held in self._held if not held.job.cancelled]
        for key in [key for key, job in self._open.items() if job.cancelled]:
            del self._open[key]

    # -- calls -----------------------------------------------------------------------------------
    def _record_job(self, store: Store, table: str, failed_rows: Callable[[list[dict], str], list[dict]]) -> _Job:
        job = _Job(on_result=lambda batch, rows: None, on_failure=lambda batch, error: None)
        job.on_result = lambda batch, rows: self._hold(job, store, table, batch, rows)
        job.on_failure = lambda batch, error: self._hold(job, store, table, batch, failed_rows(batch, error))
        return job

    def queue(self, store: Store, table: str, batches: Sequence[list[dict]], *,
              failed_rows: Callable[[list[dict], str], list[dict]]) -> int:
        """Queue ``batches`` for :meth:`record` behind the work already queued, and start them on idle actors.

        Returns the number of rows queued. Rows of a job not yet returned by its call (by
        ``(run_id, example_id)``: queued, running, held or already written) are not queued twice. Results are collected (and written) while a
        :meth:`record` call runs; the call for these rows claims them and reports them.
        """
        if self.closed:
            raise RuntimeError(f"{self.kind} pool is closed")
        job = self._record_job(store, table, failed_rows)
        fresh = self._claim(batches, job, [])
        self._dispatch()
        return sum(len(rows) for rows in fresh)

    def _claim(self, batches: Sequence[list[dict]], job: _Job, adopted: list[_Job]) -> list[list[dict]]:
        """Submit to ``job`` the rows of ``batches`` that no job holds yet; jobs that hold the others go to ``adopted``."""
        fresh = []
        for rows in batches:
            keep = []
            for row in rows:
                key = _key(row)
                owner = self._open.get(key) if key is not None else None
                if owner is None:
                    keep.append(row)
                    if key is not None:
                        self._open[key] = job
                        job.keys.add(key)
                elif owner is not job and owner not in adopted:
                    adopted.append(owner)
            if keep:
                fresh.append(keep)
        self._submit(job, fresh)
        return fresh

    def record(self, store: Store, table: str, batches: Sequence[list[dict]], *,
               failed_rows: Callable[[list[dict], str], list[dict]],
               on_batch: Callable[[dict], None] | None = None) -> PoolStats:
        """Run ``batches``; append their rows (or failed rows) to ``table``, one transaction and file per run
        for the batches that finished within ``PoolOptions.write_interval_s`` of each other.

        Rows already queued by :meth:`queue` (a shard queued ahead) are not run again: this call
        claims that work, reports what it already wrote through ``on_batch`` and waits for the rest.
        """
        if self.closed:
            raise RuntimeError(f"{self.kind} pool is closed")
        job = self._record_job(store, table, failed_rows)
        adopted: list[_Job] = []
        self._claim(batches, job, adopted)
        jobs = [*adopted, job]
        for claimed in jobs:
            claimed.on_batch = on_batch
            if claimed.unreported:
                rows, claimed.unreported = claimed.unreported, []
                self._report(claimed, rows)
        self._drive(jobs)
        stats = PoolStats()
        for claimed in jobs:
            self._release(claimed)
            stats.add(claimed.stats)
            claimed.stats = PoolStats()  # counted once, here
        stats.workers = self.stats.workers
        self.stats.add(PoolStats(**{**asdict(stats), "actors_started": 0, "workers": 0}))
        return stats

    def map(self, batches: Sequence[list[dict]], *, method: str | None = None) -> list[Any]:
        """Run ``batches`` (with ``method`` instead of the spec's) and return their results, concatenated in order.

        A batch that fails (worker exception, out of memory at one row, actor deaths past the
        retries) raises: results here feed a computation, not a table of per-row outcomes.
        """
        keyed = [[dict(row, _order=(b, i)) for i, row in enumerate(rows)] for b, rows in enumerate(batches)]
        out: dict[tuple[int, int], Any] = {}

        def keep(rows: list[dict], results: list[Any]) -> None:
            for row, result in zip(rows, results):
                out[row["_order"]] = result

        def fail(rows: list[dict], error: str) -> None:
            raise RuntimeError(f"{self.kind} pool: {error}")

        job = _Job(on_result=keep, on_failure=fail, method=method)
        self._submit(job, keyed)
        self._drive([job])
        self.stats.add(PoolStats(**{**asdict(job.stats), "actors_started": 0, "workers": 0}))
        return [out[key] for key in sorted(out)]


# -- generation and scoring pools of a flow run ------------------------------------------------------
def _chunks(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i: i + size] for i in range(0, len(rows), size)]


def _summary(stats: PoolStats, **extra: Any) -> dict:
    return {**asdict(stats), **extra}


class GeneratorPools:
    """One generator pool per (model, steps) for the life of a flow run, fed shard by shard.

    Pools of different models would claim the same GPUs, so a shard of a new model closes
    the previous model's pool first; shards come grouped by model (:func:`evaluation.sweep.shards`),
    so each model's pool starts once per run. ``identities``: ``identities`` rows (or
    content_hash → row) shipped to every actor once; hashes not found there are looked up in
    the store by the workers. :meth:`queue` puts the next shard in line on the current
    model's pool, so the pool does not drain at the shard boundary (:func:`ahead`).
    """

    def __init__(self, store: Store, *, options: GeneratorOptions | Mapping[str, Any] | None = None,
                 pool: PoolOptions = PoolOptions(), batch_size: int = 4, identities: Any = None,
                 worker_class: type = GeneratorWorker) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.store, self.batch_size, self.pool_options = store, int(batch_size), pool
        self.worker_class = worker_class  # actors.rehearsal.RehearsalGenerator for weights: rehearsal
        self.options = options if isinstance(options, GeneratorOptions) else GeneratorOptions.from_mapping(options)
        self._identities = identity_index(identities)
        self._identities_ref = None
        self._current: tuple[tuple[str, int], ActorPool] | None = None
        self.stats = PoolStats()
        self._closed_loads: dict[tuple[str, int], int] = {}

    @property
    def loads(self) -> dict[tuple[str, int], int]:
        """(model, steps) -> actors started (= pipelines loaded) over the run."""
        loads = dict(self._closed_loads)
        if self._current is not None:
            key, pool = self._current
            loads[key] = loads.get(key, 0) + pool.stats.actors_started
        return {key: n for key, n in loads.items() if n}

    def pool_for(self, model: str, steps: int) -> ActorPool:
        if self._current is not None and self._current[0] == (model, steps):
            return self._current[1]
        self._close_current()
        if self._identities_ref is None:
            self._identities_ref = ray.put(self._identities)
        # Two batches per actor: the next one runs while the previous one's images are stored.
        concurrency = 2 if self.options.upload_threads else 1
        spec = WorkerSpec(self.worker_class, "generate", (self.store, model),
                          dict(self.options.worker_kwargs(), steps=steps, identities=self._identities_ref),
                          concurrency=concurrency)
        pool = ActorPool(spec, kind="generator", options=self.pool_options)
        self._current = ((model, steps), pool)
        return pool

    def _batches(self, examples: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[list[dict]]]:
        groups: dict[tuple[str, int], dict[tuple[str, BatchKey], list[dict]]] = {}
        for row in examples:
            key = BatchKey.of(row)
            groups.setdefault((key.model, key.steps), {}).setdefault((row["run_id"], key), []).append(dict(row))
        return {model_steps: [chunk for rows in by_key.values() for chunk in _chunks(rows, self.batch_size)]
                for model_steps, by_key in groups.items()}

    def queue(self, examples: Sequence[Mapping[str, Any]]) -> int:
        """Queue ``examples`` (the next shard) behind the work in hand, on the pool of their model.

        Only examples of the open pool's model (or any, before a pool is open) are queued:
        another model's pool would close this one. Returns how many were queued; the
        :meth:`generate` call for these examples runs nothing twice.
        """
        queued = 0
        for (model, steps), batches in self._batches(examples).items():
            if self._current is None or self._current[0] == (model, steps):
                queued += self.pool_for(model, steps).queue(self.store, "generations", batches,
                                                            failed_rows=failed_generation_rows)
        return queued

    def generate(self, examples: Sequence[Mapping[str, Any]], *,
                 on_batch: Callable[[dict], None] | None = None) -> dict:
        """Generate ``examples`` (``examples`` rows, already planned) on the pools; returns the call's counts."""
        started = time.perf_counter()
        total = PoolStats()
        for (model, steps), batches in self._batches(examples).items():
            pool = self.pool_for(model, steps)
            stats = pool.record(self.store, "generations", batches, failed_rows=failed_generation_rows,
                                on_batch=on_batch)
            total.add(stats)
        self.stats.add(total)
        return _summary(total, planned=len(examples), seconds=time.perf_counter() - started)

    def _close_current(self) -> None:
        if self._current is not None:
            key, pool = self._current
            self._closed_loads[key] = self._closed_loads.get(key, 0) + pool.stats.actors_started
            pool.close()
            self._current = None

    def close(self) -> None:
        self._close_current()

    def __enter__(self) -> "GeneratorPools":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class MetricPool:
    """The metric pool of a flow run: metric models load once per actor; fed with (example, metrics) work shard by shard."""

    def __init__(self, store: Store, metrics: Sequence[str], *, options: Mapping[str, Any] | None = None,
                 pool: PoolOptions = PoolOptions(), batch_size: int = 16, identities: Any = None,
                 worker_class: type = MetricWorker) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.worker_class = worker_class  # actors.rehearsal.RehearsalScorer for weights: rehearsal
        self.metrics = list(dict.fromkeys(metrics))
        if not self.metrics:
            raise ValueError("no metrics given")
        self.store, self.batch_size = store, int(batch_size)
        self._options = dict(options or {})
        self._identities = identity_index(identities)
        self._pool: ActorPool | None = None
        self.pool_options = pool
        self.stats = PoolStats()

    @property
    def pool(self) -> ActorPool:
        if self._pool is None:
            spec = WorkerSpec(self.worker_class, "score", (self.store, self.metrics),
                              dict(self._options, identities=ray.put(self._identities), batch_size=self.batch_size))
            self._pool = ActorPool(spec, kind="scorer", options=self.pool_options)
        return self._pool

    def _batches(self, work: Sequence[Mapping[str, Any]]) -> list[list[dict]]:
        groups: dict[tuple[str, BatchKey], list[dict]] = {}
        for row in work:
            groups.setdefault((row["run_id"], BatchKey.of(row)), []).append(dict(row))
        return [chunk for rows in groups.values() for chunk in _chunks(rows, self.batch_size)]

    def _failed_rows(self, batch: list[dict], error: str) -> list[dict]:
        return failed_metric_rows(batch, self.metrics, error)

    def queue(self, work: Sequence[Mapping[str, Any]]) -> int:
        """Queue ``work`` (the next shard) behind the work in hand; the :meth:`score` call for it runs nothing twice."""
        return self.pool.queue(self.store, "metrics", self._batches(work), failed_rows=self._failed_rows)

    def score(self, work: Sequence[Mapping[str, Any]], *, on_batch: Callable[[dict], None] | None = None) -> dict:
        """Score ``work``: ``examples`` rows, each with ``metrics`` (those still missing; default all of the pool's)."""
        started = time.perf_counter()
        stats = self.pool.record(self.store, "metrics", self._batches(work), on_batch=on_batch,
                                 failed_rows=self._failed_rows)
        self.stats.add(stats)
        planned = sum(len(row.get("metrics") or self.metrics) for row in work)
        return _summary(stats, planned=planned, seconds=time.perf_counter() - started)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "MetricPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def ahead(shards: Sequence[Any], queue: Callable[[Any], Any]) -> Iterable[tuple[int, Any]]:
    """``(index, shard)`` for each shard, after queueing it and the shard after it with ``queue``.

    How a flow keeps its pools fed across shard boundaries: while shard ``i``'s call waits
    for its last batches, shard ``i + 1``'s batches already run on the actors that are free.
    Each shard's call still claims, writes and reports its own rows (the unit of progress
    and retry stays the shard).
    """
    # Each shard is taken from ``shards`` once: a lazy sequence (evaluation.sweep.TableShards) builds its
    # rows on every access, and the queued rows and the yielded ones are then the same objects.
    current = shards[0] if len(shards) else None
    for index in range(len(shards)):
        if index == 0:
            queue(current)
        following = shards[index + 1] if index + 1 < len(shards) else None
        if following is not None:
            queue(following)
        yield index, current
        current = following


def missing_metric_work(store: Store, examples: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict]:
    """``examples`` rows with the ``metrics`` each still lacks (:func:`storage.plan.plan_missing_metrics`, per run)."""
    by_run: dict[str, list[dict]] = {}
    for row in examples:
        by_run.setdefault(row["run_id"], []).append(dict(row))
    work = []
    for run_rows in by_run.values():
        wanted: dict[str, list[str]] = {}
        for example_id, metric in plan_missing_metrics(store, run_rows, list(metrics)):
            wanted.setdefault(example_id, []).append(metric)
        work += [dict(row, metrics=wanted[row["example_id"]]) for row in run_rows if row["example_id"] in wanted]
    return work


__all__ = [
    "NAMESPACE", "ActorPool", "ahead", "GeneratorPools", "MetricPool", "NoGpuError", "ask_for_gpus", "PoolOptions",
    "PoolStats", "WorkerSpec",
    "connect_ray", "describe_ray", "missing_metric_work", "pool_shape",
]

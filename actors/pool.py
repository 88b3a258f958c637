"""Ray pools of generator and metric actors: batches out, rows back, the driver writes them.

- One actor per GPU Ray sees (``num_gpus=1``), or a fraction of a GPU each when more
  workers than GPUs are asked for; with no GPU, actors on CPUs (one per
  ``cpus_per_worker`` CPUs, at least one).
- Examples are grouped into batches that share a pipeline call (:data:`actors.generator.BATCH_KEY`
  and the run), actors load their model once, and batches are handed out with ``ray.wait``.
- The DRIVER appends each finished batch's rows as ONE Parquet file (atomic), so a crash
  never records half a batch, and a re-run (planned with :mod:`storage.plan`) does only
  what is missing.
- Faults: an actor that dies has its batch retried on a replacement actor (``max_retries``
  per batch); a CUDA out-of-memory error splits the batch in halves, down to one example,
  which then gets a failed row.

Works on a local Ray (``ray.init()``) or an existing cluster (``RAY_ADDRESS``); see
:func:`connect_ray`. Uses Ray directly, not Prefect's task runner, so flows stay thin.
"""

from __future__ import annotations

import collections
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from fastface.extras import require

require("ray", needed_for="the Ray actor pools")

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.generator import GeneratorWorker, batch_key, failed_generation_rows, identity_index
from actors.scorer import MetricWorker, failed_metric_rows
from storage.plan import plan_missing_generations, plan_missing_metrics
from storage.store import Store

NAMESPACE = "fastface"
"""Ray namespace of the pools' named actors (``fastface-generator-<pool>-<slot>.<restart>``)."""

_OOM = "__out_of_memory__"


def connect_ray(address: str | None = None, **init_kwargs: Any) -> dict[str, float]:
    """Join a Ray cluster unless this process already has: ``address``, else ``$RAY_ADDRESS``, else a local one.

    Returns ``ray.cluster_resources()``. ``init_kwargs`` go to ``ray.init`` (``num_cpus``,
    ``num_gpus``, ``runtime_env``, …) and are ignored when Ray is already initialised.
    """
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, **init_kwargs)
    return ray.cluster_resources()


def pool_shape(num_workers: int | None = None, *, cpus_per_worker: float = 1.0) -> tuple[int, float]:
    """``(workers, GPUs per worker)`` for the GPUs Ray sees; ``(n, 0.0)`` on a cluster without GPUs.

    By default one worker per whole GPU. More workers than GPUs share them in equal fractions.
    Without GPUs, one worker per ``cpus_per_worker`` CPUs (at least one). Never more workers
    than the cluster's CPUs can place at ``cpus_per_worker`` each (each actor reserves that many).
    """
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 1.0))
    if num_workers is not None and int(num_workers) < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
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


class _WorkerActor:
    """Ray actor around a worker (:class:`GeneratorWorker` or :class:`MetricWorker`) that loads its models once.

    ``method`` is the worker's batch method; an out-of-memory error comes back as a marker, not a crash.
    """

    def __init__(self, worker_class: type, method: str, *args: Any, **kwargs: Any) -> None:
        self.worker = worker_class(*args, **kwargs)
        self._run = getattr(self.worker, method)

    def run(self, batch: list[dict]) -> Any:
        import torch

        try:
            return self._run(batch)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {_OOM: str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"}


@dataclass
class _Batch:
    rows: list[dict]
    attempts: int = 0


def _last_line(text: str) -> str:
    """The last non-empty line of a Ray error (the exception itself, after Ray's traceback), without colours."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if line.strip()]
    return lines[-1] if lines else text


def _task_error_text(exc: RayTaskError) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return str(exc).strip().splitlines()[-1]


def _drive(
    store: Store,
    table: str,
    batches: list[list[dict]],
    *,
    actor_class: type,
    actor_args: tuple,
    actor_kwargs: dict,
    kind: str,
    num_workers: int | None,
    cpus_per_worker: float,
    max_retries: int,
    failed_rows: Callable[[list[dict], str], list[dict]],
    units: Callable[[list[dict]], int],
    bar: Any,
    on_batch: Callable[[dict], None] | None,
    stats: dict,
) -> None:
    """Run ``batches`` on a pool of ``actor_class`` actors; append each batch's rows to ``table`` as one file."""
    if not batches:
        return
    workers, gpus_each = pool_shape(num_workers, cpus_per_worker=cpus_per_worker)
    workers = min(workers, len(batches))
    remote = ray.remote(actor_class)
    pool_id = uuid.uuid4().hex[:8]
    restarts_allowed = max(0, max_retries) * workers + workers
    stats["workers"] = max(stats.get("workers", 0), workers)

    def start(slot: int, restart: int):
        name = f"fastface-{kind}-{pool_id}-{slot}.{restart}"
        return remote.options(
            name=name, namespace=NAMESPACE, num_gpus=gpus_each, num_cpus=cpus_per_worker, max_restarts=0,
        ).remote(*actor_args, worker_id=name, **actor_kwargs)

    actors = [start(slot, 0) for slot in range(workers)]
    restarts = [0] * workers
    pending = collections.deque(_Batch(rows) for rows in batches)
    idle = list(range(workers))[::-1]
    in_flight: dict[Any, tuple[int, _Batch]] = {}

    def record(rows: list[dict]) -> None:
        by_run: dict[str, list[dict]] = {}
        for row in rows:
            by_run.setdefault(row["run_id"], []).append(row)
        for run_id, run_rows in by_run.items():
            if store.append(table, run_rows, run_id) is not None:
                stats["files"] += 1
        failed = sum(1 for row in rows if row.get("status") == "failed" or row.get("error") is not None)
        stats["failed"] += failed
        stats["ok"] += len(rows) - failed
        bar.update(units(rows))
        if on_batch is not None:
            on_batch({"kind": kind, "rows": rows, **{k: v for k, v in stats.items() if not isinstance(v, dict)}})

    try:
        while pending or in_flight:
            while pending and idle:
                slot = idle.pop()
                batch = pending.popleft()
                in_flight[actors[slot].run.remote(batch.rows)] = (slot, batch)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            slot, batch = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                if getattr(exc, "actor_init_failed", False):  # a config error: every replacement would fail too
                    raise RuntimeError(f"{kind} actor failed to start: {_last_line(str(exc))}") from exc
                stats["actor_restarts"] += 1
                if stats["actor_restarts"] > restarts_allowed:
                    raise RuntimeError(
                        f"{kind} actors died {stats['actor_restarts']} times (limit {restarts_allowed}); giving up"
                    ) from exc
                restarts[slot] += 1
                actors[slot] = start(slot, restarts[slot])
                idle.append(slot)
                batch.attempts += 1
                if batch.attempts > max_retries:
                    record(failed_rows(batch.rows, f"{kind} actor died {batch.attempts} times on this batch: {exc}"))
                else:
                    stats["retried"] += 1
                    pending.appendleft(batch)
                continue
            except RayTaskError as exc:  # the worker raised: record the batch as failed, keep the sweep going
                idle.append(slot)
                record(failed_rows(batch.rows, _task_error_text(exc)))
                continue
            idle.append(slot)
            if isinstance(result, dict) and _OOM in result:
                if len(batch.rows) > 1:
                    stats["split"] += 1
                    half = (len(batch.rows) + 1) // 2
                    pending.appendleft(_Batch(batch.rows[half:], batch.attempts))
                    pending.appendleft(_Batch(batch.rows[:half], batch.attempts))
                else:
                    record(failed_rows(batch.rows, f"out of memory at batch size 1: {result[_OOM]}"))
                continue
            record(result)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)


def _new_stats() -> dict:
    return {"planned": 0, "skipped": 0, "batches": 0, "ok": 0, "failed": 0, "retried": 0, "split": 0,
            "actor_restarts": 0, "files": 0, "workers": 0, "seconds": 0.0}


def _identities_for(store: Store, identities: Any, hashes: set[str]) -> dict[str, dict]:
    index = identity_index(identities)
    if not hashes <= set(index):
        index = {**identity_index(store.read("identities").to_pylist()), **index}
    return {h: index[h] for h in hashes if h in index}


def _chunks(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def run_generation(
    store: Store,
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 4,
    num_workers: int | None = None,
    pipeline_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    identities: Any = None,
    max_retries: int = 2,
    cpus_per_worker: float = 1.0,
    plan: bool = True,
    on_batch: Callable[[dict], None] | None = None,
) -> dict:
    """Generate the images of ``examples`` (``examples`` rows) on a Ray pool; returns a summary.

    With ``plan`` (default) examples whose latest ``generations`` row is ok are skipped
    (:func:`storage.plan.plan_missing_generations`). Examples are grouped by run and
    :data:`~actors.generator.BATCH_KEY` into batches of at most ``batch_size``; each
    (model, steps) gets its own pool, one after another, so weights load once per actor.
    ``pipeline_options`` go to :class:`~actors.generator.GeneratorWorker` (``device``,
    ``dtype``, ``cache_dir``, ``identity_cache_dir``, ``face_backend``, ``pipeline_factory``,
    load_pipeline overrides, the ``fail_oom_above_batch`` test hook). ``identities``:
    identities rows for the examples (default: read from the store). ``on_batch(event)``
    is called in the driver after each batch's rows are stored.

    Summary keys: planned, skipped, batches, ok, failed, retried (batches re-run after an
    actor died), split (batches halved after out-of-memory), actor_restarts, files,
    workers, seconds.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    connect_ray()
    rows = [dict(r) for r in examples]
    todo = plan_missing_generations(store, rows) if plan and rows else rows
    stats = _new_stats()
    stats["planned"], stats["skipped"] = len(todo), len(rows) - len(todo)
    options = dict(pipeline_options or {})
    for reserved in ("store", "model", "steps", "identities", "worker_id"):
        if reserved in options:
            raise ValueError(f"pipeline_options may not set {reserved!r}; it comes from the examples and the pool")
    pools: dict[tuple[str, int], dict[tuple, list[dict]]] = {}
    for row in todo:
        key = batch_key(row)
        pools.setdefault((key[0], key[6]), {}).setdefault((row["run_id"], *key), []).append(row)
    with tqdm(total=len(todo), desc="generating", unit="img", disable=not progress) as bar:
        for (model, steps), groups in pools.items():
            batches = [chunk for group in groups.values() for chunk in _chunks(group, batch_size)]
            stats["batches"] += len(batches)
            hashes = {row["identity_hash"] for group in groups.values() for row in group}
            index = ray.put(_identities_for(store, identities, hashes))
            bar.set_description(f"generating {model}")
            _drive(
                store, "generations", batches,
                actor_class=_WorkerActor, actor_args=(GeneratorWorker, "generate", store, model),
                actor_kwargs=dict(options, steps=steps, identities=index),
                kind="generator", num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                max_retries=max_retries, failed_rows=failed_generation_rows, units=len, bar=bar,
                on_batch=on_batch, stats=stats,
            )
    stats["seconds"] = time.perf_counter() - started
    return stats


def run_scoring(
    store: Store,
    examples: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    *,
    batch_size: int = 16,
    num_workers: int | None = None,
    metric_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    identities: Any = None,
    max_retries: int = 2,
    cpus_per_worker: float = 1.0,
    plan: bool = True,
    on_batch: Callable[[dict], None] | None = None,
) -> dict:
    """Score the generated images of ``examples`` with ``metrics`` on a Ray pool; returns a summary.

    With ``plan`` (default) only (example, metric) pairs not yet scored whose generation is
    ok are done (:func:`storage.plan.plan_missing_metrics`, per run). Each batch's rows
    go to the ``metrics`` table as one file. ``metric_options`` go to
    :class:`~actors.scorer.MetricWorker` (and from there to ``score_images``). Summary as
    :func:`run_generation`, counted in (example, metric) rows; ``planned`` counts pairs.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    connect_ray()
    metrics = list(dict.fromkeys(metrics))
    if not metrics:
        raise ValueError("no metrics given")
    rows = [dict(r) for r in examples]
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(row)
    stats = _new_stats()
    todo: list[dict] = []
    for run_id, run_rows in by_run.items():
        if plan:
            wanted: dict[str, list[str]] = {}
            for example_id, metric in plan_missing_metrics(store, run_rows, metrics):
                wanted.setdefault(example_id, []).append(metric)
        else:
            wanted = {row["example_id"]: list(metrics) for row in run_rows}
        generations = {g["example_id"]: g for g in store.latest("generations", run_id=run_id).to_pylist()}
        for row in run_rows:
            if row["example_id"] in wanted:
                uri = (generations.get(row["example_id"]) or {}).get("image_uri")
                todo.append(dict(row, metrics=wanted[row["example_id"]], image_uri=uri))
    stats["planned"] = sum(len(row["metrics"]) for row in todo)
    stats["skipped"] = len(rows) * len(metrics) - stats["planned"]
    groups: dict[tuple, list[dict]] = {}
    for row in todo:
        groups.setdefault((row["run_id"], *batch_key(row)), []).append(row)
    batches = [chunk for group in groups.values() for chunk in _chunks(group, batch_size)]
    stats["batches"] = len(batches)
    index = ray.put(_identities_for(store, identities, {row["identity_hash"] for row in todo})) if todo else None
    with tqdm(total=stats["planned"], desc=f"scoring {', '.join(metrics)}", unit="score", disable=not progress) as bar:
        _drive(
            store, "metrics", batches,
            actor_class=_WorkerActor, actor_args=(MetricWorker, "score", store, metrics),
            actor_kwargs=dict(dict(metric_options or {}), identities=index, batch_size=batch_size),
            kind="scorer", num_workers=num_workers, cpus_per_worker=cpus_per_worker, max_retries=max_retries,
            failed_rows=lambda batch, error: failed_metric_rows(batch, metrics, error), units=len, bar=bar,
            on_batch=on_batch, stats=stats,
        )
    stats["seconds"] = time.perf_counter() - started
    return stats


__all__ = ["NAMESPACE", "connect_ray", "pool_shape", "run_generation", "run_scoring"]

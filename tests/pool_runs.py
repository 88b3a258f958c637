"""One-call forms of the pools for the tests: a pool opened for one call, closed after it (the flows keep
theirs open for the whole run, flows/generate.py). They drive :class:`actors.pool.GeneratorPools` and
:class:`actors.pool.MetricPool` exactly as the flows do, with a plan of what is missing first."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from actors.generator import GeneratorOptions
from actors.pool import (GeneratorPools, MetricPool, PoolOptions, PoolStats, _summary, connect_ray,
                         missing_metric_work)
from storage import Store
from storage.plan import plan_missing_generations


def _progress_bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled)


def run_generation(
    store: Store,
    examples: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 4,
    num_workers: int | None = None,
    pipeline_options: Mapping[str, Any] | GeneratorOptions | None = None,
    progress: bool = True,
    identities: Any = None,
    max_retries: int = 2,
    write_interval_s: float = 1.0,
    cpus_per_worker: float = 1.0,
    plan: bool = True,
    on_batch: Callable[[dict], None] | None = None,
) -> dict:
    """Generate the images of ``examples`` (``examples`` rows) on pools opened for this call; returns a summary.

    With ``plan`` (default) examples whose latest ``generations`` row is ok are skipped
    (:func:`storage.plan.plan_missing_generations`). ``pipeline_options``: a
    :class:`~actors.generator.GeneratorOptions` or its fields as a mapping. ``identities``:
    identities rows for the examples (default: the workers read them from the store).

    Summary keys: planned, skipped, batches, ok, failed, retried, split, actor_restarts,
    files, workers, actors_started, seconds.
    """
    started = time.perf_counter()
    connect_ray()
    rows = [dict(r) for r in examples]
    todo = plan_missing_generations(store, rows) if plan and rows else rows
    options = PoolOptions(num_workers=num_workers, cpus_per_worker=cpus_per_worker, max_retries=max_retries,
                          write_interval_s=write_interval_s)
    with GeneratorPools(store, options=pipeline_options, pool=options, batch_size=batch_size,
                        identities=identities) as pools, \
            _progress_bar(len(todo), "images", "img", progress) as bar:
        def step(event: dict) -> None:
            bar.update(len(event["rows"]))
            if on_batch is not None:
                on_batch(event)

        summary = pools.generate(todo, on_batch=step)
    summary["skipped"] = len(rows) - len(todo)
    summary["seconds"] = time.perf_counter() - started
    return summary


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
    """Score the generated images of ``examples`` with ``metrics`` on a pool opened for this call; returns a summary.

    With ``plan`` (default) only (example, metric) pairs not yet scored whose generation is
    ok are done. The worker reads each image at ``images/<run>/<example_id>.png`` (where
    the generator writes it) unless a row carries ``image_uri``. Summary as
    :func:`run_generation`, counted in (example, metric) rows; ``planned`` counts pairs.
    """
    started = time.perf_counter()
    connect_ray()
    metrics = list(dict.fromkeys(metrics))
    if not metrics:
        raise ValueError("no metrics given")
    rows = [dict(r) for r in examples]
    work = missing_metric_work(store, rows, metrics) if plan else [dict(r, metrics=metrics) for r in rows]
    options = PoolOptions(num_workers=num_workers, cpus_per_worker=cpus_per_worker, max_retries=max_retries)
    planned = sum(len(row["metrics"]) for row in work)
    with MetricPool(store, metrics, options=metric_options, pool=options, batch_size=batch_size,
                    identities=identities) as pool, \
            _progress_bar(planned, "scores", "score", progress) as bar:
        def step(event: dict) -> None:
            bar.update(len(event["rows"]))
            if on_batch is not None:
                on_batch(event)

        summary = pool.score(work, on_batch=step) if work else _summary(PoolStats(), planned=0)
    summary["skipped"] = len(rows) * len(metrics) - planned
    summary["seconds"] = time.perf_counter() - started
    return summary

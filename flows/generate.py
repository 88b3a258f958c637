"""Prefect flows ``generate`` and ``score``: plan what is missing once, run it on Ray pools, one task per shard.

Each flow run opens its pools once (:class:`actors.pool.GeneratorPools`: one generator
pool per model; :class:`actors.pool.MetricPool`) and feeds them shard by shard, so
models load once per actor for the whole run. A shard is a list of examples
(``execution.shard_size``, grouped by model): the unit of retry and of progress in the
Prefect UI. The next shard is queued on the pool while the current one's task runs
(:func:`actors.pool.ahead`), so the actors go on with it instead of waiting for the
current shard's slowest batch; its task then claims that work. The flow plans once
against the store; a shard's retry re-checks only its own examples, so it does only what
is still missing and never writes a row twice.

The plan (:mod:`evaluation.sweep`) stays in Arrow; a shard becomes Python rows only when it
runs (:class:`evaluation.sweep.TableShards`), so the driver never holds the run's 1.45 M
examples as rows. ``weights: rehearsal`` runs the same flows on model-free workers
(:func:`evaluation.sweep.worker_classes`, :mod:`actors.rehearsal`).
"""

from __future__ import annotations

from typing import Any

from fastface.extras import require  # noqa: E402

require('prefect', 'ray', 'pyarrow', 'duckdb', needed_for='the evaluation flows')

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.utilities.annotations import quote

import pyarrow as pa
import pyarrow.compute as pc

from actors.pool import GeneratorPools, MetricPool, ahead, missing_metric_work
from evaluation.config import EvaluationConfig
from evaluation.retries import retry_transient
from flows import artifact_key
from evaluation.sweep import (APPEND_ROWS, TableShards, dataset_rows, metric_options, pipeline_options,
                              plan_missing_examples_table, pool_options, scoring_work, sweep_examples_table,
                              worker_classes)
from storage import Store, plan_missing_generations


@task(cache_policy=NONE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def plan_task(config: EvaluationConfig, root: str) -> pa.Table:
    """Expand the sweep and append the ``examples`` rows not yet stored; returns all of the sweep's examples (Arrow)."""
    store = Store(root)
    examples = sweep_examples_table(config, *dataset_rows(store, config))
    missing = plan_missing_examples_table(store, examples)
    for start in range(0, missing.num_rows, APPEND_ROWS):
        part = missing.slice(start, APPEND_ROWS)
        index = part.schema.get_field_index("resolved_config")
        store.append("examples", part.set_column(index, "resolved_config", part.column(index).cast(pa.string())),
                     config.name)
    get_run_logger().info("%d examples planned, %d new", examples.num_rows, missing.num_rows)
    return examples


@task(cache_policy=NONE)
def check_gpus(config: EvaluationConfig) -> str:
    """Before any work: a run on real weights finds its GPUs (nodes an autoscaler adds within
    ``execution.gpu_wait_s`` included) or fails in one line naming ``execution.device``."""
    from actors.pool import ask_for_gpus, connect_ray, describe_ray, pool_shape

    options = pool_options(config)
    if not options.require_gpus:
        return "no GPUs required"
    connect_ray(config.execution.ray_address)
    workers, gpus_each = pool_shape(options.num_workers, cpus_per_worker=options.cpus_per_worker,
                                    gpus_per_worker=options.gpus_per_worker)
    from ray.autoscaler.sdk import request_resources

    try:
        ask_for_gpus(workers, gpus_each, options.cpus_per_worker, wait_s=options.gpu_wait_s)
    finally:
        request_resources(bundles=[])  # the pools ask again, for themselves
    return describe_ray()


def _is_retry() -> bool:
    """True in a task run's second or later attempt (Prefect retries a shard that raised)."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return context is not None and context.task_run.run_count > 1


def _progress(artifact_id, total: int, bar: Any):
    done = {"n": 0}

    def on_batch(event: dict) -> None:
        done["n"] += len(event["rows"])
        bar.update(len(event["rows"]))
        update_progress_artifact(artifact_id=artifact_id, progress=min(100.0, 100.0 * done["n"] / max(total, 1)))

    return on_batch


def _bar(total: int, desc: str, unit: str):
    """The stage's one progress display (counts and rate), on the flow's console."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, task_run_name="generate-shard-{index}",
      retry_condition_fn=retry_transient)
def generate_shard(pools: GeneratorPools, examples: list[dict], index: int, bar: Any = None) -> dict:
    """Generate one shard on the run's generator pools.

    The flow planned the shard and queued it on the pool (its batches may be running
    already); this task claims them, writes its rows and reports its progress. A retry
    re-checks this shard's examples only (rows its first attempt recorded are not made again;
    the batches a failed attempt left running are dropped unwritten).
    """
    todo = plan_missing_generations(pools.store, examples) if _is_retry() else examples
    if bar is not None and len(todo) < len(examples):
        bar.update(len(examples) - len(todo))
    artifact = create_progress_artifact(progress=0.0, description=f"shard {index}: {len(todo)} images")
    summary = pools.generate(todo, on_batch=_progress(artifact, len(todo), bar if bar is not None else _NoBar()))
    update_progress_artifact(artifact_id=artifact, progress=100.0)
    summary["skipped"] = len(examples) - len(todo)
    return summary


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, task_run_name="score-shard-{index}",
      retry_condition_fn=retry_transient)
def score_shard(pool: MetricPool, work: list[dict], index: int, bar: Any = None) -> dict:
    """Score one shard (examples with the metrics they lack) on the run's metric pool; a retry re-checks its own pairs."""
    todo = missing_metric_work(pool.store, work, pool.metrics) if _is_retry() else work
    planned = sum(len(row["metrics"]) for row in work)
    remaining = sum(len(row["metrics"]) for row in todo)
    if bar is not None and remaining < planned:
        bar.update(planned - remaining)
    artifact = create_progress_artifact(progress=0.0, description=f"scoring shard {index}: {remaining} scores")
    summary = pool.score(todo, on_batch=_progress(artifact, remaining, bar if bar is not None else _NoBar()))
    update_progress_artifact(artifact_id=artifact, progress=100.0)
    summary["skipped"] = planned - remaining
    return summary


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _shard_task(shard_task: Any, config: EvaluationConfig) -> Any:
    """The shard task with ``execution.retries`` (a shard that fails for a transient reason is retried, doing
    only its missing rows) and ``execution.shard_timeout_s`` (a shard over it fails with TimeoutError)."""
    ex = config.execution
    return shard_task.with_options(retries=ex.retries, timeout_seconds=ex.shard_timeout_s)


def _total(summaries: list[dict]) -> dict:
    keys = ("planned", "skipped", "ok", "failed", "retried", "files")
    return {k: sum(int(s.get(k, 0)) for s in summaries) for k in keys}


def _identities(store: Store, config: EvaluationConfig) -> list[dict]:
    if config.dataset_run not in store.run_ids("identities"):
        return []
    return store.latest("identities", run_id=config.dataset_run).to_pylist()


@flow(name="generate", log_prints=True)
def generate_flow(config: EvaluationConfig, root: str) -> dict:
    """Plan the sweep once, then generate the missing images shard by shard on pools that live for this run."""
    from actors.pool import connect_ray, describe_ray

    logger = get_run_logger()
    examples = plan_task(config, root)
    store = Store(root)
    # The run's one planning call; shards trust it. Workers need no resolved_config (it is stored with the examples).
    todo = plan_missing_generations(store, examples.drop_columns(["resolved_config"]), as_table=True)
    parts = TableShards(todo, config.execution.shard_size)
    ex = config.execution
    summaries, loads = [], {}
    if parts:
        connect_ray(ex.ray_address)
        logger.info("Ray: %s", describe_ray())
        logger.info("generating %d images (%d already stored) in %d shards", len(todo), len(examples) - len(todo),
                    len(parts))
        with GeneratorPools(store, options=pipeline_options(config), pool=pool_options(config),
                            batch_size=ex.batch_size, identities=_identities(store, config),
                            worker_class=worker_classes(config)["generator"]) as pools, \
                _bar(len(todo), "images", "img") as bar:
            # Each shard is queued on the pool before its task runs, behind the shard before it:
            # the actors never drain at a shard boundary (actors.pool.ahead).
            run_shard = _shard_task(generate_shard, config)
            # quote(): Prefect would otherwise visit every value of every row of the shard to look
            # for futures (≈ 0.6 ms of driver CPU per image, more than everything else it does).
            summaries = [run_shard(pools, quote(shard), i, bar) for i, shard in ahead(parts, pools.queue)]
            loads = {f"{model}@{steps}": n for (model, steps), n in pools.loads.items()}
    total = dict(_total(summaries), examples=len(examples), shards=len(parts), pipeline_loads=loads)
    total["skipped"] += len(examples) - len(todo)
    create_table_artifact(key=artifact_key(config.name, "generation"),
                          table=[{k: v for k, v in total.items() if k != "pipeline_loads"}],
                          description=f"generation of run {config.name}")
    return total


@flow(name="score", log_prints=True)
def score_flow(config: EvaluationConfig, root: str) -> dict:
    """Score what is generated and not yet scored, shard by shard, on one metric pool for the run."""
    from actors.pool import connect_ray

    store = Store(root)
    metrics = list(config.metrics.names)
    examples, work = scoring_work(store, config)  # the run's one planning call, in DuckDB
    planned = pc.sum(pc.list_value_length(work.column("metrics"))).as_py() or 0
    parts = TableShards(work, config.execution.shard_size)
    ex = config.execution
    summaries, loads = [], 0
    if parts:
        connect_ray(ex.ray_address)
        get_run_logger().info("scoring %d (image, metric) pairs of %d images in %d shards", planned, len(work),
                              len(parts))
        with MetricPool(store, metrics, options=metric_options(config), pool=pool_options(config),
                        batch_size=ex.score_batch_size, identities=_identities(store, config),
                        worker_class=worker_classes(config)["scorer"]) as pool, \
                _bar(planned, "scores", "score") as bar:
            run_shard = _shard_task(score_shard, config)
            summaries = [run_shard(pool, quote(shard), i, bar) for i, shard in ahead(parts, pool.queue)]
            loads = pool.pool.stats.actors_started
    total = dict(_total(summaries), examples=examples, shards=len(parts), pairs_missing=planned,
                 metric_worker_loads=loads)
    create_table_artifact(key=artifact_key(config.name, "scoring"), table=[total],
                          description=f"scoring of run {config.name} ({', '.join(metrics)})")
    return total


__all__ = ["check_gpus", "generate_flow", "generate_shard", "plan_task", "score_flow", "score_shard"]

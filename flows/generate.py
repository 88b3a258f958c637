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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastface.extras import require  # noqa: E402

require('prefect', 'ray', 'pyarrow', 'duckdb', needed_for='the evaluation flows')

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from actors.generator import GeneratorOptions
from actors.pool import GeneratorPools, MetricPool, PoolOptions, ahead, missing_metric_work
from fastface.cache import identities_dir
from flows.config import EvaluationConfig
from flows.retries import retry_transient
from storage import Store, Sweep, plan_missing_examples, plan_missing_generations


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def cache_root(config: EvaluationConfig) -> Path:
    from fastface.cache import cache_root as root

    return root(config.execution.cache_dir)


# -- planning ------------------------------------------------------------------------------------
def resolved_preset_config(preset: str, checkpoint) -> str:
    """JSON of the DCG (α, β, φ, variant) and AM (scales, schedules) ``preset`` runs with on ``checkpoint``:
    what ``examples.resolved_config`` stores, so every image can be traced to its constants."""
    from fastface.presets import get_preset

    dcg, am = get_preset(preset).resolve(checkpoint.default_guidance)
    return json.dumps({"preset": preset, "model_default_guidance": checkpoint.default_guidance,
                       "dcg": dcg.to_dict(), "am": None if am is None else am.to_dict()}, sort_keys=True)


def sweep_examples(config: EvaluationConfig, identities: list[dict], prompts: list[dict]) -> list[dict]:
    """The examples of the config's design: per set, its presets (and the baseline) on its prompts; deduplicated."""
    from fastface.checkpoints import check_steps, get_checkpoint
    from fastface.presets import get_preset

    if not identities:
        raise ValueError(f"no identities in dataset run {config.dataset_run!r}; run the dataset flow first "
                         "(or check that the photos have faces)")
    rows: dict[str, dict] = {}
    for set_ in config.sweep.sets:
        kinds = ("realistic", "stylistic") if set_.prompts == "joint" else (set_.prompts,)
        chosen = [p for p in prompts if p["kind"] in kinds]
        if not chosen:
            raise ValueError(f"sweep set {set_.prompts!r} has no prompts of kind {' or '.join(kinds)} in the dataset")
        presets = list(dict.fromkeys([config.report.baseline, *set_.presets]))
        for model in config.sweep.models:
            checkpoint = get_checkpoint(model)
            steps = {check_steps(model, p, config.steps_for(model)) for p in presets}
            if len(steps) != 1:
                raise ValueError(f"presets {presets} resolve to different step counts {sorted(steps)} for {model!r}")
            size = config.sweep.size or checkpoint.size
            sweep = Sweep(
                run_id=config.name, identities=identities, prompts=chosen, models=[model],
                presets={p: get_preset(p).to_dict() for p in presets},
                ip_adapter_scales=config.sweep.ip_adapter_scales, lora_scales=config.sweep.lora_scales,
                run_seeds=config.sweep.seeds, steps=steps.pop(), width=size, height=size,
                code_version=config.sweep.code_version,
            )
            resolved = {p: resolved_preset_config(p, checkpoint) for p in presets}
            for row in sweep.examples():
                rows.setdefault(row["example_id"], dict(row, resolved_config=resolved[row["preset"]]))
    return list(rows.values())


def shards(examples: list[dict], size: int) -> list[list[dict]]:
    """Consecutive chunks of at most ``size`` examples, never mixing models (a shard loads one model)."""
    by_model: dict[str, list[dict]] = {}
    for row in examples:
        by_model.setdefault(row["model"], []).append(row)
    return [rows[i:i + size] for rows in by_model.values() for i in range(0, len(rows), size)]


def pipeline_options(config: EvaluationConfig) -> GeneratorOptions:
    ex = config.execution
    return GeneratorOptions(cache_dir=str(cache_root(config)), identity_cache_dir=str(identities_dir(ex.cache_dir)),
                            face_backend=config.face_backend, device=ex.device, dtype=ex.dtype)


def metric_options(config: EvaluationConfig) -> dict:
    """Options for the metric workers; with ``weights: tiny`` a tiny CLIP and aesthetic head are built on the fly."""
    m = config.metrics
    options: dict[str, Any] = {"face_backend": config.face_backend}
    if "fsc" in m.names:
        options["fsc_mode"] = m.fsc_mode
    if "face_size" in m.names:
        options["face_size_mode"] = m.face_size_mode
    needs_clip = bool({"clip", "ae", "fsc"} & set(m.names))
    tiny = config.weights == "tiny"
    if needs_clip and (m.clip_model == "tiny" or (tiny and m.clip_model is None)):
        folder = cache_root(config) / "tiny-metrics" / "clip"
        if not (folder / "open_clip_config.json").is_file():
            from fastface.metrics.clip_models import save_tiny_clip

            save_tiny_clip(folder, seed=0)
        options.update(clip_model=str(folder), clip_pretrained=None)
    elif m.clip_model is not None:
        options.update(clip_model=m.clip_model, clip_pretrained=m.clip_pretrained)
    if "ae" in m.names and (m.aesthetic_checkpoint == "tiny" or (tiny and m.aesthetic_checkpoint is None)):
        path = cache_root(config) / "tiny-metrics" / "aesthetic-linearMSE.pth"
        if not path.is_file():
            from fastface.metrics.aesthetic import save_tiny_aesthetic_head

            clip_cfg = json.loads((Path(options["clip_model"]) / "open_clip_config.json").read_text())
            save_tiny_aesthetic_head(path, int(clip_cfg["model_cfg"]["embed_dim"]), seed=0)
        options["aesthetic_checkpoint"] = str(path)
    elif m.aesthetic_checkpoint is not None:
        options["aesthetic_checkpoint"] = m.aesthetic_checkpoint
    return options


@task(cache_policy=NONE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def plan_task(config: EvaluationConfig, root: str) -> list[dict]:
    """Expand the sweep and append the ``examples`` rows not yet stored; returns all of the sweep's examples."""
    store = Store(root)
    identities = store.latest("identities", run_id=config.dataset_run).to_pylist() \
        if config.dataset_run in store.run_ids("identities") else []
    prompts = store.latest("prompts", run_id=config.dataset_run).to_pylist() \
        if config.dataset_run in store.run_ids("prompts") else []
    examples = sweep_examples(config, identities, prompts)
    missing = plan_missing_examples(store, examples)
    if missing:
        store.append("examples", missing, config.name)
    get_run_logger().info("%d examples planned, %d new", len(examples), len(missing))
    return examples


def pool_options(config: EvaluationConfig) -> PoolOptions:
    """Pools sized from the config: real weights ask for GPUs (one per actor unless
    ``execution.gpus_per_worker`` says otherwise) and fail when none comes, unless ``device: cpu``."""
    ex = config.execution
    on_gpus = config.weights == "real" and (ex.device or "cuda").split(":")[0] != "cpu"
    return PoolOptions(num_workers=ex.num_workers, cpus_per_worker=ex.cpus_per_worker,
                       gpus_per_worker=ex.gpus_per_worker or (1.0 if on_gpus else None),
                       require_gpus=on_gpus, gpu_wait_s=ex.gpu_wait_s, stuck_factor=ex.stuck_factor,
                       stuck_floor_s=ex.stuck_floor_s, stuck_first_s=ex.stuck_first_s)


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


def _with_timeout(shard_task: Any, seconds: float | None) -> Any:
    """The shard task with ``execution.shard_timeout_s`` (a shard over it fails with TimeoutError and is
    retried, doing only its missing rows); unchanged without one."""
    return shard_task.with_options(timeout_seconds=seconds) if seconds else shard_task


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
    todo = plan_missing_generations(store, examples)  # the run's one planning call; shards trust it
    parts = shards(todo, config.execution.shard_size)
    ex = config.execution
    summaries, loads = [], {}
    if parts:
        connect_ray(ex.ray_address)
        logger.info("Ray: %s", describe_ray())
        logger.info("generating %d images (%d already stored) in %d shards", len(todo), len(examples) - len(todo),
                    len(parts))
        with GeneratorPools(store, options=pipeline_options(config), pool=pool_options(config),
                            batch_size=ex.batch_size, identities=_identities(store, config)) as pools, \
                _bar(len(todo), "images", "img") as bar:
            # Each shard is queued on the pool before its task runs, behind the shard before it:
            # the actors never drain at a shard boundary (actors.pool.ahead).
            run_shard = _with_timeout(generate_shard, ex.shard_timeout_s)
            summaries = [run_shard(pools, shard, i, bar) for i, shard in ahead(parts, pools.queue)]
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
    examples = store.latest("examples", run_id=config.name).to_pylist() if config.name in store.run_ids("examples") else []
    metrics = list(config.metrics.names)
    work = missing_metric_work(store, examples, metrics) if examples else []  # the run's one planning call
    parts = shards(work, config.execution.shard_size)
    ex = config.execution
    summaries, loads = [], 0
    if parts:
        connect_ray(ex.ray_address)
        planned = sum(len(row["metrics"]) for row in work)
        get_run_logger().info("scoring %d (image, metric) pairs of %d images in %d shards", planned, len(work),
                              len(parts))
        with MetricPool(store, metrics, options=metric_options(config), pool=pool_options(config),
                        batch_size=ex.score_batch_size, identities=_identities(store, config)) as pool, \
                _bar(planned, "scores", "score") as bar:
            run_shard = _with_timeout(score_shard, ex.shard_timeout_s)
            summaries = [run_shard(pool, shard, i, bar) for i, shard in ahead(parts, pool.queue)]
            loads = pool.pool.stats.actors_started
    total = dict(_total(summaries), examples=len(examples), shards=len(parts), pairs_missing=sum(
        len(row["metrics"]) for row in work), metric_worker_loads=loads)
    create_table_artifact(key=artifact_key(config.name, "scoring"), table=[total],
                          description=f"scoring of run {config.name} ({', '.join(metrics)})")
    return total


__all__ = ["generate_flow", "metric_options", "pipeline_options", "score_flow", "shards", "sweep_examples"]

"""Prefect flows ``generate`` and ``score``: plan what is missing, run it on the Ray pools, one task per shard.

A shard is a list of examples (``execution.shard_size``, grouped by model so a shard
loads one model): the unit of retry and of progress in the Prefect UI. Each shard task
calls :func:`actors.pool.run_generation` / :func:`actors.pool.run_scoring`, which plan
again against the store before working, so a retried or re-run shard does only what is
missing and never writes a row twice.
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

from fastface.cache import identities_dir
from flows.config import EvaluationConfig
from flows.retries import retry_transient
from storage import Store, Sweep, plan_missing_examples, plan_missing_generations, plan_missing_metrics


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def cache_root(config: EvaluationConfig) -> Path:
    from fastface.cache import cache_root as root

    return root(config.execution.cache_dir)


# -- planning ------------------------------------------------------------------------------------
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
            for row in sweep.examples():
                rows.setdefault(row["example_id"], row)
    return list(rows.values())


def shards(examples: list[dict], size: int) -> list[list[dict]]:
    """Consecutive chunks of at most ``size`` examples, never mixing models (a shard loads one model)."""
    by_model: dict[str, list[dict]] = {}
    for row in examples:
        by_model.setdefault(row["model"], []).append(row)
    return [rows[i:i + size] for rows in by_model.values() for i in range(0, len(rows), size)]


def pipeline_options(config: EvaluationConfig) -> dict:
    ex = config.execution
    options = {"cache_dir": str(cache_root(config)), "identity_cache_dir": str(identities_dir(config.execution.cache_dir)),
               "face_backend": config.face_backend, "device": ex.device, "dtype": ex.dtype}
    return {k: v for k, v in options.items() if v is not None}


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


def _progress(artifact_id, total: int):
    done = {"n": 0}

    def on_batch(event: dict) -> None:
        done["n"] += len(event["rows"])
        update_progress_artifact(artifact_id=artifact_id, progress=min(100.0, 100.0 * done["n"] / max(total, 1)))

    return on_batch


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, task_run_name="generate-shard-{index}",
      retry_condition_fn=retry_transient)
def generate_shard(root: str, examples: list[dict], index: int, *, batch_size: int, num_workers: int | None,
                   cpus_per_worker: float, options: dict, ray_address: str | None) -> dict:
    """Generate one shard on the generator pool (only what is still missing when it starts)."""
    from actors.pool import connect_ray, run_generation

    connect_ray(ray_address)
    store = Store(root)
    todo = plan_missing_generations(store, examples)
    artifact = create_progress_artifact(progress=0.0, description=f"shard {index}: {len(todo)} images")
    summary = run_generation(store, todo, batch_size=batch_size, num_workers=num_workers, pipeline_options=options,
                             progress=False, cpus_per_worker=cpus_per_worker, plan=False,
                             on_batch=_progress(artifact, len(todo)))
    update_progress_artifact(artifact_id=artifact, progress=100.0)
    summary["skipped"] += len(examples) - len(todo)
    return summary


@task(cache_policy=NONE, retries=2, retry_delay_seconds=10, task_run_name="score-shard-{index}",
      retry_condition_fn=retry_transient)
def score_shard(root: str, examples: list[dict], index: int, *, metrics: list[str], batch_size: int,
                num_workers: int | None, cpus_per_worker: float, options: dict, ray_address: str | None) -> dict:
    """Score one shard on the metric pool (pairs not yet scored)."""
    from actors.pool import connect_ray, run_scoring

    connect_ray(ray_address)
    store = Store(root)
    artifact = create_progress_artifact(progress=0.0, description=f"scoring shard {index}: {len(examples)} images")
    summary = run_scoring(store, examples, metrics, batch_size=batch_size, num_workers=num_workers,
                          metric_options=options, progress=False, cpus_per_worker=cpus_per_worker,
                          on_batch=_progress(artifact, len(examples) * len(metrics)))
    update_progress_artifact(artifact_id=artifact, progress=100.0)
    return summary


def _total(summaries: list[dict]) -> dict:
    keys = ("planned", "skipped", "ok", "failed", "retried", "files")
    return {k: sum(int(s.get(k, 0)) for s in summaries) for k in keys}


@flow(name="generate", log_prints=True)
def generate_flow(config: EvaluationConfig, root: str) -> dict:
    """Plan the sweep, then generate the missing images shard by shard."""
    examples = plan_task(config, root)
    store = Store(root)
    todo = plan_missing_generations(store, examples)
    parts = shards(todo, config.execution.shard_size)
    ex = config.execution
    summaries = [
        generate_shard(root, shard, i, batch_size=ex.batch_size, num_workers=ex.num_workers,
                       cpus_per_worker=ex.cpus_per_worker, options=pipeline_options(config), ray_address=ex.ray_address)
        for i, shard in enumerate(parts)
    ]
    total = dict(_total(summaries), examples=len(examples), shards=len(parts))
    total["skipped"] += len(examples) - len(todo)
    create_table_artifact(key=artifact_key(config.name, "generation"), table=[total],
                          description=f"generation of run {config.name}")
    return total


@flow(name="score", log_prints=True)
def score_flow(config: EvaluationConfig, root: str) -> dict:
    """Score what is generated and not yet scored, shard by shard."""
    store = Store(root)
    examples = store.latest("examples", run_id=config.name).to_pylist() if config.name in store.run_ids("examples") else []
    metrics = list(config.metrics.names)
    missing = plan_missing_metrics(store, examples, metrics) if examples else []
    wanted = {eid for eid, _ in missing}
    todo = [e for e in examples if e["example_id"] in wanted]
    parts = shards(todo, config.execution.shard_size)
    ex = config.execution
    options = metric_options(config) if parts else {}
    summaries = [
        score_shard(root, shard, i, metrics=metrics, batch_size=ex.score_batch_size, num_workers=ex.num_workers,
                    cpus_per_worker=ex.cpus_per_worker, options=options, ray_address=ex.ray_address)
        for i, shard in enumerate(parts)
    ]
    total = dict(_total(summaries), examples=len(examples), shards=len(parts), pairs_missing=len(missing))
    create_table_artifact(key=artifact_key(config.name, "scoring"), table=[total],
                          description=f"scoring of run {config.name} ({', '.join(metrics)})")
    return total


__all__ = ["generate_flow", "metric_options", "pipeline_options", "score_flow", "shards", "sweep_examples"]

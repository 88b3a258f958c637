"""``fastface evaluate --plan``: what a run of a config would do, before it does anything.

Per model × preset × prompt set (the prompts' kind, so the groups add up to the run): the
sweep's examples, those not yet stored, the images still missing and the (image, metric)
scores still missing, with an estimate of GPU hours from the seconds per image that earlier
runs of the same model stored (``generations.seconds``, rehearsal rows excluded) or from
``--seconds-per-image``. Also the pipeline loads (one per generator actor per model) and
metric-worker loads the run would start.

It plans with the functions the run plans with (:func:`evaluation.sweep.sweep_examples_table`,
:func:`storage.plan.plan_missing_generations`, :func:`storage.plan.plan_missing_metrics_table`),
in DuckDB and Arrow, so a run started right after it does what it says. Nothing is written,
no Prefect or Ray starts. A store that does not exist yet plans everything as missing; a
dataset not built yet is planned from the config's photos and prompts as if every photo had
a face (``crop_faces: n``: n faces), which the run's face detection may lower.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from evaluation.config import EvaluationConfig

GROUP = ("model", "preset", "prompt_kind")


def _store_or_none(root: str):
    from storage import Store
    from storage.checks import StoreRootError, check_store_root

    try:
        check_store_root(root, for_reading=True)
    except StoreRootError:
        return None  # no store yet: everything is missing
    return Store(root)


def _counts(table: pa.Table, value: str | None = None) -> dict[tuple, int]:
    """Rows (or the sum of ``value``) per :data:`GROUP` of an Arrow table."""
    if table.num_rows == 0:
        return {}
    if value is None:
        grouped = table.group_by(list(GROUP)).aggregate([([], "count_all")])
        name = "count_all"
    else:
        grouped = table.group_by(list(GROUP)).aggregate([(value, "sum")])
        name = f"{value}_sum"
    keys = zip(*(grouped.column(k).to_pylist() for k in GROUP))
    return {key: int(n or 0) for key, n in zip(keys, grouped.column(name).to_pylist())}


def stored_seconds_per_image(store, models: list[str]) -> dict[str, tuple[float, int]]:
    """``model → (median seconds per image, images)`` over the store's ok, model-made generations (all runs)."""
    from actors.rehearsal import REHEARSAL_DEVICE
    from storage.duck import quote_literal
    from storage.layout import LAKE

    if store is None or not models:
        return {}
    found = store.query(
        f"SELECT e.model, median(g.seconds) AS seconds, count(*) AS n FROM {LAKE}.generations g "
        f"JOIN (SELECT DISTINCT run_id, example_id, model FROM {LAKE}.examples "
        f"WHERE model IN ({', '.join(quote_literal(m) for m in models)})) e "
        "ON e.run_id = g.run_id AND e.example_id = g.example_id "
        f"WHERE g.status = 'ok' AND g.seconds IS NOT NULL AND g.device IS DISTINCT FROM {quote_literal(REHEARSAL_DEVICE)} "
        "GROUP BY e.model").to_pylist()
    return {row["model"]: (float(row["seconds"]), int(row["n"])) for row in found}


def _batches(table: pa.Table, shard_size: int, batch_size: int) -> dict[str, int]:
    """Batches per model the pools would run: per shard, per batch key, ceil(examples / batch size)."""
    from actors.generator import BATCH_KEY
    from evaluation.sweep import TableShards

    out: dict[str, int] = {}
    if table.num_rows == 0:
        return out
    for part in TableShards(table, shard_size).parts:
        grouped = part.group_by(["run_id", *BATCH_KEY]).aggregate([([], "count_all")]).to_pylist()
        for row in grouped:
            out[row["model"]] = out.get(row["model"], 0) + math.ceil(row["count_all"] / batch_size)
    return out


def evaluation_plan(config: EvaluationConfig, root: str, *, seconds_per_image: float | None = None) -> dict[str, Any]:
    """The plan of a run of ``config`` into ``root`` (see the module docstring); JSON-ready."""
    from fastface.checkpoints import check_steps
    from evaluation.sweep import dataset_rows, plan_missing_examples_table, run_examples, sweep_examples_table
    from evaluation.rehearsal import identity_rows_of, rehearsal_dataset
    from storage import plan_missing_generations, plan_missing_metrics_table

    store = _store_or_none(root)
    metrics = list(config.metrics.names)
    identities, prompts = dataset_rows(store, config) if store is not None else ([], [])
    dataset_built = bool(identities)
    if not dataset_built:
        photos, gathered = rehearsal_dataset(config)  # model-free: what the dataset flow would import
        identities = identity_rows_of(photos, config.dataset.max_identities)
        prompts = prompts or gathered
    examples = sweep_examples_table(config, identities, prompts).drop_columns(["resolved_config"])
    if store is None:
        new, todo = examples, examples
        work = examples.slice(0, 0).append_column("metrics", pa.array([], pa.list_(pa.string())))
    else:
        new = plan_missing_examples_table(store, examples)
        todo = plan_missing_generations(store, examples, as_table=True)
        stored = run_examples(store, config.name)
        work = plan_missing_metrics_table(store, stored, metrics) if stored.num_rows else \
            stored.append_column("metrics", pa.array([], pa.list_(pa.string())))
    work = work.append_column("n_scores", pc.list_value_length(work.column("metrics")).cast(pa.int64()))
    planned, fresh, missing = _counts(examples), _counts(new), _counts(todo)
    scored_later, scores = _counts(todo), _counts(work, "n_scores")
    models = list(config.sweep.models)
    stored_seconds = stored_seconds_per_image(store, models)
    groups, totals = [], {"examples": 0, "new_examples": 0, "images_missing": 0, "scores_missing": 0,
                          "gpu_hours": 0.0}
    unknown_seconds = set()
    for key in sorted(set(planned) | set(scores), key=lambda k: (models.index(k[0]) if k[0] in models else 99, k)):
        model = key[0]
        images = missing.get(key, 0)
        seconds = seconds_per_image if seconds_per_image is not None else stored_seconds.get(model, (None, 0))[0]
        hours = None if seconds is None else images * seconds / 3600.0
        if hours is None and images:
            unknown_seconds.add(model)
        row = {"model": model, "preset": key[1], "prompts": key[2], "examples": planned.get(key, 0),
               "new_examples": fresh.get(key, 0), "images_missing": images,
               "scores_missing": scores.get(key, 0) + scored_later.get(key, 0) * len(metrics),
               "seconds_per_image": seconds, "gpu_hours": hours}
        groups.append(row)
        for name in ("examples", "new_examples", "images_missing", "scores_missing"):
            totals[name] += row[name]
        totals["gpu_hours"] += hours or 0.0
    workers = config.execution.num_workers
    gen_batches = _batches(todo, config.execution.shard_size, config.execution.batch_size)
    score_batches = sum(_batches(work.filter(pc.greater(work.column("n_scores"), 0)), config.execution.shard_size,
                                 config.execution.score_batch_size).values()) + sum(
        _batches(todo, config.execution.shard_size, config.execution.score_batch_size).values())
    loads = {}
    for model, n in gen_batches.items():
        steps = check_steps(model, config.presets()[0], config.steps_for(model))
        # one pipeline per actor: min(actors, batches); without num_workers the cluster sets the actors
        loads[f"{model}@{steps}"] = None if workers is None else min(workers, n)
    return {
        "run": config.name, "root": root, "store_exists": store is not None,
        "dataset": {"built": dataset_built, "identities": len(identities), "prompts": len(prompts)},
        "metrics": metrics, "groups": groups, "total": totals,
        "pipeline_loads": loads,  # None: one per actor (execution.num_workers not set; the cluster decides)
        "metric_worker_loads": 0 if not score_batches else None if workers is None else min(workers, score_batches),
        "seconds_per_image": {m: {"seconds": seconds_per_image, "source": "--seconds-per-image"}
                              if seconds_per_image is not None else
                              {"seconds": stored_seconds[m][0], "source": f"median of {stored_seconds[m][1]} stored images"}
                              if m in stored_seconds else {"seconds": None, "source": "no earlier run of this model"}
                              for m in models},
        "gpu_hours_unknown_for": sorted(unknown_seconds),
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as text: one line per group, then totals and loads."""
    from storage.catalog import format_table

    lines = [f"plan of run {plan['run']!r} into {plan['root']}"
             + ("" if plan["store_exists"] else " (no store there yet: everything is missing)")]
    data = plan["dataset"]
    lines.append(f"dataset: {data['identities']} identities, {data['prompts']} prompts"
                 + ("" if data["built"] else " (not built yet: planned as if every photo has a face)"))
    rows = [{**{k: v for k, v in g.items() if k not in ("seconds_per_image", "gpu_hours")},
             "s/image": "?" if g["seconds_per_image"] is None else f"{g['seconds_per_image']:.3g}",
             "GPU h": "?" if g["gpu_hours"] is None else f"{g['gpu_hours']:.2f}"} for g in plan["groups"]]
    if rows:
        lines.append(format_table(pa.Table.from_pylist(rows), max_rows=len(rows)))
    total = plan["total"]
    lines.append(f"total: {total['examples']} examples ({total['new_examples']} new), {total['images_missing']} images "
                 f"and {total['scores_missing']} scores ({', '.join(plan['metrics'])}) missing; "
                 f"≈ {total['gpu_hours']:.2f} GPU hours of generation"
                 + (f" (unknown for {', '.join(plan['gpu_hours_unknown_for'])}: no earlier run; "
                    "give --seconds-per-image)" if plan["gpu_hours_unknown_for"] else ""))
    def loads_text(n):
        return "one per actor" if n is None else str(n)

    loads = ", ".join(f"{k}: {loads_text(v)}" for k, v in plan["pipeline_loads"].items()) or "none"
    lines.append(f"pipeline loads: {loads}; metric-worker loads: {loads_text(plan['metric_worker_loads'])}")
    for model, source in plan["seconds_per_image"].items():
        if source["seconds"] is not None:
            lines.append(f"  {model}: {source['seconds']:.3g} s/image ({source['source']})")
    return "\n".join(lines)


__all__ = ["evaluation_plan", "format_plan", "stored_seconds_per_image"]

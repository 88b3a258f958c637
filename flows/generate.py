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

The plan stays in Arrow (the sweep's examples, the images and scores missing, computed in
DuckDB); a shard becomes Python rows only when it runs (:class:`TableShards`), so the driver
never holds the run's 1.45 M examples as rows. ``weights: rehearsal`` runs the same flows on
model-free workers (:func:`worker_classes`, :mod:`actors.rehearsal`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from fastface.extras import require  # noqa: E402

require('prefect', 'ray', 'pyarrow', 'duckdb', needed_for='the evaluation flows')

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NONE
from prefect.utilities.annotations import quote

import pyarrow as pa
import pyarrow.compute as pc

from actors.generator import GeneratorOptions
from actors.pool import GeneratorPools, MetricPool, PoolOptions, ahead, missing_metric_work
from fastface.cache import identities_dir
from flows.config import EvaluationConfig
from flows.retries import retry_transient
from storage import Store, Sweep, plan_missing_generations, plan_missing_metrics_table
from storage.schemas import schema as schema_of


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
    return sweep_examples_table(config, identities, prompts).to_pylist()


def sweep_examples_table(config: EvaluationConfig, identities: list[dict], prompts: list[dict]) -> pa.Table:
    """:func:`sweep_examples` as an Arrow table (``examples`` columns but ``created_at``), built one
    set × model at a time, so the paper's 1.45 M examples are never Python rows all at once."""
    chunks: list[pa.Table] = []
    seen: set[str] = set()
    for rows, resolved in _sweep_chunks(config, identities, prompts):
        fresh = [row for row in rows if row["example_id"] not in seen]
        seen.update(row["example_id"] for row in fresh)
        chunk = pa.Table.from_pylist(fresh, schema=_EXAMPLE_ROWS)
        # resolved_config is one JSON text per (model, preset): dictionary-encoded, not copied per row
        presets = list(resolved)
        indices = pc.index_in(chunk.column("preset"), value_set=pa.array(presets, pa.string())).cast(pa.int32())
        column = pa.DictionaryArray.from_arrays(indices.combine_chunks() if chunk.num_rows else
                                                pa.array([], pa.int32()), pa.array([resolved[p] for p in presets]))
        chunks.append(chunk.append_column(EXAMPLE_SCHEMA.field("resolved_config"), column)
                      .select(EXAMPLE_SCHEMA.names).cast(EXAMPLE_SCHEMA))
    return pa.concat_tables(chunks) if chunks else EXAMPLE_SCHEMA.empty_table()


def _sweep_chunks(config: EvaluationConfig, identities: list[dict], prompts: list[dict]):
    """The examples of each set × model of the design, one list per pair, in the design's order."""
    from fastface.checkpoints import check_steps, get_checkpoint
    from fastface.presets import get_preset

    if not identities:
        raise ValueError(f"no identities in dataset run {config.dataset_run!r}; run the dataset flow first "
                         "(or check that the photos have faces)")
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
            yield sweep.examples(), resolved


EXAMPLE_SCHEMA = pa.schema([f.with_type(pa.dictionary(pa.int32(), pa.string())) if f.name == "resolved_config" else f
                            for f in schema_of("examples") if f.name != "created_at"])
"""The sweep's examples in Arrow: the ``examples`` columns but ``created_at``, resolved_config dictionary-encoded."""
_EXAMPLE_ROWS = pa.schema([f for f in EXAMPLE_SCHEMA if f.name != "resolved_config"])
APPEND_ROWS = 200_000  # examples per append of the plan: each is atomic, and re-planning skips what is stored


class TableShards(Sequence):
    """Shards of an Arrow table: consecutive slices of at most ``size`` rows per model, turned into
    rows only when a shard is taken (so the driver holds one shard's rows, not the run's)."""

    def __init__(self, table: pa.Table, size: int) -> None:
        models = table.column("model")
        self._parts: list[pa.Table] = []
        for model in pc.unique(models).to_pylist():  # in order of first appearance
            rows = table.filter(pc.equal(models, model))
            self._parts += [rows.slice(i, size) for i in range(0, rows.num_rows, size)]

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, index):  # noqa: ANN001 - int or slice, as Sequence has it
        if isinstance(index, slice):
            return [self._parts[i].to_pylist() for i in range(*index.indices(len(self)))]
        return self._parts[index].to_pylist()


def shards(examples: "list[dict] | pa.Table", size: int) -> "list[list[dict]] | TableShards":
    """Consecutive chunks of at most ``size`` examples, never mixing models (a shard loads one model).

    An Arrow table gives a :class:`TableShards`: each shard becomes rows only when taken.
    """
    if isinstance(examples, pa.Table):
        return TableShards(examples, size)
    by_model: dict[str, list[dict]] = {}
    for row in examples:
        by_model.setdefault(row["model"], []).append(row)
    return [rows[i:i + size] for rows in by_model.values() for i in range(0, len(rows), size)]


def pipeline_options(config: EvaluationConfig) -> GeneratorOptions:
    ex = config.execution
    if config.weights == "rehearsal":  # actors.rehearsal.RehearsalGenerator: no model, no cache
        return GeneratorOptions(face_backend=config.face_backend,
                                pipeline_overrides={"rehearsal_batch_seconds": ex.rehearsal_batch_seconds})
    return GeneratorOptions(cache_dir=str(cache_root(config)), identity_cache_dir=str(identities_dir(ex.cache_dir)),
                            face_backend=config.face_backend, device=ex.device, dtype=ex.dtype)


def worker_classes(config: EvaluationConfig) -> dict[str, type]:
    """The pools' worker classes: ``{"generator": …, "scorer": …}`` (model-free ones for ``weights: rehearsal``)."""
    if config.weights == "rehearsal":
        from actors.rehearsal import RehearsalGenerator, RehearsalScorer

        return {"generator": RehearsalGenerator, "scorer": RehearsalScorer}
    from actors.generator import GeneratorWorker
    from actors.scorer import MetricWorker

    return {"generator": GeneratorWorker, "scorer": MetricWorker}


def metric_options(config: EvaluationConfig) -> dict:
    """Options for the metric workers; with ``weights: tiny`` a tiny CLIP and aesthetic head are built on the fly."""
    m = config.metrics
    options: dict[str, Any] = {"face_backend": config.face_backend}
    if "fsc" in m.names:
        options["fsc_mode"] = m.fsc_mode
    if "face_size" in m.names:
        options["face_size_mode"] = m.face_size_mode
    if config.weights == "rehearsal":  # actors.rehearsal.RehearsalScorer: no model to build
        return dict(options, rehearsal_batch_seconds=config.execution.rehearsal_batch_seconds)
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


def dataset_rows(store: Store, config: EvaluationConfig) -> tuple[list[dict], list[dict]]:
    """The dataset run's identities (id and content hash only) and prompts: the sweep's inputs, bounded
    by the dataset (54 identities, 120 prompts in the paper), never by the sweep."""
    if config.dataset_run not in store.run_ids("identities"):
        identities = []
    else:
        identities = store.latest("identities", run_id=config.dataset_run).select(
            ["identity_id", "content_hash"]).to_pylist()
    prompts = store.latest("prompts", run_id=config.dataset_run).to_pylist() \
        if config.dataset_run in store.run_ids("prompts") else []
    return identities, prompts


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


def plan_missing_examples_table(store: Store, examples: pa.Table) -> pa.Table:
    """The rows of ``examples`` not yet in the ``examples`` table (an anti-join; Arrow in, Arrow out)."""
    from storage.plan import _plan_keys
    from storage.store import LAKE

    _, keys = _plan_keys(examples)
    if keys.num_rows == 0:
        return examples
    positions = store.query(
        "SELECT p.pos FROM plan_keys p ANTI JOIN "
        f"(SELECT example_id FROM {LAKE}.examples WHERE run_id = ?) e ON e.example_id = p.example_id "
        "ORDER BY p.pos", [config_run(keys)], plan_keys=keys).column(0)
    return examples.take(positions)


def config_run(keys: pa.Table) -> str:
    runs = pc.unique(keys.column("run_id")).to_pylist()
    if len(runs) != 1:
        raise ValueError(f"examples of one run expected, got runs {sorted(runs)}")
    return runs[0]


SCORING_COLUMNS = ("example_id", "run_id", "identity_id", "identity_hash", "prompt", "prompt_kind", "model", "preset",
                   "ip_adapter_scale", "lora_scale", "seed", "steps", "width", "height")
"""What a metric worker needs of an example (its settings group batches; no resolved_config)."""


def run_examples(store: Store, run_id: str, columns: Sequence[str] = SCORING_COLUMNS) -> pa.Table:
    """The run's stored examples (one row per example, in insertion order), only ``columns``: Arrow."""
    from storage.store import LAKE

    names = ", ".join(columns)
    return store.query(
        f"SELECT {names} FROM (SELECT {names}, created_at, rowid AS __rowid FROM {LAKE}.examples WHERE run_id = ?) "
        "QUALIFY row_number() OVER (PARTITION BY example_id ORDER BY created_at DESC, __rowid DESC) = 1 "
        "ORDER BY __rowid", [run_id])


def scoring_work(store: Store, config: EvaluationConfig) -> tuple[int, pa.Table]:
    """``(examples of the run, Arrow work)``: the run's examples with the metrics each still lacks
    (``metrics`` column), planned in DuckDB; rows are made per shard."""
    examples = run_examples(store, config.name)
    if examples.num_rows == 0:
        return 0, examples.append_column("metrics", pa.array([], pa.list_(pa.string())))
    return examples.num_rows, plan_missing_metrics_table(store, examples, list(config.metrics.names))


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
    # The run's one planning call; shards trust it. Workers need no resolved_config (it is stored with the examples).
    todo = plan_missing_generations(store, examples.drop_columns(["resolved_config"]), as_table=True)
    parts = shards(todo, config.execution.shard_size)
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
            run_shard = _with_timeout(generate_shard, ex.shard_timeout_s)
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
    parts = shards(work, config.execution.shard_size)
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
            run_shard = _with_timeout(score_shard, ex.shard_timeout_s)
            summaries = [run_shard(pool, quote(shard), i, bar) for i, shard in ahead(parts, pool.queue)]
            loads = pool.pool.stats.actors_started
    total = dict(_total(summaries), examples=examples, shards=len(parts), pairs_missing=planned,
                 metric_worker_loads=loads)
    create_table_artifact(key=artifact_key(config.name, "scoring"), table=[total],
                          description=f"scoring of run {config.name} ({', '.join(metrics)})")
    return total


__all__ = ["generate_flow", "metric_options", "pipeline_options", "score_flow", "scoring_work", "shards",
           "sweep_examples", "sweep_examples_table", "worker_classes"]

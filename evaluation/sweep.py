"""Planning a run: the sweep's examples as Arrow, what is missing from the store, the shards, and the
options the run's pools and workers get from the config. Pure (no Prefect); the ``generate`` and
``score`` flows (flows/generate.py) call it, and so does ``fastface evaluate --plan``
(:mod:`evaluation.plan`), so the plan printed is the plan run.

The plan stays in Arrow (the sweep's examples, the images and scores missing, computed in
DuckDB); a shard becomes Python rows only when it runs (:class:`TableShards`), so the driver
never holds the run's 1.45 M examples as rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from actors.generator import GeneratorOptions
from actors.dataset import DatasetPools, RenderSpec
from actors.pool import PoolOptions
from evaluation.config import EvaluationConfig
from fastface.cache import cache_root, identities_dir, tiny_metrics_dir
from fastface.prompt_sets import set_kinds
from storage import Store, Sweep, plan_missing_metrics_table
from storage.schemas import schema as schema_of


def resolved_preset_config(preset: str, checkpoint) -> str:
    """JSON of the DCG (α, β, φ, variant) and AM (scales, schedules) ``preset`` runs with on ``checkpoint``:
    what ``examples.resolved_config`` stores, so every image can be traced to its constants."""
    from fastface.presets import get_preset

    dcg, am = get_preset(preset).resolve(checkpoint.default_guidance)
    return json.dumps({"preset": preset, "model_default_guidance": checkpoint.default_guidance,
                       "dcg": dcg.to_dict(), "am": None if am is None else am.to_dict()}, sort_keys=True)


def sweep_examples_table(config: EvaluationConfig, identities: list[dict], prompts: list[dict]) -> pa.Table:
    """The examples of the config's design, per set its presets (and the baseline) on its prompts,
    deduplicated, as an Arrow table (``examples`` columns but ``created_at``), built one
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
        kinds = set_kinds(set_.prompts)
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
    """Shards of an Arrow table: consecutive slices of at most ``size`` rows, never mixing models (a
    shard loads one model), turned into rows only when a shard is taken (so the driver holds one
    shard's rows, not the run's). ``parts`` are the shards as Arrow slices."""

    def __init__(self, table: pa.Table, size: int) -> None:
        models = table.column("model")
        self.parts: list[pa.Table] = []
        for model in pc.unique(models).to_pylist():  # in order of first appearance
            rows = table.filter(pc.equal(models, model))
            self.parts += [rows.slice(i, size) for i in range(0, rows.num_rows, size)]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, index):  # noqa: ANN001 - int or slice, as Sequence has it
        if isinstance(index, slice):
            return [self.parts[i].to_pylist() for i in range(*index.indices(len(self)))]
        return self.parts[index].to_pylist()


def pipeline_options(config: EvaluationConfig) -> GeneratorOptions:
    ex = config.execution
    if config.weights == "rehearsal":  # actors.rehearsal.RehearsalGenerator: no model, no cache
        return GeneratorOptions(face_backend=config.face_backend,
                                pipeline_overrides={"rehearsal_batch_seconds": ex.rehearsal_batch_seconds})
    return GeneratorOptions(cache_dir=str(cache_root(ex.cache_dir)), identity_cache_dir=str(identities_dir(ex.cache_dir)),
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
        folder = tiny_metrics_dir(config.execution.cache_dir) / "clip"
        if not (folder / "open_clip_config.json").is_file():
            from fastface.metrics.clip_models import save_tiny_clip

            save_tiny_clip(folder, seed=0)
        options.update(clip_model=str(folder), clip_pretrained=None)
    elif m.clip_model is not None:
        options.update(clip_model=m.clip_model, clip_pretrained=m.clip_pretrained)
    if "ae" in m.names and (m.aesthetic_checkpoint == "tiny" or (tiny and m.aesthetic_checkpoint is None)):
        path = tiny_metrics_dir(config.execution.cache_dir) / "aesthetic-linearMSE.pth"
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


def plan_missing_examples_table(store: Store, examples: pa.Table) -> pa.Table:
    """The rows of ``examples`` not yet in the ``examples`` table (an anti-join; Arrow in, Arrow out)."""
    from storage.plan import _plan_keys
    from storage.layout import LAKE

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
    from storage.layout import LAKE

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


def dataset_pools(config: EvaluationConfig, store: Store) -> DatasetPools:
    """The dataset flow's face pool and, when the config synthesises identities, its renderer pool."""
    ex, syn = config.execution, config.dataset.synthesise
    render = None
    if syn is not None and config.weights != "rehearsal":
        from fastface.checkpoints import get_checkpoint

        checkpoint = get_checkpoint(syn.model)
        render = RenderSpec(model=syn.model, steps=checkpoint.resolve_steps(syn.steps),
                            size=syn.size or checkpoint.size, batch_size=ex.batch_size,
                            worker_kwargs=pipeline_options(config).worker_kwargs())
    # The renderer pool is shaped as the run's generator pools (real weights ask the cluster for GPUs).
    return DatasetPools(store, face_backend=config.face_backend, ray_address=ex.ray_address, render=render,
                        options=pool_options(config))


def pool_options(config: EvaluationConfig) -> PoolOptions:
    """Pools sized from the config: real weights ask for GPUs (one per actor unless
    ``execution.gpus_per_worker`` says otherwise) and fail when none comes, unless ``device: cpu``."""
    ex = config.execution
    on_gpus = config.weights == "real" and (ex.device or "cuda").split(":")[0] != "cpu"
    return PoolOptions(num_workers=ex.num_workers, cpus_per_worker=ex.cpus_per_worker,
                       gpus_per_worker=ex.gpus_per_worker or (1.0 if on_gpus else None),
                       require_gpus=on_gpus, gpu_wait_s=ex.gpu_wait_s, stuck_factor=ex.stuck_factor,
                       stuck_floor_s=ex.stuck_floor_s, stuck_first_s=ex.stuck_first_s)


__all__ = [
    "APPEND_ROWS", "EXAMPLE_SCHEMA", "SCORING_COLUMNS", "TableShards", "config_run", "dataset_pools",
    "dataset_rows", "metric_options", "pipeline_options", "plan_missing_examples_table", "pool_options",
    "resolved_preset_config", "run_examples", "scoring_work", "sweep_examples_table",
    "worker_classes",
]

"""Sweep planning and resume: the examples of a sweep, and which of them still need work.

A :class:`Sweep` expands to ``examples`` rows, each with a stable ``example_id``
(:func:`storage.ids.example_id`). The ``plan_missing_*`` functions compare those rows
with what the store already holds, so re-running a flow after a crash does only what
is missing, and re-planning a finished sweep yields no work. They run as anti-joins in
DuckDB over the DuckLake tables: only the given examples' keys go in, only the missing
positions come out, so a shard (a subset of the sweep) is planned at the cost of the shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from storage.duck import quote_literal as _lit
from storage.ids import config_hash, derive_seed, example_id_maker
from storage.layout import LAKE
from storage.store import Store, check_name


def _rows(items: "Sequence[Mapping] | pa.Table") -> list[dict]:
    return items.to_pylist() if isinstance(items, pa.Table) else [dict(r) for r in items]


def _nonempty(name: str, values: Sequence) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"Sweep.{name} is empty; give at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"Sweep.{name} has duplicates: {list(values)}")
    return values


@dataclass(frozen=True)
class Sweep:
    """identities × prompts × models × presets × lora_scales × ip_adapter_scales × run_seeds.

    - ``identities``: rows with ``identity_id`` and ``content_hash`` (the identities table);
    - ``prompts``: rows with ``prompt_id``, ``text`` and optionally ``kind``;
    - ``presets``: preset name → its full config dict (hashed into every example id);
    - ``run_seeds``: each gives one replicate; an example's seed is
      ``derive_seed(run_seed, identity_id, prompt_id)``, the same for every model, preset
      and scale, so comparisons are paired (method-spec §5);
    - ``steps``: one count, or a dict model → count (``base`` uses 30, distilled models 4);
    - ``code_version``: the method/code version string hashed into every example id.
    """

    run_id: str
    identities: Sequence[Mapping[str, Any]]
    prompts: Sequence[Mapping[str, Any]]
    models: Sequence[str]
    presets: Mapping[str, Mapping[str, Any]]
    ip_adapter_scales: Sequence[float]
    code_version: str
    lora_scales: Sequence[float] = (1.0,)
    run_seeds: Sequence[int] = (0,)
    steps: "int | Mapping[str, int]" = 4
    width: int = 1024
    height: int = 1024

    def __post_init__(self) -> None:
        check_name("run_id", self.run_id)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        identities = _rows(self.identities)
        prompts = _rows(self.prompts)
        for i, row in enumerate(identities):
            for key in ("identity_id", "content_hash"):
                if not row.get(key):
                    raise ValueError(f"Sweep.identities[{i}] has no {key!r}; pass rows of the identities table")
        for i, row in enumerate(prompts):
            for key in ("prompt_id", "text"):
                if not row.get(key):
                    raise ValueError(f"Sweep.prompts[{i}] has no {key!r}; pass rows of the prompts table")
        _nonempty("identities (identity_id)", [r["identity_id"] for r in identities])
        _nonempty("prompts (prompt_id)", [r["prompt_id"] for r in prompts])
        set_("identities", tuple(identities))
        set_("prompts", tuple(prompts))
        set_("models", _nonempty("models", self.models))
        if not self.presets:
            raise ValueError("Sweep.presets is empty; map each preset name to its config dict")
        for name, cfg in self.presets.items():
            if not isinstance(cfg, Mapping):
                raise ValueError(f"Sweep.presets[{name!r}] must be the preset's config dict, got {type(cfg).__name__}")
        set_("presets", {k: dict(v) for k, v in self.presets.items()})
        set_("ip_adapter_scales", _nonempty("ip_adapter_scales", [float(x) for x in self.ip_adapter_scales]))
        set_("lora_scales", _nonempty("lora_scales", [float(x) for x in self.lora_scales]))
        set_("run_seeds", _nonempty("run_seeds", [int(x) for x in self.run_seeds]))
        if isinstance(self.steps, Mapping):
            missing = [m for m in self.models if m not in self.steps]
            if missing:
                raise ValueError(f"Sweep.steps has no step count for model(s) {missing}")
        if not self.code_version:
            raise ValueError("Sweep.code_version is empty; pass the method/code version string")

    def steps_for(self, model: str) -> int:
        return int(self.steps[model] if isinstance(self.steps, Mapping) else self.steps)

    def examples(self) -> list[dict]:
        """The ``examples`` rows (without ``created_at``), grouped by model so weights load once."""
        rows, seen, seeds = [], {}, {}
        for model in self.models:
            steps = self.steps_for(model)
            for lora_scale in self.lora_scales:
                for preset, preset_config in self.presets.items():
                    for ip_scale in self.ip_adapter_scales:
                        settings = {
                            "model": model,
                            "preset": preset,
                            "preset_config": preset_config,
                            "ip_adapter_scale": ip_scale,
                            "lora_scale": lora_scale,
                            "steps": steps,
                            "width": self.width,
                            "height": self.height,
                            "code_version": self.code_version,
                        }
                        chash = config_hash(settings)
                        make_id = example_id_maker(**settings)
                        for run_seed in self.run_seeds:
                            for ident in self.identities:
                                for prompt in self.prompts:
                                    key = (run_seed, ident["identity_id"], prompt["prompt_id"])
                                    seed = seeds.get(key)
                                    if seed is None:
                                        seed = seeds[key] = derive_seed(*key)
                                    eid = make_id(ident["content_hash"], prompt["text"], seed)
                                    if eid in seen:
                                        raise ValueError(
                                            f"Sweep makes example {eid} twice ({seen[eid]} and "
                                            f"{(ident['identity_id'], prompt['prompt_id'])}): two identities share an "
                                            "image or two prompts share a text; remove the duplicate"
                                        )
                                    seen[eid] = (ident["identity_id"], prompt["prompt_id"])
                                    rows.append(
                                        {
                                            "example_id": eid,
                                            "run_id": self.run_id,
                                            "identity_id": ident["identity_id"],
                                            "identity_hash": ident["content_hash"],
                                            "prompt_id": prompt["prompt_id"],
                                            "prompt": prompt["text"],
                                            "prompt_kind": prompt.get("kind"),
                                            "model": model,
                                            "preset": preset,
                                            "ip_adapter_scale": ip_scale,
                                            "lora_scale": lora_scale,
                                            "seed": seed,
                                            "steps": steps,
                                            "width": self.width,
                                            "height": self.height,
                                            "config_hash": chash,
                                            "code_version": self.code_version,
                                        }
                                    )
        return rows


def _plan_keys(examples: "Sequence[Mapping] | pa.Table") -> tuple["list[dict] | pa.Table", pa.Table]:
    """The examples as given, and an Arrow table ``(run_id, example_id, pos)`` for DuckDB to join."""
    if isinstance(examples, pa.Table):
        missing = [c for c in ("run_id", "example_id") if c not in examples.column_names]
        if missing:
            raise ValueError(f"examples need columns 'example_id' and 'run_id' (rows from Sweep.examples()); "
                             f"missing {missing}")
        run_ids, example_ids = examples.column("run_id"), examples.column("example_id")
        rows: "list[dict] | pa.Table" = examples
    else:
        rows = examples if isinstance(examples, list) else list(examples)
        try:
            run_ids = pa.array([r.get("run_id") for r in rows], pa.string())
            example_ids = pa.array([r.get("example_id") for r in rows], pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"examples' 'example_id' and 'run_id' must be strings: {exc}") from None
    for name, column in (("example_id", example_ids), ("run_id", run_ids)):
        bad = pc.or_(pc.is_null(column), pc.equal(pc.fill_null(column, ""), ""))
        if pc.any(bad).as_py():
            first = pc.index(bad, True).as_py()
            raise ValueError(f"examples[{first}] needs 'example_id' and 'run_id' (rows from Sweep.examples())")
    keys = pa.table({"run_id": run_ids, "example_id": example_ids,
                     "pos": pa.array(range(len(example_ids)), pa.int64())})
    return rows, keys


def _pick(rows: "list[dict] | pa.Table", positions: pa.Array, as_table: bool = False) -> "list[dict] | pa.Table":
    if isinstance(rows, pa.Table):
        return rows.take(positions) if as_table else rows.take(positions).to_pylist()
    picked = [rows[i] for i in positions.to_pylist()]
    return pa.Table.from_pylist(picked) if as_table else picked


def _runs_in(keys: pa.Table) -> str:
    """A SQL ``IN (...)`` list of the runs, a constant DuckLake can prune partitions with."""
    runs = pc.unique(keys.column("run_id")).to_pylist()
    return "(" + ", ".join(_lit(r) for r in runs) + ")" if runs else "(NULL)"


SEMI_JOIN_MAX_KEYS = 200_000
"""Up to this many planned examples, the tables are first filtered to them (a shard's cost is the
shard's); above it (a whole sweep) scanning the run's rows directly is cheaper."""


def _only_planned(keys: pa.Table, source: str = "plan_keys") -> str:
    return f" AND example_id IN (SELECT example_id FROM {source})" if keys.num_rows <= SEMI_JOIN_MAX_KEYS else ""


def _latest_generations(keys: pa.Table) -> str:
    """Latest status per (run, example) of the planned runs; ties broken by insertion, as the views do."""
    return (
        "SELECT run_id, example_id, arg_max(status, (created_at, rowid)) AS status "
        f"FROM {LAKE}.generations WHERE run_id IN {_runs_in(keys)}{_only_planned(keys)} "
        "GROUP BY run_id, example_id"
    )


def plan_missing_examples(store: Store, examples: "Sequence[Mapping] | pa.Table") -> list[dict]:
    """Example rows not yet in the ``examples`` table (so re-planning appends nothing twice).

    One anti-join in DuckDB; only the given examples' keys are sent to it, so planning a
    shard costs what the shard does, not the sweep.
    """
    rows, keys = _plan_keys(examples)
    if keys.num_rows == 0:
        return []
    positions = store.query(
        "SELECT p.pos FROM plan_keys p ANTI JOIN "
        f"(SELECT run_id, example_id FROM {LAKE}.examples WHERE run_id IN {_runs_in(keys)}) e "
        "ON e.run_id = p.run_id AND e.example_id = p.example_id ORDER BY p.pos",
        plan_keys=keys,
    ).column(0)
    return _pick(rows, positions)


def plan_missing_generations(
    store: Store, examples: "Sequence[Mapping] | pa.Table", *, check_images: bool = False, as_table: bool = False
) -> "list[dict] | pa.Table":
    """Examples whose latest ``generations`` row (per run and example) is not ``status == "ok"``.

    ``as_table``: the missing examples as an Arrow table (the given table's rows, or the rows
    made into one), so a whole sweep's plan never becomes Python rows.

    A failed attempt is planned again. With ``check_images`` an ok row also needs its image
    under ``images/<run>/`` (one listing per run), for stores whose images may be pruned.
    Computed in DuckDB (latest row per key, then an anti-join against the given examples).
    """
    rows, keys = _plan_keys(examples)
    if keys.num_rows == 0:
        return _pick(rows, pa.array([], pa.int64()), as_table) if as_table else []
    tables = {"plan_keys": keys}
    image_test = ""
    if check_images:
        runs = pc.unique(keys.column("run_id")).to_pylist()
        images = [(run, eid) for run in runs for eid in store.image_ids(run)]
        tables["plan_images"] = pa.table({"run_id": pa.array([r for r, _ in images], pa.string()),
                                          "example_id": pa.array([e for _, e in images], pa.string())})
        image_test = (" OR NOT EXISTS (SELECT 1 FROM plan_images i "
                      "WHERE i.run_id = p.run_id AND i.example_id = p.example_id)")
    positions = store.query(
        f"WITH g AS ({_latest_generations(keys)}) "
        "SELECT p.pos FROM plan_keys p LEFT JOIN g ON g.run_id = p.run_id AND g.example_id = p.example_id "
        f"WHERE g.status IS DISTINCT FROM 'ok'{image_test} ORDER BY p.pos",
        **tables,
    ).column(0)
    return _pick(rows, positions, as_table)


def plan_missing_metrics(
    store: Store,
    examples: "Sequence[Mapping] | pa.Table",
    metrics: Sequence[str],
    *,
    require_generation: bool = True,
) -> list[tuple[str, str]]:
    """``(example_id, metric)`` pairs of one run not yet scored, in example then metric order.

    Scored means the latest ``metrics`` row for (run, example, metric) has no ``error``
    (a null value with no error — e.g. no face found — counts as scored). With
    ``require_generation`` only examples whose generation is ok are planned: there is
    nothing to score before the image exists. Computed in DuckDB as for generations.
    """
    found, keys = _missing_metric_pairs(store, examples, metrics, require_generation)
    if found is None:
        return []
    metrics = list(dict.fromkeys(metrics))
    return list(zip(pc.take(keys.column("example_id"), found.column("pos")).to_pylist(),
                    [metrics[i] for i in found.column("i").to_pylist()]))


def plan_missing_metrics_table(store: Store, examples: pa.Table, metrics: Sequence[str], *,
                               require_generation: bool = True) -> pa.Table:
    """The examples with a metric still to score, each with ``metrics`` (list, in the given order): the
    scoring work of :func:`plan_missing_metrics` as an Arrow table, so a run's plan stays out of Python."""
    found, _ = _missing_metric_pairs(store, examples, metrics, require_generation)
    if found is None or found.num_rows == 0:
        return examples.slice(0, 0).append_column("metrics", pa.array([], pa.list_(pa.string())))
    metrics = list(dict.fromkeys(metrics))
    names = pa.array(metrics, pa.string())
    # found is ordered by (pos, i): one list of metric names per example, in example order
    grouped = store.query("SELECT pos, list(i ORDER BY i) AS i FROM found GROUP BY pos ORDER BY pos", found=found)
    lists = grouped.column("i").combine_chunks()
    wanted = pa.ListArray.from_arrays(lists.offsets, pc.take(names, lists.flatten()))
    return examples.take(grouped.column("pos")).append_column("metrics", wanted)


def _missing_metric_pairs(store: Store, examples: "Sequence[Mapping] | pa.Table", metrics: Sequence[str],
                          require_generation: bool) -> tuple[pa.Table | None, pa.Table]:
    """``(pos, i)`` of the missing (example, metric) pairs, in order (None when nothing can be missing),
    and the examples' keys."""
    rows, keys = _plan_keys(examples)
    runs = pc.unique(keys.column("run_id")).to_pylist()
    if len(runs) > 1:
        raise ValueError(f"plan_missing_metrics takes examples of one run, got runs {sorted(runs)}; call it per run")
    metrics = list(dict.fromkeys(metrics))
    if keys.num_rows == 0 or not metrics:
        return None, keys
    if len(metrics) > 62:
        raise ValueError(f"plan_missing_metrics plans at most 62 metrics at once, got {len(metrics)}")
    wanted = pa.table({"metric": pa.array(metrics, pa.string()), "i": pa.array(range(len(metrics)), pa.int64())})
    planned = "plan_keys"
    if require_generation:
        planned = (f"(SELECT p.* FROM plan_keys p JOIN ({_latest_generations(keys)}) g "
                   "ON g.run_id = p.run_id AND g.example_id = p.example_id WHERE g.status = 'ok')")
    # Scored metrics per example as a bit mask (one row per example, not per pair), so only the
    # examples with something missing are expanded into (example, metric) pairs. Almost every
    # (example, metric) has one row, so one aggregation per example collects the metrics with an
    # error-free row (good) and with an errored row (bad): good and not bad is scored, bad and not
    # good is not. Only a metric with both (an error retried, or a score redone) needs its latest
    # row, and only those examples are aggregated per (example, metric).
    runs_in, only = _runs_in(keys), _only_planned(keys, "p")
    bit = "CAST(1 AS BIGINT) << w.i"
    return store.query(
        f"WITH p AS (SELECT * FROM {planned}), "
        f"a AS (SELECT m.example_id, coalesce(bit_or({bit}) FILTER (WHERE m.error IS NULL), 0) AS good, "
        f"coalesce(bit_or({bit}) FILTER (WHERE m.error IS NOT NULL), 0) AS bad "
        f"FROM {LAKE}.metrics m JOIN plan_metrics w ON w.metric = m.metric "
        f"WHERE m.run_id IN {runs_in}{only} GROUP BY m.example_id), "
        "redone AS (SELECT example_id FROM a WHERE good & bad <> 0), "
        f"latest AS (SELECT m.example_id, bit_or({bit}) AS mask FROM (SELECT example_id, metric, "
        "arg_max(error IS NULL, (created_at, rowid)) AS scored "
        f"FROM {LAKE}.metrics WHERE run_id IN {runs_in} AND example_id IN (SELECT example_id FROM redone) "
        "GROUP BY example_id, metric) m JOIN plan_metrics w ON w.metric = m.metric WHERE m.scored "
        "GROUP BY m.example_id), "
        "s AS (SELECT a.example_id, (a.good & ~a.bad) | coalesce(latest.mask, 0) AS mask "
        "FROM a LEFT JOIN latest ON latest.example_id = a.example_id), "
        "miss AS (SELECT p.pos, p.example_id, coalesce(s.mask, 0) AS mask FROM p LEFT JOIN s "
        f"ON s.example_id = p.example_id WHERE coalesce(s.mask, 0) <> {(1 << len(metrics)) - 1}) "
        "SELECT miss.pos, w.i FROM miss CROSS JOIN plan_metrics w "
        "WHERE (miss.mask >> w.i) & 1 = 0 ORDER BY miss.pos, w.i",
        plan_keys=keys, plan_metrics=wanted,
    ), keys

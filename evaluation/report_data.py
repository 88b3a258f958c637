"""What the report shows, read from the store with DuckDB: a few hundred aggregated rows, never the run's rows.

:class:`StoreData` answers the questions of :mod:`evaluation.report` (and :func:`evaluation.paper.paper_comparison`)
with SQL over the catalog's deduplicated views. It first copies the run's metric rows into two
DuckDB temp tables with integer codes (``rpt_ex``: one row per example with its config, prompt kind,
identity, prompt and seed codes; ``rpt_m``: ``(ex, metric, value)``), so each later query is a
``GROUP BY`` over ints inside DuckDB; Python only receives

- the per config × prompt kind × metric sums, counts and missing counts (:meth:`StoreData.aggregate`);
- per configuration, the (identity, prompt) cell sums and counts that the two-way bootstrap needs
  (:meth:`StoreData.config_intervals`), and the same cells of the paired differences preset −
  baseline on the same identity, prompt and seed (:meth:`StoreData.paired_differences`), as numpy
  arrays, one metric at a time;
- for Fig. 18 the ID and face-size values at the table's λ as numpy arrays.

The numbers are those of the pure-Python reference in :mod:`evaluation.analysis` on the same rows (same
identity and prompt order, same bootstrap draws for the same seed; sums differ only by float64
rounding: tests/test_report_sql.py checks ≤ 1e-12). :class:`RowsData` gives the same interface over
rows in memory (the reference, for tests and small inputs).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from evaluation import analysis
from fastface.prompt_sets import PROMPT_KINDS

CONFIG_KEYS = analysis.CONFIG_KEYS
KIND_CODES = {kind: code for code, kind in enumerate(PROMPT_KINDS)}
OTHER_KIND = len(KIND_CODES)  # the code of any other prompt kind (in no prompt set)
KIND_CASE = ("CASE e.prompt_kind " + " ".join(f"WHEN '{k}' THEN {c}" for k, c in KIND_CODES.items())
             + f" ELSE {OTHER_KIND} END")


def _config_sort(config: Sequence) -> tuple:
    return tuple(str(v) for v in config)


def _model_key(model: str) -> str:
    return model.removeprefix("tiny-")


@functools.lru_cache(maxsize=64)
def bootstrap_weights(seed: int, samples: int, n_i: int, n_p: int) -> tuple[np.ndarray, np.ndarray]:
    """The draws of :func:`evaluation.analysis.bootstrap_mean_ci` for an ``n_i`` × ``n_p`` cell matrix: how often each
    identity (``[samples, n_i]``) and each prompt (``[samples, n_p]``) is drawn, from a fresh
    ``default_rng(seed)`` as the reference draws them. They depend on nothing else, so the report's
    thousands of intervals (same seed, same 54 × 80 shape) share one draw: drawing them took 12 ms of
    the 14 ms of each interval on the paper-size rehearsal. Read-only arrays."""
    rng = np.random.default_rng(seed)
    wi = rng.multinomial(n_i, np.full(n_i, 1.0 / n_i), size=samples).astype(float)  # [B, I]
    wp = rng.multinomial(n_p, np.full(n_p, 1.0 / n_p), size=samples).astype(float)  # [B, P]
    wi.flags.writeable = wp.flags.writeable = False
    return wi, wp


def bootstrap_cells(ii: np.ndarray, pp: np.ndarray, sums: np.ndarray, counts: np.ndarray, *,
                    samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """:func:`evaluation.analysis.bootstrap_mean_ci` from (identity code, prompt code, sum, count) cells.

    Codes sort like the identity and prompt ids (so the matrix rows and columns, and hence the
    bootstrap draws, are in the reference's order); cells with count 0 hold no value and are left
    out, as the reference leaves out null values; a cell may appear more than once (summed).
    """
    keep = counts > 0
    ii, pp, sums, counts = ii[keep], pp[keep], sums[keep], counts[keep]
    if not counts.size:
        return {"mean": None, "low": None, "high": None, "n": 0, "identities": 0, "prompts": 0}
    identities, ri = np.unique(ii, return_inverse=True)
    prompts, rp = np.unique(pp, return_inverse=True)
    s = np.zeros((identities.size, prompts.size))
    c = np.zeros_like(s)
    np.add.at(s, (ri, rp), sums)
    np.add.at(c, (ri, rp), counts)
    mean = float(s.sum() / c.sum())
    n_i, n_p = s.shape
    wi, wp = bootstrap_weights(seed, samples, n_i, n_p)
    num = ((wi @ s) * wp).sum(axis=1)
    den = ((wi @ c) * wp).sum(axis=1)
    ok = den > 0
    means = num[ok] / den[ok]
    alpha = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(means, [alpha, 1 - alpha])) if means.size else (None, None)
    return {"mean": mean, "low": low, "high": high, "n": int(c.sum()), "identities": n_i, "prompts": n_p}


class StoreData:
    """The report's inputs of run ``run_id``, computed in DuckDB over ``catalog``'s views."""

    def __init__(self, catalog: Any, run_id: str) -> None:
        self.catalog, self.run_id = catalog, run_id
        q = catalog.query
        q("CREATE OR REPLACE TEMP TABLE rpt_e AS SELECT example_id, model, preset, lora_scale, ip_adapter_scale, "
          "prompt_kind, identity_id, prompt_id, seed FROM examples WHERE run_id = ?", [run_id])
        # Small dimensions, coded in Python so that codes sort exactly like the reference's sorted() ids.
        configs = q("SELECT DISTINCT model, preset, lora_scale, ip_adapter_scale FROM rpt_e").to_pylist()
        configs.sort(key=lambda r: _config_sort(tuple(r[k] for k in CONFIG_KEYS)))
        identities = sorted(q("SELECT DISTINCT identity_id FROM rpt_e").column(0).to_pylist(),
                            key=lambda v: (v is None, v or ""))
        prompts = sorted(q("SELECT DISTINCT prompt_id FROM rpt_e").column(0).to_pylist(),
                         key=lambda v: (v is None, v or ""))
        con = catalog.con
        con.register("rpt_cfg_dim", pa.table({
            "cfg": pa.array(range(len(configs)), pa.int32()),
            **{k: pa.array([r[k] for r in configs]) for k in CONFIG_KEYS}}))
        con.register("rpt_id_dim", pa.table({"identity_id": pa.array(identities, pa.string()),
                                              "i": pa.array(range(len(identities)), pa.int32())}))
        con.register("rpt_prompt_dim", pa.table({"prompt_id": pa.array(prompts, pa.string()),
                                                  "p": pa.array(range(len(prompts)), pa.int32())}))
        same = " AND ".join(f"e.{k} IS NOT DISTINCT FROM c.{k}" for k in CONFIG_KEYS)
        q("CREATE OR REPLACE TEMP TABLE rpt_ex AS SELECT "
          "CAST(row_number() OVER () AS INTEGER) AS ex, e.example_id, c.cfg, "
          f"CAST({KIND_CASE} AS TINYINT) AS kind, "
          "d.i, pd.p, e.seed "
          f"FROM rpt_e e JOIN rpt_cfg_dim c ON {same} "
          "JOIN rpt_id_dim d ON e.identity_id IS NOT DISTINCT FROM d.identity_id "
          "JOIN rpt_prompt_dim pd ON e.prompt_id IS NOT DISTINCT FROM pd.prompt_id")
        q("DROP TABLE rpt_e")
        q("CREATE OR REPLACE TEMP TABLE rpt_m AS SELECT x.ex, m.metric, m.value FROM metrics m "
          "JOIN rpt_ex x ON m.example_id = x.example_id WHERE m.run_id = ? AND m.error IS NULL", [run_id])
        q("ALTER TABLE rpt_ex DROP COLUMN example_id")
        self.configs = configs
        self._per_kind = q(
            "SELECT x.cfg, x.kind, m.metric, fsum(m.value) FILTER (WHERE NOT isnan(m.value)) AS s, "
            "count(m.value) FILTER (WHERE NOT isnan(m.value)) AS n, count(*) AS total "
            "FROM rpt_m m JOIN rpt_ex x USING (ex) GROUP BY ALL").to_pylist()
        self.metrics = sorted({r["metric"] for r in self._per_kind})
        self._cells: dict = {}
        self._paired: tuple | None = None  # (metric, baseline, cells): one metric's difference cells at a time

    def close(self) -> None:
        for t in ("rpt_ex", "rpt_m"):
            self.catalog.query(f"DROP TABLE IF EXISTS {t}")
        for v in ("rpt_cfg_dim", "rpt_id_dim", "rpt_prompt_dim"):
            self.catalog.con.unregister(v)

    # -- small facts ---------------------------------------------------------------------------
    def counts(self) -> dict:
        found = self.catalog.query("SELECT count(*) AS rows, count(DISTINCT ex) AS examples FROM rpt_m").to_pylist()[0]
        return {"rows": int(found["rows"]), "examples": int(found["examples"])}

    def scales(self) -> list[float]:
        used = {r["cfg"] for r in self._per_kind}
        return sorted({float(self.configs[c]["ip_adapter_scale"]) for c in used})

    def models(self) -> list[str]:
        return sorted({self.configs[r["cfg"]]["model"] for r in self._per_kind})

    def _cfgs_at(self, scale: float | None) -> list[int]:
        return [k for k, c in enumerate(self.configs)
                if scale is None or math.isclose(float(c["ip_adapter_scale"]), scale)]

    def _key(self, cfg: int) -> tuple:
        return tuple(self.configs[cfg][k] for k in CONFIG_KEYS)

    # -- aggregation -----------------------------------------------------------------------------
    def aggregate(self, *, prompt_set: str = "joint", scale: float | None = None,
                  aggregations: Mapping[str, str] | None = None) -> list[dict]:
        """:func:`evaluation.analysis.aggregate` (rows at ``scale`` only, if given), from the per-kind GROUP BY."""
        kinds = {KIND_CODES[k] for k in analysis.PROMPT_SETS[prompt_set]}
        cfgs = set(self._cfgs_at(scale))
        groups: dict[tuple, list[float]] = {}
        for r in self._per_kind:
            if r["kind"] in kinds and r["cfg"] in cfgs:
                g = groups.setdefault(self._key(r["cfg"]) + (r["metric"],), [0.0, 0, 0])
                g[0] += r["s"] or 0.0
                g[1] += r["n"]
                g[2] += r["total"]
        aggregations = dict(aggregations or analysis.metric_aggregations({k[-1] for k in groups}))
        out = []
        for key, (s, n, total) in sorted(groups.items(), key=lambda kv: _config_sort(kv[0])):
            metric, how = key[-1], aggregations.get(key[-1], "mean")
            value = float(s) if how == "sum" else float(n) if how == "count" else (s / n if n else None)
            out.append({**dict(zip(CONFIG_KEYS, key[:-1])), "set": prompt_set, "metric": metric, "value": value,
                        "n": int(n), "missing": int(total - n), "aggregate": how})
        return out

    # -- bootstrap cells -------------------------------------------------------------------------
    def _metric_cells(self, metric: str, scale: float | None) -> dict[str, np.ndarray]:
        """(cfg, kind, i, p, sum, count, rows) per (identity, prompt) cell of ``metric`` at λ ≈ ``scale`` (None:
        every λ), as numpy arrays; kept for the metrics and λs the report shows."""
        key = (metric, None if scale is None else round(scale, 6))
        if key not in self._cells:
            cfgs = ", ".join(map(str, self._cfgs_at(scale))) or "NULL"
            found = self.catalog.query(
                "SELECT x.cfg, x.kind, x.i, x.p, fsum(m.value) FILTER (WHERE m.value IS NOT NULL) AS s, "
                "count(m.value) AS c, count(*) AS rows FROM rpt_m m JOIN rpt_ex x USING (ex) "
                f"WHERE m.metric = ? AND x.cfg IN ({cfgs}) GROUP BY ALL", [metric])
            self._cells[key] = _arrays(found)
        return self._cells[key]

    def config_intervals(self, metric: str, *, prompt_set: str = "joint", scale: float | None = None,
                         samples: int = 1000, confidence: float = 0.95, seed: int = 0) -> list[dict]:
        """:func:`evaluation.analysis.config_intervals` (rows at ``scale`` only, if given)."""
        cells = self._metric_cells(metric, scale)
        kinds = [KIND_CODES[k] for k in analysis.PROMPT_SETS[prompt_set]]
        mask = np.isin(cells["kind"], kinds) & np.isin(cells["cfg"], self._cfgs_at(scale))
        out = []
        for cfg in sorted(set(cells["cfg"][mask].tolist()), key=lambda c: _config_sort(self._key(c))):
            m = mask & (cells["cfg"] == cfg)
            ci = bootstrap_cells(cells["i"][m], cells["p"][m], cells["s"][m], cells["c"][m],
                                 samples=samples, confidence=confidence, seed=seed)
            out.append({**dict(zip(CONFIG_KEYS, self._key(cfg))), "set": prompt_set, "metric": metric, **ci})
        return out

    def paired_differences(self, metric: str, *, baseline: str = "baseline", prompt_set: str = "joint",
                           scale: float | None = None, samples: int = 1000, confidence: float = 0.95,
                           seed: int = 0) -> list[dict]:
        """:func:`evaluation.analysis.paired_differences`: the difference cells are one SQL join and GROUP BY."""
        kinds = [KIND_CODES[k] for k in analysis.PROMPT_SETS[prompt_set]]
        found = self._paired_cells(metric, baseline)
        keep = np.isin(found["kind"], kinds) & np.isin(found["cfg"], self._cfgs_at(scale))
        found = {k: v[keep] for k, v in found.items()}
        out = []
        for cfg in sorted(set(found["cfg"].tolist()), key=lambda c: _config_sort(self._key(c))):
            m = found["cfg"] == cfg
            ci = bootstrap_cells(found["i"][m], found["p"][m], found["s"][m], found["c"][m],
                                 samples=samples, confidence=confidence, seed=seed)
            out.append({**dict(zip(CONFIG_KEYS, self._key(cfg))), "set": prompt_set, "metric": metric,
                        "mean_difference": ci["mean"], "low": ci["low"], "high": ci["high"], "pairs": ci["n"],
                        "unpaired": int(found["unpaired"][m].sum())})
        return out

    def _paired_cells(self, metric: str, baseline: str) -> dict[str, np.ndarray]:
        """Per pair of a non-baseline config's row and the baseline row with the same model, lora_scale, λ,
        identity, prompt and seed: its config, prompt kind, (identity, prompt) codes, metric(config) −
        metric(baseline) (``s``, with ``c`` = 1) or, without a baseline row or with a null on either side,
        ``unpaired`` = 1 (and ``s`` = ``c`` = 0). One join in DuckDB; the cells are summed by
        :func:`bootstrap_cells`."""
        if self._paired is not None and self._paired[:2] == (metric, baseline):
            return self._paired[2]
        base_cfg = {k: c for k, c in enumerate(self.configs) if c["preset"] == baseline}
        pairs = {k: next((b for b, bc in base_cfg.items()
                          if all(bc[f] == c[f] for f in ("model", "lora_scale", "ip_adapter_scale"))), -1)
                 for k, c in enumerate(self.configs) if c["preset"] != baseline}
        self.catalog.con.register("rpt_pairs", pa.table({"cfg": pa.array(list(pairs), pa.int32()),
                                                          "base": pa.array(list(pairs.values()), pa.int32())}))
        try:
            found = _arrays(self.catalog.query(
                "WITH x AS (SELECT e.cfg, pr.base, e.kind, e.i, e.p, e.seed, m.value FROM rpt_m m "
                f"JOIN rpt_ex e USING (ex) JOIN rpt_pairs pr USING (cfg) WHERE m.metric = ? AND e.kind < {OTHER_KIND}), "
                "b AS (SELECT e.cfg, e.i, e.p, e.seed, m.value FROM rpt_m m JOIN rpt_ex e USING (ex) "
                f"WHERE m.metric = ? AND e.kind < {OTHER_KIND} AND e.cfg IN (SELECT base FROM rpt_pairs)), "
                "j AS (SELECT x.cfg, x.kind, x.i, x.p, x.value - b.value AS d, "
                "(x.value IS NOT NULL AND b.value IS NOT NULL) AS ok FROM x LEFT JOIN b ON x.base = b.cfg "
                "AND x.i = b.i AND x.p = b.p AND x.seed IS NOT DISTINCT FROM b.seed) "
                # One row per pair, not per cell: a cell almost always holds one pair (one seed), and a
                # GROUP BY of ~1 M cells cost 3-4 s per metric at the paper's size; bootstrap_cells sums
                # the rows of a cell (and leaves out rows with c = 0) as it sums cells seen twice.
                "SELECT cfg, kind, i, p, CASE WHEN ok THEN d ELSE 0 END AS s, ok::INTEGER AS c, "
                "(NOT ok)::INTEGER AS unpaired FROM j",
                [metric, metric]))
        finally:
            self.catalog.con.unregister("rpt_pairs")
        if not found:  # no column arrays from an empty result of no columns
            found = {k: np.zeros(0) for k in ("cfg", "kind", "i", "p", "s", "c", "unpaired")}
        self._paired = (metric, baseline, found)
        return found

    # -- the paper's cells -----------------------------------------------------------------------
    def paper_stats(self, kinds: Sequence[str], scale: float, model: str, preset: str, lora_scale: float,
                    metric: str, *, bootstrap: bool, samples: int = 1000, confidence: float = 0.95,
                    seed: int = 0) -> dict | None:
        """One group of :func:`evaluation.paper.paper_comparison`: None without rows, else its models, rows, n, sum
        and (``bootstrap``) the two-way bootstrap of its mean."""
        if metric not in self.metrics:
            return None
        cfgs = [k for k, c in enumerate(self.configs)
                if round(float(c["ip_adapter_scale"]), 6) == round(scale, 6) and _model_key(c["model"]) == model
                and c["preset"] == preset and float(c["lora_scale"]) == lora_scale]
        cells = self._metric_cells(metric, scale)
        m = np.isin(cells["cfg"], cfgs) & np.isin(cells["kind"], [KIND_CODES.get(k, OTHER_KIND) for k in kinds])
        if not cells["rows"][m].sum():
            return None
        out = {"models": sorted({self.configs[c]["model"] for c in set(cells["cfg"][m].tolist())}),
               "rows": int(cells["rows"][m].sum()), "n": int(cells["c"][m].sum()),
               "sum": float(cells["s"][m][cells["c"][m] > 0].sum())}
        if bootstrap:
            out["ci"] = bootstrap_cells(cells["i"][m], cells["p"][m], cells["s"][m], cells["c"][m],
                                        samples=samples, confidence=confidence, seed=seed)
        return out

    def paper_models(self, pairs: set[tuple[float, str]]) -> set[str]:
        """Models with rows at any of the (λ, metric) pairs the paper's tables use."""
        have = {(r["cfg"], r["metric"]) for r in self._per_kind if r["total"]}
        return {c["model"] for k, c in enumerate(self.configs)
                if any(math.isclose(float(c["ip_adapter_scale"]), s) and (k, m) in have for s, m in pairs)}

    # -- Fig. 18 ---------------------------------------------------------------------------------
    def fig18(self, scale: float) -> dict:
        """ID and face size at λ ≈ ``scale`` per (model, preset, lora_scale), as numpy arrays (NaN: no value)."""
        cfgs = self._cfgs_at(scale)
        if not cfgs or not {"id", "face_size"} & set(self.metrics):
            return {"id": {}, "face_size": {}, "pairs": {}}
        found = _arrays(self.catalog.query(
            "SELECT x.cfg, max(m.value) FILTER (WHERE m.metric = 'id') AS id, "
            "count(*) FILTER (WHERE m.metric = 'id') AS has_id, "
            "max(m.value) FILTER (WHERE m.metric = 'face_size') AS face_size, "
            "count(*) FILTER (WHERE m.metric = 'face_size') AS has_size "
            "FROM rpt_m m JOIN rpt_ex x USING (ex) WHERE m.metric IN ('id', 'face_size') AND x.cfg IN "
            f"({', '.join(map(str, cfgs))}) GROUP BY x.ex, x.cfg ORDER BY x.ex"))
        out: dict = {"id": {}, "face_size": {}, "pairs": {}}
        for cfg in sorted(set(found["cfg"].tolist())):
            m = found["cfg"] == cfg
            key = tuple(self.configs[cfg][k] for k in ("model", "preset", "lora_scale"))
            for metric, has in (("id", "has_id"), ("face_size", "has_size")):
                if found[has][m].any():
                    out[metric].setdefault(key, []).append(found[metric][m & (found[has] > 0)])
            both = m & ~np.isnan(found["id"]) & ~np.isnan(found["face_size"])
            if both.any():
                out["pairs"].setdefault(key, []).append(np.stack([found["face_size"][both], found["id"][both]], 1))
        return {k: {key: np.concatenate(v) for key, v in d.items()} for k, d in out.items()}


def _arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns as numpy arrays (nulls → NaN in floats, 0 in counts)."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_floating(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(float)
            if col.null_count:
                out[name][np.asarray(col.is_null())] = np.nan
        else:
            out[name] = col.fill_null(0).to_numpy(zero_copy_only=False)
    return out


class RowsData:
    """The same interface over rows in memory (the reference of :mod:`evaluation.analysis`)."""

    def __init__(self, rows: Any) -> None:
        self.rows = analysis._rows(rows)
        self.metrics = sorted({r["metric"] for r in self.rows})
        self._groups: dict | None = None

    def _at(self, scale: float | None) -> list[dict]:
        return self.rows if scale is None else [r for r in self.rows
                                                if math.isclose(float(r["ip_adapter_scale"]), scale)]

    def counts(self) -> dict:
        return {"rows": len(self.rows), "examples": len({r.get("example_id") for r in self.rows})}

    def scales(self) -> list[float]:
        return sorted({float(r["ip_adapter_scale"]) for r in self.rows})

    def models(self) -> list[str]:
        return sorted({r["model"] for r in self.rows})

    def aggregate(self, *, prompt_set: str = "joint", scale: float | None = None,
                  aggregations: Mapping[str, str] | None = None) -> list[dict]:
        return analysis.aggregate(self._at(scale), prompt_set=prompt_set, aggregations=aggregations)

    def config_intervals(self, metric: str, *, prompt_set: str = "joint", scale: float | None = None, **boot) -> list[dict]:
        return analysis.config_intervals(self._at(scale), metric, prompt_set=prompt_set, **boot)

    def paired_differences(self, metric: str, *, baseline: str = "baseline", prompt_set: str = "joint",
                           scale: float | None = None, **boot) -> list[dict]:
        return analysis.paired_differences(self._at(scale), metric, baseline=baseline, prompt_set=prompt_set, **boot)

    def fig18(self, scale: float | None) -> dict:
        rows = self._at(scale)
        out: dict = {"id": {}, "face_size": {}, "pairs": {}}
        for metric in ("id", "face_size"):
            for r in rows:
                if r["metric"] == metric:
                    out[metric].setdefault((r["model"], r["preset"], r["lora_scale"]), []).append(
                        np.nan if r["value"] is None else float(r["value"]))
        ids = {r["example_id"]: r["value"] for r in rows if r["metric"] == "id" and r["value"] is not None}
        for r in rows:
            if r["metric"] == "face_size" and r["value"] is not None and r["example_id"] in ids:
                out["pairs"].setdefault((r["model"], r["preset"], r["lora_scale"]), []).append(
                    (float(r["value"]), float(ids[r["example_id"]])))
        return {k: {key: np.asarray(v, float) for key, v in d.items()} for k, d in out.items()}

    def paper_stats(self, kinds: Sequence[str], scale: float, model: str, preset: str, lora_scale: float,
                    metric: str, *, bootstrap: bool, **boot) -> dict | None:
        if self._groups is None:
            self._groups = {}
            for r in self.rows:  # one pass: group by (set-kind, λ, model, preset, lora, metric)
                key = (r.get("prompt_kind"), round(float(r["ip_adapter_scale"]), 6), _model_key(r["model"]),
                       r["preset"], float(r["lora_scale"]), r["metric"])
                self._groups.setdefault(key, []).append(r)
        rows: list[dict] = []
        for kind in kinds:
            rows += self._groups.get((kind, round(scale, 6), model, preset, lora_scale, metric), [])
        if not rows:
            return None
        values = [float(r["value"]) for r in rows if r["value"] is not None]
        out = {"models": sorted({r["model"] for r in rows}), "rows": len(rows), "n": len(values), "sum": sum(values)}
        if bootstrap:
            out["ci"] = analysis.bootstrap_mean_ci(rows, **boot)
        return out

    def paper_models(self, pairs: set[tuple[float, str]]) -> set[str]:
        return {r["model"] for r in self.rows
                if any(math.isclose(float(r["ip_adapter_scale"]), s) and r["metric"] == m for s, m in pairs)}


def report_data(source: Any) -> "StoreData | RowsData":
    """``source`` as it is when it already answers the report's questions, else rows wrapped in :class:`RowsData`."""
    return source if isinstance(source, (StoreData, RowsData)) else RowsData(source)


__all__ = ["RowsData", "StoreData", "bootstrap_cells", "report_data"]

"""The paper's published numbers beside a run: "paper vs this run" (issues 14 and 23).

:func:`load_paper_tables` reads ``evaluation/data/paper_tables.yaml``: all of Tables 1-3 of arXiv 2505.21144
(224 values, each with its table, row and the column name the paper prints, mapped to this project's
metric names) and the paper's claims (checked by :mod:`evaluation.claims`). :func:`compare_cells` places each
published cell beside this run's value for the same model × preset × lora_scale, on the table's prompt
set and at its ip_adapter_scale, with a 95 % interval and the verdict "inside" / "outside" (is the paper's
value inside our interval?), "not run" (the run has no examples of that configuration on that prompt
set), "no data" (it has, but the metric was not scored) or "not comparable" (tiny weights, another metric
mode). Its inputs are small aggregated tables, never raw metric rows:

- ``intervals``: rows shaped like :func:`evaluation.analysis.config_intervals` (``model, preset, lora_scale,
  ip_adapter_scale, set, metric, mean, low, high, n``): the two-way (identities × prompts) bootstrap of
  each mean metric;
- ``aggregates``: rows shaped like :func:`evaluation.analysis.aggregate` (``..., set, metric, value, n,
  missing, aggregate``): counts (FFC) compare failure *rates*, with a Wilson score interval (the
  bootstrap of a rate with no failures is the empty point [0, 0]), the paper's count taken over the
  paper's number of images;
- ``run_configs`` (optional): the run's distinct ``(model, preset, lora_scale, ip_adapter_scale,
  prompt_kind)``; by default, what the aggregates show (a configuration with a metric row on a set).

:func:`paper_comparison` computes those from :mod:`evaluation.analysis` input rows or from the report's
:class:`evaluation.report_data.StoreData` (SQL aggregates and bootstrap cells).
For Table 2 the relative change against the baseline is given for the paper and for us.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from evaluation import analysis

PAPER_TABLES = Path(__file__).parent / "data" / "paper_tables.yaml"
TABLE_KEYS = ("table1", "table2", "table3")
# Metrics whose paper value depends on a metric mode, and the mode that reproduces it (docs/metrics.md).
AUTHORS_MODES = {"fsc": ("fsc_mode", "authors"), "face_size": ("face_size_mode", "authors")}
VERDICTS = ("inside", "outside", "not comparable", "no data", "not run")


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    for key, table in data["tables"].items():
        for row in table["rows"]:
            missing = [c for c in table["columns"] if c not in row]
            if missing or not (row.get("source") or table.get("source")):
                raise ValueError(f"{path}: {key} row {row.get('row')!r} lacks {missing or 'a source'}")
    for claim in data.get("claims", []):
        lacking = [k for k in ("id", "claim", "source", "table", "set", "ip_adapter_scale", "presets", "models",
                               "lora_scales", "directions") if k not in claim]
        bad = {m: d for m, d in claim.get("directions", {}).items() if d not in ("up", "down")}
        if lacking or bad:
            raise ValueError(f"{path}: claim {claim.get('id')!r} lacks {lacking}" if lacking else
                             f"{path}: claim {claim.get('id')!r}: directions must be up or down, got {bad}")
    return data


def load_paper_tables(path: str | Path = PAPER_TABLES) -> dict:
    """``{"paper", "tables": {"table1": {title, source, set, ip_adapter_scale, images, columns, rows}, ...}, "claims"}``.

    ``columns`` maps each column name as the paper prints it to this project's metric name.
    """
    return _load(str(path))


def paper_cells(tables: Mapping) -> list[dict]:
    """One dict per published value: table, set, λ, model, preset, lora_scale, metric, column (as printed), row, value."""
    out = []
    for key, table in tables["tables"].items():
        for row in table["rows"]:
            for column, metric in table["columns"].items():
                if row.get(column) is None:
                    continue
                out.append({"table": key, "set": table["set"], "ip_adapter_scale": float(table["ip_adapter_scale"]),
                            "images": table.get("images"), "model": row["model"], "preset": row["preset"],
                            "lora_scale": float(row["lora_scale"]), "metric": metric, "column": column,
                            "row": row["row"], "paper": float(row[column]),
                            "source": row.get("source") or table["source"]})
    return out


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    from statistics import NormalDist

    if n <= 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def model_key(model: str) -> str:
    """The paper's name of a model: ``tiny-hyper`` stands in for ``hyper`` (marked not comparable)."""
    return model.removeprefix("tiny-")


_model_key = model_key


def _key(r: Mapping, set_: str | None = None) -> tuple:
    return (set_ if set_ is not None else r["set"], round(float(r["ip_adapter_scale"]), 6), model_key(r["model"]),
            r["preset"], float(r["lora_scale"]), r["metric"])


def compare_cells(
    intervals: Iterable[Mapping],
    aggregates: Iterable[Mapping],
    run_configs: Iterable[Mapping] | None = None,
    tables: Mapping | None = None,
    *,
    baseline: str = "baseline",
    confidence: float = 0.95,
    metric_modes: Mapping[str, str] | None = None,
) -> list[dict]:
    """Each published cell beside this run: ours, its interval, difference and verdict (see the module docstring).

    A run of ``tiny-<m>`` is set beside the paper's ``<m>`` but marked not comparable, as is a metric scored
    in another mode than the one the paper's number needs (``metric_modes``: the run's ``metrics`` config).
    """
    tables = load_paper_tables() if tables is None else tables
    modes = dict(metric_modes or {})
    ci = {_key(r): r for r in intervals}
    agg = {_key(r): r for r in aggregates}
    ran: dict[tuple, set[str]] = {}  # (set, λ, model, preset, lora) -> the run's model names there
    tiny_run = False
    if run_configs is None:  # what the aggregates show: a configuration with any metric row on a prompt kind ran there
        # (the single-kind sets only: a joint row does not say which kinds it holds)
        run_configs = [dict(r, prompt_kind=analysis.PROMPT_SETS[r["set"]][0]) for r in agg.values()
                       if len(analysis.PROMPT_SETS[r["set"]]) == 1]
    for r in run_configs:
        tiny_run |= r["model"].startswith("tiny-")
        for set_, kinds in analysis.PROMPT_SETS.items():
            if r.get("prompt_kind") in kinds:
                key = (set_, round(float(r["ip_adapter_scale"]), 6), model_key(r["model"]), r["preset"],
                       float(r["lora_scale"]))
                ran.setdefault(key, set()).add(r["model"])
    cells = paper_cells(tables)
    published = {(c["table"], c["model"], c["preset"], c["lora_scale"], c["metric"]): c["paper"] for c in cells}
    out = []
    for c in cells:
        config = (c["set"], round(c["ip_adapter_scale"], 6), c["model"], c["preset"], c["lora_scale"])
        key = config + (c["metric"],)
        result = {**c, "ours": None, "low": None, "high": None, "difference": None, "n": 0,
                  "verdict": "not run" if config not in ran else "no data", "comparable": True, "note": ""}
        notes = []
        models_here = ran.get(config, set())
        if any(m.startswith("tiny-") for m in models_here) or (not models_here and tiny_run):
            result["comparable"] = False
            notes.append("tiny random weights: not comparable")
        if c["metric"] in AUTHORS_MODES:
            field, mode = AUTHORS_MODES[c["metric"]]
            if field not in modes:
                notes.append(f"{field} of this run unknown; the paper's number needs {mode!r}")
            elif modes[field] != mode:
                result["comparable"] = False
                notes.append(f"{field}={modes[field]!r}, the paper's number needs {mode!r}")
        a = agg.get(key)
        if a is not None and a.get("aggregate") == "sum":  # a count of failures: compare rates over the paper's images
            n, k = int(a["n"]), int(round(float(a["value"] or 0)))
            if n:
                scale_to = float(c["images"] or n)
                low, high = wilson_interval(k, n, confidence)
                result.update(ours=k / n * scale_to, low=low * scale_to, high=high * scale_to, n=n, ours_count=k)
        elif key in ci and ci[key].get("mean") is not None:
            i = ci[key]
            result.update(ours=i["mean"], low=i["low"], high=i["high"], n=i["n"])
        if result["ours"] is not None and result["low"] is not None:
            result["difference"] = result["ours"] - c["paper"]
            result["verdict"] = "inside" if result["low"] <= c["paper"] <= result["high"] else "outside"
        elif result["verdict"] == "no data":
            if a is not None and not a.get("n") and a.get("missing"):
                notes.append(f"no {c['metric']} value: undefined on all {a['missing']} images (no face found)")
            else:
                notes.append(f"{c['metric']} not scored in this run")
        if c["table"] == "table2" and c["preset"] != baseline:
            base = published.get((c["table"], c["model"], baseline, c["lora_scale"], c["metric"]))
            result["paper_change"] = None if not base else (c["paper"] - base) / abs(base)
            b = agg.get((c["set"], round(c["ip_adapter_scale"], 6), c["model"], baseline, c["lora_scale"], c["metric"]))
            ours_base = b["value"] if b else None
            result["ours_change"] = (None if not ours_base or result["ours"] is None
                                     else (result["ours"] - ours_base) / abs(ours_base))
        result["note"] = "; ".join(notes)
        if not result["comparable"] and result["verdict"] in ("inside", "outside"):
            # A verdict on numbers that cannot be compared would read as a finding; keep it in the note only.
            result["note"] += f" (paper value {result['verdict']} this run's interval)"
            result["verdict"] = "not comparable"
        out.append(result)
    return out


def comparison_inputs(
    source: Any, tables: Mapping | None = None, *, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """``(intervals, aggregates)`` of :func:`compare_cells` at the tables' prompt sets, λ and metrics.

    ``source``: :mod:`evaluation.analysis` input rows, or the report's :class:`evaluation.report_data.StoreData` (SQL
    aggregates and bootstrap cells: no metric row becomes a Python row)."""
    from evaluation.report_data import report_data

    tables = load_paper_tables() if tables is None else tables
    data = report_data(source)
    wanted: dict[tuple[str, float], set[str]] = {}
    for c in paper_cells(tables):
        wanted.setdefault((c["set"], c["ip_adapter_scale"]), set()).add(c["metric"])
    sums = {m for m, how in analysis.metric_aggregations(set().union(*wanted.values())).items() if how == "sum"}
    aggregates, intervals = [], []
    for scale in sorted({lam for _, lam in wanted}):  # each prompt kind's rows: what ran (compare_cells)
        for set_ in ("realistic", "stylistic"):
            if (set_, scale) not in wanted:
                aggregates += [r for r in data.aggregate(prompt_set=set_, scale=scale)]
    for (set_, scale), metrics in sorted(wanted.items()):
        aggregates += [r for r in data.aggregate(prompt_set=set_, scale=scale) if r["metric"] in metrics]
        for metric in sorted(metrics - sums):
            intervals += data.config_intervals(metric, prompt_set=set_, scale=scale, samples=samples,
                                               confidence=confidence, seed=seed)
    return intervals, aggregates


def paper_comparison(
    rows: Any,
    tables: Mapping | None = None,
    *,
    baseline: str = "baseline",
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metric_modes: Mapping[str, str] | None = None,
) -> list[dict]:
    """:func:`compare_cells` on :mod:`evaluation.analysis` input rows (metrics ⋈ examples) or the report's
    :class:`evaluation.report_data.StoreData`."""
    tables = load_paper_tables() if tables is None else tables
    intervals, aggregates = comparison_inputs(rows, tables, samples=samples, confidence=confidence, seed=seed)
    return compare_cells(intervals, aggregates, None, tables, baseline=baseline, confidence=confidence,
                         metric_modes=metric_modes)


def coverage(comparison: Iterable[Mapping]) -> dict[str, dict[str, int]]:
    """Per table: how many published cells got each verdict (the report's and the summary's overview)."""
    out: dict[str, dict[str, int]] = {}
    for c in comparison:
        counts = out.setdefault(c["table"], {v: 0 for v in VERDICTS})
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    return out


def missing_tables(tables: Mapping | None = None) -> list[str]:
    """Tables of the data file without any published row."""
    tables = load_paper_tables() if tables is None else tables
    return [key for key, table in tables["tables"].items() if not table["rows"]]


__all__ = ["PAPER_TABLES", "VERDICTS", "compare_cells", "comparison_inputs", "coverage", "load_paper_tables",
           "missing_tables", "model_key", "paper_cells", "paper_comparison", "wilson_interval"]

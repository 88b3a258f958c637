"""The paper's published numbers beside a run: "paper vs this run" (issue 14).

:func:`load_paper_tables` reads ``flows/data/paper_tables.yaml`` (Tables 1-3 of arXiv 2505.21144,
values as published with table, row and column). :func:`paper_comparison` places each published
cell beside this run's mean for the same model × preset × lora_scale, on the table's prompt set and
at its ip_adapter_scale, with a 95 % interval and the verdict "inside" / "outside" (is the paper's
value inside our interval?). Mean metrics use the two-way (identities × prompts) bootstrap of
:func:`flows.analysis.bootstrap_mean_ci`; counts (FFC) compare failure *rates*, with a Wilson score
interval (the bootstrap of a rate with no failures is the empty point [0, 0]) and the paper's count
taken over the paper's number of images. For Table 2 the relative change against the baseline is
given for the paper and for us.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from flows import analysis
from flows.report_data import report_data

PAPER_TABLES = Path(__file__).parent / "data" / "paper_tables.yaml"
TABLE_KEYS = ("table1", "table2", "table3")
# Metrics whose paper value depends on a metric mode, and the mode that reproduces it (docs/metrics.md).
AUTHORS_MODES = {"fsc": ("fsc_mode", "authors"), "face_size": ("face_size_mode", "authors")}


@lru_cache(maxsize=4)
def _load(path: str) -> dict:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    for key, table in data["tables"].items():
        for row in table["rows"]:
            missing = [m for m in table["columns"] if m not in row]
            if missing or not row.get("source"):
                raise ValueError(f"{path}: {key} row {row.get('row')!r} lacks {missing or 'a source'}")
    return data


def load_paper_tables(path: str | Path = PAPER_TABLES) -> dict:
    """``{"paper": ..., "tables": {"table1": {set, ip_adapter_scale, images, columns, rows}, ...}}``."""
    return _load(str(path))


def paper_cells(tables: Mapping) -> list[dict]:
    """One dict per published value: table, set, λ, model, preset, lora_scale, metric, column, row label, value."""
    out = []
    for key, table in tables["tables"].items():
        for row in table["rows"]:
            for metric, column in table["columns"].items():
                if row.get(metric) is None:
                    continue
                out.append({"table": key, "set": table["set"], "ip_adapter_scale": float(table["ip_adapter_scale"]),
                            "images": table.get("images"), "model": row["model"], "preset": row["preset"],
                            "lora_scale": float(row["lora_scale"]), "metric": metric, "column": column,
                            "row": row["row"], "paper": float(row[metric]), "source": row["source"]})
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
    """Each published cell beside this run: ours, its interval, difference and verdict.

    ``rows`` are :mod:`flows.analysis` input rows (metrics ⋈ examples), or the report's
    :class:`flows.report_data.StoreData` (the same numbers from SQL aggregates and bootstrap cells). A run of ``tiny-<m>`` is set
    beside the paper's ``<m>`` but marked not comparable, as is a metric scored in another mode than
    the one the paper's number needs (``metric_modes``: the run's ``metrics`` config).
    """
    tables = load_paper_tables() if tables is None else tables
    cells = paper_cells(tables)
    modes = dict(metric_modes or {})
    wanted = {(c["ip_adapter_scale"], c["metric"]) for c in cells}
    # rows, or the report's aggregated source (flows.report_data.StoreData: SQL, no rows in Python)
    data = report_data(rows)
    tiny_models = {m for m in data.paper_models(wanted) if m.startswith("tiny-")}

    def stats(c: Mapping, preset: str, bootstrap: bool) -> dict | None:
        return data.paper_stats(analysis.PROMPT_SETS[c["set"]], c["ip_adapter_scale"], c["model"], preset,
                                c["lora_scale"], c["metric"], bootstrap=bootstrap, samples=samples,
                                confidence=confidence, seed=seed)

    published = {(c["table"], c["model"], c["preset"], c["lora_scale"], c["metric"]): c["paper"] for c in cells}
    out = []
    for c in cells:
        aggregate = analysis.metric_aggregations([c["metric"]])[c["metric"]]
        ours = stats(c, c["preset"], aggregate != "sum")
        result = {**c, "ours": None, "low": None, "high": None, "difference": None, "n": 0, "verdict": "no data",
                  "comparable": True, "note": ""}
        notes = []
        if (ours and any(m.startswith("tiny-") for m in ours["models"])) or (not ours and tiny_models):
            result["comparable"] = False
            notes.append("tiny random weights: not comparable")
        if c["metric"] in AUTHORS_MODES:
            field, mode = AUTHORS_MODES[c["metric"]]
            if field not in modes:
                notes.append(f"{field} of this run unknown; the paper's number needs {mode!r}")
            elif modes[field] != mode:
                result["comparable"] = False
                notes.append(f"{field}={modes[field]!r}, the paper's number needs {mode!r}")
        if ours:
            if aggregate == "sum":  # a count of failures: compare rates, reported as counts over the paper's images
                n, k = ours["n"], int(round(ours["sum"]))
                scale_to = float(c["images"] or n)
                low, high = wilson_interval(k, n, confidence)
                result.update(ours=k / n * scale_to if n else None, low=low * scale_to, high=high * scale_to, n=n,
                              ours_count=k)
            else:
                ci = ours["ci"]
                result.update(ours=ci["mean"], low=ci["low"], high=ci["high"], n=ci["n"])
            if result["ours"] is not None and result["low"] is not None:
                result["difference"] = result["ours"] - c["paper"]
                inside = result["low"] <= c["paper"] <= result["high"]
                result["verdict"] = "inside" if inside else "outside"
        if c["table"] == "table2" and c["preset"] != baseline:
            base = published.get((c["table"], c["model"], baseline, c["lora_scale"], c["metric"]))
            result["paper_change"] = None if not base else (c["paper"] - base) / abs(base)
            base_stats = stats(c, baseline, False)
            ours_base = base_stats["sum"] / base_stats["n"] if base_stats and base_stats["n"] else None
            result["ours_change"] = (None if not ours_base or result["ours"] is None
                                     else (result["ours"] - ours_base) / abs(ours_base))
        result["note"] = "; ".join(notes)
        if not result["comparable"] and result["verdict"] in ("inside", "outside"):
            # A verdict on numbers that cannot be compared would read as a finding; keep it in the note only.
            result["note"] += f" (paper value {result['verdict']} this run's interval)"
            result["verdict"] = "not comparable"
        out.append(result)
    return out


def missing_tables(tables: Mapping | None = None) -> list[str]:
    """Tables of the data file without any published row (values not found; see the file's header)."""
    tables = load_paper_tables() if tables is None else tables
    return [key for key, table in tables["tables"].items() if not table["rows"]]


__all__ = ["PAPER_TABLES", "load_paper_tables", "missing_tables", "paper_cells", "paper_comparison", "wilson_interval"]

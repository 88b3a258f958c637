"""The report's aggregation as pure functions of rows (method-spec §6), testable on synthetic tables.

This is the reference: :mod:`evaluation.report_data` computes the same numbers in DuckDB (aggregates and
bootstrap cells by SQL, the bootstrap on numpy arrays) without turning the run's rows into Python
rows, and tests/test_report_sql.py checks that both agree to 1e-12. Use these functions for rows
already in memory (tests, small inputs).

Input rows are the ``metrics`` table joined with ``examples`` (one row per example and
metric): ``identity_id, prompt_id, prompt_kind, model, preset, lora_scale,
ip_adapter_scale, seed, metric, value``. ``value`` is None where a metric has no value
(ID of an image without a face); such rows are excluded from means and counted.

- :func:`aggregate`: per config (model, preset, lora_scale, ip_adapter_scale) and prompt
  set, each metric aggregated as its registry entry says (mean, or sum for FFC);
- :func:`relative_change`: (value − baseline) / |baseline| per config;
- :func:`lambda_curves`: ID against another metric traced by ip_adapter_scale;
- :func:`bootstrap_mean_ci`: a two-way (identities × prompts) cluster bootstrap;
- :func:`paired_differences`: metric(preset) − metric(baseline) on the same identity,
  prompt and seed, with the same bootstrap.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fastface.prompt_sets import PROMPT_SETS

CONFIG_KEYS = ("model", "preset", "lora_scale", "ip_adapter_scale")


def _rows(rows: Any) -> list[dict]:
    return rows.to_pylist() if hasattr(rows, "to_pylist") else [dict(r) for r in rows]


def metric_aggregations(metrics: Iterable[str]) -> dict[str, str]:
    """``metric → "mean" | "sum" | "count"`` from the metric registry (unknown names default to mean)."""
    from fastface.metrics import METRICS

    return {m: (METRICS.get(m).aggregate if m in METRICS else "mean") for m in metrics}


def in_set(row: Mapping, prompt_set: str) -> bool:
    return row.get("prompt_kind") in PROMPT_SETS[prompt_set]


def aggregate(
    rows: Any,
    *,
    prompt_set: str = "joint",
    aggregations: Mapping[str, str] | None = None,
    keys: Sequence[str] = CONFIG_KEYS,
) -> list[dict]:
    """One row per config: ``{keys..., set, metric, value, n, missing}``.

    ``value`` is the mean over non-null values (metrics that aggregate by mean) or the sum
    (FFC: the number of images with no face); ``n`` counts the values used, ``missing``
    the null ones (for ID: the no-face images it excludes).
    """
    rows = [r for r in _rows(rows) if in_set(r, prompt_set)]
    aggregations = dict(aggregations or metric_aggregations({r["metric"] for r in rows}))
    groups: dict[tuple, list[float | None]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys) + (r["metric"],), []).append(r["value"])
    out = []
    for key, values in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        metric = key[-1]
        present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        how = aggregations.get(metric, "mean")
        if how == "sum":
            value = float(sum(present))
        elif how == "count":
            value = float(len(present))
        else:
            value = float(np.mean(present)) if present else None
        out.append({**dict(zip(keys, key[:-1])), "set": prompt_set, "metric": metric, "value": value,
                    "n": len(present), "missing": len(values) - len(present), "aggregate": how})
    return out


def relative_change(table: Sequence[Mapping], *, baseline: str = "baseline") -> list[dict]:
    """Rows of :func:`aggregate` with ``baseline_value`` and ``relative_change`` = (v − b) / |b| (None when b is 0/None)."""
    index = {(r["model"], r["lora_scale"], r["ip_adapter_scale"], r["set"], r["metric"]): r["value"]
             for r in table if r["preset"] == baseline}
    out = []
    for r in table:
        base = index.get((r["model"], r["lora_scale"], r["ip_adapter_scale"], r["set"], r["metric"]))
        change = None
        if base is not None and r["value"] is not None and base != 0:
            change = (r["value"] - base) / abs(base)
        out.append({**r, "baseline_value": base, "relative_change": change})
    return out


def lambda_curves(table: Sequence[Mapping], *, x: str = "id", y: str = "clip") -> dict[tuple, list[dict]]:
    """``(model, preset, lora_scale, set) → [{ip_adapter_scale, x, y}]`` sorted by scale (the paper's "Pareto" curves)."""
    values: dict[tuple, dict[float, dict]] = {}
    for r in table:
        if r["metric"] not in (x, y):
            continue
        key = (r["model"], r["preset"], r["lora_scale"], r["set"])
        point = values.setdefault(key, {}).setdefault(float(r["ip_adapter_scale"]), {"ip_adapter_scale": float(r["ip_adapter_scale"])})
        point["x" if r["metric"] == x else "y"] = r["value"]
    curves = {}
    for key, points in values.items():
        curve = [p for _, p in sorted(points.items()) if p.get("x") is not None and p.get("y") is not None]
        if curve:
            curves[key] = curve
    return curves


def _cells(rows: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray, list, list]:
    """Per (identity, prompt) cell: sum and count of the non-null values (seeds pooled)."""
    identities = sorted({r["identity_id"] for r in rows})
    prompts = sorted({r["prompt_id"] for r in rows})
    ii = {v: k for k, v in enumerate(identities)}
    pp = {v: k for k, v in enumerate(prompts)}
    sums = np.zeros((len(identities), len(prompts)))
    counts = np.zeros_like(sums)
    for r in rows:
        if r["value"] is None:
            continue
        sums[ii[r["identity_id"]], pp[r["prompt_id"]]] += float(r["value"])
        counts[ii[r["identity_id"]], pp[r["prompt_id"]]] += 1
    return sums, counts, identities, prompts


def bootstrap_mean_ci(
    rows: Any, *, samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """Mean of ``value`` with a two-way cluster bootstrap CI over identities and prompts.

    Each replicate draws identities with replacement and, independently, prompts with
    replacement, and takes the mean over all values of the drawn (identity, prompt) cells
    (a cell drawn a times as identity and b times as prompt counts a·b times). Values are
    not independent across images of one identity or one prompt; resampling both
    clusters gives honest intervals when a few identities or prompts dominate.
    Percentile interval; returns ``{mean, low, high, n, identities, prompts}``.
    """
    rows = [r for r in _rows(rows) if r["value"] is not None]
    if not rows:
        return {"mean": None, "low": None, "high": None, "n": 0, "identities": 0, "prompts": 0}
    sums, counts, identities, prompts = _cells(rows)
    mean = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    n_i, n_p = sums.shape
    wi = rng.multinomial(n_i, np.full(n_i, 1.0 / n_i), size=samples).astype(float)  # [B, I]
    wp = rng.multinomial(n_p, np.full(n_p, 1.0 / n_p), size=samples).astype(float)  # [B, P]
    num = np.einsum("bi,ip,bp->b", wi, sums, wp)
    den = np.einsum("bi,ip,bp->b", wi, counts, wp)
    ok = den > 0
    means = num[ok] / den[ok]
    alpha = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(means, [alpha, 1 - alpha])) if means.size else (None, None)
    return {"mean": mean, "low": low, "high": high, "n": len(rows), "identities": n_i, "prompts": n_p}


def paired_differences(
    rows: Any,
    metric: str,
    *,
    baseline: str = "baseline",
    prompt_set: str = "joint",
    samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Per config: mean of metric(config) − metric(baseline) over pairs with the same identity, prompt and seed.

    Pairs where either value is null (no face) are left out and counted (``unpaired``).
    The interval is :func:`bootstrap_mean_ci` over the differences.
    """
    rows = [r for r in _rows(rows) if r["metric"] == metric and in_set(r, prompt_set)]
    pair_key = ("model", "lora_scale", "ip_adapter_scale", "identity_id", "prompt_id", "seed")
    base = {tuple(r[k] for k in pair_key): r["value"] for r in rows if r["preset"] == baseline}
    diffs: dict[tuple, list[dict]] = {}
    unpaired: dict[tuple, int] = {}
    for r in rows:
        if r["preset"] == baseline:
            continue
        config = tuple(r[k] for k in CONFIG_KEYS)
        b = base.get(tuple(r[k] for k in pair_key))
        if b is None or r["value"] is None:
            unpaired[config] = unpaired.get(config, 0) + 1
            continue
        diffs.setdefault(config, []).append(
            {"identity_id": r["identity_id"], "prompt_id": r["prompt_id"], "value": float(r["value"]) - float(b)}
        )
    out = []
    for config in sorted(set(diffs) | set(unpaired), key=lambda c: tuple(str(v) for v in c)):
        ci = bootstrap_mean_ci(diffs.get(config, []), samples=samples, confidence=confidence, seed=seed)
        out.append({**dict(zip(CONFIG_KEYS, config)), "set": prompt_set, "metric": metric,
                    "mean_difference": ci["mean"], "low": ci["low"], "high": ci["high"], "pairs": ci["n"],
                    "unpaired": unpaired.get(config, 0)})
    return out


def config_intervals(
    rows: Any, metric: str, *, prompt_set: str = "joint", samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[dict]:
    """Bootstrap CI of a mean-aggregated metric per config (:func:`bootstrap_mean_ci`)."""
    rows = [r for r in _rows(rows) if r["metric"] == metric and in_set(r, prompt_set)]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in CONFIG_KEYS), []).append(r)
    return [{**dict(zip(CONFIG_KEYS, config)), "set": prompt_set, "metric": metric,
             **bootstrap_mean_ci(group, samples=samples, confidence=confidence, seed=seed)}
            for config, group in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0]))]


def pivot(table: Sequence[Mapping], metrics: Sequence[str], *, keys: Sequence[str] = ("set",) + CONFIG_KEYS,
          field: str = "value") -> list[dict]:
    """Long rows of :func:`aggregate` → one row per config with a column per metric."""
    out: dict[tuple, dict] = {}
    for r in table:
        if r["metric"] in metrics:
            row = out.setdefault(tuple(r[k] for k in keys), {k: r[k] for k in keys})
            row[r["metric"]] = r[field]
    return list(out.values())


__all__ = [
    "CONFIG_KEYS", "PROMPT_SETS", "aggregate", "bootstrap_mean_ci", "config_intervals", "lambda_curves",
    "metric_aggregations", "paired_differences", "pivot", "relative_change",
]

"""The paper's claims as verdicts on a run (issue 23).

Each claim of ``evaluation/data/paper_tables.yaml`` (``claims:``) names a table, its prompt set and
ip_adapter_scale, the presets, models and LoRA scales it speaks of, and per metric the side
(``up`` / ``down``) on which it puts the difference against the baseline. :func:`claim_verdicts`
checks it against the report's paired intervals, rows shaped like
:func:`evaluation.analysis.paired_differences` (``model, preset, lora_scale, ip_adapter_scale, set, metric,
mean_difference, low, high, pairs, unpaired``: metric(preset) − metric(baseline) on the same identity,
prompt and seed, with a two-way bootstrap interval). For FFC the paired difference is that of the
0/1 no-face indicator, i.e. the change in the face-fail rate. Per model, preset, LoRA scale and metric:

- **holds**: the interval lies entirely on the claimed side of zero;
- **contradicted**: it lies entirely on the other side;
- **undecided**: it overlaps zero, or the run has no pairs there (not run, or the metric not scored).

:func:`claim_rollup` combines them per claim × model × LoRA scale (and per claim): holds when every
cell holds, contradicted when any cell is contradicted, undecided otherwise. Every cell also says
whether the paper's own table points the claimed way (``paper_agrees``): the claims are the paper's
words, and its numbers do not back every one of them in every cell. Tiny-weight runs get verdicts
(they exercise the machinery) but are marked not comparable. Nothing here reads raw metric rows.
"""

from __future__ import annotations

import html
import math
from typing import Iterable, Mapping

from evaluation.paper import load_paper_tables, model_key

VERDICTS = ("holds", "contradicted", "undecided")


def interval_verdict(low: float | None, high: float | None, direction: str) -> str:
    """holds / contradicted / undecided for an interval of a difference and the claimed direction."""
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "undecided"
    sign = 1.0 if direction == "up" else -1.0
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0:
        return "holds"
    if hi < 0:
        return "contradicted"
    return "undecided"


def _published(tables: Mapping) -> dict[tuple, float]:
    out = {}
    for key, table in tables["tables"].items():
        for row in table["rows"]:
            for column, metric in table["columns"].items():
                if row.get(column) is not None:
                    out[(key, row["model"], row["preset"], float(row["lora_scale"]), metric)] = float(row[column])
    return out


def claim_verdicts(
    paired: Iterable[Mapping],
    tables: Mapping | None = None,
    *,
    baseline: str = "baseline",
    claims: Iterable[Mapping] | None = None,
) -> list[dict]:
    """One row per claim × model × preset × LoRA scale × metric: the run's paired difference, its interval and the verdict."""
    tables = load_paper_tables() if tables is None else tables
    claims = list(tables.get("claims", []) if claims is None else claims)
    published = _published(tables)
    index: dict[tuple, Mapping] = {}
    tiny: set[str] = set()
    for r in paired:
        key = (r["set"], round(float(r["ip_adapter_scale"]), 6), model_key(r["model"]), r["preset"],
               float(r["lora_scale"]), r["metric"])
        index[key] = r
        if r["model"].startswith("tiny-"):
            tiny.add(model_key(r["model"]))
    out = []
    for claim in claims:
        scale = round(float(claim["ip_adapter_scale"]), 6)
        for model in claim["models"]:
            for lora in (float(x) for x in claim["lora_scales"]):
                for preset in claim["presets"]:
                    for metric, direction in claim["directions"].items():
                        r = index.get((claim["set"], scale, model, preset, lora, metric))
                        low = r.get("low") if r else None
                        high = r.get("high") if r else None
                        verdict = interval_verdict(low, high, direction)
                        ours = published.get((claim["table"], model, preset, lora, metric))
                        base = published.get((claim["table"], model, baseline, lora, metric))
                        paper_difference = None if ours is None or base is None else ours - base
                        notes = []
                        if r is None:
                            notes.append("no pairs in this run (not run, or the metric not scored)")
                        elif not r.get("pairs"):
                            notes.append(f"no pairs ({r.get('unpaired', 0)} unpaired)")
                        elif verdict == "undecided":
                            notes.append("the interval overlaps zero")
                        if model in tiny or (r is None and tiny):
                            notes.append("tiny random weights: not evidence about the paper")
                        out.append({
                            "claim_id": claim["id"], "claim": claim["claim"], "table": claim["table"],
                            "set": claim["set"], "ip_adapter_scale": float(claim["ip_adapter_scale"]), "model": model,
                            "run_model": r["model"] if r else None, "preset": preset, "lora_scale": lora,
                            "metric": metric, "direction": direction,
                            "mean_difference": r.get("mean_difference") if r else None, "low": low, "high": high,
                            "pairs": r.get("pairs", 0) if r else 0, "verdict": verdict,
                            "comparable": model not in tiny and not (r is None and tiny),
                            "paper_difference": paper_difference,
                            "paper_agrees": None if paper_difference is None else
                            (paper_difference > 0 if direction == "up" else paper_difference < 0),
                            "note": "; ".join(notes),
                        })
    return out


def _combine(verdicts: list[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if "contradicted" in verdicts:
        return "contradicted"
    return "undecided"


def claim_rollup(verdicts: Iterable[Mapping]) -> list[dict]:
    """Per claim × model × LoRA scale: the verdict over its presets and metrics, with the cells' counts."""
    groups: dict[tuple, list[Mapping]] = {}
    for v in verdicts:
        groups.setdefault((v["claim_id"], v["model"], v["lora_scale"]), []).append(v)
    out = []
    for (claim_id, model, lora), cells in groups.items():
        counts = {k: sum(c["verdict"] == k for c in cells) for k in VERDICTS}
        detail = ", ".join(f"{c['preset']} {c['metric']} {c['verdict']}" for c in cells if c["verdict"] != "holds")
        out.append({"claim_id": claim_id, "model": model, "lora_scale": lora,
                    "verdict": _combine([c["verdict"] for c in cells]), **counts,
                    "comparable": all(c["comparable"] for c in cells), "not holding": detail})
    return out


def claim_summary(verdicts: Iterable[Mapping]) -> dict[str, dict]:
    """Per claim: its overall verdict and the count of cells per verdict (the evaluate summary's ``claims``)."""
    verdicts = list(verdicts)
    out: dict[str, dict] = {}
    for v in verdicts:
        entry = out.setdefault(v["claim_id"], {"claim": v["claim"], **{k: 0 for k in VERDICTS}, "_all": []})
        entry[v["verdict"]] += 1
        entry["_all"].append(v["verdict"])
    for entry in out.values():
        entry["verdict"] = _combine(entry.pop("_all"))
    return out


def claims_section(verdicts: list[dict], *, tiny: list[str]) -> tuple[str, str]:
    """HTML and markdown of "The paper's claims": the roll-up per claim × model × LoRA scale, then every cell."""
    from evaluation.html import fmt as _fmt, html_table as _html_table, table_markdown_simple

    intro = ("Each claim of the paper (evaluation/data/paper_tables.yaml, with its table), checked on this run with the "
             "paired difference against the baseline (same identity, prompt and seed; FFC: the change in the "
             "face-fail rate) on the claim's prompt set and λ, and its 95 % two-way bootstrap interval. holds: the "
             "interval lies entirely on the claimed side of zero; contradicted: entirely on the other side; "
             "undecided: it overlaps zero or the run has no pairs there. A claim × model × LoRA scale holds when "
             "all its cells do. 'paper agrees': the paper's own table points the claimed way in that cell.")
    warn = (f"This run used tiny random-weight models ({', '.join(tiny)}): these verdicts exercise the machinery and "
            "say nothing about the paper's claims." if tiny else "")
    summary = claim_summary(verdicts)
    overview = [{"claim_id": key, "claim": s["claim"], "verdict": s["verdict"], **{k: s[k] for k in VERDICTS}}
                for key, s in summary.items()]
    rollup = claim_rollup(verdicts)
    cells = [{k: v[k] for k in ("claim_id", "model", "preset", "lora_scale", "metric", "direction", "mean_difference",
                                 "low", "high", "pairs", "verdict", "paper_difference", "paper_agrees", "note")}
             for v in verdicts]
    rows_html = "".join(
        f"<tr class='{html.escape(c['verdict'])}'>" + "".join(f"<td>{html.escape(_fmt(c[k]))}</td>" for k in c) + "</tr>"
        for c in cells)
    cells_html = (f"<table class='claims'><tr>{''.join(f'<th>{html.escape(k)}</th>' for k in cells[0])}</tr>"
                  f"{rows_html}</table>" if cells else "<p>(no claims stored)</p>")
    html_doc = ("<section id='claims'><h2>The paper's claims</h2>"
                + (f"<p class='warn'>{html.escape(warn)}</p>" if warn else "")
                + f"<p>{html.escape(intro)}</p>" + _html_table(overview)
                + "<h3>Per model and LoRA scale</h3>" + _html_table(rollup)
                + "<h3>Every cell</h3>" + cells_html + "</section>")
    md = "\n\n".join(filter(None, [
        "## The paper's claims", f"**{warn}**" if warn else "", intro,
        table_markdown_simple(overview) if overview else "_no claims stored_",
        table_markdown_simple(rollup) if rollup else "",
    ]))
    return html_doc, md


__all__ = ["VERDICTS", "claim_rollup", "claim_summary", "claim_verdicts", "claims_section", "interval_verdict"]

"""Pareto fronts of identity (ID) against prompt following / quality (CLIP, AE, IR), as in the paper's Figs. 8, 19–21.

- :func:`pareto_front`: the indices of the non-dominated points (every objective maximised
  unless ``maximise`` says otherwise). A point is dominated when another is at least as good
  in every objective and better in one; equal points do not dominate each other, so
  duplicates on the front are all kept.
- :func:`front_panels`: rows of :func:`evaluation.analysis.aggregate` (``model, preset, lora_scale,
  ip_adapter_scale, metric, value``) → one panel per model × LoRA scale, one curve per preset
  traced by λ = ip_adapter_scale, each point flagged ``on_front`` (the front of the panel,
  over every preset and λ).
- :func:`plot_fronts`: those panels drawn (matplotlib), rows model × LoRA scale, columns the
  metrics on the x axis; non-dominated points filled and ringed, dominated ones hollow.

Pure functions of rows: the report and the app (``fastface app``) both draw from them.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable, Mapping, Sequence

FRONT_METRICS = ("clip", "ae", "ir")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def pareto_front(points: Sequence[Sequence[float]], maximise: Sequence[bool] | bool = True) -> list[int]:
    """Indices (ascending) of the points no other point dominates.

    ``points``: one sequence of objective values per point (all of the same length);
    ``maximise``: one flag per objective, or one for all. Points with a missing value (None,
    NaN) are never on the front and never dominate. Duplicates of a non-dominated point are
    all non-dominated. O(n²) comparisons: fronts are drawn over configurations, not images.
    """
    if not points:
        return []
    width = len(points[0])
    if any(len(p) != width for p in points):
        raise ValueError("pareto_front: every point needs the same number of objectives")
    flags = [maximise] * width if isinstance(maximise, bool) else list(maximise)
    if len(flags) != width:
        raise ValueError(f"pareto_front: maximise has {len(flags)} flags for {width} objectives")
    signed = [None if any(_missing(v) for v in p) else tuple(float(v) if up else -float(v) for v, up in zip(p, flags))
              for p in points]
    front = []
    for i, p in enumerate(signed):
        if p is None:
            continue
        dominated = any(q is not None and q != p and all(a >= b for a, b in zip(q, p)) for q in signed)
        if not dominated:
            front.append(i)
    return front


def front_panels(table: Iterable[Mapping], *, x: str, y: str = "id", prompt_set: str | None = None) -> dict[tuple, list[dict]]:
    """``(model, lora_scale) → [{preset, ip_adapter_scale, x, y, on_front}]`` sorted by preset then λ.

    ``table``: aggregated rows (one per config and metric, as :func:`evaluation.analysis.aggregate`
    gives; with ``prompt_set`` only rows of that ``set``). Configs lacking either metric are left out.
    """
    values: dict[tuple, dict] = {}
    for r in table:
        if r["metric"] not in (x, y) or (prompt_set is not None and r.get("set") != prompt_set):
            continue
        key = (r["model"], float(r["lora_scale"]), r["preset"], float(r["ip_adapter_scale"]))
        values.setdefault(key, {})["x" if r["metric"] == x else "y"] = r["value"]
    panels: dict[tuple, list[dict]] = {}
    for (model, lora, preset, scale), v in sorted(values.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if _missing(v.get("x")) or _missing(v.get("y")):
            continue
        panels.setdefault((model, lora), []).append({"preset": preset, "ip_adapter_scale": scale,
                                                     "x": float(v["x"]), "y": float(v["y"])})
    for points in panels.values():
        points.sort(key=lambda p: (p["preset"], p["ip_adapter_scale"]))
        front = set(pareto_front([(p["x"], p["y"]) for p in points]))
        for i, p in enumerate(points):
            p["on_front"] = i in front
    return panels


def plot_fronts(table: Sequence[Mapping], *, metrics: Sequence[str] = FRONT_METRICS, y: str = "id",
                prompt_set: str | None = None, title: str = "") -> bytes | None:
    """PNG of the fronts: a row per model × LoRA scale, a column per x metric, a curve per preset (λ on the points)."""
    panels = {m: front_panels(table, x=m, y=y, prompt_set=prompt_set) for m in metrics}
    metrics = [m for m in metrics if panels[m]]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({k for m in metrics for k in panels[m]}, key=lambda k: (k[0], -k[1]))
    presets = sorted({p["preset"] for m in metrics for pts in panels[m].values() for p in pts})
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(presets)}
    fig, axes = plt.subplots(len(rows), len(metrics), figsize=(4.6 * len(metrics), 3.6 * len(rows)), squeeze=False)
    for r, (model, lora) in enumerate(rows):
        for c, metric in enumerate(metrics):
            ax = axes[r][c]
            points = panels[metric].get((model, lora), [])
            for preset in presets:
                curve = [p for p in points if p["preset"] == preset]
                if not curve:
                    continue
                colour = colours[preset]
                ax.plot([p["x"] for p in curve], [p["y"] for p in curve], "-", color=colour, lw=1.2, label=preset)
                front = [p for p in curve if p["on_front"]]
                behind = [p for p in curve if not p["on_front"]]
                if front:  # one artist per kind of point (an artist per point tripled the drawing time)
                    ax.scatter([p["x"] for p in front], [p["y"] for p in front], s=46, color=colour,
                               edgecolors="black", linewidths=1.4, zorder=3)
                if behind:
                    ax.scatter([p["x"] for p in behind], [p["y"] for p in behind], s=30, facecolors="white",
                               edgecolors=colour, linewidths=1.2, zorder=3)
                for p in curve:
                    ax.annotate(f"{p['ip_adapter_scale']:g}", (p["x"], p["y"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            ax.set_xlabel(metric.upper())
            ax.set_ylabel(y.upper())
            ax.set_title(f"{model} · LoRA {lora:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if points:
                ax.legend(fontsize=7, loc="lower right")
    fig.suptitle((title + " — " if title else "") + "filled, ringed: non-dominated; hollow: dominated; labels: λ",
                 fontsize=10)
    # Fixed margins in inches (the panels have a fixed size): tight_layout drew the whole figure once more.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.95 / height,
                        wspace=0.3, hspace=0.45)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def report_section(tables: Mapping[str, Sequence[Mapping]]) -> tuple[str, dict[str, bytes]]:
    """The report's "Pareto fronts" section: ``{prompt_set: aggregated rows}`` → (HTML, ``{set: PNG}``)."""
    import base64
    import html

    pngs = {s: png for s, rows in tables.items() if (png := plot_fronts(rows, prompt_set=s, title=f"{s} prompts"))}
    parts = ["<section id='pareto-fronts'><h2>Pareto fronts: ID against CLIP / AE / IR</h2>",
             "<p>Per model × LoRA scale (rows) and metric (columns), one curve per preset traced by λ = "
             "ip_adapter_scale (labels), as the paper's Figs. 8 and 19–21. Filled, ringed points are "
             "non-dominated over every preset and λ of the panel; hollow ones are dominated.</p>"]
    for prompt_set, png in pngs.items():
        parts.append(f"<h3>{html.escape(prompt_set)}</h3><img alt='pareto {html.escape(prompt_set)}' "
                     f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    if not pngs:
        parts.append("<p>(needs ID and CLIP/AE/IR scores with a face found)</p>")
    parts.append("</section>")
    return "".join(parts), pngs


__all__ = ["FRONT_METRICS", "front_panels", "pareto_front", "plot_fronts", "report_section"]

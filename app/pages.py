"""HTML of the app's tabs (server-rendered, no JavaScript framework): Explore, Compare, Generate, Report.

Fronts are inline SVG drawn from :func:`evaluation.pareto.front_panels`: one panel per model ×
LoRA scale, one polyline per preset traced by λ, each point a link to its configuration's
gallery (filled and ringed: non-dominated; hollow: dominated; the label is λ).
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any, Mapping, Sequence
from urllib.parse import urlencode

from evaluation.pareto import front_panels

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
TABS = (("explore", "Explore"), ("compare", "Compare"), ("generate", "Generate"), ("report", "Report"))
STYLE = """
body{font-family:sans-serif;margin:0;color:#222} nav{background:#234;padding:6px 12px}
nav a{color:#fff;margin-right:18px;text-decoration:none;font-weight:bold} nav a.on{border-bottom:3px solid #fc3}
main{padding:12px 16px} form.filters{background:#f4f4f4;padding:8px;margin-bottom:10px} form.filters label{margin-right:12px}
.msg{background:#fee;border:1px solid #c00;padding:10px;margin:10px 0;font-weight:bold}
.panels{display:flex;flex-wrap:wrap;gap:10px} .panel{border:1px solid #ccc;padding:4px}
.cards{display:flex;flex-wrap:wrap;gap:8px} .card{border:1px solid #ccc;padding:4px;font-size:11px;width:150px}
.card img{width:144px;height:144px;image-rendering:pixelated;display:block} table.metrics td{padding:0 4px}
.legend span{margin-right:12px;font-size:12px} circle.front-point{cursor:pointer}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def link(path: str, **params: Any) -> str:
    return path + "?" + urlencode({k: v for k, v in params.items() if v not in (None, "")}, doseq=True)


def page(tab: str, body: str, *, run: str = "", message: str = "") -> str:
    nav = "".join(f"<a id='tab-{name}' class='{'on' if name == tab else ''}' href='{esc(link('/' + name, run=run))}'>"
                  f"{label}</a>" for name, label in TABS)
    note = f"<p class='msg' id='message'>{esc(message)}</p>" if message else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>FastFace · {esc(tab)}</title>"
            f"<style>{STYLE}</style></head><body><nav>{nav}</nav><main id='{esc(tab)}'>{note}{body}</main></body></html>")


def select(name: str, values: Sequence[Any], chosen: Any, *, blank: str | None = None) -> str:
    options = [f"<option value=''>{esc(blank)}</option>"] if blank is not None else []
    options += [f"<option value='{esc(v)}'{' selected' if str(v) == str(chosen) else ''}>{esc(v)}</option>" for v in values]
    return f"<select name='{esc(name)}' id='sel-{esc(name)}'>{''.join(options)}</select>"


def checkboxes(name: str, values: Sequence[Any], chosen: Sequence[Any]) -> str:
    return "".join(f"<label><input type='checkbox' name='{esc(name)}' value='{esc(v)}'"
                   f"{' checked' if v in chosen else ''}>{esc(v)}</label>" for v in values)


# -- fronts as SVG ----------------------------------------------------------------------------
def front_svg(points: list[dict], *, x_label: str, colours: Mapping[str, str], href) -> str:
    """One panel: axes, a polyline per preset, a clickable circle per point (data-* attributes for tests)."""
    w, h, pad = 380, 260, 40
    xs, ys = [p["x"] for p in points], [p["y"] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    dx, dy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    x0, x1, y0, y1 = x0 - 0.08 * dx, x1 + 0.08 * dx, y0 - 0.08 * dy, y1 + 0.08 * dy

    def sx(v: float) -> float:
        return pad + (v - x0) / (x1 - x0) * (w - pad - 10)

    def sy(v: float) -> float:
        return h - pad - (v - y0) / (y1 - y0) * (h - pad - 10)

    parts = [f"<svg width='{w}' height='{h}' xmlns='http://www.w3.org/2000/svg' font-size='10'>",
             f"<line x1='{pad}' y1='{h - pad}' x2='{w - 10}' y2='{h - pad}' stroke='#444'/>",
             f"<line x1='{pad}' y1='10' x2='{pad}' y2='{h - pad}' stroke='#444'/>",
             f"<text x='{w / 2}' y='{h - 8}' text-anchor='middle'>{esc(x_label.upper())}</text>",
             f"<text x='12' y='{h / 2}' transform='rotate(-90 12 {h / 2})' text-anchor='middle'>ID</text>",
             f"<text x='{pad}' y='{h - pad + 12}'>{x0:.3g}</text><text x='{w - 40}' y='{h - pad + 12}'>{x1:.3g}</text>",
             f"<text x='2' y='{h - pad}'>{y0:.3g}</text><text x='2' y='16'>{y1:.3g}</text>"]
    for preset in sorted({p["preset"] for p in points}):
        curve = [p for p in points if p["preset"] == preset]
        colour = colours[preset]
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='"
                     + " ".join(f"{sx(p['x']):.1f},{sy(p['y']):.1f}" for p in curve) + "'/>")
        for p in curve:
            fill, stroke, width = (colour, "#000", 2) if p["on_front"] else ("#fff", colour, 1.5)
            title = (f"{preset} λ={p['ip_adapter_scale']:g}: ID {p['y']:.3f}, {x_label.upper()} {p['x']:.3f}"
                     + (" (non-dominated)" if p["on_front"] else " (dominated)"))
            parts.append(f"<a href='{esc(href(p))}'><circle class='front-point{' on-front' if p['on_front'] else ''}' "
                         f"data-preset='{esc(preset)}' data-lambda='{p['ip_adapter_scale']:g}' "
                         f"cx='{sx(p['x']):.1f}' cy='{sy(p['y']):.1f}' r='6' fill='{fill}' stroke='{stroke}' "
                         f"stroke-width='{width}'><title>{esc(title)}</title></circle></a>"
                         f"<text x='{sx(p['x']) + 7:.1f}' y='{sy(p['y']) - 6:.1f}'>{p['ip_adapter_scale']:g}</text>")
    parts.append("</svg>")
    return "".join(parts)


def fronts_html(rows: list[dict], *, x_metric: str, href) -> str:
    panels = front_panels(rows, x=x_metric)
    if not panels:
        return ("<p class='msg' id='message'>No front to draw: this selection has no configuration with both ID and "
                f"{esc(x_metric.upper())} (ID is undefined where no face was found).</p>")
    presets = sorted({p["preset"] for pts in panels.values() for p in pts})
    colours = {p: COLOURS[i % len(COLOURS)] for i, p in enumerate(presets)}
    legend = "<p class='legend'>" + "".join(f"<span style='color:{colours[p]}'>● {esc(p)}</span>" for p in presets) + \
        "<span>filled, ringed: non-dominated · hollow: dominated · labels: λ · click a point for its images</span></p>"
    cells = []
    for (model, lora), points in sorted(panels.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        cells.append(f"<div class='panel'><b>{esc(model)} · LoRA {lora:g}</b><br>"
                     + front_svg(points, x_label=x_metric, colours=colours,
                                 href=lambda p, m=model, lo=lora: href(m, p["preset"], lo, p["ip_adapter_scale"]))
                     + "</div>")
    return legend + "<div class='panels' id='fronts'>" + "".join(cells) + "</div>"


# -- images -----------------------------------------------------------------------------------
def card(example: Mapping, *, run: str, caption: str) -> str:
    metrics = example.get("metrics") or {}
    rows = "".join(f"<tr><td>{esc(m.upper())}</td><td>{fmt(v)}</td></tr>" for m, v in sorted(metrics.items()))
    if example.get("status") == "ok":
        image = (f"<img class='result' alt='{esc(example['example_id'])}' "
                 f"src='{esc(link('/image', run=run, example=example['example_id']))}'>")
    else:
        image = f"<p>no image ({esc(example.get('status') or 'not generated')}{': ' + esc(example.get('error')) if example.get('error') else ''})</p>"
    return (f"<div class='card' data-preset='{esc(example.get('preset'))}' data-identity='{esc(example.get('identity_id'))}'>"
            f"{image}<div>{caption}</div><table class='metrics'>{rows}</table></div>")


def png_card(preset: str, png: bytes) -> str:
    return (f"<div class='card' data-preset='{esc(preset)}'><img class='generated' alt='{esc(preset)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'><div><b>{esc(preset)}</b></div></div>")


def photo_card(photo: bytes, size: int = 144) -> str:
    """The identity photo a generation used (a PNG thumbnail, whatever format was uploaded)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(photo)) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return (f"<div class='card'><img class='input-photo' alt='identity photo' style='object-fit:contain' "
            f"src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'><div><b>identity photo</b></div></div>")


__all__ = ["card", "photo_card", "checkboxes", "esc", "fmt", "fronts_html", "link", "page", "png_card", "select"]

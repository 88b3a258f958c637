"""The paper's ablations in the report (issue 23): one section per figure a run contains, and the failure gallery.

- Fig. 3 (DCG scheduling regimes), Fig. 15 (DCG variants × α/β grid), Fig. 16 (AM1's scale and power
  apart): the presets of :data:`fastface.presets.ABLATION_PRESETS`, run by ``configs/ablations/*.yaml``.
  A section appears when the run holds a preset only that figure uses; it shows the figure's grid of
  images (per model: identities × the figure's presets, one prompt of the figure's set, the largest
  LoRA scale, the report's λ) and its metric table (rows of the report's main table for those presets).
- Fig. 17 (failure cases), for every run: per configuration at the report's λ, the images where no face
  was found and those with the lowest ID, with their prompts.

Images are read with bounded SQL: each query returns at most what is displayed (a few identities × the
figure's presets; per configuration the k lowest IDs and k faceless images, ``QUALIFY row_number() … <= k``).
Nothing here turns a stored table into Python rows.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fastface.presets import ABLATION_PRESETS, FIG15_ALPHAS, FIG15_BETAS, FIG15_VARIANTS, fig15_preset_name
from storage import Catalog, Store

SCALE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Ablation:
    key: str
    figure: str
    title: str
    prompt_set: str  # which prompts the figure shows (realistic | stylistic)
    presets: tuple[str, ...]  # in the figure's order
    markers: tuple[str, ...]  # presets only this figure uses: the run holds the figure when it holds one
    paper: str  # what the paper showed (its caption, as method-spec and the issue restate it; no numbers)


ABLATIONS: dict[str, Ablation] = {a.key: a for a in (
    Ablation("fig3", "Fig. 3", "DCG scheduling regimes", "stylistic", ABLATION_PRESETS["fig3"],
             tuple(p for p in ABLATION_PRESETS["fig3"] if p != "dcg"),
             "Guiding the first or the last of the 4 steps alters the image (composition, identity); the `dcg` "
             "preset guides only the intermediate steps."),
    Ablation("fig15", "Fig. 15", "DCG variants × α/β grid", "stylistic", ABLATION_PRESETS["fig15"],
             ABLATION_PRESETS["fig15"],
             "The three decompositions of DCG (id: Eq. 5/17, text: Eq. 16, independent: Eq. 18) over a grid of "
             "α (identity/text branch) and β weights: how each trades identity for prompt and style."),
    Ablation("fig16", "Fig. 16", "AM1 components: scale only, power only, both", "realistic",
             ABLATION_PRESETS["fig16"], ("am1-scale-only", "am1-power-only"),
             "AM1 = scale ∘ power (Eq. 8): the scale s and the power p apart and together; the figure argues "
             "that both are needed."),
)}


def present_ablations(run_presets: Sequence[str]) -> list[Ablation]:
    """The figures whose distinguishing presets the run holds."""
    have = set(run_presets)
    return [a for a in ABLATIONS.values() if have & set(a.markers)]


def _in(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


def _label(preset: str) -> str:
    for v in FIG15_VARIANTS:
        for a in FIG15_ALPHAS:
            for b in FIG15_BETAS:
                if preset == fig15_preset_name(v, a, b):
                    return f"{v}<br>α={a:g} β={b:g}"
    return html.escape(preset)


def ablation_table(table: Sequence[Mapping], ablation: Ablation, *, baseline: str) -> list[dict]:
    """Rows of the report's main table (one per set × model × preset × lora) for the figure's presets and the baseline,
    on the figure's prompt set, in the figure's order."""
    order = {p: i for i, p in enumerate((baseline, *ablation.presets))}
    rows = [dict(r) for r in table if r["preset"] in order and r["set"] == ablation.prompt_set]
    return sorted(rows, key=lambda r: (r["model"], -float(r["lora_scale"]), order[r["preset"]]))


def ablation_images(catalog: Catalog, store: Store, run_id: str, ablation: Ablation, *, scale: float, baseline: str,
                    identities: int = 2) -> list[dict]:
    """Per model: the figure's grid (identities × presets) for one prompt of its set; bounded point queries."""
    from fastface.prompt_sets import PROMPT_SETS

    presets = [baseline, *ablation.presets]
    kinds = list(PROMPT_SETS[ablation.prompt_set])
    out = []
    models = catalog.rows(
        f"SELECT model, max(lora_scale) AS lora FROM examples WHERE run_id = ? AND preset IN ({_in(presets)}) "
        f"AND prompt_kind IN ({_in(kinds)}) AND abs(ip_adapter_scale - ?) < {SCALE_TOLERANCE} GROUP BY model ORDER BY model",
        [run_id, *presets, *kinds, scale])
    for m in models:
        prompt = catalog.rows(
            f"SELECT prompt_id, any_value(prompt) AS prompt FROM examples WHERE run_id = ? AND model = ? "
            f"AND prompt_kind IN ({_in(kinds)}) AND preset IN ({_in(presets)}) GROUP BY prompt_id ORDER BY prompt_id LIMIT 1",
            [run_id, m["model"], *kinds, *presets])[0]
        people = [r["identity_id"] for r in catalog.rows(
            "SELECT DISTINCT identity_id FROM examples WHERE run_id = ? AND model = ? AND prompt_id = ? "
            "ORDER BY identity_id LIMIT ?", [run_id, m["model"], prompt["prompt_id"], identities])]
        cells = catalog.rows(
            "SELECT e.identity_id, e.preset, g.image_uri FROM examples e JOIN generations g "
            "ON e.example_id = g.example_id AND e.run_id = g.run_id "
            f"WHERE e.run_id = ? AND e.model = ? AND e.prompt_id = ? AND e.identity_id IN ({_in(people)}) "
            f"AND e.preset IN ({_in(presets)}) AND e.lora_scale = ? AND abs(e.ip_adapter_scale - ?) < {SCALE_TOLERANCE} "
            "AND g.status = 'ok'",
            [run_id, m["model"], prompt["prompt_id"], *people, *presets, m["lora"], scale]) if people else []
        out.append({"model": m["model"], "lora_scale": m["lora"], "prompt": prompt["prompt"], "identities": people,
                    "presets": [p for p in presets if any(c["preset"] == p for c in cells)],
                    "cells": {(c["identity_id"], c["preset"]): c["image_uri"] for c in cells}})
    return out


def _grid_html(store: Store, grid: Mapping) -> str:
    from evaluation.html import thumbnail_b64

    head = "".join(f"<th>{_label(p)}</th>" for p in grid["presets"])
    body = []
    for person in grid["identities"]:
        tds = [f"<td>{html.escape(person)}</td>"]
        for p in grid["presets"]:
            uri = grid["cells"].get((person, p))
            tds.append(f"<td><img src='data:image/png;base64,{thumbnail_b64(store.read_bytes(uri))}'></td>"
                       if uri else "<td>–</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f"<h4>{html.escape(grid['model'])}: “{html.escape(grid['prompt'])}” (lora {grid['lora_scale']:g})</h4>"
            f"<table class='grid'><tr><th>identity</th>{head}</tr>{''.join(body)}</table>")


def ablation_sections(catalog: Catalog, store: Store, run_id: str, run_presets: Sequence[str], table: Sequence[Mapping],
                      *, scale: float, baseline: str, identities: int = 2) -> tuple[str, str, dict[str, list[dict]]]:
    """HTML and markdown of each figure the run holds, and its metric table rows per figure."""
    from evaluation.html import html_table as _html_table, table_markdown_simple

    html_parts, md_parts, tables = [], [], {}
    for a in present_ablations(run_presets):
        rows = ablation_table(table, a, baseline=baseline)
        tables[a.key] = rows
        grids = ablation_images(catalog, store, run_id, a, scale=scale, baseline=baseline, identities=identities)
        missing = [p for p in a.presets if p not in run_presets]
        note = f"Not in this run: {', '.join(missing)}." if missing else ""
        html_parts.append(
            f"<section class='ablation' id='ablation-{a.key}'><h2>{a.figure}: {html.escape(a.title)} (λ = {scale:g})</h2>"
            f"<p>{html.escape(a.paper)}</p>" + (f"<p>{html.escape(note)}</p>" if note else "")
            + "".join(_grid_html(store, g) for g in grids) + (_html_table(rows) if rows else "<p>(no scored rows)</p>")
            + "</section>")
        md_parts.append("\n\n".join(filter(None, [f"## {a.figure}: {a.title} (λ = {scale:g})", a.paper, note,
                                                  table_markdown_simple(rows) if rows else "_no scored rows_"])))
    return "".join(html_parts), "\n\n".join(md_parts), tables


def failure_cases(catalog: Catalog, run_id: str, *, scale: float, k: int = 3) -> list[dict]:
    """Per configuration (model, preset, lora_scale) at λ = ``scale``: up to ``k`` images with no face (ID NULL,
    not an error) and the ``k`` with the lowest ID, with their prompts and how many images each kind has.

    One query; its result is bounded by configurations × 2k rows."""
    return catalog.rows(
        "SELECT e.model, e.preset, e.lora_scale, e.identity_id, e.prompt, e.example_id, g.image_uri, m.value AS id, "
        "CASE WHEN m.value IS NULL THEN 'no face' ELSE 'lowest ID' END AS kind, "
        "count(*) OVER w AS of_kind, row_number() OVER (w ORDER BY m.value NULLS LAST, e.example_id) AS rank "
        "FROM metrics m JOIN examples e ON m.example_id = e.example_id AND m.run_id = e.run_id "
        "JOIN generations g ON g.example_id = e.example_id AND g.run_id = e.run_id "
        f"WHERE m.run_id = ? AND m.metric = 'id' AND m.error IS NULL AND g.status = 'ok' "
        f"AND abs(e.ip_adapter_scale - ?) < {SCALE_TOLERANCE} "
        "WINDOW w AS (PARTITION BY e.model, e.preset, e.lora_scale, m.value IS NULL) "
        "QUALIFY rank <= ? ORDER BY e.model, e.preset, e.lora_scale DESC, kind DESC, rank",
        [run_id, scale, k])


def failure_gallery(catalog: Catalog, store: Store, run_id: str, *, scale: float, k: int = 3) -> tuple[str, str, list[dict]]:
    """HTML and markdown of Fig. 17's failure cases for every configuration at λ = ``scale``."""
    from evaluation.html import fmt as _fmt, table_markdown_simple, thumbnail_b64

    cases = failure_cases(catalog, run_id, scale=scale, k=k)
    configs: dict[tuple, list[dict]] = {}
    for c in cases:
        configs.setdefault((c["model"], c["preset"], c["lora_scale"]), []).append(c)
    parts = []
    for (model, preset, lora), found in configs.items():
        cells = "".join(
            f"<td><img src='data:image/png;base64,{thumbnail_b64(store.read_bytes(c['image_uri']))}'>"
            f"<br>{html.escape(c['kind'])}{'' if c['id'] is None else ' ' + _fmt(c['id'])}<br>"
            f"{html.escape(c['identity_id'])}: “{html.escape(c['prompt'])}”</td>" for c in found)
        counts = {c["kind"]: c["of_kind"] for c in found}
        parts.append(f"<h4>{html.escape(model)} · {html.escape(preset)} · lora {lora:g} — "
                     f"{counts.get('no face', 0)} images without a face</h4><table class='grid'><tr>{cells}</tr></table>")
    intro = (f"Per configuration at λ = {scale:g}: up to {k} images where no face was found (ID undefined, counted "
             f"in FFC) and the {k} with the lowest ID, each with its identity and prompt (the paper's Fig. 17 shows "
             "such failure cases).")
    html_doc = (f"<section id='failures'><h2>Fig. 17: failure cases (λ = {scale:g})</h2><p>{html.escape(intro)}</p>"
                + ("".join(parts) or "<p>(needs the id metric)</p>") + "</section>")
    shown = []
    for (model, preset, lora), found in configs.items():
        lowest = next((c for c in found if c["kind"] == "lowest ID"), None)
        shown.append({"model": model, "preset": preset, "lora_scale": lora,
                      "no face": next((c["of_kind"] for c in found if c["kind"] == "no face"), 0),
                      "lowest ID": None if lowest is None else lowest["id"],
                      "its prompt": None if lowest is None else lowest["prompt"]})
    md = "\n\n".join([f"## Fig. 17: failure cases (λ = {scale:g})", intro,
                      table_markdown_simple(shown) if shown else "_needs the id metric_"])
    return html_doc, md, cases


__all__ = ["ABLATIONS", "Ablation", "ablation_images", "ablation_sections", "ablation_table", "failure_cases",
           "failure_gallery", "present_ablations"]

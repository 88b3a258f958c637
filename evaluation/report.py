"""The report: the paper's tables, λ-curves, bootstrap intervals, paired differences, image grids, calibration.

:func:`build_report` reads the store through the DuckDB catalog: the aggregates, bootstrap cells
and paired differences come from SQL (:class:`evaluation.report_data.StoreData`, the same numbers as the
pure-Python reference :mod:`evaluation.analysis`), the image grids and identity photos from point queries
bounded by what is shown, so no metric row of the run becomes a Python row. It writes under
``<root>/reports/<run>/``: ``report.html`` (tables, plots and image grids embedded as base64),
``summary.md``, ``table.csv``, ``paired.csv``, ``paper.csv`` (every published value beside this run:
:mod:`evaluation.paper`), ``claims.csv`` (the paper's claims as verdicts: :mod:`evaluation.claims`),
``calibration.csv`` (when calibration ran), ``lambda_<set>_<metric>.png``, ``pareto_<set>.png``
(:mod:`evaluation.pareto`), ``fig18.png`` (with the id and face_size metrics) and
``attention_maps.png`` (when a grid is passed in); the paper's ablation figures a run holds and the
failure gallery come from :mod:`evaluation.ablations`. The Prefect flow ``report`` wraps it and publishes the tables and the
summary as artifacts.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from fastface.presets import table_ip_adapter_scale
from evaluation import ablations, analysis, claims, paper, pareto
from evaluation.html import fmt as _fmt, html_table as _html_table, table_markdown_simple, thumbnail_b64
from evaluation.report_data import StoreData, report_data
from storage import Catalog, Store

CURVE_METRICS = ("clip", "ae", "ir")
TABLE_METRICS = ("id", "clip", "ae", "ir", "fsc", "face_size", "ffc")


# -- reading --------------------------------------------------------------------------------------
def metric_rows(catalog: Catalog, run_id: str) -> list[dict]:
    """``metrics`` ⋈ ``examples`` of one run as Python rows: the input of :mod:`evaluation.analysis` (errored rows left
    out). For tests and small runs only: :func:`build_report` reads :class:`evaluation.report_data.StoreData` instead."""
    return catalog.rows(
        "SELECT m.example_id, e.identity_id, e.prompt_id, e.prompt_kind, e.model, e.preset, e.lora_scale, "
        "e.ip_adapter_scale, e.seed, m.metric, m.value "
        "FROM metrics m JOIN examples e ON m.example_id = e.example_id AND m.run_id = e.run_id "
        "WHERE m.run_id = ? AND m.error IS NULL",
        [run_id],
    )


def run_metric_modes(catalog: Catalog, run_id: str) -> dict | None:
    """The ``metrics`` section of the run's stored config (its metric modes), None when no config was recorded."""
    try:
        found = catalog.rows("SELECT config FROM runs WHERE run_id = ?", [run_id])
    except Exception:  # no runs table (scores written without a flow)
        return None
    for row in found:
        config = json.loads(row["config"]) if isinstance(row["config"], str) else row["config"]
        if config and "metrics" in config:
            return dict(config["metrics"])
    return None


def run_ids(catalog: Catalog) -> list[str]:
    return [r["run_id"] for r in catalog.rows("SELECT DISTINCT run_id FROM examples ORDER BY run_id")]


# -- formatting -----------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def main_table(rows: Any, *, scale: float, baseline: str, metrics: Sequence[str], boot: dict) -> list[dict]:
    """Per set and (model, preset, lora_scale) at ``scale``: values, ID CI, change vs baseline, paired ΔID.

    ``rows``: analysis rows, or a :mod:`evaluation.report_data` source (the report's SQL aggregates)."""
    out = []
    data = report_data(rows)
    for prompt_set in analysis.PROMPT_SETS:
        table = analysis.relative_change(data.aggregate(prompt_set=prompt_set, scale=scale), baseline=baseline)
        if not table:
            continue
        ci = {(r["model"], r["preset"], r["lora_scale"]): r
              for r in data.config_intervals("id", prompt_set=prompt_set, scale=scale, **boot)}
        paired = {(r["model"], r["preset"], r["lora_scale"]): r
                  for r in data.paired_differences("id", baseline=baseline, prompt_set=prompt_set, scale=scale, **boot)}
        configs: dict[tuple, dict] = {}
        for r in table:
            key = (r["model"], r["preset"], r["lora_scale"])
            row = configs.setdefault(key, {"set": prompt_set, "model": key[0], "preset": key[1], "lora_scale": key[2],
                                           "ip_adapter_scale": scale})
            if r["metric"] in metrics:
                row[r["metric"]] = r["value"]
                row[f"{r['metric']}_change"] = r["relative_change"]
                if r["metric"] == "id":
                    row["id_no_face"] = r["missing"]
        for key, row in configs.items():
            c = ci.get(key, {})
            row["id_low"], row["id_high"] = c.get("low"), c.get("high")
            p = paired.get(key)
            row["id_paired_diff"] = p["mean_difference"] if p else None
            row["id_paired_low"] = p["low"] if p else None
            row["id_paired_high"] = p["high"] if p else None
            out.append(row)
    order = {baseline: 0}
    return sorted(out, key=lambda r: (list(analysis.PROMPT_SETS).index(r["set"]), r["model"], r["lora_scale"] * -1,
                                      order.get(r["preset"], 1), r["preset"]))


def table_markdown(table: list[dict], metrics: Sequence[str], baseline: str) -> str:
    headers = ["set", "model", "preset", "lora"] + [m.upper() for m in metrics] + [f"Δ vs {baseline}", "paired ΔID [CI]"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in table:
        cells = [r["set"], r["model"], r["preset"], _fmt(r["lora_scale"], 2)]
        for m in metrics:
            value = _fmt(r.get(m), 0 if m == "ffc" else 3)
            if m == "id" and r.get("id_low") is not None:
                value += f" [{_fmt(r['id_low'])}, {_fmt(r['id_high'])}]"
            cells.append(value)
        changes = ", ".join(f"{m.upper()} {_pct(r.get(f'{m}_change'))}" for m in metrics
                            if r["preset"] != baseline and r.get(f"{m}_change") is not None)
        cells.append(changes or "–")
        cells.append("–" if r.get("id_paired_diff") is None else
                     f"{r['id_paired_diff']:+.3f} [{r['id_paired_low']:+.3f}, {r['id_paired_high']:+.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------
def plot_lambda_curves(rows: Any, prompt_set: str, y_metric: str) -> bytes | None:
    """PNG of ID against ``y_metric`` traced by ip_adapter_scale, one panel per model, one line per preset × lora.

    ``rows``: analysis rows or a :mod:`evaluation.report_data` source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report_data(rows).aggregate(prompt_set=prompt_set)
    curves = analysis.lambda_curves(table, x="id", y=y_metric)
    id_defined = bool(curves)
    if not id_defined:
        # ID is NULL for every image (no face found, e.g. tiny models' noise): plot the metric against λ,
        # so the plot still shows what was measured, and say why.
        curves = {k: [{"ip_adapter_scale": p["ip_adapter_scale"], "x": p["ip_adapter_scale"], "y": p["y"]}
                      for p in pts]
                  for k, pts in _metric_by_scale(table, y_metric).items()}
    if not curves:
        return None
    models = sorted({k[0] for k in curves})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for (m, preset, lora, _), points in sorted(curves.items(), key=lambda kv: tuple(map(str, kv[0]))):
            if m != model:
                continue
            xs, ys = [p["y"] for p in points], [p["x"] for p in points]
            if not id_defined:
                xs, ys = ys, [p["y"] for p in points]
            ax.plot(xs, ys, marker="o", label=f"{preset} (lora {lora:g})")
            for x, y, p in zip(xs, ys, points):
                ax.annotate(f"{p['ip_adapter_scale']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if id_defined:
            ax.set_xlabel(y_metric.upper())
            ax.set_ylabel("ID")
            ax.set_title(f"{model} — {prompt_set} (labels: λ)")
        else:
            ax.set_xlabel("ip_adapter_scale λ")
            ax.set_ylabel(y_metric.upper())
            ax.set_title(f"{model} — {prompt_set}: ID undefined (no faces)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")  # "best" scans every point: slow on dense curves
    # Fixed margins in inches (panels of a fixed size): tight_layout drew the whole figure once more.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.4 / height,
                        wspace=0.25)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _metric_by_scale(table: Sequence[dict], metric: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in table:
        if r["metric"] == metric and r["value"] is not None:
            out.setdefault((r["model"], r["preset"], r["lora_scale"], r["set"]), []).append(
                {"ip_adapter_scale": float(r["ip_adapter_scale"]), "y": r["value"]})
    return {k: sorted(v, key=lambda p: p["ip_adapter_scale"]) for k, v in out.items()}


def face_size_bins(rows: Any, *, bins: int = 6, pairs: Mapping[tuple, np.ndarray] | None = None) -> list[dict]:
    """Mean ID per face-size bin (equal-count bins over all images with both values), per model × preset × lora.

    The paper's Fig. 18 (right): identity similarity rises with the face's share of the image, so a
    preset that changes face size changes ID for that reason alone. ``pairs``: ``(model, preset, lora)
    → [n, 2]`` arrays of (face size, ID), as :meth:`evaluation.report_data.StoreData.fig18` gives them
    (then ``rows`` is not read).
    """
    if pairs is None:
        pairs = report_data(rows).fig18(None)["pairs"]
    pairs = {k: v for k, v in pairs.items() if len(v)}
    if not pairs:
        return []
    everything = np.sort(np.concatenate([v[:, 0] for v in pairs.values()]))
    edges = np.unique(np.quantile(everything, np.linspace(0, 1, bins + 1)))
    out = []
    for key, ps in sorted(pairs.items(), key=lambda kv: tuple(map(str, kv[0]))):
        sizes, sims = ps[:, 0], ps[:, 1]
        which = np.clip(np.searchsorted(edges, sizes, side="right") - 1, 0, max(len(edges) - 2, 0))
        for b in range(max(len(edges) - 1, 1)):
            mask = which == b
            if mask.any():
                out.append({"model": key[0], "preset": key[1], "lora_scale": key[2], "bin": b,
                            "face_size_low": float(edges[b]), "face_size_high": float(edges[min(b + 1, len(edges) - 1)]),
                            "face_size_mean": float(sizes[mask].mean()), "id_mean": float(sims[mask].mean()),
                            "n": int(mask.sum())})
    return out


SCATTER_POINTS = 2000  # per box of Fig. 18: the boxes use every value, the jittered dots a sample of this many


def plot_fig18(rows: Any, *, scale: float, data: Mapping | None = None) -> bytes | None:
    """The paper's Fig. 18 at one λ: distributions of ID and face size per model × preset, and ID binned by face size.

    ``data``: :meth:`evaluation.report_data.StoreData.fig18` at ``scale`` (then ``rows`` is not read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = report_data(rows).fig18(scale) if data is None else data
    ids, sizes = data["id"], data["face_size"]
    if not ids and not sizes:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for ax, values, name in ((axes[0], ids, "ID similarity"), (axes[1], sizes, "face size (box area / image area)")):
        keys = sorted(values, key=lambda k: tuple(map(str, k)))
        present = [values[k][~np.isnan(values[k])] for k in keys]
        labels = [f"{m}\n{p} (lora {lo:g})" for m, p, lo in keys]
        missing = sum(len(values[k]) for k in keys) - sum(map(len, present))
        if any(p.size for p in present):
            parts = [p if p.size else [np.nan] for p in present]
            ax.boxplot(parts, showfliers=True)
            for i, p in enumerate(present, start=1):
                if p.size:
                    rng = np.random.default_rng(i)
                    if p.size > SCATTER_POINTS:
                        p = rng.choice(p, SCATTER_POINTS, replace=False)
                    jitter = rng.uniform(-0.15, 0.15, len(p))
                    ax.scatter(i + jitter, p, s=6, alpha=0.4)
            ax.set_xticks(range(1, len(keys) + 1), labels, fontsize=7)
        else:
            ax.text(0.5, 0.5, f"undefined: no face found\nin {missing} images", ha="center", va="center",
                    transform=ax.transAxes, fontsize=11, color="#a00")
            ax.set_xticks([])
        ax.set_title(f"{name}" + (f" — {missing} images without a face" if missing and any(p.size for p in present) else ""),
                     fontsize=9)
        ax.grid(alpha=0.3)
    binned = face_size_bins(None, pairs=data["pairs"])
    ax = axes[2]
    if binned:
        for key in sorted({(b["model"], b["preset"], b["lora_scale"]) for b in binned}, key=lambda k: tuple(map(str, k))):
            pts = [b for b in binned if (b["model"], b["preset"], b["lora_scale"]) == key]
            ax.plot([b["face_size_mean"] for b in pts], [b["id_mean"] for b in pts], marker="o",
                    label=f"{key[0]} {key[1]} (lora {key[2]:g})")
        ax.set_xlabel("face size (bin mean)")
        ax.set_ylabel("mean ID in bin")
        ax.legend(fontsize=7, loc="lower right")
    else:
        ax.text(0.5, 0.5, "needs images with a face\n(ID and face size both defined)", ha="center", va="center",
                transform=ax.transAxes, fontsize=11, color="#a00")
        ax.set_xticks([])
    ax.set_title("ID binned by face size (equal-count bins)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Fig. 18: ID similarity and face size at λ = {scale:g}", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def paper_section(comparison: list[dict], tables: dict, *, tiny: list[str]) -> tuple[str, str]:
    """HTML and markdown of "paper vs this run": every published cell (the markdown lists the cells this run
    lacks by row, not one line each)."""
    from evaluation import paper

    intro = ("Each value the paper published (Tables 1-3 of arXiv 2505.21144: table, row and the column as printed), "
             "beside this run's mean for the same model × preset × lora_scale on the table's prompt set and λ, with "
             "our 95 % interval (two-way bootstrap; FFC: Wilson interval of the failure rate, scaled to the paper's "
             "number of images), the difference, and whether the paper's value lies inside our interval. "
             "'not run': this run has no examples of that configuration on that prompt set; 'no data': it has, "
             "but the metric was not scored.")
    warnings = []
    if tiny:
        warnings.append(f"This run used tiny random-weight models ({', '.join(tiny)}): its numbers are NOT comparable "
                        "with the paper's. The paper's values are shown for reference.")
    missing = paper.missing_tables(tables)
    if missing:
        warnings.append(f"The paper tables file holds no rows for {', '.join(missing)}.")
    counts = paper.coverage(comparison)
    overview = [{"table": t, **c} for t, c in counts.items()]
    columns = ["table", "set", "ip_adapter_scale", "row", "column", "metric", "model", "preset", "lora_scale", "paper",
               "ours", "low", "high", "difference", "verdict", "n", "note"]
    if any("paper_change" in c for c in comparison):
        columns += ["paper_change", "ours_change"]
    shown = [{k: c.get(k) for k in columns} for c in comparison]
    body = "".join(
        "<tr class='{}'>".format(html.escape(str(c["verdict"]).replace(" ", "-")))
        + "".join(f"<td>{html.escape(_fmt(c.get(k)))}</td>" for k in columns) + "</tr>" for c in shown)
    table_html = (f"<table class='paper'><tr>{''.join(f'<th>{html.escape(k)}</th>' for k in columns)}</tr>{body}</table>"
                  if shown else "<p>(no published values stored)</p>")
    html_doc = ("<section id='paper-vs-run'><h2>Paper vs this run</h2>"
                + "".join(f"<p class='warn'>{html.escape(w)}</p>" for w in warnings)
                + f"<p>{html.escape(intro)}</p>" + _html_table(overview) + f"{table_html}</section>")
    compared = [r for r in shown if r["verdict"] != "not run"]
    not_run: dict[tuple, list[str]] = {}
    for c in comparison:
        if c["verdict"] == "not run":
            not_run.setdefault((c["table"], c["row"], c["lora_scale"]), []).append(c["column"])
    not_run_md = ("Not run here (" + str(sum(map(len, not_run.values()))) + " cells): "
                  + "; ".join(f"{t} {row} (lora {lora:g}): {', '.join(cols)}" for (t, row, lora), cols in not_run.items())
                  if not_run else "")
    md = "\n\n".join(filter(None, ["## Paper vs this run", *[f"**{w}**" for w in warnings], intro,
                                   table_markdown_simple(overview) if overview else "",
                                   table_markdown_simple(compared) if compared else "_no published cell compared_",
                                   not_run_md]))
    return html_doc, md


# -- images -------------------------------------------------------------------------------------
def image_grids(store: Store, catalog: Catalog, run_id: str, *, max_identities: int, baseline: str) -> list[str]:
    """HTML grids per model and prompt kind: identity × (preset, λ) for the first prompt and the largest lora scale.

    Every cell of a row shares the identity, prompt and seed (seeds depend on those only), so a row
    shows what the preset and λ change.

    Bounded by what is shown: per model and prompt kind one GROUP BY picks the prompt and lora scale,
    then one query returns at most ``max_identities`` identities × (preset, λ) cells (the lowest seed
    where several show the same cell), and the identity photos are looked up by their hashes.
    """
    ok = ("FROM examples e JOIN generations g ON e.example_id = g.example_id AND e.run_id = g.run_id "
          "WHERE e.run_id = ? AND g.status = 'ok' AND e.prompt_kind IN ('realistic', 'stylistic')")
    chosen = catalog.query(f"SELECT e.model, e.prompt_kind, min(e.prompt) AS prompt, max(e.lora_scale) AS lora {ok} "
                           "GROUP BY ALL ORDER BY ALL", [run_id])
    if not chosen.num_rows:
        return []
    # The images of the shown prompt and lora scale only (identities × presets × λ × seeds per model and kind).
    catalog.con.register("grid_chosen", chosen)
    try:
        catalog.query("CREATE OR REPLACE TEMP TABLE grid_rows AS SELECT e.model, e.prompt_kind, e.identity_id, "
                      "e.identity_hash, e.preset, e.ip_adapter_scale, e.seed, e.example_id, g.image_uri "
                      "FROM examples e JOIN generations g ON e.example_id = g.example_id AND e.run_id = g.run_id "
                      "JOIN grid_chosen c ON e.model = c.model AND e.prompt_kind = c.prompt_kind "
                      "AND e.prompt IS NOT DISTINCT FROM c.prompt AND e.lora_scale IS NOT DISTINCT FROM c.lora "
                      "WHERE e.run_id = ? AND g.status = 'ok'", [run_id])
    finally:
        catalog.con.unregister("grid_chosen")
    grids = []
    for choice in chosen.to_pylist():
        model, kind, prompt, lora = choice["model"], choice["prompt_kind"], choice["prompt"], choice["lora"]
        where = "FROM grid_rows e WHERE e.model = ? AND e.prompt_kind = ?"
        params = [model, kind]
        columns = sorted({(r["preset"], r["ip_adapter_scale"]) for r in catalog.query(
            f"SELECT DISTINCT e.preset, e.ip_adapter_scale {where}", params).to_pylist()},
            key=lambda c: (c[0] != baseline, c[0], c[1]))
        people = [(r["identity_id"], r["identity_hash"]) for r in catalog.query(
            f"SELECT DISTINCT e.identity_id, e.identity_hash {where} ORDER BY ALL LIMIT ?",
            params + [max_identities]).to_pylist()]
        shown = catalog.query(
            f"SELECT e.identity_id, e.preset, e.ip_adapter_scale, e.image_uri {where} AND e.identity_id IN "
            f"(SELECT DISTINCT e.identity_id {where} ORDER BY 1 LIMIT ?) QUALIFY row_number() OVER (PARTITION BY "
            "e.identity_id, e.preset, e.ip_adapter_scale ORDER BY e.seed, e.example_id) = 1",
            params + params + [max_identities]).to_pylist()
        cell = {(e["identity_id"], e["preset"], e["ip_adapter_scale"]): e for e in shown}
        digests = sorted({d for _, d in people if d is not None})
        identities = {r["content_hash"]: r for r in catalog.query(
            "SELECT content_hash, image_uri FROM identities WHERE content_hash IN (SELECT unnest(?::VARCHAR[]))",
            [digests]).to_pylist()} if digests else {}
        head = "".join(f"<th>{html.escape(p)}<br>λ={s:g}</th>" for p, s in columns)
        body = []
        for identity_id, digest in people:
            photo = identities.get(digest, {}).get("image_uri")
            cells = [f"<td><img src='data:image/png;base64,{thumbnail_b64(store.read_bytes(photo))}'><br>"
                     f"{html.escape(identity_id)}</td>" if photo else f"<td>{html.escape(identity_id)}</td>"]
            for preset, scale in columns:
                e = cell.get((identity_id, preset, scale))
                cells.append(f"<td><img src='data:image/png;base64,{thumbnail_b64(store.read_bytes(e['image_uri']))}'></td>"
                             if e else "<td>–</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        grids.append(f"<h3>{html.escape(model)} — {kind}: “{html.escape(prompt)}” (lora {lora:g})</h3>"
                     f"<table class='grid'><tr><th>identity</th>{head}</tr>{''.join(body)}</table>")
    catalog.query("DROP TABLE IF EXISTS grid_rows")
    return grids


# -- calibration --------------------------------------------------------------------------------
def augmentations(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Copies of one photo that keep the person: mirror, rescale, small rotation, crop."""
    from PIL import Image

    image = Image.fromarray(rgb)
    w, h = image.size
    return {
        "flip": np.asarray(image.transpose(Image.FLIP_LEFT_RIGHT)),
        "rescale": np.asarray(image.resize((int(w * 0.7), int(h * 0.7)), Image.BICUBIC).resize((w, h), Image.BICUBIC)),
        "rotate": np.asarray(image.rotate(8, resample=Image.BICUBIC, fillcolor=(128, 128, 128))),
        "crop": np.asarray(image.crop((int(0.05 * w), int(0.05 * h), int(0.95 * w), int(0.95 * h))).resize((w, h))),
    }


def calibration_pairs(photos: dict[str, np.ndarray], backend: Any) -> list[dict]:
    """ID similarity of same-person pairs (photo vs augmented copy) and different-person pairs (photo vs photo)."""
    embeddings = {}
    pairs = []
    for identity, rgb in photos.items():
        faces = backend.detect(rgb)
        if not faces:
            continue
        embeddings[identity] = faces[0].embedding
        for name, copy in augmentations(rgb).items():
            found = backend.detect(copy)
            pairs.append({"pair": "same person", "a": identity, "b": f"{identity} ({name})",
                          "similarity": None if not found else backend.similarity(faces[0].embedding, found[0].embedding)})
    ids = sorted(embeddings)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            pairs.append({"pair": "different people", "a": a, "b": b,
                          "similarity": backend.similarity(embeddings[a], embeddings[b])})
    return pairs


def calibration_summary(pairs: list[dict], threshold: float) -> list[dict]:
    out = []
    for kind in ("same person", "different people"):
        values = [p["similarity"] for p in pairs if p["pair"] == kind and p["similarity"] is not None]
        missed = sum(1 for p in pairs if p["pair"] == kind and p["similarity"] is None)
        out.append({"pairs": kind, "n": len(values), "no_face": missed,
                    "mean": float(np.mean(values)) if values else None,
                    "min": float(np.min(values)) if values else None, "max": float(np.max(values)) if values else None,
                    "above_threshold": sum(v >= threshold for v in values), "threshold": threshold})
    return out


def _calibrate(store: Store, catalog: Catalog, max_identities: int) -> tuple[list[dict], list[dict], str]:
    from fastface.face_backends import OFFLINE_FACE_BACKEND
    from fastface.faces import get_face_backend, load_image_rgb

    identities = catalog.rows("SELECT identity_id, image_uri, face_backend FROM identities "
                              "WHERE image_uri IS NOT NULL AND image_uri <> '' ORDER BY identity_id LIMIT ?",
                              [max_identities])
    if not identities:
        return [], [], "no identities with photos"
    backend_name = identities[0]["face_backend"] or OFFLINE_FACE_BACKEND
    try:
        backend = get_face_backend(backend_name)
    except Exception as exc:  # e.g. buffalo_l weights not on this machine
        return [], [], f"face backend {backend_name!r} unavailable: {exc}"
    photos = {r["identity_id"]: load_image_rgb(store.read_bytes(r["image_uri"])) for r in identities}
    pairs = calibration_pairs(photos, backend)
    return pairs, calibration_summary(pairs, backend.same_person_threshold), f"{backend.name}, threshold {backend.same_person_threshold:g}"


# -- the report ---------------------------------------------------------------------------------
def _write_csv(store: Store, key: str, rows: list[dict]) -> str:
    buffer = io.StringIO()
    names = list(dict.fromkeys(k for r in rows for k in r)) or ["empty"]
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    writer.writerows(rows)
    return store.write_bytes(key, buffer.getvalue().encode())


def build_report(
    root: str,
    run_id: str | None = None,
    *,
    ip_adapter_scale: float | None = None,
    baseline: str = "baseline",
    bootstrap_samples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    grid_identities: int = 6,
    calibration: bool = True,
    paper_tables: dict | None = None,
    attention_maps_png: bytes | None = None,
) -> dict:
    """Write the report of one run under ``<root>/reports/<run>/``; returns paths, tables and the markdown summary."""
    store = Store(root)
    with Catalog(store) as catalog:
        runs = run_ids(catalog)
        if run_id is None:
            if len(runs) != 1:
                raise ValueError(f"the store holds runs {runs}; choose one with --run")
            run_id = runs[0]
        elif run_id not in runs:
            raise ValueError(f"no examples of run {run_id!r} in {root}; runs: {runs}")
        data = StoreData(catalog, run_id)  # SQL aggregates and bootstrap cells: no metric row becomes a Python row
        presets = sorted({c["preset"] for c in data.configs})
        if baseline not in presets:
            raise ValueError(f"--baseline {baseline!r} is not a preset of run {run_id!r}; its presets: "
                             f"{', '.join(presets)}")
        models = sorted({c["model"] for c in data.configs})
        scales = data.scales()
        if ip_adapter_scale is None:
            ip_adapter_scale = table_ip_adapter_scale(scales)
        elif scales and not any(math.isclose(ip_adapter_scale, s) for s in scales):
            raise ValueError(f"--ip-adapter-scale {ip_adapter_scale} was not swept in run {run_id!r}; swept: {scales}")
        metrics = [m for m in TABLE_METRICS if m in data.metrics]
        boot = {"samples": bootstrap_samples, "confidence": confidence, "seed": seed}
        table = main_table(data, scale=ip_adapter_scale, baseline=baseline, metrics=metrics, boot=boot)
        # FFC too: its paired difference is the change in the face-fail rate (the paper's claims need it).
        paired = {(s, m): data.paired_differences(m, baseline=baseline, prompt_set=s, **boot)
                  for m in metrics for s in analysis.PROMPT_SETS}  # one metric's cells at a time
        paired = [p for s in analysis.PROMPT_SETS for m in metrics for p in paired[(s, m)]]
        prefix = f"reports/{run_id}"
        written = {"table": _write_csv(store, f"{prefix}/table.csv", table),
                   "paired": _write_csv(store, f"{prefix}/paired.csv", paired)}
        plots = {}
        for prompt_set in analysis.PROMPT_SETS:
            for y in CURVE_METRICS:
                if y in metrics:
                    png = plot_lambda_curves(data, prompt_set, y)
                    if png:
                        plots[f"{prompt_set}-{y}"] = png
                        written[f"lambda_{prompt_set}_{y}"] = store.write_bytes(f"{prefix}/lambda_{prompt_set}_{y}.png", png)
        fronts_html, fronts = pareto.report_section(
            {s: data.aggregate(prompt_set=s) for s in analysis.PROMPT_SETS})
        for prompt_set, png in fronts.items():
            written[f"pareto_{prompt_set}"] = store.write_bytes(f"{prefix}/pareto_{prompt_set}.png", png)
        grids = image_grids(store, catalog, run_id, max_identities=grid_identities, baseline=baseline)
        ablation_html, ablation_md, ablation_tables = ablations.ablation_sections(
            catalog, store, run_id, presets, table, scale=ip_adapter_scale, baseline=baseline)
        failures_html, failures_md, failure_rows = ablations.failure_gallery(catalog, store, run_id, scale=ip_adapter_scale)
        tables = paper.load_paper_tables() if paper_tables is None else paper_tables
        comparison = paper.paper_comparison(data, tables, baseline=baseline, metric_modes=run_metric_modes(catalog, run_id),
                                            **boot)
        written["paper"] = _write_csv(store, f"{prefix}/paper.csv", comparison)
        claim_rows = claims.claim_verdicts(paired, tables, baseline=baseline)
        written["claims"] = _write_csv(store, f"{prefix}/claims.csv", claim_rows)
        fig18_data = data.fig18(ip_adapter_scale)
        fig18 = plot_fig18(None, scale=ip_adapter_scale, data=fig18_data)
        fig18_bins = face_size_bins(None, pairs=fig18_data["pairs"])
        del fig18_data
        if fig18:
            written["fig18"] = store.write_bytes(f"{prefix}/fig18.png", fig18)
        if attention_maps_png:
            written["attention_maps"] = store.write_bytes(f"{prefix}/attention_maps.png", attention_maps_png)
        pairs, cal_summary, cal_note = _calibrate(store, catalog, grid_identities) if calibration else ([], [], "off")
        report_counts = data.counts()
        data.close()
        if pairs:
            written["calibration"] = _write_csv(store, f"{prefix}/calibration.csv", pairs)

    tiny = [m for m in models if m.startswith("tiny-")]
    paper_html, paper_md = paper_section(comparison, tables, tiny=tiny)
    claims_html, claims_md = claims.claims_section(claim_rows, tiny=tiny)
    warning = (f"**These images came from tiny random-weight models ({', '.join(tiny)}): they are noise, not faces.** "
               "The numbers exercise the metric and report machinery; they say nothing about FastFace. "
               "ID is undefined (NULL) wherever no face is found, and FFC counts those images.") if tiny else ""
    counts = {**report_counts, "models": models, "ip_adapter_scale": ip_adapter_scale}
    summary_md = "\n\n".join(filter(None, [
        f"# FastFace evaluation: run `{run_id}`",
        warning,
        f"Means per (model, preset, lora_scale) at ip_adapter_scale = {ip_adapter_scale:g}; ID with its "
        f"{confidence:.0%} two-way bootstrap interval over identities and prompts ({bootstrap_samples} replicates); "
        f"changes relative to `{baseline}`; paired ΔID against `{baseline}` on the same identity, prompt and seed. "
        "ID excludes images without a face (counted in FFC).",
        table_markdown(table, metrics, baseline) if table else "_no scored examples yet_",
        paper_md,
        claims_md,
        ablation_md,
        failures_md,
        "## Calibration of the ID metric on real photos (" + cal_note + ")\n\n"
        + (table_markdown_simple(cal_summary) if cal_summary else "_not available_"),
    ]))
    html_doc = "\n".join([
        "<!doctype html><html><head><meta charset='utf-8'><title>FastFace report " + html.escape(run_id) + "</title>",
        "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:1em 0} "
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px;text-align:center} .warn{background:#fee;"
        "padding:1em;border:1px solid #c00} img{display:block;margin:auto;max-width:100%;height:auto} tr.inside{background:#efe} "
        "tr.outside{background:#fdd} tr.holds{background:#efe} tr.contradicted{background:#fdd}</style></head><body>",
        f"<h1>FastFace evaluation: run {html.escape(run_id)}</h1>",
        f"<p class='warn'>{html.escape(warning.replace('**', ''))}</p>" if warning else "",
        f"<p>{html.escape(json.dumps(counts))}</p>",
        f"<h2>Tables at λ = {ip_adapter_scale:g}</h2>", _html_table(table),
        "<h2>Paired differences against the baseline (all λ)</h2>", _html_table(paired),
        "<h2>λ-curves: ID against CLIP / AE / IR, traced by ip_adapter_scale</h2>",
        "".join(f"<h3>{html.escape(k)}</h3><img src='data:image/png;base64,{base64.b64encode(v).decode()}'>"
                for k, v in plots.items()) or "<p>(need ID and CLIP/AE/IR scores)</p>",
        fronts_html,
        paper_html,
        claims_html,
        f"<h2 id='fig18'>Fig. 18: ID similarity and face size (λ = {ip_adapter_scale:g})</h2>",
        "<p>Distributions per model × preset over all identities and prompts at this λ (configs/fig18.yaml: one "
        "identity, one neutral prompt, many seeds, as in the paper), and mean ID per face-size bin.</p>",
        (f"<img alt='fig18' src='data:image/png;base64,{base64.b64encode(fig18).decode()}'>" if fig18
         else "<p>(needs the id and face_size metrics)</p>"), _html_table(fig18_bins) if fig18_bins else "",
        ("<h2>Identity-attention maps (fastface attention-maps)</h2>"
         f"<img alt='attention maps' src='data:image/png;base64,{base64.b64encode(attention_maps_png).decode()}'>"
         if attention_maps_png else ""),
        "<h2>Image grids</h2>", "".join(grids) or "<p>(no images)</p>",
        ablation_html,
        failures_html,
        f"<h2>Calibration of the ID metric on real photos ({html.escape(cal_note)})</h2>",
        "<p>Same person: each identity photo against a mirrored, rescaled, rotated and cropped copy. "
        "Different people: identity photos against each other. A working metric puts the first above the "
        "backend's threshold and the second below it.</p>",
        _html_table(cal_summary), _html_table(pairs),
        "</body></html>",
    ])
    written["html"] = store.write_bytes(f"{prefix}/report.html", html_doc.encode())
    written["summary"] = store.write_bytes(f"{prefix}/summary.md", summary_md.encode())
    return {"run_id": run_id, "files": written, "table": table, "paired": paired, "calibration": cal_summary,
            "paper": comparison, "claims": claim_rows, "claims_summary": claims.claim_summary(claim_rows),
            "fig18_bins": fig18_bins, "ablations": ablation_tables, "failures": failure_rows,
            "summary_markdown": summary_md, "counts": counts, "tiny_models": tiny}


__all__ = ["augmentations", "build_report", "calibration_pairs", "calibration_summary", "main_table",
           "metric_rows", "plot_lambda_curves"]

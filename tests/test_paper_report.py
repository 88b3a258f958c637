"""The report's "paper vs this run" section on a synthetic run with known answers, and Fig. 18."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest

from evaluation import paper
from noise import float64_tolerance

IDENTITIES = [f"i{k}" for k in range(10)]
PROMPTS = {**{f"r{k}": "realistic" for k in range(6)}, **{f"s{k}": "stylistic" for k in range(6)}}
SPREAD = {"id": 0.06, "clip": 0.01, "ae": 0.3}
SHIFT = {"id": 0.12, "clip": 0.03, "ae": 0.9}


def reference_tables() -> dict:
    """The published tables; the synthetic run draws hyper, lightning and lcm around their Table 1 rows (LoRA 1.0)."""
    return paper.load_paper_tables()


def table1_rows(tables: dict) -> list[dict]:
    return [dict(r, id=r["ID"], clip=r["CLIP"], ae=r["AE"]) for r in tables["tables"]["table1"]["rows"]
            if r["lora_scale"] == 1.0 and r["model"] in ("hyper", "lightning", "lcm")]


def centred(rng, shape, spread):
    """Identity and prompt effects plus noise, with mean exactly 0 (so the run's mean is the target)."""
    x = rng.normal(0, spread, (shape[0], 1)) + rng.normal(0, spread, (1, shape[1])) + rng.normal(0, spread / 2, shape)
    return x - x.mean()


def synthetic_run(tables: dict) -> tuple[list[dict], list[dict]]:
    """examples and metrics rows: hyper and lightning drawn around the reference, lcm around shifted values."""
    rng = np.random.default_rng(0)
    examples, metrics = [], []
    for row in table1_rows(tables):
        model, preset, shifted = row["model"], row["preset"], row["model"] == "lcm"
        no_face = np.zeros((len(IDENTITIES), len(PROMPTS)), bool)
        if shifted:
            no_face = rng.random(no_face.shape) < 0.4  # 40 % face failures: far above the paper's 2 in 6480
        noise = {m: centred(rng, no_face.shape, SPREAD[m]) for m in SPREAD}
        for (i, identity), (p, prompt) in itertools.product(enumerate(IDENTITIES), enumerate(PROMPTS)):
            example_id = f"{model}-{preset}-{identity}-{prompt}"
            examples.append({"example_id": example_id, "identity_id": identity, "identity_hash": identity,
                             "prompt_id": prompt, "prompt": prompt, "prompt_kind": PROMPTS[prompt], "model": model,
                             "preset": preset, "ip_adapter_scale": 0.8, "lora_scale": 1.0, "seed": 0, "steps": 4,
                             "width": 1024, "height": 1024, "config_hash": "c", "code_version": "test"})
            for metric in ("id", "clip", "ae"):
                value = row[metric] + noise[metric][i, p] + (SHIFT[metric] if shifted else 0.0)
                if metric == "id" and no_face[i, p]:
                    value = None
                metrics.append({"example_id": example_id, "metric": metric, "value": value})
            metrics.append({"example_id": example_id, "metric": "ffc", "value": float(no_face[i, p])})
    return examples, metrics


def test_report_verdicts_per_cell_on_a_synthetic_run(tmp_path):
    from evaluation.report import build_report
    from storage import Store

    tables = reference_tables()
    examples, metrics = synthetic_run(tables)
    store = Store(str(tmp_path))
    store.append("examples", examples, "synthetic")
    store.append("metrics", metrics, "synthetic")
    store.append("runs", [{"kind": "evaluate", "config": json.dumps({"metrics": {"fsc_mode": "authors",
                                                                               "face_size_mode": "authors"}})}],
                 "synthetic")
    report = build_report(str(tmp_path), "synthetic", bootstrap_samples=300, calibration=False, paper_tables=tables)
    assert len(report["paper"]) == 224  # every published value has a line
    cells = {(c["model"], c["preset"], c["metric"]): c for c in report["paper"]
             if c["table"] == "table1" and c["lora_scale"] == 1.0 and c["model"] != "turbo"}
    assert len(cells) == 3 * 3 * 4  # models × presets × (ID, CLIP, AE, FFC)
    for (model, preset, metric), cell in cells.items():
        expected = "outside" if model == "lcm" else "inside"
        assert cell["verdict"] == expected, (model, preset, metric, cell)
        assert cell["comparable"] and cell["n"] > 0 and cell["low"] <= cell["ours"] <= cell["high"]
        if model != "lcm" and metric != "ffc":
            # The drawn noise has mean 0 up to float64 rounding (tests/noise.py): centring (a mean of n draws,
            # n + 1 roundings), the run's mean (n + 1), and the per-value roundings, which average to 1 each.
            tol = float64_tolerance(cell["paper"], ops=2 * (cell["n"] + 1) + 2)
            assert cell["ours"] == pytest.approx(cell["paper"], abs=tol) and cell["low"] < cell["high"]
    assert cells[("lcm", "baseline", "id")]["difference"] > 0.05
    assert cells[("lcm", "ff-am1", "ffc")]["ours"] > 1000  # ~40 % of the paper's 6480 images
    assert cells[("hyper", "ff-am1", "id")]["row"] == "Hyper + FF_AM1"  # the published row label
    assert cells[("hyper", "ff-am1", "id")]["column"] == "ID"
    by = {(c["table"], c["model"], c["preset"], c["lora_scale"], c["metric"]): c for c in report["paper"]}
    # Configurations the run lacks: turbo, LoRA 0.5, DCG and AM-only presets.
    for key in (("table1", "turbo", "baseline", 1.0, "id"), ("table1", "hyper", "ff-am1", 0.5, "ffc"),
                ("table2", "hyper", "dcg", 1.0, "clip"), ("table3", "lcm", "am2", 1.0, "ae")):
        assert by[key]["verdict"] == "not run" and by[key]["ours"] is None, key
    # The baseline rows of Tables 2 and 3 are compared on the run's stylistic / realistic prompts;
    # IR was not scored; Table 2 keeps the paper's column names.
    assert by[("table2", "hyper", "baseline", 1.0, "clip")]["verdict"] in ("inside", "outside")
    assert by[("table2", "hyper", "baseline", 1.0, "clip")]["column"] == "CLIP-score"
    assert by[("table3", "lightning", "baseline", 1.0, "ffc")]["verdict"] in ("inside", "outside")
    assert by[("table2", "hyper", "baseline", 1.0, "ir")]["verdict"] == "no data"
    assert by[("table2", "hyper", "baseline", 1.0, "ir")]["column"] == "IR"
    page = (tmp_path / "reports" / "synthetic" / "report.html").read_text()
    verdicts = [c["verdict"] for c in report["paper"]]
    assert "Paper vs this run" in page
    for verdict in ("inside", "outside", "not run", "no data"):
        assert page.count(f"<tr class='{verdict.replace(' ', '-')}'>") == verdicts.count(verdict), verdict
    assert "could not be read" not in page  # the stale header is gone
    assert "Paper vs this run" in report["summary_markdown"]
    assert "Not run here" in report["summary_markdown"] and "Turbo base (lora 1): ID, CLIP, AE, FFC" in report["summary_markdown"]
    assert (tmp_path / "reports" / "synthetic" / "paper.csv").is_file()
    # The claims: Table 1's at LoRA 0.5 was not run (undecided); the synthetic run's ID/CLIP/AE/FFC have no
    # preset effect, so no cell of the run can hold for the am/dcg claims either (they were not run).
    assert (tmp_path / "reports" / "synthetic" / "claims.csv").is_file()
    assert report["claims_summary"]["fastface-ffc"]["verdict"] == "undecided"
    assert {c["verdict"] for c in report["claims"]} == {"undecided"}
    assert "The paper's claims" in report["summary_markdown"] and "id='claims'" in page
    assert any(p["metric"] == "ffc" for p in report["paired"])  # the claims' FFC pairs


def test_tiny_runs_and_other_metric_modes_are_marked_not_comparable():
    rows = [{"example_id": f"e{k}", "identity_id": f"i{k % 3}", "prompt_id": f"p{k % 4}", "prompt_kind": "realistic",
             "model": "tiny-hyper", "preset": "baseline", "lora_scale": 1.0, "ip_adapter_scale": 0.8, "seed": 0,
             "metric": "clip", "value": 0.1 + 0.01 * k} for k in range(12)]
    comparison = paper.paper_comparison(rows, samples=50)
    clip = [c for c in comparison if c["model"] == "hyper" and c["preset"] == "baseline" and c["metric"] == "clip"][0]
    values = [r["value"] for r in rows]
    # Two float64 means of these values, summed in different orders: n + 1 roundings each (tests/noise.py).
    assert clip["paper"] == 0.244
    assert clip["ours"] == pytest.approx(np.mean(values), abs=float64_tolerance(values, ops=2 * (len(values) + 1)))
    assert not clip["comparable"] and "tiny" in clip["note"] and clip["verdict"] == "not comparable"
    assert "outside" in clip["note"]  # the raw verdict stays visible in the note
    faceless = [dict(r, metric="id", value=None) for r in rows]  # ID scored, but no face in any image
    noted = {c["set"]: c for c in paper.paper_comparison(rows + faceless, samples=50)
             if (c["model"], c["preset"], c["lora_scale"], c["metric"]) == ("hyper", "baseline", 1.0, "id")}
    assert noted["joint"]["verdict"] == "no data" and "undefined on all 12 images (no face found)" in noted["joint"]["note"]
    unmeasured = [c for c in comparison if c["metric"] == "id" and c["model"] == "hyper" and c["preset"] == "baseline"
                  and c["lora_scale"] == 1.0 and c["set"] in ("joint", "realistic")]
    assert len(unmeasured) == 2 and all(c["verdict"] == "no data" and not c["comparable"] for c in unmeasured)
    assert all(c["verdict"] == "not run" for c in comparison if c["model"] != "hyper" or c["set"] == "stylistic")
    # A Table 2 FSC cell scored in our aligned mode cannot be compared with the paper's.
    tables = copy.deepcopy(paper.load_paper_tables())
    tables["tables"]["table2"]["rows"] = [
        {"model": "hyper", "preset": p, "lora_scale": 1.0, "row": f"test {p}", "face_sim": 0.5, "CLIP-score": 0.2,
         "IR": 0.1, "FCS": v, "source": "test only"} for p, v in (("baseline", 0.20), ("dcg", 0.22))]
    styl = [dict(r, model="hyper", prompt_kind="stylistic", metric="fsc", preset=p, value=v + 0.001 * k)
            for p, v in (("baseline", 0.2), ("dcg", 0.25)) for k, r in enumerate(rows)]
    fsc = {c["preset"]: c for c in paper.paper_comparison(styl, tables, metric_modes={"fsc_mode": "aligned"}, samples=50)
           if c["metric"] == "fsc"}
    assert not fsc["dcg"]["comparable"] and "fsc_mode='aligned'" in fsc["dcg"]["note"]
    assert fsc["dcg"]["paper_change"] == (0.22 - 0.20) / 0.20  # the same float64 operations: exact
    base, dcg = (np.mean([r["value"] for r in styl if r["preset"] == p]) for p in ("baseline", "dcg"))
    # float64 (tests/noise.py): two means of 12 values (13 roundings each), a subtraction and a division,
    # on the scale of dcg / base.
    tol = float64_tolerance(dcg / base, ops=2 * 13 + 2)
    assert fsc["dcg"]["ours_change"] == pytest.approx((dcg - base) / base, abs=tol)


def test_wilson_interval_contains_small_counts():
    low, high = paper.wilson_interval(0, 120)
    assert low == 0.0 and 0.02 < high < 0.04
    low, high = paper.wilson_interval(48, 120)
    assert low < 0.4 < high and low > 0.3


def test_fig18_bins_and_plot_on_synthetic_faces():
    from PIL import Image
    import io

    from evaluation.report import face_size_bins, plot_fig18

    rng = np.random.default_rng(1)
    rows = []
    for preset, bump in (("baseline", 0.0), ("am1", 0.05)):
        for seed in range(60):
            size = rng.uniform(0.02, 0.3)
            common = {"example_id": f"{preset}-{seed}", "model": "hyper", "preset": preset, "lora_scale": 1.0,
                      "ip_adapter_scale": 0.8}
            rows.append({**common, "metric": "face_size", "value": size})
            rows.append({**common, "metric": "id", "value": 0.3 + size + bump})  # ID rises with face size
    bins = face_size_bins(rows, bins=4)
    base = [b for b in bins if b["preset"] == "baseline"]
    assert sum(b["n"] for b in base) == 60 and len(base) == 4
    assert all(a["id_mean"] < b["id_mean"] for a, b in zip(base, base[1:]))
    png = plot_fig18(rows, scale=0.8)
    with Image.open(io.BytesIO(png)) as image:
        assert image.width > 1000 and image.height > 300
    assert plot_fig18(rows, scale=0.5) is None  # nothing at that λ


def test_fig18_config_is_one_identity_one_neutral_prompt_many_seeds():
    from pathlib import Path

    from evaluation.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "fig18.yaml")
    assert len(config.dataset.identities) == 1 and config.dataset.prompts == ("a photo of a person",)
    assert len(config.sweep.seeds) >= 100 and {"id", "face_size"} <= set(config.metrics.names)
    assert config.metrics.face_size_mode == "authors"

"""The report's SQL path (evaluation/report_data.py: DuckDB aggregates, bootstrap cells, paired differences) against
the pure-Python reference (evaluation/analysis.py) on the same synthetic metric rows, stored in a real store."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from evaluation import analysis, paper
from evaluation.report import face_size_bins, main_table, metric_rows
from evaluation.report_data import RowsData, StoreData

MODELS = ("hyper", "tiny-lcm")
PRESETS = ("baseline", "ff-am1", "dcg")
LORAS = (1.0, 0.5)
SCALES = (0.4, 0.8)
IDENTITIES = ("id-b", "id-a", "id-c", "id-d")  # not in sorted order: codes must follow sorted()
PROMPTS = {"r1": "realistic", "r0": "realistic", "r2": "realistic", "s0": "stylistic", "s1": "stylistic"}
SEEDS = (0, 1)
BOOT = {"samples": 120, "confidence": 0.9, "seed": 3}


def synthetic_store(tmp_path):
    """examples × 5 metrics with no-face IDs (None), a missing baseline, a retried score and an errored one."""
    from storage import Store

    rng = np.random.default_rng(7)
    examples, metrics = [], []
    for model, preset, lora, scale, identity, prompt, seed in itertools.product(
            MODELS, PRESETS, LORAS, SCALES, IDENTITIES, PROMPTS, SEEDS):
        if preset == "dcg" and scale == 0.4:
            continue  # a preset not swept at every λ
        example_id = f"{model}-{preset}-{lora}-{scale}-{identity}-{prompt}-{seed}"
        examples.append({"example_id": example_id, "identity_id": identity, "identity_hash": identity,
                         "prompt_id": prompt, "prompt": f"prompt {prompt}", "prompt_kind": PROMPTS[prompt],
                         "model": model, "preset": preset, "ip_adapter_scale": scale, "lora_scale": lora,
                         "seed": seed, "steps": 4, "width": 64, "height": 64, "config_hash": "c",
                         "code_version": "test"})
        if preset == "baseline" and identity == "id-d" and prompt == "s1" and seed == 1:
            continue  # no baseline scores: the presets' rows here are unpaired
        no_face = rng.random() < 0.15
        values = {"id": None if no_face else float(rng.normal(0.5 + 0.1 * (preset != "baseline"), 0.1)),
                  "clip": float(rng.normal(0.25, 0.02)), "ae": float(rng.normal(5.5, 0.3)),
                  "ffc": float(no_face), "face_size": None if no_face else float(rng.uniform(0.02, 0.3))}
        for metric, value in values.items():
            metrics.append({"example_id": example_id, "metric": metric, "value": value})
    store = Store(str(tmp_path))
    store.append("examples", examples, "r")
    store.append("metrics", metrics, "r")
    # A retried score (the later row wins in the views) and an errored one (left out).
    store.append("metrics", [{"example_id": examples[0]["example_id"], "metric": "clip", "value": 0.9}], "r")
    store.append("metrics", [{"example_id": examples[1]["example_id"], "metric": "clip", "value": None,
                              "error": "boom"}], "r")
    return store


def close(a, b, path=""):
    """Equal structures; floats within 1e-12 (absolute), NaN equal NaN."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (path, len(a), len(b))
        for k, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{k}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, (path, a, b)
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12, (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_sql_report_data_equals_the_python_reference(tmp_path):
    from storage import Catalog

    store = synthetic_store(tmp_path)
    with Catalog(store) as catalog:
        rows = metric_rows(catalog, "r")  # the reference's input: the same deduplicated rows, in Python
        sql = StoreData(catalog, "r")
        ref = RowsData(rows)
        assert len(rows) == sql.counts()["rows"] and sql.metrics == ref.metrics == sorted(
            ["id", "clip", "ae", "ffc", "face_size"])
        assert sql.counts() == ref.counts() and sql.scales() == ref.scales() and sql.models() == ref.models()
        checked = 0
        for prompt_set, scale in itertools.product(analysis.PROMPT_SETS, (None, 0.8)):
            table = sql.aggregate(prompt_set=prompt_set, scale=scale)
            close(table, ref.aggregate(prompt_set=prompt_set, scale=scale))
            close(analysis.relative_change(table), analysis.relative_change(ref.aggregate(prompt_set=prompt_set,
                                                                                           scale=scale)))
            close(analysis.lambda_curves(table, y="clip"),
                  analysis.lambda_curves(ref.aggregate(prompt_set=prompt_set, scale=scale), y="clip"))
            for metric in ("id", "clip"):
                got = sql.config_intervals(metric, prompt_set=prompt_set, scale=scale, **BOOT)
                close(got, ref.config_intervals(metric, prompt_set=prompt_set, scale=scale, **BOOT))
                paired = sql.paired_differences(metric, prompt_set=prompt_set, scale=scale, **BOOT)
                close(paired, ref.paired_differences(metric, prompt_set=prompt_set, scale=scale, **BOOT))
                checked += len(got) + len(paired)
        # What the checks covered: no-face IDs (missing), unpaired rows, the retried and the errored score.
        joint = {(r["model"], r["preset"], r["lora_scale"], r["ip_adapter_scale"], r["metric"]): r
                 for r in sql.aggregate()}
        assert sum(r["missing"] for r in joint.values() if r["metric"] == "id") > 0
        # 40 examples, one without baseline scores, one whose latest clip row is an error
        assert joint[("hyper", "baseline", 1.0, 0.4, "clip")]["n"] == len(IDENTITIES) * 5 * len(SEEDS) - 2
        assert any(r["metric"] == "clip" and r["value"] == 0.9 for r in rows)  # the retried score's later row
        assert any(p["unpaired"] and p["pairs"] for p in sql.paired_differences("id", **BOOT))
        assert checked > 100
        # The report's tables and the paper comparison built from either source.
        metrics = ["id", "clip", "ae", "ffc"]
        close(main_table(sql, scale=0.8, baseline="baseline", metrics=metrics, boot=BOOT),
              main_table(rows, scale=0.8, baseline="baseline", metrics=metrics, boot=BOOT))
        tables = paper.load_paper_tables()
        for modes in (None, {"fsc_mode": "authors"}):
            got = paper.paper_comparison(sql, tables, metric_modes=modes, **BOOT)
            close(got, paper.paper_comparison(rows, tables, metric_modes=modes, **BOOT))
            assert any(c["verdict"] in ("inside", "outside") for c in got) and any(not c["comparable"] for c in got)
        # Fig. 18's values and bins.
        want = ref.fig18(0.8)
        got = sql.fig18(0.8)
        assert set(got) == set(want)
        for part in want:
            assert set(got[part]) == set(want[part])
            for key in want[part]:
                np.testing.assert_allclose(np.sort(got[part][key], axis=0), np.sort(want[part][key], axis=0),
                                           rtol=0, atol=1e-12)
        close(face_size_bins(None, pairs=got["pairs"]),
              face_size_bins([r for r in rows if r["ip_adapter_scale"] == 0.8]))
        sql.close()


def test_bootstrap_cells_equal_the_row_bootstrap():
    from evaluation.report_data import bootstrap_cells

    rng = np.random.default_rng(0)
    rows = [{"identity_id": f"i{i}", "prompt_id": f"p{p}", "value": None if rng.random() < 0.1 else rng.normal()}
            for i in range(7) for p in range(11) for _ in range(3)]
    ids = sorted({r["identity_id"] for r in rows})
    prompts = sorted({r["prompt_id"] for r in rows})
    ii = np.array([ids.index(r["identity_id"]) for r in rows])
    pp = np.array([prompts.index(r["prompt_id"]) for r in rows])
    value = np.array([0.0 if r["value"] is None else r["value"] for r in rows])
    count = np.array([r["value"] is not None for r in rows], float)
    got = bootstrap_cells(ii, pp, value, count, samples=300, seed=5)
    want = analysis.bootstrap_mean_ci(rows, samples=300, seed=5)
    close(got, want)
    assert got["low"] < got["mean"] < got["high"]
    with pytest.raises(AssertionError):  # the comparison can fail: another seed, other draws
        close(bootstrap_cells(ii, pp, value, count, samples=300, seed=6), want)


def test_image_grids_read_only_the_shown_cells(tmp_path):
    """Per model × kind: the first prompt, the largest lora, at most ``max_identities`` identities, lowest seed."""
    import io
    import re

    from PIL import Image

    from evaluation.report import image_grids
    from storage import Catalog

    store = synthetic_store(tmp_path)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, "PNG")
    png = store.write_bytes("images/r/one.png", buffer.getvalue())
    with Catalog(store) as catalog:
        examples = catalog.query("SELECT example_id, identity_id, prompt_id, lora_scale, seed FROM examples").to_pylist()
    # Images for every example but the lowest seed of identity id-a (so its cells fall back to seed 1).
    store.append("generations", [{"example_id": e["example_id"], "status": "ok", "image_uri": png} for e in examples
                                 if not (e["identity_id"] == "id-a" and e["seed"] == 0)], "r")
    store.append("identities", [{"identity_id": "id-a", "content_hash": "id-a", "image_uri": png}], "r-dataset")
    with Catalog(store) as catalog:
        grids = image_grids(store, catalog, "r", max_identities=2, baseline="baseline")
    assert len(grids) == len(MODELS) * 2  # models × (realistic, stylistic)
    first = grids[0]
    assert first.startswith("<h3>hyper — realistic: “prompt r0” (lora 1)</h3>")
    # Two identities (sorted: id-a, id-b), the baseline first, 5 (preset, λ) columns (dcg only at 0.8).
    assert re.findall(r"<br>(id-[a-d])</td>|<td>(id-[a-d])</td>", first) == [("id-a", ""), ("", "id-b")]
    heads = re.findall(r"<th>([^<]+)<br>λ=([0-9.]+)</th>", first)
    assert heads == [("baseline", "0.4"), ("baseline", "0.8"), ("dcg", "0.8"), ("ff-am1", "0.4"), ("ff-am1", "0.8")]
    assert first.count("<img") == 1 + 2 * 5 and "<td>–</td>" not in first  # id-a's photo, and every cell shown

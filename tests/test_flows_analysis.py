"""evaluation/analysis.py on synthetic tables with known answers: no-face exclusion, FFC counts,
relative change, λ-curves, two-way bootstrap intervals and paired differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluation import analysis
from noise import float64_tolerance

IDS = ["i0", "i1", "i2"]
PROMPTS = {"r0": "realistic", "r1": "realistic", "s0": "stylistic", "s1": "stylistic"}
NO_FACE = {("ff", 0.8, "i2", "s1"), ("baseline", 0.8, "i0", "r0"), ("baseline", 0.5, "i1", "s0")}


def id_value(preset: str, scale: float, identity: str, prompt: str) -> float | None:
    if (preset, scale, identity, prompt) in NO_FACE:
        return None
    return 0.4 + 0.2 * scale + 0.01 * IDS.index(identity) + (0.03 if preset == "ff" else 0.0)


def clip_value(preset: str, scale: float, prompt: str) -> float:
    base = 0.25 - 0.05 * scale + (0.01 if PROMPTS[prompt] == "stylistic" else 0.0)
    return base * (1.1 if preset == "ff" else 1.0)


def synthetic_rows() -> list[dict]:
    rows = []
    for preset, scale, identity, prompt in itertools.product(("baseline", "ff"), (0.5, 0.8), IDS, PROMPTS):
        common = {"example_id": f"{preset}-{scale}-{identity}-{prompt}", "identity_id": identity, "prompt_id": prompt,
                  "prompt_kind": PROMPTS[prompt], "model": "m", "preset": preset, "lora_scale": 1.0,
                  "ip_adapter_scale": scale, "seed": 7}
        value = id_value(preset, scale, identity, prompt)
        rows.append({**common, "metric": "id", "value": value})
        rows.append({**common, "metric": "ffc", "value": 1.0 if value is None else 0.0})
        rows.append({**common, "metric": "clip", "value": clip_value(preset, scale, prompt)})
    return rows


def by(table, **where):
    found = [r for r in table if all(r[k] == v for k, v in where.items())]
    assert len(found) == 1, (where, found)
    return found[0]


def test_id_excludes_no_face_and_ffc_counts_them():
    table = analysis.aggregate(synthetic_rows(), prompt_set="joint")
    ff = by(table, preset="ff", ip_adapter_scale=0.8, metric="id")
    expected = [id_value("ff", 0.8, i, p) for i in IDS for p in PROMPTS]
    assert ff["n"] == 11 and ff["missing"] == 1
    present = [v for v in expected if v is not None]
    # Two float64 means of these values, summed in different orders: n + 1 roundings each (tests/noise.py).
    assert ff["value"] == pytest.approx(np.mean(present), abs=float64_tolerance(present, ops=2 * (len(present) + 1)))
    assert by(table, preset="ff", ip_adapter_scale=0.8, metric="ffc")["value"] == 1.0  # a sum, not a mean
    assert by(table, preset="ff", ip_adapter_scale=0.5, metric="ffc")["value"] == 0.0
    # Per prompt set: the baseline's no-face image at 0.8 is realistic, so the stylistic set has none.
    realistic = analysis.aggregate(synthetic_rows(), prompt_set="realistic")
    stylistic = analysis.aggregate(synthetic_rows(), prompt_set="stylistic")
    assert by(realistic, preset="baseline", ip_adapter_scale=0.8, metric="ffc")["value"] == 1.0
    assert by(stylistic, preset="baseline", ip_adapter_scale=0.8, metric="ffc")["value"] == 0.0
    assert by(stylistic, preset="baseline", ip_adapter_scale=0.8, metric="id")["n"] == 6


def test_relative_change_against_baseline():
    table = analysis.relative_change(analysis.aggregate(synthetic_rows(), prompt_set="realistic"))
    clip = by(table, preset="ff", ip_adapter_scale=0.5, metric="clip")
    # ff's CLIP is baseline × 1.1. float64 throughout (tests/noise.py): 4 roundings per value, two means of
    # 6 values (7 each), a subtraction and a division (so on the scale of the ratio, 1.1).
    assert clip["relative_change"] == pytest.approx(0.10, abs=float64_tolerance(1.1, ops=4 + 2 * 7 + 2))
    assert clip["baseline_value"] == pytest.approx(0.25 - 0.025, abs=float64_tolerance(0.25, ops=3 + 7 + 1))
    # The baseline against itself: (b − b) / b is exactly 0.
    assert by(table, preset="baseline", ip_adapter_scale=0.5, metric="clip")["relative_change"] == 0.0


def test_lambda_curves_trace_id_against_clip_by_scale():
    table = analysis.aggregate(synthetic_rows(), prompt_set="stylistic")
    curves = analysis.lambda_curves(table, x="id", y="clip")
    assert set(curves) == {("m", "baseline", 1.0, "stylistic"), ("m", "ff", 1.0, "stylistic")}
    ff = curves[("m", "ff", 1.0, "stylistic")]
    assert [p["ip_adapter_scale"] for p in ff] == [0.5, 0.8]
    # ID rises and CLIP falls with λ: the trade-off the paper's curves show.
    assert ff[0]["x"] < ff[1]["x"] and ff[0]["y"] > ff[1]["y"]
    # float64 (tests/noise.py): 4 roundings per value, a mean of 6 (7), 3 in the expression here.
    assert ff[1]["y"] == pytest.approx((0.25 - 0.04 + 0.01) * 1.1, abs=float64_tolerance(0.25, ops=4 + 7 + 3))


def test_paired_differences_match_the_construction():
    rows = synthetic_rows()
    paired = analysis.paired_differences(rows, "id", prompt_set="joint", samples=200)
    at8 = by(paired, ip_adapter_scale=0.8)
    # Every pair differs by 0.03 up to float64 rounding (tests/noise.py): up to 5 roundings in each ID value
    # and the subtraction; the bootstrap's weighted sums over the 12 (identity, prompt) cells (3 per cell),
    # the division and the quantile's interpolation.
    tol = float64_tolerance(id_value("ff", 0.8, "i2", "r0"), ops=2 * 5 + 1 + 3 * 12 + 1 + 3)
    assert at8["mean_difference"] == pytest.approx(0.03, abs=tol)
    assert at8["low"] == pytest.approx(0.03, abs=tol) and at8["high"] == pytest.approx(0.03, abs=tol)
    # Pairs where either side has no face are left out: (i2, s1) for ff, (i0, r0) for the baseline.
    assert at8["pairs"] == 10 and at8["unpaired"] == 2
    assert by(paired, ip_adapter_scale=0.5)["unpaired"] == 1


def two_way_data(rng, mu=0.5, n_id=25, n_prompt=16, seeds=2):
    a = rng.normal(0, 0.08, n_id)  # identity effects: what makes images of one identity alike
    b = rng.normal(0, 0.05, n_prompt)
    return [{"identity_id": f"i{i}", "prompt_id": f"p{p}", "value": mu + a[i] + b[p] + rng.normal(0, 0.05)}
            for i in range(n_id) for p in range(n_prompt) for _ in range(seeds)]


def test_two_way_bootstrap_contains_the_true_mean():
    rng = np.random.default_rng(0)
    ci = analysis.bootstrap_mean_ci(two_way_data(rng), samples=400, seed=1)
    assert ci["low"] < 0.5 < ci["high"] and ci["identities"] == 25 and ci["prompts"] == 16
    assert ci["low"] < ci["mean"] < ci["high"]
    # Same seed, same interval.
    again = analysis.bootstrap_mean_ci(two_way_data(np.random.default_rng(0)), samples=400, seed=1)
    assert (again["low"], again["high"]) == (ci["low"], ci["high"])
    # Coverage over many datasets: the cluster bootstrap is honest where an iid interval is not.
    covered, naive_covered, trials = 0, 0, 60
    for t in range(trials):
        data = two_way_data(np.random.default_rng(100 + t))
        ci = analysis.bootstrap_mean_ci(data, samples=300, seed=t)
        covered += ci["low"] < 0.5 < ci["high"]
        values = np.array([r["value"] for r in data])
        half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
        naive_covered += abs(values.mean() - 0.5) < half
    assert covered / trials >= 0.8
    assert naive_covered / trials < 0.6  # treating 800 correlated images as independent undercovers badly


def test_bootstrap_with_no_values():
    assert analysis.bootstrap_mean_ci([{"identity_id": "a", "prompt_id": "p", "value": None}])["mean"] is None


def test_lambda_curve_plot_is_a_png():
    from evaluation.report import plot_lambda_curves

    png = plot_lambda_curves(synthetic_rows(), "joint", "clip")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    no_id = [r for r in synthetic_rows() if r["metric"] != "id"]  # e.g. noise images: ID undefined everywhere
    assert plot_lambda_curves(no_id, "joint", "clip")[:4] == b"\x89PNG"
    assert plot_lambda_curves(no_id, "joint", "ir") is None

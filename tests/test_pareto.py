"""Pareto fronts: the exact non-dominated set on hand-made points, the panels, and the report's section."""

from __future__ import annotations

import math

import pytest

from evaluation.pareto import front_panels, pareto_front, plot_fronts


def brute_force(points, maximise):
    """The definition, written out independently: dominated iff another point is ≥ everywhere and > somewhere."""
    sign = [1 if m else -1 for m in maximise]
    out = []
    for i, p in enumerate(points):
        if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in p):
            continue
        beaten = False
        for j, q in enumerate(points):
            if j == i or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in q):
                continue
            ge = all(s * a >= s * b for s, a, b in zip(sign, q, p))
            gt = any(s * a > s * b for s, a, b in zip(sign, q, p))
            beaten |= ge and gt
        if not beaten:
            out.append(i)
    return out


def test_hand_made_fronts():
    # a staircase with one point inside it
    assert pareto_front([(1, 5), (2, 4), (3, 3), (2, 2), (4, 1)]) == [0, 1, 2, 4]
    # one point: itself
    assert pareto_front([(0.3, 0.7)]) == [0]
    assert pareto_front([]) == []
    # duplicates of a front point are all on the front; duplicates of a dominated one all off
    assert pareto_front([(1, 1), (2, 2), (2, 2), (1, 1)]) == [1, 2]
    # ties in one objective: the better one in the other wins, the tie on both keeps both
    assert pareto_front([(1, 3), (1, 2), (0, 3)]) == [0]
    assert pareto_front([(1, 3), (3, 1), (3, 1)]) == [0, 1, 2]
    # minimising the second objective flips which points win
    assert pareto_front([(1, 5), (2, 4), (3, 3)], maximise=(True, False)) == [2]
    assert pareto_front([(1, 1), (2, 2), (1, 3)], maximise=False) == [0]
    # missing values are never on the front and never dominate
    assert pareto_front([(None, 9), (1, float("nan")), (0, 0)]) == [2]
    with pytest.raises(ValueError, match="same number"):
        pareto_front([(1, 2), (1,)])


def test_random_points_match_the_definition():
    import numpy as np

    rng = np.random.default_rng(3)
    for trial in range(40):
        n, d = int(rng.integers(1, 25)), int(rng.integers(1, 4))
        points = [tuple(float(v) for v in row) for row in rng.integers(0, 4, (n, d))]  # small ints: many ties
        maximise = tuple(bool(b) for b in rng.integers(0, 2, d))
        assert pareto_front(points, maximise) == brute_force(points, maximise), (points, maximise)


def _aggregated():
    rows = []
    # hyper at LoRA 1: baseline dominated by ff-am2 at λ 0.8; λ 1.0 of baseline is the top-ID corner
    for preset, scale, id_, clip in [("baseline", 0.6, 0.30, 0.25), ("baseline", 0.8, 0.40, 0.22),
                                     ("baseline", 1.0, 0.60, 0.18), ("ff-am2", 0.6, 0.35, 0.26),
                                     ("ff-am2", 0.8, 0.45, 0.23), ("ff-am2", 1.0, 0.55, 0.17)]:
        for lora in (1.0, 0.5):
            for metric, value in (("id", id_ - (0.1 if lora == 0.5 else 0)), ("clip", clip)):
                rows.append({"model": "hyper", "preset": preset, "lora_scale": lora, "ip_adapter_scale": scale,
                             "set": "joint", "metric": metric, "value": value})
    rows.append({"model": "hyper", "preset": "ff-am1", "lora_scale": 1.0, "ip_adapter_scale": 0.8, "set": "joint",
                 "metric": "clip", "value": 0.3})  # no ID (no face anywhere): left out
    return rows


def test_front_panels_per_model_and_lora():
    panels = front_panels(_aggregated(), x="clip")
    assert set(panels) == {("hyper", 1.0), ("hyper", 0.5)}
    points = panels[("hyper", 1.0)]
    assert [(p["preset"], p["ip_adapter_scale"]) for p in points] == [
        ("baseline", 0.6), ("baseline", 0.8), ("baseline", 1.0), ("ff-am2", 0.6), ("ff-am2", 0.8), ("ff-am2", 1.0)]
    on = {(p["preset"], p["ip_adapter_scale"]) for p in points if p["on_front"]}
    assert on == {("ff-am2", 0.6), ("ff-am2", 0.8), ("baseline", 1.0)}
    assert front_panels(_aggregated(), x="clip", prompt_set="realistic") == {}


def test_plot_fronts_draws_one_row_per_model_and_lora():
    from PIL import Image
    import io

    png = plot_fronts(_aggregated(), metrics=("clip", "ae"))
    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    assert height > width * 1.2  # two rows (LoRA 1.0 and 0.5), one column (no AE scores)
    assert plot_fronts([r for r in _aggregated() if r["metric"] != "id"]) is None


def test_report_shows_the_fronts(tmp_path):
    """The report's section: one PNG per prompt set, rows per model × LoRA scale, written beside report.html."""
    from test_paper_report import reference_tables, synthetic_run

    from evaluation.report import build_report
    from storage import Store

    tables = reference_tables()
    examples, metrics = synthetic_run(tables)
    examples = [dict(e, ip_adapter_scale=s, example_id=f"{e['example_id']}-{s}") for e in examples
                if e["model"] in ("hyper", "lcm") for s in (0.6, 0.8)]
    by_id = {}
    for m in metrics:
        by_id.setdefault(m["example_id"], []).append(m)
    metrics = [dict(m, example_id=e["example_id"]) for e in examples
               for m in by_id[e["example_id"].rsplit("-", 1)[0]]]
    store = Store(str(tmp_path))
    store.append("examples", examples, "fronts")
    store.append("metrics", metrics, "fronts")
    report = build_report(str(tmp_path), "fronts", bootstrap_samples=20, calibration=False, paper_tables=tables)
    assert {"pareto_joint", "pareto_realistic", "pareto_stylistic"} <= set(report["files"])
    html = (tmp_path / "reports" / "fronts" / "report.html").read_text()
    assert "id='pareto-fronts'" in html and html.count("alt='pareto ") == 3
    from PIL import Image

    with Image.open(tmp_path / "reports" / "fronts" / "pareto_joint.png") as image:
        width, height = image.size
    assert height > width * 0.5  # two model rows (hyper, lcm) × two metric columns (CLIP, AE)

"""The report opened in a real browser (headless Chromium): every image decodes, the paper section is there."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from chromium_cdp import IMAGES_JS, Chromium, find_chromium
from test_paper_report import reference_tables, synthetic_run

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="Chromium is not installed and cannot be installed here (bash scripts/ci-deps.sh installs Debian's "
           "chromium; CI runs it before the tests)")


def _png(seed: int, size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def report_html(tmp_path_factory):
    """A synthetic run with face sizes (Fig. 18), generated images (grids) and an attention-map grid."""
    from evaluation.report import build_report
    from storage import Store

    root = tmp_path_factory.mktemp("store")
    tables = reference_tables()
    examples, metrics = synthetic_run(tables)
    examples = [e for e in examples if e["model"] == "hyper"]
    keep = {e["example_id"] for e in examples}
    rng = np.random.default_rng(0)
    metrics = [m for m in metrics if m["example_id"] in keep]
    metrics += [{"example_id": e, "metric": "face_size", "value": float(rng.uniform(0.05, 0.3))} for e in sorted(keep)]
    store = Store(str(root))
    store.append("examples", examples, "browser")
    store.append("metrics", metrics, "browser")
    photo = store.write_bytes("identity_photos/i0.png", _png(99))
    store.append("identities", [{"identity_id": "i0", "content_hash": "i0", "image_uri": photo, "face_backend": "dlib"}],
                 "browser-dataset")
    shown = [e for e in examples if e["identity_id"] == "i0"]
    generations = [{"example_id": e["example_id"], "status": "ok",
                    "image_uri": store.write_bytes(f"images/browser/{e['example_id']}.png", _png(k))}
                   for k, e in enumerate(shown)]
    store.append("generations", generations, "browser")
    build_report(str(root), "browser", bootstrap_samples=100, calibration=False, paper_tables=tables,
                 attention_maps_png=_png(5, 96))
    return root / "reports" / "browser" / "report.html"


def test_report_in_headless_chromium(report_html, tmp_path):
    with Chromium() as browser:
        browser.open(report_html)
        page = browser.evaluate(IMAGES_JS)
        shot = browser.screenshot(tmp_path / "report.png")
    images = page["images"]
    alts = {i["alt"] for i in images}
    assert {"fig18", "attention maps"} <= alts and len(images) >= 8, json.dumps(page)[:2000]
    broken = [i for i in images if not (i["complete"] and i["naturalWidth"] > 0)]
    assert not broken, broken
    # The overview (header + a row per table), then every published value (header + 224 rows).
    assert page["paperSection"] and page["paperRows"] == (1 + 3) + (1 + 224)
    assert "Paper vs this run" in page["headings"] and any(h.startswith("Fig. 18") for h in page["headings"])
    with Image.open(shot) as image:
        assert image.size == (1280, 1600) and len(set(image.convert("L").getdata())) > 10


def test_the_check_catches_a_broken_image(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><img alt='ok' src='data:image/png;base64,"
                    + __import__("base64").b64encode(_png(1)).decode()
                    + "'><img alt='bad' src='data:image/png;base64,AAAA'></body></html>")
    with Chromium() as browser:
        browser.open(page)
        images = {i["alt"]: i["naturalWidth"] for i in browser.evaluate(IMAGES_JS)["images"]}
    assert images["ok"] == 48 and images["bad"] == 0

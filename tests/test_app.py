"""``fastface app``: bad input shows a message and the app keeps serving; the app driven in headless Chromium."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromium_cdp import Chromium, find_chromium
from metrics_fixtures import sample_photo

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PRESETS = ("baseline", "ff-am2")
SCALES = (0.6, 0.8, 1.0)
PROMPTS = {"p-real": ("a photo of a person in a garden", "realistic"), "p-style": ("an oil painting of a person", "stylistic")}


def _png(seed: int, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def build_store(root: Path) -> None:
    """A small scored run: 2 identities (photos from insightface's wheel) × 2 prompts × 2 presets × 3 λ, one model."""
    from storage import Store, bytes_sha256

    store = Store(str(root))
    identities = []
    for name, photo in (("hanks", "Tom_Hanks_54745.png"), ("t1", "t1.jpg")):
        data = Path(sample_photo(photo)).read_bytes()
        uri = store.write_bytes(f"identity_photos/{name}{Path(photo).suffix}", data)
        identities.append({"identity_id": name, "content_hash": bytes_sha256(data), "image_uri": uri,
                           "face_backend": "dlib"})
    store.append("identities", identities, "demo-dataset")
    rng = np.random.default_rng(0)
    examples, generations, metrics = [], [], []
    for k, (ident, (prompt_id, (prompt, kind)), preset, scale) in enumerate(
            (i, p, pr, s) for i in identities for p in PROMPTS.items() for pr in PRESETS for s in SCALES):
        example_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{ident['identity_id']}/{prompt_id}/{preset}/{scale}").hex
        examples.append({"example_id": example_id, "identity_id": ident["identity_id"],
                         "identity_hash": ident["content_hash"], "prompt_id": prompt_id, "prompt": prompt,
                         "prompt_kind": kind, "model": "tiny-hyper", "preset": preset, "ip_adapter_scale": scale,
                         "lora_scale": 1.0, "seed": 0, "steps": 4, "width": 64, "height": 64, "config_hash": "c",
                         "code_version": "test"})
        generations.append({"example_id": example_id, "status": "ok",
                            "image_uri": store.write_image("demo", example_id, _png(k))})
        gain = 0.05 if preset == "ff-am2" else 0.0
        values = {"id": 0.2 + 0.4 * scale + gain + rng.normal(0, 0.01), "clip": 0.32 - 0.1 * scale + gain / 2,
                  "ae": 5.5 - scale + rng.normal(0, 0.05), "ir": 0.1 - 0.3 * scale}
        metrics += [{"example_id": example_id, "metric": m, "value": float(v)} for m, v in values.items()]
    store.append("examples", examples, "demo")
    store.append("generations", generations, "demo")
    store.append("metrics", metrics, "demo")
    store.append("metrics", metrics[:4], "demo")  # a retried write: the app must not show it twice
    store.write_bytes("reports/demo/report.html", b"<html><body><h1 id='report-title'>FastFace report demo</h1></body></html>")


@pytest.fixture(scope="module")
def app_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-store")
    build_store(root)
    return root


@pytest.fixture(scope="module")
def cache_dir():
    """The tiny models' cache (built once per machine by the suite's other tests)."""
    return os.environ.get("FASTFACE_CACHE") or None


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def post_generate(url: str, fields: dict, photo: bytes | None) -> tuple[int, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, values in fields.items():
        for value in values if isinstance(values, list) else [values]:
            parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    if photo is not None:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"p.png\"\r\n"
                     "Content-Type: image/png\r\n\r\n".encode() + photo + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/generate", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def message(page: str) -> str:
    import re

    found = re.search(r"<p class='msg' id='message'>(.*?)</p>", page, re.S)
    return found.group(1) if found else ""


def test_bad_input_shows_a_message_and_the_app_keeps_serving(app_store, tmp_path, cache_dir):
    from app.server import serve_in_thread
    from storage import Store

    empty = tmp_path / "empty"
    Store(str(empty)).close()  # a store with its tables and no rows
    not_a_store = tmp_path / "plain-folder"
    not_a_store.mkdir()
    servers = []
    try:
        for root, expected in ((tmp_path / "missing", "does not exist"), (not_a_store, "not a FastFace store"),
                               (empty, "holds no evaluated runs")):
            server, url = serve_in_thread(str(root))
            servers.append(server)
            for path in ("/explore", "/compare", "/report"):
                status, page = get(url + path)
                assert status == 200 and expected in message(page) and "Traceback" not in page, (path, page[:2000])
        assert not (tmp_path / "missing").exists()  # the app created nothing

        server, url = serve_in_thread(str(app_store), cache_dir=cache_dir)
        servers.append(server)
        status, page = get(url + "/explore?run=nope")
        assert "no run &#x27;nope&#x27;" in message(page) and "demo" in message(page)
        status, page = get(url + "/explore?run=demo&preset=nonesuch")
        assert "no preset nonesuch" in message(page)
        status, page = get(url + "/explore?run=demo&model=tiny-hyper&cpreset=baseline&lora=x&lam=0.8")
        assert "numbers" in message(page)
        status, page = get(url + "/compare?run=demo&identity=nobody")
        assert "no identity &#x27;nobody&#x27;" in message(page)
        status, page = get(url + "/nowhere")
        assert status == 404 and "/explore" in message(page)
        # a photo without a face: one line naming the problem, no model loaded for nothing
        status, page = post_generate(url, {"prompt": "a person", "model": "tiny-hyper", "preset": ["baseline"],
                                           "lam": "0.8", "seed": "0"}, _png(7, 128))
        assert status == 200 and "face" in message(page).lower() and "Traceback" not in page, page[-2000:]
        status, page = post_generate(url, {"prompt": "a person", "model": "no-such-model", "preset": ["baseline"],
                                           "lam": "0.8", "seed": "0"}, _png(7, 128))
        assert "no-such-model" in message(page)
        status, page = post_generate(url, {"prompt": "a person", "model": "tiny-hyper", "preset": ["baseline"],
                                           "lam": "0.8", "seed": "0"}, b"not an image")
        assert "not an image" in message(page)
        status, page = post_generate(url, {"prompt": "", "model": "tiny-hyper", "preset": ["baseline"]}, None)
        assert "upload a face photo" in message(page)
        # still serving, and serving the good pages
        status, page = get(url + "/explore?run=demo")
        assert status == 200 and not message(page) and page.count("class='front-point") == 6
        assert get(url + "/report?run=demo")[1].count("report-title") == 1
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_reads_are_deduplicated_and_paged(app_store):
    from app.data import Config, StoreReader

    reader = StoreReader(str(app_store))
    rows = reader.front_rows("demo")
    ids = {(r["preset"], r["ip_adapter_scale"]): r for r in rows if r["metric"] == "id"}
    assert len(ids) == 6 and all(r["n"] == 4 for r in ids.values())  # 2 identities × 2 prompts, retried row once
    page0, total = reader.gallery("demo", Config("tiny-hyper", "ff-am2", 1.0, 0.8), page=0, page_size=3)
    page1, _ = reader.gallery("demo", Config("tiny-hyper", "ff-am2", 1.0, 0.8), page=1, page_size=3)
    assert total == 4 and len(page0) == 3 and len(page1) == 1
    assert {e["example_id"] for e in page0}.isdisjoint(e["example_id"] for e in page1)
    assert all(set(e["metrics"]) == {"id", "clip", "ae", "ir"} for e in page0 + page1)
    only_t1, total_t1 = reader.gallery("demo", Config("tiny-hyper", "ff-am2", 1.0, 0.8), identity="t1",
                                       prompt_set="stylistic")
    assert total_t1 == 1 and only_t1[0]["identity_id"] == "t1" and only_t1[0]["prompt_kind"] == "stylistic"


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (bash scripts/ci-deps.sh installs "
                                                    "Debian's chromium; CI runs it before the tests)")
def test_app_in_headless_chromium(app_store, tmp_path, cache_dir):
    """Explore: click a front point → its gallery; Compare: one identity under two presets; Generate: an image from
    an uploaded photo. A screenshot of each tab goes to docs/ (shown in the README)."""
    from app.server import serve_in_thread

    server, url = serve_in_thread(str(app_store), cache_dir=cache_dir)
    shots = {}
    try:
        with Chromium(timeout=300) as browser:
            browser.navigate(url + "/explore?run=demo")
            points = browser.evaluate("[...document.querySelectorAll('circle.front-point')].map(c => "
                                      "[c.dataset.preset, c.dataset.lambda, c.classList.contains('on-front')])")
            assert len(points) == 6 and any(p[2] for p in points) and not all(p[2] for p in points), points
            browser.click("circle.front-point[data-preset='ff-am2'][data-lambda='0.8']")
            gallery = browser.evaluate("""(async () => {
              const imgs = [...document.querySelectorAll('#gallery-cards img')];
              await Promise.all(imgs.map(i => i.decode().catch(() => null)));
              return {title: document.getElementById('gallery').textContent,
                      widths: imgs.map(i => i.naturalWidth),
                      metrics: document.querySelectorAll('#gallery-cards table.metrics tr').length};
            })()""")
            assert "ff-am2" in gallery["title"] and "λ 0.8" in gallery["title"], gallery
            assert gallery["widths"] == [64] * 4 and gallery["metrics"] == 16, gallery
            shots["explore"] = browser.screenshot(tmp_path / "explore.png", width=1280, height=900)

            browser.navigate(url + "/compare?run=demo&identity=hanks&prompt=p-real&seed=0")
            compare = browser.evaluate("""(async () => {
              const cards = [...document.querySelectorAll('#comparison .card')];
              await Promise.all(cards.map(c => c.querySelector('img').decode().catch(() => null)));
              return cards.map(c => [c.dataset.preset, c.dataset.identity, c.querySelector('img').naturalWidth]);
            })()""")
            assert sorted({c[0] for c in compare}) == list(PRESETS) and {c[1] for c in compare} == {"hanks"}, compare
            assert len(compare) == 6 and all(c[2] == 64 for c in compare), compare
            shots["compare"] = browser.screenshot(tmp_path / "compare.png", width=1280, height=900)

            browser.navigate(url + "/generate")
            browser.set_files("#photo", [str(sample_photo("Tom_Hanks_54745.png"))])
            browser.evaluate("document.getElementById('sel-model').value = 'tiny-hyper'")
            browser.click("#run-generate")
            generated = browser.evaluate("""(async () => {
              const imgs = [...document.querySelectorAll('#generated img')];
              await Promise.all(imgs.map(i => i.decode().catch(() => null)));
              return {message: (document.getElementById('message') || {}).textContent || '',
                      images: imgs.map(i => [i.alt, i.naturalWidth])};
            })()""")
            assert not generated["message"], generated
            assert [a for a, _ in generated["images"]] == list(PRESETS) and all(w > 0 for _, w in generated["images"])
            shots["generate"] = browser.screenshot(tmp_path / "generate.png", width=1280, height=700)
        # a stored identity instead of an upload: the same pipeline, the photo read from the store
        from storage import bytes_sha256

        hanks = bytes_sha256(Path(sample_photo("Tom_Hanks_54745.png")).read_bytes())
        status, page = post_generate(url, {"identity": hanks, "prompt": "a portrait", "model": "tiny-hyper",
                                           "preset": ["ff-am2"], "lam": "0.8", "seed": "3"}, None)
        assert status == 200 and not message(page) and page.count("class='generated'") == 1, message(page)
    finally:
        server.shutdown()
        server.server_close()
    for tab, shot in shots.items():
        with Image.open(shot) as image:
            assert len(set(image.convert("L").getdata())) > 10
        if os.environ.get("FASTFACE_UPDATE_SCREENSHOTS"):
            (DOCS / f"app-{tab}.png").write_bytes(shot.read_bytes())


def test_the_report_artifact_links_to_the_app(app_store, monkeypatch):
    """With $FASTFACE_APP_URL, the Prefect artifact's link is the app's /report page, which serves report.html."""
    from app.server import serve_in_thread
    from flows.evaluate import report_link

    server, url = serve_in_thread(str(app_store))
    try:
        monkeypatch.setenv("FASTFACE_APP_URL", url + "/")
        link = report_link("demo", str(app_store / "reports" / "demo" / "report.html"))
        assert link == f"{url}/report?run=demo"
        status, page = get(link)
        assert status == 200 and "FastFace report demo" in page
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.delenv("FASTFACE_APP_URL")
    assert report_link("demo", "/x/report.html") == "file:///x/report.html"
    assert report_link("demo", "s3://b/r/report.html") == "s3://b/r/report.html"

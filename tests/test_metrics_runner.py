"""The runner: every metric batched equals one by one, per-image errors, directories, Parquet output, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from metrics_fixtures import (  # noqa: F401  (fixtures)
    dlib_backend,
    hanks,
    hanks_on_canvas,
    noise_image,
    tiny_clip,
    tiny_clip_dir,
    tiny_head_path,
)
from noise import to_float64, tolerance

from fastface.metrics.base import MetricInput

OURS = ["id", "ffc", "clip", "ae", "fsc", "face_size"]


def _fresh_faces(dlib_backend):
    from fastface.metrics.common import FaceAnalysis

    return FaceAnalysis(dlib_backend)  # a new cache per run: batched and one-by-one both really detect


def _tolerances(inputs, rows, clip, head_path, faces) -> dict[str, float]:
    """Per metric, tests/noise.py's tolerance for ``rows``: the run repeated with CLIP and the aesthetic head
    in float64. ClipModel still rounds its embeddings to float32 (half an ulp, below the floor's 8-ulp
    minimum); the face metrics have no float32 path to differ by, so theirs is that minimum."""
    from fastface.metrics.runner import build_metrics, score_images

    clip64 = dataclasses.replace(clip, model=to_float64(clip.model))
    built = build_metrics(OURS, clip=clip64, aesthetic_checkpoint=head_path, faces=faces)
    built["ae"].head = to_float64(built["ae"].head)
    rows64 = score_images(inputs, OURS, batch_size=len(inputs), built=built, progress=False)
    pairs = {m: [(a["value"], b["value"]) for a, b in zip(rows, rows64) if a["metric"] == m and a["value"] is not None]
             for m in OURS}
    return {m: tolerance(*zip(*p)) for m, p in pairs.items()}


@pytest.fixture(scope="module")
def mixed_inputs(hanks, hanks_on_canvas):
    mirrored = np.ascontiguousarray(hanks_on_canvas[:, ::-1])
    return [
        MetricInput(image=hanks_on_canvas, prompt="a watercolor painting; person in a park", source_image=hanks, key="a"),
        MetricInput(image=mirrored, prompt="a photo of a person at the beach", source_image=hanks, key="b"),
        MetricInput(image=noise_image(5), prompt="anime style; person reading", source_image=hanks, key="c"),
        MetricInput(image=Image.fromarray(hanks), prompt="pop art; person smiling", source_image=hanks, key="d"),
        MetricInput(image=noise_image(6, (64, 200)), prompt="a portrait photo", source_image=hanks, key="e"),
    ]


def test_batched_equals_one_by_one_for_every_metric(mixed_inputs, tiny_clip, tiny_clip_dir, tiny_head_path, dlib_backend):
    from fastface.metrics.runner import score_images

    common = dict(clip=tiny_clip, aesthetic_checkpoint=tiny_head_path, progress=False)
    faces = _fresh_faces(dlib_backend)
    batched = score_images(mixed_inputs, OURS, batch_size=5, faces=faces, **common)
    single = score_images(mixed_inputs, OURS, batch_size=1, faces=_fresh_faces(dlib_backend), **common)
    assert [(r["key"], r["metric"]) for r in batched] == [(i.key, m) for i in mixed_inputs for m in OURS]
    # Batched and one by one: two float32 layouts of one computation, within each metric's measured floor.
    tol = _tolerances(mixed_inputs, batched, tiny_clip, tiny_head_path, faces)  # its detections cached
    for a, b in zip(batched, single):
        assert a["error"] is None and b["error"] is None, (a, b)
        assert (a["value"] is None) == (b["value"] is None), (a, b)
        if a["value"] is not None:
            assert abs(a["value"] - b["value"]) <= tol[a["metric"]], (a, b, tol)
        assert a["detail"] == b["detail"]
        json.dumps(a["detail"])
    values = {(r["key"], r["metric"]): r["value"] for r in batched}
    assert values["a", "fsc"] is not None and values["b", "fsc"] is None  # stylistic vs realistic prompt
    assert values["c", "ffc"] == 1.0 and values["c", "id"] is None
    # With the models loaded by the runner itself (one CLIP shared by clip, ae and fsc).
    loaded = score_images(mixed_inputs[:2], ["clip", "ae", "fsc"], clip_model=str(tiny_clip_dir), clip_pretrained=None,
                          aesthetic_checkpoint=tiny_head_path, faces=_fresh_faces(dlib_backend), progress=False)
    for row in loaded:
        if row["value"] is not None:
            assert abs(row["value"] - values[row["key"], row["metric"]]) <= tol[row["metric"]], (row, tol)


def test_runner_loads_one_clip_model_for_clip_ae_and_fsc(monkeypatch, tiny_clip, tiny_head_path, dlib_backend):
    from fastface.metrics import clip_models, runner

    calls = []

    def fake_load(*args, **kwargs):
        calls.append(args)
        return tiny_clip

    monkeypatch.setattr(clip_models, "load_clip_model", fake_load)
    built = runner.build_metrics(["clip", "ae", "fsc"], aesthetic_checkpoint=tiny_head_path,
                                 faces=_fresh_faces(dlib_backend))
    assert len(calls) == 1
    assert built["clip"].clip is built["ae"].clip is built["fsc"].clip


def test_unknown_metric_and_option_are_rejected():
    from fastface.metrics.runner import build_metrics

    with pytest.raises(KeyError, match="Did you mean 'clip'"):
        build_metrics(["clp"])
    with pytest.raises(ValueError, match="fsc_mod"):
        build_metrics(["fsc"], fsc_mod="authors")


@pytest.fixture
def bad_files(tmp_path, hanks_on_canvas):
    good = tmp_path / "good.png"
    Image.fromarray(hanks_on_canvas).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)).save(tmp_path / "deep16.png")
    Image.fromarray(hanks_on_canvas).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(hanks_on_canvas).convert("P").save(tmp_path / "palette.png")
    return tmp_path


def test_bad_inputs_become_error_rows_and_the_rest_is_scored(bad_files, tiny_clip, tiny_head_path, dlib_backend):
    from fastface.metrics.runner import score_images

    names = ["good.png", "missing.png", "empty.png", "text.png", "deep16.png", "cmyk.jpg", "palette.png"]
    inputs = [MetricInput(image=bad_files / n, prompt="oil painting; person", source_image=bad_files / "good.png", key=n)
              for n in names]
    inputs.append(MetricInput(image=np.zeros((0, 8, 3), np.uint8), prompt="x; y", key="zero-size"))
    rows = score_images(inputs, OURS, batch_size=3, clip=tiny_clip, aesthetic_checkpoint=tiny_head_path,
                        faces=_fresh_faces(dlib_backend), progress=False)
    by = {}
    for row in rows:
        by.setdefault(row["key"], []).append(row)
    expected_errors = {"missing.png": "not found", "empty.png": "empty", "text.png": "not a readable image",
                       "deep16.png": "16-bit", "zero-size": "zero size"}
    for key, fragment in expected_errors.items():
        assert len(by[key]) == len(OURS)
        for row in by[key]:
            assert row["value"] is None and "cannot read image" in row["error"] and fragment in row["error"], row
    for key in ("good.png", "cmyk.jpg", "palette.png"):  # converted to RGB and scored
        for row in by[key]:
            assert row["error"] is None, row
        assert {r["metric"]: r["value"] for r in by[key]}["ffc"] == 0.0


def test_prompts_file_forms(tmp_path):
    from fastface.metrics.runner import read_prompts_file

    expected = [{"image": "0.png", "prompt": "a; b", "face": "f.png"}, {"image": "1.png", "prompt": "c", "face": None}]
    (tmp_path / "p.tsv").write_text("# image\tprompt\tface\n0.png\ta; b\tf.png\n\n1.png\tc\n")
    (tmp_path / "p.csv").write_text("image,prompt,face\n0.png,a; b,f.png\n1.png,c,\n")
    (tmp_path / "p.json").write_text(json.dumps({"0.png": {"prompt": "a; b", "face": "f.png"}, "1.png": "c"}))
    (tmp_path / "p.jsonl").write_text('{"image": "0.png", "prompt": "a; b", "face": "f.png"}\n{"image": "1.png", "prompt": "c"}\n')
    for name in ("p.tsv", "p.csv", "p.json", "p.jsonl"):
        assert read_prompts_file(tmp_path / name) == expected, name
    (tmp_path / "bad.tsv").write_text("only-one-field\n")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        read_prompts_file(tmp_path / "bad.tsv")


def test_score_directory_writes_parquet_and_the_cli_runs(tmp_path, hanks, hanks_on_canvas, tiny_clip_dir,
                                                         tiny_head_path, dlib_backend, capsys):
    import pyarrow.parquet as pq

    from fastface.metrics.runner import main, score_directory

    images, faces_dir = tmp_path / "images", tmp_path / "faces"
    images.mkdir()
    faces_dir.mkdir()
    Image.fromarray(hanks).save(faces_dir / "hanks.png")
    Image.fromarray(hanks_on_canvas).save(images / "0.png")
    Image.fromarray(noise_image(9)).save(images / "1.png")
    prompts = tmp_path / "prompts.tsv"
    prompts.write_text("0.png\tcomic book; person in a park\thanks.png\n1.png\ta photo of a person\thanks.png\n"
                       "2.png\tmissing image\thanks.png\n")
    options = dict(clip_model=str(tiny_clip_dir), clip_pretrained=None, aesthetic_checkpoint=str(tiny_head_path),
                   faces=_fresh_faces(dlib_backend), progress=False)
    rows = score_directory(images, prompts, faces_dir, OURS, tmp_path / "out.parquet", **options)
    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(table) == len(rows) == 3 * len(OURS)
    assert {r["key"] for r in table} == {"0.png", "1.png", "2.png"}
    id_row = next(r for r in table if r["key"] == "0.png" and r["metric"] == "id")
    assert id_row["value"] > 0.9 and json.loads(id_row["detail"])["face_found"] is True
    assert all(r["error"] for r in table if r["key"] == "2.png")

    main(["--images", str(images), "--prompts", str(prompts), "--faces", str(faces_dir), "--metrics", "ffc", "clip",
          "--clip-model", str(tiny_clip_dir), "--face-backend", "dlib", "--out", str(tmp_path / "cli.csv"),
          "--no-progress"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["ffc"]["value"] == 1.0 and summary["ffc"]["errors"] == 1
    assert summary["clip"]["n"] == 2
    assert (tmp_path / "cli.csv").read_text().startswith("key,metric,value,detail,error")

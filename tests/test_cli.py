"""The fastface CLI on the tiny checkpoints (offline, dlib), its errors, and the pipeline benchmark."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastface import cli
from fastface.cli import main, read_batch_file

from noise import DISTINCT, float64_tolerance

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a person in a garden"


def generate(cache, face, out, *extra):
    return main(["generate", "--face", str(face), "--prompt", PROMPT, "--out", str(out), "--cache-dir", str(cache),
                 "--no-progress", *extra])


def sidecar(png: Path) -> dict:
    return json.loads(png.with_suffix(".json").read_text())


@pytest.mark.parametrize(
    "preset, rows", [("baseline", 4), ("dcg", 10), ("am1", 4), ("am2", 12), ("ff-am1", 10), ("ff-am2", 12)]
)
def test_generate_every_preset(fastface_cache, face_photo, tmp_path, preset, rows):
    out = tmp_path / f"{preset}.png"
    assert generate(fastface_cache, face_photo, out, "--model", "tiny-hyper", "--preset", preset, "--size", "32") == 0
    image = Image.open(out)
    assert image.size == (32, 32) and image.mode == "RGB"
    meta = sidecar(out)
    assert (meta["model"], meta["preset"], meta["face_backend"], meta["seed"]) == ("tiny-hyper", preset, "dlib", 0)
    assert meta["unet_rows"] == rows  # branch skipping (method-spec §5) reached through the CLI
    assert meta["prompt"] == PROMPT and meta["face"] == str(face_photo)


@pytest.mark.parametrize("model, size", [("tiny-hyper", 64), ("tiny-lightning", 64), ("tiny-lcm", 64),
                                         ("tiny-turbo", 32)])
def test_generate_every_tiny_model(fastface_cache, face_photo, tmp_path, model, size):
    out = tmp_path / "image.png"
    assert generate(fastface_cache, face_photo, out, "--model", model, "--preset", "ff-am2") == 0
    assert Image.open(out).size == (size, size)
    meta = sidecar(out)
    assert meta["model"] == model and meta["steps"] == 4 and meta["height"] == size


@pytest.mark.parametrize("preset", ["baseline", "dcg", "am1", "am2", "ff-am1", "ff-am2"])
@pytest.mark.parametrize("model", ["tiny-hyper", "tiny-lightning", "tiny-lcm", "tiny-turbo"])
def test_generate_every_preset_on_every_tiny_model(fastface_cache, face_photo, tmp_path, model, preset):
    out = tmp_path / "image.png"
    assert generate(fastface_cache, face_photo, out, "--model", model, "--preset", preset, "--size", "32") == 0
    assert Image.open(out).size == (32, 32)
    meta = sidecar(out)
    assert (meta["model"], meta["preset"], meta["face_backend"]) == (model, preset, "dlib")


def test_batch_file_matches_single_runs(fastface_cache, face_photo, tmp_path):
    batch = tmp_path / "jobs.jsonl"
    rows = [{"face": str(face_photo), "prompt": PROMPT, "seed": 3, "out": "a.png"},
            {"face": str(face_photo), "prompt": "a portrait, oil painting", "out": "b.png"},
            {"face": str(face_photo), "prompt": PROMPT, "seed": 4}]
    batch.write_text("\n".join(json.dumps(r) for r in rows))
    outdir = tmp_path / "batch"
    assert main(["generate", "--batch-file", str(batch), "--out", str(outdir), "--model", "tiny-hyper",
                 "--preset", "baseline", "--size", "32", "--batch-size", "2", "--seed", "7",
                 "--cache-dir", str(fastface_cache), "--no-progress"]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["00002.json", "00002.png", "a.json", "a.png",
                                                        "b.json", "b.png"]
    assert sidecar(outdir / "b.png")["seed"] == 7 and sidecar(outdir / "a.png")["batch_size"] == 2
    single = tmp_path / "single.png"
    assert generate(fastface_cache, face_photo, single, "--model", "tiny-hyper", "--preset", "baseline",
                    "--size", "32", "--seed", "3") == 0
    batched, alone = (np.asarray(Image.open(p), dtype=np.int16) for p in (outdir / "a.png", single))
    # Same image batched or alone: the float images agree within their noise floor, far below one 8-bit
    # level (test_pipeline's batch test), so their 8-bit roundings differ by at most one level; another
    # seed's image by far more (DISTINCT levels; tests/noise.py).
    assert np.abs(batched - alone).max() <= 1
    assert np.abs(batched - np.asarray(Image.open(outdir / "00002.png"), dtype=np.int16)).max() > DISTINCT


def test_read_batch_file_csv_and_tsv(tmp_path):
    (tmp_path / "faces").mkdir()
    (tmp_path / "jobs.csv").write_text('face,prompt,seed,out\nfaces/a.png,"a photo, smiling",5,x.png\n')
    (tmp_path / "jobs.tsv").write_text("face\tprompt\nfaces/b.png\ta photo\n")
    csv_jobs = read_batch_file(tmp_path / "jobs.csv", tmp_path / "out", default_seed=1)
    tsv_jobs = read_batch_file(tmp_path / "jobs.tsv", tmp_path / "out", default_seed=1)
    assert (csv_jobs[0].face, csv_jobs[0].prompt, csv_jobs[0].seed, csv_jobs[0].out) == (
        tmp_path / "faces/a.png", "a photo, smiling", 5, tmp_path / "out/x.png")
    assert (tsv_jobs[0].seed, tsv_jobs[0].out.name) == (1, "00000.png")
    (tmp_path / "bad.csv").write_text("face,text\na.png,hello\n")
    with pytest.raises(ValueError, match="needs 'face' and 'prompt'"):
        read_batch_file(tmp_path / "bad.csv", tmp_path, 0)


def run_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")
    return err


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "cached_pipeline", fail)


def test_errors_are_clear_and_early(capsys, fastface_cache, face_photo, tmp_path, no_loading):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((160, 160, 3), 128, np.uint8)).save(blank)
    base = ["generate", "--prompt", "p", "--out", str(tmp_path / "x.png"), "--cache-dir", str(fastface_cache)]
    err = run_error(capsys, base + ["--face", str(blank), "--model", "tiny-hyper"])
    assert f"no face found in {blank}" in err
    err = run_error(capsys, base + ["--face", str(face_photo), "--model", "tiny-hyper", "--preset", "ff-am3"])
    assert "unknown preset 'ff-am3'" in err and "ff-am2" in err and "baseline" in err
    err = run_error(capsys, base + ["--face", str(face_photo), "--model", "hyperr"])
    assert "unknown model 'hyperr'" in err and "tiny-lcm" in err and "lightning" in err
    err = run_error(capsys, base + ["--face", str(face_photo), "--model", "tiny-hyper", "--preset", "dcg",
                                    "--steps", "2"])
    assert "preset 'dcg'" in err and "2 steps" in err
    err = run_error(capsys, base + ["--face", str(face_photo), "--model", "tiny-hyper",
                                    "--face-backend", "insightface"])
    assert "512-d" in err and "128-d" in err and "--face-backend dlib" in err
    err = run_error(capsys, base + ["--face", str(tmp_path / "missing.png"), "--model", "tiny-hyper"])
    assert "missing.png not found" in err
    with pytest.raises(ValueError):  # --debug re-raises instead of printing
        main(["--debug"] + base + ["--face", str(blank), "--model", "tiny-hyper"])


def test_faces_compare(capsys, face_photo, tmp_path):
    assert main(["faces", "compare", str(face_photo), str(face_photo), "--backend", "dlib", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # cosine of an embedding with itself, in float64: a·a/(|a|·|a|) over 128 entries, about 2·128 + 3
    # roundings (tests/noise.py); printed in JSON with repr precision
    assert abs(result["similarity"] - 1.0) <= float64_tolerance(1.0, ops=2 * 128 + 3) and result["same_person"] is True
    assert result["backend"] == "dlib" and 0 < result["threshold"] < 1
    flipped = tmp_path / "flipped.png"
    Image.open(face_photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(flipped)
    assert main(["faces", "compare", str(face_photo), str(flipped), "--backend", "dlib"]) == 0
    assert "same person" in capsys.readouterr().out
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(blank)
    err = run_error(capsys, ["faces", "compare", str(face_photo), str(blank), "--backend", "dlib"])
    assert f"no face found in {blank}" in err


def test_presets_and_models_tables(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    ff_am2 = next(line for line in out.splitlines() if line.startswith("ff-am2"))
    assert "[1,1.5,1.5,1]" in ff_am2 and "[1,3,3,1]" in ff_am2 and "0.75" in ff_am2 and "adain=0.7" in ff_am2
    assert "p=1.3" in next(line for line in out.splitlines() if line.startswith("am1"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    hyper = next(line for line in out.splitlines() if line.startswith("hyper "))
    assert "[1,2,4,8]" in hyper and "1024" in hyper and "DDIMScheduler" in hyper
    assert "FASTFACE_SDXL_BASE" in out and "ByteDance/SDXL-Lightning" in out
    assert main(["models", "--json"]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} >= {"hyper", "tiny-turbo", "base"}


def test_score_subcommand_is_registered(capsys):
    with pytest.raises(SystemExit) as info:
        main(["score", "--help"])
    assert info.value.code == 0 and "--images" in capsys.readouterr().out


def console_script() -> str:
    script = Path(sys.executable).with_name("fastface")
    if not script.exists():
        pytest.skip("the fastface console script is not installed in this environment")
    return str(script)


def test_console_script_generates_and_missing_weights_fail_cleanly(fastface_cache, face_photo, tmp_path):
    out = tmp_path / "cli.png"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    for name in [k for k in env if k.startswith("FASTFACE_")]:
        del env[name]
    done = subprocess.run(
        [console_script(), "generate", "--model", "tiny-lightning", "--preset", "ff-am1", "--face", str(face_photo),
         "--prompt", PROMPT, "--out", str(out), "--size", "32", "--cache-dir", str(fastface_cache)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (32, 32) and sidecar(out)["model"] == "tiny-lightning"

    # The real `hyper` with no weights and no network (offline, empty HF cache).
    done = subprocess.run(
        [console_script(), "generate", "--model", "hyper", "--face", str(face_photo), "--prompt", PROMPT,
         "--out", str(tmp_path / "hyper.png"), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "model 'hyper'" in done.stderr and "stabilityai/stable-diffusion-xl-base-1.0" in done.stderr
    assert "FASTFACE_SDXL_BASE" in done.stderr and "--source sdxl_base=PATH" in done.stderr
    assert not (tmp_path / "hyper.png").exists()


def test_benchmark_prints_ratios(fastface_cache, capsys):
    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--repeats", "1", "--batch-sizes", "1", "2", "--images", "2", "--presets", "baseline",
                       "--size", "32", "--cache-dir", str(fastface_cache)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("preset"))
    assert "ratio" in header.split() and "rows/img" in header.split()
    rows = [line.split() for line in lines if line.startswith("baseline")]
    assert [(r[1], r[2]) for r in rows] == [("ref", "1"), ("ours", "1"), ("ours", "2")]
    assert float(rows[0][4]) == 12.0 and float(rows[1][4]) == 4.0  # all 3 branches vs branch 2 alone
    assert float(rows[1][6]) == 3.0  # rows ratio 12 / 4, printed "3.00": exact


def test_sdxl_unet_config_has_sdxl_shapes():
    import torch
    from diffusers import UNet2DConditionModel

    spec = importlib.util.spec_from_file_location("bench_pipeline", ROOT / "benchmarks" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**bench.SDXL_UNET_CONFIG)
    assert 2.55e9 < sum(p.numel() for p in unet.parameters()) < 2.58e9  # SDXL-base UNet: 2.567 B

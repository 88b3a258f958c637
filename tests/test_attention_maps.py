"""`fastface attention-maps`: maps captured from the generating processors, drawn as a preset × (part, step) grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from metrics_fixtures import sample_photo
from noise import DISTINCT, float32_noise, tolerance

SIZE = 32  # tiny-hyper at 32², 4 steps


def test_recorder_is_off_by_default_and_changes_nothing(tiny_pipe_and_identity, pipe64):
    from fastface.attention_maps import AttentionMapRecorder

    pipe, identity = tiny_pipe_and_identity
    kwargs = dict(id_embeds=[identity.embedding], face_crops=[identity.crop_bgr], seeds=[3], num_inference_steps=4,
                  height=SIZE, width=SIZE, output_type="np")
    for preset in ("baseline", "am2"):
        plain = pipe("a photo of a person", preset=preset, **kwargs).images
        recorder = AttentionMapRecorder(latent_hw=(SIZE, SIZE))
        recorded = pipe("a photo of a person", preset=preset, attention_recorder=recorder, **kwargs).images
        with float32_noise():
            plain64 = pipe64("a photo of a person", preset=preset, **kwargs).images
        # Capture never changes the image: our processor on every layer is another float32 path of the
        # same attention, within the noise floor |float32 − float64| of the plain image (tests/noise.py).
        assert np.abs(recorded - plain).max() <= tolerance(plain, plain64)
        maps = recorder.maps()
        assert sorted(maps) == [(p, s) for p in ("down", "up") for s in range(4)]
        assert all(m.shape[:2] == (1, 4) for m in maps.values())  # one image, four identity tokens
        if preset == "baseline":  # softmax probabilities over the four tokens: they sum to 1 at every position
            # up to the noise floor of that sum: the float64 pipeline's, through the same recorder (tests/noise.py)
            recorder64 = AttentionMapRecorder(latent_hw=(SIZE, SIZE))
            with float32_noise():
                pipe64("a photo of a person", preset=preset, attention_recorder=recorder64, **kwargs)
            total, total64 = (m[("up", 2)].sum(axis=1) for m in (maps, recorder64.maps()))
            assert np.abs(total - 1.0).max() <= tolerance(total, total64)


def test_attention_maps_command_writes_the_grid(tmp_path, tiny_pipe_and_identity, pipe64):
    from fastface import attention_maps
    from fastface.cli import main

    out = tmp_path / "maps.png"
    photo = sample_photo("Tom_Hanks_54745.png")
    code = main(["attention-maps", "--model", "tiny-hyper", "--face", str(photo), "--prompt", "a photo of a person",
                 "--preset", "baseline", "--preset", "am1", "--preset", "am2", "--size", str(SIZE), "--out", str(out)])
    assert code == 0 and out.is_file()

    # The same capture, in process, to read the maps and the grid's layout.
    pipe, identity = tiny_pipe_and_identity
    capture = {"prompt": "a photo of a person", "id_embed": identity.embedding, "face_crop": identity.crop_bgr,
               "presets": ["baseline", "am1", "am2"], "size": SIZE}
    maps = attention_maps.capture_attention_maps(pipe, **capture)
    with float32_noise():
        maps64 = attention_maps.capture_attention_maps(pipe64, **capture)
    grid, layout = attention_maps.render_grid(maps)
    assert layout.rows == tuple((p, t) for p in ("baseline", "am1", "am2") for t in range(4))
    assert layout.columns == tuple((part, s) for part in ("down", "up") for s in range(4))
    with Image.open(out) as written:
        assert written.size == grid.size == (layout.left + 8 * layout.cell, layout.top + 12 * layout.cell)
        pixels = np.asarray(written.convert("RGB")).astype(int)
    for key in layout.columns:
        for preset in ("am1", "am2"):  # AM changes the maps the processors use, at every targeted step
            # by far more than rounding: the larger noise floor (float64 capture, tests/noise.py) of the two
            tol = max(tolerance(maps[p][key], maps64[p][key]) for p in (preset, "baseline"))
            assert np.abs(maps[preset][key] - maps["baseline"][key]).max() > DISTINCT * tol, (preset, key)

    def cell(row, column):
        x1, y1, x2, y2 = layout.box(row, column)
        return pixels[y1:y2, x1:x2]

    for column in range(len(layout.columns)):
        # 8-bit colour levels, not a float tolerance: the maps were compared to their noise floor above;
        # here only that the drawn cells show the difference (more than a level on average)
        for preset_row in (4, 8):  # am1 / am2, token 0, against baseline token 0
            assert np.abs(cell(preset_row, column) - cell(0, column)).mean() > 1.0


def test_attention_maps_command_rejects_bad_input(tmp_path, capsys):
    from fastface.cli import main

    photo = sample_photo("Tom_Hanks_54745.png")
    code = main(["attention-maps", "--model", "tiny-hyper", "--face", str(photo), "--prompt", "x",
                 "--preset", "nope", "--out", str(tmp_path / "m.png")])
    assert code == 2 and "nope" in capsys.readouterr().err
    code = main(["attention-maps", "--model", "tiny-hyper", "--face", str(tmp_path / "missing.png"), "--prompt", "x",
                 "--preset", "am1", "--out", str(tmp_path / "m.png")])
    assert code == 2 and "not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_pipe_and_identity():
    from fastface.cli import cached_pipeline
    from fastface.faces import get_face_backend, prepare_identity

    try:
        backend = get_face_backend("dlib")
    except ImportError as exc:
        pytest.skip(f"dlib backend unavailable: {exc}")
    torch.manual_seed(0)
    # The pipeline `fastface attention-maps` loads (same key), so the command reuses it.
    pipe = cached_pipeline("tiny-hyper", device=None, dtype=None, lora_scale=1.0, steps=4, cache_dir=None)
    identity = prepare_identity(sample_photo("Tom_Hanks_54745.png"), backend)
    return pipe, identity


@pytest.fixture(scope="module")
def pipe64(tiny_pipe_and_identity):
    """A float64 copy of the pipeline: the reference run that measures float32's noise floor (tests/noise.py)."""
    import copy

    return copy.deepcopy(tiny_pipe_and_identity[0]).to(dtype=torch.float64)

"""CLIP, AE and FSC on a tiny random open_clip model, checked against the model's own encoders and the formulas."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
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
from noise import DISTINCT, to_float64, tolerance

from fastface.metrics.base import MetricInput


@pytest.fixture(scope="module")
def reference(tiny_clip_dir):
    """The same folder loaded by open_clip itself: model, its own eval transform, tokenizer."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")


@pytest.fixture(scope="module")
def reference64(reference):
    """The reference in float64: the rerun that measures float32's noise floor (tests/noise.py)."""
    model, preprocess, tokenizer = reference
    return to_float64(model), preprocess, tokenizer


def _ref_image_emb(reference, images):
    model, preprocess, _ = reference
    pixels = torch.stack([preprocess(Image.fromarray(x)) for x in images])
    return _ref_pixels_emb(model, pixels)


def _ref_pixels_emb(model, pixels):
    with torch.no_grad():
        features = model.encode_image(pixels.to(next(model.parameters()).dtype))
    return features / features.norm(dim=-1, keepdim=True)


def _ref_text_emb(reference, texts):
    model, _, tokenizer = reference
    with torch.no_grad():
        features = model.encode_text(tokenizer(texts))
    return features / features.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- loading


def test_openai_weights_get_quickgelu_architecture():
    from fastface.metrics.clip_models import resolve_clip_architecture

    assert resolve_clip_architecture("ViT-L-14", "openai") == ("ViT-L-14-quickgelu", True)
    assert resolve_clip_architecture("ViT-L-14-quickgelu", "openai") == ("ViT-L-14-quickgelu", True)
    assert resolve_clip_architecture("ViT-L-14", "laion2b_s32b_b82k") == ("ViT-L-14", False)


def test_quickgelu_false_with_openai_weights_is_refused():
    from fastface.metrics.clip_models import load_clip_model

    with pytest.raises(ValueError, match="QuickGELU"):
        load_clip_model("ViT-L-14", "openai", quick_gelu=False, device="cpu")


def test_loaded_activations_follow_the_config(tiny_clip, tmp_path):
    from open_clip.transformer import QuickGELU

    from fastface.metrics.clip_models import load_clip_model, save_tiny_clip

    acts = {type(m) for m in tiny_clip.model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    assert acts == {QuickGELU} and tiny_clip.quick_gelu
    plain = load_clip_model(save_tiny_clip(tmp_path / "gelu", quick_gelu=False), device="cpu")
    assert not plain.quick_gelu
    assert not any(isinstance(m, QuickGELU) for m in plain.model.modules())
    forced = load_clip_model(tmp_path / "gelu", device="cpu", quick_gelu=True)
    assert forced.quick_gelu


def test_state_dict_files_and_env_var_load_the_same_weights(tiny_clip, tiny_clip_dir, reference64, tmp_path, monkeypatch):
    import open_clip
    from safetensors.torch import load_file

    from fastface.metrics import clip_models

    # A built-in-style architecture name plus a weights file (.safetensors and a torch .bin state dict).
    config = json.loads((tiny_clip_dir / "open_clip_config.json").read_text())
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "FastFaceTiny-quickgelu.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "configs")
    state = load_file(str(tiny_clip_dir / "open_clip_model.safetensors"))
    torch.save(state, tmp_path / "weights.bin")
    texts = ["a watercolor painting"]
    expected = tiny_clip.encode_texts(texts)
    # The same weights loaded another way: two float32 runs of one computation, within the noise floor
    # of these embeddings measured against their float64 rerun (tests/noise.py).
    tol = tolerance(expected, _ref_text_emb(reference64, texts))
    for weights in (tiny_clip_dir / "open_clip_model.safetensors", tmp_path / "weights.bin"):
        loaded = clip_models.load_clip_model("FastFaceTiny-quickgelu", weights, device="cpu")
        assert loaded.quick_gelu
        assert (loaded.encode_texts(texts) - expected).abs().max() <= tol
    monkeypatch.setenv(clip_models.CLIP_PATH_ENV, str(tiny_clip_dir))
    from_env = clip_models.load_clip_model(device="cpu")  # the defaults, redirected by the env var
    assert from_env.source.startswith("local-dir:")
    assert (from_env.encode_texts(texts) - expected).abs().max() <= tol
    with pytest.raises(FileNotFoundError, match="not found"):
        clip_models.load_clip_model("FastFaceTiny-quickgelu", tmp_path / "missing.safetensors", device="cpu")


def test_hub_id_loads_from_a_hub_cache(tiny_clip, tiny_clip_dir, tmp_path):
    """``hf-hub:<repo>`` through open_clip's hub code, served from a local cache in the hub's layout."""
    import shutil

    from fastface.metrics.clip_models import load_clip_model

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--fastface--tiny-clip"
    (repo / "snapshots" / revision).mkdir(parents=True)
    for file in tiny_clip_dir.iterdir():
        shutil.copy(file, repo / "snapshots" / revision / file.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded = load_clip_model("hf-hub:fastface/tiny-clip", device="cpu", cache_dir=str(tmp_path / "hub"))
    assert loaded.quick_gelu and loaded.source == "hf-hub:fastface/tiny-clip"
    assert torch.equal(loaded.encode_texts(["a sketch"]), tiny_clip.encode_texts(["a sketch"]))
    with pytest.raises(RuntimeError, match="FASTFACE_CLIP_PATH"):
        load_clip_model("hf-hub:fastface/absent", device="cpu", cache_dir=str(tmp_path / "hub"))


# ---------------------------------------------------------------- preprocessing and CLIP


def test_preprocessing_equals_open_clip_transform(tiny_clip, reference):
    _, preprocess, _ = reference
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(50, 70, 3), (97, 31, 3), (32, 32, 3), (300, 200, 3)]]
    ours = tiny_clip.pixel_values(images)
    theirs = torch.stack([preprocess(Image.fromarray(x)) for x in images])
    assert ours.shape == theirs.shape == (4, 3, 32, 32)
    assert torch.equal(ours, theirs)


def test_clip_score_is_raw_cosine_of_the_models_embeddings(tiny_clip, reference, reference64):
    from fastface.metrics.clip_score import ClipScore

    images = [noise_image(s) for s in range(3)]
    prompts = ["a photo of a person", "an oil painting; person in a park", "x"]
    results = ClipScore(tiny_clip).score([MetricInput(image=x, prompt=p) for x, p in zip(images, prompts)])
    values = np.array([r.value for r in results])
    expected = (_ref_image_emb(reference, images) * _ref_text_emb(reference, prompts)).sum(-1)
    # Ours and open_clip's own encoders: two float32 paths, within the floor of the reference's float64 rerun.
    tol = tolerance(expected, (_ref_image_emb(reference64, images) * _ref_text_emb(reference64, prompts)).sum(-1))
    assert np.abs(values - expected.numpy()).max() <= tol
    assert np.diff(np.sort(values)).min() > DISTINCT * tol  # three images, three different scores


def test_clip_without_prompt_is_an_error_row(tiny_clip):
    from fastface.metrics.clip_score import ClipScore

    results = ClipScore(tiny_clip).score([MetricInput(image=noise_image(0)), MetricInput(image=noise_image(1), prompt="a")])
    assert results[0].value is None and "prompt" in results[0].error
    assert results[1].error is None and results[1].value is not None


# ---------------------------------------------------------------- AE


def test_aesthetic_head_state_dict_has_the_published_layout(tiny_head_path, tiny_clip):
    from fastface.metrics.aesthetic import AestheticHead, load_aesthetic_head

    state = torch.load(tiny_head_path, weights_only=True)
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, tiny_clip.embed_dim), (128, 1024), (64, 128), (16, 64), (1, 16)
    ]
    assert AestheticHead(768).layers[0].in_features == 768
    head = load_aesthetic_head(tiny_head_path)
    assert all(torch.equal(head.state_dict()[k], v) for k, v in state.items())
    assert not head.training  # dropout off


def test_aesthetic_score_is_head_on_normalised_embedding(tiny_clip, tiny_head_path, reference, reference64):
    from fastface.metrics.aesthetic import make_aesthetic_score

    state = torch.load(tiny_head_path, weights_only=True)
    # An independent head: the published Linear/Dropout stack, no activations.
    d = tiny_clip.embed_dim
    ref_head = torch.nn.Sequential(
        torch.nn.Linear(d, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1),
    ).eval()
    ref_head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    images = [noise_image(s) for s in range(3)]
    metric = make_aesthetic_score(clip=tiny_clip, aesthetic_checkpoint=tiny_head_path)
    results = metric.score([MetricInput(image=x) for x in images])
    with torch.no_grad():
        expected = ref_head(_ref_image_emb(reference, images)).squeeze(-1)
        expected64 = to_float64(ref_head)(_ref_image_emb(reference64, images)).squeeze(-1)
    # Two float32 paths of one computation: within the floor measured by the float64 rerun (tests/noise.py).
    assert np.abs(np.array([r.value for r in results]) - expected.numpy()).max() <= tolerance(expected, expected64)


def test_aesthetic_checkpoint_missing_offline_names_file_and_env_var(tmp_path, monkeypatch):
    from fastface.metrics.aesthetic import AESTHETIC_PATH_ENV, resolve_aesthetic_checkpoint

    monkeypatch.delenv(AESTHETIC_PATH_ENV, raising=False)
    monkeypatch.setenv("FASTFACE_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        resolve_aesthetic_checkpoint("ava+logos-l14-linearMSE.pth", cache_dir=tmp_path)
    assert "ava+logos-l14-linearMSE.pth" in str(info.value) and AESTHETIC_PATH_ENV in str(info.value)


def test_aesthetic_env_var_file_and_folder(tmp_path, tiny_head_path, monkeypatch):
    from fastface.metrics.aesthetic import AESTHETIC_PATH_ENV, resolve_aesthetic_checkpoint

    monkeypatch.setenv(AESTHETIC_PATH_ENV, str(tiny_head_path))
    assert resolve_aesthetic_checkpoint(cache_dir=tmp_path) == tiny_head_path  # the default head
    folder = tmp_path / "heads"
    folder.mkdir()
    (folder / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(tiny_head_path.read_bytes())
    monkeypatch.setenv(AESTHETIC_PATH_ENV, str(folder))
    found = resolve_aesthetic_checkpoint("sac+logos+ava1-l14-linearMSE.pth", cache_dir=tmp_path)
    assert found == folder / "sac+logos+ava1-l14-linearMSE.pth"


def test_aesthetic_head_must_match_the_clip_embedding(tiny_clip, tmp_path):
    from fastface.metrics.aesthetic import make_aesthetic_score, save_tiny_aesthetic_head

    wrong = save_tiny_aesthetic_head(tmp_path / "head768.pth", 768)
    with pytest.raises(ValueError, match="768"):
        make_aesthetic_score(clip=tiny_clip, aesthetic_checkpoint=wrong)


# ---------------------------------------------------------------- FSC


@pytest.fixture(scope="module")
def faces(dlib_backend):
    from fastface.metrics.common import FaceAnalysis

    return FaceAnalysis(dlib_backend)


def test_fsc_aligned_scores_the_aligned_crop_against_the_style(tiny_clip, faces, hanks_on_canvas, reference, reference64):
    from fastface.faces import aligned_face_crop_bgr
    from fastface.metrics.clip_score import FaceStyleScore

    prompt = "a charcoal sketch; person in a cafe reading"
    [result] = FaceStyleScore(tiny_clip, faces, "aligned").score([MetricInput(image=hanks_on_canvas, prompt=prompt)])
    face = faces.backend.detect(hanks_on_canvas)[0]
    crop_rgb = aligned_face_crop_bgr(hanks_on_canvas, face, size=224)[:, :, ::-1].copy()
    expected = (_ref_image_emb(reference, [crop_rgb]) * _ref_text_emb(reference, ["a charcoal sketch"])).sum()
    expected64 = (_ref_image_emb(reference64, [crop_rgb]) * _ref_text_emb(reference64, ["a charcoal sketch"])).sum()
    # Two float32 paths of one computation: within the floor measured by the float64 rerun (tests/noise.py).
    assert abs(result.value - float(expected)) <= tolerance(expected, expected64)
    assert result.detail["mode"] == "aligned" and result.detail["crop"] == "aligned"
    assert result.detail["style"] == "a charcoal sketch"


def test_fsc_authors_mode_reproduces_their_saturated_box_crop(tiny_clip, faces, hanks_on_canvas, reference, reference64):
    from torchvision import transforms

    from fastface.faces import largest_face
    from fastface.metrics.clip_score import FaceStyleScore, authors_pixel_values

    prompt = "pixar style; person on a beach"
    [result] = FaceStyleScore(tiny_clip, faces, "authors").score([MetricInput(image=hanks_on_canvas, prompt=prompt)])
    assert result.detail["mode"] == "authors" and result.detail["crop"] == "box"
    # The authors' chain, rebuilt from torchvision parts: [-1,1]->[0,1] normalisation applied to 0-255 values,
    # the CLIP resize and centre crop, CLIP normalisation.
    model, preprocess, _ = reference
    resize, crop = preprocess.transforms[0], preprocess.transforms[1]
    chain = transforms.Compose([
        transforms.Normalize(mean=[-1.0] * 3, std=[2.0] * 3),
        transforms.Resize(resize.size, interpolation=resize.interpolation),
        crop,
        preprocess.transforms[-1],
    ])
    x1, y1, x2, y2 = (int(v) for v in largest_face(faces.backend.detect(hanks_on_canvas)).bbox)
    face_tensor = torch.from_numpy(hanks_on_canvas).permute(2, 0, 1)[:, y1:y2, x1:x2].float()
    pixels = chain(face_tensor).unsqueeze(0)
    ours = authors_pixel_values(hanks_on_canvas[y1:y2, x1:x2], tiny_clip)
    # Two float32 runs of the chain: within the floor of the chain rerun in float64 (tests/noise.py).
    assert (ours - pixels).abs().max() <= tolerance(pixels, chain(face_tensor.double()).unsqueeze(0))
    assert pixels.max() > 100  # saturated: what the paper's FSC numbers were computed on
    expected = (_ref_pixels_emb(model, pixels) * _ref_text_emb(reference, ["pixar style"])).sum()
    expected64 = (_ref_pixels_emb(reference64[0], pixels) * _ref_text_emb(reference64, ["pixar style"])).sum()
    tol = tolerance(expected, expected64)
    assert abs(result.value - float(expected)) <= tol
    [aligned] = FaceStyleScore(tiny_clip, faces, "aligned").score([MetricInput(image=hanks_on_canvas, prompt=prompt)])
    assert abs(aligned.value - result.value) > DISTINCT * tol  # another crop: another score, far above rounding


def test_fsc_realistic_prompt_and_no_face_have_no_value(tiny_clip, faces, hanks_on_canvas):
    from fastface.metrics.clip_score import FaceStyleScore

    realistic, no_face = FaceStyleScore(tiny_clip, faces).score([
        MetricInput(image=hanks_on_canvas, prompt="a photo of a person in a park"),
        MetricInput(image=noise_image(3), prompt="anime; person walking"),
    ])
    assert realistic.value is None and realistic.detail == {"mode": "aligned", "stylistic": False}
    assert no_face.value is None and no_face.detail["face_found"] is False and no_face.error is None


def test_fsc_mode_is_validated_before_loading():
    from fastface.metrics.clip_score import make_face_style_score

    with pytest.raises(ValueError, match="fsc_mode"):
        make_face_style_score(fsc_mode="facenet")


# ---------------------------------------------------------------- real weights (FASTFACE_SLOW=1)

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTFACE_SLOW") != "1", reason="needs real CLIP-L/14 and aesthetic weights")
def test_real_clip_l14_and_aesthetic_head():
    from open_clip.transformer import QuickGELU

    from fastface.metrics.aesthetic import make_aesthetic_score
    from fastface.metrics.clip_models import load_clip_model
    from fastface.metrics.clip_score import ClipScore

    clip = load_clip_model()  # ViT-L-14-quickgelu / openai, or $FASTFACE_CLIP_PATH
    assert clip.embed_dim == 768 and any(isinstance(m, QuickGELU) for m in clip.model.modules())
    red = np.zeros((256, 256, 3), np.uint8)
    red[..., 0] = 230
    red_score, blue_score = ClipScore(clip).score(
        [MetricInput(image=red, prompt="a plain red square"), MetricInput(image=red, prompt="a plain blue square")]
    )
    assert red_score.value > blue_score.value and 0.1 < red_score.value < 0.45
    [ae] = make_aesthetic_score(clip=clip).score([MetricInput(image=red)])
    assert 1.0 < ae.value < 9.0

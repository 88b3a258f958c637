"""ImageReward on transformers 5: key map, preprocessing, parity with recorded scores of the original
image-reward 1.5 (tools/ir_parity/), batching, offline loading, the ``ir`` metric."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastface.metrics import image_reward as ir
from fastface.metrics.base import METRICS, MetricInput

import image_reward_builders as builders
from noise import DISTINCT, float32_tolerance, to_float64, tolerance

DATA = Path(__file__).parent / "data" / "image_reward"
PAIRS = [(str(DATA / "images" / name), prompt) for name, prompt in json.loads((DATA / "pairs.json").read_text())]
slow = pytest.mark.skipif(os.environ.get("FASTFACE_SLOW") != "1", reason="slow: set FASTFACE_SLOW=1")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv(ir.ENV_PATH, raising=False)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return builders.write_random_checkpoint(tmp_path_factory.mktemp("ir_tiny"), vision=ir.TINY_VISION, seed=3)


@pytest.fixture(scope="module")
def tiny_scorer(tiny_dir) -> ir.ImageRewardScorer:
    return ir.ImageRewardScorer(tiny_dir, vision=ir.TINY_VISION, device="cpu", batch_size=4)


def _rebuild_recorded_case(name: str, folder: Path) -> tuple[dict, ir.ImageRewardScorer]:
    record = json.loads((DATA / f"parity_{name}.json").read_text())
    params = dict(record["params"])
    vision = ir.VisionTowerConfig(**params.pop("vision"))
    builders.write_random_checkpoint(folder, vision=vision, **params)  # same seed -> the weights the original scored
    return record, ir.ImageRewardScorer(folder, vision=vision, device="cpu", batch_size=6)


def _float64_scores(scorer: ir.ImageRewardScorer, images, prompts) -> np.ndarray:
    """The scorer's model rerun in float64 on the same pixels and tokens: the reference that measures
    float32's noise floor (tests/noise.py). Its forward still rounds the text feature and the reward to
    float32 (as the original does); that is half an ulp each, below the floor's minimum of 8 ulps."""
    model = to_float64(scorer.model)
    ids, mask = scorer.tokenize(prompts)
    pixels = torch.stack([ir.preprocess_image(im, scorer.vision_tower.image_size) for im in images]).double()
    with torch.no_grad():
        return model(pixels, ids, mask).double().numpy()


# ----------------------------------------------------------------------------- parity with the original


def test_matches_scores_recorded_from_the_original(tmp_path):
    """Original image-reward 1.5 (transformers 4.36) scored these pairs with its own BLIP code, on a ViT of
    width 32 / depth 2 and a 768-wide text tower (tools/ir_parity/parity.py, case 'tiny')."""
    record, scorer = _rebuild_recorded_case("tiny", tmp_path)
    assert record["original"]["versions"]["image-reward"] == "1.5" and record["token_ids_equal"]
    assert [tuple(p) for p in record["pairs"]] == [(Path(p).name, t) for p, t in PAIRS]
    ours = scorer.score([p for p, _ in PAIRS], [t for _, t in PAIRS])
    original = np.array(record["original"]["scores"])
    assert np.ptp(original) > 0.5  # the scores differ enough for the comparison to mean something
    # The original's float32 run is one more rounding path of the same math: within the floor of ours
    # measured against its float64 rerun (tests/noise.py).
    tol = tolerance(ours, _float64_scores(scorer, [p for p, _ in PAIRS], [t for _, t in PAIRS]))
    assert np.abs(ours - original).max() <= tol


@slow
def test_matches_scores_recorded_from_the_original_vit_l(tmp_path):
    """Same with the original's unmodified ViT-L/16 (1.3 GB random checkpoint rebuilt from its seed; ~45 s on 2 cores)."""
    record, scorer = _rebuild_recorded_case("vitl", tmp_path)
    ours = scorer.score([p for p, _ in PAIRS], [t for _, t in PAIRS])
    # As above: the floor of ours against its float64 rerun (another minute or two on 2 cores).
    tol = tolerance(ours, _float64_scores(scorer, [p for p, _ in PAIRS], [t for _, t in PAIRS]))
    assert np.abs(ours - np.array(record["original"]["scores"])).max() <= tol


def test_recorded_vit_l_parity_is_within_tolerance():
    """The full-size run is too slow for this suite; its recorded result must hold the bound."""
    record = json.loads((DATA / "parity_vitl.json").read_text())
    assert record["params"]["vision"] == {**ir.VIT_L16.__dict__}
    ours, original = np.array(record["ours"]["scores"]), np.array(record["original"]["scores"])
    # No float64 rerun is recorded for ViT-L (the slow test above measures it): the float32 bound for
    # chains of dot products as long as the vision tower's width, one ulp per term.
    bound = float32_tolerance(ours, original, ops=record["params"]["vision"]["width"])
    assert record["token_ids_equal"] and record["max_abs_diff"] <= bound
    assert np.abs(ours - original).max() == record["max_abs_diff"]  # the same float64 subtraction: exact


# ----------------------------------------------------------------------------- key map and loading


def test_key_map_covers_the_original_layout_exactly():
    med = builders.tiny_med_config(100)
    shapes = builders.original_state_dict_shapes(ir.TINY_VISION, med)
    model = ir.ImageRewardModel(med, ir.TINY_VISION)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    mapped = {ir.map_original_key(k): s for k, s in shapes.items() if ir.map_original_key(k) is not None}
    assert mapped == own
    assert ir.map_original_key("blip.visual_encoder.blocks.1.attn.proj.weight") == (
        "vision.encoder.layers.1.self_attn.projection.weight"
    )
    assert ir.map_original_key("blip.visual_encoder.cls_token") == "vision.embeddings.class_embedding"
    assert ir.map_original_key("blip.text_encoder.encoder.layer.0.crossattention.self.key.weight") == (
        "text.encoder.layer.0.crossattention.self.key.weight"
    )
    assert ir.map_original_key("mlp.layers.7.bias") == "head.layers.7.bias"
    assert ir.map_original_key("blip.text_proj.weight") is None
    with pytest.raises(KeyError, match="unrecognised ImageReward checkpoint key"):
        ir.map_original_key("blip.text_decoder.cls.predictions.bias")


def test_wrong_vision_size_is_a_clear_error(tiny_dir):
    with pytest.raises(ValueError, match="vision tower"):
        ir.ImageRewardScorer(tiny_dir, vision=ir.VisionTowerConfig(width=64, depth=2, heads=4, patch_size=8, image_size=32))


def test_local_folder_loads_without_network(tiny_dir, monkeypatch):
    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("network used")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setenv(ir.ENV_PATH, str(tiny_dir))
    s = ir.ImageRewardScorer(vision=ir.TINY_VISION, device="cpu")  # checkpoint from the env var
    assert s.checkpoint == tiny_dir / "ImageReward.pt"
    assert len(s.tokenizer) == s.med_config["vocab_size"]  # vocab.txt beside it + [DEC], [ENC]


@pytest.mark.parametrize("where", ["folder", "hub"])
def test_missing_checkpoint_says_where_to_put_it(tmp_path, monkeypatch, where):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    target = str(tmp_path / "nowhere") if where == "folder" else "THUDM/ImageReward"
    with pytest.raises(FileNotFoundError) as e:
        ir.ImageRewardScorer(target, vision=ir.TINY_VISION)
    for needed in ("ImageReward.pt", "med_config.json", "THUDM/ImageReward", "FASTFACE_IMAGEREWARD_PATH"):
        assert needed in str(e.value)


def test_missing_tokenizer_offline_is_a_clear_error(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("ImageReward.pt", "med_config.json"):
        (bare / f).symlink_to(tiny_dir / f)
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        ir.ImageRewardScorer(bare, vision=ir.TINY_VISION)
    (bare / "tokenizer").mkdir()  # a tokenizer folder beside the checkpoint is found too
    (bare / "tokenizer" / "vocab.txt").symlink_to(tiny_dir / "vocab.txt")
    assert len(ir.ImageRewardScorer(bare, vision=ir.TINY_VISION, device="cpu").tokenizer) == len(builders.tiny_vocab()) + 2
    with pytest.raises(ValueError, match="does not belong to this checkpoint"):
        ir.ImageRewardScorer(bare, tokenizer=tiny_dir / "med_config.json", vision=ir.TINY_VISION)


# ----------------------------------------------------------------------------- preprocessing and prompts


def test_preprocessing_equals_the_originals_torchvision_transform():
    tv = pytest.importorskip("torchvision.transforms")
    from PIL import Image

    original = tv.Compose([
        tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC),
        tv.CenterCrop(224),
        lambda im: im.convert("RGB"),
        tv.ToTensor(),
        tv.Normalize(ir.IMAGE_MEAN, ir.IMAGE_STD),
    ])  # fmt: skip
    original64 = tv.Compose([*original.transforms[:3], tv.PILToTensor(), lambda t: t.double() / 255, original.transforms[-1]])
    modes = set()
    for path, _ in PAIRS[::2]:
        img = Image.open(path)
        modes.add(img.mode)
        ours, theirs = ir.preprocess_image(path), original(img)
        # Two float32 runs of one normalisation: within the floor of theirs rerun in float64 (tests/noise.py).
        assert (ours - theirs).abs().max() <= tolerance(theirs, original64(img))
    assert {"RGB", "RGBA", "L", "P"} <= modes


def test_array_input_equals_pil_input():
    from PIL import Image

    img = Image.open(PAIRS[0][0]).convert("RGB")
    assert torch.equal(ir.preprocess_image(np.asarray(img)), ir.preprocess_image(img))  # the same pixels, the same ops
    with pytest.raises(ValueError, match="uint8"):
        ir.preprocess_image(np.zeros((8, 8, 3), np.float32))


def test_prompts_are_padded_and_truncated_to_35_tokens(tiny_scorer):
    ids, mask = tiny_scorer.tokenize(["a cat", "oil painting " * 40])
    assert ids.shape == mask.shape == (2, ir.PROMPT_MAX_LENGTH)
    sep = tiny_scorer.tokenizer.sep_token_id
    assert mask[0].sum() == 4 and ids[0, 3] == sep and ids[0, 4] == tiny_scorer.tokenizer.pad_token_id
    assert mask[1].all() and ids[1, -1] == sep
    n = len(builders.tiny_vocab())
    assert tiny_scorer.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [n, n + 1]


# ----------------------------------------------------------------------------- batching and the metric


def test_batched_equals_one_by_one(tiny_scorer):
    images = [p for p, _ in PAIRS[:7]]
    prompts = [t for _, t in PAIRS[:7]]
    batched = tiny_scorer.score(images, prompts)  # batch_size 4: a full and a partial batch
    single = np.array([tiny_scorer.score([im], [t])[0] for im, t in zip(images, prompts)])
    # Two float32 layouts of one computation: within the floor measured by the float64 rerun (tests/noise.py).
    tol = tolerance(batched, _float64_scores(tiny_scorer, images, prompts))
    assert np.abs(batched - single).max() <= tol
    assert np.diff(np.sort(batched)).min() > DISTINCT * tol  # images and prompts do change the score


def test_score_rejects_mismatched_prompts(tiny_scorer):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        tiny_scorer.score([PAIRS[0][0]] * 2, ["a", "b"][:1])
    one = tiny_scorer.score([PAIRS[0][0]] * 2, "a portrait")  # one prompt for all
    # Two rows of one batch: within the floor measured by the float64 rerun (tests/noise.py).
    tol = tolerance(one, _float64_scores(tiny_scorer, [PAIRS[0][0]] * 2, ["a portrait"] * 2))
    assert one.shape == (2,) and abs(one[0] - one[1]) <= tol


def test_ir_metric_registered_lazily_with_per_image_errors(tiny_dir, tiny_scorer):
    spec = METRICS.get("ir")
    assert (spec.inputs, spec.higher_is_better, spec.aggregate) == (("image", "prompt"), True, "mean")
    lazy = spec.factory(checkpoint=tiny_dir / "absent")  # nothing loads before the first score
    with pytest.raises(FileNotFoundError):
        lazy.score([MetricInput(image=PAIRS[0][0], prompt="x")])

    metric = spec.factory(checkpoint=tiny_dir, vision=ir.TINY_VISION, device="cpu", batch_size=2)
    inputs = [
        MetricInput(image=PAIRS[0][0], prompt=PAIRS[0][1]),
        MetricInput(image=str(tiny_dir / "missing.png"), prompt="a"),
        MetricInput(image=PAIRS[2][0], prompt=None),
        MetricInput(image=str(tiny_dir / "med_config.json"), prompt="not an image"),
        MetricInput(image=PAIRS[4][0], prompt=PAIRS[4][1]),
    ]
    results = metric.score(inputs)
    assert [r.value is None for r in results] == [False, True, True, True, False]
    assert "not found" in results[1].error and "prompt" in results[2].error and results[3].error
    images, prompts = [PAIRS[0][0], PAIRS[4][0]], [PAIRS[0][1], PAIRS[4][1]]
    expected = tiny_scorer.score(images, prompts)
    # Another batch layout of one computation: within the floor measured by the float64 rerun (tests/noise.py).
    tol = tolerance(expected, _float64_scores(tiny_scorer, images, prompts))
    assert np.abs(np.array([results[0].value, results[4].value]) - expected).max() <= tol

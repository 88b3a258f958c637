"""AM (method-spec §3): the authors' outputs, per-image normalisation, configs."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastface.attention import (
    AM1,
    AM1_PAPER_TEXT,
    AM2,
    AM2_NO_ADAIN,
    AMConfig,
    PartValues,
    attention_quantile,
    decoupled_attention,
    manipulated_attention,
    minmax_norm,
    unet_part,
)

from conftest import DATA

AUTHORS = np.load(DATA / "authors-math.npz")


def _case(tag, part, step):
    return [torch.from_numpy(AUTHORS[f"{tag}_{part}_{step}_{k}"]) for k in ("q", "k", "v", "out")]


AUTHORS_ROUNDING = {"quantile_fp16": True}  # their explicit float16 rounding of AM2's quantile


@pytest.mark.parametrize(
    "tag,am,tol",
    [
        ("am1", AM1, 1e-5),
        ("am2", AM2, 2e-3),  # our default: the exact quantile
        ("am2", dataclasses.replace(AM2, **AUTHORS_ROUNDING), 2.5e-4),
        ("am2_noadain", dataclasses.replace(AM2_NO_ADAIN, **AUTHORS_ROUNDING), 2.5e-4),
    ],
    ids=["am1", "am2", "am2-authors-rounding", "am2-noadain-authors-rounding"],
)
@pytest.mark.parametrize("part", ["down", "up"])
@pytest.mark.parametrize("step", range(4))
def test_decoupled_attention_matches_authors(tag, am, tol, part, step):
    q, k, v, expected = _case(tag, part, step)
    out = decoupled_attention(q, k, v, am=am, part=part, step=step)
    assert (out - expected).abs().max().item() <= tol
    # and AM really acts: the output is not plain attention
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max().item() > 1e-3


def test_exact_and_rounded_quantiles_agree_in_float16():
    """In float16 the map and q are float16 anyway: the authors' rounding is then what we do by default."""
    q, k, v, _ = _case("am2", "down", 1)
    exact = decoupled_attention(q.half(), k.half(), v.half(), am=AM2, part="down", step=1)
    rounded = decoupled_attention(q.half(), k.half(), v.half(), am=dataclasses.replace(AM2, **AUTHORS_ROUNDING),
                                  part="down", step=1)
    assert torch.equal(exact, rounded)


def test_untargeted_equals_sdpa():
    q, k, v, _ = _case("am1", "down", 0)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(decoupled_attention(q, k, v, am=None, part="down", step=0), sdpa)
    assert torch.equal(decoupled_attention(q, k, v, am=AM1, part="mid", step=0), sdpa)
    assert torch.equal(decoupled_attention(q, k, v, am=dataclasses.replace(AM1, steps=(1,)), part="up", step=0), sdpa)
    with pytest.raises(ValueError, match="part"):
        decoupled_attention(q, k, v, am=AM1, part="middle", step=0)


def test_identity_transform_equals_sdpa():
    q, k, v, _ = _case("am1", "up", 2)
    identity = AMConfig(transform="scale_power")  # s = 1, p = 1, cap 10 > any probability
    out = decoupled_attention(q, k, v, am=identity, part="up", step=2)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)


@pytest.mark.parametrize("am", [AM1, AM2, AM2_NO_ADAIN])
def test_joint_normalisation_is_per_image(am):
    """Two images' branches batched branch-major give each image what it gets alone."""
    imgs = [_case("am2", "down", 1), _case("am2", "up", 1)]
    q = torch.stack([x[0] for x in imgs], 1).flatten(0, 1)  # [3 branches × 2 images, ...]
    k = torch.stack([x[1] for x in imgs], 1).flatten(0, 1)
    v = torch.stack([x[2] for x in imgs], 1).flatten(0, 1)
    together = manipulated_attention(q, k, v, am=am, part="down", step=1, num_images=2).unflatten(0, (3, 2))
    for i, (qi, ki, vi, _) in enumerate(imgs):
        alone = decoupled_attention(qi, ki, vi, am=am, part="down", step=1)
        assert torch.allclose(together[:, i], alone, atol=1e-6)


def test_minmax_norm_statistics_span_branches_heads_and_l():
    x = torch.rand(6, 2, 5, 4)
    y = minmax_norm(x, num_images=2).unflatten(0, (3, 2))
    for img in range(2):
        for t in range(4):
            assert y[:, img, :, :, t].min() == 0 and y[:, img, :, :, t].max() == pytest.approx(1.0)


def test_quantile_matches_torch():
    x = torch.rand(2, 3, 101, 4)
    for p in (0.0, 0.3, 0.65, 1.0):
        assert torch.allclose(attention_quantile(x, p), torch.quantile(x, p, dim=-2, keepdim=True), atol=1e-7)


def test_configs_and_steps():
    assert AM1.scale.at("down", 0) == 1.55 and AM1.scale.at("up", 0) == 1.45
    assert AM1_PAPER_TEXT.scale.at("down", 0) == 1.45 and AM1_PAPER_TEXT.scale.at("up", 0) == 1.55
    assert AM2.scale.at("down", 0) == 1.0 and AM2.sharpness.at("up", 1) == 5.0 and AM2.adain_weight == 0.7
    assert AM2_NO_ADAIN.adain_weight is None and AM2.couples_branches(0) and not AM1.couples_branches(0)
    AM2.check_steps(4)
    AM1.check_steps(8)  # constants: any step count (steps beyond 3 are simply not targeted)
    with pytest.raises(ValueError, match=r"preset 'am2'.*4 steps but 8 steps"):
        AM2.check_steps(8, preset="am2")
    with pytest.raises(ValueError, match="transform"):
        AMConfig(transform="softmax")
    with pytest.raises(ValueError, match="parts"):
        AMConfig(transform="scale_power", parts=("left",))
    assert AMConfig.from_dict(AM2.to_dict()) == AM2
    assert PartValues.same(2.0).at("mid", 7) == 2.0


def test_unet_part_from_layer_name():
    assert unet_part("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor") == "down"
    assert unet_part("mid_block.attentions.0.transformer_blocks.0.attn2.processor") == "mid"
    assert unet_part("up_blocks.0.attentions.2.transformer_blocks.1.attn2.processor") == "up"

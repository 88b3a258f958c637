"""DCG (method-spec §2): the authors' outputs, the branch rules, config validation."""

import numpy as np
import pytest
import torch

from fastface.guidance import (
    DCG_PRESET,
    DCGConfig,
    TimestepSchedule,
    branch_coefficients,
    combine_branches,
    decoupled_guidance,
    required_branches,
)

from conftest import DATA
from noise import DISTINCT, float64_tolerance, tolerance

AUTHORS = np.load(DATA / "authors-math.npz")
AUTHORS_VARIANT = {3: "id", 1: "text", 2: "independent"}


@pytest.mark.parametrize("case", range(6))
def test_decoupled_guidance_matches_authors(case):
    x = torch.from_numpy(AUTHORS[f"dcg{case}_in"])
    kind, alpha, beta, phi = AUTHORS[f"dcg{case}_meta"]
    kwargs = {"alpha": float(alpha), "beta": float(beta), "rescale": float(phi), "variant": AUTHORS_VARIANT[int(kind)]}
    out = decoupled_guidance(x[0:1], x[1:2], x[2:3], **kwargs)
    x64 = x.double()
    out64 = decoupled_guidance(x64[0:1], x64[1:2], x64[2:3], **kwargs)
    # The authors' float32 output is one more rounding path of the same arithmetic: within the
    # noise floor |ours in float32 − ours in float64| on these inputs (tests/noise.py).
    assert (out - torch.from_numpy(AUTHORS[f"dcg{case}_out"])).abs().max() <= tolerance(out, out64)


def test_dcg_preset_schedule_matches_authors():
    assert DCG_PRESET.num_steps == 4
    for step in range(4):
        x = torch.from_numpy(AUTHORS["dcgsched_in"][step])
        alpha, beta = DCG_PRESET.weights_at(step)
        kwargs = {"alpha": alpha, "beta": beta, "rescale": DCG_PRESET.rescale, "variant": DCG_PRESET.variant}
        out = decoupled_guidance(x[0:1], x[1:2], x[2:3], **kwargs)
        x64 = x.double()
        out64 = decoupled_guidance(x64[0:1], x64[1:2], x64[2:3], **kwargs)
        # as above: the authors' float32 output is within our float32-vs-float64 noise floor
        assert (out - torch.from_numpy(AUTHORS["dcgsched_out"][step])).abs().max() <= tolerance(out, out64)


def test_rescale_is_per_image():
    g = torch.Generator().manual_seed(0)
    b = [torch.randn(3, 4, 8, 8, generator=g) for _ in range(3)]
    b64 = [x.double() for x in b]
    together = decoupled_guidance(*b, alpha=1.5, beta=3.0, rescale=0.75)
    alone = torch.cat([decoupled_guidance(*(x[i:i + 1] for x in b), alpha=1.5, beta=3.0, rescale=0.75) for i in range(3)])
    # Tolerances: the noise floor |float32 − float64| of the same call on the same inputs (tests/noise.py).
    alone64 = decoupled_guidance(*b64, alpha=1.5, beta=3.0, rescale=0.75)
    assert (together - alone).abs().max() <= tolerance(alone, alone64)
    # rescale acts at α = β = 1 too (the dcg preset's first and last steps)
    plain = decoupled_guidance(*b, alpha=1.0, beta=1.0)
    assert (plain - b[2]).abs().max() <= tolerance(plain, decoupled_guidance(*b64, alpha=1.0, beta=1.0))
    rescaled = decoupled_guidance(*b, alpha=1.0, beta=1.0, rescale=0.75)
    rescaled64 = decoupled_guidance(*b64, alpha=1.0, beta=1.0, rescale=0.75)
    assert (rescaled - b[2]).abs().max() > DISTINCT * tolerance(rescaled, rescaled64)


@pytest.mark.parametrize(
    "alpha,beta,rescale,variant,expected",
    [
        (1.0, 1.0, 0.0, "id", (2,)),  # baseline / am1 on hyper, lightning, turbo
        (1.5, 1.5, 0.0, "id", (0, 2)),  # plain CFG (LCM's default 1.5)
        (1.0, 1.0, 0.75, "id", (1, 2)),  # the dcg preset's first and last steps
        (1.5, 3.0, 0.75, "id", (0, 1, 2)),  # the dcg preset's middle steps
        (1.0, 0.0, 0.0, "id", (1,)),
        (1.0, 1.0, 0.0, "text", (2,)),
        (1.0, 1.0, 0.0, "independent", (0, 1, 2)),
        (0.0, 0.0, 0.0, "independent", (0,)),
    ],
)
def test_required_branches(alpha, beta, rescale, variant, expected):
    assert required_branches(alpha, beta, rescale, variant) == expected
    assert required_branches(alpha, beta, rescale, variant, couple_all=True) == (0, 1, 2)


@pytest.mark.parametrize("variant", ["id", "text", "independent"])
@pytest.mark.parametrize("alpha,beta,rescale", [(1.0, 1.0, 0.0), (1.5, 1.5, 0.0), (1.0, 1.0, 0.75), (1.0, 0.0, 0.0),
                                                 (2.0, 4.0, 0.5), (0.0, 2.0, 0.0)])
def test_skipping_branches_is_exact(variant, alpha, beta, rescale):
    g = torch.Generator().manual_seed(1)
    b = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]
    full = decoupled_guidance(*b, alpha=alpha, beta=beta, rescale=rescale, variant=variant)
    need = required_branches(alpha, beta, rescale, variant)
    part = combine_branches({k: b[k] for k in need}, alpha=alpha, beta=beta, rescale=rescale, variant=variant)
    full64 = decoupled_guidance(*(x.double() for x in b), alpha=alpha, beta=beta, rescale=rescale, variant=variant)
    # two float32 paths of one sum: within the noise floor |float32 − float64| of it (tests/noise.py)
    assert (full - part).abs().max() <= tolerance(full, full64)
    c = branch_coefficients(alpha, beta, variant)
    assert sum(c) == 1.0  # α, β are multiples of 1/2 here: every sum and difference is exact in binary


def test_combine_refuses_a_missing_weighted_branch():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="branch 0"):
        combine_branches({2: x}, alpha=1.5, beta=1.5)


def test_config_validation_and_steps():
    with pytest.raises(ValueError, match="variant"):
        DCGConfig(variant="both")
    with pytest.raises(ValueError, match="rescale"):
        DCGConfig(rescale=1.5)
    with pytest.raises(ValueError, match="different lengths"):
        DCGConfig(alpha=(1, 2), beta=(1, 2, 3)).num_steps
    with pytest.raises(ValueError, match=r"preset 'dcg'.*4 steps.*8 steps"):
        DCG_PRESET.check_steps(8, preset="dcg")
    DCG_PRESET.check_steps(4)
    DCGConfig(alpha=1.5, beta=1.5).check_steps(30)
    assert DCGConfig.from_dict(DCG_PRESET.to_dict()) == DCG_PRESET


def test_timestep_schedules():
    lin = DCGConfig(alpha=2.0, beta=3.0, alpha_schedule=TimestepSchedule("linear"))
    assert lin.weights_at(0, timestep=250) == (1.5, 3.0)  # 2·(1 − 250/1000): exact in binary
    clamped = TimestepSchedule("clamped_linear", {"c": 1.0})
    # 2·(1 − 100/1000): 0.1 is not a binary fraction; three float64 roundings (/, −, ·) on values ≤ 2
    assert clamped(2.0, 900) == 1.0 and abs(clamped(2.0, 100) - 1.8) <= float64_tolerance(2.0, ops=3)
    assert TimestepSchedule("cosine")(1.0, 0) == 2.0  # 1·(cos 0 + 1): cos(0) is exactly 1
    with pytest.raises(ValueError, match="registered: .*linear"):
        TimestepSchedule("lnear")
    with pytest.raises(ValueError, match="not both"):
        DCGConfig(alpha=(1.0, 2.0), alpha_schedule=TimestepSchedule("linear"))
    cfg = DCGConfig(alpha=2.0, alpha_schedule=clamped)
    assert DCGConfig.from_dict(cfg.to_dict()) == cfg

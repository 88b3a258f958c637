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

AUTHORS = np.load(DATA / "authors-math.npz")
AUTHORS_VARIANT = {3: "id", 1: "text", 2: "independent"}


@pytest.mark.parametrize("case", range(6))
def test_decoupled_guidance_matches_authors(case):
    x = torch.from_numpy(AUTHORS[f"dcg{case}_in"])
    kind, alpha, beta, phi = AUTHORS[f"dcg{case}_meta"]
    out = decoupled_guidance(
        x[0:1], x[1:2], x[2:3], alpha=float(alpha), beta=float(beta), rescale=float(phi),
        variant=AUTHORS_VARIANT[int(kind)],
    )
    assert torch.allclose(out, torch.from_numpy(AUTHORS[f"dcg{case}_out"]), atol=1e-5, rtol=0)


def test_dcg_preset_schedule_matches_authors():
    assert DCG_PRESET.num_steps == 4
    for step in range(4):
        x = torch.from_numpy(AUTHORS["dcgsched_in"][step])
        alpha, beta = DCG_PRESET.weights_at(step)
        out = decoupled_guidance(
            x[0:1], x[1:2], x[2:3], alpha=alpha, beta=beta, rescale=DCG_PRESET.rescale, variant=DCG_PRESET.variant
        )
        assert torch.allclose(out, torch.from_numpy(AUTHORS["dcgsched_out"][step]), atol=1e-5, rtol=0)


def test_rescale_is_per_image():
    g = torch.Generator().manual_seed(0)
    b = [torch.randn(3, 4, 8, 8, generator=g) for _ in range(3)]
    together = decoupled_guidance(*b, alpha=1.5, beta=3.0, rescale=0.75)
    alone = torch.cat([decoupled_guidance(*(x[i:i + 1] for x in b), alpha=1.5, beta=3.0, rescale=0.75) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-6)
    # rescale acts at α = β = 1 too (the dcg preset's first and last steps)
    plain = decoupled_guidance(*b, alpha=1.0, beta=1.0)
    assert torch.allclose(plain, b[2], atol=1e-6)
    assert not torch.allclose(decoupled_guidance(*b, alpha=1.0, beta=1.0, rescale=0.75), b[2], atol=1e-3)


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
    assert torch.allclose(full, part, atol=1e-5)
    c = branch_coefficients(alpha, beta, variant)
    assert sum(c) == pytest.approx(1.0)


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
    assert lin.weights_at(0, timestep=250) == (pytest.approx(1.5), 3.0)
    clamped = TimestepSchedule("clamped_linear", {"c": 1.0})
    assert clamped(2.0, 900) == 1.0 and clamped(2.0, 100) == pytest.approx(1.8)
    assert TimestepSchedule("cosine")(1.0, 0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="registered: .*linear"):
        TimestepSchedule("lnear")
    with pytest.raises(ValueError, match="not both"):
        DCGConfig(alpha=(1.0, 2.0), alpha_schedule=TimestepSchedule("linear"))
    cfg = DCGConfig(alpha=2.0, alpha_schedule=clamped)
    assert DCGConfig.from_dict(cfg.to_dict()) == cfg

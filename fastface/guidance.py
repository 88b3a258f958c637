"""Decoupled classifier-free guidance (DCG), FastFace §3.1 (Eq. 5-6, 16-18).

Pure functions of tensors and a frozen config. The pipeline decides which UNet
branches it evaluates from :func:`required_branches`; the combination itself is
:func:`decoupled_guidance` (all three branches, the authors' arithmetic) or
:func:`combine_branches` (any subset the rules allow, exact).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch

Variant = Literal["id", "text", "independent"]
VARIANTS: tuple[str, ...] = ("id", "text", "independent")

# What each branch conditions on, per variant: (text, identity) for b0, b1, b2.
BRANCH_CONDITIONS: Mapping[str, tuple[tuple[bool, bool], ...]] = {
    "id": ((False, False), (False, True), (True, True)),
    "text": ((False, False), (True, False), (True, True)),
    "independent": ((False, False), (True, False), (False, True)),
}


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown DCG variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def decoupled_guidance(
    b0: torch.Tensor,
    b1: torch.Tensor,
    b2: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    rescale: float = 0.0,
    variant: str = "id",
) -> torch.Tensor:
    """DCG combination (Eq. 5 / 16 / 18) with the optional rescale of Eq. 6.

    ``b0, b1, b2`` are ``[N, C, H, W]`` predictions of the three branches laid out
    as in :data:`BRANCH_CONDITIONS`.
    """
    _check_variant(variant)
    term1 = b1 - b0
    term2 = b2 - b0 if variant == "independent" else b2 - b1
    pred = b0 + alpha * term1 + beta * term2
    if rescale > 0:
        pred = rescale_prediction(pred, b1, b2, rescale)
    return pred


def rescale_prediction(pred: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor, rescale: float) -> torch.Tensor:
    """Eq. 6: ``factor = φ·(σ1 + σ2)/(2σ) + (1 − φ)`` per image (std over C, H, W, unbiased)."""
    dims = tuple(range(1, pred.ndim))
    std1 = b1.std(dims, keepdim=True)
    std2 = b2.std(dims, keepdim=True)
    std = pred.std(dims, keepdim=True)
    factor = rescale * ((std1 + std2) / (2 * std)) + (1 - rescale)
    return pred * factor


def branch_coefficients(alpha: float, beta: float, variant: str) -> tuple[float, float, float]:
    """Coefficients ``c`` with ``ε = c0·b0 + c1·b1 + c2·b2`` (before rescale)."""
    _check_variant(variant)
    if variant == "independent":
        return (1.0 - alpha - beta, alpha, beta)
    return (1.0 - alpha, alpha - beta, beta)


def required_branches(
    alpha: float, beta: float, rescale: float, variant: str, *, couple_all: bool = False
) -> tuple[int, ...]:
    """Branches whose UNet rows a step needs (method-spec §5).

    A branch is needed when its coefficient is non-zero, when the rescale needs
    its std (b1 and b2), or when ``couple_all`` (AM2's joint normalisation couples
    every branch of an image).
    """
    if couple_all:
        return (0, 1, 2)
    coeffs = branch_coefficients(alpha, beta, variant)
    need = {i for i, c in enumerate(coeffs) if c != 0.0}
    if rescale > 0:
        need |= {1, 2}
    if not need:  # α = β = 0 in the `independent` variant still needs b0
        need = {0}
    return tuple(sorted(need))


def combine_branches(
    branches: Mapping[int, torch.Tensor],
    *,
    alpha: float,
    beta: float,
    rescale: float = 0.0,
    variant: str = "id",
) -> torch.Tensor:
    """DCG from whichever branches were evaluated.

    With all three present this is exactly :func:`decoupled_guidance` (same
    arithmetic as the authors' code); with a subset chosen by
    :func:`required_branches` the omitted branches have zero weight, so the
    result is the same up to float rounding.
    """
    if set(branches) == {0, 1, 2}:
        return decoupled_guidance(
            branches[0], branches[1], branches[2], alpha=alpha, beta=beta, rescale=rescale, variant=variant
        )
    coeffs = branch_coefficients(alpha, beta, variant)
    pred = None
    for i, c in enumerate(coeffs):
        if c == 0.0:
            continue
        if i not in branches:
            raise ValueError(f"branch {i} has weight {c} but was not evaluated (have {sorted(branches)})")
        term = branches[i] if c == 1.0 else c * branches[i]
        pred = term if pred is None else pred + term
    if pred is None:
        pred = torch.zeros_like(next(iter(branches.values())))
    if rescale > 0:
        pred = rescale_prediction(pred, branches[1], branches[2], rescale)
    return pred


# ---------------------------------------------------------------------------
# Timestep-based weight schedules (the authors' cfg_schedulers, as a registry).
# Each maps (w, t, T, **params) -> weight at timestep t of T training steps.

TimestepScheduleFn = Callable[..., float]
TIMESTEP_SCHEDULES: dict[str, TimestepScheduleFn] = {}


def register_timestep_schedule(name: str) -> Callable[[TimestepScheduleFn], TimestepScheduleFn]:
    def deco(fn: TimestepScheduleFn) -> TimestepScheduleFn:
        if name in TIMESTEP_SCHEDULES:
            raise ValueError(f"timestep schedule {name!r} is already registered")
        TIMESTEP_SCHEDULES[name] = fn
        return fn

    return deco


@register_timestep_schedule("constant")
def _constant(w: float, t: float, T: int) -> float:
    return w


@register_timestep_schedule("linear")
def _linear(w: float, t: float, T: int) -> float:
    return w * (1 - t / T)


@register_timestep_schedule("inv_linear")
def _inv_linear(w: float, t: float, T: int) -> float:
    return w * (t / T)


@register_timestep_schedule("clamped_linear")
def _clamped_linear(w: float, t: float, T: int, c: float) -> float:
    return max(c, _linear(w, t, T))


@register_timestep_schedule("cosine")
def _cosine(w: float, t: float, T: int) -> float:
    return w * (math.cos(math.pi * t / T) + 1)


@register_timestep_schedule("inv_cosine")
def _inv_cosine(w: float, t: float, T: int) -> float:
    return _cosine(w, T - t, T)


@register_timestep_schedule("power_cosine")
def _power_cosine(w: float, t: float, T: int, s: float) -> float:
    return 0.5 * w * (1 - math.cos(math.pi * ((T - t) / T) ** s))


@register_timestep_schedule("clamped_power_cosine")
def _clamped_power_cosine(w: float, t: float, T: int, c: float, s: float) -> float:
    return max(c, _power_cosine(w, t, T, s))


@dataclass(frozen=True)
class TimestepSchedule:
    """A named weight schedule over timesteps, e.g. ``TimestepSchedule("clamped_linear", {"c": 1.0})``."""

    name: str
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in TIMESTEP_SCHEDULES:
            raise ValueError(
                f"unknown timestep schedule {self.name!r}; registered: {', '.join(sorted(TIMESTEP_SCHEDULES))}"
            )
        object.__setattr__(self, "params", dict(self.params))

    def __call__(self, w: float, timestep: float, num_train_timesteps: int = 1000) -> float:
        return float(TIMESTEP_SCHEDULES[self.name](w, float(timestep), num_train_timesteps, **self.params))

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}


Weight = float | tuple[float, ...]


@dataclass(frozen=True)
class DCGConfig:
    """Decoupled guidance settings. ``alpha``/``beta`` are constants or per-step tuples (0-based).

    ``alpha_schedule``/``beta_schedule`` optionally modulate a constant weight by
    timestep (opt-in; per-step lists are the default way to schedule).
    """

    alpha: Weight = 1.0
    beta: Weight = 1.0
    rescale: float = 0.0
    variant: str = "id"
    alpha_schedule: TimestepSchedule | None = None
    beta_schedule: TimestepSchedule | None = None

    def __post_init__(self) -> None:
        _check_variant(self.variant)
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise ValueError(f"DCGConfig.{name}: an empty per-step list")
                object.__setattr__(self, name, tuple(float(v) for v in value))
            elif isinstance(value, (int, float)):
                object.__setattr__(self, name, float(value))
            else:
                raise ValueError(f"DCGConfig.{name} must be a number or a list of numbers, got {value!r}")
            sched = getattr(self, f"{name}_schedule")
            if sched is not None and isinstance(getattr(self, name), tuple):
                raise ValueError(f"DCGConfig.{name}: use either a per-step list or a timestep schedule, not both")
        if not (0.0 <= self.rescale <= 1.0):
            raise ValueError(f"DCGConfig.rescale must be in [0, 1], got {self.rescale}")

    @property
    def num_steps(self) -> int | None:
        """The step count the per-step lists are written for (None when all weights are constants)."""
        lengths = {len(v) for v in (self.alpha, self.beta) if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise ValueError(f"DCGConfig: alpha and beta lists have different lengths {sorted(lengths)}")
        return lengths.pop() if lengths else None

    def check_steps(self, num_steps: int, *, preset: str | None = None) -> None:
        n = self.num_steps
        if n is not None and n != num_steps:
            who = f"preset {preset!r}" if preset else "this DCG config"
            raise ValueError(
                f"{who} has per-step guidance lists for {n} steps but {num_steps} steps were requested; "
                f"use {n} steps or give alpha/beta lists of length {num_steps}"
            )

    def weights_at(self, step: int, timestep: float = 0.0, num_train_timesteps: int = 1000) -> tuple[float, float]:
        """(α, β) at 0-based ``step`` (and ``timestep`` for timestep schedules)."""
        out = []
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                w = value[step]
            else:
                w = value
                sched = getattr(self, f"{name}_schedule")
                if sched is not None:
                    w = sched(w, timestep, num_train_timesteps)
            out.append(float(w))
        return out[0], out[1]

    def to_dict(self) -> dict:
        return {
            "alpha": list(self.alpha) if isinstance(self.alpha, tuple) else self.alpha,
            "beta": list(self.beta) if isinstance(self.beta, tuple) else self.beta,
            "rescale": self.rescale,
            "variant": self.variant,
            "alpha_schedule": self.alpha_schedule.to_dict() if self.alpha_schedule else None,
            "beta_schedule": self.beta_schedule.to_dict() if self.beta_schedule else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "DCGConfig":
        data = dict(data)
        for name in ("alpha_schedule", "beta_schedule"):
            if data.get(name) is not None:
                data[name] = TimestepSchedule(**data[name])
        return cls(**data)


def constant_guidance(scale: float) -> DCGConfig:
    """Plain guidance α = β = ``scale`` (the model default when no DCG is used)."""
    return DCGConfig(alpha=scale, beta=scale)


# The stylistic `dcg` preset (method-spec §2): guidance only in the intermediate steps.
DCG_PRESET = DCGConfig(alpha=(1.0, 1.5, 1.5, 1.0), beta=(1.0, 3.0, 3.0, 1.0), rescale=0.75, variant="id")

"""Attention manipulation (AM) of the IP-Adapter decoupled cross-attention, FastFace §3.2 (Eq. 7-10).

Pure tensor functions (:func:`decoupled_attention`, :func:`transform_attention_map`), the
AM configs, and the :class:`DenoisingStep` the pipeline owns and sets before each UNet call
(processors never count steps themselves). The diffusers processor that runs them inside the
UNet is :mod:`fastface.attention_processor`; this module imports torch but not diffusers, so
the presets (and a flow's driver that plans with them) load no diffusers.

Cost: a processor call never reads a tensor value back to Python (no per-layer host
synchronisation on a GPU); AM2's quantile selects two order statistics instead of sorting;
the per-token normalisations and the AdaIN blends are single multiply-adds. Measured in
``benchmarks/bench_pipeline.py`` (AM overhead as a fraction of UNet time).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

PARTS: tuple[str, ...] = ("down", "mid", "up")
TRANSFORMS: tuple[str, ...] = ("scale_power", "adaptive_softmask")

Value = float | tuple[float, ...]


@dataclass(frozen=True)
class PartValues:
    """A hyperparameter per UNet part; each a constant or a per-step tuple (0-based steps)."""

    down: Value = 1.0
    mid: Value = 1.0
    up: Value = 1.0

    def __post_init__(self) -> None:
        for part in PARTS:
            v = getattr(self, part)
            object.__setattr__(self, part, tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v))

    @classmethod
    def same(cls, value: Value) -> "PartValues":
        return cls(value, value, value)

    def at(self, part: str, step: int) -> float:
        v = getattr(self, part)
        if isinstance(v, tuple):
            if step >= len(v):
                raise ValueError(f"per-step schedule {v} has no value for step {step}")
            return v[step]
        return v

    def schedule_lengths(self, parts: tuple[str, ...]) -> set[int]:
        return {len(getattr(self, p)) for p in parts if isinstance(getattr(self, p), tuple)}

    def to_dict(self) -> dict:
        return {p: list(getattr(self, p)) if isinstance(getattr(self, p), tuple) else getattr(self, p) for p in PARTS}


@dataclass(frozen=True)
class AMConfig:
    """Which identity-attention maps to transform, and how.

    ``transform="scale_power"`` is AM1 (Eq. 8): ``f(A) = min(s·A^p, cap)``.
    ``transform="adaptive_softmask"`` is AM2 (Eq. 9): ``f(A) = min(s·norm(σ(d·(norm(A) − q_p(A)))), cap)``,
    optionally with first-token inversion and the AdaIN blend of Eq. 10.
    """

    transform: str
    scale: PartValues = field(default_factory=PartValues)
    power: PartValues = field(default_factory=PartValues)  # AM1 exponent p
    sharpness: PartValues = field(default_factory=PartValues)  # AM2 d
    quantile: PartValues = field(default_factory=lambda: PartValues.same(0.5))  # AM2 p
    invert_first_token: bool = False
    adain_weight: float | None = None  # w of Eq. 10; None disables AdaIN
    parts: tuple[str, ...] = ("down", "up")
    steps: tuple[int, ...] | None = (0, 1, 2, 3)  # None: every step
    tokens: tuple[int, ...] = (0, 1, 2, 3)
    scale_cap: float = 10.0
    # The authors' code rounds AM2's quantile to float16 even in float32 runs (their runs were
    # float16, where the map itself is float16 and so is q — as ours is in float16). True
    # reproduces that rounding bit for bit; the default keeps the exact quantile of Eq. 9: the
    # rounding is a step function that lets last-bit BLAS differences between batch sizes flip
    # q by one fp16 ulp, so only the exact quantile keeps batched images equal to single ones.
    quantile_fp16: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"AMConfig.transform must be one of {', '.join(TRANSFORMS)}, got {self.transform!r}")
        parts = tuple(self.parts)
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ValueError(f"AMConfig.parts must be a non-empty subset of {PARTS}, got {self.parts!r}")
        object.__setattr__(self, "parts", parts)
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        tokens = tuple(int(t) for t in self.tokens)
        if not tokens or len(set(tokens)) != len(tokens) or min(tokens) < 0:
            raise ValueError(f"AMConfig.tokens must be distinct non-negative token indices, got {self.tokens!r}")
        object.__setattr__(self, "tokens", tokens)
        if self.adain_weight is not None and not (0.0 <= self.adain_weight <= 1.0):
            raise ValueError(f"AMConfig.adain_weight must be in [0, 1] or None, got {self.adain_weight}")

    # -- which layers / steps ------------------------------------------------
    def targets(self, part: str, step: int) -> bool:
        return part in self.parts and (self.steps is None or step in self.steps)

    def couples_branches(self, step: int) -> bool:
        """AM2's min-max normalisation couples all guidance branches of an image at this step."""
        return self.transform == "adaptive_softmask" and (self.steps is None or step in self.steps)

    def check_steps(self, num_steps: int, *, preset: str | None = None) -> None:
        """Fail before loading anything when a per-step schedule is written for another step count."""
        for name in ("scale", "power", "sharpness", "quantile"):
            for n in getattr(self, name).schedule_lengths(self.parts):
                if n != num_steps:
                    who = f"preset {preset!r}" if preset else f"AM config {self.name or self.transform!r}"
                    raise ValueError(
                        f"{who} has {name} schedules for {n} steps but {num_steps} steps were requested; "
                        f"use {n} steps or give schedules of length {num_steps}"
                    )

    def to_dict(self) -> dict:
        return {
            "transform": self.transform,
            "scale": self.scale.to_dict(),
            "power": self.power.to_dict(),
            "sharpness": self.sharpness.to_dict(),
            "quantile": self.quantile.to_dict(),
            "invert_first_token": self.invert_first_token,
            "adain_weight": self.adain_weight,
            "parts": list(self.parts),
            "steps": None if self.steps is None else list(self.steps),
            "tokens": list(self.tokens),
            "scale_cap": self.scale_cap,
            "quantile_fp16": self.quantile_fp16,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "AMConfig":
        data = dict(data)
        for key in ("scale", "power", "sharpness", "quantile"):
            if isinstance(data.get(key), Mapping):
                data[key] = PartValues(**data[key])
        for key in ("parts", "tokens"):
            if key in data:
                data[key] = tuple(data[key])
        if data.get("steps") is not None:
            data["steps"] = tuple(data["steps"])
        return cls(**data)


# AM1, scale-power (Eq. 8). The implementation's values: s = 1.55 in `down`, 1.45 in `up`.
AM1 = AMConfig(
    transform="scale_power",
    scale=PartValues(down=1.55, mid=1.0, up=1.45),
    power=PartValues(down=1.3, mid=1.0, up=1.3),
    name="AM1",
)
# The paper's text states the per-part scales the other way round; offered as an option.
AM1_PAPER_TEXT = replace(AM1, scale=PartValues(down=1.45, mid=1.0, up=1.55), name="AM1-paper-text")

_AM2_S = (1.0, 1.55, 1.55, 1.55)
_AM2_D = (7.5, 5.0, 5.0, 5.0)
_AM2_P = (0.65, 0.65, 0.65, 0.65)
# AM2, scheduled softmax (Eq. 9-10), with first-token inversion and AdaIN (w = 0.7), as `ff-am2` runs it.
AM2 = AMConfig(
    transform="adaptive_softmask",
    scale=PartValues(down=_AM2_S, mid=1.0, up=_AM2_S),
    sharpness=PartValues(down=_AM2_D, mid=1.0, up=_AM2_D),
    quantile=PartValues(down=_AM2_P, mid=1.0, up=_AM2_P),
    invert_first_token=True,
    adain_weight=0.7,
    name="AM2",
)
# The authors' AM-only config runs AM2 without AdaIN (our `am2` preset).
AM2_NO_ADAIN = replace(AM2, adain_weight=None, name="AM2-no-AdaIN")


# ---------------------------------------------------------------------------
# Pure functions. Attention maps are [B, heads, L, T] with B = branches × images laid
# out branch-major ([b0 × N, b1 × N, ...]); `num_images` = N.
#
# Internally AM works on the transposed map [B, heads, T, L] ("token-major"): with T = 4
# tokens, every reduction over L (quantile, min-max, the first token's max) then runs over
# the contiguous axis, and the ones over T (softmax, AdaIN statistics) are vectorised
# across L instead of reducing 4 scattered elements at a time. No function here reads a
# tensor value back to Python: the NaN fallback is a ``torch.where``, and index and sign
# tensors come from a :class:`TokenPlan` built once per pipeline call.


def _grouped(x: torch.Tensor, num_images: int) -> torch.Tensor:
    b = x.shape[0]
    if b % num_images:
        raise ValueError(f"batch of {b} rows is not a whole number of branches of {num_images} images")
    return x.reshape(b // num_images, num_images, *x.shape[1:])


def minmax_norm(x: torch.Tensor, num_images: int = 1) -> torch.Tensor:
    """Min-max per token over (branches, heads, L) of each image — the authors' amin/amax over dims 0, 1, 2."""
    g = _grouped(x, num_images)
    lo = g.amin(dim=(0, 2, 3), keepdim=True)
    hi = g.amax(dim=(0, 2, 3), keepdim=True)
    return ((g - lo) / (hi - lo)).reshape(x.shape)


def linear_quantile(x: torch.Tensor, q: float, dim: int = -1) -> torch.Tensor:
    """``torch.quantile(x, q, dim, keepdim=True)`` (its default 'linear' rule) from two order statistics.

    Only the two neighbours of the interpolation position ``q·(n − 1)`` are selected (``topk``
    on the nearer end, then ``topk(2)`` of that), not a full sort, and they are interpolated
    as ``torch.quantile`` does: ``q`` rounded to the working precision, the position in
    double, ``torch.lerp`` in the working precision — bit for bit the same for finite input.
    Half types work in float32, i.e. as ``torch.quantile(x.float(), ...)`` (which rejects
    them); no size limit. A row holding NaN does not give NaN here (``topk`` orders NaN
    last); in AM the min-max normalisation spreads such a NaN anyway.
    """
    n = x.shape[dim]
    if n == 0:
        raise ValueError("quantile of an empty axis")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    q_work = float(np.float64(q)) if work == torch.float64 else float(np.float32(q))
    rank = q_work * (n - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    x = x.movedim(dim, -1)
    if hi == lo:
        out = x.kthvalue(lo + 1, dim=-1, keepdim=True).values.to(work)
    else:
        if lo + 2 <= n - lo:  # the lo + 2 smallest hold both neighbours as their two largest
            two = x.topk(lo + 2, dim=-1, largest=False, sorted=False).values.topk(2, dim=-1, sorted=True).values
            below, above = two[..., 1:], two[..., :1]
        else:  # the n − lo largest hold them as their two smallest
            two = x.topk(n - lo, dim=-1, sorted=False).values.topk(2, dim=-1, largest=False, sorted=True).values
            below, above = two[..., :1], two[..., 1:]
        # contiguous like torch.quantile's gathered neighbours, so lerp takes the same kernel path
        out = torch.lerp(below.to(work).contiguous(), above.to(work).contiguous(), rank - lo)
    return out.movedim(-1, dim)


def attention_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile over the L axis (dim -2) of a ``[..., L, T]`` map, as ``torch.quantile``."""
    return linear_quantile(a, q, dim=-2)


@dataclass(frozen=True)
class TokenPlan:
    """The targeted tokens of one AM config as tensors, for maps with ``num_tokens`` tokens.

    Built once per pipeline call (:func:`fastface.attention_processor.manipulated_attention_processors`), not per layer:
    on a GPU, building an index tensor from a Python list is a host-to-device copy.
    ``index`` is ``None`` when every token is targeted in order (no gather/scatter then);
    ``sign``/``first`` (shape ``[targets, 1]``) implement the first-token inversion as
    multiply-adds: ``1 − A₀`` is ``first + sign·A``, and ``max_L(f)₀ − f₀`` is ``max·first + sign·f``.
    """

    num_tokens: int
    tokens: tuple[int, ...]
    index: torch.Tensor | None
    sign: torch.Tensor | None
    first: torch.Tensor | None

    @classmethod
    def build(cls, am: AMConfig, num_tokens: int, device: torch.device | str, dtype: torch.dtype) -> TokenPlan:
        tokens = tuple(t for t in am.tokens if t < num_tokens)
        index = None if tokens == tuple(range(num_tokens)) else torch.tensor(tokens, device=device)
        sign = first = None
        if am.invert_first_token and 0 in tokens:
            first = torch.tensor([[1.0 if t == 0 else 0.0] for t in tokens], device=device, dtype=dtype)
            sign = 1 - 2 * first
        return cls(num_tokens, tokens, index, sign, first)


def _softmask_scaled(t: torch.Tensor, *, sharpness: float, quantile: float, scale: float, cap: float,
                     num_images: int, quantile_fp16: bool) -> torch.Tensor:
    """``min(s·norm(σ(d·(norm(A) − q))), cap)`` on a token-major map ``[B, heads, T, L]``.

    Each min-max normalisation and the affine map around it is one multiply-add with
    per-token coefficients: ``d·((A − lo)/(hi − lo) − q) = A·c₁ + c₀``.
    """
    q = linear_quantile(t, quantile, dim=-1)  # of the raw map; [B, heads, T, 1]
    if quantile_fp16:
        q = q.half()
    q = q.to(t.dtype).clamp_(min=1e-6)
    g = _grouped(t, num_images)  # [branches, N, heads, T, L]
    lo, hi = g.amin(dim=(0, 2, 4), keepdim=True), g.amax(dim=(0, 2, 4), keepdim=True)
    c1 = sharpness / (hi - lo)
    c0 = torch.addcmul(-lo * c1, _grouped(q, num_images), torch.full_like(c1, -sharpness))
    res = torch.addcmul(c0, g, c1).sigmoid_()
    lo, hi = res.amin(dim=(0, 2, 4), keepdim=True), res.amax(dim=(0, 2, 4), keepdim=True)
    c1 = scale / (hi - lo)
    return torch.addcmul(-lo * c1, res, c1).clamp_(max=cap).reshape(t.shape)


def _transform_token_major(a: torch.Tensor, am: AMConfig, part: str, step: int, num_images: int,
                           plan: TokenPlan) -> torch.Tensor:
    """``Ã`` for a token-major map ``[B, heads, T, L]``; a new tensor (``a`` is left as it is)."""
    targ = a if plan.index is None else a.index_select(-2, plan.index)
    if plan.sign is not None:
        targ = torch.addcmul(plan.first, targ, plan.sign)  # token 0: 1 − A₀
    s = am.scale.at(part, step)
    if am.transform == "scale_power":
        f = torch.pow(targ, am.power.at(part, step)).mul_(s).clamp_(max=am.scale_cap)
    else:
        f = _softmask_scaled(targ, sharpness=am.sharpness.at(part, step), quantile=am.quantile.at(part, step),
                             scale=s, cap=am.scale_cap, num_images=num_images, quantile_fp16=am.quantile_fp16)
    if plan.sign is not None:
        f = torch.addcmul(f.amax(dim=-1, keepdim=True) * plan.first, f, plan.sign)  # token 0: max_L f₀ − f₀
    if plan.index is None:
        return f.to(a.dtype)
    return a.clone().index_copy_(-2, plan.index, f.to(a.dtype))


def adaptive_softmask(a: torch.Tensor, *, sharpness: float, quantile: float, num_images: int = 1,
                      quantile_fp16: bool = False) -> torch.Tensor:
    """Eq. 9: ``norm(σ(d·(norm(A) − q)))`` with ``q`` the quantile of the raw map over L, clamped ≥ 1e-6."""
    t = a.transpose(-1, -2).contiguous()
    out = _softmask_scaled(t, sharpness=sharpness, quantile=quantile, scale=1.0, cap=math.inf,
                           num_images=num_images, quantile_fp16=quantile_fp16)
    return out.transpose(-1, -2)


def transform_attention_map(a: torch.Tensor, am: AMConfig, part: str, step: int, num_images: int = 1) -> torch.Tensor:
    """``Ã = f(A)`` of a ``[B, heads, L, T]`` map on the targeted tokens (first-token inversion around ``f`` when enabled)."""
    plan = TokenPlan.build(am, a.shape[-1], a.device, a.dtype)
    out = _transform_token_major(a.transpose(-1, -2).contiguous(), am, part, step, num_images, plan)
    return out.transpose(-1, -2)


def _mean_std(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std over ``dim`` (two passes; ``torch.std`` is slow over a short axis on CPU)."""
    n = x.shape[dim]
    mean = x.sum(dim, keepdim=True) / n
    c = x - mean
    return mean, ((c * c).sum(dim, keepdim=True) / (n - 1)).sqrt_()


def _adain_blend(x: torch.Tensor, ref: torch.Tensor, w: float, dim: int) -> torch.Tensor:
    """``w·x + (1−w)·((x − μₓ)·σ_r/(σₓ + 1e-6) + μ_r)`` with statistics over ``dim``, as one multiply-add."""
    mean_x, std_x = _mean_std(x, dim)
    mean_r, std_r = _mean_std(ref, dim)
    ratio = std_r / (std_x + 1e-6)
    coef = ratio * (1 - w) + w
    offset = (mean_r - mean_x * ratio) * (1 - w)
    return torch.addcmul(offset, x, coef)


def manipulated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, am: AMConfig, part: str, step: int,
    num_images: int = 1, plan: TokenPlan | None = None, on_map=None,
) -> torch.Tensor:
    """Explicit identity attention with AM applied: ``Ã V'`` (Eq. 7-10), ``[B, heads, L, d]``.

    ``plan``: the config's :class:`TokenPlan` for ``key``'s token count, device and dtype
    (the attention processors share one per pipeline call); built here when not given.
    ``on_map`` (optional, attention-map capture): called with the map ``Ã`` that multiplies
    ``V'``, ``[B, heads, L, T]``.
    """
    if plan is None:
        plan = TokenPlan.build(am, key.shape[-2], query.device, query.dtype)
    scale = 1 / math.sqrt(query.shape[-1])
    attn = torch.softmax(torch.matmul(key * scale, query.transpose(-1, -2)), dim=-2)  # [B, heads, T, L]
    new = _transform_token_major(attn, am, part, step, num_images, plan)
    w = am.adain_weight
    value_t = value.transpose(-1, -2)
    if w is None:
        if on_map is not None:
            on_map(new.transpose(-1, -2))
        return torch.matmul(new.transpose(-1, -2), value)
    new = _adain_blend(new, attn, w, dim=-2)  # statistics over the tokens
    if on_map is not None:
        on_map(new.transpose(-1, -2))
    hs = torch.matmul(value_t, new)  # [B, heads, d, L]
    blended = _adain_blend(hs, torch.matmul(value_t, attn), w, dim=-2)  # statistics over the head dim
    # The authors keep h̃ when the blend yields NaN; we decide per image so batching never matters,
    # on the device (no value read back to Python).
    g = _grouped(blended, num_images)
    bad = torch.isnan(g).flatten(2).any(dim=2).any(dim=0)  # [N]
    out = torch.where(bad.view(1, -1, *([1] * (g.ndim - 2))), _grouped(hs, num_images), g)
    return out.reshape(blended.shape).transpose(-1, -2)


def decoupled_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, am: AMConfig | None, part: str, step: int
) -> torch.Tensor:
    """The identity branch of decoupled cross-attention, with AM where ``am`` targets ``part``/``step``.

    ``query [B, heads, L, d]``, ``key``/``value [B, heads, T, d]``; the whole ``B`` is one
    image's guidance branches. Untargeted: exactly ``F.scaled_dot_product_attention``.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if am is None or not am.targets(part, step):
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    return manipulated_attention(query, key, value, am=am, part=part, step=step, num_images=1)


# ---------------------------------------------------------------------------
# The step the processors read (fastface.attention_processor installs them).


@dataclass
class DenoisingStep:
    """Set by the pipeline before every UNet call: the 0-based step and the images in the batch.

    ``recorder`` (optional; None costs nothing): an attention-map capture, e.g.
    :class:`fastface.attention_maps.AttentionMapRecorder`, with a method
    ``record(layer, part, step, probs, num_images)`` that receives the identity-attention
    probabilities ``[B, heads, L, T]`` each processor uses (after AM where AM is active).
    """

    index: int = 0
    num_images: int = 1
    recorder: Any = None


_PART_RE = re.compile(r"^(down|mid|up)_block")


def unet_part(layer_name: str) -> str | None:
    """``down_blocks.1.attentions.0...attn2.processor`` -> ``"down"``."""
    m = _PART_RE.match(layer_name)
    return m.group(1) if m else None

"""Attention manipulation (AM) of the IP-Adapter decoupled cross-attention, FastFace §3.2 (Eq. 7-10).

Pure tensor functions (:func:`decoupled_attention`, :func:`transform_attention_map`) and
:class:`FastFaceIPAttnProcessor`, a subclass of diffusers' ``IPAdapterAttnProcessor2_0``
(so ``set_ip_adapter_scale`` reaches it) that reuses the original ``to_k_ip``/``to_v_ip``
weights; its identity branch calls :func:`manipulated_attention`.
:func:`manipulated_attention_processors` installs it on the targeted ``attn2`` layers by
name and restores the original processors afterwards. The step index reaches the
processor through a :class:`DenoisingStep` the pipeline owns and sets before each UNet
call — processors never count steps themselves.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

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


def attention_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile over the L axis (dim -2), as ``torch.quantile``, without its size limit."""
    n = a.shape[-2]
    s, _ = a.float().sort(dim=-2)
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    low = s.narrow(-2, lo, 1)
    return low + frac * (s.narrow(-2, hi, 1) - low)


def adaptive_softmask(a: torch.Tensor, *, sharpness: float, quantile: float, num_images: int = 1,
                      quantile_fp16: bool = False) -> torch.Tensor:
    """Eq. 9: ``norm(σ(d·(norm(A) − q)))`` with ``q`` the quantile of the raw map over L, clamped ≥ 1e-6."""
    q = attention_quantile(a, quantile)
    if quantile_fp16:
        q = q.half()
    q = q.to(a.dtype).clamp(min=1e-6)
    res = 1 / (1 + torch.exp(-sharpness * (minmax_norm(a, num_images) - q)))
    return minmax_norm(res, num_images)


def _apply_transform(a: torch.Tensor, am: AMConfig, part: str, step: int, num_images: int) -> torch.Tensor:
    if am.transform == "scale_power":
        a = torch.pow(a, am.power.at(part, step))
    else:
        a = adaptive_softmask(
            a,
            sharpness=am.sharpness.at(part, step),
            quantile=am.quantile.at(part, step),
            num_images=num_images,
            quantile_fp16=am.quantile_fp16,
        )
    return torch.clamp(a * am.scale.at(part, step), max=am.scale_cap)


def transform_attention_map(a: torch.Tensor, am: AMConfig, part: str, step: int, num_images: int = 1) -> torch.Tensor:
    """``Ã = f(A)`` on the targeted tokens (first-token inversion around ``f`` when enabled)."""
    tokens = [t for t in am.tokens if t < a.shape[-1]]
    idx = torch.tensor(tokens, device=a.device)
    targ = a.index_select(-1, idx)
    if am.invert_first_token and 0 in tokens:
        j = tokens.index(0)
        targ[..., j] = 1 - targ[..., j]
        targ = _apply_transform(targ, am, part, step, num_images)
        first = targ[..., j]
        targ[..., j] = first.amax(dim=-1, keepdim=True) - first
    else:
        targ = _apply_transform(targ, am, part, step, num_images)
    out = a.clone()
    out[..., tokens] = targ.to(a.dtype)
    return out


def _adain(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Match ``x``'s mean/std over the last axis to ``ref``'s (unbiased std, eps 1e-6)."""
    mean_r, std_r = ref.mean(dim=-1, keepdim=True), ref.std(dim=-1, keepdim=True)
    mean_x, std_x = x.mean(dim=-1, keepdim=True), x.std(dim=-1, keepdim=True)
    return (x - mean_x) * (std_r / (std_x + 1e-6)) + mean_r


def manipulated_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, am: AMConfig, part: str, step: int,
    num_images: int = 1,
) -> torch.Tensor:
    """Explicit identity attention with AM applied: ``Ã V'`` (Eq. 7-10)."""
    scale = 1 / math.sqrt(query.shape[-1])
    attn = torch.softmax(query @ key.transpose(-2, -1) * scale, dim=-1)
    new = transform_attention_map(attn, am, part, step, num_images)
    w = am.adain_weight
    if w is None:
        return new @ value
    new = w * new + (1 - w) * _adain(new, attn)
    hs = new @ value
    hs_orig = attn @ value
    blended = w * hs + (1 - w) * _adain(hs, hs_orig)
    # The authors keep h̃ when the blend yields NaN; we decide per image so batching never matters.
    bad = _grouped(torch.isnan(blended), num_images).transpose(0, 1).reshape(num_images, -1).any(dim=1)
    if bool(bad.any()):
        mask = bad.view(1, num_images, *([1] * (blended.ndim - 1))).expand(
            _grouped(blended, num_images).shape).reshape(blended.shape)
        blended = torch.where(mask, hs, blended)
    return blended


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
# The diffusers processor and its installation.


@dataclass
class DenoisingStep:
    """Set by the pipeline before every UNet call: the 0-based step and the images in the batch."""

    index: int = 0
    num_images: int = 1


_PART_RE = re.compile(r"^(down|mid|up)_block")


def unet_part(layer_name: str) -> str | None:
    """``down_blocks.1.attentions.0...attn2.processor`` -> ``"down"``."""
    m = _PART_RE.match(layer_name)
    return m.group(1) if m else None


class FastFaceIPAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter processor with AM on the identity attention of one layer."""

    def __init__(self, original: IPAdapterAttnProcessor2_0, *, part: str, am: AMConfig, step: DenoisingStep):
        torch.nn.Module.__init__(self)
        self.hidden_size = original.hidden_size
        self.cross_attention_dim = original.cross_attention_dim
        self.num_tokens = list(original.num_tokens)
        self.scale = original.scale  # the same list: set_ip_adapter_scale assigns into it in place
        self.to_k_ip = original.to_k_ip  # shared weights, not copies
        self.to_v_ip = original.to_v_ip
        self.part = part
        self.am = am
        self.step = step

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        scale: float = 1.0,
        ip_adapter_masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if ip_adapter_masks is not None:
            raise ValueError("FastFace attention manipulation does not support ip_adapter_masks")
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError("FastFaceIPAttnProcessor expects encoder_hidden_states as (text states, ip states)")
        encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query = heads(query)
        hidden_states = F.scaled_dot_product_attention(
            query, heads(key), heads(value), attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        step = self.step.index
        active = self.am.targets(self.part, step)
        for ip_states, ip_scale, to_k_ip, to_v_ip in zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip):
            if ip_scale == 0:
                continue
            ip_key, ip_value = heads(to_k_ip(ip_states)), heads(to_v_ip(ip_states))
            if active:
                ip_out = manipulated_attention(
                    query, ip_key, ip_value, am=self.am, part=self.part, step=step, num_images=self.step.num_images
                )
            else:
                ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, dropout_p=0.0, is_causal=False)
            ip_out = ip_out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
            hidden_states = hidden_states + ip_scale * ip_out

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def ip_adapter_layers(unet) -> dict[str, IPAdapterAttnProcessor2_0]:
    """Name -> processor of every IP-Adapter ``attn2`` processor (diffusers' or ours)."""
    return {
        name: proc
        for name, proc in unet.attn_processors.items()
        if isinstance(proc, IPAdapterAttnProcessor2_0) and ".attn2." in name
    }


@contextlib.contextmanager
def manipulated_attention_processors(unet, am: AMConfig | None, step: DenoisingStep) -> Iterator[list[str]]:
    """Install :class:`FastFaceIPAttnProcessor` on the ``attn2`` layers ``am`` targets; restore on exit.

    Yields the names of the layers it replaced. With ``am=None`` nothing is installed.
    """
    if am is None:
        yield []
        return
    original = dict(unet.attn_processors)
    ip_layers = ip_adapter_layers(unet)
    if not ip_layers:
        raise ValueError(
            "no IP-Adapter attention processors in this UNet: load the FaceID adapter "
            "(pipe.load_ip_adapter(...)) before using attention manipulation"
        )
    replaced = []
    new = dict(original)
    for name, proc in ip_layers.items():
        part = unet_part(name)
        if part in am.parts:
            new[name] = FastFaceIPAttnProcessor(proc, part=part, am=am, step=step)
            replaced.append(name)
    if not replaced:
        raise ValueError(f"AM config targets parts {am.parts} but no IP-Adapter layer lies in them")
    unet.set_attn_processor(new)
    try:
        yield replaced
    finally:
        unet.set_attn_processor(original)

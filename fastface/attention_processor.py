"""The diffusers side of attention manipulation: :class:`FastFaceIPAttnProcessor` and its installation.

:class:`FastFaceIPAttnProcessor` subclasses diffusers' ``IPAdapterAttnProcessor2_0`` (so
``set_ip_adapter_scale`` reaches it) and reuses the original ``to_k_ip``/``to_v_ip`` weights;
it applies :mod:`fastface.attention`'s transforms to the identity attention of one layer.
:func:`manipulated_attention_processors` installs it on the targeted ``attn2`` layers by name
and restores the original processors afterwards.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from fastface.attention import AMConfig, DenoisingStep, TokenPlan, manipulated_attention, unet_part


class FastFaceIPAttnProcessor(IPAdapterAttnProcessor2_0):
    """diffusers' IP-Adapter processor with AM on the identity attention of one layer."""

    def __init__(self, original: IPAdapterAttnProcessor2_0, *, part: str, am: AMConfig | None, step: DenoisingStep,
                 plans: dict | None = None, layer: str = ""):
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
        self.layer = layer
        # (tokens, device, dtype) -> TokenPlan, shared by the processors of one pipeline call
        self.plans = {} if plans is None else plans

    def token_plan(self, num_tokens: int, device: torch.device, dtype: torch.dtype) -> TokenPlan:
        key = (num_tokens, device, dtype)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = TokenPlan.build(self.am, num_tokens, device, dtype)
        return plan

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
        active = self.am is not None and self.am.targets(self.part, step)
        record = self._recorder_hook(step)
        for ip_states, ip_scale, to_k_ip, to_v_ip in zip(ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip):
            if ip_scale == 0:
                continue
            ip_key, ip_value = heads(to_k_ip(ip_states)), heads(to_v_ip(ip_states))
            if active:
                plan = self.token_plan(ip_key.shape[-2], query.device, query.dtype)
                ip_out = manipulated_attention(query, ip_key, ip_value, am=self.am, part=self.part, step=step,
                                               num_images=self.step.num_images, plan=plan, on_map=record)
            else:
                if record is not None:  # capture only: the map sdpa uses, computed explicitly
                    record(torch.softmax(query @ ip_key.transpose(-2, -1) / math.sqrt(query.shape[-1]), dim=-1))
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

    def _recorder_hook(self, step: int):
        """Attention-map capture (off unless the pipeline's DenoisingStep carries a recorder)."""
        recorder = self.step.recorder
        if recorder is None:
            return None
        num_images = self.step.num_images
        return lambda probs: recorder.record(self.layer, self.part, step, probs, num_images)


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

    Yields the names of the layers it replaced. With ``am=None`` nothing is installed — unless
    ``step.recorder`` is set: then every IP-Adapter layer gets the processor (with AM only where
    ``am`` targets), so the maps are captured from the processors that generate.
    """
    recording = step.recorder is not None
    if am is None and not recording:
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
    plans: dict = {}  # index/sign tensors built once for this call, shared by every layer
    for name, proc in ip_layers.items():
        part = unet_part(name)
        if recording or part in am.parts:
            new[name] = FastFaceIPAttnProcessor(proc, part=part, am=am, step=step, plans=plans, layer=name)
            replaced.append(name)
    if am is not None and not any(unet_part(name) in am.parts for name in replaced):
        raise ValueError(f"AM config targets parts {am.parts} but no IP-Adapter layer lies in them")
    if am is not None:
        for num_tokens in {t for name in replaced for t in new[name].num_tokens}:  # before the first layer runs
            new[replaced[0]].token_plan(num_tokens, unet.device, unet.dtype)
    unet.set_attn_processor(new)
    try:
        yield replaced
    finally:
        unet.set_attn_processor(original)

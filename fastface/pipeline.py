"""FastFacePipeline: SDXL + IP-Adapter FaceID-Plus-v2 with DCG and AM, batched over (identity, prompt) pairs.

The UNet batch of one step is laid out branch-major, ``[branch_k × N for k in active]``
(diffusers' CFG layout). ``active`` holds only the branches the step needs
(:func:`fastface.guidance.required_branches`): skipping the others is exact. Each
example has its own generator, for its initial latents and for the step noise of
stochastic schedulers, so an image never depends on what it is batched with.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from tqdm.auto import tqdm

from fastface.dtypes import dtype_name, transformers_dtype_kwargs
from fastface.attention import AMConfig, DenoisingStep
from fastface.attention_processor import ip_adapter_layers, manipulated_attention_processors
from fastface.guidance import BRANCH_CONDITIONS, DCGConfig, combine_branches, required_branches
from fastface.presets import TABLE_IP_ADAPTER_SCALE, Preset, get_preset

FACEID_LORA = "faceid_0"
#: SDXL's own default guidance, read from diffusers (the base model's α = β).
SDXL_DEFAULT_GUIDANCE: float = float(
    inspect.signature(StableDiffusionXLPipeline.__call__).parameters["guidance_scale"].default
)
_UNSET: Any = object()


@dataclass
class FastFaceOutput:
    images: Any  # list of PIL images, or an array/tensor for output_type "np"/"pt"/"latent"
    metadata: list[dict] = field(default_factory=list)


@dataclass
class _Branches:
    """Per-branch conditioning for N examples: rows of branch k are ``[k*N:(k+1)*N]`` of each tensor."""

    prompt_embeds: list[torch.Tensor]
    pooled: list[torch.Tensor]
    id_embeds: list[torch.Tensor]
    clip_states: list[torch.Tensor]
    time_ids: torch.Tensor

    def gather(self, active: Sequence[int]) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": torch.cat([self.prompt_embeds[k] for k in active]),
            "text_embeds": torch.cat([self.pooled[k] for k in active]),
            "time_ids": self.time_ids.repeat(len(active), 1),
            # MultiIPAdapterImageProjection takes [batch, num_images, ...]: one ID image per example.
            "image_embeds": torch.cat([self.id_embeds[k] for k in active]).unsqueeze(1),
            "clip_embeds": torch.cat([self.clip_states[k] for k in active]).unsqueeze(1),
        }


class FastFacePipeline(StableDiffusionXLPipeline):
    """SDXL pipeline whose ``__call__`` generates N (identity, prompt) pairs with FastFace guidance."""

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        default_guidance: float | None = None,
    ):
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
            image_encoder=image_encoder, feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker,
        )
        # Part of the pipeline's config (model_index.json), so it travels with saved folders.
        self.register_to_config(default_guidance=None if default_guidance is None else float(default_guidance))

    @property
    def default_guidance(self) -> float:
        """α = β for presets without DCG: the loaded checkpoint's (``load_pipeline`` sets it, a saved
        folder keeps it); a plain SDXL folder has SDXL's own default, ``StableDiffusionXLPipeline``'s
        ``guidance_scale`` (5)."""
        configured = self.config.get("default_guidance")
        return SDXL_DEFAULT_GUIDANCE if configured is None else float(configured)

    def set_default_guidance(self, guidance: float) -> None:
        self.register_to_config(default_guidance=float(guidance))

    # -- identity inputs -------------------------------------------------------
    def _require_image_encoder(self) -> None:
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError(
                "this pipeline has no CLIP image encoder: load one (CLIPVisionModelWithProjection) and register it "
                "with pipe.register_modules(image_encoder=..., feature_extractor=CLIPImageProcessor(...)); precomputed "
                "clip_states need it too (the null identity's states come from it)"
            )

    def encode_face_crops(self, face_crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Penultimate CLIP hidden states of aligned BGR face crops, ``[N, seq, hidden]``
        (:func:`fastface.faces.identity.encode_clip_states`, the one encoder of identity states)."""
        from fastface.faces.identity import encode_clip_states

        self._require_image_encoder()
        return encode_clip_states(list(face_crops), self.image_encoder, self.feature_extractor)

    def null_clip_states(self) -> torch.Tensor:
        """The null identity's CLIP states, ``[1, seq, hidden]`` (:func:`fastface.faces.identity.null_clip_states`)."""
        from fastface.faces.identity import null_clip_states

        self._require_image_encoder()
        return null_clip_states(self.image_encoder, self.feature_extractor)

    # -- plumbing diffusers imposes ------------------------------------------
    def _faceid_projection(self):
        proj = getattr(self.unet, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        if not layers or not hasattr(layers[0], "clip_embeds"):
            raise ValueError(
                "no FaceID-Plus image projection in this UNet: call pipe.load_ip_adapter(<folder>, subfolder=None, "
                "weight_name='ip-adapter-faceid-plusv2_sdxl.bin', image_encoder_folder=None) first"
            )
        return layers[0]

    @property
    def id_embedding_width(self) -> int:
        """The adapter's ID width: how wide the identity embeddings it takes are (512 for FaceID-Plus-v2)."""
        return int(self._faceid_projection().proj.net[0].proj.in_features)

    def current_ip_adapter_scale(self) -> float | None:
        layers = ip_adapter_layers(self.unet)
        return float(next(iter(layers.values())).scale[0]) if layers else None

    @contextlib.contextmanager
    def _adapter_state(self, ip_adapter_scale: float, lora_scale: float) -> Iterator[Any]:
        """λ and the FaceID LoRA weight for this call; λ and the projection's inputs are restored after."""
        proj = self._faceid_projection()
        saved = (proj.clip_embeds, proj.shortcut, self.current_ip_adapter_scale())
        self.set_ip_adapter_scale(ip_adapter_scale)
        if FACEID_LORA in (getattr(self.unet, "peft_config", None) or {}):
            self.set_adapters([FACEID_LORA], [lora_scale])
        elif lora_scale != 1.0:
            raise ValueError(f"lora_scale={lora_scale} given but the adapter has no LoRA ({FACEID_LORA!r} not loaded)")
        proj.shortcut = True  # FaceID-Plus-v2: "v2" is the shortcut
        try:
            yield proj
        finally:
            proj.clip_embeds, proj.shortcut = saved[0], saved[1]
            if saved[2] is not None:
                self.set_ip_adapter_scale(saved[2])

    # -- generation ------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        id_embeds: torch.Tensor | np.ndarray | Sequence[np.ndarray],
        face_crops: Sequence[np.ndarray] | None = None,
        clip_states: torch.Tensor | None = None,
        preset: str | Preset = "baseline",
        dcg: DCGConfig | None = None,
        am: AMConfig | None = _UNSET,
        default_guidance: float | None = None,
        ip_adapter_scale: float = TABLE_IP_ADAPTER_SCALE,
        lora_scale: float = 1.0,
        seeds: Sequence[int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_inference_steps: int = 4,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        approximate_am2_skipping: bool = False,
        force_all_branches: bool = False,
        show_progress: bool = False,
        attention_recorder: Any = None,
    ) -> FastFaceOutput:
        """Generate one image per (identity, prompt) pair.

        1. validate inputs and resolve the preset; 2. encode prompts and identities per branch;
        3. prepare latents with one generator per example; 4. denoise, evaluating only the
        branches each step needs, AM processors installed for the call; 5. decode.
        """
        started = time.perf_counter()
        # 1. inputs
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts given")
        preset_obj = get_preset(preset) if isinstance(preset, str) else preset
        guidance = self.default_guidance if default_guidance is None else default_guidance
        preset_dcg, preset_am = preset_obj.resolve(guidance)
        dcg = preset_dcg if dcg is None else dcg
        am = preset_am if am is _UNSET else am
        dcg.check_steps(num_inference_steps, preset=preset_obj.name)
        if am is not None:
            am.check_steps(num_inference_steps, preset=preset_obj.name)
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("UNets with a guidance embedding (time_cond_proj_dim) are not supported by DCG")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        generators, seed_list = self._generators(n, seeds, generator)
        device, dtype = self._execution_device, self.unet.dtype

        # 2. conditioning per branch
        ids = self._id_embeds(id_embeds, n, device, dtype)
        clip = self._clip_states(face_crops, clip_states, n, device, dtype)
        branches = self._branches(prompts, ids, clip, dcg.variant, height, width, device, dtype)

        # 3. timesteps and latents
        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device)
        if latents is not None and latents.shape[0] != n:
            raise ValueError(f"latents has {latents.shape[0]} rows for {n} prompts")
        latents = self.prepare_latents(
            n, self.unet.config.in_channels, height, width, dtype, device, generators, latents
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generators, 0.0)

        # 4. denoising
        step = DenoisingStep(num_images=n, recorder=attention_recorder)  # recorder: fastface.attention_maps
        rows_per_step: list[int] = []
        with self._adapter_state(ip_adapter_scale, lora_scale) as proj, manipulated_attention_processors(
            self.unet, am, step
        ):
            for i, t in enumerate(tqdm(timesteps, disable=not show_progress, desc="denoising", leave=False)):
                alpha, beta = dcg.weights_at(i, float(t), self.scheduler.config.num_train_timesteps)
                couple = am is not None and am.couples_branches(i) and not approximate_am2_skipping
                # force_all_branches: the reference implementation's way (all three, always), for benchmarks.
                couple = couple or force_all_branches
                active = required_branches(alpha, beta, dcg.rescale, dcg.variant, couple_all=couple)
                cond = branches.gather(active)
                rows_per_step.append(len(active))
                step.index = i
                proj.clip_embeds = cond["clip_embeds"]
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * len(active)), t)
                noise = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=cond["prompt_embeds"],
                    added_cond_kwargs={
                        "text_embeds": cond["text_embeds"],
                        "time_ids": cond["time_ids"],
                        "image_embeds": [cond["image_embeds"]],
                    },
                    return_dict=False,
                )[0]
                preds = dict(zip(active, noise.chunk(len(active))))
                eps = combine_branches(preds, alpha=alpha, beta=beta, rescale=dcg.rescale, variant=dcg.variant)
                latents = self.scheduler.step(eps, t, latents, **extra_step_kwargs, return_dict=False)[0]

        # 5. decode
        images = self._decode(latents, output_type)
        seconds = time.perf_counter() - started
        meta_common = {
            "preset": preset_obj.name,
            "dcg": dcg.to_dict(),
            "am": None if am is None else am.to_dict(),
            "ip_adapter_scale": float(ip_adapter_scale),
            "lora_scale": float(lora_scale),
            "steps": int(num_inference_steps),
            "height": int(height),
            "width": int(width),
            "unet_rows_per_step": rows_per_step,
            "unet_rows": int(sum(rows_per_step)),
            "approximate_am2_skipping": bool(approximate_am2_skipping),
            "force_all_branches": bool(force_all_branches),
            "batch_size": n,
            "seconds_per_image": seconds / n,
            "device": str(device),
            "dtype": dtype_name(dtype),
        }
        metadata = [dict(meta_common, prompt=p, seed=s) for p, s in zip(prompts, seed_list)]
        return FastFaceOutput(images=images, metadata=metadata)

    # -- helpers -----------------------------------------------------------------
    @staticmethod
    def _generators(n: int, seeds, generator) -> tuple[list[torch.Generator], list[int | None]]:
        if seeds is not None and generator is not None:
            raise ValueError("give either seeds or generator, not both")
        if generator is not None:
            gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
            if len(gens) != n:
                raise ValueError(f"need one generator per example: got {len(gens)} for {n} prompts")
            return gens, [None] * n
        seed_list = [0] * n if seeds is None else [int(s) for s in seeds]
        if len(seed_list) != n:
            raise ValueError(f"need one seed per example: got {len(seed_list)} for {n} prompts")
        return [torch.Generator("cpu").manual_seed(s) for s in seed_list], seed_list

    def _id_embeds(self, id_embeds, n: int, device, dtype) -> torch.Tensor:
        if isinstance(id_embeds, (list, tuple)):
            id_embeds = np.stack([np.asarray(e, dtype=np.float32) for e in id_embeds])
        ids = torch.as_tensor(np.asarray(id_embeds) if not torch.is_tensor(id_embeds) else id_embeds)
        if ids.ndim == 1:
            ids = ids[None]
        expected = self.id_embedding_width
        if ids.ndim != 2 or ids.shape[0] != n or ids.shape[1] != expected:
            raise ValueError(
                f"id_embeds must be [{n}, {expected}] (one identity embedding per prompt, the adapter's ID width), "
                f"got {tuple(ids.shape)}"
            )
        return ids.to(device=device, dtype=dtype)

    def _clip_states(self, face_crops, clip_states, n: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if (face_crops is None) == (clip_states is None):
            raise ValueError("give exactly one of face_crops (aligned BGR face crops) or clip_states")
        if clip_states is None:
            if len(face_crops) != n:
                raise ValueError(f"need one face crop per prompt: got {len(face_crops)} for {n}")
            clip_states = self.encode_face_crops(face_crops)
        if clip_states.ndim != 3 or clip_states.shape[0] != n:
            raise ValueError(f"clip_states must be [{n}, seq, hidden], got {tuple(clip_states.shape)}")
        null = self.null_clip_states() if self.image_encoder is not None else None
        if null is None:
            raise ValueError("the null identity needs the CLIP image encoder; register image_encoder on the pipeline")
        return clip_states.to(device, dtype), null.to(device, dtype)

    def _branches(self, prompts, ids, clip, variant, height, width, device, dtype) -> _Branches:
        clip_states, null_clip = clip
        pe, npe, pooled, npooled = self.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        proj_dim = (
            int(pooled.shape[-1]) if self.text_encoder_2 is None else self.text_encoder_2.config.projection_dim
        )
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=pe.dtype, text_encoder_projection_dim=proj_dim
        ).to(device).repeat(len(prompts), 1)
        zeros_id = torch.zeros_like(ids)
        null_clip = null_clip.expand(len(prompts), -1, -1)
        out = _Branches([], [], [], [], time_ids)
        for use_text, use_id in BRANCH_CONDITIONS[variant]:
            out.prompt_embeds.append((pe if use_text else npe).to(dtype))
            out.pooled.append((pooled if use_text else npooled).to(dtype))
            out.id_embeds.append(ids if use_id else zeros_id)
            out.clip_states.append(clip_states if use_id else null_clip)
        return out

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if needs_upcasting:  # SDXL's VAE overflows in float16 (its config's force_upcast)
            with known_harmless_logs_silenced():
                self.vae.to(torch.float32)
            latents = latents.to(torch.float32)
        cfg = self.vae.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / cfg.scaling_factor + mean
        else:
            latents = latents / cfg.scaling_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        if needs_upcasting:
            with known_harmless_logs_silenced():
                self.vae.to(dtype=torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)


#: Messages diffusers logs while loading FaceID-Plus-v2 that say nothing is wrong: the adapter's LoRA
#: targets the UNet only (so "no LoRA keys" for both text encoders), and ``.to(dtype)`` on a UNet
#: with an empty keep-in-float32 list.
_HARMLESS_DIFFUSERS_LOGS = (
    "No LoRA keys associated to CLIPTextModel",
    "that should be kept in float32: []",
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(known in message for known in _HARMLESS_DIFFUSERS_LOGS)


@contextlib.contextmanager
def known_harmless_logs_silenced() -> Iterator[None]:
    """Drop only the known-harmless diffusers messages above, for the duration of a load."""
    from diffusers.utils import logging as diffusers_logging

    handlers = diffusers_logging._get_library_root_logger().handlers or logging.getLogger().handlers
    drop = _DropHarmless()
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


def load_faceid_adapter(
    pipe: StableDiffusionXLPipeline,
    adapter: str | os.PathLike,
    *,
    image_encoder: str | os.PathLike | Any,
    weight_name: str = "ip-adapter-faceid-plusv2_sdxl.bin",
    lora_scale: float = 1.0,
    **hub_kwargs,
) -> StableDiffusionXLPipeline:
    """Attach the FaceID-Plus-v2 adapter (its LoRA as ``faceid_0``) and the CLIP image encoder.

    ``adapter`` is an adapter file, a folder holding ``weight_name``, or a hub repo id
    (``h94/IP-Adapter-FaceID``); ``image_encoder`` a folder, hub id or a loaded
    ``CLIPVisionModelWithProjection``. Goes through diffusers' own ``load_ip_adapter``.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    if isinstance(image_encoder, (str, os.PathLike)):
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(
            image_encoder, **transformers_dtype_kwargs(pipe.unet.dtype), **hub_kwargs
        )
    image_encoder = image_encoder.to(pipe.unet.device, pipe.unet.dtype)
    size = image_encoder.config.image_size
    pipe.register_modules(image_encoder=image_encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    adapter = str(adapter)
    if os.path.isfile(adapter):
        folder, weight_name = os.path.dirname(adapter) or ".", os.path.basename(adapter)
    else:
        folder = adapter
    with known_harmless_logs_silenced():
        pipe.load_ip_adapter(folder, subfolder=None, weight_name=weight_name, image_encoder_folder=None,
                             **hub_kwargs)
    if FACEID_LORA in (getattr(pipe.unet, "peft_config", None) or {}):
        pipe.set_adapters([FACEID_LORA], [lora_scale])
    return pipe

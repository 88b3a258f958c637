"""Distilled SDXL checkpoints (method-spec §1): what each is built from, and loading it as a FastFacePipeline.

Every weight source is a hub id or a local path (file or folder), overridden per call
(``load_pipeline("hyper", sdxl_base="/models/sdxl")``) or by environment variable:

========================  ==========================  ============================================
source key                environment variable        default (hub id; file inside it)
========================  ==========================  ============================================
``sdxl_base``             ``FASTFACE_SDXL_BASE``      stabilityai/stable-diffusion-xl-base-1.0
``hyper_lora``            ``FASTFACE_HYPER_LORA``     ByteDance/Hyper-SD; Hyper-SDXL-{n}step{s}-lora.safetensors
``lightning_unet``        ``FASTFACE_LIGHTNING_UNET`` ByteDance/SDXL-Lightning; sdxl_lightning_{n}step_unet.safetensors
``lcm_lora``              ``FASTFACE_LCM_LORA``       latent-consistency/lcm-lora-sdxl; pytorch_lora_weights.safetensors
``turbo``                 ``FASTFACE_SDXL_TURBO``     stabilityai/sdxl-turbo (its ``unet/`` and ``scheduler/``)
``faceid_adapter``        ``FASTFACE_FACEID_ADAPTER`` h94/IP-Adapter-FaceID; ip-adapter-faceid-plusv2_sdxl.bin
``clip_h``                ``FASTFACE_CLIP_H``         laion/CLIP-ViT-H-14-laion2B-s32B-b79K
========================  ==========================  ============================================

LoRA-distilled checkpoints (hyper, lcm) are fused once; the fused components are
saved under ``<cache>/fused/<name>-<n>step-<dtype>-<key>`` (cache: ``cache_dir`` argument,
else ``FASTFACE_CACHE``, else ``~/.cache/fastface``), keyed by checkpoint, step count,
dtype and the identity of every source, and reused by later loads.

The ``tiny-*`` entries are the same families built on :mod:`fastface.tiny` models with
tiny distilled weights (:mod:`fastface.tiny_checkpoints`) in the real layouts; they take
explicit source arguments but ignore the environment variables.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fastface.cache import cache_root, fused_dir, tiny_models_dir
from fastface.dtypes import diffusers_dtype_kwargs, dtype_name, parse_dtype, transformers_dtype_kwargs

from fastface.presets import get_preset
from fastface.registry import Registry
from fastface.tiny_checkpoints import (
    HYPER_LORA_FILE,
    HYPER_STEPS,
    LCM_LORA_FILE,
    LIGHTNING_STEPS,
    LIGHTNING_UNET_FILE,
    ensure_tiny_checkpoints,
    step_file,
)
from fastface.tiny import TINY_VERSION

FUSED_CACHE_VERSION = "1"  # bump when the fused-cache layout or fusing changes
REAL_ID_EMBED_DIM = 512  # insightface buffalo_l, what FaceID-Plus-v2 was trained on
TINY_ID_EMBED_DIM = 128  # dlib, what the tiny adapter takes (fastface.tiny.ID_EMBED_DIM)


class ModelNotFoundError(FileNotFoundError):
    """Weights that are neither on disk nor downloadable; the message says how to provide them."""


# -- weight sources -----------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    key: str
    env: str
    hub_id: str
    filename: str | None  # a file in the repo/folder ({n}: steps, {s}: plural "s"); None: a model folder
    probe: str  # the file whose presence says the source is available (for folders)
    description: str

    @property
    def flag(self) -> str:
        return f"--source {self.key}=PATH"

    def file_for(self, steps: int) -> str | None:
        return None if self.filename is None else step_file(self.filename, steps)

    def how_to_provide(self) -> str:
        return f"set {self.env}=PATH or pass {self.flag} (CLI) / {self.key}=PATH (load_pipeline)"


SOURCES: Registry[Source] = Registry("weight source")
for _s in (
    Source("sdxl_base", "FASTFACE_SDXL_BASE", "stabilityai/stable-diffusion-xl-base-1.0", None, "model_index.json",
           "SDXL base pipeline (diffusers folder)"),
    Source("hyper_lora", "FASTFACE_HYPER_LORA", "ByteDance/Hyper-SD", HYPER_LORA_FILE, HYPER_LORA_FILE,
           "Hyper-SDXL n-step LoRA (file, or folder holding it)"),
    Source("lightning_unet", "FASTFACE_LIGHTNING_UNET", "ByteDance/SDXL-Lightning", LIGHTNING_UNET_FILE,
           LIGHTNING_UNET_FILE, "SDXL-Lightning n-step UNet state dict (file, or folder holding it)"),
    Source("lcm_lora", "FASTFACE_LCM_LORA", "latent-consistency/lcm-lora-sdxl", LCM_LORA_FILE, LCM_LORA_FILE,
           "LCM-LoRA SDXL (file, or folder holding it)"),
    Source("turbo", "FASTFACE_SDXL_TURBO", "stabilityai/sdxl-turbo", None, "unet/config.json",
           "SDXL-Turbo (folder with unet/ and scheduler/)"),
    Source("faceid_adapter", "FASTFACE_FACEID_ADAPTER", "h94/IP-Adapter-FaceID", "ip-adapter-faceid-plusv2_sdxl.bin",
           "ip-adapter-faceid-plusv2_sdxl.bin", "IP-Adapter FaceID-Plus-v2 SDXL (file, or folder holding it)"),
    Source("clip_h", "FASTFACE_CLIP_H", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None, "config.json",
           "CLIP ViT-H/14 image encoder (transformers folder)"),
):
    SOURCES.register(_s.key, _s)


# -- checkpoints -------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerSpec:
    """``class_name=None`` keeps the model's own scheduler; ``from_weights`` starts from the distilled source's."""

    class_name: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()
    from_weights: bool = False

    def build(self, config: Any):
        import diffusers

        return getattr(diffusers, self.class_name).from_config(config, **dict(self.overrides))


@dataclass(frozen=True)
class Checkpoint:
    name: str
    family: str  # hyper | lightning | lcm | turbo | base
    build: str  # "base" | "fused-lora" | "unet-file" | "unet-folder"
    weights: str | None  # source key of the distilled weights
    scheduler: SchedulerSpec
    size: int
    steps: tuple[int, ...] | None  # supported step counts; None: any
    default_steps: int
    default_guidance: float  # α = β when a preset has no DCG
    tiny: bool = False
    fuse_scale: float = 1.0
    description: str = ""

    @property
    def id_embed_dim(self) -> int:
        return TINY_ID_EMBED_DIM if self.tiny else REAL_ID_EMBED_DIM

    @property
    def source_keys(self) -> tuple[str, ...]:
        keys = ("sdxl_base",) + ((self.weights,) if self.weights else ())
        return keys + ("faceid_adapter", "clip_h")

    def resolve_steps(self, steps: int | None) -> int:
        """``steps`` (or the default), checked against the step counts this checkpoint was distilled for."""
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if self.steps is not None and steps not in self.steps:
            raise ValueError(
                f"model {self.name!r} supports {', '.join(map(str, self.steps))} steps, not {steps}"
            )
        return steps

    def to_dict(self) -> dict:
        out = asdict(self)
        out["scheduler"] = {"class_name": self.scheduler.class_name, "overrides": dict(self.scheduler.overrides),
                            "from_weights": self.scheduler.from_weights}
        return out


_TRAILING_DDIM = SchedulerSpec("DDIMScheduler", (("timestep_spacing", "trailing"),))
_TRAILING_EULER = SchedulerSpec("EulerDiscreteScheduler", (("timestep_spacing", "trailing"),))
_LCM = SchedulerSpec("LCMScheduler")
_TURBO = SchedulerSpec("EulerAncestralDiscreteScheduler", from_weights=True)
_LCM_STEPS = tuple(range(2, 9))  # LCM-LoRA's card: 2–8 steps

CHECKPOINTS: Registry[Checkpoint] = Registry("model")
for _c in (
    Checkpoint("hyper", "hyper", "fused-lora", "hyper_lora", _TRAILING_DDIM, 1024, HYPER_STEPS, 4, 1.0,
               description="SDXL + Hyper-SDXL n-step LoRA, fused"),
    Checkpoint("lightning", "lightning", "unet-file", "lightning_unet", _TRAILING_EULER, 1024, LIGHTNING_STEPS, 4, 1.0,
               description="SDXL with the SDXL-Lightning n-step UNet"),
    Checkpoint("lcm", "lcm", "fused-lora", "lcm_lora", _LCM, 1024, _LCM_STEPS, 4, 1.5,
               description="SDXL + LCM-LoRA, fused"),
    Checkpoint("turbo", "turbo", "unet-folder", "turbo", _TURBO, 512, (1, 2, 3, 4), 4, 1.0,
               description="SDXL with the SDXL-Turbo UNet and scheduler"),
    Checkpoint("base", "base", "base", None, SchedulerSpec(), 1024, None, 30, 5.0,
               description="SDXL base, multi-step"),
):
    CHECKPOINTS.register(_c.name, _c)
    if _c.family != "base":
        _size = 32 if _c.family == "turbo" else 64
        CHECKPOINTS.register(
            f"tiny-{_c.name}",
            Checkpoint(f"tiny-{_c.name}", _c.family, _c.build, _c.weights, _c.scheduler, _size, _c.steps,
                       _c.default_steps, _c.default_guidance, tiny=True,
                       description=f"tiny random-weight stand-in: {_c.description}"),
        )


def get_checkpoint(name: str) -> Checkpoint:
    return CHECKPOINTS.get(name)


def check_steps(model: str | Checkpoint, preset: str, steps: int | None = None) -> int:
    """The step count a run will use; fails before anything is loaded, naming preset/model and step count."""
    checkpoint = get_checkpoint(model) if isinstance(model, str) else model
    preset_obj = get_preset(preset)
    steps = checkpoint.resolve_steps(steps)
    preset_obj.check_steps(steps)
    return steps


# -- locating sources ----------------------------------------------------------------
def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") != 1 or os.sep != "/" and os.sep in value


@dataclass(frozen=True)
class Located:
    """A source made concrete: a local file/folder to load from, or a hub repo (``path`` then its probe file)."""

    source: Source
    value: str
    path: Path  # the file to load (file sources) or the local folder / probe file
    hub: bool

    @property
    def load_from(self) -> str:
        """What from_pretrained gets: the local folder, or the hub id (files resolve to their path)."""
        if self.source.filename is not None or not self.hub:
            return str(self.path)
        return self.value

    def identity(self) -> str:
        """Changes whenever the weights could have: hub snapshot path (has the commit), or local stat."""
        if self.hub:
            return f"hub:{self.value}:{self.path}"
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        stats = [(str(p.relative_to(self.path) if p != self.path else p.name), p.stat().st_size, p.stat().st_mtime_ns)
                 for p in files]
        return f"local:{self.path.resolve()}:{hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}"


def _missing(source: Source, value: str, what: str, checkpoint: Checkpoint, reason: str) -> ModelNotFoundError:
    hint = (
        "pass it explicitly (tiny models ignore environment variables)" if checkpoint.tiny
        else f"download it where there is network (`hf download {source.hub_id}`) or point at a local copy: "
        f"{source.how_to_provide()}"
    )
    return ModelNotFoundError(
        f"model {checkpoint.name!r}: {source.description} not found: {what} ({reason}). To fix: {hint}"
    )


def locate(source: Source, value: str, steps: int, checkpoint: Checkpoint,
           local_files_only: bool | None = None) -> Located:
    """Resolve one source without loading weights (downloads the file of file sources when online)."""
    filename = source.file_for(steps)
    path = Path(value).expanduser()
    if path.exists():
        if path.is_file():
            if filename is None:
                raise _missing(source, value, str(path), checkpoint, "expected a model folder, got a file")
            return Located(source, value, path, hub=False)
        inner = path / (filename or source.probe)
        if not inner.is_file():
            raise _missing(source, value, str(inner), checkpoint, "the folder has no such file")
        return Located(source, value, inner if filename else path, hub=False)
    if _looks_like_path(value):
        raise _missing(source, value, str(path), checkpoint, "no such file or folder")
    from huggingface_hub import hf_hub_download

    probe = filename or source.probe
    try:
        local = hf_hub_download(value, probe, local_files_only=bool(local_files_only))
    except Exception as exc:  # offline, connection failure, unknown/gated repo, missing file: all "not available"
        from huggingface_hub import constants

        reason = "HF_HUB_OFFLINE=1 and not in the local cache" if constants.HF_HUB_OFFLINE or local_files_only else (
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'download failed'}"
        )
        raise _missing(source, value, f"{value}/{probe}", checkpoint, reason) from None
    return Located(source, value, Path(local), hub=True)


def resolve_sources(checkpoint: Checkpoint, overrides: dict[str, Any], cache_root: Path) -> dict[str, str]:
    """Source key → value: explicit argument, else environment variable (real models), else the default."""
    unknown = sorted(set(overrides) - set(SOURCES.names()))
    if unknown:
        raise ValueError(f"unknown weight source(s) {unknown}; valid sources: {', '.join(SOURCES.names())}")
    unused = sorted(k for k, v in overrides.items() if v is not None and k not in checkpoint.source_keys)
    if unused:
        raise ValueError(f"model {checkpoint.name!r} does not use source(s) {unused}; it uses {checkpoint.source_keys}")
    values: dict[str, str] = {}
    defaults: dict[str, str] = {}
    if checkpoint.tiny:
        needed = [k for k in checkpoint.source_keys if overrides.get(k) is None]
        if needed:
            models, tiny = ensure_tiny_checkpoints(tiny_models_dir(TINY_VERSION, cache_root))
            defaults = {"sdxl_base": models.sdxl, "faceid_adapter": models.adapter, "clip_h": models.image_encoder,
                        "hyper_lora": tiny.hyper_lora, "lcm_lora": tiny.lcm_lora,
                        "lightning_unet": tiny.lightning_unet, "turbo": tiny.turbo}
    for key in checkpoint.source_keys:
        source = SOURCES.get(key)
        value = overrides.get(key)
        if value is None and not checkpoint.tiny:
            value = os.environ.get(source.env) or None
        if value is None:
            value = defaults[key] if checkpoint.tiny else source.hub_id
        values[key] = str(value)
    return values


# -- building ----------------------------------------------------------------------------
def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """The device (CUDA when available) and dtype (float16 on CUDA, float32 elsewhere) a run uses."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if dtype is None else parse_dtype(dtype)
    return device, dtype


def _hub_kwargs(located: Located, dtype: torch.dtype, local_files_only: bool | None) -> dict:
    if not located.hub:
        return {}
    kwargs: dict[str, Any] = {"local_files_only": bool(local_files_only)}
    if dtype == torch.float16:
        kwargs["variant"] = "fp16"  # SDXL base and turbo publish fp16 files: half the download
    return kwargs


def _load_base(base: Located, dtype, local_files_only, **components):
    from fastface.pipeline import FastFacePipeline

    return FastFacePipeline.from_pretrained(
        base.load_from, **diffusers_dtype_kwargs(dtype), **_hub_kwargs(base, dtype, local_files_only), **components
    )


def _unet_from_file(base: Located, weights: Located, dtype, local_files_only):
    """SDXL-Lightning's way: the base UNet config with the distilled state dict."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    config = UNet2DConditionModel.load_config(
        base.load_from, subfolder="unet", **{k: v for k, v in _hub_kwargs(base, dtype, local_files_only).items()
                                              if k != "variant"}
    )
    with init_empty_weights():  # no 10 GB of throwaway random init for the real UNet
        unet = UNet2DConditionModel.from_config(config)
    state = load_file(str(weights.path))
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{weights.path} does not fit the UNet of {base.value}: {str(exc)[:400]}") from None
    from fastface.pipeline import known_harmless_logs_silenced

    with known_harmless_logs_silenced():
        return unet.to(dtype)


FUSED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def fused_cache_folder(checkpoint: Checkpoint, steps: int, dtype: torch.dtype, sources: dict[str, Located],
                       cache_root: Path) -> Path:
    key = json.dumps({
        # str(dtype) ("torch.float16"), as before dtype names had one home: another spelling here would change
        # every digest and re-fuse every checkpoint already in a user's cache.
        "version": FUSED_CACHE_VERSION, "checkpoint": checkpoint.name, "steps": steps, "dtype": str(dtype),
        "fuse_scale": checkpoint.fuse_scale,
        "sources": {k: sources[k].identity() for k in ("sdxl_base", checkpoint.weights)},
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return fused_dir(cache_root) / f"{checkpoint.name}-{steps}step-{dtype_name(dtype)}-{digest}"


def _fused_pipeline(checkpoint: Checkpoint, steps: int, dtype, sources: dict[str, Located], cache_root: Path,
                    local_files_only):
    """Load the fused components from the cache, or fuse the LoRA once and save what it changed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base, lora = sources["sdxl_base"], sources[checkpoint.weights]
    folder = fused_cache_folder(checkpoint, steps, dtype, sources, cache_root)
    classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    if (folder / "COMPLETE").is_file():
        dtype_kwargs = {"unet": diffusers_dtype_kwargs(dtype)}
        parts = {name: classes[name].from_pretrained(folder / name,
                                                     **dtype_kwargs.get(name, transformers_dtype_kwargs(dtype)))
                 for name in FUSED_COMPONENTS if (folder / name).is_dir()}
        return _load_base(base, dtype, local_files_only, **parts), folder

    pipe = _load_base(base, dtype, local_files_only)
    from fastface.pipeline import known_harmless_logs_silenced

    with known_harmless_logs_silenced():  # UNet-only LoRAs: "no LoRA keys" for the text encoders
        pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name="distilled")
    touched = [name for name in FUSED_COMPONENTS
               if "distilled" in (getattr(getattr(pipe, name, None), "peft_config", None) or {})]
    pipe.fuse_lora(components=touched, lora_scale=checkpoint.fuse_scale, adapter_names=["distilled"])
    pipe.unload_lora_weights()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        for name in touched:
            getattr(pipe, name).save_pretrained(tmp / name, safe_serialization=True)
        (tmp / "fastface-fused.json").write_text(json.dumps({
            "checkpoint": checkpoint.name, "steps": steps, "dtype": dtype_name(dtype), "components": touched,
            "sources": {k: sources[k].identity() for k in ("sdxl_base", checkpoint.weights)},
        }, indent=2))
        (tmp / "COMPLETE").write_text(FUSED_CACHE_VERSION)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "COMPLETE").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return pipe, folder


def find_weights(
    model: str | Checkpoint,
    *,
    steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    **source_overrides: str | os.PathLike | None,
) -> dict[str, Located]:
    """Locate every weight source of a checkpoint without loading any (one error lists all that are missing).

    Hub files are downloaded into the Hugging Face cache when the hub is reachable.
    """
    checkpoint = get_checkpoint(model) if isinstance(model, str) else model
    steps = checkpoint.resolve_steps(steps)
    values = resolve_sources(checkpoint, dict(source_overrides), cache_root(cache_dir))
    located: dict[str, Located] = {}
    problems: list[str] = []
    for key, value in values.items():
        try:
            located[key] = locate(SOURCES.get(key), value, steps, checkpoint, local_files_only)
        except ModelNotFoundError as exc:
            problems.append(str(exc))
    if problems:
        raise ModelNotFoundError("\n".join(problems))
    return located


def load_pipeline(
    model: str,
    *,
    steps: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    local_files_only: bool | None = None,
    **source_overrides: str | os.PathLike | None,
):
    """A ready :class:`~fastface.pipeline.FastFacePipeline` for a registered checkpoint.

    Distilled weights, the FaceID-Plus-v2 adapter (its LoRA as ``faceid_0`` at ``lora_scale``)
    and the CLIP-H encoder are loaded; ``pipe.default_guidance`` is the checkpoint's.
    Raises :class:`ModelNotFoundError` (naming the weights and how to point at a local
    copy) before loading anything when a source is missing.
    """
    from fastface.pipeline import load_faceid_adapter

    checkpoint = get_checkpoint(model)
    steps = checkpoint.resolve_steps(steps)
    device, dtype = resolve_device_dtype(device, dtype)
    cache_folder = cache_root(cache_dir)
    located = find_weights(checkpoint, steps=steps, cache_dir=cache_folder, local_files_only=local_files_only,
                           **source_overrides)

    base = located["sdxl_base"]
    fused_folder = None
    try:
        if checkpoint.build == "fused-lora":
            pipe, fused_folder = _fused_pipeline(checkpoint, steps, dtype, located, cache_folder, local_files_only)
        elif checkpoint.build == "unet-file":
            pipe = _load_base(base, dtype, local_files_only,
                              unet=_unet_from_file(base, located[checkpoint.weights], dtype, local_files_only))
        elif checkpoint.build == "unet-folder":
            from diffusers import UNet2DConditionModel

            weights = located[checkpoint.weights]
            unet = UNet2DConditionModel.from_pretrained(
                weights.load_from, subfolder="unet", **diffusers_dtype_kwargs(dtype),
                **_hub_kwargs(weights, dtype, local_files_only),
            )
            pipe = _load_base(base, dtype, local_files_only, unet=unet)
        else:
            pipe = _load_base(base, dtype, local_files_only)

        spec = checkpoint.scheduler
        if spec.from_weights:
            import diffusers

            weights = located[checkpoint.weights]
            kwargs = {"local_files_only": bool(local_files_only)} if weights.hub else {}
            pipe.scheduler = getattr(diffusers, spec.class_name).from_pretrained(
                weights.load_from, subfolder="scheduler", **kwargs
            )
        elif spec.class_name is not None:
            pipe.scheduler = spec.build(pipe.scheduler.config)
        pipe.to(device)
        adapter, clip = located["faceid_adapter"], located["clip_h"]
        load_faceid_adapter(
            pipe, adapter.load_from, image_encoder=clip.load_from, lora_scale=lora_scale,
            **({"local_files_only": bool(local_files_only)} if clip.hub else {}),
        )
    except OSError as exc:  # a partial hub cache: the probe file was there, another file is not
        names = ", ".join(f"{k}={v.value}" for k, v in located.items())
        raise ModelNotFoundError(
            f"model {checkpoint.name!r}: could not load its weights ({names}): {str(exc).splitlines()[0]}. "
            f"Point at complete local copies with the FASTFACE_* variables or --source KEY=PATH"
        ) from exc

    pipe.set_default_guidance(checkpoint.default_guidance)
    pipe.checkpoint = checkpoint
    pipe.load_info = {
        "model": checkpoint.name, "steps": steps, "dtype": dtype_name(dtype), "device": str(device),
        "sources": {k: v.value for k, v in located.items()},
        "fused_cache": None if fused_folder is None else str(fused_folder),
    }
    return pipe


__all__ = [
    "CHECKPOINTS", "SOURCES", "Checkpoint", "Located", "ModelNotFoundError", "SchedulerSpec", "Source",
    "check_steps", "find_weights", "fused_cache_folder", "get_checkpoint", "load_pipeline", "locate",
    "resolve_device_dtype", "resolve_sources",
]

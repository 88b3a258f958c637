"""Tiny stand-ins for the distilled SDXL checkpoints, in the real checkpoints' on-disk layouts.

- Hyper-SD: a folder of diffusers/peft LoRA files ``Hyper-SDXL-{n}step{s}-lora.safetensors``
  (one per step count), written by diffusers' own ``save_lora_weights``.
- LCM-LoRA: a folder with ``pytorch_lora_weights.safetensors`` (same format).
- SDXL-Lightning: a folder of full UNet state dicts ``sdxl_lightning_{n}step_unet.safetensors``.
- SDXL-Turbo: a pipeline-style folder with ``unet/`` and ``scheduler/`` (Euler ancestral, trailing).

Each is the tiny base UNet (:mod:`fastface.tiny`) with small seeded changes, so the
checkpoints differ from the base and from each other while the images stay in range.
They are loaded through exactly the code path of the real ones (:mod:`fastface.checkpoints`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fastface.tiny import TINY_VERSION, TinyModels, default_tiny_root, ensure_tiny_models

TINY_CHECKPOINTS_VERSION = "1"  # bump when a builder changes
HYPER_LORA_FILE = "Hyper-SDXL-{n}step{s}-lora.safetensors"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"
LIGHTNING_UNET_FILE = "sdxl_lightning_{n}step_unet.safetensors"
HYPER_STEPS = (1, 2, 4, 8)
LIGHTNING_STEPS = (2, 4, 8)
TINY_TURBO_SAMPLE_SIZE = 16  # latent size: 32 px with the tiny VAE (half of the others' 64, as turbo is 512 vs 1024)


def step_file(template: str, steps: int) -> str:
    """The real file name for a step count (``Hyper-SDXL-1step-lora`` but ``Hyper-SDXL-4steps-lora``)."""
    return template.format(n=steps, s="s" if steps > 1 else "")


@dataclass(frozen=True)
class TinyCheckpoints:
    """Folders of tiny distilled weights, laid out as the real hub repositories."""

    hyper_lora: Path
    lcm_lora: Path
    lightning_unet: Path
    turbo: Path


def _tiny_unet(models: TinyModels):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(models.sdxl, subfolder="unet")


def _perturb_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """A seeded relative change of every weight, standing in for a distillation fine-tune."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(1.0 + std * torch.randn(param.shape, generator=g))


def write_tiny_lora(models: TinyModels, path: Path, *, seed: int, rank: int = 4) -> Path:
    """A UNet LoRA for the tiny base in diffusers' LoRA format (what ``load_lora_weights`` reads)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = _tiny_unet(models)
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    layers = get_peft_model_state_dict(unet)
    # peft's random init gives deltas as large as the weights; a distillation LoRA is a small change.
    layers = {k: (v * 0.1 if "lora_B" in k else v).contiguous() for k, v in layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name)
    return path


def write_tiny_unet_file(models: TinyModels, path: Path, *, seed: int) -> Path:
    """A full UNet state dict as one safetensors file (SDXL-Lightning's layout)."""
    from safetensors.torch import save_file

    unet = _tiny_unet(models)
    _perturb_(unet, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    return path


def write_tiny_turbo(models: TinyModels, folder: Path, *, seed: int) -> Path:
    """``unet/`` (sample size halved, as turbo's 512² against SDXL's 1024²) and ``scheduler/``."""
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    base = _tiny_unet(models)
    config = dict(base.config)
    config["sample_size"] = TINY_TURBO_SAMPLE_SIZE
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(base.state_dict())
    _perturb_(unet, seed)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    # sdxl-turbo ships an Euler ancestral scheduler with trailing spacing over SDXL's betas.
    base_sched = DDIMScheduler.from_pretrained(models.sdxl, subfolder="scheduler")
    EulerAncestralDiscreteScheduler.from_config(base_sched.config, timestep_spacing="trailing").save_pretrained(
        folder / "scheduler"
    )
    return folder


def ensure_tiny_checkpoints(
    root: str | os.PathLike | None = None, *, seed: int = 0
) -> tuple[TinyModels, TinyCheckpoints]:
    """Build the tiny base models and tiny distilled weights once under ``root`` (atomic rename)."""
    root = Path(root) if root is not None else default_tiny_root()
    models = ensure_tiny_models(root, seed=seed)
    target = root / f"distilled-v{TINY_VERSION}.{TINY_CHECKPOINTS_VERSION}-seed{seed}"
    tiny = TinyCheckpoints(target / "hyper", target / "lcm", target / "lightning", target / "turbo")
    if (target / "COMPLETE").exists():
        return models, tiny
    tmp = Path(tempfile.mkdtemp(prefix=".building-distilled-", dir=root))
    try:
        for i, n in enumerate(HYPER_STEPS):
            write_tiny_lora(models, tmp / "hyper" / step_file(HYPER_LORA_FILE, n), seed=seed + 100 + i)
        write_tiny_lora(models, tmp / "lcm" / LCM_LORA_FILE, seed=seed + 200)
        for i, n in enumerate(LIGHTNING_STEPS):
            write_tiny_unet_file(models, tmp / "lightning" / step_file(LIGHTNING_UNET_FILE, n), seed=seed + 300 + i)
        write_tiny_turbo(models, tmp / "turbo", seed=seed + 400)
        (tmp / "COMPLETE").write_text(TINY_CHECKPOINTS_VERSION)
        os.replace(tmp, target)
    except OSError:
        if not (target / "COMPLETE").exists():  # a real failure, not another process finishing first
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return models, tiny

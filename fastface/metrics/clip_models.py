"""CLIP ViT-L/14 for the CLIP, AE and FSC metrics: one loader, the model's own preprocessing, batched encoders.

The FastFace authors use OpenAI's ``clip`` package. We use open_clip, where the
OpenAI weights need the QuickGELU architecture (``ViT-L-14-quickgelu``): loading
them into plain ``ViT-L-14`` runs silently with the wrong activation. The loader
picks the QuickGELU config whenever the pretrained tag was trained with it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

DEFAULT_CLIP_MODEL = "ViT-L-14-quickgelu"
DEFAULT_CLIP_PRETRAINED = "openai"
# A local folder (open_clip_config.json + weights) or weights file for the default CLIP-L/14.
CLIP_PATH_ENV = "FASTFACE_CLIP_PATH"
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def resolve_clip_architecture(model_name: str, pretrained: str | None) -> tuple[str, bool]:
    """(architecture to build, whether it uses QuickGELU) for a built-in open_clip name and pretrained tag.

    A tag trained with QuickGELU (OpenAI's weights, some LAION ones) switches a plain
    name to its ``-quickgelu`` config, so that ``("ViT-L-14", "openai")`` builds the
    network OpenAI trained.
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(
            f"unknown open_clip architecture {model_name!r}; use one of open_clip.list_models(), "
            "'hf-hub:<repo>' or a local folder with open_clip_config.json"
        )
    model_quick = bool(model_cfg.get("quick_gelu", False))
    tag_quick = bool(pretrained and get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
    if tag_quick and not model_quick:
        quick_name = f"{model_name}-quickgelu"
        if open_clip.get_model_config(quick_name) is None:
            raise ValueError(f"{model_name!r} with {pretrained!r} weights needs QuickGELU, but {quick_name!r} is unknown")
        return quick_name, True
    return model_name, model_quick


@dataclass
class ClipModel:
    """An open_clip model with its tokenizer and preprocessing, encoding batches on one device."""

    model: torch.nn.Module
    tokenizer: Any
    preprocess_cfg: dict
    device: torch.device
    source: str
    quick_gelu: bool
    _geometry: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.model.eval().requires_grad_(False)
        # The model's own eval transform; we apply its geometric (PIL) part image by
        # image and do to-tensor + normalisation batched on the device. Keeping the
        # resize on PIL makes our pixels identical to open_clip's, not merely close.
        cfg = PreprocessCfg(**{k: v for k, v in self.preprocess_cfg.items() if k in PreprocessCfg.__dataclass_fields__})
        self.transform = image_transform_v2(cfg, is_train=False)
        steps = list(self.transform.transforms)
        cut = next(i for i, t in enumerate(steps) if type(t).__name__ in ("MaybeConvertMode", "MaybeToTensor", "ToTensor"))
        self._geometry = steps[:cut]
        dtype = next(self.model.parameters()).dtype
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.dtype = dtype
        self.image_size = tuple(int(s) for s in np.broadcast_to(np.asarray(cfg.size), (2,)))

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    def resized_uint8(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """The model's resize + crop of one RGB image, still uint8 HxWx3."""
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
        if pil.mode != "RGB":
            pil = pil.convert("RGB")
        for step in self._geometry:
            pil = step(pil)
        return np.asarray(pil, dtype=np.uint8)

    def pixel_values(self, images: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        """[N, 3, H, W] normalised model input for RGB uint8 images (equal to open_clip's transform)."""
        batch = np.stack([self.resized_uint8(image) for image in images])
        pixels = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).to(torch.float32).div(255)
        return (pixels - self._mean) / self._std

    def normalise_tensor(self, pixels01: torch.Tensor) -> torch.Tensor:
        """Model normalisation of a [N, 3, H, W] float tensor already at the model's size, range [0, 1]."""
        return (pixels01.to(self.device, torch.float32) - self._mean) / self._std

    @torch.inference_mode()
    def encode_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings [N, D]."""
        features = self.model.encode_image(pixel_values.to(self.device, self.dtype)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def encode_images(self, images: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        return self.encode_pixel_values(self.pixel_values(images))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings [N, D] (prompts longer than the context are truncated)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        features = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(features, dim=-1)


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_clip_model(
    model_name: str | os.PathLike = DEFAULT_CLIP_MODEL,
    pretrained: str | os.PathLike | None = DEFAULT_CLIP_PRETRAINED,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> ClipModel:
    """Load an open_clip model for scoring.

    ``model_name`` is a built-in architecture (``ViT-L-14-quickgelu``), ``hf-hub:<repo>``,
    or a local folder holding ``open_clip_config.json`` and weights. ``pretrained`` is a
    tag (``openai``) or a local state-dict file (.bin/.pt/.pth/.safetensors) for a
    built-in architecture. With the defaults, ``$FASTFACE_CLIP_PATH`` (folder or
    weights file) replaces the download. ``quick_gelu=None`` follows the weights
    (the tag's metadata or the folder's config); True forces QuickGELU.
    """
    import open_clip

    device = _default_device(device)
    model_name = os.fspath(model_name)
    pretrained = os.fspath(pretrained) if pretrained is not None else None
    env_path = os.environ.get(CLIP_PATH_ENV)
    if env_path and model_name == DEFAULT_CLIP_MODEL and pretrained == DEFAULT_CLIP_PRETRAINED:
        if not Path(env_path).exists():
            raise FileNotFoundError(f"${CLIP_PATH_ENV}={env_path} does not exist; point it at a folder or weights file")
        if Path(env_path).is_dir():
            model_name, pretrained = env_path, None
        else:
            pretrained = env_path

    is_weights_file = bool(pretrained) and Path(pretrained).suffix in _WEIGHT_SUFFIXES
    if model_name.startswith(("hf-hub:", "local-dir:")) or Path(model_name).is_dir():
        if not model_name.startswith(("hf-hub:", "local-dir:")):
            model_name = f"local-dir:{model_name}"
        if model_name.startswith("local-dir:"):
            folder = Path(model_name[len("local-dir:"):])
            if not (folder / "open_clip_config.json").is_file():
                raise FileNotFoundError(
                    f"{folder} has no open_clip_config.json; a local CLIP folder needs it next to the weights"
                )
        source, arch, pretrained_arg = model_name, model_name, None
    else:
        if is_weights_file and not Path(pretrained).is_file():
            raise FileNotFoundError(f"CLIP weights file {pretrained} not found")
        arch, tag_quick = resolve_clip_architecture(model_name, None if is_weights_file else pretrained)
        if quick_gelu is False and tag_quick:
            raise ValueError(f"{pretrained!r} weights were trained with QuickGELU; quick_gelu=False would run them wrongly")
        source, pretrained_arg = f"{arch}:{pretrained}", pretrained
    try:
        model = open_clip.create_model(
            arch,
            pretrained=pretrained_arg,
            force_quick_gelu=bool(quick_gelu),
            require_pretrained=True,
            device=device,
            precision=precision,
            cache_dir=cache_dir,
        )
    except (RuntimeError, OSError, ValueError) as exc:
        raise RuntimeError(
            f"could not load CLIP weights for {source}: {exc}. Offline, download them once "
            "(OpenAI ViT-L/14: `huggingface-cli download timm/vit_large_patch14_clip_224.openai "
            f"open_clip_pytorch_model.bin`) and set ${CLIP_PATH_ENV} to that file "
            "(or to a folder with open_clip_config.json and the weights)"
        ) from exc
    from open_clip.model import get_model_preprocess_cfg

    return ClipModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(arch, cache_dir=cache_dir),
        preprocess_cfg=dict(get_model_preprocess_cfg(model)),
        device=device,
        source=source,
        quick_gelu=_has_quick_gelu(model),
    )


def _has_quick_gelu(model: torch.nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(module, QuickGELU) for module in model.modules())


def tiny_clip_config(*, quick_gelu: bool = True, image_size: int = 32, embed_dim: int = 32) -> dict:
    """An open_clip config of the same CLIP class as ViT-L/14, a few thousand times smaller (for tests)."""
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def save_tiny_clip(folder: str | os.PathLike, *, seed: int = 0, quick_gelu: bool = True, image_size: int = 32) -> Path:
    """Write a random tiny open_clip model (config + safetensors) to ``folder``; load it with load_clip_model(folder)."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(quick_gelu=quick_gelu, image_size=image_size)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config["model_cfg"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder

"""AE: the LAION aesthetic predictor (improved-aesthetic-predictor) on CLIP ViT-L/14 image embeddings.

The head is the published "linear MSE" MLP: five Linear layers with dropout
between the first four and no activations, on the L2-normalised CLIP-L/14 image
embedding. Its state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fastface.cache import aesthetic_dir
from fastface.metrics.base import MetricInput, MetricResult, MetricSpec, register_metric
from fastface.metrics.clip_models import ClipModel
from fastface.metrics.common import decode_images, resolve_shared_clip

# What the FastFace authors used; "sac+logos+ava1-l14-linearMSE.pth" is the later, more common one.
DEFAULT_AESTHETIC_CHECKPOINT = "ava+logos-l14-linearMSE.pth"
AESTHETIC_CHECKPOINTS = ("ava+logos-l14-linearMSE.pth", "sac+logos+ava1-l14-linearMSE.pth")
AESTHETIC_PATH_ENV = "FASTFACE_AESTHETIC_PATH"  # a .pth file, or a folder holding the named checkpoint
AESTHETIC_BASE_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
_HIDDEN = (1024, 128, 64, 16)
_DROPOUT = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """Linear(d,1024) Drop(.2) Linear(1024,128) Drop(.2) Linear(128,64) Drop(.1) Linear(64,16) Linear(16,1)."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.input_dim = int(input_dim)
        h1, h2, h3, h4 = _HIDDEN
        self.layers = nn.Sequential(
            nn.Linear(self.input_dim, h1),
            nn.Dropout(_DROPOUT[0]),
            nn.Linear(h1, h2),
            nn.Dropout(_DROPOUT[1]),
            nn.Linear(h2, h3),
            nn.Dropout(_DROPOUT[2]),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, normalised_embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(normalised_embeddings).squeeze(-1)


def _offline() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in ("HF_HUB_OFFLINE", "FASTFACE_OFFLINE"))


def resolve_aesthetic_checkpoint(checkpoint: str | os.PathLike = DEFAULT_AESTHETIC_CHECKPOINT,
                                 *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for an aesthetic head: an existing file; a published name looked up in
    ``$FASTFACE_AESTHETIC_PATH`` (file or folder) and the cache, else downloaded; an
    ``http(s)://`` URL (downloaded into the cache); or ``hf-hub:<repo>/<file>``."""
    checkpoint = os.fspath(checkpoint)
    if Path(checkpoint).is_file():
        return Path(checkpoint)
    name = checkpoint.rsplit("/", 1)[-1]
    env = os.environ.get(AESTHETIC_PATH_ENV)
    if env:
        env_path = Path(env)
        # A file stands for the default head, or for the head of the same name; a folder is searched by name.
        if env_path.is_file() and (env_path.name == name or checkpoint == DEFAULT_AESTHETIC_CHECKPOINT):
            return env_path
        if env_path.is_dir() and (env_path / name).is_file():
            return env_path / name
    cache = aesthetic_dir(cache_dir)
    if (cache / name).is_file():
        return cache / name
    if checkpoint.startswith("hf-hub:"):
        repo_id, _, filename = checkpoint[len("hf-hub:"):].rpartition("/")
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception as exc:  # offline, missing repo/file: say what to provide
            raise FileNotFoundError(_missing_message(checkpoint, name, str(exc))) from exc
    if checkpoint in AESTHETIC_CHECKPOINTS:
        url = AESTHETIC_BASE_URL + checkpoint
    elif checkpoint.startswith(("http://", "https://")):
        url = checkpoint
    else:
        raise FileNotFoundError(_missing_message(checkpoint, name, "no such file"))
    if _offline():
        raise FileNotFoundError(_missing_message(checkpoint, name, "offline (HF_HUB_OFFLINE/FASTFACE_OFFLINE set)"))
    cache.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(cache / name), progress=False)
    except Exception as exc:
        raise FileNotFoundError(_missing_message(checkpoint, name, f"download from {url} failed: {exc}")) from exc
    return cache / name


def _missing_message(checkpoint: str, name: str, why: str) -> str:
    return (
        f"aesthetic head {checkpoint!r} is not available ({why}). Download {name} from "
        f"{AESTHETIC_BASE_URL}{name if name in AESTHETIC_CHECKPOINTS else AESTHETIC_CHECKPOINTS[0]} and set "
        f"${AESTHETIC_PATH_ENV} to the file (or to the folder holding it), or pass its path"
    )


def load_aesthetic_head(checkpoint: str | os.PathLike = DEFAULT_AESTHETIC_CHECKPOINT, *,
                        device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None) -> AestheticHead:
    """Load a head from a state dict in the published layout (torch.load with weights_only=True)."""
    path = resolve_aesthetic_checkpoint(checkpoint, cache_dir=cache_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if "layers.0.weight" not in state:
        raise ValueError(f"{path} is not an aesthetic-head state dict: expected keys layers.0 … layers.7, got {sorted(state)[:5]}")
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state, strict=True)
    return head.to(device).eval().requires_grad_(False)


def save_tiny_aesthetic_head(path: str | os.PathLike, input_dim: int, *, seed: int = 0) -> Path:
    """A random head in the published layout for an embedding of ``input_dim`` (tests and benchmarks)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = AestheticHead(input_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


class AestheticScore:
    """AE, one value per image: the head on the L2-normalised CLIP image embedding."""

    def __init__(self, clip: ClipModel, head: AestheticHead, checkpoint: str) -> None:
        if head.input_dim != clip.embed_dim:
            raise ValueError(
                f"aesthetic head expects {head.input_dim}-d embeddings but the CLIP model gives {clip.embed_dim}-d; "
                "the published heads need CLIP ViT-L/14"
            )
        self.spec = AE_SPEC
        self.clip, self.head, self.checkpoint = clip, head.to(clip.device), checkpoint

    @torch.inference_mode()
    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]:
        results: list[MetricResult | None]
        images, results = decode_images(inputs)
        ok = [i for i, image in enumerate(images) if image is not None]
        if ok:
            embeddings = self.clip.encode_images([images[i] for i in ok])
            values = self.head(embeddings.to(next(self.head.parameters()).dtype)).float().cpu().tolist()
            for i, value in zip(ok, values):
                results[i] = MetricResult(value=float(value), detail={"checkpoint": self.checkpoint})
        return results  # type: ignore[return-value]


def make_aesthetic_score(
    *,
    clip: ClipModel | None = None,
    clip_model: str = "ViT-L-14-quickgelu",
    clip_pretrained: str | None = "openai",
    aesthetic_checkpoint: str | os.PathLike = DEFAULT_AESTHETIC_CHECKPOINT,
    device: str | torch.device | None = None,
) -> AestheticScore:
    clip = resolve_shared_clip(clip, clip_model, clip_pretrained, device)
    head = load_aesthetic_head(aesthetic_checkpoint, device=clip.device)
    return AestheticScore(clip, head, Path(os.fspath(aesthetic_checkpoint)).name)


AE_SPEC = register_metric(
    MetricSpec(
        name="ae",
        inputs=("image",),
        higher_is_better=True,
        aggregate="mean",
        factory=make_aesthetic_score,
        description="LAION aesthetic predictor (linear MLP) on the L2-normalised CLIP ViT-L/14 image embedding",
    )
)

__all__ = [
    "AestheticHead",
    "AestheticScore",
    "load_aesthetic_head",
    "resolve_aesthetic_checkpoint",
    "save_tiny_aesthetic_head",
]

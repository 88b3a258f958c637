"""FastFace's cache folder and every path inside it: tiny models, fused checkpoints, identities and
metric weights. Nothing else in the project builds a cache path."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FASTFACE_CACHE``, else ``~/.cache/fastface``."""
    return Path(cache_dir or os.environ.get("FASTFACE_CACHE") or "~/.cache/fastface").expanduser()


def identities_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Identity embeddings, aligned crops and CLIP states, by photo hash (``fastface.faces.prepare_identity``)."""
    return cache_root(cache_dir) / "identities"


def tiny_models_dir(version: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny random-weight models of one ``fastface.tiny.TINY_VERSION``."""
    return cache_root(cache_dir) / f"tiny-v{version}"


def fused_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """LoRA-distilled checkpoints fused once (``fastface.checkpoints``)."""
    return cache_root(cache_dir) / "fused"


def aesthetic_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The LAION aesthetic head's weights."""
    return cache_root(cache_dir) / "aesthetic"

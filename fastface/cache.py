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


def tiny_metrics_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny CLIP and aesthetic head that ``weights: tiny`` runs score with (built from seed 0 on first use)."""
    return cache_root(cache_dir) / "tiny-metrics"


def identity_entry(folder: str | os.PathLike, digest: str, name: str) -> Path:
    """One file of an identity cache ``folder`` (:func:`identities_dir`) for a photo's or an identity's
    content hash: ``<folder>/<hash[:2]>/<hash>.<name>`` (its face record, its CLIP states)."""
    return Path(folder).expanduser() / digest[:2] / f"{digest}.{name}"


def identity_entries(folder: str | os.PathLike, digest: str) -> list[Path]:
    """Every file an identity cache ``folder`` holds for one content hash (for inspection and cleanup)."""
    return sorted(identity_entry(folder, digest, "").parent.glob(f"{digest}.*"))


def identity_photo_file(folder: str | os.PathLike, digest: str, suffix: str) -> Path:
    """A stored identity photo copied into an identity cache ``folder`` (a generator actor reads it from there)."""
    return Path(folder).expanduser() / "photos" / digest[:2] / f"{digest}{suffix.lower()}"

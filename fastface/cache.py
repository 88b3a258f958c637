"""FastFace's cache folder, shared by tiny models, fused checkpoints, identities and metric weights."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FASTFACE_CACHE``, else ``~/.cache/fastface``."""
    return Path(cache_dir or os.environ.get("FASTFACE_CACHE") or "~/.cache/fastface").expanduser()

"""Shared fixtures for the metrics tests: tiny CLIP and aesthetic head on disk, the dlib backend, sample photos."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sample_photo(name: str) -> Path:
    """A photo shipped in the insightface wheel (Tom_Hanks_54745.png, t1.jpg)."""
    spec = importlib.util.find_spec("insightface")
    if spec is None:
        pytest.skip("insightface is not installed (its wheel ships the sample photos)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / name


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from fastface.metrics.clip_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_dir):
    from fastface.metrics.clip_models import load_clip_model

    return load_clip_model(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_head_path(tmp_path_factory, tiny_clip) -> Path:
    from fastface.metrics.aesthetic import save_tiny_aesthetic_head

    return save_tiny_aesthetic_head(tmp_path_factory.mktemp("aesthetic") / "tiny-linearMSE.pth", tiny_clip.embed_dim)


@pytest.fixture(scope="session")
def dlib_backend():
    from fastface.faces import get_face_backend

    try:
        return get_face_backend("dlib")
    except ImportError as exc:
        pytest.skip(f"dlib backend unavailable: {exc}")


@pytest.fixture(scope="session")
def hanks() -> np.ndarray:
    return load_rgb(sample_photo("Tom_Hanks_54745.png"))


@pytest.fixture(scope="session")
def group_photo() -> np.ndarray:
    return load_rgb(sample_photo("t1.jpg"))


@pytest.fixture(scope="session")
def hanks_on_canvas(hanks) -> np.ndarray:
    """Tom Hanks pasted on a 192x160 grey canvas: a face that is not the whole image."""
    canvas = np.full((192, 160, 3), 120, dtype=np.uint8)
    canvas[40:152, 24:136] = hanks
    return canvas


def noise_image(seed: int = 0, size: tuple[int, int] = (96, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)

"""One rule per kind of value, shared by the ``fastface`` flags and the evaluation config fields.

Each validator takes the user-facing name of the value (``--ip-adapter-scale`` or
``sweep.ip_adapter_scales``) and the value, and returns the value or raises a
``ValueError`` whose one-line message names the value, what was given and what is
allowed. Nothing here loads a model; the model constants come from the checkpoint
registry and the tiny builders' configs.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

SCALE_RANGE = (0.0, 1.5)
"""λ (IP-Adapter scale) and the FaceID LoRA weight: beyond 1.5 the identity branch swamps the prompt."""
MAX_SIZE = 4096
"""Largest height = width accepted; SDXL is trained at 1024."""
MAX_STEPS = 1000
IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Output suffixes ``generate`` writes, and the PIL format of each."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def finite_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite number, within ``[low, high]`` when given."""
    number = _number(name, value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        allowed = (f"{low:g} <= {name} <= {high:g}" if low is not None and high is not None
                   else f"{name} >= {low:g}" if low is not None else f"{name} <= {high:g}")
        raise ValueError(f"{name} is {value!r}, out of range; allowed: {allowed}")
    return number


def scale(name: str, value: Any) -> float:
    """An IP-Adapter scale λ or a LoRA weight: finite, within :data:`SCALE_RANGE`."""
    return finite_number(name, value, *SCALE_RANGE)


def scales(name: str, values: Sequence[Any]) -> tuple[float, ...]:
    """A non-empty list of distinct scales; ``name`` starts the message (``"values"`` under a config field)."""
    if not values:
        raise ValueError(f"{name}: give at least one value")
    bad = []
    for value in values:
        try:
            scale(name, value)
        except ValueError:
            bad.append(value)
    if bad:
        low, high = SCALE_RANGE
        raise ValueError(f"{name} {bad} are out of range; allowed: finite numbers {low:g} <= scale <= {high:g}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: duplicate values in {list(values)}")
    return tuple(float(v) for v in values)


def positive_int(name: str, value: Any, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} is {value}, out of range; allowed: 1 <= {name} <= {high}")
    return value


def step_count(name: str, value: Any) -> int:
    return positive_int(name, value, MAX_STEPS)


def size_multiple(checkpoint: Any) -> int:
    """Pixels per latent cell of the checkpoint's VAE: sizes must be multiples of it (SDXL: 8)."""
    if checkpoint.tiny:
        from fastface.tiny import VAE_CONFIG

        return 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
    return 8  # SDXL's VAE: block_out_channels (128, 256, 512, 512)


def image_size(name: str, value: Any, multiple: int, model: str | None = None) -> int:
    """Height = width in pixels: a positive multiple of ``multiple``, at most :data:`MAX_SIZE`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
        hint = f" (e.g. {round(value / multiple) * multiple})" if isinstance(value, int) and value > multiple else ""
        for_model = f" for model {model!r}" if model else ""
        raise ValueError(f"{name} must be a positive multiple of {multiple}{for_model}{hint}, got {value!r}")
    if value > MAX_SIZE:
        raise ValueError(f"{name} is {value}, out of range; allowed: {multiple} <= {name} <= {MAX_SIZE}")
    return value


def _probe_writable(folder: Path) -> bool:
    """True when a file can be created in ``folder`` (``os.access`` says yes to root even on read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".fastface-probe-"):
            return True
    except OSError:
        return False


def writable_folder(name: str, path: str | os.PathLike) -> Path:
    """A folder that exists and can be written to, or that can be created; nothing is created here."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise ValueError(f"{name}: {path} {what}, not a folder")
    if not _probe_writable(probe):
        where = "" if probe == path else f" (its nearest existing folder {probe} is not writable)"
        raise ValueError(f"{name}: cannot write to {path}{where}; choose a writable folder")
    return path


def output_image(name: str, path: str | os.PathLike) -> Path:
    """An output image file: a suffix ``generate`` can write (:data:`IMAGE_SUFFIXES`) in a writable folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a folder; give an image file name such as {path / 'image.png'}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        allowed = ", ".join(IMAGE_SUFFIXES)
        raise ValueError(f"{name}: {path} has suffix {path.suffix or '(none)'!r}; allowed: {allowed}")
    writable_folder(name, path.parent)
    return path


__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_SIZE",
    "SCALE_RANGE",
    "finite_number",
    "image_size",
    "output_image",
    "positive_int",
    "scale",
    "scales",
    "size_multiple",
    "step_count",
    "writable_folder",
]

"""Reading face photos into HxWx3 uint8 RGB arrays, and hashing their content."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]

# Modes PIL converts to 8-bit RGB without losing range. 16-bit and float modes
# ("I;16", "I", "F") would be clipped to 0-255 by convert("RGB"), i.e. silently wrong.
_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class ImageReadError(ValueError):
    """An input image that cannot be read: missing, corrupt, zero-size or of an unsupported mode."""


def _describe(image: object) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or "PIL image"
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    return f"{type(image).__name__} input"


def _pil_to_rgb(img: Image.Image, source: str) -> np.ndarray:
    if img.width == 0 or img.height == 0:
        raise ImageReadError(f"cannot read image {source}: it has zero size ({img.width}x{img.height})")
    if img.mode not in _CONVERTIBLE_MODES:
        raise ImageReadError(
            f"cannot read image {source}: unsupported mode {img.mode!r} (16-bit or float); "
            "save it as 8-bit RGB"
        )
    if img.mode != "RGB":
        # Alpha is dropped, not composited: cv2.imread (what insightface users,
        # including the FastFace authors, read photos with) drops it too.
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _array_to_rgb(array: np.ndarray, source: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ImageReadError(
            f"cannot read image {source}: dtype {array.dtype} is not uint8; pass 0-255 uint8 pixels"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    elif not (array.ndim == 3 and array.shape[2] == 3):
        raise ImageReadError(
            f"cannot read image {source}: shape {array.shape} is not HxW, HxWx1, HxWx3 or HxWx4"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageReadError(f"cannot read image {source}: it has zero size ({array.shape[1]}x{array.shape[0]})")
    return np.ascontiguousarray(array)


def load_image_rgb(image: ImageInput) -> np.ndarray:
    """A path, encoded file bytes, PIL image or uint8 array as an HxWx3 uint8 RGB array.

    Arrays are taken to be RGB already; files and bytes are decoded with their EXIF rotation applied.
    """
    source = _describe(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, source)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image, source)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            what = "it is a directory" if path.is_dir() else "file not found"
            raise ImageReadError(f"cannot read image {source}: {what}")
        if path.stat().st_size == 0:
            raise ImageReadError(f"cannot read image {source}: the file is empty (zero size)")
        return _decode_file(path, source)
    if isinstance(image, (bytes, bytearray)):  # an encoded file read from a store or URI
        if not image:
            raise ImageReadError(f"cannot read image {source}: no data (zero size)")
        return _decode_file(io.BytesIO(image), source)
    raise ImageReadError(
        f"cannot read image {source}: expected a path, encoded bytes, a PIL.Image or an HxWx3 uint8 array"
    )


def _decode_file(file: Path | io.BytesIO, source: str) -> np.ndarray:
    try:
        with Image.open(file) as img:
            img.load()  # decode now, so truncated files fail here and not later
            # Phone photos carry their rotation in EXIF; cv2.imread applies it too.
            img = ImageOps.exif_transpose(img)
            return _pil_to_rgb(img, source)
    except UnidentifiedImageError:
        raise ImageReadError(
            f"cannot read image {source}: not a readable image (corrupt, empty or unsupported format)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageReadError):
            raise
        raise ImageReadError(f"cannot read image {source}: corrupt or truncated image data ({exc})") from exc


def photo_hash(image: ImageInput) -> str:
    """sha256 hex of an encoded photo — a file's bytes, or the bytes given — or, for a decoded
    image (array, PIL), of its shape and RGB pixels. For files and bytes it equals
    ``storage.ids.bytes_sha256`` of the same bytes (what ``identities.content_hash`` holds)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(image)).hexdigest()
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ImageReadError(f"cannot read image {image}: file not found")
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    array = load_image_rgb(image)
    digest = hashlib.sha256(f"rgb-uint8:{array.shape[0]}x{array.shape[1]}:".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxWx3 RGB image: uint8 as it is, floats in [0, 1] rounded the way diffusers'
    ``numpy_to_pil`` rounds (so a stored PNG equals the pipeline's PIL output)."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"encode_png takes uint8 or float images, got {array.dtype}")
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

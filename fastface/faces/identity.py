"""Identity inputs for FaceID-Plus-v2: embedding, aligned BGR crop and CLIP-H states, cached by content hash."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np

from fastface.cache import identities_dir, identity_entry
from fastface.faces.base import FaceBackend, NoFaceError, aligned_face_crop_bgr
from fastface.faces.images import ImageInput, load_image_rgb, photo_hash

if TYPE_CHECKING:  # torch is imported where it is used: `import fastface.faces` stays light
    import torch

CROP_SIZE = 224  # norm_crop size the FaceID-Plus reference feeds to CLIP-H


@dataclass
class IdentityInputs:
    embedding: np.ndarray  # [D] float32, L2-normalised
    crop_bgr: np.ndarray  # [224, 224, 3] uint8, BGR (see aligned_face_crop_bgr)
    clip_states: torch.Tensor | None  # [1, seq, hidden] float32 on CPU, or None without an encoder
    content_hash: str  # of the photo; for several photos, of the set of their content hashes
    bbox: np.ndarray  # [4] float32
    photos: tuple[str, ...] = ()  # content hashes of the photos combined (several photos of one person)


def _processor_size(feature_extractor: Any, image_encoder: Any) -> tuple[int, int]:
    crop = getattr(feature_extractor, "crop_size", None) if getattr(
        feature_extractor, "do_center_crop", True
    ) else getattr(feature_extractor, "size", None)
    if isinstance(crop, dict) and "height" in crop and "width" in crop:
        return int(crop["height"]), int(crop["width"])
    if isinstance(crop, dict) and "shortest_edge" in crop:
        return int(crop["shortest_edge"]), int(crop["shortest_edge"])
    if isinstance(crop, int):
        return crop, crop
    size = int(image_encoder.config.image_size)
    return size, size


def _encoder_place(image_encoder: Any) -> tuple[torch.device, torch.dtype]:
    parameter = next(image_encoder.parameters())
    return parameter.device, parameter.dtype


def _penultimate_states(image_encoder: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    import torch

    device, dtype = _encoder_place(image_encoder)
    with torch.no_grad():
        output = image_encoder(pixel_values.to(device=device, dtype=dtype), output_hidden_states=True)
    return output.hidden_states[-2]


def encode_clip_states(crops_bgr: list[np.ndarray], image_encoder: Any, feature_extractor: Any) -> torch.Tensor:
    """Penultimate CLIP-H hidden states ``[N, seq, hidden]`` of aligned crops, as FaceID-Plus-v2 consumes them.

    The crops stay BGR, as in the adapter's reference usage (method-spec §1).
    """
    if not crops_bgr:
        raise ValueError("encode_clip_states needs at least one crop")
    for crop in crops_bgr:
        if not (isinstance(crop, np.ndarray) and crop.dtype == np.uint8 and crop.ndim == 3 and crop.shape[2] == 3):
            raise ValueError("crops must be HxWx3 uint8 arrays (the BGR output of aligned_face_crop_bgr)")
    pixel_values = feature_extractor(images=list(crops_bgr), return_tensors="pt").pixel_values
    return _penultimate_states(image_encoder, pixel_values)


def null_clip_states(image_encoder: Any, feature_extractor: Any) -> torch.Tensor:
    """Null identity for the CLIP-H branch: states ``[1, seq, hidden]`` of all-zero ``pixel_values``.

    Zeros after CLIP normalisation are a mid-grey image, not a black one; this is what diffusers' ``encode_image`` returns as the negative (method-spec §1).
    """
    import torch

    height, width = _processor_size(feature_extractor, image_encoder)
    channels = int(getattr(image_encoder.config, "num_channels", 3))
    return _penultimate_states(image_encoder, torch.zeros(1, channels, height, width))


def encoder_fingerprint(image_encoder: Any, feature_extractor: Any) -> str:
    """Short hash of the encoder's config, processor config and a sample of its weights (cache key part)."""
    digest = hashlib.sha256()
    config = image_encoder.config
    digest.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
    processor = feature_extractor.to_json_string() if hasattr(feature_extractor, "to_json_string") else repr(
        feature_extractor
    )
    digest.update(processor.encode())
    # Two encoders with one config (e.g. random tiny ones from different seeds) differ in weights.
    parameters = list(image_encoder.parameters())
    for parameter in (parameters[0], parameters[-1]):
        digest.update(parameter.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class FaceRecord(NamedTuple):
    """The most prominent face of a photo (or of several photos of one person, combined): what is cached."""

    embedding: np.ndarray  # the face backend's identity embedding
    crop_bgr: np.ndarray  # the ArcFace-aligned crop, BGR (the CLIP-H input)
    bbox: np.ndarray  # x1, y1, x2, y2 in the photo's pixels


def _save_face_record(path: Path, record: FaceRecord) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "wb") as stream:
            np.savez(stream, **record._asdict())

    _atomic_write(path, write)


def _load_face_record(path: Path) -> FaceRecord | None:
    try:
        with np.load(path, allow_pickle=False) as record:
            return FaceRecord(*(record[name] for name in FaceRecord._fields))
    except Exception:  # absent, truncated (BadZipFile) or foreign: recompute and overwrite
        return None


def _load_clip_states(path: Path) -> torch.Tensor | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))["clip_states"]
    except Exception:  # safetensors raises its own error type on a corrupt file: recompute and overwrite
        return None


def identity_set_hash(photo_hashes: Sequence[str]) -> str:
    """Cache key of an identity given by several photos: sha256 of the sorted set of their content hashes.

    The order the photos come in does not matter; another set of photos is another identity.
    """
    members = sorted(set(photo_hashes))
    return hashlib.sha256(("identity-set:" + ",".join(members)).encode()).hexdigest()


def _face_record(photo: ImageInput, backend: FaceBackend, cache_root: Path) -> tuple[str, FaceRecord]:
    digest = photo_hash(photo)
    face_path = identity_entry(cache_root, digest, f"{backend.name}.face.npz")
    record = _load_face_record(face_path)
    if record is None:
        rgb = load_image_rgb(photo)
        faces = backend.detect(rgb)
        if not faces:
            source = str(photo) if isinstance(photo, (str, os.PathLike)) else f"the given {type(photo).__name__}"
            raise NoFaceError(source)
        face = faces[0]
        crop = aligned_face_crop_bgr(rgb, face, size=CROP_SIZE)
        record = FaceRecord(np.asarray(face.embedding, dtype=np.float32), crop, np.asarray(face.bbox, dtype=np.float32))
        _save_face_record(face_path, record)
    return digest, record


def _box_area(bbox: np.ndarray) -> float:
    x1, y1, x2, y2 = (float(v) for v in bbox)
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def combine_embeddings(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Identity embedding of several photos of one person: the mean of their L2-normalised embeddings.

    Not renormalised, as ComfyUI_IPAdapter_plus' ``combine_embeds="average"`` (see :func:`combine_face_records`).
    """
    rows = np.stack([np.asarray(e, dtype=np.float32).ravel() for e in embeddings])
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(axis=0).astype(np.float32)


def combine_face_records(records: dict[str, FaceRecord]) -> FaceRecord:
    """Several photos of one person (``content hash → FaceRecord``) → one :class:`FaceRecord`.

    Embedding: the mean of the photos' L2-normalised embeddings, not renormalised — the "average"
    way ComfyUI_IPAdapter_plus combines FaceID embeddings of several images (``combine_embeds=
    "average"``: ``torch.mean`` over the insightface ``normed_embedding`` rows); diffusers' FaceID
    examples take one photo. Crop (the CLIP-H input): the aligned crop of the photo whose face box
    is largest in pixels (the most detail for CLIP), ties broken by content hash so the order of the
    photos never matters.
    """
    digests = sorted(records)
    best = max(digests, key=lambda d: (_box_area(records[d].bbox), [-ord(c) for c in d]))
    return FaceRecord(combine_embeddings([records[d].embedding for d in digests]), records[best].crop_bgr,
                      records[best].bbox)


def prepare_identity(
    photo: ImageInput | Sequence[ImageInput],
    backend: FaceBackend,
    *,
    image_encoder: Any = None,
    feature_extractor: Any = None,
    cache_dir: str | os.PathLike | None = None,
) -> IdentityInputs:
    """Embedding, aligned BGR crop and (with an encoder) CLIP-H states of the photo's most prominent face.

    ``photo`` may be a list of photos of one person: see :func:`combine_face_records` for how they
    combine. Results are cached under ``cache_dir`` by the photo's content hash (several photos: by
    :func:`identity_set_hash` of all of them) and the backend name (and the encoder fingerprint for
    CLIP states), so a sweep embeds each identity once. Raises :class:`NoFaceError` when a photo
    has no face.
    """
    from safetensors.torch import save_file

    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else identities_dir()
    photos = list(photo) if isinstance(photo, (list, tuple)) else [photo]
    if not photos:
        raise ValueError("prepare_identity needs at least one photo")
    records = dict(_face_record(p, backend, cache_root) for p in photos)
    if len(records) == 1:
        digest, record = next(iter(records.items()))
        members: tuple[str, ...] = (digest,)
    else:
        digest = identity_set_hash(list(records))
        members = tuple(sorted(records))
        face_path = identity_entry(cache_root, digest, f"{backend.name}.face.npz")
        record = _load_face_record(face_path)
        if record is None:
            record = combine_face_records(records)
            _save_face_record(face_path, record)
    embedding, crop, bbox = record

    clip_states = None
    if image_encoder is not None:
        if feature_extractor is None:
            from transformers import CLIPImageProcessor

            feature_extractor = CLIPImageProcessor()  # what the IP-Adapter reference code builds
        fingerprint = encoder_fingerprint(image_encoder, feature_extractor)
        clip_path = identity_entry(cache_root, digest, f"{backend.name}.clip-{fingerprint}.safetensors")
        clip_states = _load_clip_states(clip_path)
        if clip_states is None:
            clip_states = encode_clip_states([crop], image_encoder, feature_extractor).float().cpu().contiguous()
            metadata = {"content_hash": digest, "backend": backend.name}
            _atomic_write(
                clip_path, lambda temporary: save_file({"clip_states": clip_states}, temporary, metadata=metadata)
            )
    return IdentityInputs(embedding=embedding, crop_bgr=crop, clip_states=clip_states, content_hash=digest, bbox=bbox,
                          photos=members)


__all__ = [
    "FaceRecord",
    "IdentityInputs",
    "combine_embeddings",
    "combine_face_records",
    "identity_set_hash",
    "prepare_identity",
    "encode_clip_states",
    "null_clip_states",
    "encoder_fingerprint",
]

"""What several metrics share: decoding inputs into per-image errors, one CLIP model, one cached face analysis."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from fastface.metrics.base import MetricInput, MetricResult


def decode_images(inputs: Sequence[MetricInput]) -> tuple[list[np.ndarray | None], list[MetricResult | None]]:
    """RGB uint8 arrays for the readable inputs; an error result (and None) for the others."""
    from fastface.faces import ImageReadError, load_image_rgb

    images: list[np.ndarray | None] = []
    results: list[MetricResult | None] = []
    for item in inputs:
        try:
            images.append(load_image_rgb(item.image))
            results.append(None)
        except ImageReadError as exc:
            images.append(None)
            results.append(MetricResult(value=None, error=str(exc)))
    return images, results


def resolve_shared_clip(clip: Any, clip_model: str, clip_pretrained: str | None, device: Any):
    """The CLIP model handed in by the runner (shared by CLIP, AE, FSC), or a freshly loaded one."""
    if clip is not None:
        return clip
    from fastface.metrics.clip_models import load_clip_model

    return load_clip_model(clip_model, clip_pretrained, device=device)


def style_part(prompt: str | None) -> str | None:
    """The style of a stylistic prompt ``"<style>; person ..."`` (text before ``;``), None for a realistic one."""
    if prompt is None or ";" not in prompt:
        return None
    return prompt.split(";", 1)[0].strip()


def pixels_digest(image: np.ndarray) -> str:
    digest = hashlib.blake2b(f"{image.shape}:{image.dtype}".encode(), digest_size=20)
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class FaceAnalysis:
    """A face backend with a bounded cache of detections by pixel content.

    ID, FFC, face size and FSC all need the faces of the same generated image, and
    each identity photo is the source of a whole row of prompts; the cache makes
    every distinct image go through detection once per scoring run.
    """

    def __init__(self, backend: Any, *, cache_size: int = 512) -> None:
        self.backend = backend
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, list] = OrderedDict()

    def detect(self, image_rgb: np.ndarray) -> list:
        key = pixels_digest(image_rgb)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        faces = self.backend.detect(image_rgb)
        self._cache[key] = faces
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return faces

    def source_embedding(self, item: MetricInput) -> np.ndarray:
        """The identity embedding given with the input, or that of the most prominent face of its source image."""
        from fastface.faces import NoFaceError, load_image_rgb

        if item.source_embedding is not None:
            embedding = np.asarray(item.source_embedding, dtype=np.float32).ravel()
            if embedding.size != self.backend.embedding_dim:
                raise ValueError(
                    f"source_embedding is {embedding.size}-d but the {self.backend.name} backend makes "
                    f"{self.backend.embedding_dim}-d embeddings; embed the source with the same backend"
                )
            return embedding
        if item.source_image is None:
            raise ValueError("ID needs the source face: set MetricInput.source_embedding or source_image")
        faces = self.detect(load_image_rgb(item.source_image))
        if not faces:
            raise NoFaceError("the source image")
        return faces[0].embedding


def resolve_face_analysis(faces: FaceAnalysis | None, face_backend: str, face_backend_options: dict | None) -> FaceAnalysis:
    if faces is not None:
        return faces
    from fastface.faces import get_face_backend

    return FaceAnalysis(get_face_backend(face_backend, **(face_backend_options or {})))

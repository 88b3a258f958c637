"""Face metrics of the FastFace protocol (method-spec §6): ID, FFC and the face size ratio.

All three read the most prominent face of the generated image from one face
backend (insightface buffalo_l as in the paper, or dlib offline), with the
backend's multi-scale retry.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from fastface.face_backends import DEFAULT_FACE_BACKEND
from fastface.metrics.base import MetricInput, MetricResult, MetricSpec, register_metric
from fastface.metrics.common import FaceAnalysis, decode_images, resolve_face_analysis



class _FaceMetric:
    spec: MetricSpec

    def __init__(self, faces: FaceAnalysis) -> None:
        self.faces = faces

    def _faces_of(self, inputs: Sequence[MetricInput]):
        """(image, faces) per input, or an error result in its place."""
        images, results = decode_images(inputs)
        found: list[Any] = [None] * len(inputs)
        for i, image in enumerate(images):
            if image is None:
                continue
            try:
                found[i] = self.faces.detect(image)
            except Exception as exc:  # a backend failure on one image must not lose the batch
                results[i] = MetricResult(value=None, error=f"face detection failed: {type(exc).__name__}: {exc}")
        return images, found, results


class IdentitySimilarity(_FaceMetric):
    """ID: the backend's similarity between the source identity and the generated image's most prominent face."""

    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]:
        images, found, results = self._faces_of(inputs)
        backend = self.faces.backend
        for i, item in enumerate(inputs):
            if results[i] is not None:
                continue
            if not found[i]:
                results[i] = MetricResult(value=None, detail={"face_found": False, "backend": backend.name})
                continue
            try:
                source = self.faces.source_embedding(item)
            except (ValueError, OSError) as exc:  # NoFaceError, ImageReadError, wrong embedding size
                results[i] = MetricResult(value=None, error=f"source face: {exc}")
                continue
            face = found[i][0]
            results[i] = MetricResult(
                value=float(backend.similarity(source, face.embedding)),
                detail={
                    "face_found": True,
                    "backend": backend.name,
                    "measure": backend.similarity_measure,
                    "det_score": float(face.det_score),
                    "faces": len(found[i]),
                },
            )
        return results  # type: ignore[return-value]


class FaceFailCount(_FaceMetric):
    """FFC: 1 for a generated image without a detected face, 0 otherwise; summed over a set."""

    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]:
        _, found, results = self._faces_of(inputs)
        for i in range(len(inputs)):
            if results[i] is None:
                face_found = bool(found[i])
                results[i] = MetricResult(
                    value=0.0 if face_found else 1.0,
                    detail={"face_found": face_found, "backend": self.faces.backend.name},
                )
        return results  # type: ignore[return-value]


FaceSizeMode = Literal["clipped", "authors"]
FACE_SIZE_MODES = ("clipped", "authors")
# The authors' get_face_ratios loops over detection sizes 640, 576, ..., 320 without breaking
# out when a face is found, so the faces it keeps are those of the last size: 320.
AUTHORS_FACE_RATIO_DET_SIZE = 320


def face_size_ratio(bbox: np.ndarray, height: int, width: int, *, clip: bool = True) -> float:
    """Area of the face box over the image area (paper fig. 18); ``clip``: the box clipped to the image first.

    ``clip=False`` is the authors' ``get_face_ratios``: ``(x2 − x1)·(y2 − y1) / (H·W)`` of the raw
    detector box, which can exceed the image for faces cut by the border.
    """
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if clip:
        x1, x2 = np.clip([x1, x2], 0.0, float(width))
        y1, y2 = np.clip([y1, y2], 0.0, float(height))
        return max(0.0, x2 - x1) * max(0.0, y2 - y1) / float(height * width)
    return (x2 - x1) * (y2 - y1) / float(height * width)


def authors_face_ratio_backend(backend: Any) -> Any:
    """The detector the authors' face ratios come from: insightface at 320² only; other backends as they are.

    Shares the loaded ONNX sessions with ``backend`` (no second model in memory).
    """
    from fastface.faces import InsightFaceBackend

    if isinstance(backend, InsightFaceBackend):
        return InsightFaceBackend(detector=backend.detector, recognizer=backend.recognizer,
                                  det_sizes=(AUTHORS_FACE_RATIO_DET_SIZE,),
                                  same_person_threshold=backend.same_person_threshold)
    return backend


class FaceSizeRatio(_FaceMetric):
    """Face size: most prominent face box area / image area.

    Mode ``"clipped"`` (default): the box of the backend's multi-scale detection, clipped to the
    image; None without a face. Mode ``"authors"``: their ``get_face_ratios`` — insightface's
    faces at 320² only (the last size of their retry loop, which never breaks), the raw box,
    and 0.0 (not None) when that detection finds no face.
    """

    def __init__(self, faces: FaceAnalysis, mode: FaceSizeMode = "clipped") -> None:
        if mode not in FACE_SIZE_MODES:
            raise ValueError(f"face_size_mode must be one of {FACE_SIZE_MODES}, got {mode!r}")
        super().__init__(faces)
        self.mode = mode
        if mode == "authors":
            backend = authors_face_ratio_backend(faces.backend)
            self._detect = FaceAnalysis(backend, cache_size=64).detect if backend is not faces.backend else faces.detect
        else:
            self._detect = faces.detect

    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]:
        images, results = decode_images(inputs)
        authors = self.mode == "authors"
        for i in range(len(inputs)):
            if results[i] is not None:
                continue
            try:
                found = self._detect(images[i])
            except Exception as exc:  # a backend failure on one image must not lose the batch
                results[i] = MetricResult(value=None, error=f"face detection failed: {type(exc).__name__}: {exc}")
                continue
            if not found:
                results[i] = MetricResult(value=0.0 if authors else None, detail={"face_found": False, "mode": self.mode})
                continue
            height, width = images[i].shape[:2]
            bbox = np.asarray(found[0].bbox, dtype=np.float32)
            results[i] = MetricResult(
                value=face_size_ratio(bbox, height, width, clip=not authors),
                detail={"face_found": True, "mode": self.mode, "bbox": [round(float(v), 2) for v in bbox],
                        "size": [width, height]},
            )
        return results  # type: ignore[return-value]


def _factory(cls):
    def make(
        *,
        faces: FaceAnalysis | None = None,
        face_backend: str = DEFAULT_FACE_BACKEND,
        face_backend_options: dict | None = None,
    ):
        return cls(resolve_face_analysis(faces, face_backend, face_backend_options))

    make.__name__ = f"make_{cls.__name__}"
    make.__doc__ = f"Build {cls.__name__}; ``faces`` is a shared FaceAnalysis, else one is built from ``face_backend``."
    return make


make_identity_similarity = _factory(IdentitySimilarity)
make_face_fail_count = _factory(FaceFailCount)


def make_face_size_ratio(
    *,
    faces: FaceAnalysis | None = None,
    face_size_mode: FaceSizeMode = "clipped",
    face_backend: str = DEFAULT_FACE_BACKEND,
    face_backend_options: dict | None = None,
) -> FaceSizeRatio:
    """Build FaceSizeRatio; ``faces`` is a shared FaceAnalysis, else one is built from ``face_backend``."""
    if face_size_mode not in FACE_SIZE_MODES:  # before any model loads
        raise ValueError(f"face_size_mode must be one of {FACE_SIZE_MODES}, got {face_size_mode!r}")
    return FaceSizeRatio(resolve_face_analysis(faces, face_backend, face_backend_options), face_size_mode)

IdentitySimilarity.spec = register_metric(
    MetricSpec(
        name="id",
        inputs=("image", "source_embedding", "source_image"),
        higher_is_better=True,
        aggregate="mean",
        factory=make_identity_similarity,
        description="similarity of source and generated face embeddings; images without a face are None (see ffc)",
    )
)
FaceFailCount.spec = register_metric(
    MetricSpec(
        name="ffc",
        inputs=("image",),
        higher_is_better=False,
        aggregate="sum",
        factory=make_face_fail_count,
        description="face fail count: number of generated images with no detected face",
    )
)
FaceSizeRatio.spec = register_metric(
    MetricSpec(
        name="face_size",
        inputs=("image",),
        higher_is_better=True,  # not a quality: reported to study ID against face size (paper fig. 18)
        aggregate="mean",
        factory=make_face_size_ratio,
        description="area of the most prominent face box over the image area",
    )
)

"""Faces (:class:`Face`), the backend protocol, building a backend by name from
:data:`fastface.face_backends.FACE_BACKENDS`, and backend-independent helpers."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import cv2
import numpy as np

from fastface.faces.images import ImageInput, load_image_rgb
from fastface.face_backends import FACE_BACKENDS, OFFLINE_FACE_BACKEND


class NoFaceError(ValueError):
    """No face was detected in an image."""

    def __init__(self, source: object) -> None:
        super().__init__(f"no face found in {source}")
        self.source = source


@dataclass
class Face:
    """One detected face, in image pixels of the RGB array it was detected in."""

    bbox: np.ndarray  # [x1, y1, x2, y2] float32
    kps: np.ndarray | None  # [5, 2] float32: left eye, right eye, nose, left mouth corner, right mouth corner
    det_score: float
    embedding: np.ndarray  # L2-normalised identity embedding

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


@runtime_checkable
class FaceBackend(Protocol):
    name: str
    embedding_dim: int
    similarity_measure: str
    same_person_threshold: float

    def detect(self, image: ImageInput) -> list[Face]: ...

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float: ...

    def is_same_person(self, a: np.ndarray, b: np.ndarray) -> bool: ...


def l2_normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("cannot L2-normalise an all-zero or non-finite embedding")
    return vector / norm


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape[0]} vs {b.shape[0]}")
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


class CosineSimilarityMixin:
    """similarity / is_same_person for backends whose measure is cosine similarity."""

    name: str
    similarity_measure = "cosine"
    same_person_threshold: float
    embedding_dim: int

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        for vector in (a, b):
            size = np.asarray(vector).size
            if size != self.embedding_dim:
                raise ValueError(
                    f"{self.name} embeddings are {self.embedding_dim}-d, got {size}-d; "
                    "were they made by another face backend?"
                )
        return cosine_similarity(a, b)

    def is_same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.similarity(a, b) >= self.same_person_threshold




def get_face_backend(name: str = OFFLINE_FACE_BACKEND, **options: Any) -> FaceBackend:
    """Build a registered face backend (:data:`fastface.face_backends.FACE_BACKENDS`) with its options."""
    return FACE_BACKENDS.get(name)(**options)


class LazyFaceBackend:
    """A registered face backend whose models load on first use (:meth:`detect`, or any attribute the
    backend sets when built); its ``name`` and ``embedding_dim`` come from the registry without loading.

    A generator whose identities are all in the identity cache (:func:`fastface.faces.prepare_identity`
    reads them by photo hash and backend name) never detects a face, so its face models (insightface's
    buffalo_l, dlib's) are never loaded. Thread-safe: the backend is built once.
    """

    def __init__(self, name: str = OFFLINE_FACE_BACKEND, **options: Any) -> None:
        cls = FACE_BACKENDS.get(name)  # an unknown name fails now, naming the registered ones
        self.name = str(cls.name)
        self.embedding_dim = int(cls.embedding_dim)
        self._cls, self._options = cls, dict(options)
        self._backend: FaceBackend | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the backend's models have been loaded."""
        return self._backend is not None

    def backend(self) -> FaceBackend:
        """The backend itself, built on the first call."""
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = self._cls(**self._options)
        return self._backend

    def detect(self, image: ImageInput) -> list[Face]:
        return self.backend().detect(image)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return self.backend().similarity(a, b)

    def is_same_person(self, a: np.ndarray, b: np.ndarray) -> bool:
        return self.backend().is_same_person(a, b)

    def __getattr__(self, attribute: str) -> Any:  # same_person_threshold, similarity_measure, … of the built backend
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(self.backend(), attribute)


def backend_for_embedding_width(width: int, backend: str | None = None, *, model: str = "the model",
                                option: str = "face backend") -> str:
    """The face backend whose identity embeddings fit an adapter that takes ``width``-d ones.

    The one home of this rule (CLI, config checks and generator actors use it): ``backend``
    is checked when given, else the first registered backend of that width is chosen.
    """
    fitting = [name for name in FACE_BACKENDS if int(FACE_BACKENDS.get(name).embedding_dim) == int(width)]
    if backend is None:
        if not fitting:
            raise ValueError(f"{model} takes {width}-d identity embeddings and no face backend makes those "
                             f"(backends: {', '.join(FACE_BACKENDS.names())})")
        return fitting[0]
    made = int(FACE_BACKENDS.get(backend).embedding_dim)  # unknown names: the registry's error
    if made != int(width):
        raise ValueError(f"{option} {backend!r} gives {made}-d identity embeddings but {model} takes {width}-d; "
                         f"use {option} {' or '.join(fitting) or '<none fits>'}")
    return backend


def largest_face(faces: Sequence[Face], source: object = "image") -> Face:
    """The face with the largest box area."""
    if not faces:
        raise NoFaceError(source)
    return max(faces, key=lambda face: face.area)


def most_prominent_face(image: ImageInput, backend: FaceBackend, source: object = None) -> Face:
    """The first face the backend returns (insightface: highest detection score), as the FastFace authors use it."""
    faces = backend.detect(image)
    if not faces:
        raise NoFaceError(source if source is not None else _source_name(image))
    return faces[0]


def _source_name(image: object) -> str:
    if isinstance(image, (str,)) or hasattr(image, "__fspath__"):
        return str(image)
    return f"the given {type(image).__name__}"


def aligned_face_crop_bgr(image_rgb: ImageInput, face: Face, size: int = 224) -> np.ndarray:
    """ArcFace-aligned crop (insightface ``face_align.norm_crop``) of the BGR array insightface sees.

    FaceID-Plus-v2's reference usage passes this BGR crop straight to the CLIP-H
    image processor, so CLIP sees swapped channels. We keep that on purpose: the
    adapter was trained and the paper's numbers were made that way (method-spec §1).
    """
    from insightface.utils import face_align

    if face.kps is None:
        raise ValueError("this face has no 5-point landmarks (kps); an aligned crop needs them")
    kps = np.asarray(face.kps, dtype=np.float32)
    if kps.shape != (5, 2):
        raise ValueError(f"face.kps must have shape (5, 2), got {kps.shape}")
    image_bgr = cv2.cvtColor(load_image_rgb(image_rgb), cv2.COLOR_RGB2BGR)
    return face_align.norm_crop(image_bgr, landmark=kps, image_size=size)


def compare_faces(image_a: ImageInput, image_b: ImageInput, backend: FaceBackend) -> dict[str, Any]:
    """Identity similarity of the most prominent faces of two images, and the backend's verdict."""
    face_a = most_prominent_face(image_a, backend)
    face_b = most_prominent_face(image_b, backend)
    similarity = backend.similarity(face_a.embedding, face_b.embedding)
    return {
        "similarity": similarity,
        "threshold": backend.same_person_threshold,
        "same_person": similarity >= backend.same_person_threshold,
        "measure": backend.similarity_measure,
        "backend": backend.name,
    }

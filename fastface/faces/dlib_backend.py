"""Offline face backend: dlib's HOG detector, 68-point landmarks and ResNet face descriptor.

Weights ship on PyPI in ``face-recognition-models``; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from fastface.faces.base import CosineSimilarityMixin, Face, l2_normalise
from fastface.faces.images import ImageInput, load_image_rgb

_MODEL_FILES = {
    "shape_predictor": "shape_predictor_68_face_landmarks.dat",
    "face_descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}

# Calibration (tests/test_faces_dlib.py). dlib's own rule is "same person when
# the Euclidean distance of the raw descriptors is < 0.6" (99.38% on LFW). Raw
# descriptors have norm n ≈ 1.49 (1.36-1.57 on t1.jpg); we store L2-normalised
# ones, for which d² ≈ 2n²(1 - cos), so distance 0.6 ↔ cos 0.919, 0.55 ↔ 0.932,
# 0.5 ↔ 0.944. Measured on the photos in the insightface wheel: the same face
# mirrored and rescaled 0.983-0.995 (Tom Hanks 0.989, each person of t1.jpg);
# Tom Hanks vs the six people of t1.jpg 0.841-0.869; the 15 pairs of different
# people within t1.jpg 0.805-0.915. dlib's 0.6 would put the worst of those pairs
# (0.915) at the edge, so we take 0.93 (distance ≈ 0.56): above every impostor
# pair measured, below the ≈ 0.944 that dlib's typical same-person distance of
# 0.5 implies. Cosine is kept as the measure so every backend reads "higher =
# more alike" (and the dataset flow's discard rule works unchanged); 0.3, the
# buffalo_l value, would call almost any two dlib faces the same person.
DLIB_COSINE_THRESHOLD = 0.93


def face_recognition_models_dir() -> Path:
    """Folder of the ``face-recognition-models`` weights (found without importing the package)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the dlib face backend needs the 'face-recognition-models' package: "
            "pip install 'fastface[faces]' (or face-recognition-models dlib-bin)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _eye_centre(points: np.ndarray, first: int) -> np.ndarray:
    return points[first : first + 6].mean(axis=0)


def kps_from_68_landmarks(points: np.ndarray) -> np.ndarray:
    """insightface's 5-point order (image-left eye, image-right eye, nose tip, left and right mouth corner)."""
    points = np.asarray(points, dtype=np.float32)
    # iBUG 68-point scheme: 36-41 is the eye on the image's left, 42-47 the other,
    # 30 the nose tip, 48 and 54 the mouth corners.
    return np.stack(
        [_eye_centre(points, 36), _eye_centre(points, 42), points[30], points[48], points[54]]
    ).astype(np.float32)


class DlibFaceBackend(CosineSimilarityMixin):
    """HOG detection retried with upsampling, 68-point landmarks, 128-d ResNet descriptor."""

    name = "dlib"
    default_threshold = DLIB_COSINE_THRESHOLD
    embedding_dim = 128

    def __init__(
        self,
        *,
        upsample_steps: Sequence[int] = (0, 1, 2),
        models_dir: str | Path | None = None,
        same_person_threshold: float = DLIB_COSINE_THRESHOLD,
        num_jitters: int = 0,
    ) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise ImportError(
                "the dlib face backend needs dlib: pip install 'fastface[faces]' (or dlib-bin)"
            ) from exc
        if not upsample_steps or any(int(step) < 0 for step in upsample_steps):
            raise ValueError(f"upsample_steps must be non-negative integers, got {list(upsample_steps)}")
        folder = Path(models_dir) if models_dir is not None else face_recognition_models_dir()
        paths = {key: folder / filename for key, filename in _MODEL_FILES.items()}
        missing = [str(path) for path in paths.values() if not path.is_file()]
        if missing:
            raise FileNotFoundError(f"dlib model files are missing: {', '.join(missing)}")
        self.upsample_steps = tuple(int(step) for step in upsample_steps)
        self.same_person_threshold = float(same_person_threshold)
        self.num_jitters = int(num_jitters)
        self._detector = dlib.get_frontal_face_detector()
        self._shape_predictor = dlib.shape_predictor(str(paths["shape_predictor"]))
        self._descriptor = dlib.face_recognition_model_v1(str(paths["face_descriptor"]))
        self._dlib = dlib
        self.upsamples_tried: list[int] = []  # of the last detect() call, for inspection

    def detect(self, image: ImageInput) -> list[Face]:
        """Faces by decreasing HOG score; upsampling (0, then 1, then 2) only when nothing is found."""
        rgb = load_image_rgb(image)
        self.upsamples_tried = []
        for upsample in self.upsample_steps:
            self.upsamples_tried.append(upsample)
            rects, scores, _ = self._detector.run(rgb, upsample, 0.0)
            if len(rects):
                break
        else:
            return []
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
        faces = []
        for index in order:
            rect = rects[int(index)]
            shape = self._shape_predictor(rgb, rect)
            points = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
            descriptor = np.asarray(
                self._descriptor.compute_face_descriptor(rgb, shape, self.num_jitters), dtype=np.float32
            )
            faces.append(
                Face(
                    bbox=np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float32),
                    kps=kps_from_68_landmarks(points),
                    det_score=float(scores[int(index)]),
                    embedding=l2_normalise(descriptor),
                )
            )
        return faces

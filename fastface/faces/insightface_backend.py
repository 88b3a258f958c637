"""insightface ``buffalo_l`` backend: SCRFD detection with a multi-scale retry, ArcFace embeddings.

insightface 2.x ignores ``app.det_model.input_size = ...`` (``SCRFD.detect`` reads
its own ``input_sizes`` list, and ``FaceAnalysis.prepare`` defaults to detecting at
both 128² and 640²). So the retry passes ``input_size=(s, s)`` to the detector's
``detect`` itself and runs recognition on each face it returns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from fastface.faces.base import CosineSimilarityMixin, Face, l2_normalise
from fastface.faces.images import ImageInput, load_image_rgb

MODEL_PACK = "buffalo_l"
# method-spec §1: detect at 640², and when nothing is found retry at 576, 512, ..., 320.
DEFAULT_DET_SIZES: tuple[int, ...] = tuple(range(640, 319, -64))
# method-spec §6: same-person threshold for buffalo_l cosine similarity.
BUFFALO_L_COSINE_THRESHOLD = 0.3


def insightface_root(root: str | os.PathLike | None = None) -> Path:
    """insightface's model root: the option, else $FASTFACE_INSIGHTFACE_ROOT, else ~/.insightface."""
    if root is None:
        root = os.environ.get("FASTFACE_INSIGHTFACE_ROOT") or "~/.insightface"
    return Path(root).expanduser()


def offline_mode() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("FASTFACE_OFFLINE", "HF_HUB_OFFLINE")
    )


def onnx_providers(device_id: int = 0) -> list[Any]:
    """CUDA (on ``device_id``) first when onnxruntime reports it available, CPU always."""
    import onnxruntime

    providers: list[Any] = []
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.append(("CUDAExecutionProvider", {"device_id": int(device_id)}))
    providers.append("CPUExecutionProvider")
    return providers


def load_face_analysis(
    root: str | os.PathLike | None = None,
    *,
    providers: Sequence[Any] | None = None,
    device_id: int = 0,
    det_thresh: float = 0.5,
):
    """``insightface.app.FaceAnalysis("buffalo_l")`` with detection and recognition, loaded from ``root``."""
    from insightface.app import FaceAnalysis

    root_path = insightface_root(root)
    pack_dir = root_path / "models" / MODEL_PACK
    has_models = pack_dir.is_dir() and any(pack_dir.glob("*.onnx"))
    if not has_models and offline_mode():
        raise FileNotFoundError(
            f"insightface model pack {MODEL_PACK!r} not found in {pack_dir} and downloads are off "
            "(FASTFACE_OFFLINE / HF_HUB_OFFLINE is set). Put the pack's ONNX files "
            f"(det_10g.onnx, w600k_r50.onnx, ...) in {pack_dir}/, or point FASTFACE_INSIGHTFACE_ROOT "
            "(or the backend's root= option) at a folder holding models/buffalo_l/*.onnx"
        )
    providers = list(providers) if providers is not None else onnx_providers(device_id)
    uses_cuda = any((p[0] if isinstance(p, tuple) else p) == "CUDAExecutionProvider" for p in providers)
    try:
        app = FaceAnalysis(
            name=MODEL_PACK,
            root=str(root_path),
            allowed_modules=["detection", "recognition"],
            providers=providers,
        )
    except AssertionError as exc:  # FaceAnalysis asserts that the pack has a detection model
        raise FileNotFoundError(f"no SCRFD detection model (ONNX) found in {pack_dir}") from exc
    except Exception as exc:
        if has_models:
            raise
        raise FileNotFoundError(
            f"insightface model pack {MODEL_PACK!r} is not in {pack_dir} and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Put models/buffalo_l/*.onnx under {root_path}"
        ) from exc
    if "recognition" not in app.models:
        raise FileNotFoundError(f"no recognition model (ArcFace ONNX) found in {pack_dir}")
    # ctx_id < 0 pins the sessions to the CPU provider. det_size is set for
    # completeness only: detect() below passes the size on every call.
    app.prepare(ctx_id=int(device_id) if uses_cuda else -1, det_thresh=det_thresh, det_size=(640, 640))
    return app


class InsightFaceBackend(CosineSimilarityMixin):
    """buffalo_l faces, detected at 640² and retried at smaller sizes when none is found."""

    name = "insightface"
    default_threshold = BUFFALO_L_COSINE_THRESHOLD
    embedding_dim = 512

    def __init__(
        self,
        *,
        root: str | os.PathLike | None = None,
        providers: Sequence[Any] | None = None,
        device_id: int = 0,
        det_sizes: Sequence[int] = DEFAULT_DET_SIZES,
        det_thresh: float = 0.5,
        detector: Any = None,
        recognizer: Any = None,
        same_person_threshold: float = BUFFALO_L_COSINE_THRESHOLD,
    ) -> None:
        if not det_sizes or any(int(size) <= 0 or int(size) % 32 for size in det_sizes):
            raise ValueError(f"det_sizes must be positive multiples of 32 (SCRFD strides), got {list(det_sizes)}")
        if (detector is None) != (recognizer is None):
            raise ValueError("pass both detector= and recognizer=, or neither (to load buffalo_l)")
        if detector is None:
            app = load_face_analysis(root, providers=providers, device_id=device_id, det_thresh=det_thresh)
            detector, recognizer = app.det_model, app.models["recognition"]
        self.detector = detector
        self.recognizer = recognizer
        self.det_sizes = tuple(int(size) for size in det_sizes)
        self.same_person_threshold = float(same_person_threshold)
        self.sizes_tried: list[int] = []  # of the last detect() call, for inspection
        output_shape = getattr(recognizer, "output_shape", None)
        if output_shape is not None and isinstance(output_shape[-1], int):
            self.embedding_dim = int(output_shape[-1])

    def detect(self, image: ImageInput) -> list[Face]:
        """Faces in detection-score order, from the first size in ``det_sizes`` that finds any."""
        from insightface.app.common import Face as InsightFace

        # insightface works on BGR arrays (cv2 convention), as the authors feed it.
        bgr = np.ascontiguousarray(cv2.cvtColor(load_image_rgb(image), cv2.COLOR_RGB2BGR))
        self.sizes_tried = []
        for size in self.det_sizes:
            self.sizes_tried.append(size)
            bboxes, kpss = self.detector.detect(
                bgr, input_size=(size, size), max_num=0, metric="default"
            )
            if len(bboxes):
                break
        else:
            return []
        faces = []
        for index in range(len(bboxes)):
            kps = None if kpss is None else np.asarray(kpss[index], dtype=np.float32)
            if kps is None:
                raise RuntimeError("the insightface detector returned no landmarks; recognition needs them")
            record = InsightFace(bbox=bboxes[index, :4], kps=kps, det_score=bboxes[index, 4])
            self.recognizer.get(bgr, record)
            faces.append(
                Face(
                    bbox=np.asarray(bboxes[index, :4], dtype=np.float32),
                    kps=kps,
                    det_score=float(bboxes[index, 4]),
                    embedding=l2_normalise(record.normed_embedding),
                )
            )
        # SCRFD already returns score order; sorting again keeps that promise for any detector.
        faces.sort(key=lambda face: -face.det_score)
        return faces

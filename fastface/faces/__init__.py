"""Face analysis: detection, identity embeddings, aligned crops and CLIP-H identity inputs.

Two backends share one protocol (:class:`FaceBackend`): ``"insightface"``
(buffalo_l, what FastFace and its evaluation use; method-spec §1, §6) and
``"dlib"`` (offline, weights on PyPI; its own calibrated threshold).
"""

from fastface.faces.base import (
    FACE_BACKENDS,
    Face,
    FaceBackend,
    LazyFaceBackend,
    NoFaceError,
    aligned_face_crop_bgr,
    backend_for_embedding_width,
    compare_faces,
    cosine_similarity,
    get_face_backend,
    largest_face,
    most_prominent_face,
)
from fastface.faces.dlib_backend import DLIB_COSINE_THRESHOLD, DlibFaceBackend
from fastface.faces.identity import (
    IdentityInputs,
    encode_clip_states,
    encoder_fingerprint,
    null_clip_states,
    prepare_identity,
)
from fastface.faces.images import ImageReadError, load_image_rgb, photo_hash
from fastface.faces.insightface_backend import (
    BUFFALO_L_COSINE_THRESHOLD,
    DEFAULT_DET_SIZES,
    InsightFaceBackend,
    load_face_analysis,
)


__all__ = [
    "BUFFALO_L_COSINE_THRESHOLD",
    "DEFAULT_DET_SIZES",
    "DLIB_COSINE_THRESHOLD",
    "FACE_BACKENDS",
    "DlibFaceBackend",
    "Face",
    "FaceBackend",
    "IdentityInputs",
    "ImageReadError",
    "InsightFaceBackend",
    "LazyFaceBackend",
    "NoFaceError",
    "aligned_face_crop_bgr",
    "backend_for_embedding_width",
    "compare_faces",
    "cosine_similarity",
    "encode_clip_states",
    "encoder_fingerprint",
    "get_face_backend",
    "largest_face",
    "load_face_analysis",
    "load_image_rgb",
    "most_prominent_face",
    "null_clip_states",
    "photo_hash",
    "prepare_identity",
]

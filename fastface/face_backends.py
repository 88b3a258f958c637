"""The face backends by name: the registry every layer asks (CLI choices, config checks, actors).

Names are registered here and their classes imported on first use, so listing them (``fastface
--help``, a config check) loads no face model library. Each backend class has ``name``,
``embedding_dim`` and ``default_threshold`` (its same-person cosine threshold).
"""

from __future__ import annotations

from typing import Any, Callable

from fastface.registry import Registry

FACE_BACKENDS: Registry[Callable[..., Any]] = Registry("face backend")
FACE_BACKENDS.register_lazy("dlib", "fastface.faces.dlib_backend:DlibFaceBackend")
FACE_BACKENDS.register_lazy("insightface", "fastface.faces.insightface_backend:InsightFaceBackend")

DEFAULT_FACE_BACKEND = "insightface"
"""buffalo_l (insightface): what the paper's ID numbers use (method-spec §6)."""
OFFLINE_FACE_BACKEND = "dlib"
"""dlib + face-recognition-models: weights on PyPI, so it works on a machine with no model hub."""


def check_face_backend(name: str) -> str:
    """``name`` when a backend is registered under it, else a ValueError naming the valid ones."""
    if name not in FACE_BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; valid: {', '.join(FACE_BACKENDS.names())}")
    return name

"""FastFace: identity preservation for few-step distilled SDXL with IP-Adapter FaceID-Plus-v2.

Decoupled classifier-free guidance (:mod:`fastface.guidance`), attention manipulation
(:mod:`fastface.attention`), the batched pipeline (:mod:`fastface.pipeline`), checkpoints,
face analysis, metrics and a CLI. This package imports neither Ray nor Prefect.
"""

__version__ = "0.1.0"

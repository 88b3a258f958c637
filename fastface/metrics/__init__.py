"""Evaluation metrics of the FastFace protocol (method-spec §6), registered by name in ``METRICS``.

``id``, ``ffc``, ``face_size`` (face backend), ``clip``, ``ae``, ``fsc`` (CLIP ViT-L/14)
and, when installed, ``ir`` (ImageReward). Score with :func:`score_images`.
"""

from fastface.metrics.base import METRICS, Metric, MetricInput, MetricResult, MetricSpec, register_metric
from fastface.metrics import aesthetic, clip_score, identity  # noqa: F401  (registers the metrics)
from fastface.metrics.runner import DEFAULT_METRICS, score_directory, score_images, summarize

try:  # written separately; optional until it lands
    from fastface.metrics import image_reward  # noqa: F401
except ImportError:
    pass

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "Metric",
    "MetricInput",
    "MetricResult",
    "MetricSpec",
    "register_metric",
    "score_directory",
    "score_images",
    "summarize",
]

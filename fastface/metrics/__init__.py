"""Evaluation metrics of the FastFace protocol (method-spec §6), registered by name in ``METRICS``.

``id``, ``ffc``, ``face_size`` (face backend), ``clip``, ``ae``, ``fsc`` (CLIP ViT-L/14)
and ``ir`` (ImageReward, on transformers' BLIP blocks: no extra package). Score with :func:`score_images`.
"""

from fastface.metrics.base import METRICS, Metric, MetricInput, MetricResult, MetricSpec, register_metric
from fastface.metrics import aesthetic, clip_score, identity, image_reward  # noqa: F401  (registers the metrics)
from fastface.metrics.runner import DEFAULT_METRICS, score_directory, score_images, summarize

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

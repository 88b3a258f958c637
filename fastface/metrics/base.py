"""Metric interface and registry (lm-eval-harness style: each metric declares its direction and aggregation).

A metric scores a batch of :class:`MetricInput` and returns one :class:`MetricResult`
per input, in order. A failure on one input is a result with ``error`` set, never an
exception that loses the rest of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, Sequence

import numpy as np

from fastface.registry import Registry

Aggregation = Literal["mean", "sum", "count"]


@dataclass
class MetricInput:
    """What a metric may need about one generated image."""

    image: Any  # PIL.Image, HxWx3 uint8 RGB array, or a path/URI
    prompt: str | None = None
    source_embedding: np.ndarray | None = None  # identity embedding of the source face (backend's own)
    source_image: Any = None  # the identity photo, when the embedding must be computed
    key: str | None = None  # e.g. example_id, carried through for the caller


@dataclass
class MetricResult:
    value: float | None  # None: no value for this input (e.g. no face found); see detail / error
    detail: dict = field(default_factory=dict)
    error: str | None = None


class Metric(Protocol):
    spec: "MetricSpec"

    def score(self, inputs: Sequence[MetricInput]) -> list[MetricResult]: ...


@dataclass(frozen=True)
class MetricSpec:
    name: str
    inputs: tuple[str, ...]  # fields of MetricInput it reads, e.g. ("image", "prompt")
    higher_is_better: bool
    aggregate: Aggregation
    factory: Callable[..., Metric]  # factory(**options) -> Metric (loads its models once)
    description: str = ""


METRICS: Registry[MetricSpec] = Registry("metric")


def register_metric(spec: MetricSpec) -> MetricSpec:
    return METRICS.register(spec.name, spec)

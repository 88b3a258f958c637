"""The dataset flow's Ray pools: face analysis and synthesis renders, so no model loads in the flow process.

- face analysis (detection + embedding by ``face_backend``) on one CPU actor of
  :class:`actors.scorer.MetricWorker` without metrics (:meth:`~actors.scorer.MetricWorker.detect_faces`);
- candidate renders of synthesis on a generator pool of the synthesis checkpoint with the
  adapter's LoRA at 0 (:meth:`actors.generator.GeneratorWorker.render_text`).

Pools start on first use; :meth:`DatasetPools.close` ends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from actors.pool import ActorPool, PoolOptions, WorkerSpec, connect_ray

DETECT_BATCH = 8  # images per face-analysis call


@dataclass(frozen=True)
class RenderSpec:
    """What synthesis renders with: checkpoint, steps, size, the generator workers' options, images per call."""

    model: str
    steps: int
    size: int
    batch_size: int
    worker_kwargs: dict[str, Any] = field(default_factory=dict)


class DatasetPools:
    """The face pool and (for synthesis) the renderer pool of one dataset build."""

    def __init__(self, store: Any, *, face_backend: str, options: PoolOptions, ray_address: str | None = None,
                 render: RenderSpec | None = None) -> None:
        self.store = store
        self.face_backend = face_backend
        self.options = options
        self.ray_address = ray_address
        self.render_spec = render
        self.backend: dict | None = None  # name, threshold, dim of the face backend (from the workers)
        self.render_workers: set[str] = set()  # the actors that rendered candidates
        self._faces: ActorPool | None = None
        self._renderer: ActorPool | None = None

    @property
    def faces(self) -> ActorPool:
        if self._faces is None:
            from actors.scorer import MetricWorker

            connect_ray(self.ray_address)
            # One CPU worker: a few hundred photos or candidates, and the GPUs stay free for the renderer pool
            # that works next to it during synthesis.
            spec = WorkerSpec(MetricWorker, "detect_faces", (self.store, []),
                              {"face_backend": self.face_backend, "device": "cpu"})
            options = PoolOptions(num_workers=1, cpus_per_worker=self.options.cpus_per_worker, use_gpus=False)
            self._faces = ActorPool(spec, kind="faces", options=options)
        return self._faces

    def detect(self, images: Sequence) -> list[list[SimpleNamespace]]:
        """Faces of each image (arrays or encoded bytes), in the backend's order: ``bbox``, ``area``, ``embedding``."""
        rows = [{"key": i, "image": image} for i, image in enumerate(images)]
        results = self.faces.map([rows[i:i + DETECT_BATCH] for i in range(0, len(rows), DETECT_BATCH)])
        if results:
            self.backend = {k: results[0][k] for k in ("backend", "threshold", "dim")}
        return [[SimpleNamespace(**face) for face in result["faces"]] for result in results]

    def backend_info(self) -> dict:
        """``{"backend", "threshold", "dim"}`` of the face pool's backend."""
        if self.backend is None:
            self.backend = self.faces.map([[{"key": 0}]], method="face_backend_info")[0]
        return self.backend

    def render(self, candidates: Sequence) -> list[np.ndarray]:
        """RGB uint8 renders of synthesis candidates (``id``, ``prompt``, ``seed``), on the generator pool."""
        spec = self.render_spec
        if spec is None:
            raise ValueError("these dataset pools render nothing: give render=RenderSpec(...) for synthesis")
        if self._renderer is None:
            from actors.generator import GeneratorWorker

            connect_ray(self.ray_address)
            kwargs = dict(spec.worker_kwargs, steps=spec.steps, lora_scale=0.0)
            self._renderer = ActorPool(WorkerSpec(GeneratorWorker, "render_text", (self.store, spec.model), kwargs),
                                       kind="renderer", options=self.options)
        rows = [{"key": c.id, "prompt": c.prompt, "seed": c.seed, "size": spec.size} for c in candidates]
        results = self._renderer.map([rows[i:i + spec.batch_size] for i in range(0, len(rows), spec.batch_size)])
        self.render_workers |= {r["worker"] for r in results}
        return [r["image"] for r in results]

    def loads(self) -> dict[str, int]:
        """Actors started per pool (each loads its models once)."""
        return {name: pool.stats.actors_started for name, pool in (("faces", self._faces), ("renderer", self._renderer))
                if pool is not None}

    def close(self) -> None:
        for pool in (self._faces, self._renderer):
            if pool is not None:
                pool.close()


__all__ = ["DETECT_BATCH", "DatasetPools", "RenderSpec"]

"""Rehearsal workers: the generator and scorer actors without models (``weights: rehearsal``).

A rehearsal runs every real step of ``fastface evaluate`` — planning, the Ray pools, the
store's image writes and row appends, scoring, the report, compaction — with workers that
load nothing: :class:`RehearsalGenerator` makes an 8×8 PNG per example, derived from its
seed and settings, and :class:`RehearsalScorer` reads each stored image back and gives every
metric a deterministic value in that metric's range (about 5 % of images have "no face", so
face-fail counts and the metrics that are undefined without a face are exercised). Both can
wait ``batch_seconds`` per batch to stand in for a GPU's batch time. Users run it to check a
cluster and a store before paying for GPU hours (docs/evaluation.md, "Rehearsal").

The generator is :class:`actors.generator.GeneratorWorker` with a stand-in pipeline and
identity preparation, so its batches go through the same ``render`` (image writes, rows,
failure handling) as a real one. Every generation row's ``metadata`` records the actor's
own batch start and end (``batch_started`` / ``batch_ended``, Unix seconds), from which
:mod:`benchmarks.bench_rehearsal` measures how busy the actors were.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from types import SimpleNamespace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from actors.generator import GeneratorWorker
from actors.scorer import MetricWorker, requested_metrics
from fastface.faces import load_image_rgb
from storage.schemas import json_text
from storage.store import Store

REHEARSAL_DEVICE = "rehearsal (no model)"
IMAGE_SIDE = 8  # pixels: a rehearsal image is small, so a full-size run stores ~1.45 M tiny PNGs
NO_FACE_FRACTION = 0.05
FACE_METRICS = ("id", "ffc", "face_size", "fsc")


def unit_hash(*parts: Any) -> float:
    """A number in [0, 1) fixed by ``parts`` (sha256), the same in every process and run."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def rehearsal_image(seed: int, prompt: str, preset: str, ip_adapter_scale: float, lora_scale: float,
                    model: str, side: int = IMAGE_SIDE) -> np.ndarray:
    """A ``side``×``side``×3 float image in [0, 1], a function of the example's settings only."""
    digest = hashlib.sha256(f"{model}|{preset}|{ip_adapter_scale!r}|{lora_scale!r}|{seed}|{prompt}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
    return rng.random((side, side, 3), dtype=np.float32)


def rehearsal_embedding(content_hash: str, dim: int) -> np.ndarray:
    """A unit ``dim``-d identity embedding fixed by the identity's content hash (no face model)."""
    rng = np.random.default_rng(int(content_hash[:16], 16))
    vector = rng.standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def face_found(example_id: str) -> bool:
    """Whether the rehearsal "detects" a face in an example's image (about 95 % of them do)."""
    return unit_hash(example_id, "face") >= NO_FACE_FRACTION


def rehearsal_score(example_id: str, metric: str, prompt: str | None, *,
                    face_size_mode: str = "clipped", fsc_mode: str = "aligned") -> tuple[float | None, dict]:
    """``(value, detail)`` of one metric of one image, in the metric's range, as the real metric shapes it.

    Without a face: ``id`` and ``fsc`` are None, ``ffc`` is 1, ``face_size`` is None (0.0 in the
    authors' mode); ``fsc`` is None on realistic prompts (no ``;``), as the real metric does.
    """
    u = unit_hash(example_id, metric)
    found = face_found(example_id)
    detail: dict[str, Any] = {"rehearsal": True}
    if metric in FACE_METRICS:
        detail["face_found"] = found
    if metric == "ffc":
        return (0.0 if found else 1.0), detail
    if metric == "id":
        return (0.2 + 0.6 * u if found else None), detail
    if metric == "face_size":
        return (0.02 + 0.3 * u if found else (0.0 if face_size_mode == "authors" else None)), detail
    if metric == "fsc":
        if ";" not in (prompt or ""):
            return None, {"rehearsal": True, "stylistic": False}
        return (0.1 + 0.2 * u if found else None), detail
    if metric == "clip":
        return 0.15 + 0.2 * u, detail
    if metric == "ae":
        return 4.0 + 3.0 * u, detail
    if metric == "ir":
        return -2.0 + 4.0 * u, detail
    return u, detail  # a metric registered by a plugin: any value in [0, 1)


class RehearsalPipeline:
    """Stands in for :class:`fastface.pipeline.FastFacePipeline` in a rehearsal: waits, then returns small images."""

    def __init__(self, model: str, *, batch_seconds: float = 0.0, id_embedding_width: int = 512) -> None:
        self.model = model
        self.batch_seconds = float(batch_seconds)
        self.id_embedding_width = int(id_embedding_width)

    def set_progress_bar_config(self, **_: Any) -> None:
        pass

    def __call__(self, prompts: Sequence[str], *, seeds: Sequence[int], preset: str, ip_adapter_scale: float,
                 lora_scale: float, **_: Any) -> SimpleNamespace:
        started = time.time()
        if self.batch_seconds > 0:
            time.sleep(self.batch_seconds)
        images = [rehearsal_image(seed, prompt, preset, ip_adapter_scale, lora_scale, self.model)
                  for prompt, seed in zip(prompts, seeds)]
        ended = time.time()
        meta = {"rehearsal": True, "batch_started": started, "batch_ended": ended, "batch_size": len(images),
                "simulated_batch_seconds": self.batch_seconds}
        return SimpleNamespace(images=images, metadata=[meta] * len(images))


class RehearsalGenerator(GeneratorWorker):
    """A :class:`~actors.generator.GeneratorWorker` that loads no model (``weights: rehearsal``).

    Identities are looked up in the store like a real worker's (an unknown identity still
    fails its examples), but nothing is read from their photos: the embedding is the stored
    one, or one derived from the content hash.
    """

    def __init__(self, store: Store, model: str, *, steps: int | None = None,
                 identities: "Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None" = None,
                 rehearsal_batch_seconds: float = 0.0, face_backend: str | None = None,
                 worker_id: str | None = None, node: str | None = None, fail_oom_above_batch: int | None = None,
                 upload_threads: int = 4, **_ignored: Any) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from actors.generator import identity_index
        from fastface.checkpoints import get_checkpoint
        from fastface.faces import backend_for_embedding_width

        self.store = store
        self.model = model
        self.steps = None if steps is None else int(steps)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        width = int(get_checkpoint(model).id_embed_dim)
        self.pipe = RehearsalPipeline(model, batch_seconds=rehearsal_batch_seconds, id_embedding_width=width)
        backend = backend_for_embedding_width(width, face_backend, model=f"model {model!r}", option="face_backend")
        self.face_backend = SimpleNamespace(name=backend, embedding_dim=width)
        self._identity_rows = identity_index(identities)
        self._prepared: dict[str, Any] = {}
        self.identities_prepared = 0
        # as GeneratorWorker: one "pipeline" call at a time, images stored on upload threads meanwhile
        self._gpu = threading.Lock()
        self._uploads = ThreadPoolExecutor(int(upload_threads), thread_name_prefix="fastface-upload") \
            if int(upload_threads) else None
        self.fail_oom_above_batch = fail_oom_above_batch
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.node = node or socket.gethostname()
        self.device_name = REHEARSAL_DEVICE
        self.versions = json.dumps({"rehearsal": True, "model": model, "steps": self.steps, "face_backend": backend},
                                   sort_keys=True)

    def identity(self, identity_hash: str) -> Any:
        """The identity's embedding (stored, or derived from its hash) and empty CLIP states; raises when unknown."""
        import torch

        cached = self._prepared.get(identity_hash)
        if cached is None:
            row = self._identity_row(identity_hash)
            if row is None:
                cached = LookupError(f"no identities row with content_hash {identity_hash[:12]}…: import the "
                                     "identities (dataset flow) before generating")
            else:
                width = self.face_backend.embedding_dim
                stored = row.get("embedding")
                embedding = (np.asarray(stored, np.float32) if stored is not None and len(stored) == width
                             else rehearsal_embedding(identity_hash, width))
                cached = SimpleNamespace(embedding=embedding, clip_states=torch.zeros((1, 1)),
                                         content_hash=identity_hash)
                self.identities_prepared += 1
            self._prepared[identity_hash] = cached
        if isinstance(cached, BaseException):
            raise cached
        return cached


class RehearsalScorer(MetricWorker):
    """A :class:`~actors.scorer.MetricWorker` that loads no model: reads each image back, then scores it by hash."""

    def __init__(self, store: Store, metrics: Sequence[str], *,
                 identities: "Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None" = None,
                 batch_size: int = 16, worker_id: str | None = None, rehearsal_batch_seconds: float = 0.0,
                 face_backend: str = "insightface", face_size_mode: str = "clipped", fsc_mode: str = "aligned",
                 **_ignored: Any) -> None:
        from actors.generator import identity_index
        from fastface.metrics import METRICS

        for name in metrics:
            METRICS.get(name)  # an unknown name fails here, as it does for a real worker
        self.store = store
        self.metrics = list(dict.fromkeys(metrics))
        self.device = "cpu"
        self.batch_size = int(batch_size)
        self.batch_seconds = float(rehearsal_batch_seconds)
        self.face_backend_name = face_backend
        self.modes = {"face_size_mode": face_size_mode, "fsc_mode": fsc_mode}
        self._identity_rows = identity_index(identities)
        self._sources: dict[str, Any] = {}
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"

    def score(self, batch: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``metrics`` rows for a batch, as :meth:`MetricWorker.score` returns them (unreadable image: error rows)."""
        if self.batch_seconds > 0:
            time.sleep(self.batch_seconds)
        out = []
        for row in batch:
            wanted = requested_metrics(row, self.metrics)
            uri = row.get("image_uri") or self.store.image_uri(row["run_id"], row["example_id"])
            error = None
            try:
                load_image_rgb(self.store.read_bytes(uri))
            except Exception as exc:  # noqa: BLE001 - the row records it, as a real worker's does
                error = f"cannot read generated image {uri}: {type(exc).__name__}: {exc}"
            known = self._identity_row(row["identity_hash"]) is not None
            for metric in wanted:
                value, detail, problem = None, None, error
                if problem is None and metric == "id" and not known:
                    problem = f"source face: no identities row with content_hash {row['identity_hash'][:12]}…"
                if problem is None:
                    value, found = rehearsal_score(row["example_id"], metric, row.get("prompt"), **self.modes)
                    detail = json_text(found)  # text made here, as MetricWorker does: the driver only checks it
                out.append({"example_id": row["example_id"], "run_id": row["run_id"], "metric": metric,
                            "value": value, "detail": detail, "error": problem})
        return out


__all__ = ["RehearsalGenerator", "RehearsalPipeline", "RehearsalScorer", "face_found", "rehearsal_embedding",
           "rehearsal_image", "rehearsal_score", "unit_hash"]

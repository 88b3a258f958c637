"""MetricWorker: metric models loaded once per process, example rows in, ``metrics`` rows out.

A plain class (Ray's batch-inference pattern), wrapped in a Ray actor by :mod:`actors.pool`.
Scoring itself is :func:`fastface.metrics.runner.score_images`; this class only turns
stored examples into :class:`~fastface.metrics.MetricInput` and results into rows.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from actors.generator import identity_index, read_uri, stored_identity_row
from fastface.faces import load_image_rgb
from storage.schemas import json_text
from storage.store import Store


def requested_metrics(row: Mapping[str, Any], loaded: Sequence[str]) -> tuple[str, ...]:
    """The metrics a work row asks for (all loaded ones when it names none); unknown ones are a ValueError."""
    wanted = tuple(row.get("metrics") or loaded)
    unknown = sorted(set(wanted) - set(loaded))
    if unknown:
        raise ValueError(f"example {row['example_id']} asks for metric(s) {unknown} this worker did not load "
                         f"(it has {list(loaded)})")
    return wanted


class MetricWorker:
    """Scores generated images of the store with ``metrics`` (names of :data:`fastface.metrics.METRICS`).

    Models the selected metrics share (CLIP-L, the face backend) are loaded once, here;
    ``metric_options`` go to :func:`~fastface.metrics.runner.score_images` (``face_backend``,
    ``clip_model``, ``clip_pretrained``, ``aesthetic_checkpoint``, …). ``identities`` are
    ``identities`` rows (or content_hash → row); hashes not found there are looked up in
    the store. A source identity's stored embedding is used when it was made by the
    metrics' face backend, else its photo is read and embedded by that backend.
    """

    def __init__(
        self,
        store: Store,
        metrics: Sequence[str],
        *,
        identities: "Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None" = None,
        device: Any = None,
        batch_size: int = 16,
        worker_id: str | None = None,
        **metric_options: Any,
    ) -> None:
        import torch

        from fastface.face_backends import DEFAULT_FACE_BACKEND
        from fastface.metrics.runner import build_metrics

        self.store = store
        self.metrics = list(dict.fromkeys(metrics))
        self.device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = int(batch_size)
        # Models load once per worker; unknown metric names and option typos fail here, not per batch.
        # No metrics: a face-analysis worker (dataset synthesis and import), see detect_faces.
        self._built = build_metrics(self.metrics, device=self.device, **metric_options) if self.metrics else None
        self._face_backend = None
        self._face_backend_options = dict(metric_options.get("face_backend_options") or {})
        faces = metric_options.get("faces")
        self.face_backend_name = (
            faces.backend.name if faces is not None else metric_options.get("face_backend", DEFAULT_FACE_BACKEND)
        )
        self._identity_rows = identity_index(identities)
        self._sources: dict[str, Any] = {}
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"

    @property
    def face_backend(self) -> Any:
        """The face backend of ``face_backend`` (loaded once, on first use)."""
        if self._face_backend is None:
            from fastface.faces import get_face_backend

            self._face_backend = get_face_backend(self.face_backend_name, **self._face_backend_options)
        return self._face_backend

    def detect_faces(self, batch: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Faces of images: ``{key, faces: [{bbox, area, embedding}], backend, threshold, dim}`` per ``{key, image}``.

        ``image`` is an HxWx3 uint8 array or encoded bytes (PNG/JPEG, EXIF-rotated when decoded).
        Faces come in the backend's order (insightface: by detection score; the first is the
        "most prominent" face the authors embed).
        """
        backend = self.face_backend
        out = []
        for row in batch:
            image = row["image"]
            rgb = load_image_rgb(image) if isinstance(image, (bytes, bytearray)) else np.asarray(image, np.uint8)
            faces = backend.detect(rgb)
            out.append({
                "key": row["key"],
                "faces": [{"bbox": [float(v) for v in f.bbox], "area": float(f.area),
                           "embedding": np.asarray(f.embedding, np.float32)} for f in faces],
                "backend": backend.name, "threshold": float(backend.same_person_threshold),
                "dim": int(backend.embedding_dim), "worker": self.worker_id,
            })
        return out

    def face_backend_info(self, batch: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``{key, backend, threshold, dim}`` of the face backend, once per row (loads the backend)."""
        backend = self.face_backend
        return [{"key": row["key"], "backend": backend.name, "threshold": float(backend.same_person_threshold),
                 "dim": int(backend.embedding_dim)} for row in batch]

    def _identity_row(self, identity_hash: str) -> dict | None:
        if identity_hash not in self._identity_rows:  # once per unknown hash: _source caches the outcome
            row = stored_identity_row(self.store, identity_hash)  # a point query, not the whole table
            if row is not None:
                self._identity_rows[identity_hash] = row
        return self._identity_rows.get(identity_hash)

    def _source(self, identity_hash: str) -> dict:
        """``source_embedding`` / ``source_image`` of a MetricInput for one identity (decoded once per worker)."""
        if identity_hash not in self._sources:
            row = self._identity_row(identity_hash) or {}
            embedding = row.get("embedding")
            if embedding is not None and row.get("face_backend") == self.face_backend_name:
                source = {"source_embedding": np.asarray(embedding, dtype=np.float32)}
            elif row.get("image_uri"):
                try:
                    source = {"source_image": load_image_rgb(read_uri(self.store, row["image_uri"]))}
                except Exception as exc:  # the ID metric reports it on each row that needs the source
                    source = {"source_image": f"{row['image_uri']} (unreadable: {type(exc).__name__}: {exc})"}
            else:
                source = {}
            self._sources[identity_hash] = source
        return self._sources[identity_hash]

    def score(self, batch: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``metrics`` rows for ``examples`` rows whose images exist.

        A row may carry ``image_uri`` (else the store's ``images/<run>/<example_id>.png``)
        and ``metrics`` (a subset of this worker's metrics; default all of them).
        """
        from fastface.metrics import MetricInput
        from fastface.metrics.runner import score_images

        groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
        for row in batch:
            groups.setdefault(requested_metrics(row, self.metrics), []).append(row)
        out: dict[tuple[str, str], dict] = {}
        for wanted, rows in groups.items():
            inputs, unreadable = [], []
            for row in rows:
                uri = row.get("image_uri") or self.store.image_uri(row["run_id"], row["example_id"])
                try:
                    image = load_image_rgb(read_uri(self.store, uri))
                except Exception as exc:
                    unreadable.append((row, f"cannot read generated image {uri}: {type(exc).__name__}: {exc}"))
                    continue
                inputs.append(
                    MetricInput(image=image, prompt=row.get("prompt"), key=row["example_id"],
                                **self._source(row["identity_hash"]))
                )
            for row, error in unreadable:
                for metric in wanted:
                    out[row["example_id"], metric] = {"value": None, "detail": None, "error": error}
            if inputs:
                scored = score_images(
                    inputs, list(wanted), batch_size=self.batch_size, device=self.device, progress=False,
                    built=self._built,
                )
                for result in scored:
                    out[result["key"], result["metric"]] = result
        rows_out = []
        for row in batch:
            for metric in tuple(row.get("metrics") or self.metrics):
                result = out[row["example_id"], metric]
                rows_out.append(
                    {
                        "example_id": row["example_id"],
                        "run_id": row["run_id"],
                        "metric": metric,
                        "value": result["value"],
                        "detail": None if result["detail"] is None else json_text(result["detail"]),
                        "error": result["error"],
                    }
                )
        return rows_out


def failed_metric_rows(batch: Sequence[Mapping[str, Any]], metrics: Sequence[str], error: str) -> list[dict]:
    """Error ``metrics`` rows for a batch that could not be scored at all (re-planned on the next run)."""
    return [
        {"example_id": row["example_id"], "run_id": row["run_id"], "metric": metric, "value": None, "detail": None,
         "error": error}
        for row in batch
        for metric in tuple(row.get("metrics") or metrics)
    ]

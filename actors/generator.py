"""GeneratorWorker: one FastFace pipeline per process, example rows in, ``generations`` rows out.

Ray's batch-inference pattern: the model loads once in ``__init__`` and ``generate`` maps a
batch of ``examples`` rows to ``generations`` rows. It is a plain class, so it can be tried
on one batch without Ray; :mod:`actors.pool` wraps it in a Ray actor.

Images go to the store (``images/<run>/<example_id>.png``, written atomically) before the
rows are returned; the rows are appended by the caller (the pool's driver) in one
transaction with the other batches that finished within its write interval, so a crash never
leaves half a batch recorded.

The PNG encoding and upload of a batch's images run on a small thread pool
(``upload_threads``) outside the worker's GPU lock: in a pool actor (two batches at a time,
:class:`actors.pool.GeneratorPools`) the next batch's pipeline call runs while the previous
batch's images are stored. A batch's rows are returned only once all its images are stored,
so a row never points at a missing image; an actor killed mid-upload returns no rows, and
its batches are run again.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fastface.cache import identity_photo_file
from fastface.faces.images import encode_png
from fastface.provenance import package_versions
from storage.ids import bytes_sha256
from storage.store import Store


PipelineFactory = Callable[..., Any]  # load_pipeline(model, *, steps, device, dtype, cache_dir, **overrides)


@dataclass(frozen=True, order=True)
class BatchKey:
    """The settings every example of one pipeline call shares (numbers normalised, so equal settings compare equal)."""

    model: str
    preset: str
    ip_adapter_scale: float
    lora_scale: float
    width: int
    height: int
    steps: int

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> "BatchKey":
        """The key of an ``examples`` row."""
        return cls(
            model=str(row["model"]),
            preset=str(row["preset"]),
            ip_adapter_scale=float(row["ip_adapter_scale"]),
            lora_scale=float(row["lora_scale"]),
            width=int(row["width"]),
            height=int(row["height"]),
            steps=int(row["steps"]),
        )


#: Columns whose values must be equal for every example of one pipeline call.
BATCH_KEY = tuple(f.name for f in fields(BatchKey))


@dataclass(frozen=True)
class GeneratorOptions:
    """How each generator actor loads its pipeline (everything but the model and steps, which come from the batches).

    ``pipeline_overrides`` go to the pipeline factory (load_pipeline's ``lora_scale``, source
    overrides such as ``sdxl_base=``, or a test factory's own arguments).
    """

    device: str | None = None
    dtype: str | None = None
    cache_dir: str | None = None
    identity_cache_dir: str | None = None
    face_backend: str | None = None
    face_backend_options: Mapping[str, Any] | None = None
    pipeline_factory: PipelineFactory | None = None
    fail_oom_above_batch: int | None = None  # test hook: raise torch.OutOfMemoryError for larger batches
    # Threads that PNG-encode and store a batch's images while the actor's next batch runs
    # (pool actors then take two batches at a time); 0: one by one after each batch, before the next.
    upload_threads: int = 4
    pipeline_overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "GeneratorOptions":
        """Known option names become fields; the rest become ``pipeline_overrides``."""
        options = dict(options or {})
        for reserved in ("store", "model", "steps", "identities", "worker_id", "node"):
            if reserved in options:
                raise ValueError(f"pipeline options may not set {reserved!r}; it comes from the examples and the pool")
        known = {f.name for f in fields(cls)} - {"pipeline_overrides"}
        overrides = {k: v for k, v in options.items() if k not in known}
        return cls(**{k: v for k, v in options.items() if k in known}, pipeline_overrides=overrides)

    def worker_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`GeneratorWorker` (besides store, model, steps, identities)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pipeline_overrides"}
        return {**kwargs, **dict(self.pipeline_overrides)}


def identity_index(rows: "Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None") -> dict[str, dict]:
    """``identities`` rows keyed by ``content_hash`` (what ``examples.identity_hash`` holds).

    When one photo was imported several times, the latest row that has an ``image_uri`` wins.
    """
    if rows is None:
        return {}
    if isinstance(rows, Mapping):
        return {str(k): dict(v) for k, v in rows.items()}
    out: dict[str, dict] = {}
    ordered = sorted((dict(r) for r in rows), key=lambda r: (r.get("image_uri") is not None, str(r.get("created_at") or "")))
    for row in ordered:
        if not row.get("content_hash"):
            raise ValueError(f"identity row {row.get('identity_id')!r} has no content_hash; pass rows of the identities table")
        out[row["content_hash"]] = row
    return out


def stored_identity_row(store: Store, identity_hash: str) -> dict | None:
    """The store's ``identities`` row with this ``content_hash`` (all runs; :func:`identity_index`'s choice
    among several), by a point query: a worker never reads the whole table."""
    from storage.layout import LAKE

    rows = store.query(f"SELECT * FROM {LAKE}.identities WHERE content_hash = ?", [identity_hash]).to_pylist()
    return identity_index(rows).get(identity_hash)


def identity_photos(row: Mapping[str, Any]) -> list[dict]:
    """``[{uri, content_hash}]`` of an identity imported with several photos (``provenance.photos``), else []."""
    provenance = row.get("provenance")
    if isinstance(provenance, str):
        provenance = json.loads(provenance) if provenance else {}
    photos = (provenance or {}).get("photos") or []
    return photos if len(photos) > 1 else []


def read_uri(store: Store, uri: str) -> bytes:
    """Bytes of a URI or path: through the store when it lies under the store's root, else through fsspec."""
    try:
        return store.read_bytes(uri)
    except ValueError:  # not under this store's root
        pass
    import fsspec

    options = store.storage_options if uri.split("://", 1)[0] == store.protocol else {}
    with fsspec.open(uri, "rb", **options) as stream:
        return stream.read()


def default_pipeline_factory(model: str, **kwargs: Any) -> Any:
    """:func:`fastface.checkpoints.load_pipeline` (imported when first needed)."""
    from fastface.checkpoints import load_pipeline

    return load_pipeline(model, **kwargs)


class GeneratorWorker:
    """Loads one :class:`~fastface.pipeline.FastFacePipeline` for ``model`` (and ``steps``) and generates batches.

    - ``store``: where images are written (and identity photos / the identities table are read);
    - ``identities``: ``identities`` rows (or a dict content_hash → row); hashes not found
      there are looked up in the store's ``identities`` table (all runs);
    - ``device`` / ``dtype``: default CUDA + float16 when CUDA is available, else CPU + float32;
    - ``face_backend``: defaults to the backend whose embeddings fit the adapter
      (128-d → ``dlib``, 512-d → ``insightface``); its models load only when an identity
      is not in the identity cache (:class:`~fastface.faces.LazyFaceBackend`);
    - ``identity_cache_dir``: cache of identity embeddings/crops/CLIP states (by content hash);
      each identity is also kept in memory, so it is prepared once per worker;
    - ``pipeline_factory``: ``factory(model, steps=, device=, dtype=, cache_dir=, **pipeline_overrides)``,
      default :func:`fastface.checkpoints.load_pipeline`;
    - ``fail_oom_above_batch``: test hook, raise ``torch.OutOfMemoryError`` for larger batches;
    - ``upload_threads``: threads that encode and store a batch's images (0: one by one in the
      calling thread). The pipeline and identity preparation run under one lock, the storing
      outside it, so two threads (a Ray actor with ``max_concurrency=2``) overlap one batch's
      storing with the next batch's generation; memory holds at most those two batches.
    """

    def __init__(
        self,
        store: Store,
        model: str,
        *,
        steps: int | None = None,
        identities: "Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None" = None,
        device: Any = None,
        dtype: Any = None,
        cache_dir: str | os.PathLike | None = None,
        identity_cache_dir: str | os.PathLike | None = None,
        face_backend: str | None = None,
        face_backend_options: Mapping[str, Any] | None = None,
        pipeline_factory: PipelineFactory | None = None,
        worker_id: str | None = None,
        node: str | None = None,
        fail_oom_above_batch: int | None = None,
        upload_threads: int = 4,
        **pipeline_overrides: Any,
    ) -> None:
        import torch

        from fastface.cache import identities_dir
        from fastface.checkpoints import resolve_device_dtype
        from fastface.dtypes import dtype_name
        from fastface.faces import LazyFaceBackend, backend_for_embedding_width

        self.store = store
        self.model = model
        self.steps = None if steps is None else int(steps)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        factory = pipeline_factory or default_pipeline_factory
        self.pipe = factory(
            model, steps=self.steps, device=self.device, dtype=self.dtype, cache_dir=cache_dir, **pipeline_overrides
        )
        self.pipe.set_progress_bar_config(disable=True)
        id_width = int(self.pipe.id_embedding_width)
        backend_name = backend_for_embedding_width(id_width, face_backend, model=f"model {model!r}",
                                                   option="face_backend")
        # Its models load when an identity is first prepared without a cached record (never, when the
        # identity cache has them all: a resumed run, every actor after the first).
        self.face_backend = LazyFaceBackend(backend_name, **dict(face_backend_options or {}))
        self.identity_cache_dir = Path(identity_cache_dir).expanduser() if identity_cache_dir is not None \
            else identities_dir(cache_dir)
        self._identity_rows = identity_index(identities)
        self._prepared: dict[str, Any] = {}  # content hash -> IdentityInputs or the exception it raised
        self.identities_prepared = 0  # how many identities this worker has prepared (for tests and logs)
        self.fail_oom_above_batch = fail_oom_above_batch
        if int(upload_threads) < 0:
            raise ValueError(f"upload_threads must be 0 or more, got {upload_threads}")
        self._gpu = threading.Lock()  # one pipeline call (and identity preparation) at a time
        self._uploads = ThreadPoolExecutor(int(upload_threads), thread_name_prefix="fastface-upload") \
            if int(upload_threads) else None
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self.node = node or socket.gethostname()  # the Ray node id when run by actors.pool
        device_name = str(self.device)
        if self.device.type == "cuda":
            device_name += f" ({torch.cuda.get_device_name(self.device)})"
        self.device_name = device_name
        self.versions = json.dumps(
            dict(
                package_versions(),
                model=model,
                steps=self.steps,
                dtype=dtype_name(self.dtype),
                face_backend=self.face_backend.name,
            ),
            sort_keys=True,
        )

    # -- identities ------------------------------------------------------------
    def _identity_row(self, identity_hash: str) -> dict | None:
        if identity_hash not in self._identity_rows:
            # Once per unknown hash (its outcome is cached by identity()): identities added since are found.
            row = stored_identity_row(self.store, identity_hash)
            if row is not None:
                self._identity_rows[identity_hash] = row
        return self._identity_rows.get(identity_hash)

    def _photo_path(self, uri: str, identity_hash: str) -> str:
        """A local file with the photo's bytes, checked against the hash the example was planned with."""
        if "://" not in uri or uri.startswith("file://"):
            path = uri.split("://", 1)[-1]
            if Path(path).is_file():
                return path
        data = read_uri(self.store, uri)
        if bytes_sha256(data) != identity_hash:
            raise ValueError(
                f"identity photo {uri} has changed since it was registered (its sha256 is not {identity_hash[:12]}…); "
                "re-import the identities and re-plan the sweep"
            )
        local = identity_photo_file(self.identity_cache_dir, identity_hash, Path(uri).suffix)
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".tmp-{os.getpid()}-{local.name}")
            tmp.write_bytes(data)
            os.replace(tmp, local)
        return str(local)

    def identity(self, identity_hash: str) -> Any:
        """:class:`~fastface.faces.IdentityInputs` of one identity (prepared once per worker); raises when unusable."""
        from fastface.faces import prepare_identity

        cached = self._prepared.get(identity_hash)
        if cached is None:
            try:
                row = self._identity_row(identity_hash)
                if row is None:
                    raise LookupError(
                        f"no identities row with content_hash {identity_hash[:12]}…: import the identities "
                        "(dataset flow) before generating, or pass identities= to the worker"
                    )
                if not row.get("image_uri"):
                    raise ValueError(f"identity {row.get('identity_id')!r} has no image_uri to read its photo from")
                path = row["image_uri"]
                members = identity_photos(row)
                if members:  # several photos of one person (an identity folder): all of them, checked one by one
                    path = [self._photo_path(m["uri"], m["content_hash"]) for m in members]
                else:
                    path = self._photo_path(path, identity_hash)
                cached = prepare_identity(
                    path,
                    self.face_backend,
                    image_encoder=self.pipe.image_encoder,
                    feature_extractor=self.pipe.feature_extractor,
                    cache_dir=self.identity_cache_dir,
                )
                if cached.content_hash != identity_hash:
                    raise ValueError(
                        f"identity photo {row['image_uri']} has changed since it was registered "
                        f"(sha256 {cached.content_hash[:12]}…, planned {identity_hash[:12]}…); re-import and re-plan"
                    )
                self.identities_prepared += 1
            except (ValueError, LookupError) as exc:  # NoFaceError, ImageReadError: the photo will not change
                cached = exc
            # An OSError (a storage hiccup) propagates uncached, so the next batch tries again.
            self._prepared[identity_hash] = cached
        if isinstance(cached, BaseException):
            raise cached
        return cached

    # -- generation --------------------------------------------------------------
    def check_batch(self, batch: Sequence[Mapping[str, Any]]) -> BatchKey:
        """Validate a batch; return its :class:`BatchKey`."""
        if not batch:
            raise ValueError("empty batch: give at least one examples row")
        keys = {BatchKey.of(row) for row in batch}
        if len(keys) > 1:
            raise ValueError(
                f"batch mixes settings {sorted(keys)}; one pipeline call needs one value of each of {BATCH_KEY} "
                "(group examples by actors.generator.BatchKey.of)"
            )
        key = keys.pop()
        if key.model != self.model:
            raise ValueError(f"batch is for model {key.model!r} but this worker loaded {self.model!r}")
        if self.steps is not None and key.steps != self.steps:
            raise ValueError(f"batch asks for {key.steps} steps but this worker loaded {self.model!r} for {self.steps}")
        ids = [row["example_id"] for row in batch]
        if len(set(ids)) != len(ids):
            raise ValueError("batch lists an example_id twice")
        return key

    def render(self, batch: Sequence[Mapping[str, Any]]) -> tuple[list[dict], dict[str, np.ndarray]]:
        """Generate a batch: ``(generations rows, {example_id: HxWx3 float array in [0, 1]})``.

        Images are written to the store before returning. Examples whose identity cannot be
        used (no face, missing photo) get a failed row; the others still run in one call.
        """
        key = self.check_batch(batch)
        with self._gpu:  # the previous batch's images may be stored meanwhile, in another thread
            rows, runnable, images, seconds, metadata = self._run_pipeline(key, batch)
        arrays: dict[str, np.ndarray] = {}
        for example, uri, image, meta in zip(runnable, self._store_images(runnable, images), images, metadata):
            arrays[example["example_id"]] = image
            rows[example["example_id"]] = self._row(example, status="ok", image_uri=uri, seconds=seconds,
                                                    metadata=meta)
        return [rows[example["example_id"]] for example in batch], arrays

    def _run_pipeline(self, key: BatchKey, batch: Sequence[Mapping[str, Any]]):
        """The GPU part of :meth:`render`: failed rows, the runnable examples, their images, seconds per image, metadata."""
        import torch

        if self.fail_oom_above_batch is not None and len(batch) > self.fail_oom_above_batch:
            raise torch.OutOfMemoryError(
                f"injected out-of-memory: batch of {len(batch)} > fail_oom_above_batch={self.fail_oom_above_batch}"
            )
        rows: dict[str, dict] = {}
        runnable, inputs = [], []
        for example in batch:
            try:
                inputs.append(self.identity(example["identity_hash"]))
                runnable.append(example)
            except (ValueError, LookupError, OSError) as exc:
                rows[example["example_id"]] = self._row(
                    example, status="failed", error=f"identity {example.get('identity_id')!r}: {exc}"
                )
        if not runnable:
            return rows, [], [], None, []
        started = time.perf_counter()
        output = self.pipe(
            [example["prompt"] for example in runnable],
            id_embeds=np.stack([identity.embedding for identity in inputs]),
            clip_states=torch.cat([identity.clip_states for identity in inputs]),
            preset=key.preset,
            ip_adapter_scale=key.ip_adapter_scale,
            lora_scale=key.lora_scale,
            seeds=[int(example["seed"]) for example in runnable],
            num_inference_steps=key.steps,
            height=key.height,
            width=key.width,
            output_type="np",
        )
        seconds = (time.perf_counter() - started) / len(runnable)
        return rows, runnable, list(np.asarray(output.images, dtype=np.float32)), seconds, list(output.metadata)

    def _store_image(self, example: Mapping[str, Any], image: np.ndarray) -> str:
        return self.store.write_image(example["run_id"], example["example_id"], encode_png(image))

    def _store_images(self, examples: Sequence[Mapping[str, Any]], images: Sequence[np.ndarray]) -> list[str]:
        """Encode and store the images (in parallel on the upload threads); return their URIs once ALL are stored.

        One failed write fails the batch (its error propagates) after the other writes ended.
        """
        if self._uploads is None:
            return [self._store_image(example, image) for example, image in zip(examples, images)]
        futures = [self._uploads.submit(self._store_image, example, image) for example, image in zip(examples, images)]
        wait(futures)
        return [future.result() for future in futures]

    def generate(self, batch: Sequence[Mapping[str, Any]]) -> list[dict]:
        """``generations`` rows for a batch of ``examples`` rows that share :data:`BATCH_KEY` (one pipeline call)."""
        return self.render(batch)[0]

    def render_text(self, batch: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Plain text-to-image renders for dataset synthesis: ``{key, image}`` (HxWx3 uint8) per ``{key, prompt, seed, size}``.

        With λ = 0 and the adapter's LoRA at 0 (load the pool with ``lora_scale=0``) the
        identity branch adds nothing, so this is the checkpoint's SDXL text-to-image and no
        second model is loaded. Rows of one call share ``size`` and run as one pipeline call.
        """
        import torch

        sizes = {int(row["size"]) for row in batch}
        if len(sizes) != 1:
            raise ValueError(f"one render call needs one size, got {sorted(sizes)}")
        size = sizes.pop()
        width = int(self.pipe.id_embedding_width)
        with self._gpu:
            null_states = self.pipe.null_clip_states()
            out = self.pipe(
                [row["prompt"] for row in batch], id_embeds=np.zeros((len(batch), width), np.float32),
                clip_states=torch.cat([null_states] * len(batch)), preset="baseline", ip_adapter_scale=0.0,
                lora_scale=0.0, seeds=[int(row["seed"]) for row in batch], num_inference_steps=self.steps,
                height=size, width=size, output_type="np",
            )
        images = (np.clip(np.asarray(out.images, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
        return [{"key": row["key"], "image": image, "worker": self.worker_id, "node": self.node}
                for row, image in zip(batch, images)]

    def _row(self, example: Mapping[str, Any], *, status: str, image_uri: str | None = None,
             seconds: float | None = None, error: str | None = None, metadata: Mapping | None = None) -> dict:
        """One ``generations`` row; ``metadata`` is the pipeline's per-image record (the resolved DCG and
        AM config the image was made with, UNet rows per step, seconds, device, dtype)."""
        return {
            "example_id": example["example_id"],
            "run_id": example["run_id"],
            "status": status,
            "image_uri": image_uri,
            "seconds": seconds,
            "device": self.device_name,
            "worker": self.worker_id,
            "node": self.node,
            "versions": self.versions,
            "metadata": None if metadata is None else json.dumps(dict(metadata), sort_keys=True, default=str),
            "error": error,
        }


def failed_generation_rows(batch: Sequence[Mapping[str, Any]], error: str, *, worker: str | None = None) -> list[dict]:
    """Failed ``generations`` rows for a batch that could not be generated at all."""
    return [
        {"example_id": e["example_id"], "run_id": e["run_id"], "status": "failed", "worker": worker, "error": error}
        for e in batch
    ]

"""Prefect flow ``build-dataset``: import or synthesise identities, build prompt sets, write them to the store.

Idempotent: photos are stored under their content hash, and a row is appended only when
the dataset run has no row with that id yet; running it twice adds nothing. Embedding
photos is a cached Prefect task keyed by the photos' content hashes and the backend,
so re-importing the same photos (even into another store) skips face detection.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace
from typing import Any

import numpy as np
from fastface.extras import require  # noqa: E402

require('prefect', 'ray', 'pyarrow', 'duckdb', needed_for='the evaluation flows')

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from evaluation.config import EvaluationConfig
from evaluation.dataset import Candidate, synthesise_identities
from evaluation.photos import _photo_hashes, gather_photos, identity_hash
from evaluation.retries import retry_transient
from fastface.faces import load_image_rgb
from fastface.faces.images import encode_png
from storage import Store, bytes_sha256

PHOTOS_DIR = "identity_photos"
DETECT_BATCH = 8  # images per face-analysis call


class DatasetPools:
    """The dataset flow's Ray pools, started on first use and closed with the flow: no model loads in the flow process.

    - face analysis (detection + embedding by ``face_backend``) on a pool of metric workers
      without metrics (:meth:`actors.scorer.MetricWorker.detect_faces`);
    - candidate renders of synthesis on a generator pool of the synthesis checkpoint with
      the adapter's LoRA at 0 (:meth:`actors.generator.GeneratorWorker.render_text`).
    """

    def __init__(self, config: EvaluationConfig, store: Store) -> None:
        self.config, self.store = config, store
        self._faces = None
        self._renderer = None
        self.backend: dict | None = None  # name, threshold, dim of the face backend (from the workers)

    def _pool_options(self):
        from actors.pool import PoolOptions

        ex = self.config.execution
        return PoolOptions(num_workers=ex.num_workers, cpus_per_worker=ex.cpus_per_worker)

    @property
    def faces(self):
        if self._faces is None:
            from actors.pool import ActorPool, WorkerSpec, connect_ray
            from actors.scorer import MetricWorker

            connect_ray(self.config.execution.ray_address)
            from actors.pool import PoolOptions

            # One CPU worker: a few hundred photos or candidates, and the GPUs stay free for the renderer pool
            # that works next to it during synthesis.
            spec = WorkerSpec(MetricWorker, "detect_faces", (self.store, []),
                              {"face_backend": self.config.face_backend, "device": "cpu"})
            options = PoolOptions(num_workers=1, cpus_per_worker=self.config.execution.cpus_per_worker, use_gpus=False)
            self._faces = ActorPool(spec, kind="faces", options=options)
        return self._faces

    def detect(self, images: list) -> list[list[SimpleNamespace]]:
        """Faces of each image (arrays or encoded bytes), in the backend's order: ``bbox``, ``area``, ``embedding``."""
        rows = [{"key": i, "image": image} for i, image in enumerate(images)]
        results = self.faces.map([rows[i:i + DETECT_BATCH] for i in range(0, len(rows), DETECT_BATCH)])
        if results:
            self.backend = {k: results[0][k] for k in ("backend", "threshold", "dim")}
        return [[SimpleNamespace(**face) for face in result["faces"]] for result in results]

    def backend_info(self) -> dict:
        if self.backend is None:
            self.backend = self.faces.map([[{"key": 0}]], method="face_backend_info")[0]
        return self.backend

    def render(self, candidates: list[Candidate]) -> list[np.ndarray]:
        """RGB uint8 renders of synthesis candidates, on the generator pool."""
        syn = self.config.dataset.synthesise
        if self._renderer is None:
            from actors.generator import GeneratorWorker
            from actors.pool import ActorPool, WorkerSpec, connect_ray
            from fastface.checkpoints import get_checkpoint
            from evaluation.sweep import pipeline_options

            connect_ray(self.config.execution.ray_address)
            checkpoint = get_checkpoint(syn.model)
            self._steps, self._size = checkpoint.resolve_steps(syn.steps), syn.size or checkpoint.size
            options = pipeline_options(self.config)
            kwargs = dict(options.worker_kwargs(), steps=self._steps, lora_scale=0.0)
            self._renderer = ActorPool(WorkerSpec(GeneratorWorker, "render_text", (self.store, syn.model), kwargs),
                                       kind="renderer", options=self._pool_options())
        rows = [{"key": c.id, "prompt": c.prompt, "seed": c.seed, "size": self._size} for c in candidates]
        size = self.config.execution.batch_size
        self.render_workers = getattr(self, "render_workers", set())
        results = self._renderer.map([rows[i:i + size] for i in range(0, len(rows), size)])
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


def _embed_cache_key(context: Any, parameters: dict) -> str:
    hashes = ",".join(h for p in parameters["photos"] for h in _photo_hashes(p) + ["|"])
    return "embed-" + hashlib.sha256(f"{parameters['backend']}|{hashes}".encode()).hexdigest()[:32]


@task(cache_key_fn=_embed_cache_key, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def embed_photos(photos: list[dict], backend: str, pools: DatasetPools) -> list[dict]:
    """Detect and embed each photo's most prominent face on the face pool; cached by the photos' content and the backend.

    Several photos of one person (``members``): every one needs a face; the embedding is their combination.
    """
    from fastface.faces.identity import combine_embeddings

    members = [photo.get("members") or [photo["data"]] for photo in photos]
    for photo, datas in zip(photos, members):  # a photo that cannot be decoded is named, not its byte count
        for data in datas:
            try:
                load_image_rgb(data)
            except ValueError as exc:
                where = photo["provenance"].get("file") or photo["id"]
                raise ValueError(f"identity photo {where} ({photo['provenance'].get('uri') or photo['id']}): "
                                 f"{str(exc).split(': ', 1)[-1]}") from None
    detected = iter(pools.detect([data for datas in members for data in datas]))
    out = []
    for datas in members:
        found = [next(detected) for _ in datas]
        faces = min(len(f) for f in found)
        embedding = None
        if faces:
            embedding = (np.asarray(found[0][0].embedding, np.float32) if len(datas) == 1
                         else combine_embeddings([f[0].embedding for f in found])).tolist()
        out.append({"faces": faces, "embedding": embedding, "threshold": pools.backend["threshold"]})
    return out


@task(cache_policy=NONE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def import_identities(root: str, dataset_run: str, photos: list[dict], embeddings: list[dict], backend: str,
                      max_identities: int | None = None) -> dict:
    """Copy photos into the store and append ``identities`` rows for those not yet recorded."""
    store = Store(root)
    existing = {r["identity_id"]: r for r in store.latest("identities", run_id=dataset_run).to_pylist()} \
        if dataset_run in store.run_ids("identities") else {}
    rows, skipped, counts = [], [], {"photos": len(photos), "no_face": 0, "multi_face": 0, "new": 0, "existing": 0}
    taken: set[str] = set(existing)
    for photo, emb in zip(photos, embeddings):
        digest = identity_hash(photo)
        if emb["faces"] == 0:
            counts["no_face"] += 1
            skipped.append({"identity": photo["id"], "reason": "no face" if not photo.get("members")
                            else "no face in at least one of its photos"})
            continue
        counts["multi_face"] += int(emb["faces"] > 1)  # kept: the most prominent face is used, as the authors do
        same = [i for i, r in existing.items() if r["content_hash"] == digest]
        if same:
            counts["existing"] += 1
            continue
        identity_id = photo["id"]
        if identity_id in taken:
            identity_id = f"{identity_id}-{digest[:8]}"
        taken.add(identity_id)
        stored = []
        for data, name in zip(photo.get("members") or [photo["data"]], photo.get("member_names") or [None]):
            suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
            key = f"{PHOTOS_DIR}/{bytes_sha256(data)}{suffix}"
            stored.append({"uri": store.uri(f"{store.root}/{key}") if store.exists(key) else store.write_bytes(key, data),
                           "content_hash": bytes_sha256(data), "file": name})
        provenance = dict(photo["provenance"], faces=emb["faces"])
        if photo.get("members"):  # the generator prepares the identity from all of them (actors/generator.py)
            provenance["photos"] = stored
        rows.append({
            "identity_id": identity_id, "gender": photo.get("gender"), "age": photo.get("age"),
            "ethnicity": photo.get("ethnicity"), "image_uri": stored[0]["uri"], "content_hash": digest,
            "face_backend": backend, "embedding": emb["embedding"], "provenance": provenance,
        })
    if max_identities is not None:
        rows = rows[: max(0, max_identities - len(existing))]
    if rows:
        store.append("identities", rows, dataset_run)
    counts["new"] = len(rows)
    return {"counts": counts, "skipped": skipped}


@task(cache_policy=NONE, retries=2, retry_condition_fn=retry_transient, retry_delay_seconds=5)
def import_prompts(root: str, dataset_run: str, prompts: list[dict]) -> dict:
    store = Store(root)
    have = store.list_ids("prompts", "prompt_id", run_id=dataset_run) if dataset_run in store.run_ids("prompts") else set()
    new = [p for p in prompts if p["prompt_id"] not in have]
    if new:
        store.append("prompts", new, dataset_run)
    return {"new": len(new), "existing": len(prompts) - len(new),
            "realistic": sum(p["kind"] == "realistic" for p in prompts),
            "stylistic": sum(p["kind"] == "stylistic" for p in prompts)}


@task(cache_policy=NONE, retries=1, retry_condition_fn=retry_transient)
def synthesise_task(config: EvaluationConfig, pools: DatasetPools) -> list[dict]:
    """Render candidates on the generator pool, detect and embed them on the face pool, filter; returns photos."""
    from fastface.faces import cosine_similarity

    syn = config.dataset.synthesise
    logger = get_run_logger()
    threshold = float(pools.backend_info()["threshold"])
    result = synthesise_identities(
        pools.render, None, cosine_similarity, threshold, detect_batch=pools.detect,
        genders=syn.genders, ages=syn.ages, ethnicities=syn.ethnicities, per_group=syn.per_group,
        max_rounds=syn.max_rounds, seed=syn.seed,
        on_round=lambda r, c: logger.info("synthesis round %d: %s", r, c),
    )
    create_table_artifact(
        key=f"{config.name}-synthesis".lower().replace("_", "-").replace(".", "-"),
        table=[{"outcome": k, "count": v} for k, v in result.counts.items()],
        description=f"Synthesised identities ({syn.model}, threshold {threshold:g}, "
                    f"{result.rounds} rounds). Tiny models render noise, so every candidate is faceless."
        if syn.model.startswith("tiny-") else f"Synthesised identities ({syn.model}).",
    )
    photos = []
    for members in result.accepted.values():
        for m in members:
            photos.append({"id": m["id"], "data": encode_png(m["image"]), "gender": m["gender"], "age": m["age"],
                           "ethnicity": m["ethnicity"],
                           "provenance": {"source": "synthesised", "model": syn.model, "prompt": m["prompt"],
                                          "seed": m["seed"], "threshold": threshold}})
    return photos


@flow(name="build-dataset", log_prints=True)
def build_dataset_flow(config: EvaluationConfig, root: str) -> dict:
    """Identities and prompts of ``config.dataset`` into ``root`` (run ``config.dataset_run``)."""
    pools = DatasetPools(config, Store(root))
    try:
        if config.weights == "rehearsal":  # no model: photos read or synthesised, embeddings from their hashes
            from evaluation.rehearsal import rehearsal_dataset, rehearsal_embeddings

            photos, prompts = rehearsal_dataset(config)
            embeddings = rehearsal_embeddings(photos, config.face_backend)
        else:
            photos, prompts = gather_photos(config, pools.detect)
            if config.dataset.synthesise is not None:
                photos += synthesise_task(config, pools)
            embeddings = embed_photos(photos, config.face_backend, pools) if photos else []
    finally:
        pools.close()
    identities = import_identities(root, config.dataset_run, photos, embeddings, config.face_backend,
                                   config.dataset.max_identities)
    prompt_counts = import_prompts(root, config.dataset_run, prompts)
    summary = {"identities": identities["counts"], "prompts": prompt_counts, "model_loads": pools.loads()}
    if getattr(pools, "render_workers", None):
        summary["render_workers"] = sorted(pools.render_workers)
    create_markdown_artifact(
        key=f"{config.name}-dataset".lower().replace("_", "-").replace(".", "-"),
        markdown="# Dataset\n\n```json\n" + json.dumps(summary, indent=2) + "\n```\n"
        + "".join(f"\n- skipped {s['identity']}: {s['reason']}" for s in identities["skipped"]),
        description=f"identities and prompts of run {config.dataset_run}",
    )
    return summary


__all__ = ["DatasetPools", "build_dataset_flow", "embed_photos", "import_identities", "import_prompts"]

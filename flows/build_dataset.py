"""Prefect flow ``build-dataset``: import or synthesise identities, build prompt sets, write them to the store.

Idempotent: photos are stored under their content hash, and a row is appended only when
the dataset run has no row with that id yet; running it twice adds nothing. Embedding
photos and finding the faces a source crops (``crop_faces``) are cached Prefect tasks keyed
by the photos' content and the backend, so re-importing the same photos (even into another
store) starts no face model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from fastface.extras import require  # noqa: E402

require('prefect', 'ray', 'pyarrow', 'duckdb', needed_for='the evaluation flows')

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from actors.dataset import DatasetPools
from evaluation.config import EvaluationConfig
from evaluation.dataset import synthesise_identities
from evaluation.photos import photo_content_hashes, gather_photos, identity_hash
from evaluation.retries import retry_transient
from evaluation.sweep import dataset_pools
from flows import artifact_key
from fastface.faces import load_image_rgb
from fastface.faces.images import encode_png, photo_hash
from storage import Store, bytes_sha256

PHOTOS_DIR = "identity_photos"


def _embed_cache_key(context: Any, parameters: dict) -> str:
    hashes = ",".join(h for p in parameters["photos"] for h in photo_content_hashes(p) + ["|"])
    return "embed-" + hashlib.sha256(f"{parameters['backend']}|{hashes}".encode()).hexdigest()[:32]


def _detect_cache_key(context: Any, parameters: dict) -> str:
    hashes = ",".join(photo_hash(image) for image in parameters["images"])
    return "detect-" + hashlib.sha256(f"{parameters['backend']}|{hashes}".encode()).hexdigest()[:32]


@task(cache_key_fn=_detect_cache_key, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def detect_faces(images: list[np.ndarray], backend: str, pools: DatasetPools) -> list[list]:
    """Faces of each image on the face pool (the photos a source crops, ``crop_faces``); cached by the
    images' pixels and the backend, so a re-run starts no face model for them."""
    return pools.detect(images)


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
        key=artifact_key(config.name, "synthesis"),
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
    pools = dataset_pools(config, Store(root))
    try:
        if config.weights == "rehearsal":  # no model: photos read or synthesised, embeddings from their hashes
            from evaluation.rehearsal import rehearsal_dataset, rehearsal_embeddings

            photos, prompts = rehearsal_dataset(config)
            embeddings = rehearsal_embeddings(photos, config.face_backend)
        else:
            photos, prompts = gather_photos(config, lambda images: detect_faces(images, config.face_backend, pools))
            if config.dataset.synthesise is not None:
                photos += synthesise_task(config, pools)
            embeddings = embed_photos(photos, config.face_backend, pools) if photos else []
    finally:
        pools.close()
    identities = import_identities(root, config.dataset_run, photos, embeddings, config.face_backend,
                                   config.dataset.max_identities)
    prompt_counts = import_prompts(root, config.dataset_run, prompts)
    summary = {"identities": identities["counts"], "prompts": prompt_counts, "model_loads": pools.loads()}
    if pools.render_workers:
        summary["render_workers"] = sorted(pools.render_workers)
    create_markdown_artifact(
        key=artifact_key(config.name, "dataset"),
        markdown="# Dataset\n\n```json\n" + json.dumps(summary, indent=2) + "\n```\n"
        + "".join(f"\n- skipped {s['identity']}: {s['reason']}" for s in identities["skipped"]),
        description=f"identities and prompts of run {config.dataset_run}",
    )
    return summary


__all__ = ["build_dataset_flow", "embed_photos", "import_identities", "import_prompts"]

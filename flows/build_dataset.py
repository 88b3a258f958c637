"""Prefect flow ``build-dataset``: import or synthesise identities, build prompt sets, write them to the store.

Idempotent: photos are stored under their content hash, and a row is appended only when
the dataset run has no row with that id yet; running it twice adds nothing. Embedding
photos is a cached Prefect task keyed by the photos' content hashes and the backend,
so re-importing the same photos (even into another store) skips face detection.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from fastface.extras import require  # noqa: E402

require('prefect', 'ray', 'pyarrow', 'duckdb', needed_for='the evaluation flows')

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from flows.config import EvaluationConfig, resolve_uri
from flows.dataset import (
    PHOTO_SUFFIXES,
    authors_layout,
    crop_face,
    curated_prompts,
    identity_name,
    limit_prompts,
    list_photos,
    parse_prompt_lines,
    synthesise_identities,
    text_to_image_renderer,
)
from flows.retries import retry_transient
from fastface.faces import load_image_rgb
from fastface.faces.images import encode_png
from storage import Store, bytes_sha256

PHOTOS_DIR = "identity_photos"


def _photo_hashes(photo: dict) -> list[str]:
    """Content hashes of an identity's photos (one, or the members of an identity folder)."""
    return [bytes_sha256(m) for m in photo.get("members") or [photo["data"]]]


def identity_hash(photo: dict) -> str:
    """The identity's content hash: its photo's, or for several photos the hash of their set (the identity cache key)."""
    from fastface.faces.identity import identity_set_hash

    hashes = _photo_hashes(photo)
    return hashes[0] if len(set(hashes)) == 1 else identity_set_hash(hashes)


def _embed_cache_key(context: Any, parameters: dict) -> str:
    hashes = ",".join(h for p in parameters["photos"] for h in _photo_hashes(p) + ["|"])
    return "embed-" + hashlib.sha256(f"{parameters['backend']}|{hashes}".encode()).hexdigest()[:32]


@task(cache_key_fn=_embed_cache_key, persist_result=True, retries=1, retry_condition_fn=retry_transient)
def embed_photos(photos: list[dict], backend: str) -> list[dict]:
    """Detect and embed each photo's most prominent face; cached by the photos' content and the backend."""
    from fastface.faces import get_face_backend

    from fastface.faces.identity import combine_embeddings

    face_backend = get_face_backend(backend)
    out = []
    for photo in photos:
        members = photo.get("members") or [photo["data"]]
        try:
            found = [face_backend.detect(load_image_rgb(data)) for data in members]
        except ValueError as exc:  # name the photo, not its byte count
            where = photo["provenance"].get("file") or photo["id"]
            raise ValueError(f"identity photo {where} ({photo['provenance'].get('uri') or photo['id']}): "
                             f"{str(exc).split(': ', 1)[-1]}") from None
        # Several photos of one person: every one needs a face; the embedding is their combination.
        faces = min(len(f) for f in found)
        embedding = None
        if faces:
            embedding = (np.asarray(found[0][0].embedding, np.float32) if len(members) == 1
                         else combine_embeddings([f[0].embedding for f in found])).tolist()
        out.append({"faces": faces, "embedding": embedding, "threshold": face_backend.same_person_threshold})
    return out


def gather_photos(config: EvaluationConfig, backend: str) -> tuple[list[dict], list[dict]]:
    """Photos to import (``{id, data, provenance, gender, age, ethnicity}``) and the prompts of files/inline lists."""
    base = config.base_dir
    data = config.dataset
    photos: list[dict] = []
    prompts: list[dict] = []
    if data.folder is not None:
        folder = resolve_uri(data.folder, base)
        paths, files = authors_layout(folder)
        for path in paths:
            photos.append({"id": identity_name(path.stem), "data": path.read_bytes(),
                           "provenance": {"source": "authors-layout", "folder": folder, "file": path.name}})
        for kind, path in files.items():
            rows = parse_prompt_lines(path.read_text(encoding="utf-8"))
            mismatched = [r["text"] for r in rows if r["kind"] != kind]
            if mismatched:
                raise ValueError(f"{path}: {len(mismatched)} prompt(s) are not {kind} "
                                 f"(stylistic prompts have ';'), e.g. {mismatched[0]!r}")
            prompts += rows
    face_backend = None
    for source in data.identities:
        uri = resolve_uri(source.uri, base)
        group = {"gender": source.gender, "age": source.age, "ethnicity": source.ethnicity}
        if source.identity_folders:  # one subfolder per identity, several photos each
            folders = sorted(p for p in Path(uri).iterdir() if p.is_dir() and not p.name.startswith("."))
            if not folders:
                raise ValueError(f"{source.uri}: identity_folders is set but the folder has no subfolders "
                                 "(one folder per identity, holding that person's photos)")
            for folder in folders:
                members = list_photos(folder)
                if not members:
                    raise ValueError(f"{folder}: no photos ({', '.join(PHOTO_SUFFIXES)})")
                datas = [p.read_bytes() for p in members]
                photos.append({"id": identity_name(folder.name), "data": datas[0], "members": datas,
                               "member_names": [p.name for p in members],
                               "provenance": {"source": "identity-folder", "uri": source.uri, "folder": folder.name},
                               **group})
            continue
        for path in list_photos(uri):
            raw = path.read_bytes()
            provenance = {"source": "photo", "uri": source.uri, "file": path.name}
            if source.crop_faces:
                if face_backend is None:
                    from fastface.faces import get_face_backend

                    face_backend = get_face_backend(backend)
                rgb = load_image_rgb(path)
                faces = sorted(face_backend.detect(rgb), key=lambda f: -f.area)[: source.crop_faces]
                for k, face in enumerate(faces):
                    photos.append({"id": identity_name(f"{path.stem}-face{k}"), "data": encode_png(crop_face(rgb, face.bbox)),
                                   "provenance": dict(provenance, crop_of_face=k, bbox=[float(v) for v in face.bbox]),
                                   **group})
            else:
                photos.append({"id": identity_name(path.stem), "data": raw, "provenance": provenance, **group})
    for uri in data.prompt_files:
        prompts += parse_prompt_lines(Path(resolve_uri(uri, base)).read_text(encoding="utf-8"))
    prompts += parse_prompt_lines("\n".join(data.prompts))
    if data.realistic_prompts or data.stylistic_prompts:
        prompts += curated_prompts(data.realistic_prompts or 0, data.stylistic_prompts or 0)
    unique: dict[str, dict] = {}
    for row in prompts:
        unique.setdefault(row["prompt_id"], row)
    return photos, limit_prompts(list(unique.values()), data.max_prompts)


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
def synthesise_task(config: EvaluationConfig) -> list[dict]:
    """Render and filter synthetic identities; returns photos ready for import."""
    from fastface.faces import get_face_backend

    syn = config.dataset.synthesise
    logger = get_run_logger()
    backend = get_face_backend(config.face_backend)
    render = text_to_image_renderer(syn.model, steps=syn.steps, size=syn.size, cache_dir=config.execution.cache_dir,
                                    device=config.execution.device, dtype=config.execution.dtype)
    result = synthesise_identities(
        render, backend.detect, backend.similarity, backend.same_person_threshold,
        genders=syn.genders, ages=syn.ages, ethnicities=syn.ethnicities, per_group=syn.per_group,
        max_rounds=syn.max_rounds, seed=syn.seed,
        on_round=lambda r, c: logger.info("synthesis round %d: %s", r, c),
    )
    create_table_artifact(
        key=f"{config.name}-synthesis".lower().replace("_", "-").replace(".", "-"),
        table=[{"outcome": k, "count": v} for k, v in result.counts.items()],
        description=f"Synthesised identities ({syn.model}, threshold {backend.same_person_threshold:g}, "
                    f"{result.rounds} rounds). Tiny models render noise, so every candidate is faceless."
        if syn.model.startswith("tiny-") else f"Synthesised identities ({syn.model}).",
    )
    photos = []
    for members in result.accepted.values():
        for m in members:
            photos.append({"id": m["id"], "data": encode_png(m["image"]), "gender": m["gender"], "age": m["age"],
                           "ethnicity": m["ethnicity"],
                           "provenance": {"source": "synthesised", "model": syn.model, "prompt": m["prompt"],
                                          "seed": m["seed"], "threshold": backend.same_person_threshold}})
    return photos


@flow(name="build-dataset", log_prints=True)
def build_dataset_flow(config: EvaluationConfig, root: str) -> dict:
    """Identities and prompts of ``config.dataset`` into ``root`` (run ``config.dataset_run``)."""
    photos, prompts = gather_photos(config, config.face_backend)
    if config.dataset.synthesise is not None:
        photos += synthesise_task(config)
    embeddings = embed_photos(photos, config.face_backend) if photos else []
    identities = import_identities(root, config.dataset_run, photos, embeddings, config.face_backend,
                                   config.dataset.max_identities)
    prompt_counts = import_prompts(root, config.dataset_run, prompts)
    summary = {"identities": identities["counts"], "prompts": prompt_counts}
    create_markdown_artifact(
        key=f"{config.name}-dataset".lower().replace("_", "-").replace(".", "-"),
        markdown="# Dataset\n\n```json\n" + json.dumps(summary, indent=2) + "\n```\n"
        + "".join(f"\n- skipped {s['identity']}: {s['reason']}" for s in identities["skipped"]),
        description=f"identities and prompts of run {config.dataset_run}",
    )
    return summary


__all__ = ["build_dataset_flow", "embed_photos", "gather_photos", "import_identities", "import_prompts"]

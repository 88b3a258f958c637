"""The dataset of a rehearsal (``weights: rehearsal``), made without any model.

The config's photos and prompt files are read as a real run reads them (``crop_faces: n``
cuts n fixed boxes instead of detected faces); ``dataset.synthesise`` and a
``dataset.folder`` that is not on this machine (the authors' data does not ship) are stood
in for by synthetic identities — small PNGs, one per identity, ``per_group`` per gender ×
age group, 54 by default, as many as the authors release — and, for the folder, the curated
prompt lists with the authors' counts (80 realistic, 40 stylistic). Every identity gets an
embedding derived from its photo's hash (:func:`actors.rehearsal.rehearsal_embedding`), so
the rows the dataset flow stores have the shape a real import gives them.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from evaluation.config import EvaluationConfig, SynthesisConfig, _exists, resolve_uri
from evaluation.dataset import curated_prompts, limit_prompts, plan_candidates

AUTHORS_PROMPTS = {"realistic": 80, "stylistic": 40}
"""Prompt counts of the authors' release (prompts_nostyle.txt, prompts_style.txt)."""
PHOTO_SIDE = 16


def rehearsal_faces(images: list) -> list[list[SimpleNamespace]]:
    """Stand-in face detection for ``crop_faces``: four fixed boxes per image, largest first."""
    out = []
    for image in images:
        h, w = np.asarray(image).shape[:2]
        boxes = [(0, 0, w / 2, h / 2), (w / 2, 0, w, h / 2), (0, h / 2, w / 2, h), (w / 2, h / 2, w, h)]
        out.append([SimpleNamespace(bbox=b, area=(b[2] - b[0]) * (b[3] - b[1]) * (1 - 0.01 * k))
                    for k, b in enumerate(boxes)])
    return out


def synthetic_photos(synthesis: SynthesisConfig, source: str) -> list[dict]:
    """One small PNG per identity of every gender × age group (``per_group`` each), ready for import."""
    from fastface.faces.images import encode_png
    from evaluation.dataset import group_name

    photos = []
    for gender in synthesis.genders:
        for age in synthesis.ages:
            for candidate in plan_candidates((gender, age), 0, synthesis.per_group, synthesis.ethnicities,
                                             synthesis.seed):
                rng = np.random.default_rng(candidate.seed)
                image = rng.integers(0, 256, (PHOTO_SIDE, PHOTO_SIDE, 3), dtype=np.uint8)
                photos.append({
                    "id": candidate.id.replace("syn-", "rehearsal-", 1), "data": encode_png(image), "gender": gender,
                    "age": age, "ethnicity": candidate.ethnicity,
                    "provenance": {"source": source, "group": group_name(gender, age), "seed": candidate.seed},
                })
    return photos


def rehearsal_dataset(config: EvaluationConfig) -> tuple[list[dict], list[dict]]:
    """Photos to import and prompts of a rehearsal, as :func:`evaluation.photos.gather_photos` returns them."""
    from evaluation.photos import gather_photos

    data = config.dataset
    folder_missing = data.folder is not None and not _exists(resolve_uri(data.folder, config.base_dir))
    readable = config
    if folder_missing:
        readable = config.model_copy(update={"dataset": data.model_copy(update={"folder": None})})
    photos, prompts = gather_photos(readable, rehearsal_faces)
    if folder_missing:
        photos += synthetic_photos(SynthesisConfig(), "rehearsal: stand-in for dataset.folder")
        have = {row["prompt_id"] for row in prompts}
        prompts += [row for row in curated_prompts(AUTHORS_PROMPTS["realistic"], AUTHORS_PROMPTS["stylistic"])
                    if row["prompt_id"] not in have]
        prompts = limit_prompts(prompts, data.max_prompts)
    if data.synthesise is not None:
        photos += synthetic_photos(data.synthesise, "rehearsal: stand-in for dataset.synthesise")
    return photos, prompts


def rehearsal_embeddings(photos: list[dict], face_backend: str) -> list[dict]:
    """What :func:`flows.build_dataset.embed_photos` returns, without a face model: one face per photo."""
    from actors.rehearsal import rehearsal_embedding
    from fastface.face_backends import FACE_BACKENDS
    from evaluation.photos import identity_hash

    backend = FACE_BACKENDS.get(face_backend)
    dim = int(backend.embedding_dim)
    threshold = float(backend.default_threshold)
    return [{"faces": 1, "embedding": rehearsal_embedding(identity_hash(p), dim).tolist(), "threshold": threshold}
            for p in photos]


def identity_rows_of(photos: list[dict], max_identities: int | None = None) -> list[dict]:
    """``identities``-shaped rows (id, content hash) the import would give photos that all have a face:
    what ``evaluate --plan`` plans with before the dataset is built."""
    from evaluation.photos import identity_hash

    rows, taken, hashes = [], set(), set()
    for photo in photos:
        digest = identity_hash(photo)
        if digest in hashes:  # the import keeps one identity per photo content
            continue
        hashes.add(digest)
        identity_id = photo["id"] if photo["id"] not in taken else f"{photo['id']}-{digest[:8]}"
        taken.add(identity_id)
        rows.append({"identity_id": identity_id, "content_hash": digest})
    return rows[:max_identities] if max_identities is not None else rows


__all__ = ["AUTHORS_PROMPTS", "identity_rows_of", "rehearsal_dataset", "rehearsal_embeddings", "rehearsal_faces",
           "synthetic_photos"]

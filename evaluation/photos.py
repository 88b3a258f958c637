"""The photos and prompts a dataset config names, gathered from disk, and the identity hash of a photo
set: what the dataset flow imports (flows/build_dataset.py) and a rehearsal stands in for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.config import EvaluationConfig, resolve_uri
from evaluation.dataset import (
    PHOTO_SUFFIXES,
    authors_layout,
    crop_face,
    curated_prompts,
    identity_name,
    limit_prompts,
    list_photos,
    parse_prompt_lines,
)
from fastface.faces import load_image_rgb
from fastface.faces.images import encode_png
from storage import bytes_sha256


def photo_content_hashes(photo: dict) -> list[str]:
    """Content hashes of an identity's photos (one, or the members of an identity folder)."""
    return [bytes_sha256(m) for m in photo.get("members") or [photo["data"]]]


def identity_hash(photo: dict) -> str:
    """The identity's content hash: its photo's, or for several photos the hash of their set (the identity cache key)."""
    from fastface.faces.identity import identity_set_hash

    hashes = photo_content_hashes(photo)
    return hashes[0] if len(set(hashes)) == 1 else identity_set_hash(hashes)


def gather_photos(config: EvaluationConfig, detect: Any) -> tuple[list[dict], list[dict]]:
    """Photos to import (``{id, data, provenance, gender, age, ethnicity}``) and the prompts of files/inline lists.

    ``detect(images)`` returns each image's faces (``bbox``, ``area``); it is called only for
    sources with ``crop_faces`` (a :class:`actors.dataset.DatasetPools`' ``detect``, so no model loads here).
    """
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
                rgb = load_image_rgb(raw)
                faces = sorted(detect([rgb])[0], key=lambda f: -f.area)[: source.crop_faces]
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


__all__ = ["gather_photos", "identity_hash"]

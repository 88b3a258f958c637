"""Dataset logic of the ``build-dataset`` flow (flows/build_dataset.py; method-spec §6): identities and prompts.

Two ways in:

- **import**: the authors' released layout (``id_photos/*.png``, ``prompts_nostyle.txt``,
  ``prompts_style.txt``) or any photos / folders / prompt files. Each photo is copied
  into the store (``identity_photos/<sha256>.<ext>``), embedded by the face backend and
  recorded with its provenance; group photos can be cut into one identity per face.
- **synthesise**: a text-to-image checkpoint renders candidate faces per gender × age
  group across ethnicities; faceless and multi-face candidates are dropped, and within
  each group the identity most similar to the others is discarded while its mean
  similarity exceeds the backend's threshold (:func:`filter_similar_identities`), with
  replacements rendered up to a round limit (:func:`synthesise_identities`).

The pure logic (prompt parsing, the similarity filter, the synthesis loop) takes plain
values and callables, so it is tested without Prefect, models or a store.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUTHORS_PHOTOS = "id_photos"
AUTHORS_PROMPT_FILES = {"realistic": "prompts_nostyle.txt", "stylistic": "prompts_style.txt"}

# Curated lists for prompt sets (method-spec §6: a stylistic prompt is "<style>; person <location> <action>").
STYLES = (
    "oil painting", "watercolor painting", "pencil sketch", "anime illustration", "pixar style 3d render",
    "pop art", "cubist painting", "ukiyo-e woodblock print", "charcoal drawing", "comic book panel",
    "stained glass", "impressionist painting", "cyberpunk digital art", "art nouveau poster", "low poly render",
    "claymation", "renaissance fresco", "graffiti mural", "vaporwave art", "pointillism",
)
LOCATIONS = (
    "in a park", "on a city street", "in a library", "at the beach", "in a kitchen", "on a mountain trail",
    "in a cafe", "at a train station", "in a garden", "in an office", "on a bridge", "in a forest",
    "at a market", "in a museum", "on a rooftop", "in a snowy village", "by a lake", "in a desert",
)
ACTIONS = (
    "reading a book", "drinking coffee", "riding a bicycle", "playing guitar", "holding an umbrella",
    "taking a photo", "walking a dog", "eating an ice cream", "painting on a canvas", "talking on the phone",
    "wearing a hat", "smiling at the camera", "carrying a backpack", "looking at the sky", "writing in a notebook",
)
IDENTITY_PROMPT = (
    "a high quality close-up portrait photo of a {age} {ethnicity} {gender}, looking at the camera, "
    "neutral background, natural light"
)


# -- prompts ------------------------------------------------------------------------------
def prompt_row(text: str) -> dict:
    """A ``prompts`` row: lower-cased text, kind stylistic iff it has ``;``, style = the part before ``;``."""
    text = " ".join(str(text).split()).lower()
    if not text:
        raise ValueError("empty prompt")
    stylistic = ";" in text
    return {
        "prompt_id": "p-" + hashlib.sha256(text.encode()).hexdigest()[:16],
        "text": text,
        "kind": "stylistic" if stylistic else "realistic",
        "style": text.split(";", 1)[0].strip() if stylistic else None,
    }


def parse_prompt_lines(text: str) -> list[dict]:
    """``prompts`` rows of a prompt file: one prompt a line; blank lines and ``#`` comments skipped; deduplicated."""
    rows: dict[str, dict] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            row = prompt_row(line)
            rows.setdefault(row["prompt_id"], row)
    return list(rows.values())


def curated_prompts(realistic: int, stylistic: int, *, seed: int = 0) -> list[dict]:
    """Prompt sets from the curated lists: ``"person <location> <action>"`` and ``"<style>; person <location> <action>"``."""
    rng = random.Random(seed)
    scenes = [(loc, act) for loc in LOCATIONS for act in ACTIONS]
    rng.shuffle(scenes)
    if realistic + stylistic > len(scenes):
        raise ValueError(f"at most {len(scenes)} curated prompts; asked for {realistic + stylistic}")
    out = [prompt_row(f"a photo of a person {loc} {act}") for loc, act in scenes[:realistic]]
    for i, (loc, act) in enumerate(scenes[realistic: realistic + stylistic]):
        out.append(prompt_row(f"{STYLES[(i + rng.randrange(len(STYLES))) % len(STYLES)]}; person {loc} {act}"))
    return out


def limit_prompts(rows: Sequence[dict], per_kind: int | None) -> list[dict]:
    if per_kind is None:
        return list(rows)
    counts: dict[str, int] = {}
    out = []
    for row in rows:
        if counts.get(row["kind"], 0) < per_kind:
            counts[row["kind"]] = counts.get(row["kind"], 0) + 1
            out.append(row)
    return out


# -- photos -------------------------------------------------------------------------------
def list_photos(path: str | Path) -> list[Path]:
    """A photo file, or the photos of a folder (sorted by name)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a photo nor a folder")
    return sorted(p for p in path.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))


def authors_layout(folder: str | Path) -> tuple[list[Path], dict[str, Path]]:
    """Photos and prompt files of a folder in the authors' released layout; raises naming what is missing."""
    folder = Path(folder)
    photos_dir = folder / AUTHORS_PHOTOS
    if not photos_dir.is_dir():
        raise FileNotFoundError(f"{folder} has no {AUTHORS_PHOTOS}/ folder (the authors' layout: "
                                f"{AUTHORS_PHOTOS}/*.png, {', '.join(AUTHORS_PROMPT_FILES.values())})")
    files = {kind: folder / name for kind, name in AUTHORS_PROMPT_FILES.items() if (folder / name).is_file()}
    if not files:
        raise FileNotFoundError(f"{folder} has none of {', '.join(AUTHORS_PROMPT_FILES.values())}")
    return list_photos(photos_dir), files


def identity_name(stem: str) -> str:
    """An identity id from a file name: letters, digits, '.', '_' and '-' only."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "identity"
    return name if name[0].isalnum() else "id-" + name


def crop_face(rgb: np.ndarray, bbox: Sequence[float], *, margin: float = 0.6, min_size: int = 256) -> np.ndarray:
    """A square crop around a face box with ``margin`` × box size on each side, upscaled to ``min_size``.

    Small faces of group photos are upscaled so a detector that needs ~80 px faces finds them again.
    """
    from PIL import Image

    x1, y1, x2, y2 = (float(v) for v in bbox)
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    h, w = rgb.shape[:2]
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(w, cx + side / 2)), int(min(h, cy + side / 2))
    crop = rgb[top:bottom, left:right]
    if min(crop.shape[:2]) < min_size:
        scale = min_size / min(crop.shape[:2])
        size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.BICUBIC))
    return np.ascontiguousarray(crop)


# -- the similarity filter (method-spec §6) --------------------------------------------------
@dataclass
class FilterResult:
    kept: dict[str, list[str]]
    discarded: list[dict] = field(default_factory=list)  # {group, id, mean_similarity, round}


def mean_similarities(ids: Sequence[str], embeddings: Mapping[str, Any], similarity_fn: Callable) -> dict[str, float]:
    """``1/(n−1) Σ_{j≠i} sim(c_i, c_j)`` for each identity of a group."""
    n = len(ids)
    if n < 2:
        return {i: float("-inf") for i in ids}
    sims = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            sims[a, b] = sims[b, a] = float(similarity_fn(embeddings[ids[a]], embeddings[ids[b]]))
    return {ids[a]: float(sims[a].sum() / (n - 1)) for a in range(n)}


def filter_similar_identities(
    embeddings_by_group: Mapping[str, Mapping[str, Any]],
    similarity_fn: Callable[[Any, Any], float],
    threshold: float,
) -> FilterResult:
    """Within each group, discard the identity with the largest mean similarity while it exceeds ``threshold``.

    Method-spec §6. ``embeddings_by_group``: group → {identity id → embedding}; ties go to
    the identity listed later (the newer candidate), so earlier identities are kept.
    """
    result = FilterResult(kept={})
    for group, embeddings in embeddings_by_group.items():
        ids = list(embeddings)
        step = 0
        while len(ids) > 1:
            means = mean_similarities(ids, embeddings, similarity_fn)
            worst = max(reversed(ids), key=lambda i: means[i])  # reversed: ties → the later one
            if means[worst] <= threshold:
                break
            result.discarded.append({"group": group, "id": worst, "mean_similarity": means[worst], "step": step})
            ids.remove(worst)
            step += 1
        result.kept[group] = ids
    return result


# -- synthesis --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    id: str
    group: str
    gender: str
    age: str
    ethnicity: str
    prompt: str
    seed: int


@dataclass
class SynthesisResult:
    accepted: dict[str, list[dict]]  # group → [{candidate fields, image (array), embedding}]
    counts: dict[str, int]  # rendered, no_face, multi_face, similar, accepted
    discarded: list[dict]
    rounds: int


def group_name(gender: str, age: str) -> str:
    return f"{gender}/{age}"


def plan_candidates(group: tuple[str, str], start: int, count: int, ethnicities: Sequence[str], seed: int) -> list[Candidate]:
    """``count`` candidates of one gender × age group, ethnicities spread round-robin."""
    gender, age = group
    out = []
    for k in range(start, start + count):
        ethnicity = ethnicities[k % len(ethnicities)]
        cand_seed = int.from_bytes(hashlib.sha256(f"{seed}/{gender}/{age}/{k}".encode()).digest()[:4], "big")
        out.append(Candidate(
            id=identity_name(f"syn-{gender}-{age}-{k:03d}"), group=group_name(gender, age), gender=gender, age=age,
            ethnicity=ethnicity, prompt=IDENTITY_PROMPT.format(age=age, ethnicity=ethnicity, gender=gender),
            seed=cand_seed,
        ))
    return out


def synthesise_identities(
    render: Callable[[Sequence[Candidate]], Sequence[np.ndarray]],
    detect: Callable[[np.ndarray], Sequence[Any]] | None,
    similarity_fn: Callable[[Any, Any], float],
    threshold: float,
    *,
    detect_batch: Callable[[Sequence[np.ndarray]], Sequence[Sequence[Any]]] | None = None,
    genders: Sequence[str],
    ages: Sequence[str],
    ethnicities: Sequence[str],
    per_group: int,
    max_rounds: int,
    seed: int = 0,
    on_round: Callable[[int, dict], None] | None = None,
) -> SynthesisResult:
    """Render candidates until every gender × age group holds ``per_group`` dissimilar identities, or rounds run out.

    ``render(candidates)`` returns one RGB array per candidate; ``detect(image)`` the faces
    found (objects with ``.embedding``), or ``detect_batch(images)`` the faces of each image of a
    round in one call (a pool of face workers). Candidates with no face or more than one face are
    dropped (counted); each round then applies :func:`filter_similar_identities` to each group.
    """
    groups = [(g, a) for g in genders for a in ages]
    members: dict[str, dict[str, dict]] = {group_name(*g): {} for g in groups}
    next_index = {group_name(*g): 0 for g in groups}
    counts = {"rendered": 0, "no_face": 0, "multi_face": 0, "similar": 0, "accepted": 0}
    discarded: list[dict] = []
    rounds = 0
    for round_ in range(max_rounds):
        wanted = [(g, per_group - len(members[group_name(*g)])) for g in groups]
        wanted = [(g, n) for g, n in wanted if n > 0]
        if not wanted:
            break
        rounds += 1
        candidates = []
        for g, n in wanted:
            name = group_name(*g)
            candidates += plan_candidates(g, next_index[name], n, ethnicities, seed)
            next_index[name] += n
        images = list(render(candidates))
        counts["rendered"] += len(candidates)
        found = list(detect_batch(images)) if detect_batch is not None else [detect(image) for image in images]
        for candidate, image, faces in zip(candidates, images, found):
            faces = list(faces)
            if not faces:
                counts["no_face"] += 1
                discarded.append({"group": candidate.group, "id": candidate.id, "reason": "no face", "round": round_})
            elif len(faces) > 1:
                counts["multi_face"] += 1
                discarded.append({"group": candidate.group, "id": candidate.id, "reason": "several faces", "round": round_})
            else:
                members[candidate.group][candidate.id] = {
                    **candidate.__dict__, "image": image, "embedding": np.asarray(faces[0].embedding, np.float32),
                }
        filtered = filter_similar_identities(
            {g: {i: m["embedding"] for i, m in ms.items()} for g, ms in members.items()}, similarity_fn, threshold
        )
        for entry in filtered.discarded:
            counts["similar"] += 1
            del members[entry["group"]][entry["id"]]
            discarded.append({**entry, "reason": "too similar", "round": round_})
        if on_round is not None:
            on_round(round_, dict(counts))
    accepted = {g: list(ms.values()) for g, ms in members.items()}
    counts["accepted"] = sum(len(v) for v in accepted.values())
    return SynthesisResult(accepted=accepted, counts=counts, discarded=discarded, rounds=rounds)


__all__ = [
    "ACTIONS", "AUTHORS_PROMPT_FILES", "Candidate", "FilterResult", "IDENTITY_PROMPT", "LOCATIONS", "STYLES",
    "SynthesisResult", "authors_layout", "crop_face", "curated_prompts", "filter_similar_identities",
    "list_photos", "mean_similarities", "parse_prompt_lines", "plan_candidates", "prompt_row",
    "synthesise_identities",
]

"""evaluation/dataset.py and the dataset flow's tasks: prompts, the authors' layout importer, the similarity
filter on real dlib embeddings of the photos in the insightface wheel, and synthesis with injected faces."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from evaluation.dataset import (
    crop_face,
    curated_prompts,
    filter_similar_identities,
    parse_prompt_lines,
    prompt_row,
    synthesise_identities,
)
from metrics_fixtures import dlib_backend, group_photo, hanks, noise_image  # noqa: F401  (fixtures)
from storage import Store, bytes_sha256


def test_prompt_rows_kind_style_and_case():
    row = prompt_row("  Oil Painting;  Person in a PARK  reading ")
    assert row["text"] == "oil painting; person in a park reading"
    assert row["kind"] == "stylistic" and row["style"] == "oil painting"
    assert prompt_row("A photo of a person")["kind"] == "realistic" and prompt_row("a photo")["style"] is None
    rows = parse_prompt_lines("# comment\na photo\n\nA PHOTO\nwatercolor; person x\n")
    assert [r["text"] for r in rows] == ["a photo", "watercolor; person x"]  # deduplicated after lower-casing
    curated = curated_prompts(5, 3, seed=1)
    assert [r["kind"] for r in curated] == ["realistic"] * 5 + ["stylistic"] * 3
    assert all(r["text"].split("; ", 1)[1].startswith("person ") for r in curated[5:])
    assert curated == curated_prompts(5, 3, seed=1) and len({r["prompt_id"] for r in curated}) == 8


@pytest.fixture(scope="module")
def t1_faces(dlib_backend, group_photo):  # noqa: F811
    faces = dlib_backend.detect(group_photo)
    assert len(faces) == 6, "the six people of t1.jpg"
    return faces


@pytest.fixture(scope="module")
def embeddings(dlib_backend, hanks, group_photo, t1_faces):  # noqa: F811
    """Real dlib embeddings: the six people of t1.jpg, Tom Hanks, and near-duplicates (mirrored, rescaled copies)."""
    def embed(rgb):
        found = dlib_backend.detect(rgb)
        assert found
        return found[0].embedding

    def mirrored_rescaled(rgb):
        image = Image.fromarray(rgb[:, ::-1])
        return np.asarray(image.resize((int(image.width * 1.3), int(image.height * 1.3)), Image.BICUBIC))

    out = {f"t1-{k}": face.embedding for k, face in enumerate(t1_faces)}
    out["hanks"] = embed(hanks)
    out["hanks-copy"] = embed(mirrored_rescaled(hanks))
    face0 = crop_face(group_photo, t1_faces[0].bbox)
    out["t1-0-copy"] = embed(mirrored_rescaled(face0))
    out["t1-0-copy2"] = embed(np.asarray(Image.fromarray(face0).rotate(5, resample=Image.BICUBIC)))
    return out


def test_filter_removes_near_duplicates_and_keeps_distinct_people(dlib_backend, embeddings):  # noqa: F811
    threshold = dlib_backend.same_person_threshold
    assert threshold == 0.93  # dlib's own, not buffalo_l's 0.3
    groups = {
        "t1": {f"t1-{k}": embeddings[f"t1-{k}"] for k in range(6)},  # six different people
        "hanks": {"hanks": embeddings["hanks"], "hanks-copy": embeddings["hanks-copy"]},
        "mixed": {k: embeddings[k] for k in ("t1-0", "t1-1", "t1-0-copy", "t1-0-copy2")},
    }
    result = filter_similar_identities(groups, dlib_backend.similarity, threshold)
    assert result.kept["t1"] == [f"t1-{k}" for k in range(6)]  # distinct people all stay
    assert result.kept["hanks"] == ["hanks"]  # the copy, listed later, goes
    first_mixed = next(d for d in result.discarded if d["group"] == "mixed")
    assert first_mixed["id"] in ("t1-0", "t1-0-copy", "t1-0-copy2") and first_mixed["mean_similarity"] > threshold
    assert "t1-1" in result.kept["mixed"] and len(result.kept["mixed"]) == 3
    # The same filter with buffalo_l's 0.3 on dlib embeddings would wipe out distinct people.
    wrong = filter_similar_identities({"t1": groups["t1"]}, dlib_backend.similarity, 0.3)
    assert len(wrong.kept["t1"]) == 1


def test_synthesis_drops_faceless_and_multi_face_and_replaces_duplicates():
    """Injected renderer and detector: candidate k of each group gets a scripted outcome."""
    rng = np.random.default_rng(0)
    people = {}

    def render(candidates):
        return [np.full((4, 4, 3), i, np.uint8) for i in range(len(candidates))], candidates

    rendered = []

    def render_fn(candidates):
        images, _ = render(candidates)
        rendered.extend(candidates)
        for c, image in zip(candidates, images):
            people[id(image)] = c
        return images

    def detect(image):
        c = people[id(image)]
        index = int(c.id.rsplit("-", 1)[1])
        if index == 0:
            return []  # faceless
        if index == 1:
            return [SimpleNamespace(embedding=np.ones(8)), SimpleNamespace(embedding=np.ones(8))]
        if index == 3:  # a look-alike of candidate 2
            return [SimpleNamespace(embedding=np.eye(8)[2] + 0.01)]
        return [SimpleNamespace(embedding=np.eye(8)[index % 8] + 0.001 * rng.normal(size=8))]

    def cosine(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    result = synthesise_identities(render_fn, detect, cosine, 0.3, genders=("woman", "man"), ages=("young",),
                                   ethnicities=("a", "b", "c"), per_group=3, max_rounds=4, seed=0)
    assert result.counts["no_face"] == 2 and result.counts["multi_face"] == 2 and result.counts["similar"] == 2
    for group, members in result.accepted.items():
        ids = [m["id"] for m in members]
        assert len(ids) == 3 and not any(i.endswith(("-000", "-001")) for i in ids)
        assert sum(i.endswith(("-002", "-003")) for i in ids) == 1  # one of the look-alike pair survives
        assert [m["ethnicity"] for m in members] != [members[0]["ethnicity"]] * 3  # spread over ethnicities
    assert result.rounds == 3 and result.counts["accepted"] == 6
    # Tiny models render noise: nothing is accepted, every candidate is counted faceless, rounds run out.
    none = synthesise_identities(lambda cs: [np.zeros((4, 4, 3), np.uint8)] * len(cs), lambda im: [], cosine, 0.3,
                                 genders=("woman",), ages=("old",), ethnicities=("a",), per_group=2, max_rounds=3)
    assert none.counts == {"rendered": 6, "no_face": 6, "multi_face": 0, "similar": 0, "accepted": 0}


class InProcessFaces:
    """What actors.dataset.DatasetPools does on its face pool (MetricWorker.detect_faces), in this process."""

    def __init__(self, root):
        from actors.scorer import MetricWorker

        self.worker = MetricWorker(Store(str(root)), [], face_backend="dlib")
        self.backend = None

    def detect(self, images):
        results = self.worker.detect_faces([{"key": i, "image": image} for i, image in enumerate(images)])
        self.backend = {k: results[0][k] for k in ("backend", "threshold", "dim")}
        return [[SimpleNamespace(**face) for face in result["faces"]] for result in results]


def test_importer_reads_the_authors_layout(tmp_path, dlib_backend, hanks, group_photo, t1_faces):  # noqa: F811
    from evaluation.photos import gather_photos
    from flows.build_dataset import embed_photos, import_identities, import_prompts
    from evaluation.config import config_from_dict

    data = tmp_path / "authors"
    (data / "id_photos").mkdir(parents=True)
    Image.fromarray(hanks).save(data / "id_photos" / "0001.png")
    Image.fromarray(crop_face(group_photo, t1_faces[2].bbox)).save(data / "id_photos" / "0002.png")
    Image.fromarray(noise_image(1, (120, 120))).save(data / "id_photos" / "0003.png")  # no face: counted, skipped
    (data / "prompts_nostyle.txt").write_text("A photo of a person in a park\nA photo of a person at a cafe\n")
    (data / "prompts_style.txt").write_text("Oil painting; person in a park reading\n")
    config = config_from_dict({
        "name": "authors", "weights": "tiny", "face_backend": "dlib", "dataset": {"folder": str(data)},
        "sweep": {"models": ["tiny-hyper"], "sets": [{"prompts": "joint", "presets": ["am1"]}], "steps": 2},
    })
    faces = InProcessFaces(tmp_path / "faces")
    photos, prompts = gather_photos(config, faces.detect)
    assert [p["id"] for p in photos] == ["0001", "0002", "0003"]
    assert sorted((p["kind"], p["text"]) for p in prompts) == [
        ("realistic", "a photo of a person at a cafe"), ("realistic", "a photo of a person in a park"),
        ("stylistic", "oil painting; person in a park reading")]
    embedded = embed_photos.fn(photos, "dlib", faces)
    assert [e["faces"] for e in embedded] == [1, 1, 0]
    assert embedded[0]["threshold"] == dlib_backend.same_person_threshold
    # The same pixels (PNG is lossless) through the same float32 dlib code in this process: bit-identical.
    np.testing.assert_array_equal(np.float32(embedded[0]["embedding"]), dlib_backend.detect(hanks)[0].embedding)
    root = str(tmp_path / "store")
    result = import_identities.fn(root, config.dataset_run, photos, embedded, "dlib")
    assert result["counts"]["new"] == 2 and result["counts"]["no_face"] == 1
    assert import_prompts.fn(root, config.dataset_run, prompts)["new"] == 3
    store = Store(root)
    rows = {r["identity_id"]: r for r in store.read("identities").to_pylist()}
    assert set(rows) == {"0001", "0002"}
    hanks_row = rows["0001"]
    assert hanks_row["content_hash"] == bytes_sha256((data / "id_photos" / "0001.png").read_bytes())
    assert store.read_bytes(hanks_row["image_uri"]) == (data / "id_photos" / "0001.png").read_bytes()  # copied in
    assert hanks_row["face_backend"] == "dlib" and len(hanks_row["embedding"]) == 128
    assert '"authors-layout"' in hanks_row["provenance"] and hanks_row["gender"] is None
    style = store.read("prompts").to_pylist()
    assert {r["style"] for r in style if r["kind"] == "stylistic"} == {"oil painting"}
    # Importing again adds nothing.
    assert import_identities.fn(root, config.dataset_run, photos, embedded, "dlib")["counts"]["new"] == 0
    assert import_prompts.fn(root, config.dataset_run, prompts)["new"] == 0
    assert store.read("identities").num_rows == 2 and store.read("prompts").num_rows == 3


def test_synthesis_renders_on_the_pools_and_the_flow_process_loads_no_model(
    prefect_server, ray_cluster, fastface_cache, tmp_path, monkeypatch  # noqa: F811
):
    """A synthesis config on tiny weights: candidates render on a generator-pool actor, faces are found on a
    face-pool actor, and this (the flow's) process builds no pipeline and no face backend."""
    from fastface.faces import DlibFaceBackend, InsightFaceBackend
    from fastface.pipeline import FastFacePipeline
    from flows.build_dataset import build_dataset_flow
    from evaluation.config import config_from_dict

    loads: list[str] = []

    def counted(name, original):
        def load(*args, **kwargs):
            loads.append(name)
            return original(*args, **kwargs)
        return load

    monkeypatch.setattr(FastFacePipeline, "from_pretrained",
                        classmethod(counted("pipeline", FastFacePipeline.from_pretrained.__func__)))
    monkeypatch.setattr(DlibFaceBackend, "__init__", counted("dlib", DlibFaceBackend.__init__))
    monkeypatch.setattr(InsightFaceBackend, "__init__", counted("insightface", InsightFaceBackend.__init__))
    config = config_from_dict({
        "name": "synth", "weights": "tiny", "face_backend": "dlib",
        "dataset": {"prompts": ["a photo of a person"],
                    "synthesise": {"model": "tiny-hyper", "steps": 2, "size": 32, "per_group": 2,
                                   "genders": ["woman"], "ages": ["young"], "ethnicities": ["a", "b"],
                                   "max_rounds": 1}},
        "sweep": {"models": ["tiny-hyper"], "sets": [{"prompts": "joint", "presets": ["am1"]}], "steps": 2},
        "execution": {"cache_dir": str(fastface_cache), "num_workers": 1},
    })
    summary = build_dataset_flow(config, str(tmp_path / "store"))
    assert loads == []  # no model in the flow process
    assert summary["model_loads"] == {"faces": 1, "renderer": 1}  # one actor each, models loaded once there
    assert len(summary["render_workers"]) == 1 and summary["render_workers"][0].startswith("fastface-renderer-")
    assert summary["prompts"]["new"] == 1
    # Tiny models render noise: both candidates were rendered and found faceless (on the face pool).
    from prefect.artifacts import Artifact

    table = {row["outcome"]: row["count"] for row in json.loads(Artifact.get("synth-synthesis").data)}
    assert table["rendered"] == 2 and table["no_face"] == 2 and table["accepted"] == 0

"""Identities given by several photos: combined embedding, CLIP crop from the best photo, cache keyed on the set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from metrics_fixtures import dlib_backend, sample_photo  # noqa: F401  (dlib_backend: fixture)
from noise import DISTINCT, tolerance


def mean_of_normalised(embeddings, dtype=np.float32):
    """The combined embedding computed here, in ``dtype`` (float64: the reference of tests/noise.py)."""
    rows = [np.asarray(e, dtype=dtype) for e in embeddings]
    return np.mean([e / np.linalg.norm(e) for e in rows], axis=0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three photos of Tom Hanks with different bytes: the original, a mirror, and an enlarged copy."""
    folder = tmp_path_factory.mktemp("hanks")
    original = sample_photo("Tom_Hanks_54745.png")
    with Image.open(original) as image:
        image = image.convert("RGB")
        image.transpose(Image.FLIP_LEFT_RIGHT).save(folder / "mirror.png")
        image.resize((image.width * 2, image.height * 2), Image.BICUBIC).save(folder / "large.png")
    return {"original": original, "mirror": folder / "mirror.png", "large": folder / "large.png"}


@pytest.fixture(scope="module")
def backend(dlib_backend):
    return dlib_backend


def test_several_photos_average_their_embeddings_and_take_the_largest_face_crop(photos, backend, tmp_path):
    from fastface.faces import prepare_identity

    cache = tmp_path / "identities"
    single = {name: prepare_identity(path, backend, cache_dir=cache) for name, path in photos.items()}
    both = prepare_identity([photos["original"], photos["large"]], backend, cache_dir=cache)
    members = [single["original"].embedding, single["large"].embedding]
    expected = mean_of_normalised(members)
    # two float32 paths of one mean: within its noise floor |float32 − float64| (tests/noise.py)
    tol = tolerance(expected, mean_of_normalised(members, np.float64))
    assert np.abs(both.embedding - expected).max() <= tol
    assert np.abs(both.embedding - single["original"].embedding).max() > DISTINCT * tol
    # The enlarged copy has the larger face box, so its aligned crop feeds CLIP.
    np.testing.assert_array_equal(both.crop_bgr, single["large"].crop_bgr)
    np.testing.assert_array_equal(both.bbox, single["large"].bbox)
    assert both.photos == tuple(sorted((single["original"].content_hash, single["large"].content_hash)))


def test_the_identity_cache_keys_on_the_set_of_photos(photos, backend, tmp_path):
    from fastface.faces import prepare_identity
    from fastface.cache import identity_entries

    cache = tmp_path / "identities"
    ab = prepare_identity([photos["original"], photos["mirror"]], backend, cache_dir=cache)
    ba = prepare_identity([photos["mirror"], photos["original"]], backend, cache_dir=cache)
    ac = prepare_identity([photos["original"], photos["large"]], backend, cache_dir=cache)
    one = prepare_identity(photos["original"], backend, cache_dir=cache)
    assert ab.content_hash == ba.content_hash  # a set: order does not matter
    np.testing.assert_array_equal(ab.embedding, ba.embedding)
    assert len({ab.content_hash, ac.content_hash, one.content_hash}) == 3  # another set is another identity
    singles = {name: prepare_identity(photos[name], backend, cache_dir=cache).embedding for name in photos}
    tol = max(tolerance(mean_of_normalised([singles["original"], other]),
                        mean_of_normalised([singles["original"], other], np.float64))
              for other in (singles["mirror"], singles["large"]))
    assert np.abs(ab.embedding - ac.embedding).max() > DISTINCT * tol  # by far more than their noise floors
    for identity in (ab, ac):
        files = identity_entries(cache, identity.content_hash)
        assert [f.name for f in files] == [f"{identity.content_hash}.dlib.face.npz"]
    # A cached set is read back, not recombined: corrupt-free round trip equals the fresh result.
    again = prepare_identity([photos["large"], photos["original"]], backend, cache_dir=cache)
    np.testing.assert_array_equal(again.embedding, ac.embedding)
    np.testing.assert_array_equal(again.crop_bgr, ac.crop_bgr)


def test_generate_with_repeated_face(photos, tmp_path):
    from fastface.cache import identities_dir
    from fastface.cli import main
    from fastface.faces import get_face_backend, prepare_identity

    out = tmp_path / "out.png"
    code = main(["generate", "--model", "tiny-hyper", "--preset", "baseline", "--face", str(photos["original"]),
                 "--face", str(photos["mirror"]), "--prompt", "a photo of a person", "--size", "32", "--out", str(out)])
    assert code == 0 and out.is_file()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["face"] == [str(photos["original"]), str(photos["mirror"])]
    combined = prepare_identity([photos["original"], photos["mirror"]], get_face_backend("dlib"),
                                cache_dir=identities_dir())
    assert sidecar["face_content_hash"] == combined.content_hash


def test_dataset_import_of_identity_folders_and_the_generator_uses_all_photos(photos, backend, tmp_path):
    import shutil
    from types import SimpleNamespace

    from actors.generator import GeneratorWorker
    from evaluation.photos import gather_photos
    from flows.build_dataset import embed_photos, import_identities
    from evaluation.config import config_from_dict
    from fastface.faces import prepare_identity
    from storage import Store

    people = tmp_path / "people"
    (people / "hanks").mkdir(parents=True)
    shutil.copy(photos["original"], people / "hanks" / "a.png")
    shutil.copy(photos["large"], people / "hanks" / "b.png")
    (people / "hanks-mirror").mkdir()
    shutil.copy(photos["mirror"], people / "hanks-mirror" / "only.png")
    config = config_from_dict({
        "name": "multi", "weights": "tiny", "face_backend": "dlib",
        "dataset": {"identities": [{"uri": str(people), "identity_folders": True}], "prompts": ["a photo of a person"]},
        "sweep": {"models": ["tiny-hyper"], "sets": [{"prompts": "realistic", "presets": ["am1"]}]},
    })
    from test_flows_dataset import InProcessFaces

    faces = InProcessFaces(tmp_path / "faces")  # what the dataset flow's face pool does, in this process
    gathered, _ = gather_photos(config, faces.detect)
    assert [p["id"] for p in gathered] == ["hanks", "hanks-mirror"] and len(gathered[0]["members"]) == 2
    embeddings = embed_photos.fn(gathered, "dlib", faces)
    store = Store(str(tmp_path / "store"))
    import_identities.fn(str(tmp_path / "store"), "multi-dataset", gathered, embeddings, "dlib")
    rows = {r["identity_id"]: r for r in store.read("identities").to_pylist()}
    expected = prepare_identity([photos["original"], photos["large"]], backend, cache_dir=tmp_path / "c")
    assert rows["hanks"]["content_hash"] == expected.content_hash
    # the flow's path to the same mean: within its noise floor |float32 − float64| (tests/noise.py)
    members = [prepare_identity(photos[name], backend, cache_dir=tmp_path / "c").embedding
               for name in ("original", "large")]
    tol = tolerance(expected.embedding, mean_of_normalised(members, np.float64))
    assert np.abs(np.asarray(rows["hanks"]["embedding"]) - expected.embedding).max() <= tol
    assert len(json.loads(rows["hanks"]["provenance"])["photos"]) == 2
    assert len(json.loads(rows["hanks-mirror"]["provenance"])["photos"]) == 1  # a one-photo folder: a plain identity
    assert rows["hanks-mirror"]["content_hash"] == prepare_identity(photos["mirror"], backend, cache_dir=tmp_path / "c").content_hash
    # Importing again adds nothing (the identity is keyed by the set of its photos).
    assert import_identities.fn(str(tmp_path / "store"), "multi-dataset", gathered, embeddings, "dlib")["counts"]["new"] == 0

    # The generator prepares the identity from all its photos (a stand-in pipeline: only identities are used).
    pipe = SimpleNamespace(set_progress_bar_config=lambda **_: None, id_embedding_width=128,
                           image_encoder=None, feature_extractor=None)
    worker = GeneratorWorker(store, "tiny-hyper", pipeline_factory=lambda *a, **k: pipe,
                             identity_cache_dir=tmp_path / "worker-cache")
    prepared = worker.identity(expected.content_hash)
    assert prepared.content_hash == expected.content_hash and len(prepared.photos) == 2
    np.testing.assert_array_equal(prepared.crop_bgr, expected.crop_bgr)

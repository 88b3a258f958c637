"""dlib backend on the real photos shipped in the insightface wheel (offline, real weights from PyPI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastface.faces import (
    DLIB_COSINE_THRESHOLD,
    NoFaceError,
    aligned_face_crop_bgr,
    compare_faces,
    get_face_backend,
    largest_face,
    most_prominent_face,
)
from fastface.faces.dlib_backend import kps_from_68_landmarks

from noise import float32_tolerance

pytest.importorskip("dlib")


def _insightface_image(name: str) -> Path:
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("insightface (which ships the sample photos) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / name
    if not path.is_file():
        pytest.skip(f"sample photo {name} is not in this insightface wheel")
    return path


@pytest.fixture(scope="module")
def backend():
    return get_face_backend("dlib")


@pytest.fixture(scope="module")
def hanks_path():
    return _insightface_image("Tom_Hanks_54745.png")


@pytest.fixture(scope="module")
def hanks(backend, hanks_path):
    return most_prominent_face(hanks_path, backend)


@pytest.fixture(scope="module")
def hanks_mirrored_rescaled(hanks_path):
    image = Image.open(hanks_path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((image.width * 3 // 2, image.height * 3 // 2), Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def group_faces(backend):
    return backend.detect(_insightface_image("t1.jpg"))


def test_registry(backend):
    from fastface.faces import FaceBackend
    from fastface.registry import UnknownNameError

    assert isinstance(backend, FaceBackend)
    with pytest.raises(UnknownNameError, match="dlib, insightface"):
        get_face_backend("retinaface")


def test_declared_measure(backend):
    assert (backend.name, backend.embedding_dim, backend.similarity_measure) == ("dlib", 128, "cosine")
    assert backend.same_person_threshold == DLIB_COSINE_THRESHOLD
    # Not buffalo_l's 0.3: different people have dlib cosine ~0.8-0.9 (method-spec §6).
    assert 0.85 < backend.same_person_threshold < 0.98


def test_face_record(hanks):
    assert hanks.bbox.dtype == np.float32 and hanks.bbox.shape == (4,)
    assert hanks.embedding.shape == (128,)
    # Normalised in float32 (dlib has no float64 path): its norm is a sum of 128 float32 squares, one rounding each.
    norm = np.linalg.norm(hanks.embedding.astype(np.float64))
    assert abs(norm - 1.0) <= float32_tolerance(1.0, ops=hanks.embedding.size)
    assert hanks.kps.shape == (5, 2) and hanks.kps.dtype == np.float32
    left_eye, right_eye, nose, mouth_left, mouth_right = hanks.kps
    # insightface's order: image-left eye first, eyes above nose above mouth.
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    x1, y1, x2, y2 = hanks.bbox
    assert all(x1 - 5 <= x <= x2 + 5 and y1 - 5 <= y <= y2 + 5 for x, y in hanks.kps)


def test_same_person_mirrored_and_rescaled(backend, hanks, hanks_mirrored_rescaled):
    other = most_prominent_face(hanks_mirrored_rescaled, backend)
    similarity = backend.similarity(hanks.embedding, other.embedding)
    assert similarity > 0.95, similarity
    assert backend.is_same_person(hanks.embedding, other.embedding)
    result = compare_faces(_insightface_image("Tom_Hanks_54745.png"), hanks_mirrored_rescaled, backend)
    assert result["same_person"] is True and result["measure"] == "cosine"
    # The same pixels through the same float32 dlib code and float64 cosine in this process: bit-identical.
    assert result["similarity"] == similarity
    assert result["threshold"] == backend.same_person_threshold


def test_six_other_people_are_different(backend, hanks, group_faces):
    assert len(group_faces) == 6
    scores = [face.det_score for face in group_faces]
    assert scores == sorted(scores, reverse=True)  # most prominent (highest score) first
    similarities = [backend.similarity(hanks.embedding, face.embedding) for face in group_faces]
    assert not any(backend.is_same_person(hanks.embedding, face.embedding) for face in group_faces), similarities
    # Different people still look "similar" in raw cosine terms: why 0.3 would be wrong for dlib.
    assert min(similarities) > 0.3
    # And they are different from one another.
    for i, a in enumerate(group_faces):
        for b in group_faces[i + 1 :]:
            assert not backend.is_same_person(a.embedding, b.embedding)


def test_largest_face(group_faces):
    largest = largest_face(group_faces)
    assert largest.area == max(face.area for face in group_faces)
    with pytest.raises(NoFaceError, match="no face found in crowd.jpg"):
        largest_face([], source="crowd.jpg")


def test_noise_has_no_face_after_upsampling(backend, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    assert backend.detect(noise) == []
    assert backend.upsamples_tried == [0, 1, 2]
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path)
    with pytest.raises(NoFaceError) as info:
        most_prominent_face(path, backend)
    assert str(info.value) == f"no face found in {path}"


def test_upsampling_retry_finds_small_face(backend, hanks_path):
    small = Image.open(hanks_path).convert("RGB").resize((50, 50), Image.Resampling.BICUBIC)
    canvas = np.full((100, 100, 3), 127, np.uint8)
    canvas[25:75, 25:75] = np.asarray(small)
    faces = backend.detect(canvas)
    assert len(faces) == 1 and backend.upsamples_tried[-1] > 0
    assert backend.upsamples_tried[0] == 0


def test_aligned_crop_is_bgr_norm_crop(group_faces):
    from insightface.utils import face_align

    rgb = np.asarray(Image.open(_insightface_image("t1.jpg")).convert("RGB"))  # a colour photo
    face = group_faces[0]
    crop = aligned_face_crop_bgr(rgb, face)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    expected = face_align.norm_crop(np.ascontiguousarray(rgb[:, :, ::-1]), landmark=face.kps, image_size=224)
    np.testing.assert_array_equal(crop, expected)
    assert not np.array_equal(crop, expected[:, :, ::-1])  # really BGR, not RGB
    # The crop is centred on the face: its middle is not the zero border of norm_crop.
    assert crop[80:144, 80:144].mean() > 40


def test_each_group_face_matches_its_mirrored_rescaled_copy(backend, group_faces):
    """The genuine side of the calibration: every person of t1.jpg against a flipped, 1.5x copy of their region."""
    photo = Image.open(_insightface_image("t1.jpg")).convert("RGB")
    for face in group_faces:
        x1, y1, x2, y2 = (float(v) for v in face.bbox)
        margin = 0.6 * (x2 - x1)
        region = photo.crop((int(x1 - margin), int(y1 - margin), int(x2 + margin), int(y2 + margin)))
        region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        region = region.resize((region.width * 3 // 2, region.height * 3 // 2), Image.Resampling.BICUBIC)
        copy = most_prominent_face(region, backend)
        assert backend.is_same_person(face.embedding, copy.embedding)


def test_kps_from_68_landmarks():
    points = np.zeros((68, 2), np.float32)
    points[36:42] = [10, 20]
    points[42:48] = [30, 20]
    points[30] = [20, 30]
    points[48], points[54] = [12, 40], [28, 40]
    # Means of equal integers: exact.
    np.testing.assert_array_equal(kps_from_68_landmarks(points), [[10, 20], [30, 20], [20, 30], [12, 40], [28, 40]])

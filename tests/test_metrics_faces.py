"""ID, FFC and face size on real photos with the offline dlib backend."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from metrics_fixtures import dlib_backend, group_photo, hanks, noise_image  # noqa: F401  (fixtures)

from fastface.metrics.base import MetricInput


@pytest.fixture(scope="module")
def faces(dlib_backend):
    from fastface.metrics.common import FaceAnalysis

    return FaceAnalysis(dlib_backend)


@pytest.fixture(scope="module")
def hanks_copy(hanks) -> np.ndarray:
    """Mirrored and rescaled: the same person in different pixels."""
    return np.asarray(Image.fromarray(hanks[:, ::-1]).resize((150, 150), Image.BICUBIC))


def test_id_is_higher_for_the_same_person_than_for_everyone_in_t1(faces, hanks, hanks_copy, group_photo):
    from fastface.metrics.identity import IdentitySimilarity

    others = faces.detect(group_photo)
    assert len(others) == 6
    inputs = [MetricInput(image=hanks_copy, source_image=hanks)]
    inputs += [MetricInput(image=hanks_copy, source_embedding=face.embedding) for face in others]
    results = IdentitySimilarity(faces).score(inputs)
    same, different = results[0].value, [r.value for r in results[1:]]
    assert same > max(different)
    assert same > faces.backend.same_person_threshold > max(different)
    assert results[0].detail["face_found"] and results[0].detail["measure"] == "cosine"


def test_noise_counts_in_ffc_and_is_excluded_from_the_id_mean(faces, hanks, hanks_copy):
    from fastface.metrics.runner import score_images, summarize

    inputs = [
        MetricInput(image=hanks_copy, source_image=hanks, key="copy"),
        MetricInput(image=noise_image(0), source_image=hanks, key="noise"),
    ]
    rows = score_images(inputs, ["id", "ffc"], faces=faces, progress=False)
    by = {(r["key"], r["metric"]): r for r in rows}
    assert by["noise", "id"]["value"] is None and by["noise", "id"]["detail"]["face_found"] is False
    assert by["noise", "id"]["error"] is None
    assert by["noise", "ffc"]["value"] == 1.0 and by["copy", "ffc"]["value"] == 0.0
    summary = summarize(rows)
    assert summary["ffc"]["value"] == 1.0 and summary["ffc"]["aggregate"] == "sum"
    assert summary["id"]["value"] == by["copy", "id"]["value"]  # the mean of one value: exact
    assert summary["id"]["n"] == 1 and summary["id"]["none"] == 1


def test_face_size_ratio_grows_for_a_tighter_crop(faces, group_photo):
    from fastface.metrics.identity import FaceSizeRatio

    x1, y1, x2, y2 = (int(v) for v in faces.detect(group_photo)[0].bbox)
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2

    def around(half: int) -> np.ndarray:
        return group_photo[max(0, cy - half): cy + half, max(0, cx - half): cx + half]

    loose, tight = FaceSizeRatio(faces).score([MetricInput(image=around(200)), MetricInput(image=around(100))])
    assert 0 < loose.value < tight.value < 1
    full = FaceSizeRatio(faces).score([MetricInput(image=group_photo)])[0]
    assert 0 < full.value < loose.value
    assert FaceSizeRatio(faces).score([MetricInput(image=noise_image(1))])[0].value is None


def test_face_size_ratio_clips_boxes_to_the_image():
    from fastface.metrics.identity import face_size_ratio

    # Integer corners: the same float64 products and quotient as the formulas here, so exact.
    assert face_size_ratio(np.array([-10, -10, 50, 50]), 100, 100) == 50 * 50 / 10000 == 0.25
    assert face_size_ratio(np.array([10, 10, 30, 60]), 100, 200) == 20 * 50 / 20000


def test_id_source_errors_are_per_image(faces, hanks_copy, hanks):
    from fastface.metrics.identity import IdentitySimilarity

    results = IdentitySimilarity(faces).score([
        MetricInput(image=hanks_copy),  # no source at all
        MetricInput(image=hanks_copy, source_embedding=np.ones(512, np.float32)),  # another backend's size
        MetricInput(image=hanks_copy, source_image=noise_image(2)),  # source without a face
        MetricInput(image=hanks_copy, source_image=hanks),
    ])
    assert "source_embedding or source_image" in results[0].error
    assert "512" in results[1].error
    assert "no face" in results[2].error
    assert results[3].error is None and results[3].value > 0.9


def test_detections_are_cached_by_content(faces, hanks):
    calls = []

    class Counting:
        name, embedding_dim = "counting", 128

        def detect(self, image):
            calls.append(1)
            return faces.backend.detect(image)

    from fastface.metrics.common import FaceAnalysis

    analysis = FaceAnalysis(Counting(), cache_size=2)
    analysis.detect(hanks)
    analysis.detect(hanks.copy())  # same pixels, another array
    assert len(calls) == 1
    analysis.detect(hanks[:, ::-1].copy())
    assert len(calls) == 2

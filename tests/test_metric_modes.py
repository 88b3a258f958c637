"""The authors' metric modes (FSC and face size), checked against their formulas written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics_fixtures import tiny_clip, tiny_clip_dir  # noqa: F401  (fixtures)
from noise import to_float64, tolerance

from fastface.faces.base import Face
from fastface.metrics.base import MetricInput
from fastface.metrics.common import FaceAnalysis

# OpenAI CLIP's normalisation constants (what the authors' CLIP preprocessing ends with).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class FixedFaces:
    """A face backend that returns fixed boxes (largest last, so "largest" ≠ "first")."""

    name = "fixed"
    embedding_dim = 4
    same_person_threshold = 0.5

    def __init__(self, boxes):
        self.boxes = [np.asarray(b, dtype=np.float32) for b in boxes]

    def detect(self, image):
        return [Face(bbox=b, kps=None, det_score=0.9 - 0.1 * i, embedding=np.ones(4, np.float32) / 2)
                for i, b in enumerate(self.boxes)]


def test_fsc_authors_mode_equals_their_formula_by_hand(tiny_clip):
    from fastface.metrics.clip_score import FaceStyleScore

    size = tiny_clip.image_size[0]
    assert tuple(tiny_clip.preprocess_cfg["mean"]) == OPENAI_MEAN  # the same literals: exact
    image = np.random.default_rng(7).integers(0, 256, (96, 80, 3), dtype=np.uint8)
    small, large = (2.5, 3.5, 14.0, 15.0), (10.9, 20.3, 10.9 + size + 0.8, 20.3 + size + 0.6)
    faces = FaceAnalysis(FixedFaces([small, large]))
    prompt = "ukiyo-e woodblock print; person on a bridge"
    [result] = FaceStyleScore(tiny_clip, faces, "authors").score([MetricInput(image=image, prompt=prompt)])

    # By hand: the largest box, corners cut with int() (x 10..10+size, y 20..20+size: exactly CLIP's input
    # size, so their resize and centre crop change nothing), the 0-255 values put through
    # Normalize(mean=-1, std=2) -> (v + 1) / 2, then CLIP's (x - mean) / std.
    crop = image[20:20 + size, 10:10 + size].astype(np.float64)
    assert crop.shape[:2] == (size, size)
    x = (crop + 1.0) / 2.0
    x = (x - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)
    pixels = torch.from_numpy(x).permute(2, 0, 1).unsqueeze(0).float()
    assert pixels.min() > 0 and pixels.max() > 400  # saturated, as the paper's FSC saw it
    tokens = tiny_clip.tokenizer(["ukiyo-e woodblock print"])
    model64 = to_float64(tiny_clip.model)
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(
            tiny_clip.model.encode_image(pixels), tiny_clip.model.encode_text(tokens)).item()
        expected64 = torch.nn.functional.cosine_similarity(
            model64.encode_image(pixels.double()), model64.encode_text(tokens)).item()
    # Ours and the hand-made chain: two float32 paths, within the floor of the float64 rerun (tests/noise.py).
    assert abs(result.value - expected) <= tolerance(expected, expected64)
    assert result.detail["crop"] == "box" and result.detail["style"] == "ukiyo-e woodblock print"


def test_face_size_authors_mode_keeps_the_raw_box_and_zero_without_face():
    from fastface.metrics.identity import FaceSizeRatio

    image = np.zeros((100, 200, 3), np.uint8)
    cut = (-20.0, 50.0, 60.0, 130.0)  # a face cut by the left and bottom borders
    ours, = FaceSizeRatio(FaceAnalysis(FixedFaces([cut])), "clipped").score([MetricInput(image=image)])
    theirs, = FaceSizeRatio(FaceAnalysis(FixedFaces([cut])), "authors").score([MetricInput(image=image)])
    # Integer corners: the same float64 products and quotient as the formulas here, so exact.
    assert ours.value == 60 * 50 / 20000
    assert theirs.value == 80 * 80 / 20000  # (x2 - x1)(y2 - y1) / (H W), unclipped
    none_ours, = FaceSizeRatio(FaceAnalysis(FixedFaces([])), "clipped").score([MetricInput(image=image)])
    none_theirs, = FaceSizeRatio(FaceAnalysis(FixedFaces([])), "authors").score([MetricInput(image=image)])
    assert none_ours.value is None and none_theirs.value == 0.0
    with pytest.raises(ValueError, match="face_size_mode"):
        FaceSizeRatio(FaceAnalysis(FixedFaces([])), "mtcnn")


class _SizedDetector:
    """An SCRFD stand-in that finds a face only at the sizes given (records the sizes it was asked for)."""

    def __init__(self, finds_at):
        self.finds_at, self.asked = set(finds_at), []

    def detect(self, bgr, input_size, max_num=0, metric="default"):
        self.asked.append(input_size[0])
        if input_size[0] in self.finds_at:
            return np.array([[10, 10, 50, 60, 0.9]], np.float32), np.zeros((1, 5, 2), np.float32)
        return np.zeros((0, 5), np.float32), None


class _Recognizer:
    def get(self, bgr, record):
        record.embedding = np.ones(8, np.float32)


def test_face_size_authors_mode_detects_at_320_only_with_insightface():
    pytest.importorskip("insightface")
    from fastface.faces import InsightFaceBackend
    from fastface.metrics.identity import FaceSizeRatio

    image = np.zeros((100, 100, 3), np.uint8)
    detector = _SizedDetector(finds_at={640})  # a face at 640² that 320² misses
    backend = InsightFaceBackend(detector=detector, recognizer=_Recognizer())
    ours, = FaceSizeRatio(FaceAnalysis(backend), "clipped").score([MetricInput(image=image)])
    assert ours.value == 40 * 50 / 10000 and detector.asked == [640]  # integer corners: exact
    detector.asked.clear()
    theirs, = FaceSizeRatio(FaceAnalysis(backend), "authors").score([MetricInput(image=image)])
    assert detector.asked == [320] and theirs.value == 0.0


def test_paper_config_uses_the_authors_modes():
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper.yaml").read_text())
    assert data["metrics"]["fsc_mode"] == "authors" and data["metrics"]["face_size_mode"] == "authors"
    from evaluation.config import MetricsConfig

    assert MetricsConfig().face_size_mode == "clipped" and MetricsConfig().fsc_mode == "aligned"

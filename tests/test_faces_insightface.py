"""insightface backend without downloads: tiny ONNX models loaded through insightface's own model zoo."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fastface.faces import InsightFaceBackend, NoFaceError, get_face_backend, load_face_analysis, most_prominent_face
from fastface.faces.insightface_backend import DEFAULT_DET_SIZES, onnx_providers

from noise import DISTINCT, float32_tolerance, tolerance

pytest.importorskip("insightface")


def _save(graph: onnx.GraphProto, path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_tiny_arcface(path, seed: int = 0, dim: int = 512) -> None:
    """ArcFace-shaped recognition model: [1, 3, 112, 112] -> [1, dim], random weights."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((3 * 14 * 14, dim)).astype(np.float32), "fc_weight")
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc_weight"], ["fc1"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, dim])],
        initializer=[weight],
    )
    _save(graph, path)


def write_tiny_scrfd(path, seed: int = 0) -> None:
    """SCRFD-shaped detector (9 outputs: scores, boxes, kps at strides 8/16/32, 2 anchors) that never fires."""
    rng = np.random.default_rng(seed)
    nodes, initializers, outputs = [], [], []
    widths = {"score": 1, "bbox": 4, "kps": 10}
    for kind, width in widths.items():
        for stride in (8, 16, 32):
            tag = f"{kind}_{stride}"
            channels = 2 * width
            initializers += [
                numpy_helper.from_array(rng.standard_normal((channels, 3, 1, 1)).astype(np.float32) * 0.01, f"w_{tag}"),
                numpy_helper.from_array(np.full(channels, -20.0 if kind == "score" else 1.0, np.float32), f"b_{tag}"),
                numpy_helper.from_array(np.array([-1, width], np.int64), f"shape_{tag}"),
            ]
            out = tag if kind != "score" else f"logit_{tag}"
            nodes += [
                helper.make_node("AveragePool", ["input.1"], [f"p_{tag}"], kernel_shape=[stride] * 2, strides=[stride] * 2),
                helper.make_node("Conv", [f"p_{tag}", f"w_{tag}", f"b_{tag}"], [f"c_{tag}"]),
                helper.make_node("Transpose", [f"c_{tag}"], [f"t_{tag}"], perm=[0, 2, 3, 1]),
                helper.make_node("Reshape", [f"t_{tag}", f"shape_{tag}"], [out]),
            ]
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [out], [tag]))
            outputs.append(helper.make_tensor_value_info(tag, TensorProto.FLOAT, [f"n{stride}", width]))
    graph = helper.make_graph(
        nodes,
        "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs,
        initializer=initializers,
    )
    _save(graph, path)


class SizeGatedDetector:
    """Detector double with SCRFD's detect() signature: finds one face only at the listed input sizes."""

    def __init__(self, finds_at=((384, 384),)):
        self.finds_at = set(finds_at)
        self.calls: list[tuple[int, int]] = []

    def detect(self, img, input_size=None, max_num=0, metric="default"):
        assert img.dtype == np.uint8 and img.shape[2] == 3
        self.calls.append(tuple(input_size))
        if tuple(input_size) not in self.finds_at:
            return np.empty((0, 5), np.float32), np.empty((0, 5, 2), np.float32)
        h, w = img.shape[:2]
        kps = np.array([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.72], [0.62, 0.72]], np.float32) * [w, h]
        bboxes = np.array([[0.2 * w, 0.2 * h, 0.8 * w, 0.9 * h, 0.93]], np.float32)
        return bboxes, kps[None].astype(np.float32)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface_root")
    pack = root / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    write_tiny_scrfd(pack / "det_10g.onnx")
    write_tiny_arcface(pack / "w600k_r50.onnx")
    return root


@pytest.fixture(scope="module")
def tiny_recognizer(tiny_root):
    from insightface.model_zoo import model_zoo
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    model = model_zoo.get_model(str(tiny_root / "models" / "buffalo_l" / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(model, ArcFaceONNX)  # routed by insightface's real model zoo
    model.prepare(-1)
    return model


def _face_image(seed=1, size=(200, 160)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def test_retry_really_changes_detection_size(tiny_recognizer):
    detector = SizeGatedDetector()
    backend = InsightFaceBackend(detector=detector, recognizer=tiny_recognizer)
    faces = backend.detect(_face_image())
    assert detector.calls == [(640, 640), (576, 576), (512, 512), (448, 448), (384, 384)]
    assert backend.sizes_tried == [640, 576, 512, 448, 384]
    assert len(faces) == 1
    face = faces[0]
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    # Normalised in float32: its norm is a sum of 512 float32 squares, one rounding each.
    norm = np.linalg.norm(face.embedding.astype(np.float64))
    assert abs(norm - 1.0) <= float32_tolerance(1.0, ops=face.embedding.size)
    assert face.kps.shape == (5, 2) and face.det_score == float(np.float32(0.93))  # passed through as it came
    # Embedding is ArcFaceONNX's on the aligned crop of the BGR image, normalised.
    from insightface.app.common import Face as InsightFace
    import cv2

    bgr = cv2.cvtColor(_face_image(), cv2.COLOR_RGB2BGR)
    record = InsightFace(bbox=face.bbox, kps=face.kps, det_score=face.det_score)
    tiny_recognizer.get(bgr, record)
    # onnxruntime runs float32 only, but both sides start from this one raw embedding; they differ only in
    # the float32 normalisation, whose floor is measured against normalising it in float64 (tests/noise.py).
    raw = record.embedding.astype(np.float64)
    tol = tolerance(face.embedding, raw / np.linalg.norm(raw))
    assert np.abs(face.embedding - record.normed_embedding).max() <= tol
    # RGB order would give a different embedding: the backend must convert to BGR.
    rgb_record = InsightFace(bbox=face.bbox, kps=face.kps, det_score=face.det_score)
    tiny_recognizer.get(_face_image(), rgb_record)
    assert np.abs(face.embedding - rgb_record.normed_embedding).max() > DISTINCT * tol


def test_no_face_at_any_size(tiny_recognizer):
    detector = SizeGatedDetector(finds_at=())
    backend = InsightFaceBackend(detector=detector, recognizer=tiny_recognizer)
    assert backend.detect(_face_image()) == []
    assert detector.calls == [(s, s) for s in DEFAULT_DET_SIZES] and DEFAULT_DET_SIZES[-1] == 320
    with pytest.raises(NoFaceError, match="no face found in portrait.png"):
        most_prominent_face(_face_image(), backend, source="portrait.png")


def test_similarity_is_cosine_with_buffalo_threshold(tiny_recognizer):
    backend = InsightFaceBackend(detector=SizeGatedDetector(), recognizer=tiny_recognizer)
    assert (backend.similarity_measure, backend.same_person_threshold, backend.embedding_dim) == ("cosine", 0.3, 512)
    a, b = np.eye(512, dtype=np.float32)[:2]
    # Unit basis vectors: every product and sum in the cosine is exact.
    assert backend.similarity(a, a) == 1.0 and backend.similarity(a, b) == 0.0
    assert backend.is_same_person(a, (a + 0.5 * b) / np.linalg.norm(a + 0.5 * b))
    assert not backend.is_same_person(a, b)
    with pytest.raises(ValueError, match="128-d"):
        backend.similarity(a, np.ones(128))


def test_real_face_analysis_from_local_root_tries_every_size(tiny_root, monkeypatch):
    """Through insightface's FaceAnalysis + SCRFD: each retry size gets its own session (sizes really change)."""
    monkeypatch.setenv("FASTFACE_OFFLINE", "1")
    monkeypatch.setenv("FASTFACE_INSIGHTFACE_ROOT", str(tiny_root))
    backend = get_face_backend("insightface", providers=["CPUExecutionProvider"])
    assert backend.embedding_dim == 512
    assert backend.detect(_face_image(size=(120, 90))) == []
    sessions = set(backend.detector.resolution_session_input_sizes)
    assert {(s, s) for s in DEFAULT_DET_SIZES} <= sessions
    # Why the backend passes input_size itself: insightface 2.x ignores the attribute.
    backend.detector.input_size = (256, 256)
    backend.detector.detect(np.zeros((64, 64, 3), np.uint8))
    assert (256, 256) not in backend.detector.resolution_session_input_sizes
    backend.detector.detect(np.zeros((64, 64, 3), np.uint8), input_size=(256, 256))
    assert (256, 256) in backend.detector.resolution_session_input_sizes


def test_missing_models_offline_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        load_face_analysis(tmp_path / "empty_root")
    message = str(info.value)
    assert str(tmp_path / "empty_root" / "models" / "buffalo_l") in message and "*.onnx" in message
    assert not (tmp_path / "empty_root").exists()  # nothing was downloaded or created


def test_pack_without_detector_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFACE_OFFLINE", "1")
    pack = tmp_path / "models" / "buffalo_l"
    pack.mkdir(parents=True)
    write_tiny_arcface(pack / "w600k_r50.onnx")
    with pytest.raises(FileNotFoundError, match="no SCRFD detection model"):
        load_face_analysis(tmp_path, providers=["CPUExecutionProvider"])


def test_providers_cuda_only_when_available(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers(3) == [("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers(3) == ["CPUExecutionProvider"]


def test_det_sizes_validated(tiny_recognizer):
    with pytest.raises(ValueError, match="multiples of 32"):
        InsightFaceBackend(detector=SizeGatedDetector(), recognizer=tiny_recognizer, det_sizes=(640, 500))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTFACE_SLOW") != "1", reason="needs the real buffalo_l pack; set FASTFACE_SLOW=1")
def test_real_buffalo_l_on_sample_photos():
    import importlib.util
    from pathlib import Path

    from PIL import Image

    images = Path(next(iter(importlib.util.find_spec("insightface").submodule_search_locations))) / "data" / "images"
    backend = get_face_backend("insightface")
    hanks = most_prominent_face(images / "Tom_Hanks_54745.png", backend)
    mirrored = Image.open(images / "Tom_Hanks_54745.png").convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert backend.is_same_person(hanks.embedding, most_prominent_face(mirrored.resize((168, 168)), backend).embedding)
    group = backend.detect(images / "t1.jpg")
    assert len(group) == 6 and backend.sizes_tried == [640]
    assert not any(backend.is_same_person(hanks.embedding, face.embedding) for face in group)

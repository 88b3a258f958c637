"""prepare_identity: content-hash cache, CLIP-H states from a tiny real CLIP vision model, null states."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastface.faces import (
    NoFaceError,
    encode_clip_states,
    encoder_fingerprint,
    get_face_backend,
    null_clip_states,
    prepare_identity,
)
from fastface.cache import identity_entries

from noise import DISTINCT, to_float64, tolerance

pytest.importorskip("dlib")


class CountingBackend:
    """Wraps a backend and counts detect() calls."""

    def __init__(self, inner):
        self.inner = inner
        self.detect_calls = 0
        for attribute in ("name", "embedding_dim", "similarity_measure", "same_person_threshold"):
            setattr(self, attribute, getattr(inner, attribute))

    def detect(self, image):
        self.detect_calls += 1
        return self.inner.detect(image)

    def similarity(self, a, b):
        return self.inner.similarity(a, b)

    def is_same_person(self, a, b):
        return self.inner.is_same_person(a, b)


@pytest.fixture(scope="module")
def dlib_backend():
    return get_face_backend("dlib")


@pytest.fixture(scope="module")
def hanks_path():
    spec = importlib.util.find_spec("insightface")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" / "Tom_Hanks_54745.png"
    if not path.is_file():
        pytest.skip("sample photo not in this insightface wheel")
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """Tiny CLIPVisionModelWithProjection + CLIPImageProcessor, saved and loaded back through from_pretrained."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        image_size=32, patch_size=4, projection_dim=16,
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(folder / "image_encoder")
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder").eval()
    processor = CLIPImageProcessor.from_pretrained(folder / "image_encoder")
    return encoder, processor


def _states_tolerance(encoder, pixel_values, states):
    """tests/noise.py's tolerance for these penultimate states: the encoder rerun in float64 on the same pixels."""
    with torch.no_grad():
        states64 = to_float64(encoder)(pixel_values.double(), output_hidden_states=True).hidden_states[-2]
    return tolerance(states, states64)


def test_cache_hit_skips_the_backend(dlib_backend, hanks_path, tmp_path):
    backend = CountingBackend(dlib_backend)
    first = prepare_identity(hanks_path, backend, cache_dir=tmp_path)
    assert backend.detect_calls == 1
    second = prepare_identity(str(hanks_path), backend, cache_dir=tmp_path)
    assert backend.detect_calls == 1  # served from the cache
    np.testing.assert_array_equal(first.embedding, second.embedding)
    np.testing.assert_array_equal(first.crop_bgr, second.crop_bgr)
    np.testing.assert_array_equal(first.bbox, second.bbox)
    assert first.content_hash == second.content_hash and len(first.content_hash) == 64
    assert first.crop_bgr.shape == (224, 224, 3) and first.embedding.shape == (128,)
    assert first.clip_states is None
    # The same bytes under another name hit the same entry: keyed by content, not path.
    renamed = tmp_path / "renamed.png"
    renamed.write_bytes(hanks_path.read_bytes())
    prepare_identity(renamed, backend, cache_dir=tmp_path)
    assert backend.detect_calls == 1
    # No temp files left behind by the atomic writes.
    names = [p.name for p in identity_entries(tmp_path, first.content_hash)]
    assert names == [f"{first.content_hash}.dlib.face.npz"]


def test_cache_matches_a_fresh_computation_and_array_input(dlib_backend, hanks_path, tmp_path):
    rgb = np.asarray(Image.open(hanks_path).convert("RGB"))
    cached = prepare_identity(hanks_path, dlib_backend, cache_dir=tmp_path / "a")
    from_array = prepare_identity(rgb, dlib_backend, cache_dir=tmp_path / "b")
    assert from_array.content_hash != cached.content_hash  # array hash is of pixels, file hash of bytes
    # The same pixels through the same float32 dlib code in this process: bit-identical.
    np.testing.assert_array_equal(from_array.embedding, cached.embedding)
    # A different photo gets a different entry and a different identity vector.
    mirrored = np.ascontiguousarray(rgb[:, ::-1])
    other = prepare_identity(mirrored, dlib_backend, cache_dir=tmp_path / "b")
    assert other.content_hash != from_array.content_hash
    assert not np.array_equal(other.embedding, from_array.embedding)


def test_cache_dir_from_environment(dlib_backend, hanks_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFACE_CACHE", str(tmp_path / "env_cache"))
    result = prepare_identity(hanks_path, dlib_backend)
    assert identity_entries(tmp_path / "env_cache" / "identities", result.content_hash)


def test_clip_states_cached_per_encoder(dlib_backend, hanks_path, tiny_clip, tmp_path):
    encoder, processor = tiny_clip
    backend = CountingBackend(dlib_backend)
    result = prepare_identity(hanks_path, backend, image_encoder=encoder, feature_extractor=processor, cache_dir=tmp_path)
    seq = (32 // 4) ** 2 + 1
    assert result.clip_states.shape == (1, seq, 32) and result.clip_states.dtype == torch.float32
    pixel_values = processor(images=[result.crop_bgr], return_tensors="pt").pixel_values
    # Two float32 runs of one computation: within the floor measured by the float64 rerun (tests/noise.py).
    tol = _states_tolerance(encoder, pixel_values, result.clip_states)
    expected = encode_clip_states([result.crop_bgr], encoder, processor)
    assert (result.clip_states - expected).abs().max() <= tol
    # Penultimate layer, as FaceID-Plus-v2 consumes it.
    with torch.no_grad():
        hidden = encoder(pixel_values, output_hidden_states=True).hidden_states
    assert (result.clip_states - hidden[-2]).abs().max() <= tol
    assert (result.clip_states - hidden[-1]).abs().max() > DISTINCT * tol

    again = prepare_identity(hanks_path, backend, image_encoder=encoder, feature_extractor=processor, cache_dir=tmp_path)
    assert backend.detect_calls == 1
    assert torch.equal(again.clip_states, result.clip_states)  # read back from the cache: bit-identical
    fingerprint = encoder_fingerprint(encoder, processor)
    names = {p.name for p in identity_entries(tmp_path, result.content_hash)}
    assert f"{result.content_hash}.dlib.clip-{fingerprint}.safetensors" in names

    # Another encoder (same config, other weights) gets its own entry and its own states.
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(1)
    other = CLIPVisionModelWithProjection(encoder.config).eval()
    assert encoder_fingerprint(other, processor) != fingerprint
    third = prepare_identity(hanks_path, backend, image_encoder=other, feature_extractor=processor, cache_dir=tmp_path)
    assert backend.detect_calls == 1  # face part still cached
    assert (third.clip_states - result.clip_states).abs().max() > DISTINCT * tol


def test_null_clip_states_are_the_encoder_on_zero_pixels(tiny_clip):
    encoder, processor = tiny_clip
    null = null_clip_states(encoder, processor)
    with torch.no_grad():
        expected = encoder(torch.zeros(1, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
    assert null.shape == (1, 65, 32)
    # Two float32 runs of one computation: within the floor measured by the float64 rerun (tests/noise.py).
    tol = _states_tolerance(encoder, torch.zeros(1, 3, 32, 32), expected)
    assert (null - expected).abs().max() <= tol
    # Zeros after normalisation are mid-grey, not black.
    black = np.zeros((32, 32, 3), np.uint8)
    assert (encode_clip_states([black], encoder, processor) - null).abs().max() > DISTINCT * tol
    grey = np.empty((32, 32, 3), np.uint8)
    grey[...] = np.round(np.array(processor.image_mean) * 255).astype(np.uint8)  # CLIP's mean, channel order as read
    close = encode_clip_states([grey], encoder, processor)
    assert (close - null).abs().max() < (encode_clip_states([black], encoder, processor) - null).abs().max()


def test_no_face_raises_with_the_path(dlib_backend, tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(path)
    with pytest.raises(NoFaceError) as info:
        prepare_identity(path, dlib_backend, cache_dir=tmp_path / "cache")
    assert str(info.value) == f"no face found in {path}"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))


def test_corrupt_cache_entry_is_recomputed(dlib_backend, hanks_path, tmp_path):
    first = prepare_identity(hanks_path, dlib_backend, cache_dir=tmp_path)
    (entry,) = identity_entries(tmp_path, first.content_hash)
    entry.write_bytes(b"garbage")
    backend = CountingBackend(dlib_backend)
    again = prepare_identity(hanks_path, backend, cache_dir=tmp_path)
    assert backend.detect_calls == 1
    np.testing.assert_array_equal(again.embedding, first.embedding)
    assert os.path.getsize(entry) > 1000

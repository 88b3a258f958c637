"""load_image_rgb and photo_hash: conversions and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastface.faces import ImageReadError, photo_hash, load_image_rgb


def _pixels(shape=(6, 5, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nobody.png"
    with pytest.raises(ImageReadError, match="file not found") as info:
        load_image_rgb(path)
    assert str(path) in str(info.value)


def test_corrupt_bytes_name_the_path(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageReadError, match="corrupt") as info:
        load_image_rgb(str(path))
    assert str(path) in str(info.value)


def test_truncated_png_names_the_path(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(_pixels((64, 64, 3))).save(path)
    path.write_bytes(path.read_bytes()[:120])
    with pytest.raises(ImageReadError, match="corrupt") as info:
        load_image_rgb(path)
    assert str(path) in str(info.value)


def test_zero_size_images(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="zero size") as info:
        load_image_rgb(empty)
    assert str(empty) in str(info.value)
    with pytest.raises(ImageReadError, match="zero size"):
        load_image_rgb(np.zeros((0, 7, 3), np.uint8))
    with pytest.raises(ImageReadError, match="zero size"):
        load_image_rgb(Image.new("RGB", (0, 4)))


def test_rgba_and_grayscale_files_are_converted(tmp_path):
    rgb = _pixels()
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 77, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    out = load_image_rgb(tmp_path / "alpha.png")
    assert out.shape == (6, 5, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)  # alpha dropped, as cv2.imread does

    gray = _pixels((6, 5))
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    out = load_image_rgb(tmp_path / "gray.png")
    assert out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, np.repeat(gray[:, :, None], 3, axis=2))


def test_arrays_and_pil_images():
    rgb = _pixels()
    np.testing.assert_array_equal(load_image_rgb(rgb), rgb)
    np.testing.assert_array_equal(load_image_rgb(Image.fromarray(rgb)), rgb)
    np.testing.assert_array_equal(load_image_rgb(Image.fromarray(rgb).convert("RGBA")), rgb)
    np.testing.assert_array_equal(load_image_rgb(rgb[:, :, 0])[:, :, 2], rgb[:, :, 0])
    np.testing.assert_array_equal(load_image_rgb(np.dstack([rgb, rgb[:, :, :1]])), rgb)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 3), np.float32), "not uint8"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (Image.new("I;16", (4, 4)), "16-bit"),
        (12, "expected a path"),
    ],
)
def test_wrong_inputs(bad, message):
    with pytest.raises(ImageReadError, match=message):
        load_image_rgb(bad)


def test_photo_hash(tmp_path):
    rgb = _pixels()
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    copy = tmp_path / "b.png"
    copy.write_bytes(path.read_bytes())
    assert photo_hash(path) == photo_hash(str(copy))  # by content, not by name
    assert photo_hash(rgb) == photo_hash(Image.fromarray(rgb))
    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    assert photo_hash(changed) != photo_hash(rgb)
    assert photo_hash(rgb.reshape(5, 6, 3)) != photo_hash(rgb)  # shape is part of the key
    # An encoded photo hashes by its bytes, whether read from a file or given as bytes (a store's
    # bytes): the same value as the identities table's content_hash.
    from storage.ids import bytes_sha256

    assert photo_hash(path.read_bytes()) == photo_hash(path) == bytes_sha256(path.read_bytes())


def test_encoded_bytes_decode_like_the_file(tmp_path):
    """Bytes read from a store decode exactly as the same file on disk, EXIF rotation included."""
    path = tmp_path / "rotated.jpg"
    image = Image.fromarray(_pixels((8, 12, 3)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    image.save(path, exif=exif, quality=95)
    from_file = load_image_rgb(path)
    assert from_file.shape == (12, 8, 3)  # rotated
    assert np.array_equal(load_image_rgb(path.read_bytes()), from_file)
    with pytest.raises(ImageReadError, match="not a readable image"):
        load_image_rgb(b"definitely not an image")
    with pytest.raises(ImageReadError, match="zero size"):
        load_image_rgb(b"")

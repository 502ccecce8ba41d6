from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from rbcbatch.errors import SlideReadError
from rbcbatch.io.sources import decode_image, read_slide, resize_labels, sniff_format, to_rgb_uint8


def png_bytes(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def jpeg_bytes(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height pixels but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


RGB = np.dstack([np.full((20, 30), v, np.uint8) for v in (200, 100, 50)])


def test_png_named_jpg_is_decoded_by_content(tmp_path):
    path = tmp_path / "really_png.jpg"
    path.write_bytes(png_bytes(RGB[:, :, ::-1]))  # cv2 writes BGR
    out = read_slide("s", str(path))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (200, 100, 50)


def test_jpeg_and_tiff_decode_to_rgb():
    assert sniff_format(jpeg_bytes(RGB)[:4]) == "jpeg"
    assert np.abs(decode_image(jpeg_bytes(RGB)).astype(int) - RGB).max() <= 3
    buf = io.BytesIO()
    tifffile.imwrite(buf, RGB)
    assert np.array_equal(decode_image(buf.getvalue()), RGB)


def test_grey_rgba_and_16_bit_are_normalised():
    grey = np.full((4, 5), 77, np.uint8)
    assert np.array_equal(decode_image(png_bytes(grey)), np.full((4, 5, 3), 77, np.uint8))
    rgba = np.dstack([RGB, np.full((20, 30), 128, np.uint8)])
    assert np.array_equal(decode_image(png_bytes(rgba[:, :, [2, 1, 0, 3]])), RGB)
    sixteen = np.full((4, 5), 65535, np.uint16)
    sixteen[0, 0] = 0
    out = decode_image(png_bytes(sixteen))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]
    twelve_bit = np.full((2, 2), 4095, np.uint16)
    assert to_rgb_uint8(twelve_bit)[0, 0].tolist() == [255, 255, 255]
    assert to_rgb_uint8(np.full((2, 2, 3), 0.5, np.float32))[0, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "file is empty"),
        (b"hello, this is text\n", "not an image we can read"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt or truncated JPEG"),
        (None, "corrupt or truncated PNG"),  # truncated PNG, built below
        (huge_png_header(100_000, 100_000), "over the"),
    ],
    ids=["zero-byte", "text-named-png", "corrupt-jpeg", "truncated-png", "huge-declared"],
)
def test_bad_files_raise_clear_errors(tmp_path, content, expected):
    if content is None:
        content = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[:-300]
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(SlideReadError, match=expected) as info:
        read_slide("bad", str(path))
    assert info.value.slide_id == "bad" and info.value.stage == "read"


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(SlideReadError, match="no such file"):
        read_slide("m", str(tmp_path / "missing.png"))
    with pytest.raises(SlideReadError, match="folder"):
        read_slide("d", str(tmp_path))


def test_resize_labels_keeps_ids_and_exact_shape():
    labels = np.array([[1, 1, 2], [3, 3, 2]], np.uint32)
    up = resize_labels(labels, 4, 6)
    assert up.shape == (4, 6) and up.dtype == np.uint32
    assert up[0].tolist() == [1, 1, 1, 1, 2, 2]
    assert np.array_equal(resize_labels(up, 2, 3), labels)

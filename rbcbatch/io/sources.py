"""Open a slide and decode it to RGB, by what its bytes are, not what its name says.

Real archives hold PNGs named .jpg, greyscale and 16-bit scans, RGBA exports, truncated uploads
and files that are not images at all. Everything here either returns a uint8 H×W×3 RGB array or
raises `SlideReadError` with a message a person can act on.
"""

from __future__ import annotations

import io
import warnings

import cv2
import fsspec
import numpy as np
import tifffile
from PIL import Image

from rbcbatch.errors import SlideReadError

# Largest image decoded whole: 400 MP of RGB is 1.2 GB in memory. Larger scans must come as
# tiled (pyramidal) TIFF, which is read region by region.
MAX_WHOLE_IMAGE_PIXELS = 400_000_000

# Magic numbers of the formats read here (from each format's specification).
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
)


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes of a file, or None if it is none we read."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """All bytes of a local path or fsspec URL, with missing objects as a clear error."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as e:
        raise SlideReadError("", f"no such file or object: {uri}") from e
    except IsADirectoryError as e:
        raise SlideReadError("", f"{uri} is a folder, not an image file") from e
    except PermissionError as e:
        raise SlideReadError("", f"permission denied reading {uri}") from e


def to_rgb_uint8(pixels: np.ndarray) -> np.ndarray:
    """Normalise any decoded pixel array to uint8 H×W×3 RGB.

    Greyscale is replicated, alpha is dropped (smear exports use it only for opacity),
    16-bit is scaled by its bit depth (12-bit camera data when the maximum is below 4096),
    floats are taken as 0..1.
    """
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) TIFF
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"unsupported pixel layout {arr.shape}; expected H×W, H×W×3 or H×W×4")
    if arr.shape[2] in (1, 2):  # grey, grey+alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        return (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if arr.dtype.kind in "ui":
        top = (
            4095
            if arr.max(initial=0) < 4096 and arr.dtype.itemsize >= 2
            else np.iinfo(arr.dtype).max
        )
        return (np.clip(arr, 0, top).astype(np.float32) * (255.0 / top) + 0.5).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {arr.dtype}")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"declares an empty image ({width}×{height})")
    if width * height > max_pixels:
        raise ValueError(
            f"declares {width}×{height} = {width * height / 1e6:.0f} MP, over the "
            f"{max_pixels / 1e6:.0f} MP limit for an image decoded whole; "
            "store it as a tiled pyramidal TIFF so it can be read region by region"
        )


def _decode_pillow(data: bytes, max_pixels: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None  # the size check below replaces Pillow's
        with Image.open(io.BytesIO(data)) as im:
            _check_size(im.width, im.height, max_pixels)
            im.load()  # raises on truncated or corrupt data
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                return np.array(im).astype(np.uint16 if im.mode.startswith("I;16") else np.int32)
            if im.mode not in ("RGB", "RGBA", "L", "LA"):
                im = im.convert("RGB")
            return np.array(im)


def _decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        page = tif.series[0].levels[0] if tif.series else tif.pages[0]
        shape = page.shape
        height, width = (
            (shape[-3], shape[-2]) if len(shape) >= 3 and shape[-1] in (3, 4) else shape[-2:]
        )
        _check_size(int(width), int(height), max_pixels)
        return page.asarray()


def decode_image(data: bytes, max_pixels: int = MAX_WHOLE_IMAGE_PIXELS) -> np.ndarray:
    """Decode image bytes to uint8 H×W×3 RGB, choosing the decoder by content.

    Raises ValueError with the reason (empty, not an image, truncated, too large).
    """
    if len(data) == 0:
        raise ValueError("file is empty (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise ValueError(
            f"not an image we can read: content starts with {data[:12]!r}; "
            "expected JPEG, PNG, TIFF or BMP"
        )
    try:
        pixels = (
            _decode_tiff(data, max_pixels) if fmt == "tiff" else _decode_pillow(data, max_pixels)
        )
    except ValueError:
        raise
    except Exception as e:  # decoders raise OSError, SyntaxError, struct.error, ...
        raise ValueError(f"corrupt or truncated {fmt.upper()} data: {e}") from e
    return to_rgb_uint8(pixels)


def read_slide(
    slide_id: str,
    uri: str,
    storage_options: dict | None = None,
    max_pixels: int = MAX_WHOLE_IMAGE_PIXELS,
) -> np.ndarray:
    """Read and decode one slide to uint8 H×W×3 RGB, or raise SlideReadError saying why."""
    try:
        data = read_bytes(uri, storage_options)
    except SlideReadError as e:
        raise SlideReadError(slide_id, e.message) from e
    try:
        return decode_image(data, max_pixels)
    except ValueError as e:
        raise SlideReadError(slide_id, f"{uri}: {e}") from e


def resample(image: np.ndarray, scale: float) -> np.ndarray:
    """Resize an image by `scale` (new = old × scale): area-averaging down, linear up."""
    if abs(scale - 1.0) < 1e-6:
        return image
    height, width = image.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


def resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label array to exactly (height, width), any integer dtype."""
    src_h, src_w = labels.shape
    if (src_h, src_w) == (height, width):
        return labels
    ys = np.minimum(((np.arange(height) + 0.5) * src_h / height).astype(np.intp), src_h - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * src_w / width).astype(np.intp), src_w - 1)
    return labels[ys[:, None], xs[None, :]]

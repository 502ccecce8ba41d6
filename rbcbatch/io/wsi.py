"""Whole-slide images: tiled, pyramidal TIFF, OME-TIFF and SVS, read lazily region by region.

A smear scanned at 0.25 µm/px is 40,000-100,000 px a side, 5-30 GB of RGB, far more than a
worker may hold. tifffile exposes a file's tiles as a read-only Zarr store, so reading a region
decodes only the tiles it touches. Remote files (s3://, any fsspec URL) are opened with a small
read-ahead block, so a region downloads about the tiles it needs.

Everything here returns uint8 RGB (`sources.to_rgb_uint8`) or raises `SlideReadError`.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import cv2
import fsspec
import numpy as np
import tifffile
import zarr

from rbcbatch.errors import SlideReadError
from rbcbatch.io.sources import sniff_format, to_rgb_uint8

# Read-ahead of a remote file: TIFF tiles are 10-300 KiB, and fsspec's 5 MiB default made one
# 1024² region read download 356 MB on S3 (measured, see STACK.md).
REMOTE_BLOCK_SIZE = 256 * 1024
# A stated pixel size outside this range is a placeholder (72 dpi reads 353 µm/px), not a scan's.
PLAUSIBLE_UM_PER_PX = (0.02, 20.0)
# Micrometres per unit of the OME PhysicalSize units and the TIFF ResolutionUnit values.
_OME_UNIT_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
_TIFF_UNIT_UM = {2: 25_400.0, 3: 10_000.0}  # inch, centimetre
# Aperio SVS states the pixel size in its ImageDescription: "...|MPP = 0.2520|...".
_SVS_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9]*\.?[0-9]+)")
# Blocks of this many output pixels a side are decoded at a time when shrinking a level.
_SHRINK_BLOCK_OUT = 256


@dataclass
class WholeSlide:
    """An open whole-slide image. Level 0 is full resolution; each next level is coarser.

    levels: (height, width) per level; um_per_px: the pixel size the file states for level 0,
    None when it states none; is_tiled: whether level 0 is stored in tiles (random access).
    """

    uri: str
    levels: list[tuple[int, int]]
    um_per_px: float | None
    is_tiled: bool
    slide_id: str = ""
    _tif: tifffile.TiffFile | None = field(default=None, repr=False)
    _arrays: list = field(default_factory=list, repr=False)
    _axes: list[str] = field(default_factory=list, repr=False)
    _handle: object = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.levels[0]

    @property
    def pixels(self) -> int:
        return self.levels[0][0] * self.levels[0][1]

    def downsample(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of `level`, (rows, cols)."""
        (h0, w0), (h, w) = self.levels[0], self.levels[level]
        return h0 / h, w0 / w

    def read_region(self, level: int, y: int, x: int, height: int, width: int) -> np.ndarray:
        """uint8 (height, width, 3) RGB of `level` from row y, column x (pixels of that level).

        Raises ValueError for a box outside the level, SlideReadError for undecodable data.
        """
        lh, lw = self.levels[level]
        if height <= 0 or width <= 0 or y < 0 or x < 0 or y + height > lh or x + width > lw:
            raise ValueError(
                f"region y={y} x={x} {height}×{width} is outside level {level} ({lh}×{lw})"
            )
        axes = self._axes[level]
        index = tuple(
            slice(y, y + height)
            if a == "Y"
            else slice(x, x + width)
            if a == "X"
            else slice(None)
            if a in "SC"
            else 0
            for a in axes
        )
        try:
            pixels = np.asarray(self._arrays[level][index])
        except Exception as e:  # codecs raise their own types on truncated or corrupt tiles
            raise SlideReadError(
                self.slide_id,
                f"{self.uri}: corrupt or truncated tile data in level {level} "
                f"(region y={y} x={x} {height}×{width}): {e}",
            ) from e
        kept = [a for a in axes if a in "YXSC"]
        channel = next((i for i, a in enumerate(kept) if a in "SC"), None)
        if channel is not None and channel < kept.index("Y"):
            pixels = np.moveaxis(pixels, channel, -1)  # planar (C, H, W) storage
        return to_rgb_uint8(pixels)

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()
            self._tif = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> WholeSlide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_tiff(uri: str, storage_options: dict | None = None) -> bool:
    """Whether the file's first bytes are a TIFF's; False for anything unreadable."""
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        with fs.open(path, "rb", block_size=64) as f:
            return sniff_format(f.read(16)) == "tiff"
    except Exception:  # unreadable here: the whole-image reader reports why, in its words
        return False


def open_slide(uri: str, storage_options: dict | None = None, slide_id: str = "") -> WholeSlide:
    """Open a TIFF-family slide lazily (header and tile offsets only; no pixels are decoded).

    Local paths are opened directly; other fsspec URLs through a file object with a small
    read-ahead (storage_options as for `sources.read_bytes`). Raises SlideReadError saying why
    for a missing, non-TIFF, corrupt or truncated file.
    """
    handle = None
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        source = path if local else fs.open(path, "rb", block_size=REMOTE_BLOCK_SIZE)
        handle = None if local else source
        tif = tifffile.TiffFile(source)
    except FileNotFoundError as e:
        raise SlideReadError(slide_id, f"no such file or object: {uri}") from e
    except IsADirectoryError as e:
        raise SlideReadError(slide_id, f"{uri} is a folder, not an image file") from e
    except PermissionError as e:
        raise SlideReadError(slide_id, f"permission denied reading {uri}") from e
    except Exception as e:  # tifffile raises TiffFileError, struct.error, ValueError, ...
        if handle is not None:
            handle.close()
        raise SlideReadError(slide_id, f"{uri}: not a readable TIFF: {e}") from e
    try:
        return _slide_of(tif, uri, slide_id, handle)
    except SlideReadError:
        tif.close()
        if handle is not None:
            handle.close()
        raise
    except Exception as e:
        tif.close()
        if handle is not None:
            handle.close()
        raise SlideReadError(slide_id, f"{uri}: corrupt or truncated TIFF structure: {e}") from e


def _slide_of(tif: tifffile.TiffFile, uri: str, slide_id: str, handle) -> WholeSlide:
    """The WholeSlide of an open TiffFile: its first series' levels as Zarr arrays."""
    if not tif.series:
        raise SlideReadError(slide_id, f"{uri}: TIFF holds no image")
    series = tif.series[0]
    shapes, arrays, axes = [], [], []
    for index, level in enumerate(series.levels):
        _check_tile_offsets(level, tif.filehandle.size, f"{uri}: level {index}", slide_id)
        level_axes = level.axes
        if "Y" not in level_axes or "X" not in level_axes:
            raise SlideReadError(slide_id, f"{uri}: level {index} has axes {level_axes}, no Y/X")
        for a, n in zip(level_axes, level.shape, strict=True):
            if a in "SC" and n > 4:
                raise SlideReadError(
                    slide_id, f"{uri}: {n} channels; expected a brightfield grey or RGB slide"
                )
        shapes.append((level.shape[level_axes.index("Y")], level.shape[level_axes.index("X")]))
        arrays.append(zarr.open_array(series.aszarr(level=index), mode="r"))
        axes.append(level_axes)
    return WholeSlide(
        uri=uri,
        levels=shapes,
        um_per_px=stated_um_per_px(tif),
        is_tiled=bool(series.keyframe.is_tiled),
        slide_id=slide_id,
        _tif=tif,
        _arrays=arrays,
        _axes=axes,
        _handle=handle,
    )


def _check_tile_offsets(level, file_size: int, where: str, slide_id: str) -> None:
    """Raise SlideReadError when a level's tiles are missing or point past the end of the file
    (a truncated upload): tifffile would otherwise read such tiles as blank glass."""
    for page in level.pages:
        if page is None:
            raise SlideReadError(slide_id, f"{where}: a page of the level is missing")
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        expected = math.prod(getattr(page, "keyframe", page).chunked)
        if offsets.size != expected or counts.size != expected:
            raise SlideReadError(
                slide_id,
                f"{where}: {offsets.size} tile offsets for {expected} tiles; the file is corrupt",
            )
        end = int((offsets + counts).max(initial=0))
        if end > file_size:
            raise SlideReadError(
                slide_id,
                f"{where}: tile data runs to byte {end} but the file has {file_size} bytes; "
                "the file is truncated",
            )


def stated_um_per_px(tif: tifffile.TiffFile) -> float | None:
    """Level-0 pixel size the file states: OME PhysicalSizeX, SVS MPP, or the TIFF resolution
    tags (inch or centimetre units); None when it states none or an implausible one."""
    value = None
    if tif.is_ome and tif.ome_metadata:
        value = _ome_um_per_px(tif.ome_metadata)
    description = tif.pages.first.description or ""
    if value is None and description.startswith("Aperio"):
        match = _SVS_MPP.search(description)
        value = float(match.group(1)) if match else None
    if value is None:
        value = _resolution_um_per_px(tif.pages.first)
    lo, hi = PLAUSIBLE_UM_PER_PX
    return value if value is not None and lo <= value <= hi else None


def _ome_um_per_px(xml: str) -> float | None:
    """PhysicalSizeX of the first OME Pixels element, in µm (OME's default unit is µm)."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if re.sub(r"^\{.*\}", "", element.tag) == "Pixels":
            size = element.get("PhysicalSizeX")
            unit = element.get("PhysicalSizeXUnit", "µm")
            if size is None or unit not in _OME_UNIT_UM:
                return None
            return float(size) * _OME_UNIT_UM[unit]
    return None


def _resolution_um_per_px(page: tifffile.TiffPage) -> float | None:
    """µm per pixel from XResolution (pixels per unit) and ResolutionUnit; None without a unit."""
    resolution = page.tags.get("XResolution")
    unit = page.tags.get("ResolutionUnit")
    if resolution is None or unit is None or int(unit.value) not in _TIFF_UNIT_UM:
        return None
    num, den = resolution.value
    if num <= 0 or den <= 0:
        return None
    return _TIFF_UNIT_UM[int(unit.value)] * den / num


def read_shrunk(slide: WholeSlide, factor: int) -> tuple[np.ndarray, tuple[float, float]]:
    """The whole slide at about 1/`factor` of level 0, uint8 (h, w, 3), and its downsample
    (level-0 pixels per output pixel, rows and cols; exact but for the last row and column).

    Reads the coarsest level no coarser than `factor` and shrinks it block by block
    (area-averaging), so memory holds the output and one block, never a whole fine level.
    """
    factor = max(1, int(factor))
    level = max(
        (i for i in range(len(slide.levels)) if max(slide.downsample(i)) <= factor + 1e-9),
        default=0,
    )
    rest = max(1, int(factor / max(slide.downsample(level))))
    height, width = slide.levels[level]
    out_h, out_w = math.ceil(height / rest), math.ceil(width / rest)
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    block = _SHRINK_BLOCK_OUT * rest
    for y0 in range(0, height, block):
        for x0 in range(0, width, block):
            h, w = min(block, height - y0), min(block, width - x0)
            pixels = slide.read_region(level, y0, x0, h, w)
            oh, ow = math.ceil(h / rest), math.ceil(w / rest)
            if rest > 1:  # edge blocks are padded to whole output pixels: an exact factor
                pad = ((0, oh * rest - h), (0, ow * rest - w), (0, 0))
                pixels = cv2.resize(
                    np.pad(pixels, pad, mode="edge"), (ow, oh), interpolation=cv2.INTER_AREA
                )
            oy, ox = y0 // rest, x0 // rest
            out[oy : oy + oh, ox : ox + ow] = pixels
    dy, dx = slide.downsample(level)
    return out, (dy * rest, dx * rest)

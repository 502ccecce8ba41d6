"""Synthetic whole-slide images: tiled, pyramidal OME-TIFF files of glass with images on it.

`write_pyramid` writes a slide that a function renders tile by tile and level by level, so a
40,000² slide of glass with a few patches of smear (rbcbatch.dev.synth fields) costs seconds and a
few MB of disk: glass tiles are compressed once and their bytes reused, and no level is ever
held whole. Tests and bench/large_slide.py use it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

TILE = 512


@dataclass(frozen=True)
class Patch:
    """An RGB image placed on a glass slide with its top-left corner at (y, x), level 0."""

    y: int
    x: int
    image: np.ndarray

    @property
    def box(self) -> tuple[int, int, int, int]:
        h, w = self.image.shape[:2]
        return self.y, self.y + h, self.x, self.x + w


def level_shapes(height: int, width: int, n_levels: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    for _ in range(n_levels - 1):
        shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    return shapes


def patch_tile_renderer(
    glass_rgb: tuple[int, int, int], patches: list[Patch]
) -> Callable[[int, int, int, int, int], np.ndarray | None]:
    """tile(level, y0, x0, h, w) -> RGB, or None where the tile is bare glass.

    Level k shows each patch shrunk 2^k times (area average) at (y >> k, x >> k).
    """
    shrunk: dict[tuple[int, int], np.ndarray] = {}

    def patch_at(level: int, index: int) -> np.ndarray:
        if (level, index) not in shrunk:
            image = patches[index].image
            f = 2**level
            size = (max(1, image.shape[1] // f), max(1, image.shape[0] // f))
            shrunk[level, index] = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        return shrunk[level, index]

    def tile(level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray | None:
        out = None
        for index, p in enumerate(patches):
            img = patch_at(level, index)
            py, px = p.y >> level, p.x >> level
            ya, yb = max(y0, py), min(y0 + h, py + img.shape[0])
            xa, xb = max(x0, px), min(x0 + w, px + img.shape[1])
            if ya >= yb or xa >= xb:
                continue
            if out is None:
                out = np.empty((h, w, 3), np.uint8)
                out[:] = glass_rgb
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = img[ya - py : yb - py, xa - px : xb - px]
        return out

    return tile


def write_pyramid(
    path: Path,
    height: int,
    width: int,
    glass_rgb: tuple[int, int, int],
    patches: list[Patch],
    um_per_px: float | None,
    n_levels: int = 6,
) -> Path:
    """A tiled (512²), deflate-compressed, pyramidal OME-TIFF of glass with patches on it."""
    render = patch_tile_renderer(glass_rgb, patches)
    glass = np.empty((TILE, TILE, 3), np.uint8)
    glass[:] = glass_rgb
    glass_bytes = zlib.compress(glass.tobytes(), 6)

    def tiles(level: int, h: int, w: int) -> Iterator[bytes]:
        for y0 in range(0, h, TILE):
            for x0 in range(0, w, TILE):
                th, tw = min(TILE, h - y0), min(TILE, w - x0)
                pixels = render(level, y0, x0, th, tw)
                if pixels is None:
                    yield glass_bytes
                    continue
                full = np.empty((TILE, TILE, 3), np.uint8)
                full[:] = glass_rgb
                full[:th, :tw] = pixels
                yield zlib.compress(full.tobytes(), 6)

    shapes = level_shapes(height, width, n_levels)
    metadata = {"axes": "YXS"}
    if um_per_px is not None:
        metadata.update(
            PhysicalSizeX=um_per_px,
            PhysicalSizeY=um_per_px,
            PhysicalSizeXUnit="µm",
            PhysicalSizeYUnit="µm",
        )
    common = {"dtype": np.uint8, "tile": (TILE, TILE), "compression": "zlib", "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(
            tiles(0, height, width),
            shape=(height, width, 3),
            subifds=len(shapes) - 1,
            metadata=metadata,
            **common,
        )
        for level, (h, w) in enumerate(shapes[1:], start=1):
            tif.write(tiles(level, h, w), shape=(h, w, 3), subfiletype=1, metadata=None, **common)
    return path


def write_tiled(path: Path, image: np.ndarray, um_per_px: float | None, n_levels: int = 3) -> Path:
    """An ordinary image stored as a tiled pyramidal OME-TIFF (one patch covering the slide)."""
    h, w = image.shape[:2]
    return write_pyramid(path, h, w, (255, 255, 255), [Patch(0, 0, image)], um_per_px, n_levels)


def smear_field(seed: int, height: int, width: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A synthetic smear field at 0.25 µm/px (uint8 RGB) and its glass colour (median of the
    field's background pixels), so that patches sit on glass of their own background's colour."""
    from rbcbatch.dev.synth import render_field

    field = render_field(
        np.random.default_rng(seed), "normal", "site_a", height, width, um_per_px=0.25
    )
    glass = tuple(int(v) for v in np.median(field.image[field.labels == 0], axis=0))
    return field.image, glass


def four_patches(side: int, region_px: int, seed: int = 7) -> tuple[list[Patch], tuple]:
    """Four 400² quarters of one 800² field on a side² slide (0.25 µm/px, regions of region_px,
    side at least 6 × region_px): where four regions meet, across a region border, inside a
    region, in the slide's corner."""
    image, glass = smear_field(seed, 800, 800)
    quarters = [image[y : y + 400, x : x + 400] for y in (0, 400) for x in (0, 400)]
    corners = [
        (region_px - 200, region_px - 200),
        (side // 4, 3 * region_px - 200),
        (5 * region_px + 312, 5 * region_px + 312),
        (side - 400, side - 400),
    ]
    return [Patch(y, x, q) for (y, x), q in zip(corners, quarters, strict=True)], glass


def covering_patches(side: int, seed: int = 7, field_px: int = 1024) -> tuple[list[Patch], tuple]:
    """Copies of one field_px² field side by side over the whole slide: cells everywhere."""
    image, glass = smear_field(seed, field_px, field_px)
    patches = [
        Patch(y, x, image[: min(field_px, side - y), : min(field_px, side - x)])
        for y in range(0, side, field_px)
        for x in range(0, side, field_px)
    ]
    return patches, glass

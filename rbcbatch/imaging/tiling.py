"""Tile geometry: a slide, at the model's working resolution, cut into cores with a halo.

Cores partition the slide, so every object's centroid lies in exactly one core; the halo gives
the segmenter the context to see whole any object whose centroid is in the core. That is the
whole stitching guarantee, and `TileGeometry` checks the halo is wide enough for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Largest object an object's centroid can sit away from its rim, doubled: a large
# neutrophil or monocyte on a smear is up to ~20 µm across (ICSH 2015 morphology guide).
MAX_OBJECT_DIAMETER_UM = 20.0


@dataclass(frozen=True)
class TileGeometry:
    """Tile core and halo in working pixels, and the working pixel size in µm."""

    tile_px: int = 512
    halo_px: int = 96
    um_per_px: float = 0.25

    def __post_init__(self) -> None:
        if self.tile_px < 32:
            raise ValueError(f"tile_px must be at least 32, got {self.tile_px}")
        if self.halo_px < 0:
            raise ValueError(f"halo_px must be >= 0, got {self.halo_px}")
        if not self.um_per_px > 0:
            raise ValueError(f"um_per_px must be > 0, got {self.um_per_px}")
        if self.halo_um < MAX_OBJECT_DIAMETER_UM:
            need = int(-(-MAX_OBJECT_DIAMETER_UM // self.um_per_px))
            raise ValueError(
                f"halo of {self.halo_px} px = {self.halo_um:.1f} µm is narrower than the largest "
                f"object ({MAX_OBJECT_DIAMETER_UM} µm): cells at tile borders could be cut. "
                f"Use halo_px >= {need} at {self.um_per_px} µm/px"
            )

    @property
    def halo_um(self) -> float:
        return self.halo_px * self.um_per_px

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tile:
    """One tile in working pixels: `core` is owned, `outer` = core + halo clipped to the slide.

    Boxes are (y0, y1, x0, x1), half-open.
    """

    index: int
    core: tuple[int, int, int, int]
    outer: tuple[int, int, int, int]

    @property
    def outer_slices(self) -> tuple[slice, slice]:
        y0, y1, x0, x1 = self.outer
        return slice(y0, y1), slice(x0, x1)


def tile_at(y0: int, x0: int, height: int, width: int, geometry: TileGeometry) -> Tile:
    """The tile whose core starts at (y0, x0) of a height×width image, numbered by its row-major
    place in that image's `tile_grid` (so a region's tiles keep the slide's numbering)."""
    size, halo = geometry.tile_px, geometry.halo_px
    y1, x1 = min(y0 + size, height), min(x0 + size, width)
    outer = (max(0, y0 - halo), min(height, y1 + halo), max(0, x0 - halo), min(width, x1 + halo))
    index = (y0 // size) * math.ceil(width / size) + x0 // size
    return Tile(index, (y0, y1, x0, x1), outer)


def tile_grid(height: int, width: int, geometry: TileGeometry) -> list[Tile]:
    """Row-major tiles covering a height×width working-resolution image."""
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot tile an empty image ({height}×{width})")
    size = geometry.tile_px
    return [
        tile_at(y0, x0, height, width, geometry)
        for y0 in range(0, height, size)
        for x0 in range(0, width, size)
    ]

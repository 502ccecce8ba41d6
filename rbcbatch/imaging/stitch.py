"""Stitch per-tile instance labels into one slide label array.

A tile keeps exactly the objects whose centroid lies in its core (`tiling` makes the halo wide
enough that such an object is whole in the tile), so across all tiles every object is kept
once. Kept objects are painted onto the slide canvas with new, slide-wide ids; where two kept
objects from neighbouring tiles claim the same pixel, the first painted keeps it.
"""

from __future__ import annotations

import numpy as np

from rbcbatch.imaging.tiling import Tile


def centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label pixel count and centroid (row, col) of a label array.

    Returns (count, cy, cx), each indexed by label value (index 0 is background);
    labels absent from the array have count 0 and NaN centroids.
    """
    flat = labels.ravel()
    n = int(flat.max(initial=0)) + 1
    rows, cols = np.divmod(np.arange(flat.size, dtype=np.int64), labels.shape[1])
    count = np.bincount(flat, minlength=n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = np.bincount(flat, weights=rows, minlength=n) / count
        cx = np.bincount(flat, weights=cols, minlength=n) / count
    return count, cy, cx


def core_object_ids(labels: np.ndarray, tile: Tile) -> np.ndarray:
    """Ids (> 0) of the objects in a tile's `outer` labels whose centroid lies in its core."""
    count, cy, cx = centroids(labels)
    oy, _, ox, _ = tile.outer
    y0, y1, x0, x1 = tile.core
    sy, sx = cy + oy, cx + ox  # centroid in slide (working) pixels
    inside = (count > 0) & (sy >= y0) & (sy < y1) & (sx >= x0) & (sx < x1)
    inside[0] = False
    return np.flatnonzero(inside)


def paint_tile(
    canvas: np.ndarray, tile_labels: np.ndarray, tile: Tile, keep: np.ndarray, first_id: int
) -> int:
    """Paint the kept objects of one tile onto the slide canvas, in place.

    canvas: uint32 slide labels (working resolution); tile_labels: the tile's `outer` labels;
    keep: local ids to paint, given ids first_id, first_id + 1, ... in order.
    Returns the next free id.
    """
    lut = np.zeros(int(tile_labels.max(initial=0)) + 1, dtype=np.uint32)
    lut[keep] = np.arange(first_id, first_id + len(keep), dtype=np.uint32)
    new = lut[tile_labels]
    region = canvas[tile.outer_slices]
    free = (region == 0) & (new > 0)
    region[free] = new[free]
    return first_id + len(keep)

"""Stitching: every object is kept once, by the tile whose core holds its centroid."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from rbcbatch.imaging.stitch import centroids, core_object_ids, paint_tile
from rbcbatch.imaging.tiling import TileGeometry, tile_grid


def disks(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, bool)
    for cy, cx in centres:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    return mask


def stitch_with(segment, image_mask, geometry):
    canvas = np.zeros(image_mask.shape, np.uint32)
    next_id = 1
    for tile in tile_grid(*image_mask.shape, geometry):
        labels = segment(image_mask[tile.outer_slices])
        next_id = paint_tile(canvas, labels, tile, core_object_ids(labels, tile), next_id)
    return canvas


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label arrays differ only by the names of their labels."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_tiles_partition_the_image():
    geometry = TileGeometry(tile_px=64, halo_px=80)
    tiles = tile_grid(150, 130, geometry)
    cover = np.zeros((150, 130), int)
    for t in tiles:
        y0, y1, x0, x1 = t.core
        cover[y0:y1, x0:x1] += 1
        assert t.outer[0] <= y0 and t.outer[1] >= y1 and t.outer[2] <= x0 and t.outer[3] >= x1
    assert (cover == 1).all() and len(tiles) == 3 * 3


def test_halo_narrower_than_a_cell_is_refused():
    with pytest.raises(ValueError, match="halo_px >= 80"):
        TileGeometry(tile_px=256, halo_px=16, um_per_px=0.25)


def test_cells_across_borders_and_corners_are_kept_exactly_once():
    geometry = TileGeometry(tile_px=64, halo_px=80)
    # Centres on a vertical border (x=64), a horizontal border (y=128), a four-tile corner
    # (64, 128) and inside a core; radius 12 px so every one of the first three spans tiles.
    centres = [(30, 64), (128, 100), (128, 64), (170, 170), (100, 20)]
    mask = disks((200, 200), centres, 12)
    stitched = stitch_with(lambda m: ndimage.label(m)[0].astype(np.uint32), mask, geometry)
    whole = ndimage.label(mask)[0]
    assert stitched.max() == len(centres) == len(np.unique(stitched)) - 1
    assert same_partition(stitched, whole)
    count, cy, cx = centroids(stitched)
    assert sorted(zip(np.round(cy[1:]), np.round(cx[1:]), strict=True)) == sorted(
        (float(y), float(x)) for y, x in centres
    )


def test_random_field_matches_whole_image_labelling():
    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 300, size=(60, 2))
    mask = disks((300, 300), centres, 7) & ~disks((300, 300), centres, 1)  # rings: holes too
    geometry = TileGeometry(tile_px=48, halo_px=80)
    stitched = stitch_with(lambda m: ndimage.label(m)[0].astype(np.uint32), mask, geometry)
    assert same_partition(stitched, ndimage.label(mask)[0])


def test_centroid_on_a_core_boundary_goes_to_one_tile():
    labels = np.zeros((10, 10), np.uint32)
    labels[4:6, 4:6] = 1  # centroid (4.5, 4.5)
    geometry = TileGeometry(tile_px=32, halo_px=80)
    tile = tile_grid(10, 10, geometry)[0]
    assert core_object_ids(labels, tile).tolist() == [1]

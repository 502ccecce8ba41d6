"""Cell masks as OME-Zarr: label pyramids with their NGFF metadata, written chunk-aligned."""

from __future__ import annotations

import zarr

# Chunk edge of mask arrays: 512² uint32 = 1 MiB raw, a few KiB compressed.
MASK_CHUNK = 512
# Pyramid levels halve until the longest side is at most PYRAMID_MIN_SIDE (a thumbnail).
MAX_PYRAMID_LEVELS = 8
PYRAMID_MIN_SIDE = 256


def mask_level_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Shapes of a mask's pyramid: each level halves the last (rounding up, as [::2, ::2]) until
    its longest side is at most PYRAMID_MIN_SIDE, MAX_PYRAMID_LEVELS at most."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while len(shapes) < MAX_PYRAMID_LEVELS and max(shapes[-1]) > PYRAMID_MIN_SIDE:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def mask_attrs(slide_id: str, um_per_px: float, n_levels: int, attrs: dict) -> dict:
    """OME-Zarr 0.5 label metadata of a mask pyramid (µm scale per level) plus rbcbatch's own."""
    datasets = [
        {
            "path": str(index),
            "coordinateTransformations": [
                {"type": "scale", "scale": [um_per_px * 2**index, um_per_px * 2**index]}
            ],
        }
        for index in range(n_levels)
    ]
    return {
        "ome": {
            "version": "0.5",
            "multiscales": [
                {
                    "name": slide_id,
                    "axes": [
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": datasets,
                }
            ],
            "image-label": {"version": "0.5"},
        },
        "rbcbatch": attrs,
    }


def fill_pyramid(
    levels: list[zarr.Array], painted: list[tuple[int, int, int, int]], block: int = 2048
) -> None:
    """Fill levels 1.. from level 0 (each level[k] = level[k-1][::2, ::2]) block by block, so
    that memory holds one block, never a level. painted: (y0, y1, x0, x1) boxes of level 0 that
    hold labels; blocks outside them stay unwritten (all 0)."""
    for k in range(1, len(levels)):
        src, dst = levels[k - 1], levels[k]
        boxes = [(y0 >> k, -(-y1 >> k), x0 >> k, -(-x1 >> k)) for y0, y1, x0, x1 in painted]
        height, width = dst.shape
        for y0 in range(0, height, block):
            for x0 in range(0, width, block):
                y1, x1 = min(y0 + block, height), min(x0 + block, width)
                if not any(a < y1 and b > y0 and c < x1 and d > x0 for a, b, c, d in boxes):
                    continue
                dst[y0:y1, x0:x1] = src[2 * y0 : 2 * y1, 2 * x0 : 2 * x1][::2, ::2]

"""Cell masks as OME-Zarr 0.5: per slide, a small RGB overview image whose `labels/cells` is the
uint32 label pyramid, with their NGFF metadata, written chunk-aligned.

    masks.zarr/<slide_id>/           multiscale image: RGB overview, uint8 (3, h, w), axes c, y, x
      0, 1, ...                      level 0 is OVERVIEW_FACTOR× coarser than the labels' level 0
      labels/                        {"ome": {"labels": ["cells"]}}
        cells/0, 1, ...              uint32 (H, W) labels, axes y, x; "image-label" -> ../../

The label image must have a parent image for OME-Zarr readers (ome-zarr, napari) to place it,
and OME-Zarr validators (ome-zarr-models) want as many image levels as label levels. Runs
written before kept the label arrays at `<slide_id>/0, 1, ...`; `label_group_path` finds either.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import zarr

# Chunk edge of mask arrays: 512² uint32 = 1 MiB raw, a few KiB compressed.
MASK_CHUNK = 512
# Pyramid levels halve until the longest side is at most PYRAMID_MIN_SIDE (a thumbnail).
MAX_PYRAMID_LEVELS = 8
PYRAMID_MIN_SIDE = 256
# Label pixels per overview pixel at level 0: a 40,000² slide's overview is 5000² × 3 = 75 MB,
# small beside its labels, and 2 µm/px at 0.25 µm/px, where red cells (7.5 µm) are still seen.
OVERVIEW_FACTOR = 8
# The one label image of a slide, and where it lies in the slide's group.
LABEL_NAME = "cells"
LABELS_PATH = f"labels/{LABEL_NAME}"
OME_VERSION = "0.5"


def mask_level_shapes(shape: tuple[int, int]) -> list[tuple[int, int]]:
    """Shapes of a mask's pyramid: each level halves the last (rounding up, as [::2, ::2]) until
    its longest side is at most PYRAMID_MIN_SIDE, MAX_PYRAMID_LEVELS at most."""
    shapes = [(int(shape[0]), int(shape[1]))]
    while len(shapes) < MAX_PYRAMID_LEVELS and max(shapes[-1]) > PYRAMID_MIN_SIDE:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def overview_level_shapes(shape: tuple[int, int], n_levels: int) -> list[tuple[int, int]]:
    """(h, w) of each overview level of a slide whose labels are (H, W): level 0 is
    ceil(H / OVERVIEW_FACTOR) × ceil(W / OVERVIEW_FACTOR), each next one halves it (rounding up),
    n_levels in all, as many as the label pyramid has."""
    shapes = [(-(-int(shape[0]) // OVERVIEW_FACTOR), -(-int(shape[1]) // OVERVIEW_FACTOR))]
    while len(shapes) < n_levels:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def overview_pyramid(
    rgb: np.ndarray, shape: tuple[int, int], n_levels: int
) -> Iterator[np.ndarray]:
    """The overview levels of a slide with (H, W) labels, from an RGB view of the whole slide at
    any resolution (uint8 (h, w, 3): the full image, or a coarse level of a whole-slide image):
    area-averaged to each of `overview_level_shapes`, each level from the one before. Yields
    uint8 (3, h, w) views, one level at a time, so memory holds two levels at most."""
    level = np.asarray(rgb)
    for h, w in overview_level_shapes(shape, n_levels):
        if level.shape[:2] != (h, w):
            level = cv2.resize(np.ascontiguousarray(level), (w, h), interpolation=cv2.INTER_AREA)
        yield level.transpose(2, 0, 1)


def _axes_yx() -> list[dict]:
    return [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]


def _multiscales(name: str, axes: list[dict], transforms: list[list[dict]]) -> list[dict]:
    datasets = [
        {"path": str(index), "coordinateTransformations": t} for index, t in enumerate(transforms)
    ]
    return [{"name": name, "axes": axes, "datasets": datasets}]


def image_attrs(slide_id: str, um_per_px: float, n_levels: int) -> dict:
    """OME-Zarr 0.5 metadata of a slide's group: the multiscale RGB overview (axes c, y, x, µm).

    An overview pixel at level k averages f = OVERVIEW_FACTOR · 2**k label pixels a side, so its
    centre lies (f - 1) / 2 label pixels in: the translation that puts it over those labels."""
    transforms = []
    for index in range(n_levels):
        f = OVERVIEW_FACTOR * 2**index
        shift = um_per_px * (f - 1) / 2
        transforms.append(
            [
                {"type": "scale", "scale": [1.0, um_per_px * f, um_per_px * f]},
                {"type": "translation", "translation": [0.0, shift, shift]},
            ]
        )
    axes = [{"name": "c", "type": "channel"}, *_axes_yx()]
    return {
        "ome": {"version": OME_VERSION, "multiscales": _multiscales(slide_id, axes, transforms)}
    }


def labels_attrs() -> dict:
    """OME-Zarr 0.5 metadata of a slide's `labels` group: the names of its label images."""
    return {"ome": {"version": OME_VERSION, "labels": [LABEL_NAME]}}


def label_attrs(um_per_px: float, n_levels: int, attrs: dict) -> dict:
    """OME-Zarr 0.5 metadata of the label pyramid `labels/cells` (µm scale per level, its
    source the slide's overview two groups up) plus rbcbatch's own under "rbcbatch"."""
    transforms = [
        [{"type": "scale", "scale": [um_per_px * 2**index, um_per_px * 2**index]}]
        for index in range(n_levels)
    ]
    return {
        "ome": {
            "version": OME_VERSION,
            "multiscales": _multiscales(LABEL_NAME, _axes_yx(), transforms),
            "image-label": {"version": OME_VERSION, "source": {"image": "../../"}},
        },
        "rbcbatch": attrs,
    }


def label_group_path(masks: zarr.Group, slide_id: str) -> str:
    """Path in masks.zarr of a slide's label pyramid (the group holding arrays 0, 1, ...):
    `<slide_id>/labels/cells`, or `<slide_id>` in runs written before masks had an overview.

    Raises KeyError when the slide has neither."""
    for path in (f"{slide_id}/{LABELS_PATH}", slide_id):
        if f"{path}/0" in masks:
            return path
    raise KeyError(
        f"masks.zarr has no label pyramid for slide {slide_id!r} (neither "
        f"{slide_id}/{LABELS_PATH}/0 nor {slide_id}/0): was the slide committed in this run?"
    )


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

"""Cell crops for a classifier: squares of fixed µm around each cell, resized to the model's
input, and the same stain-normalised against the cell's own slide."""

from __future__ import annotations

import math
from collections.abc import Mapping

import cv2
import numpy as np

from rbcbatch.imaging.density import apply_lut, slide_stain, stain_lut


def cell_crops(
    image: np.ndarray,
    points: np.ndarray,
    um_per_px: float,
    crop_um: float = 14.0,
    out_px: int = 64,
) -> np.ndarray:
    """Square crops centred on cells, normalised to µm: uint8 (N, out_px, out_px, 3).

    image: uint8 (H, W, 3); points: (N, 2) or (N, 3) with x, y in the first two columns (pixels).
    Each crop covers ``crop_um`` µm (rounded to whole source pixels: < 1% off at Chula's 72 px), is
    reflect-padded where it leaves the image and resized with INTER_AREA when shrinking,
    INTER_LINEAR when enlarging. 14 µm holds a macrocyte (~9-10 µm) with some context.
    """
    if um_per_px <= 0 or crop_um <= 0 or out_px <= 0:
        raise ValueError("um_per_px, crop_um and out_px must be positive")
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise ValueError(f"points must be (N, 2) or (N, 3), got shape {pts.shape}")
    side = max(1, round(crop_um / um_per_px))
    out = np.empty((len(pts), out_px, out_px, 3), dtype=np.uint8)
    if len(pts) == 0:
        return out
    pad = side // 2 + 1
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    interp = cv2.INTER_AREA if side > out_px else cv2.INTER_LINEAR
    half = side / 2.0
    for i, (x, y) in enumerate(pts[:, :2].astype(np.float64)):
        x0 = int(math.floor(x + 0.5 - half)) + pad
        y0 = int(math.floor(y + 0.5 - half)) + pad
        crop = padded[y0 : y0 + side, x0 : x0 + side]
        out[i] = (
            crop if side == out_px else cv2.resize(crop, (out_px, out_px), interpolation=interp)
        )
    return out


# Stain-normalised crops: the learned classifier sees each cell's colour against its own slide.
# Each slide's median red-cell OD per channel is mapped to STAIN_TARGET_OD (the median of the
# Chula RBC-12 training images), on white glass, so that a paler or bluer stain, or another
# lamp, moves the reference with the cells; a spherocyte stays denser than its slide's
# discocytes. Scale stays absolute (µm, from the catalog or the site's estimate): microcytes
# and macrocytes are absolute, and the estimate already draws a site's median cell at 7.5 µm.
STAIN_TARGET_OD = (0.15, 0.35, 0.24)


def slide_crops(
    image: np.ndarray,
    points: np.ndarray,
    columns: Mapping[str, np.ndarray],
    um_per_px: float,
    crop_um: float = 14.0,
    out_px: int = 64,
) -> np.ndarray:
    """Crops at `points` (N, 2+) stain-normalised against the slide's own objects (`columns`:
    the slide's measure columns, mean_r/g/b): uint8 (N, out_px, out_px, 3)."""
    crops = cell_crops(image, points, um_per_px, crop_um, out_px)
    cell_rgb = np.stack([columns["mean_r"], columns["mean_g"], columns["mean_b"]], axis=1)
    glass, cell_od = slide_stain(image, cell_rgb)
    return apply_lut(crops, stain_lut(glass, cell_od, STAIN_TARGET_OD))

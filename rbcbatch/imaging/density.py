"""Optical density: the one definition every stage uses.

Stained cells attenuate light multiplicatively (Beer-Lambert), so absorption adds up in
optical density, not in intensity. rbcbatch uses the natural-log density against the slide's
background (glass) colour, per RGB channel, with one count added to both sides so that a black
pixel stays finite:

    OD = ln((background + 1) / (pixel + 1))

The classical segmenter's thresholds, the U-Net's input, the calibration, the glass test of
whole-slide images and the `mean_od` column of the cells table are all in this unit.
"""

from __future__ import annotations

import numpy as np


def optical_density(image: np.ndarray, background) -> np.ndarray:
    """Per-channel OD, float32 with the shape of `image` (..., 3); not clipped.

    image: uint8 (or float) intensities; background: (3,), or broadcastable to the image, in
    the same units. Pixels brighter than the background read negative: callers clip as they need.
    """
    bg = np.asarray(background, dtype=np.float32)
    return np.log((bg + 1.0) / (np.asarray(image, dtype=np.float32) + 1.0))


def intensity_at(od, background) -> np.ndarray:
    """The intensity whose OD against `background` is `od` (the inverse of optical_density)."""
    bg = np.asarray(background, dtype=np.float32)
    return (bg + 1.0) * np.exp(-np.asarray(od, dtype=np.float32)) - 1.0


def mean_od_lut(background) -> np.ndarray:
    """float64 (3, 256): each channel's OD of every uint8 level, floored at 0 and divided by 3,
    so that summing the three lookups of a pixel gives its mean-over-channels OD. A lookup is
    much cheaper than a log per pixel on large images."""
    levels = np.arange(256, dtype=np.float32)[None, :]
    bg = np.asarray(background, dtype=np.float32).reshape(3, 1)
    return np.maximum(optical_density(levels, bg), 0.0).astype(np.float64) / 3.0


def mean_optical_density(image: np.ndarray, background) -> np.ndarray:
    """Mean-over-channels OD, float32 (H, W), floored at 0 per channel.

    image: (H, W, 3) uint8; background: (3,). Pixels brighter than the background (noise) add 0
    rather than a negative density.
    """
    lut = mean_od_lut(background)
    od = lut[0][image[..., 0]] + lut[1][image[..., 1]] + lut[2][image[..., 2]]
    return od.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Stain normalisation per slide
# ---------------------------------------------------------------------------------------------

# Glass is the brightest part of a smear: its colour is the median of the pixels brighter than
# the GLASS_QUANTILE quantile (every STAIN_SAMPLE_STEP-th row and column). AneRBC's densest
# fields cover ~60% of the image with cells, so the top quarter is still glass; a higher
# quantile picks the brightest glass, and the typical glass then keeps a tint.
GLASS_QUANTILE = 0.75
STAIN_SAMPLE_STEP = 4
# A floor on a channel's cell OD so that a faint or blank image does not divide by ~0.
MIN_CELL_OD = 0.02


def slide_stain(image: np.ndarray, cell_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(glass RGB (3,), median red-cell OD per channel (3,)), float32.

    image: uint8 (H, W, 3); cell_rgb: (N, 3) mean colour of each segmented object. The median
    over objects is the red cells' even where a dark white-cell nucleus fills much of a field
    (a pixel threshold there splits nucleus from everything else). Two slides of one stain and
    camera give nearly the same pair; a paler stain or another lamp moves both, and
    `stain_lut` maps them back to a common reference.
    """
    px = np.asarray(image)[::STAIN_SAMPLE_STEP, ::STAIN_SAMPLE_STEP].reshape(-1, 3)
    if len(px) == 0:
        raise ValueError("slide_stain: empty image")
    px = px.astype(np.float32)
    bright = px.sum(axis=1)
    glass = np.median(px[bright >= np.quantile(bright, GLASS_QUANTILE)], axis=0)
    cells = np.asarray(cell_rgb, dtype=np.float32).reshape(-1, 3)
    cells = cells[np.isfinite(cells).all(axis=1)]
    cell_od = np.median(optical_density(cells, glass), axis=0) if len(cells) else np.zeros(3)
    return glass.astype(np.float32), np.maximum(cell_od, MIN_CELL_OD).astype(np.float32)


def stain_lut(glass, cell_od, target_od) -> np.ndarray:
    """uint8 (3, 256): per channel, each level's OD against `glass`, scaled so that the slide's
    cell OD becomes `target_od`, back to an intensity on white (255) glass."""
    levels = np.arange(256, dtype=np.float32)
    lut = np.empty((3, 256), np.uint8)
    for c in range(3):
        od = optical_density(levels, glass[c]) * (float(target_od[c]) / float(cell_od[c]))
        lut[c] = np.clip(np.rint(intensity_at(od, 255.0)), 0, 255).astype(np.uint8)
    return lut


def apply_lut(image: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) through a per-channel (3, 256) lookup table."""
    out = np.empty_like(image)
    for c in range(3):
        out[..., c] = lut[c][image[..., c]]
    return out

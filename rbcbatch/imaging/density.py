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

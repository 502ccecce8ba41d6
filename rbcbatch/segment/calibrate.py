"""Pixel-size calibration: estimate µm/px from the red cells themselves.

Real archives often lack the pixel size (none of the public smear sets states one). A normal
red cell on a dried smear is ~7.5 µm across, so the median diameter of isolated, round, fully
visible cells gives the scale. The estimate reads high on fields dominated by small cells
(spherocytes, microcytes) and low on macrocytic ones; the manifest says when it was used.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from scipy import ndimage as ndi

from rbcbatch.imaging.density import optical_density
from rbcbatch.segment.classical import estimate_slide_stats

# Mean diameter of a normal red cell on a dried, stained smear (standard haematology texts give
# 7.5 µm, range about 6.2-8.2 µm).
RBC_DIAMETER_UM = 7.5
# A single cell is convex (solidity ~0.97 for a digitised disk); two touching disks give ~0.88
# and chains less, so above this a component is taken as one cell.
MIN_CELL_SOLIDITY = 0.92
# Inertia-ellipse axis ratio above which a component is a pair, not a cell (a lone discocyte is
# below ~1.15; two touching disks ~2).
MAX_CELL_ASPECT = 1.5
# Components smaller than this many pixels are debris or noise at any usable magnification.
MIN_COMPONENT_PX = 30
# Kept cells lie within this factor band of the first median diameter (drops platelets, WBCs and
# convex clumps that passed the shape tests).
SIZE_BAND = (0.65, 1.5)


def _foreground(image: np.ndarray) -> np.ndarray:
    """Stained-cell mask bool (H, W) with pallor holes filled, from the slide's own OD threshold."""
    stats = estimate_slide_stats(image)
    # The segmenter's optical density, so that stats.od_threshold applies.
    od = optical_density(image, stats.background_rgb)
    proj = od @ np.asarray(stats.rbc_direction, dtype=np.float32)
    proj = cv2.GaussianBlur(proj, (0, 0), 1.0)
    fg = proj > stats.od_threshold
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    return ndi.binary_fill_holes(fg)


def _shape_ok(component: np.ndarray) -> bool:
    """Whether one component (bool crop) looks like a single cell: convex and roughly round."""
    contours, _ = cv2.findContours(
        component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    contour = max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(contour))
    if hull <= 0 or cv2.contourArea(contour) / hull < MIN_CELL_SOLIDITY:
        return False
    ys, xs = np.nonzero(component)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64))
    lo, hi = np.linalg.eigvalsh(cov)
    return lo > 0 and math.sqrt(hi / lo) <= MAX_CELL_ASPECT


def cell_diameters_px(image: np.ndarray) -> np.ndarray:
    """Equivalent-circle diameters (px) of isolated, round, fully visible cells: float64 (N,).

    image: uint8 (H, W, 3) RGB at any magnification: nothing here assumes a pixel size. Cells
    are found by an OD threshold; components cut by the border, non-convex (clumps) or elongated
    (pairs) are skipped, then only those within SIZE_BAND of the median diameter are kept.
    """
    fg = _foreground(image)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    h, w = fg.shape
    diam = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < MIN_COMPONENT_PX or x == 0 or y == 0 or x + bw == w or y + bh == h:
            continue
        if _shape_ok(lab[y : y + bh, x : x + bw] == i):
            diam.append(2.0 * math.sqrt(area / math.pi))
    d = np.asarray(diam, dtype=np.float64)
    if len(d) == 0:
        return d
    med = np.median(d)
    return d[(d >= SIZE_BAND[0] * med) & (d <= SIZE_BAND[1] * med)]


def estimate_um_per_px(
    image: np.ndarray, rbc_diameter_um: float = RBC_DIAMETER_UM
) -> tuple[float, int]:
    """Pixel size of a smear image from its red cells: (µm per px, number of cells used).

    image: uint8 (H, W, 3) RGB. Assumes the median isolated red cell is ``rbc_diameter_um``
    across, so it reads high on fields dominated by small cells (spherocytes, microcytes) and
    low on macrocytic ones (Chula images: 0.16-0.24 around 0.195). Returns (nan, 0) when no isolated cell is found.
    """
    d = cell_diameters_px(image)
    if len(d) == 0:
        return float("nan"), 0
    return rbc_diameter_um / float(np.median(d)), len(d)

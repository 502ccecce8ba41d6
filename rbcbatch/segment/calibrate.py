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
from rbcbatch.segment.classical import SlideStats, estimate_slide_stats

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
# Kept cells lie within this factor band of the area-weighted median diameter of the candidates
# (drops platelets, WBCs and convex clumps that passed the shape tests). Weighted by area, since
# a crowded field of large cells (BCCD) can hold fewer isolated cells than specks of debris and
# platelets, whose plain median would then set the band (the specks are ~1/50 of a cell's area).
SIZE_BAND = (0.65, 1.5)
# A component that fails the shape tests is opened with a disk of this fraction of its largest
# inscribed radius, which cuts the necks by which cells touch (two disks touching with a neck
# narrower than their radius) and leaves a disk of that radius whole; each piece is tested anew.
# Crowded sets with large cells (BCCD, ~100 px) hold few cells that touch nothing.
NECK_OPEN_FRACTION = 0.5
# A cell's outline is re-drawn at half its own contrast over its local background (the half-
# maximum of its own edge), not at the slide's threshold: on a field of uneven illumination, or of
# cells paler than the slide's median cell (BCCD), the slide threshold cuts pale cells inside
# their edge. The outline may move out by EDGE_BAND of the cell's diameter at most, and never onto
# pixels nearer to another stained object; where it does not stay one round cell (it ran into a
# pale neighbour), the outline at the slide's threshold is kept.
EDGE_FRACTION = 0.5
EDGE_BAND = 0.1
# Local background: the unstained pixels between these fractions of the diameter outside the cell
# (at least MIN_BACKGROUND_PX of them, else the slide's background, OD 0).
BACKGROUND_RING = (0.1, 0.25)
MIN_BACKGROUND_PX = 20
# A candidate whose median OD stands less than this fraction of the slide's threshold above its
# local background is no cell but a darker patch of a pale one (BCCD's faint, blurred cells break
# into such specks at the slide threshold).
MIN_CONTRAST = 0.5


def _density(image: np.ndarray) -> tuple[SlideStats, np.ndarray, np.ndarray]:
    """The slide's stats, its OD float32 (H, W, 3) and the smoothed projection on the red-cell
    direction float32 (H, W), in which stats.od_threshold applies."""
    stats = estimate_slide_stats(image)
    # The segmenter's optical density, so that stats.od_threshold applies.
    od = optical_density(image, stats.background_rgb)
    proj = od @ np.asarray(stats.rbc_direction, dtype=np.float32)
    return stats, od, cv2.GaussianBlur(proj, (0, 0), 1.0)


def _threshold_mask(proj: np.ndarray, threshold: float) -> np.ndarray:
    fg = proj > threshold
    fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    return ndi.binary_fill_holes(fg)


def _foreground(image: np.ndarray) -> np.ndarray:
    """Stained-cell mask bool (H, W) with pallor holes filled, from the slide's own OD threshold."""
    stats, _, proj = _density(image)
    return _threshold_mask(proj, stats.od_threshold)


def _shape_ok(component: np.ndarray) -> bool:
    """Whether one component (bool crop) looks like a single cell: convex and roughly round."""
    contours, _ = cv2.findContours(
        component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return False
    contour = max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(contour))
    if hull <= 0 or cv2.contourArea(contour) / hull < MIN_CELL_SOLIDITY:
        return False
    # Inertia ellipse from the central second moments of the pixels.
    m = cv2.moments(component.astype(np.uint8), binaryImage=True)
    mean = 0.5 * (m["mu20"] + m["mu02"])
    half_diff = math.hypot(0.5 * (m["mu20"] - m["mu02"]), m["mu11"])
    lo, hi = mean - half_diff, mean + half_diff
    return lo > 0 and math.sqrt(hi / lo) <= MAX_CELL_ASPECT


def _filled(mask: np.ndarray) -> np.ndarray:
    """`mask` (bool) with its holes filled (cv2's outer contours: much faster than scipy's
    binary_fill_holes on the many small windows of a field)."""
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, thickness=cv2.FILLED)
    return out > 0


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _pieces(component: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """A component (bool crop) as single-cell candidates: int32 labels (0 = none), their count
    and whether they are pieces cut from it (their shape still untested); the component itself
    when it passes the shape tests, else what is left of it after an opening that cuts its
    necks (NECK_OPEN_FRACTION)."""
    one = component.astype(np.uint8)
    if _shape_ok(component):
        return one.astype(np.int32), 1, False
    pad = np.pad(one, 1)
    inscribed = float(cv2.distanceTransform(pad, cv2.DIST_L2, 5).max())
    radius = int(round(NECK_OPEN_FRACTION * inscribed))
    if radius < 2:
        return np.zeros(component.shape, np.int32), 0, True
    pad = np.pad(one, radius + 1)
    opened = cv2.morphologyEx(pad, cv2.MORPH_OPEN, _disk(radius))[
        radius + 1 : -radius - 1, radius + 1 : -radius - 1
    ]
    n, lab = cv2.connectedComponents(opened, connectivity=8)
    return lab.astype(np.int32), n - 1, True


def _edge_outline(
    proj: np.ndarray, piece: np.ndarray, others: np.ndarray, stats: SlideStats
) -> np.ndarray | None:
    """The cell `piece` (bool, a window of the image around it) re-drawn at half its own
    contrast over its local background (EDGE_FRACTION), within EDGE_BAND of its diameter and
    nearer to it than to `others` (bool, the other stained objects); `piece` itself where the
    new outline is no longer one round cell; None where the piece does not stand out of its
    surroundings (MIN_CONTRAST)."""
    d0 = 2.0 * math.sqrt(piece.sum() / math.pi)
    to_piece = cv2.distanceTransform((~piece).astype(np.uint8), cv2.DIST_L2, 5)
    if others.any():
        nearer = to_piece < cv2.distanceTransform((~others).astype(np.uint8), cv2.DIST_L2, 5)
    else:
        nearer = np.ones(piece.shape, bool)
    ring = (
        nearer
        & (to_piece > BACKGROUND_RING[0] * d0)
        & (to_piece <= BACKGROUND_RING[1] * d0)
        & (proj <= stats.od_threshold)
    )
    background = float(np.median(proj[ring])) if ring.sum() >= MIN_BACKGROUND_PX else 0.0
    contrast = float(np.median(proj[piece])) - background
    if contrast < MIN_CONTRAST * stats.od_threshold:
        return None
    zone = nearer & (to_piece <= max(2.0, EDGE_BAND * d0))
    grown = (proj > background + EDGE_FRACTION * contrast) & zone
    n, lab = cv2.connectedComponents(grown.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[lab[piece & grown]] = True
    keep[0] = False
    cell = _filled(keep[lab])
    return cell if cell.any() and _shape_ok(cell) else piece


def _candidates(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Isolated, round, fully visible cell candidates before the size and colour tests:
    diameters px float64 (N,), mean hue angle (rad) off the red-cell direction float64 (N,), and
    the slide's nuclear angle."""
    stats, od, proj = _density(image)
    fg = _threshold_mask(proj, stats.od_threshold)
    n, lab, boxes, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    h, w = fg.shape
    direction = np.asarray(stats.rbc_direction, dtype=np.float64)
    diam, angle = [], []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in boxes[i])
        if area < MIN_COMPONENT_PX:
            continue
        pieces, m, cut = _pieces(lab[y : y + bh, x : x + bw] == i)
        for j in range(1, m + 1):
            piece = pieces == j
            ys, xs = np.nonzero(piece)
            if len(ys) < MIN_COMPONENT_PX or (cut and not _shape_ok(piece)):
                continue
            px0, py0, px1, py1 = x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1
            if px0 == 0 or py0 == 0 or px1 == w or py1 == h:
                continue
            # A window around the piece, room for its outline to move.
            margin = int(math.ceil(BACKGROUND_RING[1] * 2.0 * math.sqrt(len(ys) / math.pi))) + 3
            wx0, wy0 = max(0, px0 - margin), max(0, py0 - margin)
            wx1, wy1 = min(w, px1 + margin), min(h, py1 + margin)
            mine = np.zeros((wy1 - wy0, wx1 - wx0), bool)
            mine[ys + y - wy0, xs + x - wx0] = True
            # Other stained objects: other components, and the other pieces of this one (the
            # pixels its opening removed are free).
            others = fg[wy0:wy1, wx0:wx1] & (lab[wy0:wy1, wx0:wx1] != i)
            cx0, cy0 = max(x, wx0), max(y, wy0)
            cx1, cy1 = min(x + bw, wx1), min(y + bh, wy1)
            rest = pieces[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
            others[cy0 - wy0 : cy1 - wy0, cx0 - wx0 : cx1 - wx0] |= (rest > 0) & (rest != j)
            cell = _edge_outline(proj[wy0:wy1, wx0:wx1], mine, others, stats)
            if cell is None:
                continue
            # A cell whose outline reaches the image border is not fully visible.
            if (wx0 == 0 and cell[:, 0].any()) or (wy0 == 0 and cell[0].any()):
                continue
            if (wx1 == w and cell[:, -1].any()) or (wy1 == h and cell[-1].any()):
                continue
            mean_od = od[wy0:wy1, wx0:wx1][mine].mean(axis=0).astype(np.float64)
            along = float(mean_od @ direction)
            across = float(np.linalg.norm(mean_od - along * direction))
            diam.append(2.0 * math.sqrt(float(cell.sum()) / math.pi))
            angle.append(math.atan2(across, along))
    return np.asarray(diam, np.float64), np.asarray(angle, np.float64), stats.nuclear_angle


def _area_weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def cell_diameters_px(image: np.ndarray) -> np.ndarray:
    """Equivalent-circle diameters (px) of isolated, round, fully visible cells: float64 (N,).

    image: uint8 (H, W, 3) RGB at any magnification: nothing here assumes a pixel size. Cells
    are found by an OD threshold; components cut by the border, non-convex (clumps) or elongated
    (pairs) are skipped after their necks are cut (NECK_OPEN_FRACTION); each cell's outline is
    re-drawn at half its own edge contrast (EDGE_FRACTION); objects of nuclear hue (WBC nuclei,
    platelets) are dropped; then only those within SIZE_BAND of the area-weighted median
    diameter are kept (weighted by area, so that a field of few cells and many specks of debris
    is still measured by its cells).
    """
    diam, angle, nuclear_angle = _candidates(image)
    # Candidates whose mean OD lies further off the red-cell hue than the slide's nuclear angle
    # are white-cell nuclei or platelets, however round and isolated (BCCD's nuclei are convex
    # and as large as its red cells; its platelets outnumber its isolated red cells).
    d = diam[angle <= nuclear_angle]
    if len(d) == 0:
        return d
    med = _area_weighted_median(d, d * d)
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

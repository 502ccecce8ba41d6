"""Classical red-cell segmentation: optical-density threshold + distance-transform watershed.

Why optical density: stained cells attenuate light multiplicatively (Beer-Lambert), so
``OD = log(background / pixel)`` is additive, independent of illumination and linear in stain
amount. Pixels are projected onto the slide's red-cell OD direction (a unit RGB vector): that is
the best single channel for finding red cells, and the OD left orthogonal to it (the hue angle)
picks out nuclear-stained objects (WBC nuclei, platelets), which absorb a different colour mix.

Thresholds are estimated once per slide (``estimate_slide_stats``) so that all tiles of a slide
agree and a tile of pure background does not get a threshold of its own. Only the illumination
(vignetting) is corrected per tile, from the tile's own background pixels.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from rbcbatch.imaging.density import optical_density
from rbcbatch.vocabulary import OBJECT_KINDS

__all__ = [
    "ClassicalParams",
    "ClassicalSegmenter",
    "SlideStats",
    "Segmentation",
    "estimate_slide_stats",
]


def _unit(v: tuple[float, float, float]) -> tuple[float, float, float]:
    n = math.sqrt(sum(c * c for c in v))
    return (v[0] / n, v[1] / n, v[2] / n)


# --- Optical density and slide statistics -------------------------------------------------------
# OD values are clipped here: a pixel 20x darker than background is opaque debris, and clipping
# keeps such outliers (dark dust, pen marks) from dragging Otsu thresholds.
OD_MAX = 3.0
# RBC OD direction for slides with too few cells to estimate one: the mean of the red-cell OD
# directions measured on AneRBC-I (0.61, 0.74, 0.29) and the Wright-like synthetic site.
DEFAULT_RBC_DIRECTION = _unit((0.51, 0.75, 0.37))
# Foreground threshold as a fraction of the median OD of cell pixels: half the rim contrast, i.e.
# the half-maximum of the blurred cell edge. The synthetic truth puts the outline at ~0.45x
# (measured edge profiles); the AneRBC-I masks a little further in (OUTLINE_FRACTION_OF_CELL_OD).
FG_FRACTION_OF_CELL_OD = 0.5
# Pale objects that never reach the threshold are taken at this lower level (fraction of cell OD).
PALE_FRACTION_OF_CELL_OD = 0.25
# Outline: red-cell edge pixels whose unsmoothed OD is below this fraction of cell OD are peeled
# off the foreground, at most OUTLINE_PEEL_UM deep (the offset from the detection threshold is
# sub-pixel; a whole-pixel erosion or a deeper peel would open pallor). Tuned on AneRBC-I 001-003
# (both groups): their masks trace the raw, unsmoothed pixels at ~0.55x (0.36-0.66x per image),
# and mean foreground Dice there peaks at 0.55 (0.937 -> 0.942). Detection and splitting keep the
# 0.5x threshold, which the synthetic truth needs; peeling first also opens thin bridges between
# touching cells (synthetic count F1 0.979 -> 0.980).
OUTLINE_FRACTION_OF_CELL_OD = 0.55
OUTLINE_PEEL_UM = 0.5
# Floors of the foreground threshold: absolute, and in units of background OD noise (SD).
FG_THRESHOLD_MIN = 0.03
FG_THRESHOLD_NOISE_SD = 6.0
# Default threshold for slides without enough cell pixels (half of a typical cell OD of ~0.2-0.5).
FG_THRESHOLD_DEFAULT = 0.10
MIN_CELL_FRACTION = 0.005  # fewer candidate cell pixels than this: use the defaults
# Nuclear stain: hue angle (rad) between a pixel's OD and the red-cell direction. The slide's
# threshold is twice the 90th percentile of red-cell pixel angles (0.08-0.09 rad on AneRBC-I),
# kept within this range; nuclei sit at 0.35-0.6 rad, platelets at ~0.3-0.4.
NUCLEAR_ANGLE_DEFAULT = 0.30
NUCLEAR_ANGLE_RANGE = (0.22, 0.40)
# Nuclear pixels must also be clearly stained: OD at least this multiple of the fg threshold.
NUCLEAR_OD_FACTOR = 2.0

# --- Background -----------------------------------------------------------------------------------
# Local background: pixels within this relative tolerance of the local brightness maximum count as
# background; illumination (vignetting, up to ~15 % on AneRBC-I) may vary within this range.
BACKGROUND_TOLERANCE = 0.04
ILLUMINATION_RANGE = (0.70, 1.25)
BACKGROUND_DOWNSAMPLE = 4  # the illumination field is smooth: estimate it at 1/4 resolution

# --- Foreground clean-up ------------------------------------------------------------------------
# A hole inside the foreground is pallor (filled) if its mean OD is at least this fraction of the
# foreground threshold (bare glass has ~0; pallor of pale real cells can be as low as ~0.3x) ...
PALLOR_OD_FRACTION = 0.1
# ... and round: area / (pi * inscribed radius^2) is ~1-1.3 for pallor, while the cusped gap
# between three touching disks has ~2.1 and between four ~1.6. Holes of a few pixels are noise.
HOLE_MAX_ELONGATION = 1.45
HOLE_ALWAYS_FILL_PX = 6
# Debris: grey-black (neutral) pixels denser than DEBRIS_OD_FACTOR x the cell OD; stain is never
# neutral (red cells and nuclei absorb green 2-4x more than blue). Objects with more than
# DEBRIS_MAX_FRACTION of such pixels (dust, pen marks, precipitate) are dropped.
NEUTRAL_MIN_RATIO = 0.6  # smallest / largest channel OD above which a pixel is neutral grey
DEBRIS_OD_FACTOR = 3.0
DEBRIS_MAX_FRACTION = 0.3
# Objects with at least this fraction of nuclear-stain pixels are platelets (if small enough).
PLATELET_NUCLEAR_FRACTION = 0.3
# Objects too small for a red cell are platelets when that fraction of their pixels is at least
# this fraction of the nuclear angle off the red-cell hue: small platelets are blurred below
# nuclear_od. On AneRBC-I 001-003 the dropped specks of 1-4 um2, nearly all inside the masks, sit
# at ~0.3 rad, red-cell pixels at <= 0.05 rad; keeping them raises Dice there 0.942 -> 0.943.
PALE_PLATELET_ANGLE_FRACTION = 0.5
# WBC cytoplasm is paler than red cells: near a nucleus the threshold is lowered by this factor,
# and red-cell markers closer than WBC_MARKER_MARGIN_UM to a nucleus are dropped.
CYTOPLASM_FRACTION_OF_THRESHOLD = 0.5
WBC_MARKER_MARGIN_UM = 1.0

# --- Splitting touching and overlapping cells ----------------------------------------------------
# Overlap lens: projected OD above this multiple of the single-layer cell OD (two layers add up to
# ~2x; the densest single spherocytes reach ~1.6x), at most this half-width, and elongated (area
# at least this multiple of its inscribed disk).
LENS_OD_FACTOR = 1.6
LENS_MAX_HALF_WIDTH_UM = 1.25
LENS_MIN_ELONGATION = 1.4
# Distance-map smoothing (px) before peak detection: removes ridge noise from ragged outlines.
DIST_SMOOTH_PX = 1.0
H_MAXIMA_TOLERANCE = 1e-4  # float32 rounding of distances up to a few hundred px
# Clump splitting: notches at least this deep (um) in a non-convex object (solidity below
# CUT_SOLIDITY) are cut along the chord joining them, if the chord is at most CUT_MAX_RATIO of the
# smaller piece's diameter; at most CUT_MAX_DEPTH nested cuts per object. Tuned on synthetic
# fields (seed 0); two overlapping disks have solidity 0.90-0.95 and notches >= 0.4 x radius.
CONCAVITY_MIN_DEPTH_UM = 0.6
CUT_SOLIDITY = 0.95
CUT_MAX_RATIO = 1.1
CUT_MAX_DEPTH = 3
# An object with a single deep notch is cut only if larger than one normal cell (7.5 um -> 44 um2),
# trying the ONE_NOTCH_TRIES shortest chords from the notch.
ONE_NOTCH_MIN_AREA_UM2 = 45.0
ONE_NOTCH_TRIES = 5
# Objects above max_rbc_area_um2 are re-split with markers this much finer (height and spacing).
RESPLIT_H_FACTOR = 0.5


@dataclass(frozen=True)
class SlideStats:
    """Per-slide colour statistics shared by all tiles of a slide.

    background_rgb: background intensity per channel (0-255); rbc_direction: unit RGB OD vector of
    red cells; od_threshold: foreground threshold on the projected OD; nuclear_angle: hue angle
    (rad) above which a stained pixel counts as nuclear; nuclear_od: minimal projected OD of a
    nuclear pixel; cell_od: typical (median) projected OD of a single layer of red cell.
    """

    background_rgb: tuple[float, float, float]
    od_threshold: float
    rbc_direction: tuple[float, float, float] = DEFAULT_RBC_DIRECTION
    nuclear_angle: float = NUCLEAR_ANGLE_DEFAULT
    nuclear_od: float = NUCLEAR_OD_FACTOR * FG_THRESHOLD_DEFAULT
    cell_od: float = FG_THRESHOLD_DEFAULT / FG_FRACTION_OF_CELL_OD

    def __post_init__(self) -> None:
        if len(self.background_rgb) != 3 or min(self.background_rgb) <= 0:
            raise ValueError("background_rgb must be three positive intensities")
        if not (self.od_threshold > 0 and self.cell_od > 0):
            raise ValueError("od_threshold and cell_od must be positive")
        norm = math.sqrt(sum(c * c for c in self.rbc_direction))
        if not 0.99 < norm < 1.01:
            raise ValueError("rbc_direction must be a unit vector")


def _optical_density(image: np.ndarray, background: np.ndarray) -> np.ndarray:
    """OD (H, W, 3) float32 of an RGB image against a background (3,) or (H, W, 3), in [0, OD_MAX]."""
    return np.clip(optical_density(image, background), 0.0, OD_MAX)


def _neutral(od: np.ndarray) -> np.ndarray:
    """Boolean (H, W): grey/black absorption (all channels alike), i.e. not a stain."""
    r, g, b = od[..., 0], od[..., 1], od[..., 2]
    lo = np.minimum(np.minimum(r, g), b)
    hi = np.maximum(np.maximum(r, g), b)
    return lo >= NEUTRAL_MIN_RATIO * np.maximum(hi, 1e-6)


def _hue_angle_ok(
    od: np.ndarray, proj: np.ndarray, direction: np.ndarray, angle: float
) -> np.ndarray:
    """Boolean (H, W): OD deviates from the red-cell direction by more than ``angle`` rad."""
    resid = od - proj[..., None] * direction[None, None, :]
    resid_norm = np.sqrt(np.einsum("ijk,ijk->ij", resid, resid))
    return resid_norm > math.tan(angle) * np.maximum(proj, 1e-6)


def _background_noise(values: np.ndarray, background: np.ndarray) -> float:
    """Robust pixel-noise SD of ``values`` (H, W) over ``background`` pixels.

    Uses horizontal neighbour differences (MAD / sqrt 2), which ignore smooth illumination
    gradients that a plain spread over the background would count as noise.
    """
    both = background[:, 1:] & background[:, :-1]
    diff = (values[:, 1:] - values[:, :-1])[both]
    if diff.size < 100:
        return 0.0
    return 1.4826 * float(np.median(np.abs(diff - np.median(diff)))) / math.sqrt(2.0)


def estimate_slide_stats(image: np.ndarray) -> SlideStats:
    """Estimate background colour and thresholds from a slide (or a downsampled overview of it).

    image: uint8 (H, W, 3) RGB. Background = per-channel median of pixels brighter than the Otsu
    threshold of grey; red-cell direction = median OD of candidate cell pixels; foreground
    threshold = a fraction of the median cell OD, floored by the background noise.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    img = image.astype(np.float32)
    gray = img.mean(axis=2)
    if np.ptp(gray) < 1.0:  # flat image: no cells, background is the image itself
        bg = np.maximum(img.reshape(-1, 3).mean(axis=0), 1.0)
        return SlideStats(tuple(float(c) for c in bg), FG_THRESHOLD_DEFAULT)
    bright = gray > threshold_otsu(gray)
    bg = np.maximum(np.median(img[bright], axis=0), 1.0)
    od = _optical_density(image, bg)
    od_sum = od.sum(axis=2)
    cand = od_sum > threshold_otsu(np.clip(od_sum, 0.0, 1.5))
    if not MIN_CELL_FRACTION <= cand.mean() < 1.0:
        return SlideStats(tuple(float(c) for c in bg), FG_THRESHOLD_DEFAULT)

    direction = np.median(od[cand], axis=0)
    direction = direction / max(float(np.linalg.norm(direction)), 1e-6)
    proj = od @ direction
    cell_od = float(np.median(proj[cand]))
    noise = _background_noise(proj, ~cand)
    threshold = max(
        FG_THRESHOLD_MIN, FG_FRACTION_OF_CELL_OD * cell_od, FG_THRESHOLD_NOISE_SD * noise
    )

    # Nuclear angle: above the spread of hue angles of clearly stained red-cell pixels.
    strong = proj > 2.0 * threshold
    angle = NUCLEAR_ANGLE_DEFAULT
    if strong.sum() > 100:
        resid = od[strong] - proj[strong, None] * direction[None, :]
        ang = np.arctan2(np.linalg.norm(resid, axis=1), proj[strong])
        angle = float(np.clip(2.0 * np.percentile(ang, 90), *NUCLEAR_ANGLE_RANGE))
    return SlideStats(
        background_rgb=tuple(float(c) for c in bg),
        od_threshold=float(threshold),
        rbc_direction=tuple(float(c) for c in direction),
        nuclear_angle=angle,
        nuclear_od=float(NUCLEAR_OD_FACTOR * threshold),
        cell_od=max(cell_od, threshold),
    )


@dataclass(frozen=True)
class ClassicalParams:
    """Size and shape knobs of the classical segmenter, in micrometres.

    Defaults follow RBC / WBC / platelet sizes (RBC 6-9.5 um, schistocytes down to ~3 um, WBC
    12-16 um with nuclei >= ~15 um^2, platelets 2-3 um) and were tuned on synthetic fields.
    """

    min_object_area_um2: float = 0.5  # debris below this is dropped before anything else
    min_rbc_area_um2: float = 4.0  # smallest red-cell fragment (a 2.3 um disk)
    max_rbc_area_um2: float = 110.0  # larger red-cell objects are re-split with finer markers
    platelet_max_area_um2: float = 14.0  # purple objects up to this size are platelets
    wbc_nucleus_min_area_um2: float = 14.0  # nuclear-stain blobs from this size mark a WBC
    wbc_cytoplasm_um: float = 4.0  # how far the pale WBC cytoplasm may extend past the nucleus
    hole_fill_max_area_um2: float = 30.0  # central pallor up to a 6 um disk is filled
    marker_min_distance_um: float = 2.0  # two cell centres are at least this far apart
    marker_h_um: float = 0.3  # a distance peak must rise this much above its saddle
    smooth_sigma_um: float = 0.25  # OD pre-smoothing against sensor noise
    background_window_um: float = 25.0  # local-background search window (vignetting)
    nuclear_close_um: float = 0.75  # closing radius that merges nuclear lobes

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if self.min_rbc_area_um2 >= self.max_rbc_area_um2:
            raise ValueError("min_rbc_area_um2 must be below max_rbc_area_um2")
        if self.min_object_area_um2 > self.min_rbc_area_um2:
            raise ValueError("min_object_area_um2 must not exceed min_rbc_area_um2")
        if self.marker_min_distance_um <= 0 or self.background_window_um <= 0:
            raise ValueError("marker_min_distance_um and background_window_um must be positive")


@dataclass(frozen=True)
class Segmentation:
    """Instance labels (uint32 H x W, 1..n, 0 = background) and kinds (uint8 (n,)).

    ``kinds[i]`` is the OBJECT_KINDS value of label ``i + 1``.
    """

    labels: np.ndarray
    kinds: np.ndarray

    @property
    def n(self) -> int:
        return int(self.kinds.shape[0])


def _disk(radius_px: float) -> np.ndarray:
    r = max(int(round(radius_px)), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy <= r * r + r).astype(np.uint8)


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components of ``mask`` with fewer than ``min_px`` pixels."""
    lab, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[lab]


def _fill_pallor(mask: np.ndarray, max_px: float, od: np.ndarray, min_mean_od: float) -> np.ndarray:
    """Fill enclosed holes of ``mask`` that look like central pallor.

    A hole (4-connected background component not touching the tile edge) of at most ``max_px``
    pixels is filled when it is round (area at most HOLE_MAX_ELONGATION times its inscribed disk)
    and its mean OD is at least ``min_mean_od``: pallor is a round patch of thin cell, while a gap
    enclosed by a ring of touching cells is cusped, star-shaped bare glass. Filling such gaps would
    merge the whole ring into one blob.
    """
    lab, n = ndi.label(~mask)
    if n == 0:
        return mask
    flat = lab.ravel()
    sizes = np.bincount(flat)
    mean_od = np.bincount(flat, weights=od.ravel()) / np.maximum(sizes, 1)
    candidate = sizes <= max_px
    candidate[0] = False
    in_small = candidate[lab]
    r_in = _label_max(ndi.distance_transform_edt(in_small), lab, n, in_small)
    round_ = sizes <= HOLE_MAX_ELONGATION * np.pi * np.maximum(r_in, 0.5) ** 2
    fill = (sizes <= max_px) & (
        (sizes <= HOLE_ALWAYS_FILL_PX) | (round_ & (mean_od >= min_mean_od))
    )
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill[0] = False
    fill[border] = False  # open to the tile edge: not a hole we can be sure of
    return mask | fill[lab]


def _fill_enclosed(labels: np.ndarray, max_px: float) -> np.ndarray:
    """Give each background hole enclosed by a single object (up to ``max_px``) to that object.

    A hole bordered by one object only is its pallor, never a gap between cells (a gap touches
    several objects), so this is safe where the shape test of ``_fill_pallor`` is not sure.
    """
    holes, n = ndi.label(labels == 0)
    if n < 2:
        return labels
    sizes = np.bincount(holes.ravel(), minlength=n + 1)
    small = (sizes <= max_px) & (np.arange(n + 1) > 0)
    small[np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]])] = False
    where = small[holes]
    if not where.any():
        return labels
    kernel = np.ones((3, 3), np.uint8)
    lab32 = labels.astype(np.float32)  # exact for ids < 2**24
    nbr_max = cv2.dilate(lab32, kernel)
    nbr_min = -cv2.dilate(np.where(labels > 0, -lab32, -np.float32(2**24)), kernel)
    hi = _label_max(nbr_max, holes, n, where)
    lo = _label_min(nbr_min, holes, n, where)
    single = small & (hi == lo) & (hi > 0)
    fill = single[holes]
    out = labels.copy()
    out[fill] = hi[holes[fill]].astype(labels.dtype)
    return out


def _peel_outline(
    fg: np.ndarray, proj: np.ndarray, level: float, max_px: int, keep: np.ndarray
) -> np.ndarray:
    """Remove up to ``max_px`` layers of edge pixels of ``fg`` whose ``proj`` is below ``level``.

    Moves the outline inwards to where the OD reaches ``level`` without touching the interior:
    only pixels on the current edge (4-connected to non-foreground) go, so pallor enclosed by a
    rim stays. Pixels in ``keep`` (pale cells, WBC cytoplasm) are never removed.
    """
    low = (proj < level) & ~keep
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
    out = fg.copy()
    for _ in range(max_px):
        inner = cv2.erode(out.astype(np.uint8), cross, borderType=cv2.BORDER_REPLICATE) > 0
        edge = out & ~inner & low
        if not edge.any():
            break
        out &= ~edge
    return out


def _pale_cells(proj: np.ndarray, threshold: float, low: float) -> np.ndarray:
    """Foreground (H, W) bool: ``proj > threshold``, plus objects that never reach it.

    Very pale (hypochromic, ghost) cells stay below the threshold everywhere; they are found with
    the lower threshold ``low`` as components that contain no pixel above ``threshold``. Normal
    cells keep the tighter outline of the main threshold.
    """
    fg = proj > threshold
    if low >= threshold:
        return fg
    weak = proj > low
    lab, n = ndi.label(weak, structure=np.ones((3, 3)))
    if n == 0:
        return fg
    strong_count = np.bincount(lab[fg], minlength=n + 1)
    pale = strong_count == 0
    pale[0] = False
    return fg | pale[lab]


def _local_background(image: np.ndarray, stats: SlideStats, window_px: float) -> np.ndarray:
    """Background (H, W, 3) float32: slide background times a smooth per-tile illumination.

    Illumination is the brightness of pixels near their local maximum (i.e. background) relative
    to the slide background, interpolated by normalised convolution; where a tile holds no
    background it falls back to 1.
    """
    height, width = image.shape[:2]
    bg = np.asarray(stats.background_rgb, dtype=np.float32)
    f = BACKGROUND_DOWNSAMPLE
    small_w, small_h = max(width // f, 1), max(height // f, 1)
    gray = image.astype(np.float32).mean(axis=2)
    small = cv2.resize(gray, (small_w, small_h), interpolation=cv2.INTER_AREA)
    ratio = small / float(bg.mean())
    win = max(int(round(window_px / f)) | 1, 3)
    local_max = cv2.dilate(ratio, np.ones((win, win), np.uint8))
    lo, hi = ILLUMINATION_RANGE
    cand = (ratio >= local_max - BACKGROUND_TOLERANCE) & (ratio > lo) & (ratio < hi)
    weight = cand.astype(np.float32)
    sigma = window_px / f / 2.0
    num = cv2.GaussianBlur(ratio * weight, (0, 0), sigma)
    den = cv2.GaussianBlur(weight, (0, 0), sigma)
    illum = np.where(den > 1e-3, num / np.maximum(den, 1e-6), 1.0)
    illum = np.clip(illum, lo, hi).astype(np.float32)
    illum = cv2.resize(illum, (width, height), interpolation=cv2.INTER_LINEAR)
    return illum[..., None] * bg[None, None, :]


def _overlap_lenses(dense: np.ndarray, max_half_width_px: float) -> np.ndarray:
    """Elongated, thin components of ``dense`` (H, W) bool: the lens where two cells overlap.

    Overlapping cells add their OD, so the lens between them is about twice as dense as a single
    layer; it is thin and elongated, unlike a dense spherocyte or a target cell's central spot.
    """
    lab, n = ndi.label(dense, structure=np.ones((3, 3)))
    if n == 0:
        return dense
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    half_width = _label_max(ndi.distance_transform_edt(dense), lab, n, dense)[1:]
    elongation = sizes / (np.pi * np.maximum(half_width, 0.5) ** 2)
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = (half_width <= max_half_width_px) & (elongation >= LENS_MIN_ELONGATION)
    keep[1:] &= sizes >= HOLE_ALWAYS_FILL_PX
    return keep[lab]


def _label_max(values: np.ndarray, lab: np.ndarray, n: int, where: np.ndarray) -> np.ndarray:
    """Per-label maximum of ``values`` over the pixels in ``where`` -> float64 (n + 1,)."""
    out = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(out, lab[where], values[where])
    return out


def _label_min(values: np.ndarray, lab: np.ndarray, n: int, where: np.ndarray) -> np.ndarray:
    """Per-label minimum of ``values`` over the pixels in ``where`` -> float64 (n + 1,)."""
    out = np.full(n + 1, np.inf)
    np.minimum.at(out, lab[where], values[where])
    return out


def _h_maxima(f: np.ndarray, h: float) -> np.ndarray:
    """Bool (H, W): tops of the maxima of ``f`` (float32) that rise at least ``h`` above a saddle.

    Morphological reconstruction by dilation of ``f - h`` under ``f`` (iterated 3x3 geodesic
    dilation, which converges in a few passes on distance maps), then ``f - rec >= h``.
    """
    f = np.ascontiguousarray(f, dtype=np.float32)
    rec = f - np.float32(h)
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(4 * max(f.shape)):
        nxt = np.minimum(cv2.dilate(rec, kernel), f)
        if np.array_equal(nxt, rec):
            break
        rec = nxt
    return (f - rec) >= np.float32(h) - H_MAXIMA_TOLERANCE


def _markers(
    dist: np.ndarray, h_px: float, min_dist_px: float, exclude: np.ndarray
) -> tuple[np.ndarray, int]:
    """Cell-centre markers: h-maxima of the distance map, thinned to ``min_dist_px`` spacing.

    Returns an int32 marker image (1..k) and k. Peaks on ``exclude`` (WBC nuclei) are dropped.
    """
    peaks = _h_maxima(dist, h_px) & (dist > 0) & ~exclude
    lab, n = ndi.label(peaks, structure=np.ones((3, 3)))
    if n == 0:
        return lab.astype(np.int32), 0
    ys, xs = np.nonzero(peaks)
    ids = lab[ys, xs]
    count = np.bincount(ids, minlength=n + 1)[1:]
    cy = np.bincount(ids, weights=ys, minlength=n + 1)[1:] / count
    cx = np.bincount(ids, weights=xs, minlength=n + 1)[1:] / count
    height = _label_max(dist, lab, n, peaks)[1:]
    order = np.argsort(-height, kind="stable")
    kept: list[int] = []
    pts = np.stack([cy, cx], axis=1)
    for i in order:  # greedy suppression, strongest peak first
        if kept and np.min(np.hypot(*(pts[kept] - pts[i]).T)) < min_dist_px:
            continue
        kept.append(int(i))
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[np.asarray(kept) + 1] = np.arange(1, len(kept) + 1)
    return lut[lab], len(kept)


def _try_cut(
    mask: np.ndarray, p0: np.ndarray, p1: np.ndarray, min_piece_px: float
) -> np.ndarray | None:
    """Cut ``mask`` along the segment p0-p1 (x, y); pieces as int32 labels 1, 2 or None.

    The cut is rejected unless it leaves two pieces of at least ``min_piece_px`` and the chord is
    at most CUT_MAX_RATIO times the smaller piece's diameter (a seam between cells, not a cut
    through one). Cut pixels and slivers go to the nearest of the two pieces.
    """
    cut = mask.astype(np.uint8)
    cv2.line(cut, (int(p0[0]), int(p0[1])), (int(p1[0]), int(p1[1])), 0, 1)
    lab, n = ndi.label(cut)
    if n < 2:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    big = np.argsort(-sizes)[:2] + 1
    small = sizes[big[1] - 1]
    chord = float(np.hypot(*(p0 - p1)))
    if small < min_piece_px or chord > CUT_MAX_RATIO * 2.0 * math.sqrt(small / math.pi):
        return None
    keep = np.zeros(n + 1, dtype=np.int32)
    keep[big] = (1, 2)
    out = keep[lab]
    _, (iy, ix) = ndi.distance_transform_edt(out == 0, return_indices=True)
    return np.where(mask, out[iy, ix], 0)


def _concave_cut(
    mask: np.ndarray, min_depth_px: float, min_piece_px: float, one_notch_min_px: float
) -> np.ndarray | None:
    """Split a clump (bool (h, w), padded by 1) along a seam that starts at a concave notch.

    Two touching or overlapping convex cells leave two notches in the outline of their union and
    the chord between them is where they meet. When the other end of the seam is hidden (it
    meets a neighbour's watershed line, or the gap there was filled), an object of at least
    ``one_notch_min_px`` (bigger than one cell) is cut along the shortest chord from its deepest
    notch across to the far side. Returns int32 labels of the two pieces, or None.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=len)
    if len(contour) < 8:
        return None
    hull = cv2.convexHull(contour, returnPoints=False)
    hull_area = cv2.contourArea(contour[hull[:, 0]])
    if hull_area <= 0 or cv2.contourArea(contour) / hull_area >= CUT_SOLIDITY:
        return None
    try:
        defects = cv2.convexityDefects(contour, np.sort(hull, axis=0))
    except cv2.error:  # self-intersecting hull on degenerate contours
        return None
    if defects is None:
        return None
    defects = defects.reshape(-1, 4)  # start, end, farthest point (contour indices), depth * 256
    deep = defects[defects[:, 3] / 256.0 >= min_depth_px]
    if deep.shape[0] == 0:
        return None
    pts = contour[deep[:, 2], 0, :].astype(np.float64)  # (k, 2) x, y of the notch bottoms
    dep = deep[:, 3] / 256.0
    pairs = sorted(
        (float(np.hypot(*(pts[i] - pts[j]))) / (dep[i] + dep[j]), i, j)
        for i in range(len(pts))
        for j in range(i + 1, len(pts))
    )
    for _, i, j in pairs:
        pieces = _try_cut(mask, pts[i], pts[j], min_piece_px)
        if pieces is not None:
            return pieces
    if mask.sum() < one_notch_min_px:
        return None
    # One usable notch: shortest chord to a contour point at least a quarter perimeter away.
    outline = contour[:, 0, :].astype(np.float64)
    m = len(outline)
    k = int(deep[np.argmax(dep), 2])
    steps = np.abs(np.arange(m) - k)
    far = np.minimum(steps, m - steps) >= m // 4
    cand = np.flatnonzero(far)
    dist = np.hypot(*(outline[cand] - outline[k]).T)
    for q in cand[np.argsort(dist)[:ONE_NOTCH_TRIES]]:
        pieces = _try_cut(mask, outline[k], outline[q], min_piece_px)
        if pieces is not None:
            return pieces
    return None


def _split_clumps(
    labels: np.ndarray,
    kind: np.ndarray,
    min_depth_px: float,
    min_piece_px: float,
    one_notch_min_px: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Recursively split non-convex red-cell objects at concave notches (``_concave_cut``).

    labels: int (H, W) with ids 0..n-1 described by kind (n,). WBCs are left whole: their
    lobulated nuclei and eccentric cytoplasm make notches that are not seams between cells.
    Returns new labels and kinds, the pieces appended as new ids.
    """
    labels = labels.astype(np.int32, copy=True)
    kinds = [int(k) for k in kind]
    rbc = OBJECT_KINDS["rbc"]
    queue = [
        (i, 0, sl)
        for i, sl in enumerate(ndi.find_objects(labels), start=1)
        if sl is not None and kinds[i] == rbc
    ]
    while queue:
        obj, level, sl = queue.pop()
        window = labels[sl]
        mask = window == obj
        if level >= CUT_MAX_DEPTH or mask.sum() < 2 * min_piece_px:
            continue
        pieces = _concave_cut(np.pad(mask, 1), min_depth_px, min_piece_px, one_notch_min_px)
        if pieces is None:
            continue
        new_id = len(kinds)
        kinds.append(rbc)
        window[pieces[1:-1, 1:-1] == 2] = new_id
        queue.extend([(obj, level + 1, sl), (new_id, level + 1, sl)])
    return labels, np.asarray(kinds, dtype=np.uint8)


def _resplit_large(
    labels: np.ndarray, kind: np.ndarray, max_px: float, h_px: float, min_dist_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Re-run the watershed with finer markers inside red-cell objects larger than ``max_px``.

    Such objects are clumps that neither the slide-wide markers nor the concave cuts separated;
    the object's own distance map with a lower peak height usually finds its cells. Returns new
    labels and kinds (pieces appended as new ids); objects that do not split are kept.
    """
    labels = labels.astype(np.int32, copy=True)
    kinds = [int(k) for k in kind]
    area = np.bincount(labels.ravel(), minlength=len(kinds))
    for obj, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None or kinds[obj] != OBJECT_KINDS["rbc"] or area[obj] <= max_px:
            continue
        window = labels[sl]
        mask = np.pad(window == obj, 1)
        dist = cv2.GaussianBlur(ndi.distance_transform_edt(mask).astype(np.float32), (0, 0), 1.0)
        dist[~mask] = 0.0
        markers, n = _markers(dist, h_px, min_dist_px, np.zeros_like(mask))
        if n < 2:
            continue
        pieces = watershed(-dist, markers, mask=mask)[1:-1, 1:-1]
        for piece in range(2, n + 1):
            window[pieces == piece] = len(kinds)
            kinds.append(OBJECT_KINDS["rbc"])
    return labels, np.asarray(kinds, dtype=np.uint8)


class ClassicalSegmenter:
    """Threshold + watershed segmenter for one RGB tile at ``um_per_px`` (0.25 um/px)."""

    name = "classical"
    version = 2  # bump when the algorithm or its module constants change (part of config())
    um_per_px = 0.25  # working resolution; callers resample tiles to it

    def __init__(self, params: ClassicalParams | None = None) -> None:
        self.params = params or ClassicalParams()

    def config(self) -> dict:
        """JSON-serialisable description of the segmenter (hashed into run configs)."""
        return {
            "name": self.name,
            "version": self.version,
            "um_per_px": self.um_per_px,
            **asdict(self.params),
        }

    def _px(self, um: float) -> float:
        return um / self.um_per_px

    def _px2(self, um2: float) -> float:
        return um2 / (self.um_per_px * self.um_per_px)

    def __call__(self, image: np.ndarray, stats: SlideStats) -> Segmentation:
        """Segment an RGB uint8 tile (H, W, 3) into red cells, WBCs and platelets."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an RGB tile (H, W, 3), got shape {image.shape}")
        p = self.params
        direction = np.asarray(stats.rbc_direction, dtype=np.float32)
        background = _local_background(image, stats, self._px(p.background_window_um))
        od = _optical_density(image, background)
        raw_proj = od @ direction  # unsmoothed, for the outline
        sigma = self._px(p.smooth_sigma_um)
        if sigma > 0.3:
            od = cv2.GaussianBlur(od, (0, 0), sigma)
        proj = od @ direction
        low = max(PALE_FRACTION_OF_CELL_OD * stats.cell_od, 0.5 * stats.od_threshold)
        fg = _pale_cells(proj, stats.od_threshold, low)
        fg = _remove_small(fg, self._px2(p.min_object_area_um2))
        neutral = _neutral(od)
        nuclear, wbc_nuclei = self._nuclei(od, proj, fg & ~neutral, stats)
        if wbc_nuclei.any():  # pale cytoplasm around a nucleus joins the foreground
            zone = cv2.dilate(wbc_nuclei.astype(np.uint8), _disk(self._px(p.wbc_cytoplasm_um))) > 0
            fg |= zone & (proj > CYTOPLASM_FRACTION_OF_THRESHOLD * stats.od_threshold)
        fg = _fill_pallor(
            fg, self._px2(p.hole_fill_max_area_um2), proj, PALLOR_OD_FRACTION * stats.od_threshold
        )
        fg = self._outline(fg, raw_proj, proj, wbc_nuclei, stats)
        labels, kind = self._watershed(fg, proj, wbc_nuclei, stats)
        labels, kind = _split_clumps(
            labels,
            kind,
            min_depth_px=self._px(CONCAVITY_MIN_DEPTH_UM),
            min_piece_px=self._px2(p.min_rbc_area_um2),
            one_notch_min_px=self._px2(ONE_NOTCH_MIN_AREA_UM2),
        )
        labels, kind = _resplit_large(
            labels,
            kind,
            max_px=self._px2(p.max_rbc_area_um2),
            h_px=RESPLIT_H_FACTOR * self._px(p.marker_h_um),
            min_dist_px=RESPLIT_H_FACTOR * self._px(p.marker_min_distance_um),
        )
        debris = (proj > DEBRIS_OD_FACTOR * stats.cell_od) & neutral
        off_hue = ~neutral & _hue_angle_ok(
            od, proj, direction, PALE_PLATELET_ANGLE_FRACTION * stats.nuclear_angle
        )
        return self._finalise(labels, kind, nuclear, debris, off_hue)

    def _outline(
        self,
        fg: np.ndarray,
        raw_proj: np.ndarray,
        proj: np.ndarray,
        wbc_nuclei: np.ndarray,
        stats: SlideStats,
    ) -> np.ndarray:
        """Peel red-cell outlines to OUTLINE_FRACTION_OF_CELL_OD of the cell OD (``_peel_outline``).

        Skipped where the slide's threshold is already above that level (noise-floored): the
        peel reads unsmoothed OD. Pale cells (no pixel above the threshold) and the WBC
        cytoplasm zone keep the outline they were found with.
        """
        level = OUTLINE_FRACTION_OF_CELL_OD * stats.cell_od
        if level <= stats.od_threshold:
            return fg
        lab, n = ndi.label(fg, structure=np.ones((3, 3)))
        strong = np.bincount(lab[proj > stats.od_threshold], minlength=n + 1) > 0
        strong[0] = True
        keep = ~strong[lab]
        if wbc_nuclei.any():
            disk = _disk(self._px(self.params.wbc_cytoplasm_um))
            keep |= cv2.dilate(wbc_nuclei.astype(np.uint8), disk) > 0
        return _peel_outline(fg, raw_proj, level, round(self._px(OUTLINE_PEEL_UM)), keep)

    def _nuclei(
        self, od: np.ndarray, proj: np.ndarray, fg: np.ndarray, stats: SlideStats
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nuclear-stained pixels and the WBC nuclei among them (both bool (H, W)).

        ``fg`` should exclude grey-black debris. Nuclear pixels are well stained and off the
        red-cell hue; lobes closer than ``nuclear_close_um`` are merged, and blobs from
        ``wbc_nucleus_min_area_um2`` on are WBC nuclei (smaller ones are platelets).
        """
        p = self.params
        direction = np.asarray(stats.rbc_direction, dtype=np.float32)
        nuclear = fg & (proj > stats.nuclear_od)
        nuclear &= _hue_angle_ok(od, proj, direction, stats.nuclear_angle)
        close = _disk(self._px(p.nuclear_close_um))
        closed = cv2.morphologyEx(nuclear.astype(np.uint8), cv2.MORPH_CLOSE, close) > 0
        lab, n = ndi.label(closed & fg, structure=np.ones((3, 3)))
        if n == 0:
            return nuclear, np.zeros(fg.shape, dtype=bool)
        big = np.bincount(lab.ravel()) >= self._px2(p.wbc_nucleus_min_area_um2)
        big[0] = False
        return nuclear, big[lab]

    def _watershed(
        self, fg: np.ndarray, proj: np.ndarray, wbc_nuclei: np.ndarray, stats: SlideStats
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distance-transform watershed of the foreground; WBC nuclei seed their own basins.

        Overlap lenses are cut out of the distance map so that overlapping cells get a peak
        each. Returns int32 labels (H, W) and kinds (n + 1,) indexed by label (kinds[0] = 0).
        """
        p = self.params
        lens = _overlap_lenses(
            fg & (proj > LENS_OD_FACTOR * stats.cell_od), self._px(LENS_MAX_HALF_WIDTH_UM)
        )
        dist = ndi.distance_transform_edt(fg & ~lens).astype(np.float32)
        dist = cv2.GaussianBlur(dist, (0, 0), DIST_SMOOTH_PX)
        dist[~fg | lens] = 0.0

        wbc_zone = (
            cv2.dilate(wbc_nuclei.astype(np.uint8), _disk(self._px(WBC_MARKER_MARGIN_UM))) > 0
        )
        markers, n_rbc = _markers(
            dist, self._px(p.marker_h_um), self._px(p.marker_min_distance_um), wbc_zone
        )
        wbc_lab, n_wbc = ndi.label(wbc_nuclei, structure=np.ones((3, 3)))
        markers = np.where(wbc_nuclei, wbc_lab + n_rbc, markers).astype(np.int32)
        labels = watershed(-dist, markers, mask=fg)

        # Foreground pieces that received no marker become objects of their own.
        orphan_lab, n_orphan = ndi.label(fg & (labels == 0), structure=np.ones((3, 3)))
        n_markers = n_rbc + n_wbc
        labels = np.where(orphan_lab > 0, orphan_lab + n_markers, labels).astype(np.int32)
        kind = np.full(n_markers + n_orphan + 1, OBJECT_KINDS["rbc"], dtype=np.uint8)
        kind[n_rbc + 1 : n_markers + 1] = OBJECT_KINDS["wbc"]
        kind[0] = 0
        return labels, kind

    def _finalise(
        self,
        labels: np.ndarray,
        kind: np.ndarray,
        nuclear: np.ndarray,
        debris: np.ndarray,
        off_hue: np.ndarray,
    ) -> Segmentation:
        """Call platelets by colour and size, drop debris and specks, relabel 1..n.

        ``off_hue`` marks pixels off the red-cell hue (a lower bar than ``nuclear``): it calls
        the pale platelets among objects too small to be red cells.
        """
        p = self.params
        n = kind.shape[0]
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n)[:n]
        nuc_frac = np.bincount(flat, weights=nuclear.ravel(), minlength=n)[:n] / np.maximum(area, 1)
        debris_frac = np.bincount(flat, weights=debris.ravel(), minlength=n)[:n] / np.maximum(
            area, 1
        )
        off_frac = np.bincount(flat, weights=off_hue.ravel(), minlength=n)[:n] / np.maximum(area, 1)
        purple = (kind != OBJECT_KINDS["wbc"]) & (nuc_frac >= PLATELET_NUCLEAR_FRACTION)
        kind[purple & (area <= self._px2(p.platelet_max_area_um2))] = OBJECT_KINDS["platelet"]
        pale = (kind == OBJECT_KINDS["rbc"]) & (off_frac >= PLATELET_NUCLEAR_FRACTION)
        kind[pale & (area < self._px2(p.min_rbc_area_um2))] = OBJECT_KINDS["platelet"]
        # Cells cut by the tile edge are kept down to min_object_area (the stitcher joins them).
        edge = np.zeros(n, dtype=bool)
        edge[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
        keep = area >= self._px2(p.min_object_area_um2)
        keep &= (kind != OBJECT_KINDS["rbc"]) | (area >= self._px2(p.min_rbc_area_um2)) | edge
        keep &= debris_frac < DEBRIS_MAX_FRACTION
        keep[0] = False
        lut = np.zeros(n, dtype=np.uint32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
        # A dropped speck inside a cell (e.g. a target cell's central spot) leaves a hole: refill.
        out = _fill_enclosed(lut[labels], self._px2(p.hole_fill_max_area_um2))
        return Segmentation(labels=out, kinds=kind[keep].astype(np.uint8))

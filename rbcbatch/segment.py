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
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from rbcbatch.classify import OBJECT_KINDS

__all__ = [
    "ClassicalParams",
    "ClassicalSegmenter",
    "SlideStats",
    "Segmentation",
    "estimate_slide_stats",
]

# OD values are clipped here: a pixel 20x darker than background is opaque debris, and clipping
# keeps such outliers (dark dust, pen marks) from dragging Otsu thresholds.
OD_MAX = 3.0
# RBC OD direction used when a slide shows too few cells to estimate one; the mean of the
# Wright- and Giemsa-like red-cell colours measured on AneRBC-I and the synthetic sites.
DEFAULT_RBC_DIRECTION = (0.53, 0.76, 0.38)
# Foreground threshold as a fraction of the median OD of cell pixels. A cell rim has OD ~1x the
# median and the blurred outline reaches half of that at the true edge, so 0.3-0.4 puts the mask
# boundary on the outline while keeping pale pallor regions out of the background.
FG_FRACTION_OF_CELL_OD = 0.35
# Floors of the foreground threshold: absolute, and in units of background OD noise (SD).
FG_THRESHOLD_MIN = 0.03
FG_THRESHOLD_NOISE_SD = 6.0
# Default threshold for slides without enough cell pixels (about 1/3 of a typical rim OD).
FG_THRESHOLD_DEFAULT = 0.10
MIN_CELL_FRACTION = 0.005  # fewer candidate cell pixels than this: use the defaults
# Nuclear stain: hue angle (rad) between a pixel's OD and the red-cell direction. Red-cell pixels
# sit below ~0.2 rad (99th percentile on AneRBC-I and synthetic fields); nuclei at 0.35-0.6 rad.
NUCLEAR_ANGLE_DEFAULT = 0.30
NUCLEAR_ANGLE_RANGE = (0.22, 0.40)
# Nuclear pixels must also be clearly stained: OD at least this multiple of the fg threshold.
NUCLEAR_OD_FACTOR = 2.0
# Local background: brightness is searched within this window and pixels within this relative
# tolerance of the local maximum count as background; illumination is allowed to vary this much.
BACKGROUND_TOLERANCE = 0.04
ILLUMINATION_RANGE = (0.70, 1.25)
BACKGROUND_DOWNSAMPLE = 4
# A hole inside the foreground is pallor (filled) if its mean OD is at least this fraction of the
# foreground threshold; the pale pallor of hypochromic cells has ~0.5x, bare glass ~0 (+ blur).
PALLOR_OD_FRACTION = 0.3
# Pallor holes are near-disks: area / (pi * inscribed radius^2) is ~1-1.3, while the cusped gap
# between three touching disks has ~2.1 and between four ~1.6. Holes of a few pixels are noise.
HOLE_MAX_ELONGATION = 1.45
HOLE_ALWAYS_FILL_PX = 6
# Overlap lens: projected OD above this multiple of the single-layer cell OD (two layers add up to
# ~2x; the densest single spherocytes reach ~1.6x), at most this half-width, and elongated (area
# at least this multiple of its inscribed disk).
LENS_OD_FACTOR = 1.7
LENS_MAX_HALF_WIDTH_UM = 1.25
LENS_MIN_ELONGATION = 2.0
# Clump splitting: notches at least this deep (um) in a non-convex object (solidity below
# CUT_SOLIDITY) are cut along the chord joining them, if the chord is at most CUT_MAX_RATIO of the
# smaller piece's diameter; at most CUT_MAX_DEPTH nested cuts per object.
CONCAVITY_MIN_DEPTH_UM = 1.0
CUT_SOLIDITY = 0.92
CUT_MAX_RATIO = 0.9
CUT_MAX_DEPTH = 3


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
    """OD (H, W, 3) float32 of an RGB image against a background (3,) or (H, W, 3)."""
    img = image.astype(np.float32)
    od = np.log((np.asarray(background, dtype=np.float32) + 1.0) / (img + 1.0))
    return np.clip(od, 0.0, OD_MAX)


def _hue_angle_ok(od: np.ndarray, proj: np.ndarray, direction: np.ndarray, angle: float) -> np.ndarray:
    """Boolean (H, W): OD deviates from the red-cell direction by more than ``angle`` rad."""
    resid = od - proj[..., None] * direction[None, None, :]
    resid_norm = np.sqrt(np.einsum("ijk,ijk->ij", resid, resid))
    return resid_norm > math.tan(angle) * np.maximum(proj, 1e-6)


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
    bg_od = od_sum[~cand]
    if cand.mean() < MIN_CELL_FRACTION:
        return SlideStats(tuple(float(c) for c in bg), FG_THRESHOLD_DEFAULT)

    direction = np.median(od[cand], axis=0)
    direction = direction / max(float(np.linalg.norm(direction)), 1e-6)
    proj = od @ direction
    cell_od = float(np.median(proj[cand]))
    # Background noise of the projection, robustly (MAD) from pixels darker-than-median excluded.
    bg_proj = proj[~cand] if bg_od.size else proj.ravel()
    noise = 1.4826 * float(np.median(np.abs(bg_proj - np.median(bg_proj))))
    threshold = max(FG_THRESHOLD_MIN, FG_FRACTION_OF_CELL_OD * cell_od, FG_THRESHOLD_NOISE_SD * noise)

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

    min_object_area_um2: float = 1.0  # debris below this is dropped before anything else
    min_rbc_area_um2: float = 4.0  # smallest red-cell fragment (a 2.3 um disk)
    max_rbc_area_um2: float = 130.0  # larger non-WBC objects are re-split with finer markers
    platelet_max_area_um2: float = 14.0  # purple objects up to this size are platelets
    wbc_nucleus_min_area_um2: float = 14.0  # nuclear-stain blobs from this size mark a WBC
    wbc_cytoplasm_um: float = 4.0  # how far the pale WBC cytoplasm may extend past the nucleus
    hole_fill_max_area_um2: float = 30.0  # central pallor up to a 6 um disk is filled
    marker_min_distance_um: float = 2.0  # two cell centres are at least this far apart
    marker_h_um: float = 0.2  # a distance peak must rise this much above its saddle
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
    inner = ndi.distance_transform_edt(~mask)
    r_in = np.zeros(n + 1)
    small = np.flatnonzero(sizes <= max_px)
    small = small[small > 0]
    if small.size:
        r_in[small] = ndi.maximum(inner, lab, small)
    round_ = sizes <= HOLE_MAX_ELONGATION * np.pi * np.maximum(r_in, 0.5) ** 2
    fill = (sizes <= max_px) & ((sizes <= HOLE_ALWAYS_FILL_PX) | (round_ & (mean_od >= min_mean_od)))
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill[0] = False
    fill[border] = False  # open to the tile edge: not a hole we can be sure of
    return mask | fill[lab]


def _local_background(
    image: np.ndarray, stats: SlideStats, window_px: float
) -> np.ndarray:
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
    idx = np.arange(1, n + 1)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    half_width = np.asarray(ndi.maximum(ndi.distance_transform_edt(dense), lab, idx))
    elongation = sizes / (np.pi * np.maximum(half_width, 0.5) ** 2)
    keep = np.zeros(n + 1, dtype=bool)
    keep[1:] = (half_width <= max_half_width_px) & (elongation >= LENS_MIN_ELONGATION)
    keep[1:] &= sizes >= HOLE_ALWAYS_FILL_PX
    return keep[lab]


def _markers(
    dist: np.ndarray, h_px: float, min_dist_px: float, exclude: np.ndarray
) -> tuple[np.ndarray, int]:
    """Cell-centre markers: h-maxima of the distance map, thinned to ``min_dist_px`` spacing.

    Returns an int32 marker image (1..k) and k. Peaks on ``exclude`` (WBC nuclei) are dropped.
    """
    peaks = h_maxima(dist, h_px) > 0
    peaks &= ~exclude
    lab, n = ndi.label(peaks, structure=np.ones((3, 3)))
    if n == 0:
        return lab.astype(np.int32), 0
    idx = np.arange(1, n + 1)
    cy, cx = (np.asarray(c) for c in zip(*ndi.center_of_mass(peaks, lab, idx), strict=True))
    height = np.asarray(ndi.maximum(dist, lab, idx))
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


def _concave_cut(mask: np.ndarray, min_depth_px: float, min_piece_px: float) -> np.ndarray | None:
    """Split a clump (bool (h, w), padded by 1) along the chord between two concave points.

    Two touching or overlapping convex cells leave two deep notches in the outline of their
    union; the chord between them is where the cells meet. Returns an int32 label image of the
    pieces (1..k, cut pixels given to a neighbour) or None when no acceptable cut exists: fewer
    than two notches deeper than ``min_depth_px``, a piece below ``min_piece_px``, or a chord
    longer than CUT_MAX_RATIO times the smaller piece's diameter (a neck, not a seam).
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    contour = max(contours, key=len)
    if len(contour) < 8:
        return None
    hull = cv2.convexHull(contour, returnPoints=False)
    try:
        defects = cv2.convexityDefects(contour, np.sort(hull, axis=0))
    except cv2.error:  # self-intersecting hull on degenerate contours
        return None
    if defects is None:
        return None
    depth = defects[:, 0, 3] / 256.0
    deep = defects[depth >= min_depth_px, 0, :]
    if deep.shape[0] < 2:
        return None
    pts = contour[deep[:, 2], 0, :].astype(np.float64)  # (k, 2) x, y of the notch bottoms
    dep = deep[:, 3] / 256.0
    pairs = [
        (float(np.hypot(*(pts[i] - pts[j]))) / (dep[i] + dep[j]), i, j)
        for i in range(len(pts))
        for j in range(i + 1, len(pts))
    ]
    for _, i, j in sorted(pairs):
        cut = mask.astype(np.uint8)
        p0 = (int(pts[i][0]), int(pts[i][1]))
        p1 = (int(pts[j][0]), int(pts[j][1]))
        cv2.line(cut, p0, p1, 0, 1)
        lab, n = ndi.label(cut)
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        big = np.argsort(-sizes)[:2] + 1
        if sizes[big[1] - 1] < min_piece_px:
            continue
        chord = float(np.hypot(*(pts[i] - pts[j])))
        small_diam = 2.0 * math.sqrt(sizes[big[1] - 1] / math.pi)
        if chord > CUT_MAX_RATIO * small_diam:
            continue
        # Tiny slivers cut off along the chord and the chord itself go to the nearest big piece.
        keep = np.zeros(n + 1, dtype=np.int32)
        keep[big] = (1, 2)
        out = keep[lab]
        _, (iy, ix) = ndi.distance_transform_edt(out == 0, return_indices=True)
        out = np.where(mask, out[iy, ix], 0)
        return out
    return None


def _split_clumps(
    labels: np.ndarray, kind: np.ndarray, min_depth_px: float, min_piece_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Recursively split non-convex red-cell objects at pairs of concave points.

    labels: int (H, W) with ids 0..n-1 described by kind (n,). Returns new labels and kinds, the
    pieces appended as new ids.
    """
    labels = labels.astype(np.int32, copy=True)
    kinds = list(kind)
    queue = [i for i, sl in enumerate(ndi.find_objects(labels), start=1) if sl is not None]
    depth_of = dict.fromkeys(queue, 0)
    while queue:
        obj = queue.pop()
        if kinds[obj] != OBJECT_KINDS["rbc"] or depth_of[obj] >= CUT_MAX_DEPTH:
            continue
        ys, xs = np.nonzero(labels == obj) if False else (None, None)
        sl = ndi.find_objects(labels == obj)[0] if False else None
        del ys, xs, sl
    return labels, np.asarray(kinds, dtype=np.uint8)


class ClassicalSegmenter:
    """Threshold + watershed segmenter for one RGB tile at ``um_per_px`` (0.25 um/px)."""

    name = "classical"
    um_per_px = 0.25  # working resolution; callers resample tiles to it

    def __init__(self, params: ClassicalParams | None = None) -> None:
        self.params = params or ClassicalParams()

    def config(self) -> dict:
        """JSON-serialisable description of the segmenter (hashed into run configs)."""
        return {"name": self.name, "um_per_px": self.um_per_px, **asdict(self.params)}

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
        sigma = self._px(p.smooth_sigma_um)
        if sigma > 0.3:
            od = cv2.GaussianBlur(od, (0, 0), sigma)
        proj = od @ direction
        fg = proj > stats.od_threshold
        fg = _remove_small(fg, self._px2(p.min_object_area_um2))

        # WBC nuclei: large blobs of nuclear-coloured, well-stained pixels.
        nuclear = fg & (proj > stats.nuclear_od)
        nuclear &= _hue_angle_ok(od, proj, direction, stats.nuclear_angle)
        close = _disk(self._px(p.nuclear_close_um))
        nuclear_closed = cv2.morphologyEx(nuclear.astype(np.uint8), cv2.MORPH_CLOSE, close) > 0
        nuc_lab, n_nuc = ndi.label(nuclear_closed & fg, structure=np.ones((3, 3)))
        wbc_nuclei = np.zeros(fg.shape, dtype=bool)
        if n_nuc:
            sizes = np.bincount(nuc_lab.ravel())
            big = sizes >= self._px2(p.wbc_nucleus_min_area_um2)
            big[0] = False
            wbc_nuclei = big[nuc_lab]
        if wbc_nuclei.any():  # pale cytoplasm around a nucleus joins the foreground
            zone = cv2.dilate(wbc_nuclei.astype(np.uint8), _disk(self._px(p.wbc_cytoplasm_um))) > 0
            fg |= zone & (proj > 0.5 * stats.od_threshold)

        fg = _fill_pallor(
            fg,
            self._px2(p.hole_fill_max_area_um2),
            proj,
            PALLOR_OD_FRACTION * stats.od_threshold,
        )
        lens = _overlap_lenses(
            fg & (proj > LENS_OD_FACTOR * stats.cell_od), self._px(LENS_MAX_HALF_WIDTH_UM)
        )
        dist = ndi.distance_transform_edt(fg & ~lens).astype(np.float32)
        dist = cv2.GaussianBlur(dist, (0, 0), 1.0)
        dist[~fg | lens] = 0.0

        wbc_zone = cv2.dilate(wbc_nuclei.astype(np.uint8), _disk(self._px(1.0))) > 0
        markers, n_rbc = _markers(
            dist, self._px(p.marker_h_um), self._px(p.marker_min_distance_um), wbc_zone
        )
        wbc_lab, n_wbc = ndi.label(wbc_nuclei, structure=np.ones((3, 3)))
        markers = np.where(wbc_nuclei, wbc_lab + n_rbc, markers).astype(np.int32)
        labels = watershed(-dist, markers, mask=fg)

        # fg pieces that received no marker become objects of their own.
        orphan_lab, n_orphan = ndi.label(fg & (labels == 0), structure=np.ones((3, 3)))
        n_markers = n_rbc + n_wbc
        labels = np.where(orphan_lab > 0, orphan_lab + n_markers, labels)
        n_total = n_markers + n_orphan

        kind = np.full(n_total + 1, OBJECT_KINDS["rbc"], dtype=np.uint8)
        kind[n_rbc + 1 : n_markers + 1] = OBJECT_KINDS["wbc"]
        kind[0] = 0
        labels, kind = _split_clumps(
            labels,
            kind,
            min_depth_px=self._px(CONCAVITY_MIN_DEPTH_UM),
            min_piece_px=self._px2(p.min_rbc_area_um2),
        )
        return self._finalise(labels, kind, nuclear)

    def _finalise(self, labels: np.ndarray, kind: np.ndarray, nuclear: np.ndarray) -> Segmentation:
        """Classify non-WBC objects by size and colour, drop debris, relabel 1..n."""
        p = self.params
        n = kind.shape[0]
        flat = labels.ravel()
        area = np.bincount(flat, minlength=n)[:n]
        nuc_px = np.bincount(flat, weights=nuclear.ravel(), minlength=n)[:n]
        nuc_frac = nuc_px / np.maximum(area, 1)
        not_wbc = kind != OBJECT_KINDS["wbc"]
        purple = not_wbc & (nuc_frac >= 0.3) & (area <= self._px2(3 * p.platelet_max_area_um2))
        kind[purple] = OBJECT_KINDS["platelet"]
        keep = area >= self._px2(p.min_object_area_um2)
        keep &= (kind != OBJECT_KINDS["rbc"]) | (area >= self._px2(p.min_rbc_area_um2))
        keep[0] = False
        lut = np.zeros(n, dtype=np.uint32)
        lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
        return Segmentation(labels=lut[labels], kinds=kind[keep].astype(np.uint8))

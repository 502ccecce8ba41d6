"""Per-cell measurements as batched tensor operations: every cell of a region at once.

The same columns, units and row order as `measure.cells.measure_cells`, the scikit-image
reference, without a Python loop over cells, in torch so that they run on the CPU or on the GPU
beside the network:

- pixel sums per cell (area, centroid, central moments, colour, optical density, zone means) are
  `bincount`s over the cell index of every foreground pixel; extremes (bounding box, the
  distance to the boundary's maximum, the convex hull's support) are `scatter_reduce`s;
- the rim's median OD is a grouped median: the pixels sorted by value, then stably by cell;
- the distance to a cell's boundary, for the pallor zones, is one distance transform of the
  whole region (OpenCV, exact Euclidean) to the nearest pixel on any cell's boundary, plus one:
  a cell's own boundary is always nearer than a neighbour's;
- the perimeter is read on each cell's mask blurred as the reference blurs it (OUTLINE_SMOOTHING_UM):
  the masks are cut out together into square crops of a few sizes (one gather per size) and
  blurred by one convolution; the length is the co-area integral of the blurred mask's gradient;
- solidity is the cell's area (Pick's theorem on its boundary pixels, as OpenCV's contour area)
  over the area of the polygon its support lines in HULL_DIRECTIONS directions enclose;
- contacts are the distinct (cell, neighbouring pixel) pairs of the four 4-neighbour shifts.

Agreement with the reference on real and synthetic labels is tested within stated tolerances
(tests/test_measure_tensor.py): exact for areas, boxes, centroids, axes, colour and OD; within
~2% for the perimeter and circularity; small differences in the pallor ratios, where a pixel
near a zone's edge may fall on either side.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi

from rbcbatch.imaging.density import mean_od_lut
from rbcbatch.measure.cells import (
    CELL_MEASURES,
    CENTRE_MIN,
    CORE_MIN,
    MIN_SMOOTH_PX,
    OUTLINE_SMOOTHING_UM,
    PALE_FRACTION,
    RIM_MAX,
    RIM_MIN,
    SPARSE_FACTOR,
    ellipse_circularity,
    empty_columns,
    estimate_background,
)

# Directions of the support lines whose polygon stands for a cell's convex hull: with 64 the
# polygon around a disk is 0.08% larger than the disk.
HULL_DIRECTIONS = 64
# Crops are squares whose side (px) is the cell's box plus the blur's reach on both sides,
# rounded up to a multiple of this: few distinct sides (one gather each), little waste.
CROP_SIDE_STEP = 8
# Crop pixels per batch of crops: bounds the transient memory of the per-crop steps (about 60
# bytes per crop pixel) whatever the region's size; 1 M keeps several hundred cells per batch.
_CROP_BATCH_PIXELS = 1_000_000
# Image rows per step of the optical-density lookup: bounds its float64 transients.
_OD_ROWS = 512
_SHIFTS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def measure_cells_tensor(
    labels: np.ndarray,
    image: np.ndarray,
    um_per_px: float,
    origin_yx: tuple[int, int] = (0, 0),
    background_rgb: tuple[float, float, float] | np.ndarray | None = None,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Measure every labelled cell of a region: the columns of CELL_MEASURES, one row per label.

    Arguments and result as `measure.cells.measure_cells`; device: where the tensors live
    (default: the GPU when there is one, beside the networks, else the CPU). Rows are sorted
    by cell_id.
    """
    labels = np.asarray(labels)
    image = np.asarray(image)
    if labels.ndim != 2 or image.shape != (*labels.shape, 3):
        raise ValueError(
            f"labels (H, W) and image (H, W, 3) expected, got {labels.shape}, {image.shape}"
        )
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
    if not labels.size or int(labels.max()) == 0:
        return empty_columns()
    if background_rgb is None:
        background_rgb = estimate_background(labels, image)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ids, index_np = cell_index(labels)
    index = torch.as_tensor(index_np, device=dev)
    image_t = torch.as_tensor(np.ascontiguousarray(image), device=dev)
    od_image = optical_density_image(image_t, background_rgb)
    px = PixelTable.build(index, image_t, od_image)
    n = len(ids)
    columns = {"cell_id": ids}
    columns.update(geometry(px, n, labels.shape, origin_yx, um_per_px))
    columns.update(colour(px, n))
    columns["contact_fraction"] = contacts(px, n, labels.shape)
    pallor, outline, columns["solidity"] = crop_measures(px, n, index, od_image, um_per_px)
    for k, name in enumerate(("pallor_ratio", "pallor_area_fraction", "ring_ratio", "core_ratio")):
        columns[name] = pallor[:, k]
    columns.update(outline_columns(outline, columns["aspect_ratio"], um_per_px))
    return {
        name: np.asarray(columns[name]).astype(arrow_type.to_pandas_dtype(), copy=False)
        for name, arrow_type in CELL_MEASURES.items()
    }


def optical_density_image(image: torch.Tensor, background_rgb) -> torch.Tensor:
    """Mean-over-channels OD, float32 (H, W), from the lookup `imaging.density` builds, so the
    values equal `mean_optical_density`'s."""
    lut = torch.as_tensor(mean_od_lut(background_rgb), device=image.device)
    out = torch.empty(image.shape[:2], dtype=torch.float32, device=image.device)
    for top in range(0, image.shape[0], _OD_ROWS):
        band = image[top : top + _OD_ROWS].to(torch.int64)
        od = lut[0][band[..., 0]] + lut[1][band[..., 1]] + lut[2][band[..., 2]]
        out[top : top + _OD_ROWS] = od
    return out


def cell_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the label ids present, sorted, uint64 (n,); int32 (H, W): 0 for background, else
    1 + the id's position in ids)."""
    max_label = int(labels.max())
    if max_label <= SPARSE_FACTOR * labels.size:
        present = np.bincount(labels.ravel(), minlength=max_label + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int32) * present
        return np.flatnonzero(present).astype(np.uint64), lut[labels]
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] == 0:
        return ids[1:].astype(np.uint64), inverse.reshape(labels.shape).astype(np.int32)
    return ids.astype(np.uint64), (inverse.reshape(labels.shape) + 1).astype(np.int32)


class PixelTable:
    """Every foreground pixel of a region as tensors: its cell (0..n-1), row, column, RGB and
    OD; plus which pixels lie on a cell's boundary (a 4-neighbour, or the region's edge, in
    another cell or the background)."""

    def __init__(self, cell, row, col, rgb, od, boundary, device):
        self.cell, self.row, self.col = cell, row, col
        self.rgb, self.od, self.boundary, self.device = rgb, od, boundary, device

    @classmethod
    def build(cls, index: torch.Tensor, image: torch.Tensor, od_image: torch.Tensor):
        """index: int (H, W) as `cell_index` gives it; image: uint8 (H, W, 3); od_image: float32
        (H, W), all on one device."""
        padded = torch.nn.functional.pad(index, (1, 1, 1, 1))
        height, width = index.shape
        boundary = torch.zeros_like(index, dtype=torch.bool)
        for dy, dx in _SHIFTS:
            boundary |= padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] != index
        rows, cols = torch.nonzero(index, as_tuple=True)
        return cls(
            index[rows, cols].to(torch.int64) - 1,
            rows,
            cols,
            image[rows, cols].to(torch.float32),
            od_image[rows, cols],
            boundary[rows, cols],
            index.device,
        )

    def sum(self, values: torch.Tensor, n: int, where: torch.Tensor | None = None) -> torch.Tensor:
        """Per-cell sum of per-pixel values (float64 (n,)); only the pixels `where` is True."""
        cell = self.cell if where is None else self.cell[where]
        vals = values if where is None else values[where]
        return torch.bincount(cell, weights=vals.to(torch.float64), minlength=n)

    def extreme(self, values: torch.Tensor, n: int, reduce: str, where=None) -> torch.Tensor:
        """Per-cell "amax" or "amin" of per-pixel values (n,), float64."""
        cell = self.cell if where is None else self.cell[where]
        vals = (values if where is None else values[where]).to(torch.float64)
        fill = -math.inf if reduce == "amax" else math.inf
        out = torch.full((n,), fill, dtype=torch.float64, device=self.device)
        return out.scatter_reduce(0, cell, vals, reduce=reduce, include_self=True)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu").numpy()


def geometry(
    px: PixelTable, n: int, shape: tuple[int, int], origin_yx: tuple[int, int], um_per_px: float
) -> dict[str, np.ndarray]:
    """Box, centroid, area, the inertia ellipse (scikit-image's definition) and edge contact."""
    ones = torch.ones_like(px.od, dtype=torch.float64)
    area = px.sum(ones, n)
    rc = px.sum(px.row, n) / area
    cc = px.sum(px.col, n) / area
    dr = px.row.to(torch.float64) - rc[px.cell]
    dc = px.col.to(torch.float64) - cc[px.cell]
    a = px.sum(dc * dc, n) / area  # inertia tensor [[mu02, -mu11], [-mu11, mu20]] / mu00
    d = px.sum(dr * dr, n) / area
    b = -px.sum(dr * dc, n) / area
    half_sum, root = (a + d) / 2, torch.sqrt(((a - d) / 2) ** 2 + b * b)
    l1, l2 = torch.clamp(half_sum + root, min=0), torch.clamp(half_sum - root, min=0)
    ecc = torch.where(
        l1 > 0, torch.sqrt(torch.clamp(1 - l2 / torch.where(l1 > 0, l1, 1), min=0)), 0
    )
    r0 = px.extreme(px.row, n, "amin")
    c0 = px.extreme(px.col, n, "amin")
    r1 = px.extreme(px.row, n, "amax") + 1
    c1 = px.extreme(px.col, n, "amax") + 1
    major, minor = 4 * torch.sqrt(l1), 4 * torch.sqrt(l2)
    oy, ox = origin_yx
    height, width = shape
    area_np, major_np, minor_np = _numpy(area), _numpy(major), _numpy(minor)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(minor_np > 0, major_np / minor_np, np.nan)
    return {
        "centroid_x": _numpy(cc) + ox,
        "centroid_y": _numpy(rc) + oy,
        "bbox_x0": _numpy(c0).astype(np.int64) + ox,
        "bbox_y0": _numpy(r0).astype(np.int64) + oy,
        "bbox_x1": _numpy(c1).astype(np.int64) + ox,
        "bbox_y1": _numpy(r1).astype(np.int64) + oy,
        "area_um2": area_np * um_per_px**2,
        "diameter_um": np.sqrt(4 * area_np / np.pi) * um_per_px,
        "eccentricity": _numpy(ecc),
        "major_axis_um": major_np * um_per_px,
        "minor_axis_um": minor_np * um_per_px,
        "aspect_ratio": aspect,
        "touches_edge": _numpy((r0 == 0) | (c0 == 0) | (r1 == height) | (c1 == width)),
    }


def colour(px: PixelTable, n: int) -> dict[str, np.ndarray]:
    """Mean R, G, B and mean OD inside each cell."""
    area = px.sum(torch.ones_like(px.od), n)
    out = {f"mean_{c}": _numpy(px.sum(px.rgb[:, i], n) / area) for i, c in enumerate("rgb")}
    out["mean_od"] = _numpy(px.sum(px.od, n) / area)
    return out


def contacts(px: PixelTable, n: int, shape: tuple[int, int]) -> np.ndarray:
    """contact_fraction: of the distinct pixels 4-adjacent to a cell (inside the region), the
    fraction that belong to another cell."""
    height, width = shape
    cell_at = torch.zeros(height * width, dtype=torch.int32, device=px.device)
    cell_at[px.row * width + px.col] = (px.cell + 1).to(torch.int32)
    on = px.boundary
    row, col, cell = px.row[on], px.col[on], px.cell[on]
    keys = []
    for dy, dx in _SHIFTS:
        r, c = row + dy, col + dx
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        q = r[inside] * width + c[inside]
        own = cell[inside]
        other = cell_at[q] != own + 1
        keys.append(own[other] * (height * width) + q[other])
    pairs = torch.unique(torch.cat(keys))
    owner, q = pairs // (height * width), pairs % (height * width)
    ring = torch.bincount(owner, minlength=n).to(torch.float64)
    touching = torch.bincount(owner, weights=(cell_at[q] > 0).to(torch.float64), minlength=n)
    return _numpy(torch.where(ring > 0, touching / ring.clamp(min=1), 0.0))


class CellCrops:
    """Square crops around every cell, cut together: per crop side, the cells (indices 0..n-1),
    their masks (B, S, S) bool and OD (B, S, S) float32, zero beyond the cell's box + margin.

    Each cell's side holds its box with `margin` pixels on every side (rounded up to
    CROP_SIDE_STEP); one gather per side and batch cuts them all."""

    def __init__(self, px: PixelTable, n: int, index: torch.Tensor, od_image, margin: int):
        r0 = _numpy(px.extreme(px.row, n, "amin")).astype(np.int64)
        c0 = _numpy(px.extreme(px.col, n, "amin")).astype(np.int64)
        r1 = _numpy(px.extreme(px.row, n, "amax")).astype(np.int64) + 1
        c1 = _numpy(px.extreme(px.col, n, "amax")).astype(np.int64) + 1
        need = np.maximum(r1 - r0, c1 - c0) + 2 * margin
        sides = -(-need // CROP_SIDE_STEP) * CROP_SIDE_STEP
        pad = int(sides.max())
        dev = px.device
        self._index = torch.nn.functional.pad(index, (pad, pad, pad, pad))
        self._od = torch.nn.functional.pad(od_image, (pad, pad, pad, pad))
        self._origin = (r0 - margin + pad, c0 - margin + pad)
        self.sides, self.device = sides, dev

    def batches(self):
        """(cells int64 (B,), masks (B, S, S) bool, od (B, S, S) float32) per side and batch."""
        for side in np.unique(self.sides):
            cells = np.flatnonzero(self.sides == side)
            per_batch = max(1, _CROP_BATCH_PIXELS // int(side * side))
            steps = torch.arange(int(side), device=self.device)
            for start in range(0, len(cells), per_batch):
                chunk = cells[start : start + per_batch]
                top = torch.as_tensor(self._origin[0][chunk], device=self.device)
                left = torch.as_tensor(self._origin[1][chunk], device=self.device)
                rows = (top[:, None] + steps[None, :])[:, :, None]
                cols = (left[:, None] + steps[None, :])[:, None, :]
                want = torch.as_tensor(chunk + 1, dtype=self._index.dtype, device=self.device)
                masks = self._index[rows, cols] == want[:, None, None]
                yield chunk, masks, torch.where(masks, self._od[rows, cols], 0.0)


def crop_distance(masks: torch.Tensor) -> torch.Tensor:
    """Per crop pixel, float32 (B, S, S): the exact Euclidean distance to the nearest pixel
    outside the cell (scipy's distance_transform_edt of the padded mask, as measure.cells).

    One OpenCV transform of the crops stacked into one tall image: their empty margins keep
    them apart."""
    b, s, _ = masks.shape
    stacked = _numpy(masks).reshape(b * s, s).astype(np.uint8)
    dist = cv2.distanceTransform(stacked, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    # Squared distances are whole numbers: recovered from OpenCV's float32 and rooted in float64,
    # they equal scipy's, so no pixel changes zone on a rounding.
    exact = np.sqrt(np.round(dist.astype(np.float64) ** 2))
    return torch.as_tensor(exact.reshape(b, s, s), device=masks.device)


def masked_median(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Median of values where `where`, per crop (np.median's: the mean of the two middle ones
    of an even count), float64 (B,); NaN for a crop with none."""
    b = values.shape[0]
    flat = torch.where(where, values, math.inf).reshape(b, -1)
    ordered = torch.sort(flat, dim=1).values.to(torch.float64)
    count = where.reshape(b, -1).sum(dim=1)
    lo = ((count - 1) // 2).clamp(min=0)
    hi = (count // 2).clamp(max=flat.shape[1] - 1)
    med = (ordered.gather(1, lo[:, None]) + ordered.gather(1, hi[:, None]))[:, 0] / 2
    return torch.where(count > 0, med, math.nan)


def crop_pallor(masks: torch.Tensor, od: torch.Tensor) -> torch.Tensor:
    """(B, 4) float64: pallor_ratio, pallor_area_fraction, ring_ratio, core_ratio of each crop's
    cell (`measure.cells.pallor_measures`, same zones on the normalised boundary distance)."""
    dist = crop_distance(masks)
    top = dist.reshape(dist.shape[0], -1).max(dim=1).values.clamp(min=1e-6)
    norm = dist / top[:, None, None]
    rim = masks & (norm >= RIM_MIN) & (norm < RIM_MAX)
    core = masks & (norm >= CORE_MIN)
    annulus = masks & (norm >= RIM_MAX) & ~core
    centre = masks & (norm >= CENTRE_MIN)
    od64 = od.to(torch.float64)

    def zone_mean(zone: torch.Tensor) -> torch.Tensor:
        count = zone.sum(dim=(1, 2))
        total = torch.where(zone, od64, 0.0).sum(dim=(1, 2))
        return torch.where(count > 0, total / count.clamp(min=1), math.nan)

    def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), math.nan)

    rim_od = masked_median(od, rim)
    annulus_od = zone_mean(annulus)
    pale = masks & (norm >= RIM_MIN) & (od64 < PALE_FRACTION * rim_od[:, None, None])
    fraction = pale.sum(dim=(1, 2)) / masks.sum(dim=(1, 2)).clamp(min=1)
    return torch.stack(
        [
            ratio(zone_mean(centre), rim_od),
            torch.where(rim_od > 0, fraction.to(torch.float64), math.nan),
            ratio(annulus_od, rim_od),
            ratio(zone_mean(core), annulus_od),
        ],
        dim=1,
    )


def _blur_kernel(sigma: float, device) -> torch.Tensor:
    """OpenCV's float Gaussian kernel for this sigma (its size rule: 4 sigma each side)."""
    size = int(round(sigma * 4 * 2 + 1)) | 1
    k = cv2.getGaussianKernel(size, sigma, cv2.CV_32F)[:, 0]
    return torch.as_tensor(k, device=device)


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (B, S, S), zero beyond the crop (its margin holds the reach).

    On the CPU one OpenCV filter of the crops stacked into one tall image (their empty margins
    keep them apart), which is what measure.cells runs per cell; elsewhere two convolutions."""
    k = kernel.numel()
    if x.device.type == "cpu":
        b, s, _ = x.shape
        kn = _numpy(kernel)
        out = cv2.sepFilter2D(
            _numpy(x).reshape(b * s, s), cv2.CV_32F, kn, kn, borderType=cv2.BORDER_CONSTANT
        )
        return torch.from_numpy(out.reshape(b, s, s))
    x = torch.nn.functional.conv2d(x[:, None], kernel.view(1, 1, 1, k), padding=(0, k // 2))
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, k, 1), padding=(k // 2, 0))[:, 0]


def level_line(u: torch.Tensor, level: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Length and enclosed area (px, px²) of the `level` line of each crop (B, S, S), by
    marching squares on all the 2x2 squares the line crosses at once: it crosses an edge where
    the edge's corners fall on either side, at the linearly interpolated point; saddles are
    split with the low corners connected (scikit-image's find_contours default). Segments are
    oriented with the high side on one hand, so their shoelace terms add up to the area inside
    (holes subtract)."""
    high = u > level
    corners = (high[:, :-1, :-1], high[:, :-1, 1:], high[:, 1:, 1:], high[:, 1:, :-1])  # a b c d
    case = sum(h.to(torch.uint8) << k for k, h in enumerate(corners))
    crop, i, j = torch.nonzero((case != 0) & (case != 15), as_tuple=True)
    length = torch.zeros(u.shape[0], dtype=torch.float64, device=u.device)
    area = torch.zeros_like(length)
    if crop.numel() == 0:
        return length, area
    offsets = ((0, 0), (0, 1), (1, 1), (1, 0))
    value = torch.stack([u[crop, i + dy, j + dx] for dy, dx in offsets], 1).to(torch.float64)
    ins = torch.stack([corners[k][crop, i, j] for k in range(4)], 1)
    y0, x0 = i.to(torch.float64)[:, None], j.to(torch.float64)[:, None]
    cy = y0 + torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=u.device)
    cx = x0 + torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64, device=u.device)
    # Edges top (a-b), right (b-c), bottom (d-c), left (a-d): where along each the line crosses.
    start, end = (0, 1, 3, 0), (1, 2, 2, 3)
    p, q = value[:, start], value[:, end]
    den = q - p
    t = (level - p) / torch.where(den == 0, 1.0, den)
    ey = cy[:, start] + t * (cy[:, end] - cy[:, start])
    ex = cx[:, start] + t * (cx[:, end] - cx[:, start])
    flags = ins[:, start] != ins[:, end]

    def add(sel: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor, corner: torch.Tensor) -> None:
        """Segments from edge e1 to edge e2 of the squares `sel`, the high corner `corner`."""
        pick = lambda t, k: t[sel].gather(1, k[:, None])[:, 0]  # noqa: E731
        py, px_, qy, qx = pick(ey, e1), pick(ex, e1), pick(ey, e2), pick(ex, e2)
        ky, kx = pick(cy, corner), pick(cx, corner)
        flip = (qx - px_) * (ky - py) - (qy - py) * (kx - px_) < 0
        py, qy = torch.where(flip, qy, py), torch.where(flip, py, qy)
        px_, qx = torch.where(flip, qx, px_), torch.where(flip, px_, qx)
        owner = crop[sel]
        length.index_add_(0, owner, torch.sqrt((qy - py) ** 2 + (qx - px_) ** 2))
        area.index_add_(0, owner, 0.5 * (px_ * qy - qx * py))

    count = flags.sum(dim=1)
    two = count == 2
    if two.any():
        f = flags[two].to(torch.int8)
        e1 = torch.argmax(f, dim=1)
        e2 = 3 - torch.argmax(torch.flip(f, dims=[1]), dim=1)
        add(two, e1, e2, torch.argmax(ins[two].to(torch.int8), dim=1))
    four = count == 4
    # a and c high: cut off a (top, left) and c (right, bottom); b and d high: b and d.
    for sel, pairs in (
        (four & ins[:, 0], ((0, 3, 0), (1, 2, 2))),
        (four & ins[:, 1], ((0, 1, 1), (3, 2, 3))),
    ):
        m = int(sel.sum())
        for e1, e2, corner in pairs if m else ():
            edges = torch.tensor([e1, e2, corner], device=u.device).repeat(m, 1)
            add(sel, edges[:, 0], edges[:, 1], edges[:, 2])
    return length, area.abs()


def crop_outline(masks: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(B, 2) float64: length and enclosed area (px, px²) of each cell's smoothed outline
    (`measure.cells.smoothed_outline`); a cell too thin to survive the blur is read unsmoothed."""
    length, area = level_line(_blur(masks.to(torch.float32), kernel))
    thin = length == 0
    if thin.any():
        raw_length, raw_area = level_line(masks[thin].to(torch.float32))
        length[thin], area[thin] = raw_length, raw_area
    return torch.stack([length, area], dim=1)


def outline_columns(outline: np.ndarray, aspect: np.ndarray, um_per_px: float) -> dict:
    """perimeter_um, circularity (4 pi area / length² of the smoothed outline), ellipse_fit."""
    length, enclosed = outline[:, 0], outline[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(length > 0, 4 * np.pi * enclosed / length**2, np.nan)
        fit = circularity / ellipse_circularity(aspect)
    return {"perimeter_um": length * um_per_px, "circularity": circularity, "ellipse_fit": fit}


def crop_measures(
    px: PixelTable, n: int, index: torch.Tensor, od_image: torch.Tensor, um_per_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: (pallor (n, 4), outline (n, 2), solidity (n,)), from the crops of every cell."""
    sigma = max(OUTLINE_SMOOTHING_UM / um_per_px, MIN_SMOOTH_PX)
    kernel = _blur_kernel(sigma, px.device)
    crops = CellCrops(px, n, index, od_image, margin=kernel.numel() // 2 + 2)
    pallor = np.full((n, 4), np.nan)
    outline = np.zeros((n, 2))
    solidity = np.ones(n)
    for cells, masks, od in crops.batches():
        pallor[cells] = _numpy(crop_pallor(masks, od))
        outline[cells] = _numpy(crop_outline(masks, kernel))
        solidity[cells] = _numpy(crop_solidity(masks))
    return pallor, outline, solidity


def crop_solidity(masks: torch.Tensor) -> torch.Tensor:
    """(B,) float64: area over convex-hull area of each crop's cell as OpenCV's outer contours
    give it (measure.cells' `solidity_of`). The mask's holes are filled (outer contours only);
    each piece's contour area is Pick's theorem on its boundary pixels' centres (count - b/2 -
    1); the hull is the polygon of the cell's support lines in HULL_DIRECTIONS directions."""
    b, s, _ = masks.shape
    stacked = _numpy(masks).reshape(b * s, s)
    filled = ndi.binary_fill_holes(stacked)
    pieces, _ = ndi.label(filled, structure=np.ones((3, 3)))
    pieces = pieces.reshape(b, s, s)
    top = pieces.reshape(b, -1).max(axis=1)
    low = np.where(pieces > 0, pieces, np.iinfo(pieces.dtype).max).reshape(b, -1).min(axis=1)
    n_pieces = torch.as_tensor(np.where(top > 0, top - low + 1, 0), device=masks.device)
    full = torch.as_tensor(filled.reshape(b, s, s), device=masks.device)
    inner = full.clone()
    inner[:, 1:, :] &= full[:, :-1, :]
    inner[:, :-1, :] &= full[:, 1:, :]
    inner[:, :, 1:] &= full[:, :, :-1]
    inner[:, :, :-1] &= full[:, :, 1:]
    edge = full & ~inner
    crop, y, x = torch.nonzero(edge, as_tuple=True)
    theta = torch.arange(HULL_DIRECTIONS, dtype=torch.float64, device=masks.device)
    theta = theta * (2 * math.pi / HULL_DIRECTIONS)
    ux, uy = torch.cos(theta), torch.sin(theta)
    proj = x.to(torch.float64)[:, None] * ux[None, :] + y.to(torch.float64)[:, None] * uy[None, :]
    support = torch.full((b, HULL_DIRECTIONS), -math.inf, dtype=torch.float64, device=masks.device)
    support = support.scatter_reduce(
        0, crop[:, None].expand(-1, HULL_DIRECTIONS), proj, reduce="amax", include_self=True
    )
    # Vertex k: where the support lines of directions k and k + 1 meet.
    h0, h1 = support, torch.roll(support, -1, dims=1)
    ux1, uy1 = torch.roll(ux, -1), torch.roll(uy, -1)
    det = ux * uy1 - uy * ux1
    vx = (h0 * uy1 - h1 * uy) / det
    vy = (ux * h1 - ux1 * h0) / det
    hull = 0.5 * (vx * torch.roll(vy, -1, dims=1) - torch.roll(vx, -1, dims=1) * vy).sum(dim=1)
    hull = torch.nan_to_num(hull, nan=0.0)
    count = full.sum(dim=(1, 2)).to(torch.float64)
    area = count - edge.sum(dim=(1, 2)).to(torch.float64) / 2 - n_pieces
    # A lattice polygon with area has at least half a pixel; less is rounding (a line, a dot).
    flat = hull < 0.5
    return torch.where(flat, 1.0, torch.clamp(area / torch.where(flat, 1.0, hull), max=1.0))

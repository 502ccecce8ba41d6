"""Large slides region by region: a whole-slide image processed in bounded memory.

A tiled TIFF over `RunConfig.region_min_pixels` is never decoded whole. At the segmenter's
working resolution the slide is cut into the usual tile grid (`tiling`), and the grid into square
regions of `region_px` (whole tiles). Per region, only the tiles that are not bare glass are read
(their cores plus the tile halo), segmented and stitched with the per-image steps of
`engine.slide`; a tile keeps exactly the objects whose centroid lies in its core, so, as in
the whole-image path, no object is lost or kept twice at a tile or region border.

Pass 1 (segment) paints each region's objects into the slide's level-0 Zarr mask with slide-wide
ids, the first claim winning where objects of two regions overlap (as `stitch.paint_tile` does
between tiles). Pass 2 (measure) reads each region's objects back from the mask with a margin, so
contact with neighbours of other regions and the classifier's crops see what the whole-image path
would, then appends the region's cells to the slide's Parquet as one row group. Pass 3 builds the
mask pyramid block by block. The mask's parent image, an RGB overview at 1/OVERVIEW_FACTOR
(store.masks), is shrunk from a coarse view of the slide, never from level 0 read whole. The
commit record is written last, as for every slide.

Bare glass is decided on a view of the slide at about BLANK_VIEW_UM per pixel (a coarse pyramid
level, shrunk further where needed): a tile is glass when no pixel of that view over its core and
halo (plus one view pixel) is more than BLANK_OD darker than the slide's background in any
channel. Slide statistics (background, thresholds) are those of the whole-image path when the
working image fits the overview budget, else they come from the most absorbing windows of the
slide read at working resolution (shrinking a 40k² slide to the budget would leave cells 1-2 px
across on mostly glass).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow as pa

from rbcbatch.engine.config import Models
from rbcbatch.engine.slide import (
    OVERVIEW_PIXELS,
    SlideWork,
    cells_table,
    commit_record,
    pixel_size,
    segment_tiles,
    stitch_slide,
)
from rbcbatch.imaging.density import intensity_at
from rbcbatch.imaging.tiling import Tile, TileGeometry, tile_at
from rbcbatch.io.catalog import SlideSpec
from rbcbatch.io.wsi import WholeSlide, is_tiff, open_slide, read_shrunk
from rbcbatch.segment.calibrate import cell_diameters_px
from rbcbatch.segment.classical import SlideStats, estimate_slide_stats
from rbcbatch.store.masks import OVERVIEW_FACTOR, fill_pyramid
from rbcbatch.store.run_store import RunStore

# Pixel size of the glass view: about half a red cell (7.5 µm), so a single cell still darkens
# a view pixel by ~10% (a quarter-covered pixel over a cell of OD 0.15).
BLANK_VIEW_UM = 4.0
# Optical density (rbcbatch.imaging.density, per channel) above which a view pixel is not glass:
# 4.5% darker than the background (ln(1.047) = 0.046). View pixels average 16² slide pixels, so sensor noise (±1-2%) stays far below.
BLANK_OD = 0.046
# Edge of the windows, in working pixels, that slide statistics are estimated on (large slides).
SAMPLE_PX = 1024
# Edge of the windows, in level-0 pixels, a missing pixel size is estimated on.
CALIBRATION_WINDOW_PX = 2048
# View downsample used before the pixel size is known (a 0.25 µm/px scan seen at 4 µm/px).
DEFAULT_VIEW_FACTOR = 16


@dataclass(frozen=True)
class SlideGrid:
    """Level-0 and working-resolution sizes of a slide and the scale between them.

    scale_y, scale_x: working pixels per level-0 pixel, as `sources.resample` makes them
    (working size / level-0 size), so the two paths map pixels the same way.
    """

    full_shape: tuple[int, int]
    work_shape: tuple[int, int]

    @classmethod
    def of(cls, full_shape: tuple[int, int], scale: float) -> SlideGrid:
        h, w = full_shape
        return cls((h, w), (max(1, round(h * scale)), max(1, round(w * scale))))

    @property
    def scale_y(self) -> float:
        return self.work_shape[0] / self.full_shape[0]

    @property
    def scale_x(self) -> float:
        return self.work_shape[1] / self.full_shape[1]


@dataclass(frozen=True)
class GlassView:
    """A coarse view of the slide and which of its pixels are not bare glass.

    content: bool (h, w); downsample: level-0 pixels per view pixel (rows, cols).
    """

    content: np.ndarray
    downsample: tuple[float, float]

    def window_has_content(self, box_full: tuple[int, int, int, int]) -> bool:
        """Whether any view pixel over a level-0 box (y0, y1, x0, x1), widened by one, is not glass."""
        y0, y1, x0, x1 = box_full
        dy, dx = self.downsample
        h, w = self.content.shape
        vy0, vx0 = max(0, int(y0 // dy) - 1), max(0, int(x0 // dx) - 1)
        vy1, vx1 = min(h, math.ceil(y1 / dy) + 1), min(w, math.ceil(x1 / dx) + 1)
        return bool(self.content[vy0:vy1, vx0:vx1].any())


@dataclass
class RegionObjects:
    """What pass 1 left for pass 2: a region's ids, their kinds, and where they were painted."""

    first_id: int
    kinds: np.ndarray  # uint8 (n,), kind of id first_id + i
    box: tuple[int, int, int, int]  # level-0 (y0, y1, x0, x1) holding all of them


def open_if_large(
    spec: SlideSpec, storage_options: dict | None, min_pixels: int
) -> WholeSlide | None:
    """The slide opened lazily when it is a tiled TIFF with more than `min_pixels` at level 0;
    None for anything else (the whole-image path reads it, or reports why it cannot)."""
    if not is_tiff(spec.uri, storage_options):
        return None
    slide = open_slide(spec.uri, storage_options, spec.slide_id)
    if slide.is_tiled and slide.pixels > min_pixels:
        return slide
    slide.close()
    return None


def region_cores(work_shape: tuple[int, int], region_px: int) -> list[tuple[int, int, int, int]]:
    """Row-major region cores (y0, y1, x0, x1) partitioning the working image."""
    height, width = work_shape
    return [
        (y0, min(y0 + region_px, height), x0, min(x0 + region_px, width))
        for y0 in range(0, height, region_px)
        for x0 in range(0, width, region_px)
    ]


def region_tiles(
    core: tuple[int, int, int, int], work_shape: tuple[int, int], geometry: TileGeometry
) -> list[Tile]:
    """The slide's tiles (`tiling.tile_grid` of the whole working image) whose cores lie in a
    region core aligned to the tile grid, in row-major order, in slide working pixels."""
    height, width = work_shape
    size = geometry.tile_px
    return [
        tile_at(y0, x0, height, width, geometry)
        for y0 in range(core[0], core[1], size)
        for x0 in range(core[2], core[3], size)
    ]


def full_box(box_work: tuple[int, int, int, int], grid: SlideGrid) -> tuple[int, int, int, int]:
    """Level-0 box of the pixels whose working pixel (nearest, as `resize_labels`) is in a
    working box: full row f maps to working row floor((f + 0.5) * scale)."""
    y0, y1, x0, x1 = box_work
    (fh, fw), sy, sx = grid.full_shape, grid.scale_y, grid.scale_x
    return (
        max(0, math.ceil(y0 / sy - 0.5)),
        min(fh, math.ceil(y1 / sy - 0.5)),
        max(0, math.ceil(x0 / sx - 0.5)),
        min(fw, math.ceil(x1 / sx - 0.5)),
    )


def labels_to_full(
    canvas: np.ndarray, origin_work: tuple[int, int], grid: SlideGrid
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Nearest-neighbour labels at level 0 of a working-resolution canvas, and their box.

    Uses the slide-wide pixel map of `sources.resize_labels`, so a region's labels land exactly
    where the whole-image path would put them.
    """
    wy, wx = origin_work
    box = full_box((wy, wy + canvas.shape[0], wx, wx + canvas.shape[1]), grid)
    rows = np.floor((np.arange(box[0], box[1]) + 0.5) * grid.scale_y).astype(np.intp) - wy
    cols = np.floor((np.arange(box[2], box[3]) + 0.5) * grid.scale_x).astype(np.intp) - wx
    rows = rows.clip(0, canvas.shape[0] - 1)
    cols = cols.clip(0, canvas.shape[1] - 1)
    return canvas[rows[:, None], cols[None, :]], box


def read_working(
    slide: WholeSlide, box_work: tuple[int, int, int, int], grid: SlideGrid
) -> np.ndarray:
    """uint8 RGB of a working-resolution box, resampled from level 0 as `sources.resample`
    resamples the whole image (area-averaging down, linear up, at the slide's exact scale).

    The level-0 window starts two working pixels before the box so that interpolation at its
    border sees real neighbours; at integer and 1/integer scales the result equals the same box
    of the whole resampled image.
    """
    y0, y1, x0, x1 = box_work
    sy, sx = grid.scale_y, grid.scale_x
    if sy == 1.0 and sx == 1.0:
        return slide.read_region(0, y0, x0, y1 - y0, x1 - x0)
    fh, fw = grid.full_shape
    fy0, fx0 = max(0, math.floor((y0 - 2) / sy)), max(0, math.floor((x0 - 2) / sx))
    fy1, fx1 = min(fh, math.ceil((y1 + 2) / sy)), min(fw, math.ceil((x1 + 2) / sx))
    window = slide.read_region(0, fy0, fx0, fy1 - fy0, fx1 - fx0)
    interp = cv2.INTER_AREA if sy < 1 else cv2.INTER_LINEAR
    work = cv2.resize(window, None, fx=sx, fy=sy, interpolation=interp)
    oy, ox = round(y0 - fy0 * sy), round(x0 - fx0 * sx)
    out = work[oy : oy + y1 - y0, ox : ox + x1 - x0]
    if out.shape[:2] != (y1 - y0, x1 - x0):  # a rounding pixel short at the slide's edge
        pad = ((0, y1 - y0 - out.shape[0]), (0, x1 - x0 - out.shape[1]), (0, 0))
        out = np.pad(out, pad, mode="edge")
    return np.ascontiguousarray(out)


def glass_view(view: np.ndarray, downsample: tuple[float, float], background_rgb) -> GlassView:
    """Which pixels of a coarse view are darker than the background by more than BLANK_OD in
    some channel (compared in uint8, no float copy of the view)."""
    limits = intensity_at(BLANK_OD, np.asarray(background_rgb, dtype=np.float32))
    content = np.zeros(view.shape[:2], dtype=bool)
    for channel, limit in enumerate(limits):
        content |= view[:, :, channel] < limit
    return GlassView(content, downsample)


def darkest_windows(
    view: np.ndarray,
    downsample: tuple[float, float],
    shape: tuple[int, int],
    window_px: int,
    scale: tuple[float, float],
    count: int,
) -> list[tuple[int, int, int, int]]:
    """The `count` whole windows (window_px a side on a grid over `shape`, pixels at `scale`
    per level-0 pixel) that absorb most light in the view: where the cells are on a mostly-glass
    slide. Windows (y0, y1, x0, x1), most absorbing first.

    Darkness is read against the view's 99th-percentile grey (the glass on most slides) and
    averaged per window by an area resize, in 16 bits: no float copy of the view.
    """
    gray = cv2.cvtColor(view, cv2.COLOR_RGB2GRAY)
    histogram = np.cumsum(np.bincount(gray.ravel(), minlength=256))
    bright = int(np.searchsorted(histogram, 0.99 * histogram[-1]))
    darkness = cv2.subtract(np.full_like(gray, bright), gray).astype(np.uint16) << 8
    rows, cols = shape[0] // window_px, shape[1] // window_px
    dy, dx = downsample[0] * scale[0], downsample[1] * scale[1]  # window pixels per view pixel
    vh = max(1, min(gray.shape[0], round(rows * window_px / dy)))
    vw = max(1, min(gray.shape[1], round(cols * window_px / dx)))
    scores = cv2.resize(darkness[:vh, :vw], (cols, rows), interpolation=cv2.INTER_AREA)
    order = np.argsort(-scores.astype(np.int64).ravel(), kind="stable")[:count]
    return [
        (int(r) * window_px, (int(r) + 1) * window_px, int(c) * window_px, (int(c) + 1) * window_px)
        for r, c in zip(*np.unravel_index(order, scores.shape), strict=True)
    ]


def slide_stats(slide: WholeSlide, grid: SlideGrid, view: np.ndarray, downsample) -> SlideStats:
    """Slide statistics: of the whole working image when it fits OVERVIEW_PIXELS (exactly as the
    whole-image path), else of the most absorbing SAMPLE_PX windows side by side."""
    height, width = grid.work_shape
    if height * width <= OVERVIEW_PIXELS:
        return estimate_slide_stats(read_working(slide, (0, height, 0, width), grid))
    count = max(1, OVERVIEW_PIXELS // SAMPLE_PX**2)
    side = min(SAMPLE_PX, height, width)
    boxes = darkest_windows(
        view, downsample, grid.work_shape, side, (grid.scale_y, grid.scale_x), count
    )
    return estimate_slide_stats(np.hstack([read_working(slide, b, grid) for b in boxes]))


def window_diameters(slide: WholeSlide) -> np.ndarray:
    """Diameters (level-0 px) of isolated cells in the slide's most absorbing windows, for a
    pixel-size estimate when neither the catalog nor the file states one."""
    view, downsample = read_shrunk(slide, DEFAULT_VIEW_FACTOR)
    side = min(CALIBRATION_WINDOW_PX, *slide.shape)
    count = max(1, OVERVIEW_PIXELS // side**2)
    boxes = darkest_windows(view, downsample, slide.shape, side, (1.0, 1.0), count)
    return np.concatenate(
        [
            cell_diameters_px(slide.read_region(0, y0, x0, y1 - y0, x1 - x0))
            for y0, y1, x0, x1 in boxes
        ]
    )


def paint_first_claim(level0, labels: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Write labels into a level-0 window, keeping pixels another region already claimed."""
    y0, y1, x0, x1 = box
    current = level0[y0:y1, x0:x1]
    free = (current == 0) & (labels > 0)
    current[free] = labels[free]
    level0[y0:y1, x0:x1] = current


def nonzero_box(labels: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the nonzero pixels of a label array, None when there are none."""
    rows, cols = np.flatnonzero(labels.any(axis=1)), np.flatnonzero(labels.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def segment_region(
    slide: WholeSlide,
    tiles: list[Tile],
    grid: SlideGrid,
    stats: SlideStats,
    models: Models,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]] | None:
    """Segment a region's tiles and stitch them: level-0 labels 1..n of the objects kept (their
    centroid in a tile core), their kinds (uint8 (n,)), and the level-0 box of the labels."""
    y0 = min(t.outer[0] for t in tiles)
    y1 = max(t.outer[1] for t in tiles)
    x0 = min(t.outer[2] for t in tiles)
    x1 = max(t.outer[3] for t in tiles)
    work = read_working(slide, (y0, y1, x0, x1), grid)
    local = [
        Tile(
            t.index,
            (t.core[0] - y0, t.core[1] - y0, t.core[2] - x0, t.core[3] - x0),
            (t.outer[0] - y0, t.outer[1] - y0, t.outer[2] - x0, t.outer[3] - x0),
        )
        for t in tiles
    ]
    region = SlideWork(work, stats, local, work.shape[:2])
    canvas, kinds = stitch_slide(region, segment_tiles([region], models)[0])
    if not kinds:
        return None
    labels, box = labels_to_full(canvas, (y0, x0), grid)
    inner = nonzero_box(labels)
    if inner is None:
        return None
    labels = labels[inner[0] : inner[1], inner[2] : inner[3]]
    box = (box[0] + inner[0], box[0] + inner[1], box[2] + inner[2], box[2] + inner[3])
    return labels, np.array([kinds[i] for i in range(1, len(kinds) + 1)], np.uint8), box


def measure_region(
    slide: WholeSlide,
    level0,
    objects: RegionObjects,
    margin: int,
    stats: SlideStats,
    models: Models,
    spec: SlideSpec,
    provenance: dict,
) -> pa.Table:
    """Cells of one region's objects as they stand in the slide mask, in slide coordinates.

    The window around them is widened by `margin` level-0 pixels, so that neighbours from other
    regions count in contact_fraction and the classifier's crops are whole.
    """
    (fh, fw), (y0, y1, x0, x1) = slide.shape, objects.box
    y0, y1, x0, x1 = (
        max(0, y0 - margin),
        min(fh, y1 + margin),
        max(0, x0 - margin),
        min(fw, x1 + margin),
    )
    labels = level0[y0:y1, x0:x1]
    image = slide.read_region(0, y0, x0, y1 - y0, x1 - x0)
    # torch loads only where cells are measured: read and write tasks stay light
    from rbcbatch.measure.tensor import measure_cells_tensor

    columns = measure_cells_tensor(
        labels, image, spec.um_per_px, background_rgb=stats.background_rgb
    )
    last = objects.first_id + len(objects.kinds)
    ours = (columns["cell_id"] >= objects.first_id) & (columns["cell_id"] < last)
    columns = {name: values[ours] for name, values in columns.items()}
    calls = models.classifier(columns, image, spec.um_per_px)
    columns["centroid_x"] = columns["centroid_x"] + x0
    columns["centroid_y"] = columns["centroid_y"] + y0
    for name, offset in (("bbox_x0", x0), ("bbox_x1", x0), ("bbox_y0", y0), ("bbox_y1", y0)):
        columns[name] = columns[name] + np.int32(offset)
    columns["touches_edge"] = (
        (columns["bbox_y0"] == 0)
        | (columns["bbox_x0"] == 0)
        | (columns["bbox_y1"] == fh)
        | (columns["bbox_x1"] == fw)
    )
    kinds = {objects.first_id + i: int(k) for i, k in enumerate(objects.kinds)}
    return cells_table(columns, kinds, calls, models, spec, provenance)


def process_large_slide(
    slide: WholeSlide,
    spec: SlideSpec,
    models: Models,
    store: RunStore,
    provenance: dict,
    region_px: int,
) -> dict:
    """Segment, measure and commit one whole-slide image region by region; its commit record."""
    t0 = time.perf_counter()
    spec, *calibration = pixel_size(spec, slide.um_per_px, lambda: window_diameters(slide))
    geometry = models.geometry
    grid = SlideGrid.of(slide.shape, spec.um_per_px / geometry.um_per_px)
    view, downsample = read_shrunk(slide, max(1, int(BLANK_VIEW_UM / spec.um_per_px)))
    stats = slide_stats(slide, grid, view, downsample)
    glass = glass_view(view, downsample, stats.background_rgb)
    if max(downsample) > OVERVIEW_FACTOR:  # the glass view is too coarse for the mask's overview
        view = read_shrunk(slide, OVERVIEW_FACTOR)[0]
    levels = store.create_mask_levels(
        spec.slide_id,
        slide.shape,
        spec.um_per_px,
        {"slide_id": spec.slide_id, "uri": spec.uri, "region_px": region_px, **provenance},
        view,
    )
    del view
    t1 = time.perf_counter()

    regions: list[RegionObjects] = []
    next_id = 1
    for core in region_cores(grid.work_shape, region_px):
        tiles = region_tiles(core, grid.work_shape, geometry)
        kept = [t for t in tiles if glass.window_has_content(full_box(t.outer, grid))]
        if not kept:
            continue
        found = segment_region(slide, kept, grid, stats, models)
        if found is None:
            continue
        labels, kinds, box = found
        labels[labels > 0] += np.uint32(next_id - 1)
        paint_first_claim(levels[0], labels, box)
        regions.append(RegionObjects(next_id, kinds, box))
        next_id += len(kinds)
        del labels
    t2 = time.perf_counter()

    margin = math.ceil(geometry.halo_px / min(grid.scale_y, grid.scale_x)) + 2
    n_objects = n_rbc = 0
    with store.cells_writer(spec.cohort, spec.patient_id, spec.slide_id) as writer:
        for objects in regions:
            table = measure_region(
                slide, levels[0], objects, margin, stats, models, spec, provenance
            )
            writer.write_table(table)
            n_objects += table.num_rows
            n_rbc += table.column("kind").to_pylist().count("rbc")
    t3 = time.perf_counter()
    fill_pyramid(levels, [r.box for r in regions], block=1024)
    record = commit_record(
        spec,
        tuple(calibration),
        slide.shape,
        (n_objects, n_rbc),
        models.model_hash,
        provenance,
        {
            "read_s": t1 - t0,
            "segment_s": t2 - t1,
            "measure_s": t3 - t2,
            "write_s": time.perf_counter() - t3,
        },
    )
    store.commit(record)
    return record

"""One slide's work, shared by the whole-image and the region-by-region paths.

Resample to the segmenter's working resolution, estimate the slide's statistics once, cut the
tile grid (halo + centroid-in-core stitching), segment, stitch, then build the cells table and
the slide's commit record. `engine.regions` applies the same steps region by region; both
decide a missing pixel size with `pixel_size`.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from rbcbatch.classify.calls import CellCalls
from rbcbatch.engine.config import Models
from rbcbatch.errors import SlideError
from rbcbatch.imaging.stitch import core_object_ids, paint_tile
from rbcbatch.imaging.tiling import TileGeometry, tile_grid
from rbcbatch.io.catalog import SlideSpec
from rbcbatch.io.sources import resample, resize_labels
from rbcbatch.segment.calibrate import RBC_DIAMETER_UM
from rbcbatch.segment.classical import estimate_slide_stats
from rbcbatch.store.run_store import now_iso
from rbcbatch.store.schema import cells_schema
from rbcbatch.vocabulary import KIND_NAMES

# Slide statistics (background, thresholds) are estimated on an overview of at most this size.
OVERVIEW_PIXELS = 4_000_000
# Fewest isolated cells a pixel-size estimate may rest on: the median of 20 diameters with a
# typical 8% spread is within ~2% of the population median.
MIN_CALIBRATION_CELLS = 20


@dataclass
class SlideWork:
    """A slide ready for segmentation: its working-resolution image, statistics and tiles."""

    work: np.ndarray  # uint8 h×w×3 at the segmenter's µm/px
    stats: object
    tiles: list
    full_shape: tuple[int, int]


def prepare_slide(image: np.ndarray, um_per_px: float, geometry: TileGeometry) -> SlideWork:
    """Resample to the working resolution, estimate slide statistics once, cut the tiles."""
    work = resample(image, um_per_px / geometry.um_per_px)
    overview_scale = min(1.0, (OVERVIEW_PIXELS / (work.shape[0] * work.shape[1])) ** 0.5)
    stats = estimate_slide_stats(resample(work, overview_scale))
    tiles = tile_grid(work.shape[0], work.shape[1], geometry)
    return SlideWork(work, stats, tiles, image.shape[:2])


def segment_tiles(works: list[SlideWork], models: Models) -> list[list]:
    """Segment every tile of several slides; returns, per slide, its Segmentations in tile order.

    A segmenter with a batch method gets the tiles of all the slides at once, each with its
    slide's statistics, and batches them as its device allows; the classical one is called
    tile by tile.
    """
    crops = [np.ascontiguousarray(w.work[t.outer_slices]) for w in works for t in w.tiles]
    stats = [w.stats for w in works for _ in w.tiles]
    batch_fn = getattr(models.segmenter, "segment_batch", None)
    if batch_fn is None:
        segs = [models.segmenter(crop, s) for crop, s in zip(crops, stats, strict=True)]
    else:
        segs = batch_fn(crops, stats) if crops else []
    per_slide, start = [], 0
    for w in works:
        per_slide.append(segs[start : start + len(w.tiles)])
        start += len(w.tiles)
    return per_slide


def stitch_slide(work: SlideWork, segmentations: list) -> tuple[np.ndarray, dict[int, int]]:
    """Keep each tile's core objects, paint them with slide-wide ids, back to full resolution."""
    canvas = np.zeros(work.work.shape[:2], dtype=np.uint32)
    kinds: dict[int, int] = {}
    next_id = 1
    for tile, seg in zip(work.tiles, segmentations, strict=True):
        keep = core_object_ids(seg.labels, tile)
        for offset, local in enumerate(keep):
            kinds[next_id + offset] = int(seg.kinds[local - 1])
        next_id = paint_tile(canvas, seg.labels, tile, keep, next_id)
    return resize_labels(canvas, *work.full_shape), kinds


def segment_slide(
    image: np.ndarray, um_per_px: float, models: Models
) -> tuple[np.ndarray, dict[int, int], object]:
    """Instance labels of one slide at full resolution, each label's object kind, and stats.

    image: uint8 H×W×3 at the slide's pixel size. Returns (labels uint32 H×W, {id: kind}, stats).
    """
    work = prepare_slide(image, um_per_px, models.geometry)
    labels, kinds = stitch_slide(work, segment_tiles([work], models)[0])
    return labels, kinds, work.stats


def cells_table(
    columns: dict[str, np.ndarray],
    kinds: dict[int, int],
    calls: CellCalls,
    models: Models,
    spec: SlideSpec,
    provenance: dict,
) -> pa.Table:
    """Measurements + calls + provenance, in the cells schema's column order.

    Objects that are not red cells keep their kind as class and carry no probabilities.
    """
    n = len(columns["cell_id"])
    kind = np.array([KIND_NAMES[kinds[int(i)]] for i in columns["cell_id"]], dtype=object)
    is_rbc = kind == "rbc"
    learned = {
        "class": np.where(is_rbc, calls.classes, kind) if n else kind,
        "class_probability": _masked(calls.probability, is_rbc),
        "probabilities": _masked(calls.probabilities, is_rbc),
        "embedding": _masked(calls.embedding, is_rbc),
    }
    values = {
        "cohort": spec.cohort,
        "patient_id": spec.patient_id,
        "slide_id": spec.slide_id,
        "site": spec.site,
        "scanner": spec.scanner,
        "stain": spec.stain,
        "um_per_px": spec.um_per_px,
        "segmenter": models.config.segmenter,
        "classifier": models.config.classifier,
        "model_hash": models.model_hash,
        **provenance,
    }
    schema = cells_schema()
    arrays = []
    for f in schema:
        if f.name in columns:
            data = columns[f.name]
        elif f.name == "kind":
            data = kind
        elif f.name in learned:
            data = learned[f.name]
        else:
            data = [values[f.name]] * n
        arrays.append(pa.array(data, type=f.type) if data is not None else pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _masked(values: np.ndarray | None, keep: np.ndarray) -> list | None:
    """Per-row values where `keep`, None elsewhere; None when the classifier gives none."""
    if values is None:
        return None
    rows = list(values) if values.ndim > 1 else values.tolist()
    return [v if k else None for v, k in zip(rows, keep, strict=True)]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pixel_size(
    spec: SlideSpec, stated_um_per_px: float | None, cell_diameters_px: Callable[[], np.ndarray]
) -> tuple[SlideSpec, str, int]:
    """The spec with a pixel size, where it came from ("catalog", "file" or "estimated"), and
    the number of cells an estimate rests on. The catalog wins over the file's own statement;
    without either, the median diameter of isolated cells (`cell_diameters_px()`, called only
    then) is taken as RBC_DIAMETER_UM."""
    if spec.um_per_px is not None:  # the catalog's, or its group's estimate (engine.calibration)
        return spec, spec.um_per_px_source or "catalog", spec.calibration_cells
    if stated_um_per_px is not None:
        return replace(spec, um_per_px=round(stated_um_per_px, 6)), "file", 0
    diameters = cell_diameters_px()
    if len(diameters) < MIN_CALIBRATION_CELLS:
        raise SlideError(
            spec.slide_id,
            "calibrate",
            f"um_per_px is in neither the catalog nor the image file, and only {len(diameters)} "
            f"isolated red cells were found to estimate it (need {MIN_CALIBRATION_CELLS}); "
            "give the pixel size in the catalog",
        )
    um_per_px = RBC_DIAMETER_UM / float(np.median(diameters))
    return replace(spec, um_per_px=round(um_per_px, 4)), "estimated", len(diameters)


def commit_record(
    spec: SlideSpec,
    calibration: tuple[str, int],
    shape: tuple[int, int],
    counts: tuple[int, int],
    model_hash: str,
    provenance: dict,
    timings: dict[str, float],
) -> dict:
    """A slide's commit record, its manifest row: the catalog row with the pixel size used,
    calibration (source, cells), shape (height, width), counts (objects, red cells), provenance
    and the seconds of each step (read_s, segment_s, measure_s, write_s)."""
    return {
        **{k: v for k, v in spec.to_dict().items() if k != "row"},
        "status": "ok",
        "um_per_px_source": calibration[0],
        "calibration_cells": calibration[1],
        "width": int(shape[1]),
        "height": int(shape[0]),
        "n_objects": int(counts[0]),
        "n_rbc": int(counts[1]),
        "model_hash": model_hash,
        **provenance,
        **{name: float(timings[name]) for name in ("read_s", "segment_s", "measure_s", "write_s")},
        "peak_rss_mb": peak_rss_mb(),
        "finished_at": now_iso(),
    }

"""Training crops for the slide-relative classifier, cut exactly as the pipeline cuts them.

Every image is segmented and measured by the run's own default stages (classical segmenter,
`measure_cells`); its crops are then stain-normalised against that image's red
cells (`classify.crops.slide_crops`). Sources:

- Chula RBC-12 point labels (13 classes), split by image-MD5 group as before (`chula_split`).
- Normal controls: the red cells of healthy people from two laboratories the Chula data never
  saw, all labelled "normal" (weak labels: a healthy smear's red cells are nearly all
  discocytes): the PBC healthy donors' training split (every image not held back by
  `evaluate_real.pbc_split`) and AneRBC-I healthy 001-003 (004-006 stay held out).
- Synthetic fields (`dev.synth`), both sites and all conditions, training only.

Arrays are cached under .cache/classifier_slide (git-ignored), keyed by their settings (not
by the data folder: delete the cache after changing the data).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from rbcbatch.classify.crops import slide_crops
from rbcbatch.dev.datasets import (
    ANERBC_TRAIN_NUMBERS,
    CHULA_CLASSES,
    CHULA_UM_PER_PX,
    REPO,
    chula_records,
    chula_split,
    shared_data_dir,
)
from rbcbatch.dev.evaluate_real import pbc_split
from rbcbatch.engine.config import Models, RunConfig
from rbcbatch.engine.slide import segment_slide
from rbcbatch.io.sources import read_slide
from rbcbatch.measure.cells import measure_cells
from rbcbatch.segment.calibrate import RBC_DIAMETER_UM, cell_diameters_px
from rbcbatch.vocabulary import KIND_NAMES

CACHE_DIR = REPO / ".cache" / "classifier_slide"
NORMAL = CHULA_CLASSES.index("normal")
# Control cells: fully visible and nearly free-lying, so that a crop shows one whole cell, and
# not the object at the image centre (PBC images are centred on a white cell or platelet,
# which the classical segmenter may take for a red cell), nor one larger than
# CONTROL_MAX_AREA_RATIO x the image's median red cell (white cells, clumps).
CONTROL_MAX_CONTACT = 0.3
CONTROL_MAX_AREA_RATIO = 1.8
# At most this many control cells per source (random, seeded): keeps an epoch near the size
# of the Chula training split, whose normal class is already the largest.
CONTROL_MAX_CELLS = {"pbc": 4000, "anerbc": 2000}
# Synthetic crops: fields per (site, condition) of this size; each gives ~70-120 fully visible
# cells (visible_fraction of an unoccluded cell is 1 up to float rounding). Synthetic "other"
# objects are debris, not Chula's "uncategorised" cells, and are left out.
SYNTH_FIELD_HW = (480, 640)
SYNTH_FULLY_VISIBLE = 0.999
SYNTH_CLASSES = tuple(c for c in CHULA_CLASSES if c != "other")

Arrays = tuple[np.ndarray, np.ndarray]


def segment_and_measure(
    image: np.ndarray, um_per_px: float, models: Models
) -> tuple[np.ndarray, dict, np.ndarray]:
    """(labels, measure columns, is-red-cell bool (N,)) of one image by the run's default stages."""
    labels, kinds, stats = segment_slide(image, um_per_px, models)
    columns = measure_cells(labels, image, um_per_px, background_rgb=stats.background_rgb)
    is_rbc = np.array([KIND_NAMES[kinds[int(i)]] == "rbc" for i in columns["cell_id"]], bool)
    return labels, columns, is_rbc


def measure_image(image: np.ndarray, um_per_px: float, models: Models) -> tuple[dict, np.ndarray]:
    """(measure columns, is-red-cell bool (N,)) of one image by the run's default stages."""
    _, columns, is_rbc = segment_and_measure(image, um_per_px, models)
    return columns, is_rbc


def control_cells(columns: dict, is_rbc: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool (N,): the red cells of a healthy smear to keep as normal controls."""
    area = columns["area_um2"]
    median = np.median(area[is_rbc]) if is_rbc.any() else np.inf
    cy, cx = shape[0] / 2.0, shape[1] / 2.0
    at_centre = (
        (columns["bbox_x0"] <= cx)
        & (columns["bbox_x1"] > cx)
        & (columns["bbox_y0"] <= cy)
        & (columns["bbox_y1"] > cy)
    )
    return (
        is_rbc
        & ~columns["touches_edge"]
        & (columns["contact_fraction"] <= CONTROL_MAX_CONTACT)
        & (area <= CONTROL_MAX_AREA_RATIO * median)
        & ~at_centre
    )


def group_um_per_px(paths: list[Path]) -> float:
    """A group's pixel size as a run estimates it without a catalog value: the median
    isolated cell of all its images drawn at RBC_DIAMETER_UM (engine.calibration)."""
    diameters = np.concatenate([cell_diameters_px(read_slide(p.stem, p)) for p in paths])
    return RBC_DIAMETER_UM / float(np.median(diameters))


def _cached(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    path = CACHE_DIR / f"{name}.npz"
    if not path.is_file():
        arrays = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _empty(out_px: int) -> dict[str, np.ndarray]:
    return {"x": np.empty((0, out_px, out_px, 3), np.uint8), "y": np.empty(0, np.int64)}


def _stack(xs: list, ys: list, out_px: int, **extra) -> dict[str, np.ndarray]:
    if not xs:
        return _empty(out_px)
    return {"x": np.concatenate(xs), "y": np.concatenate(ys).astype(np.int64), **extra}


def chula_slide_arrays(
    crop_um: float,
    out_px: int,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    data: Path | None = None,
) -> dict[str, Arrays]:
    """Chula train/val/test crops at the points, stain-normalised: split -> (x, y)."""
    root = (data or shared_data_dir()) / "chula_rbc12"
    models = Models(RunConfig())

    def build(groups: list[dict]) -> dict[str, np.ndarray]:
        xs, ys, start = [], [], time.perf_counter()
        for i, g in enumerate(groups):
            image = read_slide(str(g["image_id"]), g["path"])
            columns, _ = measure_image(image, CHULA_UM_PER_PX, models)
            xs.append(slide_crops(image, g["points"], columns, CHULA_UM_PER_PX, crop_um, out_px))
            ys.append(g["points"][:, 2])
            if (i + 1) % 50 == 0:
                progress(f"chula {i + 1}/{len(groups)} images, {time.perf_counter() - start:.0f} s")
        return _stack(xs, ys, out_px)

    splits = chula_split(chula_records(root), seed=seed)
    out = {}
    for split, groups in splits.items():
        a = _cached(f"chula_{split}_seed{seed}_{crop_um:g}um_{out_px}px", lambda g=groups: build(g))
        out[split] = (a["x"], a["y"])
    return out


def control_paths(data: Path | None = None) -> dict[str, list[Path]]:
    """The training images of the normal-control sources (held-out images never appear)."""
    data = data or shared_data_dir()
    healthy = data / "anerbc_sample" / "AneRBC-I" / "Healthy_individuals" / "Original_images"
    return {
        "pbc": pbc_split(data / "pbc_subset")["train"],
        "anerbc": [healthy / f"{n:03d}_h.png" for n in sorted(ANERBC_TRAIN_NUMBERS)],
    }


def control_arrays(
    crop_um: float,
    out_px: int,
    seed: int = 0,
    progress: Callable[[str], None] = print,
    data: Path | None = None,
) -> dict[str, Arrays]:
    """Normal-control crops per source: name -> (x, y all NORMAL)."""
    models = Models(RunConfig())

    def build(name: str, paths: list[Path]) -> dict[str, np.ndarray]:
        um_per_px = group_um_per_px(paths)
        progress(f"{name}: {len(paths)} images, estimated {um_per_px:.4f} µm/px")
        xs = []
        for path in paths:
            image = read_slide(path.stem, path)
            columns, is_rbc = measure_image(image, um_per_px, models)
            keep = control_cells(columns, is_rbc, image.shape[:2])
            points = np.stack([columns["centroid_x"], columns["centroid_y"]], axis=1)[keep]
            xs.append(slide_crops(image, points, columns, um_per_px, crop_um, out_px))
        x = np.concatenate(xs) if xs else _empty(out_px)["x"]
        rng = np.random.default_rng(seed)
        if len(x) > CONTROL_MAX_CELLS[name]:
            x = x[np.sort(rng.choice(len(x), CONTROL_MAX_CELLS[name], replace=False))]
        return {"x": x, "y": np.full(len(x), NORMAL, np.int64), "um_per_px": np.float64(um_per_px)}

    out = {}
    for name, paths in control_paths(data).items():
        if not paths or not all(p.is_file() for p in paths):
            raise FileNotFoundError(f"normal-control images of {name} missing under {paths[:1]}")
        key = f"control_{name}_seed{seed}_{crop_um:g}um_{out_px}px"
        a = _cached(key, lambda n=name, p=paths: build(n, p))
        out[name] = (a["x"], a["y"])
    return out


def synthetic_slide_arrays(
    crop_um: float, out_px: int, fields_per_case: int, seed: int = 0
) -> Arrays:
    """Crops of fully visible synthetic red cells at their true centroids, slide-relative;
    half of the fields with a flat class mix so that rare classes are not swamped."""
    from rbcbatch.dev.synth import CELL_TYPES, CONDITIONS, SITES, patient_profile, render_field

    drawn = [c for c in CELL_TYPES if c in SYNTH_CLASSES]
    flat = {c: 1.0 / len(drawn) for c in drawn}
    models = Models(RunConfig())

    def build() -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        xs, ys = [], []
        for site, site_p in SITES.items():
            for condition in CONDITIONS:
                for i in range(fields_per_case):
                    profile = patient_profile(rng, condition)
                    if i % 2:
                        profile = {**profile, "mix": {**dict.fromkeys(profile["mix"], 0.0), **flat}}
                    fld = render_field(rng, condition, site, *SYNTH_FIELD_HW, profile=profile)
                    cells = [
                        c
                        for c in fld.cells
                        if c["kind"] == "rbc"
                        and c["cell_class"] in SYNTH_CLASSES
                        and c["visible_fraction"] >= SYNTH_FULLY_VISIBLE
                        and not c["touches_border"]
                    ]
                    if not cells:
                        continue
                    columns, _ = measure_image(fld.image, site_p["um_per_px"], models)
                    pts = np.asarray([[c["centroid_x"], c["centroid_y"]] for c in cells])
                    xs.append(
                        slide_crops(fld.image, pts, columns, site_p["um_per_px"], crop_um, out_px)
                    )
                    ys.append([CHULA_CLASSES.index(c["cell_class"]) for c in cells])
        return _stack(xs, ys, out_px)

    a = _cached(f"synthetic_seed{seed}_{fields_per_case}f_{crop_um:g}um_{out_px}px", build)
    return a["x"], a["y"]

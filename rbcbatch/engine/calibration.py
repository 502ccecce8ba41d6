"""Pixel size per site and scanner, from the isolated cells of all of that group's slides.

Real archives rarely state a pixel size, but the slides of one scanner at one site share it. One
slide may hold too few isolated cells for an estimate (a thick smear, a crowded field, a field of
white cells), while the group holds hundreds: so the estimate is made once per (site, scanner)
from every slide of the group whose catalog row gives no `um_per_px`, before any slide is
processed. A group whose estimate is unstable (its 95% interval wider than GROUP_MAX_REL_WIDTH,
or slides whose median cells differ as two magnifications would) fails as a whole, naming the
group, instead of measuring its cells at a guessed scale. A group that mixes magnifications is
first split by image size (a camera's images at one magnification share their size; a set
resized 2x does not), and each size is estimated on its own. Tiled whole-slide images keep their own path: their file's pixel size,
else an estimate from their own windows (thousands of cells).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from rbcbatch.engine.regions import open_if_large
from rbcbatch.engine.slide import MIN_CALIBRATION_CELLS
from rbcbatch.errors import Failure
from rbcbatch.io.catalog import SlideSpec
from rbcbatch.io.sources import read_slide
from rbcbatch.segment.calibrate import RBC_DIAMETER_UM, cell_diameters_px

# Widest 95% interval of a group's estimate, relative to it, that is still used: ±10%, the
# tolerance asked of an estimate, and well under the 2x between scanning magnifications.
GROUP_MAX_REL_WIDTH = 0.20
# Resamples of the group's cells behind the interval; seeded, so a run repeats.
BOOTSTRAP_DRAWS = 400
# Largest ratio between two slides' median cell diameters (slides with MIN_SLIDE_CELLS or more)
# of one group: disease moves a slide's median by at most ~1.5x (microcytic ~6 µm against
# macrocytic ~9 µm), two magnifications under one name by 2x (Chula's 640- and 1280-px images).
SLIDE_MEDIAN_MAX_RATIO = 1.6
MIN_SLIDE_CELLS = 10
# More cells than this from one slide are thinned (evenly) before pooling, so that one crowded
# slide does not outweigh the rest of its group.
MAX_CELLS_PER_SLIDE = 2000


@dataclass(frozen=True)
class GroupEstimate:
    """The pixel-size estimate of one (site, scanner) group."""

    site: str
    scanner: str
    n_slides: int
    n_cells: int
    um_per_px: float | None  # None when the group cannot be calibrated (`problem` says why)
    interval: tuple[float, float] | None
    problem: str = ""
    mixed_magnifications: bool = False  # the problem is slides of two magnifications
    image_size: tuple[int, int] | None = None  # (height, width) when split by image size

    @property
    def name(self) -> str:
        size = f", images {self.image_size[1]}x{self.image_size[0]} px" if self.image_size else ""
        return f"site {self.site!r}, scanner {self.scanner!r}{size}"


@dataclass(frozen=True)
class SlideCells:
    """What the pixel-size pass keeps of one slide: its isolated cells' diameters (px) and
    its image size (height, width)."""

    diameters: np.ndarray
    shape: tuple[int, int]


def group_of(spec: SlideSpec) -> tuple[str, str]:
    return spec.site, spec.scanner


def slide_diameters(
    spec: SlideSpec, storage_options: dict | None, max_pixels: int, region_min_pixels: int
) -> SlideCells | None:
    """A slide's isolated cells' diameters (px, float64 (N,)) and image size; None for a tiled
    whole-slide image (calibrated on its own) or a slide that cannot be read (its processing
    says why)."""
    try:
        large = open_if_large(spec, storage_options, region_min_pixels)
        if large is not None:
            large.close()
            return None
        image = read_slide(spec.slide_id, spec.uri, storage_options, max_pixels)
    except Exception:  # reported, with its reason, when the slide itself is processed
        return None
    diameters = cell_diameters_px(image)
    if len(diameters) > MAX_CELLS_PER_SLIDE:
        diameters = diameters[np.linspace(0, len(diameters) - 1, MAX_CELLS_PER_SLIDE).astype(int)]
    return SlideCells(diameters, (int(image.shape[0]), int(image.shape[1])))


def estimate_group(
    site: str, scanner: str, per_slide: list[np.ndarray], seed: int = 0
) -> GroupEstimate:
    """µm/px of a group from its slides' isolated-cell diameters (px), with a 95% interval from
    resampling its cells; unstable (um_per_px None, `problem` says why) when the interval is
    wide or the slides disagree as two magnifications would."""
    cells = np.concatenate(per_slide) if per_slide else np.zeros(0)
    n_slides, n_cells = len(per_slide), len(cells)
    if n_cells < MIN_CALIBRATION_CELLS:
        return GroupEstimate(
            site,
            scanner,
            n_slides,
            n_cells,
            None,
            None,
            f"only {n_cells} isolated red cells in its {n_slides} slide(s) without a pixel size "
            f"(need {MIN_CALIBRATION_CELLS})",
        )
    # The median isolated cell, as for a single slide (segment.calibrate): it reads high where
    # small cells (spherocytes, microcytes) are common. A kernel-density mode was tried and
    # read closer on a normal + IDA site, but jumped between the peaks of HS slides.
    um_per_px = RBC_DIAMETER_UM / float(np.median(cells))
    rng = np.random.default_rng(seed)
    draws = [
        RBC_DIAMETER_UM / float(np.median(cells[rng.integers(0, n_cells, n_cells)]))
        for _ in range(BOOTSTRAP_DRAWS)
    ]
    lo, hi = (float(v) for v in np.quantile(draws, [0.025, 0.975]))
    estimate = GroupEstimate(site, scanner, n_slides, n_cells, um_per_px, (lo, hi))
    medians = [float(np.median(d)) for d in per_slide if len(d) >= MIN_SLIDE_CELLS]
    if len(medians) > 1 and max(medians) / min(medians) > SLIDE_MEDIAN_MAX_RATIO:
        return replace(
            estimate,
            um_per_px=None,
            mixed_magnifications=True,
            problem=(
                f"its slides' median cell diameters differ {max(medians) / min(medians):.1f}x "
                f"({min(medians):.1f}-{max(medians):.1f} px), more than disease explains: "
                "slides of different magnifications under one site and scanner"
            ),
        )
    if (hi - lo) / um_per_px > GROUP_MAX_REL_WIDTH:
        return replace(
            estimate,
            um_per_px=None,
            problem=(
                f"its {n_slides} slide(s) give {um_per_px:.4f} µm/px from {n_cells} isolated red "
                f"cells, but with a 95% interval of {lo:.4f}-{hi:.4f}, wider than "
                f"±{GROUP_MAX_REL_WIDTH / 2:.0%}"
            ),
        )
    return estimate


def calibration_failure(spec: SlideSpec, estimate: GroupEstimate) -> Failure:
    return Failure(
        spec.slide_id,
        spec.uri,
        "calibrate",
        "PixelSizeUnknown",
        f"um_per_px is not in the catalog, and the pixel size of {estimate.name} cannot be "
        f"estimated: {estimate.problem}; give um_per_px in the catalog for this site and scanner",
    )


def estimate_sizes(
    site: str, scanner: str, slides: list[SlideCells]
) -> dict[tuple[int, int] | None, GroupEstimate]:
    """A group's estimate, keyed None; or, where its slides mix magnifications and differ in
    image size, one estimate per image size, keyed by (height, width)."""
    whole = estimate_group(site, scanner, [s.diameters for s in slides])
    sizes = {s.shape for s in slides}
    if not whole.mixed_magnifications or len(sizes) < 2:
        return {None: whole}
    return {
        size: replace(
            estimate_group(site, scanner, [s.diameters for s in slides if s.shape == size]),
            image_size=size,
        )
        for size in sorted(sizes)
    }


def calibrate_groups(
    specs: list[SlideSpec],
    found: dict[str, SlideCells | None],
    earlier: dict[tuple, tuple[float, int]] | None = None,
) -> tuple[list[SlideSpec], list[Failure], list[GroupEstimate]]:
    """Specs with their group's pixel size filled in, failures of slides whose group cannot be
    calibrated, and every group's estimate. `found`: slide_id -> slide_diameters(...);
    `earlier`: (site, scanner, (height, width)) -> (µm/px, cells) committed by an earlier run
    of this run folder, which those slides keep."""
    earlier = earlier or {}
    groups: dict[tuple[str, str], list[SlideCells]] = defaultdict(list)
    for spec in specs:
        cells = found.get(spec.slide_id)
        if spec.um_per_px is None and cells is not None:
            groups[group_of(spec)].append(cells)
    estimates = {key: estimate_sizes(*key, slides) for key, slides in sorted(groups.items())}
    ready, failed = [], []
    for spec in specs:
        cells = found.get(spec.slide_id)
        by_size = estimates.get(group_of(spec), {})
        estimate = by_size.get(None) or (by_size.get(cells.shape) if cells else None)
        if spec.um_per_px is not None or cells is None or not estimate:
            ready.append(spec)  # calibrated already, on its own path, or unreadable
            continue
        um_per_px, n_cells = earlier.get((*group_of(spec), cells.shape), (None, 0))
        if um_per_px is None and estimate.um_per_px is None:
            failed.append(calibration_failure(spec, estimate))
            continue
        if um_per_px is None:
            um_per_px, n_cells = round(estimate.um_per_px, 4), estimate.n_cells
        ready.append(
            replace(
                spec,
                um_per_px=um_per_px,
                um_per_px_source="estimated",
                calibration_cells=n_cells,
            )
        )
    return ready, failed, [e for by_size in estimates.values() for e in by_size.values()]

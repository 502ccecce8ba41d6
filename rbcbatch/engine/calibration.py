"""Pixel size per site and scanner, from the isolated cells of all of that group's slides.

Real archives rarely state a pixel size, but the slides of one scanner at one site share it. One
slide may hold too few isolated cells for an estimate (a thick smear, a crowded field, a field of
white cells), while the group holds hundreds: so the estimate is made once per (site, scanner)
from every slide of the group whose catalog row gives no `um_per_px`, before any slide is
processed. A group whose estimate is unstable (its 95% interval wider than GROUP_MAX_REL_WIDTH,
or slides whose median cells differ as two magnifications would) fails as a whole, naming the
group, instead of measuring its cells at a guessed scale. Tiled whole-slide images keep their own path: their file's pixel size,
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

    @property
    def name(self) -> str:
        return f"site {self.site!r}, scanner {self.scanner!r}"


def group_of(spec: SlideSpec) -> tuple[str, str]:
    return spec.site, spec.scanner


def slide_diameters(
    spec: SlideSpec, storage_options: dict | None, max_pixels: int, region_min_pixels: int
) -> np.ndarray | None:
    """Diameters (px) of a slide's isolated cells, float64 (N,); None for a tiled whole-slide
    image (calibrated on its own) or a slide that cannot be read (its processing says why)."""
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
    return diameters


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


def calibrate_groups(
    specs: list[SlideSpec], diameters: dict[str, np.ndarray | None]
) -> tuple[list[SlideSpec], list[Failure], list[GroupEstimate]]:
    """Specs with their group's pixel size filled in, failures of slides whose group cannot be
    calibrated, and every group's estimate. `diameters`: slide_id -> slide_diameters(...)."""
    groups: dict[tuple[str, str], list[np.ndarray]] = defaultdict(list)
    for spec in specs:
        found = diameters.get(spec.slide_id)
        if spec.um_per_px is None and found is not None:
            groups[group_of(spec)].append(found)
    estimates = {key: estimate_group(*key, slides) for key, slides in sorted(groups.items())}
    ready, failed = [], []
    for spec in specs:
        estimate = estimates.get(group_of(spec))
        if spec.um_per_px is not None or diameters.get(spec.slide_id) is None or not estimate:
            ready.append(spec)  # calibrated already, on its own path, or unreadable
        elif estimate.um_per_px is None:
            failed.append(calibration_failure(spec, estimate))
        else:
            ready.append(
                replace(
                    spec,
                    um_per_px=round(estimate.um_per_px, 4),
                    um_per_px_source="estimated",
                    calibration_cells=estimate.n_cells,
                )
            )
    return ready, failed, list(estimates.values())

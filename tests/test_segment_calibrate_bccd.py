"""Pixel size from the cells on BCCD: large (~100 px), low-contrast, crowded cells in JPEGs.

The run estimated BCCD's µm/px 4x too high (0.32 against ~0.073 from the boxes): almost no cell
there touches nothing, so platelets, white-cell nuclei and specks of pale cells outnumbered the
isolated red cells and set the median. This guards cell_diameters_px against that on the set's
own truth: the annotators' RBC boxes.
"""

from __future__ import annotations

import math

import numpy as np

from rbcbatch.dev import datasets as D
from rbcbatch.engine.calibration import estimate_group
from rbcbatch.io.sources import read_slide
from rbcbatch.segment import calibrate as C
from tests.conftest import shared_dataset

BCCD_WIDTH, BCCD_HEIGHT = 640, 480


def box_um_per_px(images: list[dict]) -> float:
    """RBC_DIAMETER_UM over the median sqrt(w * h) of the RBC boxes not cut by the image edge."""
    sides = [
        math.sqrt((x1 - x0) * (y1 - y0))
        for im in images
        for cls, x0, y0, x1, y1 in im["boxes"]
        if cls == "RBC"
        and x1 > x0
        and y1 > y0
        and x0 > 0
        and y0 > 0
        and x1 < BCCD_WIDTH - 1
        and y1 < BCCD_HEIGHT - 1
    ]
    return C.RBC_DIAMETER_UM / float(np.median(sides))


def test_bccd_pixel_size_from_its_cells_matches_its_boxes():
    # Every 4th train image (52): the train split only, which the detector was tuned on.
    images = D.bccd_boxes(shared_dataset("bccd"), "train")[::4]
    per_slide = [C.cell_diameters_px(read_slide(im["image_id"], im["path"])) for im in images]
    estimate = estimate_group("bccd", "unknown", per_slide)
    truth = box_um_per_px(images)
    # Stable (its 95% interval within ±10%) and from red cells, not platelets or nuclei.
    assert estimate.um_per_px is not None, estimate.problem
    assert estimate.n_cells >= 60
    # Within 10% of the boxes. The cells' half-maximum outlines read ~8% smaller than the boxes
    # (measured 0.0789 against 0.0732 here, +8.5% over the whole train split): the annotators'
    # boxes enclose the blurred foot of each edge, ~5 px a side beyond it.
    assert abs(estimate.um_per_px / truth - 1) < 0.10, (estimate.um_per_px, truth)

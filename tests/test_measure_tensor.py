"""The tensor measurements (measure.tensor) against the scikit-image reference (measure.cells)
on real and synthetic labels, within the tolerances stated here.

Measured on AneRBC-I 001_h segmented by the classical segmenter (1,347 objects): every column
but solidity equal to float32 rounding; solidity within 0.02 for objects of 100 px or more
(p95 0.01; up to 0.09 on specks of 8-30 px, where a pixel's share of the outline is large).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from rbcbatch.dev.synth import render_field
from rbcbatch.measure.cells import CELL_MEASURES, measure_cells
from rbcbatch.measure.tensor import level_line, masked_median, measure_cells_tensor
from rbcbatch.segment.classical import ClassicalSegmenter, estimate_slide_stats
from tests.conftest import shared_dataset

# Columns compared apart from the exact ones: absolute tolerance for objects of >= 100 px.
SOLIDITY_TOL = 0.02
SMALL_PX = 100
FLOAT_RTOL = 1e-5


def assert_agree(labels: np.ndarray, image: np.ndarray, um_per_px: float, **kw) -> int:
    """Compare every column; returns the number of objects compared."""
    ref = measure_cells(labels, image, um_per_px, **kw)
    new = measure_cells_tensor(labels, image, um_per_px, **kw)
    assert list(new) == list(CELL_MEASURES)
    big = ref["area_um2"] / um_per_px**2 >= SMALL_PX
    for name in CELL_MEASURES:
        a, b = ref[name], new[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "solidity":
            assert np.max(np.abs(a - b)[big]) <= SOLIDITY_TOL, name
            assert np.all((b > 0) & (b <= 1)), name
        elif a.dtype.kind == "f":
            np.testing.assert_allclose(
                b, a, rtol=FLOAT_RTOL, atol=1e-6, equal_nan=True, err_msg=name
            )
        else:
            np.testing.assert_array_equal(b, a, err_msg=name)
    return len(ref["cell_id"])


def test_tensor_measures_equal_the_reference_on_a_real_smear():
    root = shared_dataset("anerbc_sample") / "AneRBC-I" / "Healthy_individuals"
    image = cv2.cvtColor(cv2.imread(str(root / "Original_images" / "001_h.png")), cv2.COLOR_BGR2RGB)
    image = np.ascontiguousarray(image[:480, :640])
    labels = ClassicalSegmenter()(image, estimate_slide_stats(image)).labels
    assert assert_agree(labels, image, 0.25) > 200


@pytest.mark.parametrize("um_per_px", [0.1, 0.25])
def test_tensor_measures_equal_the_reference_on_synthetic_truth(um_per_px):
    field = render_field(np.random.default_rng(3), "hs", "site_a", 300, 400, um_per_px)
    labels = field.labels.copy()
    labels[labels > 0] += 1000  # sparse ids, not 1..n
    n = assert_agree(labels, field.image, um_per_px, origin_yx=(50, 70))
    assert n == len(np.unique(field.labels)) - 1


def test_tensor_measures_of_awkward_labels():
    labels = np.zeros((40, 50), np.uint32)
    labels[0:12, 0:15] = 7  # cut by the corner
    labels[20:32, 20:34] = 3
    labels[24:28, 24:28] = 0  # a hole
    labels[20:32, 34:40] = 9  # touching 3
    labels[5, 30:45] = 2  # a line, one pixel thick
    labels[38, 48] = 5  # a single pixel
    image = np.full((40, 50, 3), 230, np.uint8)
    image[labels > 0] = (180, 90, 120)
    image[22:30, 22:32] = (150, 60, 90)
    assert_agree(labels, image, 0.2, background_rgb=(230.0, 230.0, 230.0))
    empty = measure_cells_tensor(np.zeros((5, 5), np.uint32), np.zeros((5, 5, 3), np.uint8), 0.2)
    assert all(len(v) == 0 for v in empty.values())
    with pytest.raises(ValueError):
        measure_cells_tensor(labels, image[:, :10], 0.2)


def test_masked_median_is_numpys():
    values = torch.tensor([[3.0, 1.0, 2.0, 9.0], [4.0, 1.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    where = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    med = masked_median(values, where).numpy()
    assert med[0] == 2.0 and med[1] == 2.5 and np.isnan(med[2])


def test_level_line_of_a_square_and_a_ring():
    u = torch.zeros(2, 12, 12)
    u[0, 3:9, 3:9] = 1.0  # 6 x 6 pixels
    u[1, 2:10, 2:10] = 1.0
    u[1, 4:8, 4:8] = 0.0  # a 4 x 4 hole: its area subtracts
    length, area = level_line(u)
    # The 0.5 line runs through the edge midpoints and cuts each corner by a triangle of legs
    # 0.5 (area 0.125): around 6 x 6 pixels it encloses 36 - 4 x 0.125; around the hole, the
    # low corner pixels keep only their triangles: 16 - 4 x (0.25 - 0.125) = 15.5.
    assert area[0].item() == pytest.approx(35.5)
    assert length[0].item() == pytest.approx(4 * 5 + 4 * np.sqrt(0.5))
    assert area[1].item() == pytest.approx(63.5 - 15.5)
    assert length[1].item() == pytest.approx(4 * 7 + 4 * 3 + 8 * np.sqrt(0.5))

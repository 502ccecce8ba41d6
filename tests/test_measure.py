"""Per-cell measures on shapes whose answers are known by hand."""

from __future__ import annotations

import math
import time

import numpy as np
import pyarrow as pa
import pytest
from skimage.draw import disk, ellipse

from rbcbatch.measure import CELL_MEASURES, measure_cells

BACKGROUND = (235, 225, 230)
CELL_RGB = (190, 90, 110)
PALE_RGB = (228, 210, 218)


def blank(height: int = 64, width: int = 64) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((height, width), dtype=np.uint32)
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    return labels, image


def draw_disk(labels, image, centre, radius, cell_id, rgb=CELL_RGB):
    rr, cc = disk(centre, radius, shape=labels.shape)
    labels[rr, cc] = cell_id
    image[rr, cc] = rgb
    return rr.size


def test_columns_follow_cell_measures():
    labels, image = blank()
    draw_disk(labels, image, (32, 32), 10, 1)
    cols = measure_cells(labels, image, 0.5)
    assert list(cols) == list(CELL_MEASURES)
    for name, arrow_type in CELL_MEASURES.items():
        assert cols[name].dtype == np.dtype(arrow_type.to_pandas_dtype()), name
    # The columns build an Arrow table with exactly the declared schema.
    table = pa.table(cols, schema=pa.schema(list(CELL_MEASURES.items())))
    assert table.num_rows == 1


def test_disk_radius_20_at_half_micron():
    labels, image = blank(60, 60)
    draw_disk(labels, image, (30, 30), 20, 1)
    c = measure_cells(labels, image, 0.5)
    # Radius 20 px = 10 µm.
    assert c["area_um2"][0] == pytest.approx(math.pi * 10**2, rel=0.02)
    assert c["diameter_um"][0] == pytest.approx(20.0, rel=0.01)
    assert c["perimeter_um"][0] == pytest.approx(2 * math.pi * 10, rel=0.03)
    assert c["circularity"][0] == pytest.approx(1.0, abs=0.04)
    assert c["eccentricity"][0] == pytest.approx(0.0, abs=0.05)
    assert c["solidity"][0] == pytest.approx(1.0, abs=0.03)
    assert c["major_axis_um"][0] == pytest.approx(20.0, rel=0.02)
    assert c["aspect_ratio"][0] == pytest.approx(1.0, abs=0.02)
    assert c["centroid_x"][0] == pytest.approx(30.0)
    assert c["centroid_y"][0] == pytest.approx(30.0)
    assert not c["touches_edge"][0]


@pytest.mark.parametrize("radius", [10, 12, 14, 17, 25, 40])
@pytest.mark.parametrize("offset", [0.0, 0.3, 0.5])
def test_circularity_of_digitised_disks(radius, offset):
    # Smoothed outline, measured over radii 10-40 and sub-pixel centres: 0.998-1.0 at 0.1 µm/px
    # (0.98-1.0 from 0.1 to 0.5 µm/px; the Crofton perimeter gives 0.99-1.04, the boundary-chain
    # perimeter 0.91-1.00).
    size = 2 * radius + 6
    labels, image = blank(size, size)
    draw_disk(labels, image, (size // 2 + offset, size // 2 + 0.7 * offset), radius, 1)
    c = measure_cells(labels, image, 0.1)
    assert c["circularity"][0] == pytest.approx(1.0, abs=0.045)


def test_two_to_one_ellipse():
    labels, image = blank(80, 80)
    rr, cc = ellipse(40, 40, 15, 30, shape=labels.shape, rotation=0.3)
    labels[rr, cc] = 7
    image[rr, cc] = CELL_RGB
    c = measure_cells(labels, image, 0.25)
    assert c["aspect_ratio"][0] == pytest.approx(2.0, rel=0.03)
    assert c["eccentricity"][0] == pytest.approx(math.sqrt(3) / 2, abs=0.01)
    assert c["major_axis_um"][0] == pytest.approx(60 * 0.25, rel=0.03)
    assert c["minor_axis_um"][0] == pytest.approx(30 * 0.25, rel=0.03)
    # Perimeter of a 30 x 15 px ellipse (Ramanujan): 145.3 px.
    assert c["perimeter_um"][0] == pytest.approx(145.3 * 0.25, rel=0.03)
    # Circularity of an exact 2:1 ellipse is 0.841; ellipse_fit divides it out.
    assert c["circularity"][0] == pytest.approx(0.841, abs=0.03)
    assert c["ellipse_fit"][0] == pytest.approx(1.0, abs=0.03)


def test_ellipse_fit_flags_fragments():
    labels, image = blank(60, 120)
    rr, cc = disk((30, 30), 20)
    labels[rr, cc] = 1
    labels[:30, :60] = 0  # a half disk: a straight cut
    rr, cc = disk((30, 85), 20)
    labels[rr, cc] = 2
    rr, cc = disk((30, 103), 10)
    labels[rr, cc] = 0  # a bite
    c = measure_cells(labels, image, 0.25)
    # Half disk: circularity 0.75 in the continuum (the smoothed outline, whose corners are
    # rounded over 0.3 µm, reads 0.79), against 0.87 for an ellipse of its 1.86 aspect ratio.
    # Bitten disk: 0.75 in the continuum, 0.78 read, against 0.98 for its 1.22 aspect ratio.
    assert 0.90 < c["ellipse_fit"][0] < 0.95
    assert c["solidity"][0] > 0.97  # still convex
    assert c["ellipse_fit"][1] < 0.8
    assert 0.8 < c["solidity"][1] < 0.9


def test_origin_offsets_centroid_and_half_open_bbox():
    labels, image = blank(10, 12)
    labels[2:5, 3:7] = 1  # rows 2-4, columns 3-6: 12 px
    image[2:5, 3:7] = CELL_RGB
    c = measure_cells(labels, image, 0.5, origin_yx=(1000, 2000))
    assert c["centroid_x"][0] == pytest.approx(2000 + 4.5)
    assert c["centroid_y"][0] == pytest.approx(1000 + 3.0)
    assert (c["bbox_x0"][0], c["bbox_y0"][0]) == (2003, 1002)
    assert (c["bbox_x1"][0], c["bbox_y1"][0]) == (2007, 1005)
    assert c["area_um2"][0] == pytest.approx(12 * 0.25)
    assert (c["mean_r"][0], c["mean_g"][0], c["mean_b"][0]) == CELL_RGB


def upsample_nearest(labels: np.ndarray, factor: float) -> np.ndarray:
    """Nearest-neighbour upsampling, as labels from a coarser segmenter come back to a slide."""
    h, w = labels.shape
    ys = ((np.arange(round(h * factor)) + 0.5) / factor).astype(int)
    xs = ((np.arange(round(w * factor)) + 0.5) / factor).astype(int)
    return labels[ys[:, None], xs[None, :]]


@pytest.mark.parametrize("factor", [1.25, 2.5])
def test_upsampled_labels_keep_round_cells_round(factor):
    # Red cells segmented at 0.25 µm/px and handed back at 0.2 or 0.1 µm/px: the label staircase
    # is coarser than the slide's pixels. The Crofton perimeter reads a 1.25x upsampled disk ~4%
    # too long (ellipse_fit ~0.92, like a fragment's); the smoothed outline does not.
    labels, _ = blank(90, 90)
    for cell_id, (centre, radii, angle) in enumerate(
        [
            ((22.3, 22.6), (14, 14), 0.0),
            ((22.0, 62.4), (16, 12), 0.4),
            ((64.5, 40.2), (15, 13), 1.1),
        ],
        start=1,
    ):
        rr, cc = ellipse(*centre, *radii, shape=labels.shape, rotation=angle)
        labels[rr, cc] = cell_id
    big = upsample_nearest(labels, factor)
    image = np.empty((*big.shape, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    c = measure_cells(big, image, 0.25 / factor)
    assert c["ellipse_fit"] == pytest.approx(np.ones(3), abs=0.025)
    # The same shapes at their own resolution read the same.
    assert c["ellipse_fit"] == pytest.approx(
        measure_cells(labels, blank(90, 90)[1], 0.25)["ellipse_fit"], abs=0.02
    )


def test_mean_od_uses_given_or_estimated_background():
    labels, image = blank()
    draw_disk(labels, image, (32, 32), 10, 1, rgb=(100, 100, 100))
    image[labels == 0] = (200, 200, 200)
    estimated = measure_cells(labels, image, 0.5)
    given = measure_cells(labels, image, 0.5, background_rgb=(200.0, 200.0, 200.0))
    # The one optical density (rbcbatch.imaging.density): ln((200 + 1) / (100 + 1)).
    assert estimated["mean_od"][0] == pytest.approx(math.log(201 / 101), rel=1e-5)
    assert given["mean_od"][0] == pytest.approx(math.log(201 / 101), rel=1e-5)
    # No background at all: 255 is assumed.
    labels[:] = 1
    full = measure_cells(labels, np.full_like(image, 51), 0.5)
    assert full["mean_od"][0] == pytest.approx(math.log(256 / 52), rel=1e-5)


def test_central_pallor():
    labels, image = blank(60, 120)
    draw_disk(labels, image, (30, 30), 20, 1)  # uniform
    draw_disk(labels, image, (30, 85), 20, 2)
    # Pale centre of radius 7 px (the innermost 35% of the 20 px radius).
    rr, cc = disk((30, 85), 7)
    image[rr, cc] = PALE_RGB
    c = measure_cells(labels, image, 0.25)
    uniform, pale = 0, 1
    assert c["pallor_ratio"][uniform] == pytest.approx(1.0, abs=1e-5)
    assert c["pallor_area_fraction"][uniform] == 0
    # Pale OD / rim OD = 0.082; the centre zone (distance >= 0.65 x the largest, ~13.7 px) also
    # takes a thin ring of dense pixels outside the radius-7 pale disk.
    assert 0.08 < c["pallor_ratio"][pale] < 0.3
    # Pale area: a radius-7 disk (149 px) of a radius-20 disk (1257 px) = 0.119.
    assert 0.10 < c["pallor_area_fraction"][pale] < 0.14
    # The annulus (50-80% inwards: radius ~4-10.5 px) is a third pale: 2/3 + 1/3 x 0.082 = 0.69.
    assert c["ring_ratio"][pale] == pytest.approx(0.69, abs=0.05)


def test_rim_od_ignores_an_overlapping_neighbour():
    # Two uniform cells overlapping by 7 px (18% of the summed radii); cell 1 lies on top and
    # owns the lens, which holds both cells' haemoglobin (twice the OD), inside its rim zone. A
    # mean rim OD would rise there (pallor_ratio 0.92, a pallor that is not there); the median
    # rim OD keeps the uniform cell at 1.
    labels, image = blank(60, 100)
    top, under = np.zeros((60, 100), dtype=bool), np.zeros((60, 100), dtype=bool)
    top[disk((30, 32), 20, shape=top.shape)] = True
    under[disk((30, 65), 20, shape=top.shape)] = True
    labels[under] = 2
    labels[top] = 1
    image[top | under] = CELL_RGB
    image[top & under] = (154, 36, 52)  # OD of CELL_RGB twice over
    c = measure_cells(labels, image, 0.25, background_rgb=BACKGROUND)
    assert c["contact_fraction"][0] > 0.15
    assert c["pallor_ratio"].tolist() == pytest.approx([1.0, 1.0], abs=0.01)
    assert c["ring_ratio"].tolist() == pytest.approx([1.0, 1.0], abs=0.01)
    assert c["pallor_area_fraction"].tolist() == [0, 0]


def test_target_cell_has_dense_core_in_pale_ring():
    labels, image = blank(60, 60)
    draw_disk(labels, image, (30, 30), 20, 1)
    rr, cc = disk((30, 30), 11)
    image[rr, cc] = PALE_RGB
    rr, cc = disk((30, 30), 4)
    image[rr, cc] = CELL_RGB
    c = measure_cells(labels, image, 0.25)
    assert c["core_ratio"][0] > 1.5
    assert c["ring_ratio"][0] < 0.8


def test_contact_fraction():
    labels, image = blank(8, 10)
    labels[1:4, 1:4] = 1  # 3 x 3: 12 pixels around it (4-connected), 3 of them cell 2's
    labels[1:4, 4:7] = 2
    labels[6:8, 8:10] = 3  # in the corner: only 4 of its neighbours lie in the region, all empty
    c = measure_cells(labels, image, 0.5)
    assert c["contact_fraction"].tolist() == pytest.approx([0.25, 0.25, 0.0])


def test_cell_as_bright_as_background_has_no_pallor_measures():
    labels, image = blank()
    draw_disk(labels, image, (32, 32), 10, 1, rgb=BACKGROUND)
    c = measure_cells(labels, image, 0.5)
    assert c["mean_od"][0] == 0
    assert np.isnan(c["pallor_ratio"][0]) and np.isnan(c["pallor_area_fraction"][0])


def test_empty_labels():
    labels, image = blank()
    c = measure_cells(labels, image, 0.5)
    assert list(c) == list(CELL_MEASURES)
    for name, arrow_type in CELL_MEASURES.items():
        assert c[name].shape == (0,)
        assert c[name].dtype == np.dtype(arrow_type.to_pandas_dtype())


def test_single_pixel_cell_and_non_consecutive_ids():
    labels, image = blank(40, 40)
    labels[5, 5] = 9
    draw_disk(labels, image, (25, 25), 8, 4)
    c = measure_cells(labels, image, 0.5)
    assert c["cell_id"].tolist() == [4, 9]
    assert c["area_um2"][1] == pytest.approx(0.25)
    assert c["bbox_x1"][1] - c["bbox_x0"][1] == 1
    # Undefined shape and pallor measures are NaN, not errors.
    assert np.isnan(c["aspect_ratio"][1])
    assert np.isnan(c["pallor_ratio"][1])
    assert np.isfinite(c["diameter_um"][1])


def test_huge_label_ids_are_kept():
    labels, image = blank(30, 30)
    draw_disk(labels, image, (8, 8), 5, 4_000_000_000)
    draw_disk(labels, image, (20, 20), 6, 3)
    c = measure_cells(labels, image, 0.5)
    assert c["cell_id"].tolist() == [3, 4_000_000_000]
    assert c["centroid_x"].tolist() == pytest.approx([20.0, 8.0])


def test_touches_edge():
    labels, image = blank(30, 40)
    draw_disk(labels, image, (15, 20), 5, 1)
    draw_disk(labels, image, (3, 20), 6, 2)  # clipped at the top
    draw_disk(labels, image, (15, 37), 5, 3)  # clipped at the right
    c = measure_cells(labels, image, 0.5)
    assert c["touches_edge"].tolist() == [False, True, True]


def test_rejects_bad_input():
    labels, image = blank()
    with pytest.raises(ValueError):
        measure_cells(labels, image[..., 0], 0.5)
    with pytest.raises(ValueError):
        measure_cells(labels, image, 0.0)


def test_150_cells_quickly():
    rng = np.random.default_rng(1)
    labels, image = blank(600, 800)
    n = 0
    for y in range(30, 580, 50):
        for x in range(30, 780, 50):
            if n == 150:
                break
            n += 1
            draw_disk(labels, image, (y, x), int(rng.integers(14, 22)), n)
    measure_cells(labels, image, 0.25)  # warm-up
    start = time.perf_counter()
    c = measure_cells(labels, image, 0.25)
    elapsed = time.perf_counter() - start
    assert c["cell_id"].size == 150
    # Budget 0.2 s; measured ~0.11 s on a 2-core machine. Generous for loaded CI runners.
    assert elapsed < 0.4

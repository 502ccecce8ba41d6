"""The one optical density: hand-computed values, its inverse, and every stage reading it alike."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rbcbatch.imaging.density import (
    intensity_at,
    mean_optical_density,
    optical_density,
)
from rbcbatch.measure import measure_cells
from rbcbatch.segment.classical import OD_MAX, _optical_density


def test_optical_density_by_hand():
    image = np.array([[[200, 100, 20], [250, 250, 250]]], dtype=np.uint8)
    od = optical_density(image, np.array([200.0, 200.0, 200.0]))
    assert od.dtype == np.float32 and od.shape == (1, 2, 3)
    assert od[0, 0].tolist() == pytest.approx([0.0, math.log(201 / 101), math.log(201 / 21)])
    # Brighter than the background reads negative: ln(201 / 251).
    assert od[0, 1, 0] == pytest.approx(math.log(201 / 251))


def test_mean_optical_density_floors_each_channel_at_zero():
    image = np.array([[[200, 100, 20], [250, 250, 250]]], dtype=np.uint8)
    mean = mean_optical_density(image, np.array([200.0, 200.0, 200.0]))
    assert mean[0, 0] == pytest.approx((math.log(201 / 101) + math.log(201 / 21)) / 3, rel=1e-6)
    assert mean[0, 1] == 0


def test_intensity_at_inverts_optical_density():
    levels = np.arange(256, dtype=np.float32)
    bg = np.float32(231.0)
    assert intensity_at(optical_density(levels, bg), bg) == pytest.approx(levels, abs=1e-3)


def test_segmenter_and_measurements_read_the_same_density():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    background = np.array([230.0, 220.0, 240.0])
    reference = optical_density(image, background)
    # The segmenter clips it to [0, OD_MAX] ...
    assert _optical_density(image, background) == pytest.approx(np.clip(reference, 0, OD_MAX))
    # ... the cells table's mean_od is its per-channel floor at 0, averaged over the channels.
    labels = np.ones((8, 8), np.int32)
    mean_od = measure_cells(labels, image, 0.5, background_rgb=background)["mean_od"][0]
    assert mean_od == pytest.approx(np.maximum(reference, 0).mean(axis=2).mean(), rel=1e-5)


def test_unet_input_is_the_same_density():
    pytest.importorskip("torch")
    from rbcbatch.segment.unet import OD_INPUT_SCALE, OD_RANGE, image_to_input

    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    background = (228.0, 219.0, 236.0)
    expected = np.clip(optical_density(image, background), *OD_RANGE) * OD_INPUT_SCALE
    assert image_to_input(image, background) == pytest.approx(expected.transpose(2, 0, 1))

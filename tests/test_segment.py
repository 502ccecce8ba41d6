"""Classical segmenter against synthetic ground truth and hand-made scenes."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from rbcbatch.dev import synth
from rbcbatch.dev.datasets import anerbc_pairs, anerbc_split, load_anerbc
from rbcbatch.evaluation.metrics import foreground_scores, match_instances
from rbcbatch.segment.classical import (
    ClassicalParams,
    ClassicalSegmenter,
    Segmentation,
    SlideStats,
    estimate_slide_stats,
)
from rbcbatch.vocabulary import OBJECT_KINDS
from tests.conftest import shared_dataset

RBC, WBC = OBJECT_KINDS["rbc"], OBJECT_KINDS["wbc"]
FIELDS = [("normal", "site_a"), ("hs", "site_b"), ("ida", "site_a"), ("hs", "site_a")]


def _at_working_resolution(field: synth.Field, site: str) -> tuple[np.ndarray, np.ndarray]:
    """Resample a field (image, labels) to the segmenter's 0.25 um/px, as the pipeline does."""
    scale = synth.SITES[site]["um_per_px"] / ClassicalSegmenter.um_per_px
    if scale == 1.0:
        return field.image, field.labels
    h, w = field.labels.shape
    size = (round(w * scale), round(h * scale))
    image = cv2.resize(field.image, size, interpolation=cv2.INTER_AREA)
    labels = cv2.resize(field.labels.astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
    return image, labels.astype(np.uint32)


@pytest.fixture(scope="module")
def segmented() -> list[tuple[synth.Field, np.ndarray, Segmentation]]:
    seg = ClassicalSegmenter()
    out = []
    for i, (condition, site) in enumerate(FIELDS):
        field = synth.render_field(np.random.default_rng([7, i]), condition, site, 300, 400)
        image, labels = _at_working_resolution(field, site)
        out.append((field, labels, seg(image, estimate_slide_stats(image))))
    return out


def _rbc_ids(field: synth.Field, labels: np.ndarray) -> list[int]:
    present = set(np.unique(labels).tolist())
    return [c["cell_id"] for c in field.cells if c["kind"] == "rbc" and c["cell_id"] in present]


def _scene(centres: list[tuple[float, float]], radius: float = 15.0) -> np.ndarray:
    """RGB uint8 image of discocytes (OD rim with central pallor) at the given (x, y) centres."""
    h, w = 90, 160
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    od = np.zeros((h, w), np.float32)
    for cx, cy in centres:
        r = np.hypot(xx - cx, yy - cy) / radius
        od += np.clip((1.0 - r) * radius, 0.0, 1.0) * (1.0 - 0.5 * np.exp(-((r / 0.35) ** 4)))
    rgb = np.array([235.0, 228.0, 222.0]) * np.exp(-od[..., None] * np.array([0.16, 0.40, 0.27]))
    rgb = cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), 0.8)
    rgb += np.random.default_rng(0).normal(0.0, 1.5, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def test_counts_and_f1_against_truth(segmented) -> None:
    rel_errors = []
    n_true_all = n_pred_all = 0
    for field, labels, seg in segmented:
        pred_rbc = np.flatnonzero(seg.kinds == RBC) + 1
        res = match_instances(
            seg.labels, labels, 0.5, true_ids=_rbc_ids(field, labels), pred_ids=pred_rbc
        )
        assert res["f1"] >= 0.9, res
        assert res["mean_iou"] >= 0.8, res
        rel_errors.append(abs(res["n_pred"] - res["n_true"]) / res["n_true"])
        n_true_all += res["n_true"]
        n_pred_all += res["n_pred"]
    assert np.mean(rel_errors) <= 0.05, rel_errors
    assert abs(n_pred_all - n_true_all) / n_true_all <= 0.05


def test_output_invariants(segmented) -> None:
    for _, labels, seg in segmented:
        assert seg.labels.dtype == np.uint32 and seg.labels.shape == labels.shape
        assert seg.kinds.dtype == np.uint8 and seg.kinds.shape == (seg.n,)
        assert np.array_equal(np.unique(seg.labels), np.arange(seg.n + 1))
        assert set(seg.kinds.tolist()) <= set(OBJECT_KINDS.values())


def test_cells_are_not_hollow(segmented) -> None:
    for _, _, seg in segmented:
        for i, sl in enumerate(ndi.find_objects(seg.labels.astype(np.int64)), start=1):
            obj = seg.labels[sl] == i
            assert ndi.binary_fill_holes(obj).sum() == obj.sum(), f"object {i} has a hole"


def test_touching_disks_are_split() -> None:
    seg = ClassicalSegmenter()
    for gap in (30.0, 27.0):  # just touching, and overlapping by 3 px
        image = _scene([(60.0, 45.0), (60.0 + gap, 45.0)])
        out = seg(image, estimate_slide_stats(image))
        assert out.n == 2 and (out.kinds == RBC).all(), gap
        xs = [np.nonzero(out.labels == i)[1].mean() for i in (1, 2)]
        assert sorted(xs) == pytest.approx([60.0, 60.0 + gap], abs=3.0)


def test_single_disk_with_pallor_is_one_solid_cell() -> None:
    image = _scene([(80.0, 45.0)], radius=16.0)
    out = ClassicalSegmenter()(image, estimate_slide_stats(image))
    assert out.n == 1
    area = (out.labels == 1).sum()
    assert area == pytest.approx(np.pi * 16.0**2, rel=0.1)


def test_blank_tile_gives_no_objects() -> None:
    field = synth.render_field(np.random.default_rng(3), "normal", "site_a", 300, 400)
    stats = estimate_slide_stats(field.image)
    bg = np.asarray(stats.background_rgb, dtype=np.float32)
    ramp = np.linspace(0.95, 1.02, 256, dtype=np.float32)[None, :, None]  # vignetting
    noise = np.random.default_rng(1).normal(0.0, 2.5, (256, 256, 3)).astype(np.float32)
    tile = np.clip(np.rint(bg * ramp + noise), 0, 255).astype(np.uint8)
    seg = ClassicalSegmenter()
    assert seg(tile, stats).n == 0
    flat = np.broadcast_to(bg.astype(np.uint8), (64, 64, 3)).copy()
    assert seg(flat, stats).n == 0


def test_wbc_is_labelled_wbc() -> None:
    seg = ClassicalSegmenter()
    for seed in range(20):
        field = synth.render_field(np.random.default_rng(seed), "normal", "site_a", 300, 400)
        wbcs = [c for c in field.cells if c["kind"] == "wbc" and not c["touches_border"]]
        if wbcs:
            break
    else:
        pytest.fail("no field with an inner WBC")
    out = seg(field.image, estimate_slide_stats(field.image))
    for cell in wbcs:
        pred = out.labels[int(round(cell["centroid_y"])), int(round(cell["centroid_x"]))]
        assert pred > 0 and out.kinds[pred - 1] == WBC
        true = field.labels == cell["cell_id"]
        mask = out.labels == pred
        assert (true & mask).sum() / (true | mask).sum() >= 0.5
    assert (out.kinds == WBC).sum() == len([c for c in field.cells if c["kind"] == "wbc"])


def test_tiles_agree_with_whole_field() -> None:
    field = synth.render_field(np.random.default_rng(5), "hs", "site_a", 300, 400)
    overview = cv2.resize(field.image, (200, 150), interpolation=cv2.INTER_AREA)
    stats = estimate_slide_stats(overview)
    seg = ClassicalSegmenter()
    whole = seg(field.image, stats)
    tile = seg(field.image[50:250, 100:300], stats)
    ref = whole.labels[50:250, 100:300]
    edge = np.unique(np.concatenate([ref[0], ref[-1], ref[:, 0], ref[:, -1]]))
    inner = np.setdiff1d(np.unique(ref), np.concatenate([[0], edge]))
    res = match_instances(tile.labels, ref, 0.5, true_ids=inner)
    assert res["recall"] >= 0.95


def test_stats_from_overview_match_full_resolution() -> None:
    field = synth.render_field(np.random.default_rng(8), "normal", "site_b", 300, 400)
    full = estimate_slide_stats(field.image)
    small = estimate_slide_stats(cv2.resize(field.image, (100, 75), interpolation=cv2.INTER_AREA))
    assert small.od_threshold == pytest.approx(full.od_threshold, rel=0.2)
    assert np.allclose(small.background_rgb, full.background_rgb, atol=6.0)


def test_params_validation_and_config() -> None:
    with pytest.raises(ValueError):
        ClassicalParams(min_rbc_area_um2=-1.0)
    with pytest.raises(ValueError):
        ClassicalParams(min_rbc_area_um2=50.0, max_rbc_area_um2=40.0)
    with pytest.raises(ValueError):
        SlideStats(background_rgb=(200.0, 200.0, 200.0), od_threshold=0.0)
    seg = ClassicalSegmenter(ClassicalParams(marker_h_um=0.4))
    cfg = json.loads(json.dumps(seg.config()))
    assert cfg["name"] == "classical" and cfg["um_per_px"] == 0.25 and cfg["marker_h_um"] == 0.4
    with pytest.raises(ValueError):
        seg(np.zeros((10, 10), np.uint8), SlideStats((200.0, 200.0, 200.0), 0.1))


def test_foreground_dice_on_anerbc_tuning_images() -> None:
    """Whole AneRBC-I images 001-003 (the ones the outline was tuned on) against their masks.

    Measured: mean Dice 0.943, lowest 0.903 (002_a, whose mask sits ~1 px further out than the
    others'); before the outline peel the mean was 0.937.
    """
    pairs = anerbc_split(anerbc_pairs(shared_dataset("anerbc_sample")))["train"]
    assert len(pairs) == 6
    seg = ClassicalSegmenter()
    dice = []
    for pair in pairs:
        image, mask = load_anerbc(pair)
        out = seg(image, estimate_slide_stats(image))
        dice.append(foreground_scores(out.labels > 0, mask)["dice"])
    assert np.mean(dice) >= 0.94 and min(dice) >= 0.89, dice

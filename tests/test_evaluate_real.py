"""The real held-out sets of `rbcbatch evaluate --real`: fixed, disjoint, and what they say;
and the scores against their own truth (points in masks, boxes at IoU 0.5) on hand-made data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rbcbatch.dev import real_scoring as rs
from rbcbatch.dev.datasets import bccd_boxes
from rbcbatch.dev.evaluate_real import (
    CHULA_VOCABULARY,
    PBC_CLASSES,
    anerbc_rows,
    bccd_counts,
    bccd_rows,
    bccd_test_images,
    bccd_um_per_px,
    boxes_by_class,
    chula_rows,
    chula_rows_scored,
    chula_test_groups,
    dice_rows,
    flag_rows,
    pbc_rows,
    pbc_split,
    pixel_size_rows,
)
from rbcbatch.vocabulary import MORPHOLOGY_CLASSES
from tests.conftest import shared_dataset


def test_the_pbc_split_is_fixed_disjoint_and_a_fifth_of_every_class():
    root = shared_dataset("pbc_subset")
    split = pbc_split(root)
    held, train = split["held_back"], split["train"]
    assert len(held) == 240 and len(train) == 960 and not set(held) & set(train)
    assert {p.parent.name for p in held} == set(PBC_CLASSES)
    assert all(sum(p.parent.name == c for p in held) == 30 for c in PBC_CLASSES)
    assert pbc_split(root) == split  # the same files every time
    first = sorted((root / "neutrophil").glob("*.jpg"))[0]
    assert first in held
    rows = pbc_rows(root)
    assert {r["um_per_px"] for r in rows} == {""}  # left to the site/scanner estimate
    assert len({r["slide_id"] for r in rows}) == 240


def test_anerbc_rows_are_the_held_out_individuals_only():
    root = shared_dataset("anerbc_sample")
    rows = anerbc_rows(root)
    assert sorted(r["slide_id"] for r in rows) == sorted(
        f"anerbc_{n}_{s}" for n in ("004", "005", "006") for s in ("a", "h")
    )
    assert all(Path(r["uri"]).is_file() for r in rows)
    assert {r["label"] for r in rows if r["slide_id"].endswith("_h")} == {"normal"}


# ---------------------------------------------------------------------------------------------
# Scoring against the real sets' own truth: points in masks (Chula), boxes (BCCD), hand-made
# ---------------------------------------------------------------------------------------------


def _two_cells() -> np.ndarray:
    labels = np.zeros((6, 8), np.uint32)
    labels[1:3, 1:3] = 1  # cell 1: x 1-2, y 1-2
    labels[3:5, 5:7] = 2  # cell 2: x 5-6, y 3-4
    return labels


def test_points_are_found_in_masks_and_score_the_calls_of_their_cells():
    labels = _two_cells()
    points = np.array([[1, 1, 3], [5, 4, 3], [7, 0, 0]])  # x, y, class id; the third on glass
    ids = rs.cells_at_points(labels, points)
    assert ids.tolist() == [1, 2, 0]
    # x before y: (x=2, y=1) is in cell 1, (x=1, y=2) too, (x=6, y=1) in none.
    assert rs.cells_at_points(labels, np.array([[2, 1], [1, 2], [6, 1]])).tolist() == [1, 1, 0]
    # Off the image is "no cell", not an index error.
    assert rs.cells_at_points(labels, np.array([[-1, 2], [8, 2], [2, 6]])).tolist() == [0, 0, 0]
    assert rs.cells_at_points(labels, np.zeros((0, 3), int)).tolist() == []

    calls = rs.calls_at_points(ids, {1: "spherocyte", 2: "normal"})
    assert calls == ["spherocyte", "normal", None]
    true = [CHULA_VOCABULARY[int(c)] for c in points[:, 2]]
    assert true == ["spherocyte", "spherocyte", "normal"]
    s = rs.point_scores(true, calls, ("normal", "spherocyte"))
    assert (s["points"], s["found"]) == (3, 2)
    assert s["cell_recall"] == pytest.approx(2 / 3)
    sph, norm = s["classes"]["spherocyte"], s["classes"]["normal"]
    # The found points are two spherocytes, called spherocyte and normal.
    assert (sph["n"], sph["called"], sph["tp"]) == (2, 1, 1)
    assert sph["recall"] == 0.5 and sph["precision"] == 1.0 and sph["f1"] == pytest.approx(2 / 3)
    # The unfound normal point is in no class score; normal was called once, wrongly.
    assert (norm["n"], norm["called"], norm["recall"], norm["precision"]) == (0, 1, None, 0.0)
    # Macro-F1 over the classes present among the found points: spherocyte alone.
    assert s["classes"]["macro"] == {"macro_f1": pytest.approx(2 / 3), "n": 2}


def test_a_point_in_a_label_the_cells_table_lacks_is_not_found():
    ids = rs.cells_at_points(_two_cells(), np.array([[1, 1], [5, 4]]))
    assert rs.calls_at_points(ids, {1: "wbc"}) == ["wbc", None]


def test_the_chula_table_puts_the_majority_baseline_beside_the_model():
    true = ["normal", "normal", "spherocyte", "target"]
    calls = ["normal", "spherocyte", "spherocyte", None]
    given = rs.point_scores(true, calls, CHULA_VOCABULARY.values())
    rows = {r["metric"]: r for r in chula_rows_scored(given, None, "normal")}
    assert rows["points in a cell's mask (cell recall)"]["model"] == "0.750 (3/4)"
    assert rows["spherocyte recall"]["model"] == "1.000 (1/1)"
    assert rows["spherocyte precision"]["model"] == "0.500 (1/2)"
    assert rows["spherocyte recall"]["baseline"] == "0.000"
    # model: normal F1 2/3, spherocyte F1 2/3 -> 0.667; all-normal: normal F1 0.8, spherocyte 0.
    assert rows["macro-F1 over the 13 classes"]["model"] == "0.667"
    assert rows["macro-F1 over the 13 classes"]["baseline"] == "0.400"
    assert rows["normal recall / precision (n 2)"]["model"] == "0.500 / 1.000 (1/1)"
    assert rows["normal recall / precision (n 2)"]["baseline"] == "1.000 / 0.667"


def test_boxes_match_one_to_one_at_iou_half():
    true = np.array([[0, 0, 10, 10], [20, 0, 30, 10]])
    pred = np.array(
        [
            [0, 0, 10, 10],  # A exactly
            [1, 0, 11, 10],  # A again, IoU 90/110: A is taken, so unmatched
            [20, 0, 30, 5],  # half of B: IoU 0.5, matched (>=)
            [50, 50, 60, 60],  # nothing
        ]
    )
    iou = rs.box_iou(pred, true)
    assert iou[1, 0] == pytest.approx(9 / 11) and iou[2, 1] == 0.5 and iou[3].tolist() == [0, 0]
    assert rs.match_boxes(pred, true) == [(0, 0, 1.0), (2, 1, 0.5)]
    counts = rs.detection_counts(pred, true)
    assert counts == {"matched": 2, "n_pred": 4, "n_true": 2}
    assert rs.recall_precision(counts) == {"recall": 1.0, "precision": 0.5}
    # Just under a half does not match.
    assert rs.match_boxes(np.array([[20, 0, 30, 4]]), true) == []
    # The best pair wins even when listed last: B's better box is taken, the other left.
    assert rs.match_boxes(np.array([[20, 0, 30, 6], [20, 0, 30, 9]]), true) == [(1, 1, 0.9)]
    assert rs.recall_precision(rs.add_counts([])) == {"recall": None, "precision": None}


def test_grid_baseline_tiles_the_image():
    grid = rs.grid_boxes(25, 20, 10, 10)
    assert grid.tolist() == [
        [0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 25, 10],
        [0, 10, 10, 20], [10, 10, 20, 20], [20, 10, 25, 20],
    ]  # fmt: skip
    assert rs.median_box_size(np.array([[0, 0, 10, 20], [0, 0, 30, 40], [5, 5, 25, 35]])) == (
        20,
        30,
    )


def test_bccd_counts_score_kinds_against_box_classes():
    truth = {
        "bccd_a": {
            "RBC": np.array([[0, 0, 10, 10]]),
            "WBC": np.array([[20, 20, 40, 40]]),
            "Platelets": np.zeros((0, 4), int),
        }
    }
    pred = {"bccd_a": {"rbc": np.array([[0, 0, 10, 10], [50, 50, 60, 60]]),
                       "platelet": np.array([[20, 20, 40, 40]])}}  # fmt: skip
    sizes = {"RBC": (10, 10), "WBC": (20, 20), "Platelets": (5, 5)}
    c = bccd_counts(pred, truth, sizes)
    assert c["RBC"]["model"] == {"matched": 1, "n_pred": 2, "n_true": 1}
    # The white cell was found, but called a platelet: no WBC recall, found by any kind.
    assert c["WBC"]["model"] == {"matched": 0, "n_pred": 0, "n_true": 1}
    assert c["WBC"]["any_kind"] == {"matched": 1, "n_pred": 3, "n_true": 1}
    assert c["Platelets"]["model"] == {"matched": 0, "n_pred": 1, "n_true": 0}
    # Both true boxes sit on the grid of their class's size: the baseline finds them.
    assert c["RBC"]["baseline"] == {"matched": 1, "n_pred": 64 * 48, "n_true": 1}
    assert c["WBC"]["baseline"] == {"matched": 1, "n_pred": 32 * 24, "n_true": 1}
    # A slide that did not commit has no objects: its boxes are all missed.
    c = bccd_counts({}, truth, sizes)
    assert c["RBC"]["model"] == {"matched": 0, "n_pred": 0, "n_true": 1}


def test_flags_agreement_and_the_pixel_size_rows():
    given = {"a": ("negative", "positive"), "b": ("insufficient", "insufficient")}
    assert rs.flags_agreement(given, {"a": ("negative", "positive"), "b": ("negative", "x")}) == (
        1,
        2,
    )
    assert rs.flags_agreement(given, {"a": ("negative", "positive")}) == (1, 2)  # b failed
    sizes = [
        {
            "site": "chula",
            "scanner": "nikon_ds_fi2_l3",
            "slides": 9,
            "um_per_px_source": "estimated",
            "um_per_px_min": 0.2145,
            "um_per_px_max": 0.2145,
            "calibration_cells": 500,
        }
    ]
    failures = [
        {"stage": "calibrate", "error_type": "PixelSizeUnknown", "slides": 1, "message": "m"}
    ]
    rows = pixel_size_rows(10, sizes, failures, (0.195, "known"), ((8, 9), "0.195 given"))
    assert [r["model"] for r in rows] == [
        "10.0 % (1/10)",
        "m",
        "0.2145 (+10.0%) from 500 cells",
        "0.889 (8/9)",
    ]
    assert rows[1]["metric"] == "  failed at calibrate (PixelSizeUnknown, 1)"
    assert rows[2]["baseline"] == "0.1950"
    assert rows[3]["metric"] == "patients' HS and anemia flags equal to the run with 0.195 given"
    # Every slide failed: no estimate, no flags to compare.
    assert [r["model"] for r in pixel_size_rows(4, [], [], (None, ""))] == ["100.0 % (4/4)"]


def test_flag_rows_beside_flagging_nobody():
    patients = [
        {"patient_id": "h1", "label": "normal", "hs_flag": "negative", "anemia_flag": "positive"},
        {"patient_id": "h2", "label": "normal", "hs_flag": "positive", "anemia_flag": "negative"},
        {"patient_id": "a1", "label": "anemic", "hs_flag": "insufficient", "anemia_flag": "insufficient"},
    ]  # fmt: skip
    rows = {r["metric"]: (r["model"], r["baseline"]) for r in flag_rows({"x": patients})}
    assert rows == {
        "x: HS flag not positive (nobody has HS; 1 insufficient)": ("0.667 (2/3)", "1.000 (3/3)"),
        "x: anemic individuals flagged anemic (1 insufficient)": ("0.000 (0/1)", "0.000 (0/1)"),
        "x: healthy individuals not flagged anemic (0 insufficient)": (
            "0.500 (1/2)",
            "1.000 (2/2)",
        ),
    }


def test_otsu_baseline_fills_the_pallor_of_dark_disks_on_glass():
    image = np.full((80, 120, 3), 220, np.uint8)
    yy, xx = np.mgrid[:80, :120]
    truth = np.zeros((80, 120), bool)
    for cy, cx in ((20, 25), (50, 70), (30, 100)):
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        truth |= r2 <= 12**2
        image[r2 <= 12**2] = (150, 90, 110)
        image[r2 <= 5**2] = 215  # central pallor, nearly as bright as the glass
    found = rs.otsu_foreground(image)
    assert np.array_equal(found, truth)


def test_dice_rows_put_the_mean_and_lowest_beside_the_baseline():
    per_image = [
        {"image": "a", "model": 0.95, "baseline": 0.97},
        {"image": "b", "model": 0.91, "baseline": 0.88},
    ]
    rows = {r["metric"]: (r["model"], r["baseline"]) for r in dice_rows(per_image)}
    assert rows == {
        "foreground Dice, mean of 2 images": ("0.930", "0.925"),
        "foreground Dice, lowest of 2 images": ("0.910", "0.880"),
    }


def test_chula_classes_are_rbcbatch_classes():
    assert set(CHULA_VOCABULARY.values()) == set(MORPHOLOGY_CLASSES)


def test_the_chula_and_bccd_test_catalogs():
    groups = chula_test_groups(shared_dataset("chula_rbc12"))
    assert len(groups) == 98 and sum(len(g["points"]) for g in groups) == 3395
    given, blank = chula_rows(groups, 0.195), chula_rows(groups, "")
    assert len({r["slide_id"] for r in given}) == 98
    assert {r["um_per_px"] for r in given} == {0.195} and {r["um_per_px"] for r in blank} == {""}
    images = bccd_test_images(shared_dataset("bccd"))
    assert len(images) == 72 and {r["um_per_px"] for r in bccd_rows(images)} == {""}
    boxes = boxes_by_class(images)
    assert sum(len(b["RBC"]) for b in boxes.values()) == 805
    assert sum(len(b["WBC"]) for b in boxes.values()) == 71
    # The train split's median RBC box is 105 x 101 px: 7.5 µm / 103 px.
    assert bccd_um_per_px(bccd_boxes(shared_dataset("bccd"), "train")) == 0.0728
    assert all(
        ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        for v in boxes.values()
        for b in v.values()
    )

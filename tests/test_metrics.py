"""Hand-computable checks of instance matching and foreground scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rbcbatch.evaluation import metrics
from rbcbatch.evaluation.metrics import foreground_scores, match_instances


def _square(shape: tuple[int, int], y: int, x: int, size: int, value: int = 1) -> np.ndarray:
    img = np.zeros(shape, dtype=np.uint32)
    img[y : y + size, x : x + size] = value
    return img


def test_shifted_square_iou_one_third() -> None:
    # 10x10 squares shifted by 5 px: intersection 50, union 150 -> IoU 1/3.
    true = _square((20, 30), 0, 0, 10)
    pred = _square((20, 30), 0, 5, 10)
    res = match_instances(pred, true, iou_threshold=0.5)
    assert (res["tp"], res["fp"], res["fn"]) == (0, 1, 1)
    assert res["f1"] == 0.0
    assert math.isnan(res["mean_iou"])
    res = match_instances(pred, true, iou_threshold=0.3)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 0, 0)
    assert res["mean_iou"] == pytest.approx(1 / 3)


def test_known_iou_above_threshold() -> None:
    # 10x10 vs 10x8 inside it: IoU = 80 / 100.
    true = _square((20, 20), 0, 0, 10)
    pred = np.zeros_like(true)
    pred[0:10, 0:8] = 7
    res = match_instances(pred, true)
    assert res["tp"] == 1 and res["f1"] == 1.0
    assert res["mean_iou"] == pytest.approx(0.8)


def test_identical_permuted_labels_give_f1_one() -> None:
    true = np.zeros((40, 40), dtype=np.uint32)
    true[0:10, 0:10] = 1
    true[20:30, 5:15] = 2
    true[5:15, 25:38] = 3
    perm = np.array([0, 30, 10, 20], dtype=np.uint32)  # ids need not be consecutive
    res = match_instances(perm[true], true)
    assert (res["tp"], res["fp"], res["fn"]) == (3, 0, 0)
    assert res["precision"] == res["recall"] == res["f1"] == 1.0
    assert res["mean_iou"] == pytest.approx(1.0)


def test_disjoint_objects_score_zero() -> None:
    true = _square((30, 30), 0, 0, 10)
    pred = _square((30, 30), 15, 15, 10)
    res = match_instances(pred, true)
    assert (res["tp"], res["fp"], res["fn"]) == (0, 1, 1)
    assert res["precision"] == res["recall"] == res["f1"] == 0.0


def test_merge_counts_as_one_match_and_one_miss() -> None:
    # Two 10x10 true squares side by side, one prediction covering both: IoU 0.5 with each;
    # matching is one-to-one, so only one of them is matched.
    true = np.zeros((10, 20), dtype=np.uint32)
    true[:, :10] = 1
    true[:, 10:] = 2
    pred = np.ones_like(true)
    res = match_instances(pred, true, iou_threshold=0.5)
    assert (res["tp"], res["fp"], res["fn"]) == (1, 0, 1)
    assert res["f1"] == pytest.approx(2 / 3)


def test_id_filters_restrict_evaluation() -> None:
    true = np.zeros((30, 30), dtype=np.uint32)
    true[0:10, 0:10] = 1  # a red cell
    true[15:25, 15:25] = 2  # a WBC, excluded from the evaluation
    pred = np.zeros_like(true)
    pred[0:10, 0:10] = 5
    pred[15:25, 15:25] = 6
    only_rbc = match_instances(pred, true, true_ids=[1])
    assert (only_rbc["tp"], only_rbc["fp"], only_rbc["fn"]) == (1, 1, 0)  # pred 6 is unmatched
    both = match_instances(pred, true, true_ids=[1], pred_ids=[5])
    assert (both["tp"], both["fp"], both["fn"]) == (1, 0, 0)
    missing = match_instances(pred, true, true_ids=[1, 2], pred_ids=[5])
    assert (missing["tp"], missing["fp"], missing["fn"]) == (1, 0, 1)


def test_empty_inputs() -> None:
    empty = np.zeros((5, 5), dtype=np.uint32)
    res = match_instances(empty, empty)
    assert res["f1"] == 1.0 and res["tp"] == res["fp"] == res["fn"] == 0
    res = match_instances(empty, _square((5, 5), 0, 0, 3))
    assert (res["fn"], res["recall"], res["f1"]) == (1, 0.0, 0.0)


def test_sparse_contingency_path_matches_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 6, size=(32, 32)).astype(np.uint32) * 1000
    pred = true.copy()
    pred[:, :4] = 0
    dense = match_instances(pred, true, iou_threshold=0.3)
    monkeypatch.setattr(metrics, "_DENSE_PAIRS_MAX", 0)
    sparse = match_instances(pred, true, iou_threshold=0.3)
    assert dense == pytest.approx(sparse, nan_ok=True)
    assert dense["tp"] == 5


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        match_instances(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError):
        foreground_scores(np.zeros((3, 3), bool), np.zeros((4, 3), bool))


def test_foreground_scores_known_overlap() -> None:
    # pred: 10x10 = 100 px inside true: 10x20 = 200 px, image 20x20 = 400 px.
    true = np.zeros((20, 20), dtype=bool)
    true[0:10, 0:20] = True
    pred = np.zeros_like(true)
    pred[0:10, 0:10] = True
    res = foreground_scores(pred, true)
    assert res["dice"] == pytest.approx(2 * 100 / 300)
    assert res["iou"] == pytest.approx(0.5)
    assert res["precision"] == pytest.approx(1.0)
    assert res["recall"] == pytest.approx(0.5)
    assert res["specificity"] == pytest.approx(1.0)
    res = foreground_scores(true, pred)  # swapped: 100 false positives among 300 negatives
    assert res["precision"] == pytest.approx(0.5)
    assert res["specificity"] == pytest.approx(200 / 300)


def test_foreground_scores_edge_cases() -> None:
    empty = np.zeros((4, 4), dtype=bool)
    full = np.ones((4, 4), dtype=bool)
    assert foreground_scores(empty, empty)["dice"] == 1.0
    assert foreground_scores(full, full)["dice"] == 1.0
    assert foreground_scores(empty, full)["dice"] == 0.0
    assert foreground_scores(full, ~full)["specificity"] == 0.0

"""Segmentation scores through the pipeline's own path (resample, tile, stitch)."""

from __future__ import annotations

import numpy as np
import pytest

from rbcbatch.dev.evaluate import (
    ANERBC_HELD_OUT,
    default_models,
    evaluate_anerbc,
    evaluate_morphology,
    evaluate_synthetic,
    synthetic_summary,
)
from tests.conftest import SHARED_DATA, shared_dataset


@pytest.fixture(scope="module")
def models():
    return default_models("classical")


def test_classical_on_synthetic_fields_meets_count_and_f1_targets(models):
    rows = evaluate_synthetic(models, n_images=6, seed=99, height=360, width=480)
    summary = synthetic_summary(rows)
    assert abs(summary["pooled_count_error_pct"]) < 5.0
    assert summary["mean_abs_count_error_pct"] < 5.0
    assert min(r["f1"] for r in rows) >= 0.90
    assert {r["site"] for r in rows} == {"site_a", "site_b"}


def test_classical_foreground_dice_on_held_out_anerbc(models):
    shared_dataset("anerbc_sample")
    rows = evaluate_anerbc(models, SHARED_DATA, ANERBC_HELD_OUT)
    assert len(rows) == 6
    dice = np.array([r["dice"] for r in rows])
    assert dice.mean() >= 0.93 and dice.min() >= 0.88, dice


def test_rules_find_spherocytes_among_segmented_cells(models):
    rows = {
        r["class"]: r
        for r in evaluate_morphology(models, n_images=6, seed=7, height=360, width=480)
    }
    assert rows["spherocyte"]["true_cells"] >= 20
    # Precision 0.78 since the rules were tuned on real cells (dev.tune_rules; 0.81 before):
    # real smears' discocytes show less pallor, so the bar for "no pallor" came down.
    assert rows["spherocyte"]["recall"] >= 0.85 and rows["spherocyte"]["precision"] >= 0.75
    assert rows["normal"]["recall"] >= 0.85

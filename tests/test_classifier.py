"""The learned morphology classifier: shipped weights, their integrity checks, inference contract.

The card's metrics are checked against a recomputation on a small fixed subset of the Chula test
split (the first 300 crops), so that a changed preprocessing or a swapped weights file shows.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rbcbatch.dev.datasets import CHULA_CLASSES
from rbcbatch.dev.train_classifier import (
    classification_metrics,
    evaluate_classifier,
    predict_crops,
)
from rbcbatch.errors import WeightsError
from rbcbatch.models import WEIGHTS_DIR, card_path, load_model
from tests.conftest import shared_dataset

SHIPPED = WEIGHTS_DIR / "resnet_cells.safetensors"
# One flipped call moves a 300-crop accuracy by 0.0033; other BLAS builds or thread counts
# may flip a crop or two that sits on a tie, never more.
SUBSET_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def shipped():
    if not SHIPPED.exists():
        pytest.skip(f"no shipped classifier weights at {SHIPPED}")
    return load_model("resnet_cells")


def _copy_shipped(tmp_path: Path) -> Path:
    """The shipped weights and card copied into tmp_path; returns the weights path."""
    weights = tmp_path / SHIPPED.name
    shutil.copyfile(SHIPPED, weights)
    shutil.copyfile(card_path(SHIPPED), card_path(weights))
    return weights


# --- Card and metrics ------------------------------------------------------------------------


def test_card_describes_the_model(shipped):
    model, card = shipped
    assert card.name == "resnet_cells" and card.task == "classifier"
    assert card.classes == list(CHULA_CLASSES)
    assert card.um_per_px == pytest.approx(card.training["crop_um"] / card.input_px)
    assert model.head.out_features == len(CHULA_CLASSES)
    for split in ("val", "test"):
        assert {"accuracy", "macro_f1", "recall"} <= card.metrics[split].keys()
        assert set(card.metrics[split]["recall"]) == set(CHULA_CLASSES)


def test_shipped_weights_reproduce_card_metrics_on_subset(shipped):
    root = shared_dataset("chula_rbc12")
    _, card = shipped
    expected = card.metrics["subset_300"]
    got = evaluate_classifier("resnet_cells", subset=expected["n"], root=root)
    assert got["n"] == expected["n"]
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=SUBSET_TOLERANCE)


def test_classification_metrics_on_a_hand_example():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    m = classification_metrics(y_true, y_pred, ("a", "b", "c"))
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["recall"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    # F1: a = 2*(1/2*1/2)/1 = 0.5, b = 2*(2/3*1)/(5/3) = 0.8, c = 0.
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-4)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


# --- Integrity of weights files --------------------------------------------------------------


def test_corrupt_weights_file_raises(shipped, tmp_path):
    weights = _copy_shipped(tmp_path)
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_model(weights)


def test_unreadable_weights_with_matching_hash_raise(shipped, tmp_path):
    """A broken safetensors header fails as WeightsError even when the card's hash matches."""
    from rbcbatch.models import file_sha256

    weights = _copy_shipped(tmp_path)
    data = bytearray(weights.read_bytes())
    data[8:24] = b"\x00" * 16  # inside the JSON header that follows the 8-byte length
    weights.write_bytes(bytes(data))
    card = json.loads(card_path(weights).read_text())
    card["sha256"] = file_sha256(weights)
    card_path(weights).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="cannot load"):
        load_model(weights)


def test_card_with_wrong_sha256_raises(shipped, tmp_path):
    weights = _copy_shipped(tmp_path)
    card = json.loads(card_path(weights).read_text())
    card["sha256"] = "0" * 64
    card_path(weights).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match="card says"):
        load_model(weights)


# --- Inference contract ----------------------------------------------------------------------


def test_predict_crops_shapes_dtypes_and_probabilities(shipped):
    model, card = shipped
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (5, card.input_px, card.input_px, 3), dtype=np.uint8)
    probs, emb = predict_crops(model, crops, batch_size=2)
    assert probs.shape == (5, len(CHULA_CLASSES)) and probs.dtype == np.float32
    assert emb.shape == (5, card.kwargs.get("embedding_dim", 64)) and emb.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all() and np.isfinite(emb).all()
    # Eval mode: a crop's output does not depend on its batch.
    alone, _ = predict_crops(model, crops[:1])
    np.testing.assert_allclose(alone, probs[:1], atol=1e-5)


def test_predict_crops_empty_input(shipped):
    model, card = shipped
    probs, emb = predict_crops(model, np.empty((0, card.input_px, card.input_px, 3), np.uint8))
    assert probs.shape == (0, len(CHULA_CLASSES)) and probs.dtype == np.float32
    assert emb.shape == (0, card.kwargs.get("embedding_dim", 64)) and emb.dtype == np.float32

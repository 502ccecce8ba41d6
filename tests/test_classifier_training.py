"""The classifier's training loop and its inputs: checkpoint and resume, per-slide stain
normalisation, normal controls."""

from __future__ import annotations

import numpy as np
import pytest

from rbcbatch.classify.crops import STAIN_TARGET_OD, slide_crops
from rbcbatch.dev.classifier_data import control_cells
from rbcbatch.dev.datasets import CHULA_UM_PER_PX, chula_records
from rbcbatch.dev.train_classifier import BATCH, fit_classifier
from rbcbatch.engine.config import Models, RunConfig
from rbcbatch.engine.slide import segment_slide
from rbcbatch.imaging.density import (
    apply_lut,
    intensity_at,
    optical_density,
    slide_stain,
    stain_lut,
)
from rbcbatch.io.sources import read_slide
from rbcbatch.measure.cells import measure_cells
from rbcbatch.vocabulary import OBJECT_KINDS
from tests.conftest import shared_dataset

TINY = {"num_classes": 13, "embedding_dim": 8, "width": 8, "stem_pool": True}
SPEC = {"stain": "slide", "standardise": "fixed", "mean": [0.8, 0.7, 0.75], "sd": [0.2] * 3}


def _tiny_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (2 * BATCH + 7, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 13, len(x)).astype(np.int64)
    return (x, y), (x[:40], y[:40])


def _settings(epochs: int) -> dict:
    return {"epochs": epochs, "out_px": 32, "crop_um": 14.0, "balance": "sampler",
            "lr": 2e-3, "seed": 0, "kwargs": TINY, "n_train": 2 * BATCH + 7}  # fmt: skip


def _fit(tmp_path, name, resume=False, time_limit_s=None):
    import torch

    torch.set_num_threads(1)
    train, val = _tiny_data()
    return fit_classifier(
        train, val, SPEC, _settings(2), tmp_path / name, resume, time_limit_s, lambda _: None
    )


def test_an_interrupted_run_resumed_ends_with_the_same_weights(tmp_path):
    import torch

    whole = _fit(tmp_path, "whole.ckpt")
    first = _fit(tmp_path, "split.ckpt", time_limit_s=0.0)  # stops after its first epoch
    assert first["stopped_early"] and len(first["history"]) == 1
    rest = _fit(tmp_path, "split.ckpt", resume=True)
    assert len(rest["history"]) == 2 and not rest["stopped_early"]
    a = torch.load(tmp_path / "whole.ckpt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split.ckpt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in whole["history"]] == [h["loss"] for h in rest["history"]]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    _fit(tmp_path, "a.ckpt", time_limit_s=0.0)
    train, val = _tiny_data()
    with pytest.raises(ValueError, match="other settings"):
        fit_classifier(train, val, SPEC, _settings(3), tmp_path / "a.ckpt", True, None, print)


@pytest.fixture(scope="module")
def chula_image():
    record = chula_records(shared_dataset("chula_rbc12"))[0]
    return read_slide("chula", record["path"])


def _restained(image, glass, gain, new_glass):
    """The same smear under another stain strength per channel and another lamp."""
    od = optical_density(image, glass) * np.asarray(gain, np.float32)
    return np.clip(np.rint(intensity_at(od, new_glass)), 0, 255).astype(np.uint8)


def test_stain_normalisation_undoes_a_change_of_stain_and_lamp(chula_image):
    labels, kinds, _ = segment_slide(chula_image, CHULA_UM_PER_PX, Models(RunConfig()))
    columns = measure_cells(labels, chula_image, CHULA_UM_PER_PX)
    is_rbc = np.array([kinds[int(i)] == OBJECT_KINDS["rbc"] for i in columns["cell_id"]])
    glass, _ = slide_stain(chula_image, np.zeros((1, 3)))
    other = _restained(chula_image, glass, (1.35, 0.75, 1.15), (245.0, 236.0, 250.0))
    other_columns = measure_cells(labels, other, CHULA_UM_PER_PX)
    points = np.stack([columns["centroid_x"], columns["centroid_y"]], axis=1)[is_rbc][:40]
    before = slide_crops(chula_image, points, columns, CHULA_UM_PER_PX).astype(np.int16)
    after = slide_crops(other, points, other_columns, CHULA_UM_PER_PX).astype(np.int16)
    raw = np.abs(chula_image.astype(np.int16) - other.astype(np.int16)).mean()
    assert raw > 15  # the change is large as scanned ...
    assert np.abs(before - after).mean() < 3  # ... and gone once both are normalised


def test_a_slides_median_red_cell_lands_on_the_stain_target(chula_image):
    labels, _, _ = segment_slide(chula_image, CHULA_UM_PER_PX, Models(RunConfig()))
    columns = measure_cells(labels, chula_image, CHULA_UM_PER_PX)
    cells = np.stack([columns[c] for c in ("mean_r", "mean_g", "mean_b")], axis=1)
    glass, cell_od = slide_stain(chula_image, cells)
    mapped = apply_lut(
        np.rint(cells).astype(np.uint8)[None], stain_lut(glass, cell_od, STAIN_TARGET_OD)
    )
    od = np.median(optical_density(mapped[0], 255.0), axis=0)
    assert od == pytest.approx(STAIN_TARGET_OD, abs=0.02)


def test_control_cells_keep_whole_free_red_cells_only():
    columns = {
        "area_um2": np.array([40.0, 42.0, 44.0, 120.0, 41.0, 43.0]),
        "touches_edge": np.array([False, False, True, False, False, False]),
        "contact_fraction": np.array([0.0, 0.1, 0.0, 0.0, 0.6, 0.0]),
        "bbox_x0": np.array([0, 20, 40, 60, 80, 45]),
        "bbox_x1": np.array([10, 30, 50, 70, 90, 55]),
        "bbox_y0": np.array([0, 0, 0, 0, 0, 45]),
        "bbox_y1": np.array([10, 10, 10, 10, 10, 55]),
    }
    is_rbc = np.array([True, True, True, True, True, True])
    # 0, 1 kept; 2 cut by the edge; 3 too large (2.9x the median); 4 touching; 5 at the centre.
    got = control_cells(columns, is_rbc, (100, 100))
    assert got.tolist() == [True, True, False, False, False, False]

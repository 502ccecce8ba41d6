"""Scores of the segmenters against truth: synthetic instance truth and real AneRBC masks.

Everything goes through `pipeline.segment_slide`, the same path a run takes (resampling to
the working resolution, tiling with a halo, stitching), so the figures describe the pipeline,
not a segmenter on hand-picked crops.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from rbcbatch.dev.synth import SITES, render_field
from rbcbatch.engine.config import Models, RunConfig
from rbcbatch.engine.slide import segment_slide
from rbcbatch.evaluation.metrics import best_match, foreground_scores, match_instances
from rbcbatch.io.sources import read_slide
from rbcbatch.measure import measure_cells
from rbcbatch.vocabulary import DEFAULT_CLASSIFIER

# AneRBC states no pixel size. The classical segmenter was tuned on AneRBC 001-003 treating
# them as 0.25 µm/px, so the held-out images are scored the same way.
ANERBC_UM_PER_PX = 0.25
# AneRBC-I images held out from all tuning; 001-003 of each group were used to tune.
ANERBC_HELD_OUT = ("004", "005", "006")
ANERBC_TUNED = ("001", "002", "003")
# Seed of the synthetic evaluation fields; tuning used other seeds.
SYNTH_EVAL_SEED = 20261123


def synthetic_fields(n_images: int, seed: int, height: int, width: int):
    """Yield (index, condition, site, µm/px, Field): conditions cycle, sites alternate by three."""
    rng = np.random.default_rng(seed)
    conditions, sites = ("normal", "hs", "ida"), tuple(SITES)
    for i in range(n_images):
        condition, site = conditions[i % 3], sites[(i // 3) % len(sites)]
        field = render_field(rng, condition, site, height, width)
        yield i, condition, site, SITES[site]["um_per_px"], field


def evaluate_synthetic(
    models: Models,
    n_images: int = 24,
    seed: int = SYNTH_EVAL_SEED,
    height: int = 600,
    width: int = 800,
) -> list[dict]:
    """Per image: RBC count error and instance F1 at IoU 0.5 against the generator's truth."""
    rows = []
    for i, condition, site, um, field in synthetic_fields(n_images, seed, height, width):
        labels, kinds, _ = segment_slide(field.image, um, models)
        true_rbc = [c["cell_id"] for c in field.cells if c["kind"] == "rbc"]
        pred_rbc = [i for i, k in kinds.items() if k == 1 and i in set(np.unique(labels))]
        scores = match_instances(labels, field.labels, 0.5, true_ids=true_rbc, pred_ids=pred_rbc)
        rows.append(
            {
                "image": f"synthetic-{i:02d}",
                "condition": condition,
                "site": site,
                "true_rbc": len(true_rbc),
                "found_rbc": len(pred_rbc),
                "count_error_pct": 100.0 * (len(pred_rbc) - len(true_rbc)) / max(1, len(true_rbc)),
                **{k: scores[k] for k in ("precision", "recall", "f1", "mean_iou")},
            }
        )
    return rows


def evaluate_morphology(
    models: Models,
    n_images: int = 24,
    seed: int = SYNTH_EVAL_SEED,
    height: int = 600,
    width: int = 800,
) -> list[dict]:
    """Per-class recall and precision of the morphology call on segmented, matched red cells.

    Runs the pipeline's own path (segment, measure, classify) on synthetic fields; a cell is
    scored when its segment matches a true red cell at IoU >= 0.5 and it does not touch the
    image edge (cut cells are left out of morphology, as in the `patients` view).
    """
    true_classes, called = [], []
    for _, _, _, um, field in synthetic_fields(n_images, seed + 1, height, width):
        labels, kinds, stats = segment_slide(field.image, um, models)
        columns = measure_cells(labels, field.image, um, background_rgb=stats.background_rgb)
        calls = models.classifier(columns, field.image, um)
        truth = {c["cell_id"]: c["cell_class"] for c in field.cells if c["kind"] == "rbc"}
        matches = best_match(labels, field.labels)
        ids, edge = columns["cell_id"].tolist(), columns["touches_edge"].tolist()
        for cell_id, cut, call in zip(ids, edge, calls.classes, strict=True):
            if kinds.get(cell_id) == 1 and not cut and matches.get(cell_id) in truth:
                true_classes.append(truth[matches[cell_id]])
                called.append(str(call))
    true_arr, call_arr = np.array(true_classes), np.array(called)
    rows = []
    for cls in sorted(set(true_classes), key=lambda c: (c != "spherocyte", c)):
        tp = int(np.sum((true_arr == cls) & (call_arr == cls)))
        rows.append(
            {
                "class": cls,
                "true_cells": int(np.sum(true_arr == cls)),
                "called": int(np.sum(call_arr == cls)),
                "recall": tp / max(1, int(np.sum(true_arr == cls))),
                "precision": tp / max(1, int(np.sum(call_arr == cls))),
            }
        )
    return rows


def anerbc_pairs(data_dir: Path, ids: tuple[str, ...]) -> list[tuple[str, Path, Path]]:
    """(name, image, mask) for the AneRBC-I images with these numbers, both groups."""
    base = data_dir / "anerbc_sample" / "AneRBC-I"
    pairs = []
    for group, suffix in (("Anemic_individuals", "a"), ("Healthy_individuals", "h")):
        for number in ids:
            name = f"{number}_{suffix}.png"
            image = base / group / "Original_images" / name
            if image.exists():
                pairs.append((name, image, base / group / "Binary_segmented" / name))
    return pairs


def evaluate_anerbc(
    models: Models, data_dir: Path, ids: tuple[str, ...], um_per_px: float = ANERBC_UM_PER_PX
) -> list[dict]:
    """Per image: foreground Dice/IoU/precision/recall/specificity against AneRBC's masks."""
    rows = []
    for name, image_path, mask_path in anerbc_pairs(data_dir, ids):
        image = read_slide(name, str(image_path))
        labels, _, _ = segment_slide(image, um_per_px, models)
        truth = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) < 128
        rows.append({"image": name, **foreground_scores(labels > 0, truth)})
    return rows


def synthetic_summary(rows: list[dict]) -> dict:
    """Pooled figures over synthetic images: count errors and instance scores."""
    true, found = sum(r["true_rbc"] for r in rows), sum(r["found_rbc"] for r in rows)
    return {
        **mean_row(rows, "mean"),
        "true_rbc": true,
        "found_rbc": found,
        "mean_abs_count_error_pct": float(np.mean([abs(r["count_error_pct"]) for r in rows])),
        "pooled_count_error_pct": 100.0 * (found - true) / true,
    }


def mean_row(rows: list[dict], label: str) -> dict:
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    return {"image": label, **{k: float(np.nanmean([r[k] for r in rows])) for k in keys}}


def default_models(segmenter: str = "classical", classifier: str = DEFAULT_CLASSIFIER) -> Models:
    return Models(RunConfig(segmenter=segmenter, classifier=classifier))

"""Scores of the rule-based classifier on real cells of the training splits, for tuning it.

The rules' thresholds are chosen here on real data that no held-out figure uses:

- Chula RBC-12 training split: every image segmented and measured by the default stages; each
  annotated point takes the red cell whose mask holds it (points on background or on another
  kind of object are counted as missed), and is scored against its label.
- Normal controls: all red cells (not cut by the image edge) of the PBC training split and of
  AneRBC-I healthy 001-003, as `evaluate --real` counts the held-out ones.

Every image's cells are classified together, so the slide-relative references are the image's
own. `python -m rbcbatch.dev.tune_rules` prints the table for the shipped rules.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from rbcbatch.classify.rules import MorphologyRules, classify_rules
from rbcbatch.dev.classifier_data import control_paths, group_um_per_px
from rbcbatch.dev.datasets import (
    CHULA_CLASSES,
    CHULA_UM_PER_PX,
    REPO,
    chula_records,
    chula_split,
    shared_data_dir,
)
from rbcbatch.dev.train_classifier import classification_metrics
from rbcbatch.engine.config import Models, RunConfig
from rbcbatch.engine.slide import segment_slide
from rbcbatch.io.sources import read_slide
from rbcbatch.measure.cells import measure_cells
from rbcbatch.vocabulary import OBJECT_KINDS

CACHE_DIR = REPO / ".cache" / "rules"
RBC = OBJECT_KINDS["rbc"]


def _image_cells(image: np.ndarray, um_per_px: float, models: Models):
    """(labels, measure columns with an is_rbc column) of one image."""
    labels, kinds, stats = segment_slide(image, um_per_px, models)
    columns = measure_cells(labels, image, um_per_px, background_rgb=stats.background_rgb)
    columns["is_rbc"] = np.array([kinds[int(i)] == RBC for i in columns["cell_id"]], bool)
    return labels, columns


def _save(path: Path, images: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{i}/{k}": np.asarray(v) for i, cols in enumerate(images) for k, v in cols.items()}
    np.savez_compressed(path, **flat)


def _load(path: Path) -> list[dict]:
    images: dict[int, dict] = {}
    with np.load(path) as z:
        for key in z.files:
            i, name = key.split("/", 1)
            images.setdefault(int(i), {})[name] = z[key]
    return [images[i] for i in sorted(images)]


def chula_images(split: str = "train", progress: Callable = print) -> list[dict]:
    """Per Chula image of `split`: its cells' columns plus `point_cell` (the cell id under each
    annotated point, 0 where none or not a red cell) and `point_class` (label ids)."""
    path = CACHE_DIR / f"chula_{split}.npz"
    if path.is_file():
        return _load(path)
    models = Models(RunConfig())
    groups = chula_split(chula_records(shared_data_dir() / "chula_rbc12"), seed=0)[split]
    images = []
    for n, g in enumerate(groups):
        image = read_slide(str(g["image_id"]), g["path"])
        labels, cols = _image_cells(image, CHULA_UM_PER_PX, models)
        h, w = labels.shape
        x = np.clip(np.rint(g["points"][:, 0]).astype(int), 0, w - 1)
        y = np.clip(np.rint(g["points"][:, 1]).astype(int), 0, h - 1)
        under = labels[y, x].astype(np.int64)
        rbc_ids = set(cols["cell_id"][cols["is_rbc"]].tolist())
        cols["point_cell"] = np.array([i if i in rbc_ids else 0 for i in under], np.int64)
        cols["point_class"] = g["points"][:, 2].astype(np.int64)
        images.append(cols)
        if (n + 1) % 100 == 0:
            progress(f"chula {split}: {n + 1}/{len(groups)} images")
    _save(path, images)
    return images


def control_images(name: str, progress: Callable = print) -> list[dict]:
    """Per training image of a normal-control source: its cells' columns."""
    path = CACHE_DIR / f"control_{name}.npz"
    if path.is_file():
        return _load(path)
    paths = control_paths()[name]
    um_per_px = group_um_per_px(paths)
    progress(f"{name}: {len(paths)} images at the estimated {um_per_px:.4f} µm/px")
    models = Models(RunConfig())
    images = [_image_cells(read_slide(p.stem, p), um_per_px, models)[1] for p in paths]
    _save(path, images)
    return images


def chula_calls(images: list[dict], rules: MorphologyRules) -> tuple[np.ndarray, np.ndarray]:
    """(true class ids, called class ids; -1 where the point found no red cell)."""
    names = {c: i for i, c in enumerate(CHULA_CLASSES)}
    truth, called = [], []
    for cols in images:
        calls = classify_rules(cols)
        by_id = dict(zip(cols["cell_id"].tolist(), calls, strict=True))
        truth.append(cols["point_class"])
        called.append([names[by_id[i]] if i else -1 for i in cols["point_cell"].tolist()])
    return np.concatenate(truth), np.concatenate(called).astype(np.int64)


def control_shares(images: list[dict], rules: MorphologyRules) -> dict[str, float]:
    """% of the red cells (not cut by the edge) called normal and spherocyte."""
    calls = []
    for cols in images:
        keep = cols["is_rbc"] & ~cols["touches_edge"]
        calls.append(classify_rules(cols)[keep])
    c = np.concatenate(calls)
    return {
        "red_cells": len(c),
        "normal_pct": round(100.0 * float(np.mean(c == "normal")), 1),
        "spherocyte_pct": round(100.0 * float(np.mean(c == "spherocyte")), 1),
    }


def score(rules: MorphologyRules, tables: dict[str, list[dict]]) -> dict:
    """The tuning table of one set of thresholds."""
    truth, called = chula_calls(tables["chula"], rules)
    found = called >= 0
    m = classification_metrics(truth[found], called[found])
    sph = CHULA_CLASSES.index("spherocyte")
    predicted = int(np.sum(called[found] == sph))
    hit = int(np.sum((called == sph) & (truth == sph)))
    out = {
        "chula_train": {
            "points": len(truth),
            "found_pct": round(100.0 * float(found.mean()), 1),
            "macro_f1": m["macro_f1"],
            "accuracy": m["accuracy"],
            "spherocyte_recall": round(hit / max(int(np.sum(found & (truth == sph))), 1), 3),
            "spherocyte_precision": round(hit / max(predicted, 1), 3),
            "f1": m["f1"],
        }
    }
    for name in ("pbc", "anerbc"):
        out[f"control_{name}"] = control_shares(tables[name], rules)
    return out


def tuning_tables(progress: Callable = print) -> dict[str, list[dict]]:
    return {
        "chula": chula_images("train", progress),
        "pbc": control_images("pbc", progress),
        "anerbc": control_images("anerbc", progress),
    }


def main(argv: list[str]) -> None:
    """Print the tuning table; arguments name=value override thresholds (MorphologyRules)."""
    overrides = dict(a.split("=", 1) for a in argv)
    rules = replace(
        MorphologyRules(),
        **{k: type(getattr(MorphologyRules(), k))(v) for k, v in overrides.items()},
    )
    print(json.dumps(score(rules, tuning_tables()), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

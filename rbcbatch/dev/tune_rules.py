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
from rbcbatch.dev.classifier_data import control_paths, group_um_per_px, segment_and_measure
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
from rbcbatch.io.sources import read_slide
from rbcbatch.vocabulary import OBJECT_KINDS

CACHE_DIR = REPO / ".cache" / "rules"
RBC = OBJECT_KINDS["rbc"]


def _image_cells(image: np.ndarray, um_per_px: float, models: Models):
    """(labels, measure columns with an is_rbc column) of one image."""
    labels, columns, is_rbc = segment_and_measure(image, um_per_px, models)
    columns["is_rbc"] = is_rbc
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
        calls = classify_rules(cols, rules)
        by_id = dict(zip(cols["cell_id"].tolist(), calls, strict=True))
        truth.append(cols["point_class"])
        called.append([names[by_id[i]] if i else -1 for i in cols["point_cell"].tolist()])
    return np.concatenate(truth), np.concatenate(called).astype(np.int64)


def control_shares(images: list[dict], rules: MorphologyRules) -> dict[str, float]:
    """% of the red cells (not cut by the edge) called normal and spherocyte."""
    calls = []
    for cols in images:
        keep = cols["is_rbc"] & ~cols["touches_edge"]
        calls.append(classify_rules(cols, rules)[keep])
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


# Thresholds the search moves, each over a grid of candidate values.
SEARCH_GRID: dict[str, tuple[float, ...]] = {
    "hypochromic_min_pallor_fraction": (0.2, 0.24, 0.28, 0.32, 0.36, 0.4, 0.45),
    "spherocyte_max_relative_diameter": (0.88, 0.92, 0.96, 1.0, 1.05, 1.1),
    "min_cell_diameter_um": (2.5, 3.0, 3.5, 4.0, 4.5),
    "spherocyte_max_diameter_um": (6.0, 6.5, 7.0, 7.5),
    "spherocyte_min_pallor_ratio": (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1),
    "spherocyte_pallor_margin": (0.0, 0.1, 0.25, 0.4),
    "elliptocyte_min_aspect": (1.4, 1.5, 1.6, 1.8),
    "elliptocyte_min_ellipse_fit": (0.9, 0.94, 0.97),
    "spherocyte_min_ellipse_fit": (0.85, 0.9, 0.94),
    "microcyte_max_diameter_um": (5.0, 5.5, 6.0),
    "macrocyte_min_diameter_um": (8.5, 9.0, 9.5, 10.0),
    "schistocyte_max_ellipse_fit": (0.9, 0.93, 0.96),
    "schistocyte_max_diameter_um": (5.0, 5.5, 6.0),
    "target_min_core_ratio": (1.0, 1.03, 1.06),
    "target_max_ring_ratio": (0.85, 0.9, 0.95),
}
# Spherocytes on healthy controls above this share are penalised: the bar is 2-3%.
MAX_CONTROL_SPHEROCYTE_PCT = 2.0


def objective(table: dict) -> float:
    """One number to maximise: Chula train macro-F1 and spherocyte F1, and the share of the
    controls' red cells called normal, with a penalty for spherocytes on the controls."""
    chula = table["chula_train"]
    controls = [table["control_pbc"], table["control_anerbc"]]
    normal = np.mean([c["normal_pct"] for c in controls]) / 100.0
    excess = sum(max(0.0, c["spherocyte_pct"] - MAX_CONTROL_SPHEROCYTE_PCT) for c in controls)
    return chula["macro_f1"] + chula["f1"]["spherocyte"] + normal - 0.1 * excess


def search(
    tables: dict[str, list[dict]], start: MorphologyRules, rounds: int = 2, progress=print
) -> MorphologyRules:
    """Coordinate search over SEARCH_GRID from `start`, `rounds` passes."""
    best, best_value = start, objective(score(start, tables))
    progress(f"start {best_value:.4f}")
    for _ in range(rounds):
        for name, grid in SEARCH_GRID.items():
            for value in grid:
                try:
                    candidate = replace(best, **{name: value})
                except ValueError:
                    continue
                v = objective(score(candidate, tables))
                if v > best_value + 1e-4:
                    best, best_value = candidate, v
                    progress(f"{name}={value}: {v:.4f}")
    return best


def tuning_tables(progress: Callable = print) -> dict[str, list[dict]]:
    return {
        "chula": chula_images("train", progress),
        "pbc": control_images("pbc", progress),
        "anerbc": control_images("anerbc", progress),
    }


def main(argv: list[str]) -> None:
    """Print the tuning table of the shipped rules, or with `--search` the search's path and
    the table of what it found; name=value arguments override thresholds first."""
    defaults = MorphologyRules()
    overrides = dict(a.split("=", 1) for a in argv if "=" in a)
    rules = replace(defaults, **{k: type(getattr(defaults, k))(v) for k, v in overrides.items()})
    tables = tuning_tables()
    if "--search" in argv:
        rules = search(tables, rules)
        changed = {k: v for k, v in rules.to_dict().items() if v != defaults.to_dict()[k]}
        print(json.dumps({"changed": changed}, indent=1))
    print(json.dumps(score(rules, tables), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])

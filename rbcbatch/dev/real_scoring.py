"""Scores of a run against the real data sets' own truth, as pure functions on arrays and lists.

- Points (Chula RBC-12): a point is found when it falls inside a cell's mask (the label under
  it in the run's masks.zarr, level 0); the found points then score the run's class calls
  against the point labels, class by class. Chula's points do not cover every cell, so a
  class's precision is over annotated cells only.
- Boxes (BCCD): the run's objects (bbox columns of the cells table) are matched to the
  annotated boxes one-to-one at box IoU >= 0.5, greedily by decreasing IoU, the rule of
  `rbcbatch.evaluation.metrics.match_instances`. That module matches label images, whose
  objects never overlap; boxes of touching cells do (on both sides), so boxes get their own
  IoU here.
- Masks (AneRBC-I): foreground Dice of the run's masks (any object) against the set's masks.
- Baselines beside a model: every cell called the most frequent class of the training split
  (points), a grid of boxes of the training split's median size tiling the image (boxes), a
  plain Otsu threshold of the grey image with its holes filled (masks), and "flag nobody"
  (flags), so each figure shows what a model adds to a simple answer.

evaluate_real reads the runs and the truth; these functions only count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np
from scipy import ndimage as ndi

# A run's box matches an annotated box at this IoU or more (one-to-one above 0.5).
IOU_THRESHOLD = 0.5


def cells_at_points(labels: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The label (cell_id) under each point: int64 (N,), 0 where no cell or off the image.

    labels: (H, W) integer instance labels; points: (N, >=2) integer x, y columns in the
    same pixels (extra columns, such as a class id, are ignored)."""
    labels = np.asarray(labels)
    if len(points) == 0:
        return np.zeros(0, dtype=np.int64)
    pts = np.asarray(points, dtype=np.int64)
    x, y = pts[:, 0], pts[:, 1]
    inside = (x >= 0) & (y >= 0) & (x < labels.shape[1]) & (y < labels.shape[0])
    out = np.zeros(len(pts), dtype=np.int64)
    out[inside] = labels[y[inside], x[inside]]
    return out


def calls_at_points(cell_ids: np.ndarray, calls: Mapping[int, str]) -> list[str | None]:
    """The call of the cell each point fell in (None for a point in no cell, or in a label
    the cells table does not hold). A call is the cells table's `class`: a red-cell class, or
    the object's kind ("wbc", "platelet"), which is never a red-cell class."""
    return [calls.get(int(i)) if i else None for i in cell_ids]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def class_scores(
    true: Sequence[str], called: Sequence[str], classes: Sequence[str]
) -> dict[str, dict]:
    """Per class of `classes`: n (true), called, tp, recall, precision and f1 of the calls
    against the truth, pair by pair; plus "macro" with macro_f1, the mean f1 over the classes
    that occur in `true`. recall / precision are None with nothing to divide by (a class never
    called has no precision); f1 is 0 then, as scikit-learn's zero_division=0."""
    if len(true) != len(called):
        raise ValueError(f"{len(true)} true labels but {len(called)} calls")
    t, c = np.asarray(true, dtype=object), np.asarray(called, dtype=object)
    out: dict[str, dict] = {}
    for cls in classes:
        n, k = int(np.sum(t == cls)), int(np.sum(c == cls))
        tp = int(np.sum((t == cls) & (c == cls)))
        out[cls] = {
            "n": n,
            "called": k,
            "tp": tp,
            "recall": _ratio(tp, n),
            "precision": _ratio(tp, k),
            "f1": 2 * tp / (n + k) if n + k else 0.0,
        }
    present = [out[cls]["f1"] for cls in classes if out[cls]["n"]]
    out["macro"] = {"macro_f1": float(np.mean(present)) if present else None, "n": len(t)}
    return out


def point_scores(true: Sequence[str], calls: Sequence[str | None], classes: Sequence[str]) -> dict:
    """Cell recall at points and the class scores of the found points.

    true: the point's class name; calls: the call of the cell it fell in, None when in no
    cell. Returns points, found, cell_recall (found / points) and "classes"
    (`class_scores` over the found points only)."""
    found = [i for i, c in enumerate(calls) if c is not None]
    return {
        "points": len(true),
        "found": len(found),
        "cell_recall": _ratio(len(found), len(true)),
        "classes": class_scores([true[i] for i in found], [calls[i] for i in found], classes),
    }


def majority_class(counts: Mapping[str, int]) -> str:
    """The most frequent class of a training split (ties: the first in order)."""
    return max(counts, key=lambda c: counts[c])


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N, 4) with every box of `b` (M, 4): float64 (N, M).

    Boxes are x0, y0, x1, y1 half-open (area (x1 - x0) * (y1 - y0))."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_boxes(
    pred: np.ndarray, true: np.ndarray, threshold: float = IOU_THRESHOLD
) -> list[tuple[int, int, float]]:
    """One-to-one (pred index, true index, IoU) pairs at IoU >= threshold, taken greedily by
    decreasing IoU (ties in index order), as match_instances does for label images."""
    iou = box_iou(pred, true)
    pi, ti = np.nonzero(iou >= threshold)
    order = np.lexsort((ti, pi, -iou[pi, ti]))
    used_p, used_t, pairs = set(), set(), []
    for k in order:
        p, t = int(pi[k]), int(ti[k])
        if p in used_p or t in used_t:
            continue
        used_p.add(p)
        used_t.add(t)
        pairs.append((p, t, float(iou[p, t])))
    return pairs


def detection_counts(
    pred: np.ndarray, true: np.ndarray, threshold: float = IOU_THRESHOLD
) -> dict[str, int]:
    """matched, n_pred and n_true of one image's boxes (sum them over images)."""
    pred = np.asarray(pred).reshape(-1, 4)
    true = np.asarray(true).reshape(-1, 4)
    return {
        "matched": len(match_boxes(pred, true, threshold)),
        "n_pred": len(pred),
        "n_true": len(true),
    }


def add_counts(counts: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Counts summed key by key (the keys of the first)."""
    if not counts:
        return {"matched": 0, "n_pred": 0, "n_true": 0}
    return {k: int(sum(c[k] for c in counts)) for k in counts[0]}


def recall_precision(counts: Mapping[str, int]) -> dict[str, float | None]:
    """recall = matched / n_true, precision = matched / n_pred (None with nothing to divide)."""
    return {
        "recall": _ratio(counts["matched"], counts["n_true"]),
        "precision": _ratio(counts["matched"], counts["n_pred"]),
    }


def grid_boxes(width: int, height: int, box_w: int, box_h: int) -> np.ndarray:
    """The chance baseline of a detector: boxes of box_w x box_h tiling a width x height image
    from its top-left corner, int64 (K, 4) x0, y0, x1, y1 (the last row and column may be cut
    by the image edge, as an annotator's boxes are)."""
    if box_w < 1 or box_h < 1:
        raise ValueError(f"box size must be positive, got {box_w} x {box_h}")
    x0, y0 = np.meshgrid(np.arange(0, width, box_w), np.arange(0, height, box_h))
    x0, y0 = x0.ravel(), y0.ravel()
    return np.stack(
        [x0, y0, np.minimum(x0 + box_w, width), np.minimum(y0 + box_h, height)], axis=1
    ).astype(np.int64)


def median_box_size(boxes: np.ndarray) -> tuple[int, int]:
    """Median width and height of (N, 4) boxes, rounded to whole pixels."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return int(round(np.median(b[:, 2] - b[:, 0]))), int(round(np.median(b[:, 3] - b[:, 1])))


def flags_agreement(
    given: Mapping[str, tuple[str, ...]], other: Mapping[str, tuple[str, ...]]
) -> tuple[int, int]:
    """(patients whose flags are equal in both runs, patients of `given`): a patient missing
    from `other` (its slides failed there) counts as different."""
    return sum(other.get(p) == flags for p, flags in given.items()), len(given)


def flag_counts(flags: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, dict]:
    """Per label: individuals, positive, insufficient, of one flag (patient -> flag value)."""
    out: dict[str, dict] = {}
    for patient, label in labels.items():
        row = out.setdefault(label, {"individuals": 0, "positive": 0, "insufficient": 0})
        row["individuals"] += 1
        row["positive"] += flags.get(patient) == "positive"
        row["insufficient"] += flags.get(patient) == "insufficient"
    return out


# ---------------------------------------------------------------------------------------------
# Cells of the printed tables
# ---------------------------------------------------------------------------------------------


def fmt_ratio(num: int, den: int) -> str:
    """'0.667 (2/3)', or '— (0/0)' with nothing to divide."""
    return f"{num / den:.3f} ({num}/{den})" if den else f"— ({num}/{den})"


def fmt_value(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def fmt_pct(num: int, den: int) -> str:
    return f"{100.0 * num / den:.1f} % ({num}/{den})" if den else "— (0/0)"


def class_rows(
    classes: Sequence[str], model: Mapping[str, dict], baseline: Mapping[str, dict]
) -> list[tuple[str, str, str]]:
    """(metric, model cell, baseline cell) per class: 'recall / precision' with the counts
    (true points found in cells of that class; cells called it)."""
    rows = []
    for cls in classes:
        m, b = model[cls], baseline[cls]
        rows.append(
            (
                f"{cls} recall / precision (n {m['n']})",
                f"{fmt_value(m['recall'])} / {fmt_value(m['precision'])} ({m['tp']}/{m['called']})",
                f"{fmt_value(b['recall'])} / {fmt_value(b['precision'])}",
            )
        )
    return rows


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """The masks' baseline: (H, W) bool, grey at or below its Otsu level, holes filled.

    image: RGB uint8 (H, W, 3). Stained cells are darker than the glass; filling holes adds the
    central pallor the threshold leaves out."""
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    level, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return ndi.binary_fill_holes(grey <= level)  # OpenCV puts the level itself in the dark class

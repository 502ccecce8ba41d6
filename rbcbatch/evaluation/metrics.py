"""Segmentation scores: one-to-one instance matching by IoU and foreground overlap scores.

Instance matching builds the label-pair contingency table in one pass over the pixels (integer
codes ``true * (n_pred + 1) + pred`` counted with ``np.bincount``), so cost is linear in the image
size and independent of the number of objects.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["foreground_scores", "match_instances"]

# Above this many (true, pred) cells the contingency is counted sparsely with np.unique instead of
# a dense np.bincount (2**26 int64 counts = 512 MiB would be too much memory).
_DENSE_PAIRS_MAX = 1 << 24


def _index_labels(labels: np.ndarray, keep: Iterable[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """Map label values to compact indices 1..k (0 = background or filtered out).

    Returns (index image int64 flattened, the original ids in index order, shape (k,)).
    """
    flat = np.asarray(labels).ravel()
    if flat.size and flat.min() < 0:
        raise ValueError("labels must be non-negative")
    ids = np.unique(flat) if keep is None else np.unique(np.fromiter(keep, dtype=np.int64))
    ids = ids[ids > 0].astype(np.int64)
    top = int(max(flat.max(initial=0), ids.max(initial=0)))
    lut = np.zeros(top + 1, dtype=np.int64)
    lut[ids] = np.arange(1, ids.size + 1)
    return lut[flat], ids


def _safe_ratio(num: float, den: float, empty: float) -> float:
    return float(num / den) if den > 0 else empty


def match_instances(
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    iou_threshold: float = 0.5,
    *,
    true_ids: Iterable[int] | None = None,
    pred_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """Match predicted to true instances one-to-one by IoU (>= ``iou_threshold``).

    Both inputs are integer label images of the same shape (0 = background). ``true_ids`` /
    ``pred_ids`` restrict the evaluation to those objects (e.g. only red cells); pixels of other
    objects count as background for the IoU. Pairs are matched greedily by decreasing IoU, which
    is the optimal assignment for thresholds >= 0.5 (each object then has at most one candidate).

    Returns tp, fp, fn, n_true, n_pred, precision, recall, f1 and mean_iou (mean IoU of matched
    pairs; nan when nothing matched). With no objects on either side precision/recall/f1 are 1.
    """
    pred_labels = np.asarray(pred_labels)
    true_labels = np.asarray(true_labels)
    if pred_labels.shape != true_labels.shape:
        raise ValueError(f"shape mismatch: {pred_labels.shape} vs {true_labels.shape}")
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError("iou_threshold must be in (0, 1]")
    t_idx, t_ids = _index_labels(true_labels, true_ids)
    p_idx, p_ids = _index_labels(pred_labels, pred_ids)
    n_true, n_pred = t_ids.size, p_ids.size

    area_t = np.bincount(t_idx, minlength=n_true + 1)
    area_p = np.bincount(p_idx, minlength=n_pred + 1)
    both = (t_idx > 0) & (p_idx > 0)
    codes = t_idx[both] * (n_pred + 1) + p_idx[both]
    if (n_true + 1) * (n_pred + 1) <= _DENSE_PAIRS_MAX:
        counts = np.bincount(codes, minlength=(n_true + 1) * (n_pred + 1))
        codes = np.flatnonzero(counts)
        inter = counts[codes]
    else:
        codes, inter = np.unique(codes, return_counts=True)
    ti, pi = np.divmod(codes, n_pred + 1)
    iou = inter / (area_t[ti] + area_p[pi] - inter)

    order = np.argsort(-iou, kind="stable")
    used_t = np.zeros(n_true + 1, dtype=bool)
    used_p = np.zeros(n_pred + 1, dtype=bool)
    matched: list[float] = []
    for k in order:
        if iou[k] < iou_threshold:
            break
        if used_t[ti[k]] or used_p[pi[k]]:
            continue
        used_t[ti[k]] = used_p[pi[k]] = True
        matched.append(float(iou[k]))

    tp = len(matched)
    fp, fn = n_pred - tp, n_true - tp
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_true": int(n_true),
        "n_pred": int(n_pred),
        "precision": _safe_ratio(tp, n_pred, 1.0 if n_true == 0 else 0.0),
        "recall": _safe_ratio(tp, n_true, 1.0 if n_pred == 0 else 0.0),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn, 1.0),
        "mean_iou": float(np.mean(matched)) if matched else float("nan"),
    }


def foreground_scores(pred_mask: np.ndarray, true_mask: np.ndarray) -> dict[str, float]:
    """Pixel-wise overlap of two boolean masks of equal shape.

    Returns dice, iou, precision, recall and specificity; a ratio whose denominator is empty
    (e.g. dice of two empty masks) is 1.0.
    """
    pred = np.asarray(pred_mask, dtype=bool)
    true = np.asarray(true_mask, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {true.shape}")
    tp = int(np.count_nonzero(pred & true))
    n_pred = int(np.count_nonzero(pred))
    n_true = int(np.count_nonzero(true))
    fp, fn = n_pred - tp, n_true - tp
    tn = pred.size - tp - fp - fn
    return {
        "dice": _safe_ratio(2 * tp, n_pred + n_true, 1.0),
        "iou": _safe_ratio(tp, tp + fp + fn, 1.0),
        "precision": _safe_ratio(tp, n_pred, 1.0),
        "recall": _safe_ratio(tp, n_true, 1.0),
        "specificity": _safe_ratio(tn, tn + fp, 1.0),
    }


def best_match(
    pred_labels: np.ndarray, true_labels: np.ndarray, iou_threshold: float = 0.5
) -> dict[int, int]:
    """{predicted id: true id} for pairs whose IoU reaches the threshold (one-to-one above 0.5)."""
    both = (pred_labels > 0) & (true_labels > 0)
    # One int64 key per (predicted, true) pair: a 1-d unique, ~30x faster than unique(axis=1).
    span = int(true_labels.max(initial=0)) + 1
    keys, inter = np.unique(
        pred_labels[both].astype(np.int64) * span + true_labels[both], return_counts=True
    )
    pairs = np.stack([keys // span, keys % span])
    area_p = np.bincount(pred_labels.ravel())
    area_t = np.bincount(true_labels.ravel())
    iou = inter / (area_p[pairs[0]] + area_t[pairs[1]] - inter)
    keep = iou >= iou_threshold
    return dict(zip(pairs[0][keep].tolist(), pairs[1][keep].tolist(), strict=True))

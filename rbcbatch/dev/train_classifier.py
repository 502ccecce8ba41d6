"""Training and evaluation of the learned red-cell morphology classifier (``resnet_cells``).

Data: Chula RBC-12 point labels cut into crops of a fixed size in µm (``cell_crops``), split by
image-MD5 group (``chula_split``, seed 0) so that duplicated images never straddle splits, plus
synthetic crops from ``rbcbatch.dev.synth`` at both sites for the training split only. Val picks the
epoch (macro-F1); test is only ever scored, never trained or selected on.

Generalisation across sites and stains comes from per-crop normalisation (each channel to zero
mean and unit variance) and augmentation: stain jitter in optical-density space, gamma,
brightness and contrast, blur, noise, free rotation, flips and ±10% scale. Cells are rotation
invariant, so rotations never change a label.

Heavy imports (torch, torchvision, matplotlib) stay inside functions: importing this module
is cheap.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rbcbatch.classify.crops import cell_crops
from rbcbatch.classify.resnet import crops_to_tensor, normalise_crops, predict_crops
from rbcbatch.dev.datasets import (
    CHULA_CLASSES,
    CHULA_UM_PER_PX,
    REPO,
    build_chula_arrays,
    chula_records,
    chula_split,
    shared_data_dir,
)
from rbcbatch.io.sources import read_slide
from rbcbatch.models import (
    WEIGHTS_DIR,
    ModelCard,
    card_path,
    file_sha256,
    load_model,
    save_model,
)

__all__ = [
    "classification_metrics",
    "evaluate_classifier",
    "normalise_crops",
    "predict_crops",
    "synthetic_crops",
    "train_classifier",
]

log = logging.getLogger(__name__)

# Working data (crop arrays) beside the sources; git-ignored.
CACHE_DIR = REPO / ".cache"
# Real data sets live beside the repository (same rule as tests/conftest.py).
SHARED_DATA = shared_data_dir()
SHIPPED_WEIGHTS = WEIGHTS_DIR / "resnet_cells.safetensors"

# Crop geometry: 14 µm holds a macrocyte with some context (datasets.cell_crops); 64 px of it
# is 0.219 µm/px, close to Chula's native 0.195 µm/px, so crops lose almost no detail.
CROP_UM = 14.0
OUT_PX = 64
EMBEDDING_DIM = 64  # the pipeline's per-cell embedding width (models._resnet_cells default)
SPLIT_SEED = 0  # chula_split seed of the published numbers


# Augmentation ranges. Stain: per-channel optical-density scale; the synthetic sites differ by
# up to ~x1.6 in one channel's RBC OD (synth.SITES site_a vs site_b), so ±30% per channel with a
# ±15% common strength spans the gap between them (other real stains are not measured). Scale ±10% covers pixel-size estimation error
# (estimate_um_per_px reads 0.16-0.24 on Chula images around 0.195).
OD_CHANNEL_SCALE = (0.7, 1.3)
OD_STRENGTH = (0.85, 1.15)
OD_BIAS = 0.03  # OD units, ± uniform: background tint
GAMMA = (0.8, 1.25)
CONTRAST = (0.8, 1.2)
BRIGHTNESS = 0.08  # ± uniform, intensities in [0, 1]
BLUR_P, BLUR_SIGMA_PX = 0.5, (0.3, 1.2)  # camera/focus blur at 64 px per 14 µm
NOISE_P, NOISE_SD = 0.5, 0.02
SCALE_JITTER = 0.10
SHIFT_PX = 2.0  # ± uniform: annotation clicks sit a few px off the cell centre

# Shipped configuration, chosen by short pilot runs on val macro-F1 under the ~35 min 2-core
# budget (numbers in the model card's training["pilots"]): ResNet-18 at half width (stages
# 32-256 channels) on 64 px crops. Full width is ~3.3x slower per step (0.73 vs 0.22 s per batch
# of 128, uncontended), i.e. ~8 instead of ~28 epochs in the budget.
MODEL_KWARGS: dict[str, Any] = {"width": 32, "stem_pool": True}
# The pilot measurements behind MODEL_KWARGS, OUT_PX and the class balance (copied into the card).
PILOTS: dict[str, Any] = {
    "train_step_s_per_128_uncontended": {
        "48px_width64": 0.47,
        "48px_width32": 0.14,
        "64px_width32": 0.22,
        "48px_width32_no_stem_pool": 0.37,
        "64px_width48": 0.44,
        "64px_width64": 0.73,
    },
    "val_after_4_epochs_seed0": {
        "64px_width32_sampler": {"accuracy": 0.7286, "macro_f1": 0.6047, "spherocyte": 0.868},
        "64px_width32_loss_weights": {"accuracy": 0.7286, "macro_f1": 0.5858, "spherocyte": 0.902},
        "48px_width32_sampler": {"accuracy": 0.7097, "macro_f1": 0.5681, "spherocyte": 0.872},
    },
    "tta_8_views_val_macro_f1": {"off": 0.6047, "on": 0.6139, "time": "7x"},
}
# 28 epochs of ~19.6k crops took 1987 s on the 2-core machine while another job shared it.
EPOCHS = 28
# Stop after the epoch that crosses this (seconds of training): keeps a run on a busy 2-core
# machine under ~35 min wall-clock in all.
TIME_LIMIT_S = 1950.0

# Optimiser defaults (AdamW + OneCycle).
BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 0.05
LABEL_SMOOTHING = 0.05
# Class balance: sampling (or loss) weight of a class ∝ count^-BALANCE_POWER. 0.5 halves the
# imbalance in log terms; 1.0 would repeat the 150 "other" crops ~27 times per epoch.
BALANCE_POWER = 0.5

# Synthetic crops: fields per (site, condition); each field gives ~70-120 fully visible cells.
SYNTH_FIELDS_PER_CASE = 8
SYNTH_FIELD_HW = (480, 640)
SYNTH_FULLY_VISIBLE = 0.999  # visible_fraction of an unoccluded cell (float rounding)
# Synthetic "other" objects are not Chula's "uncategorised" cells; leave them out.
SYNTH_CLASSES = tuple(c for c in CHULA_CLASSES if c != "other")

CONFUSION_PNG = REPO / "bench" / "classifier_confusion.png"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def default_chula_root() -> Path:
    """Where the Chula RBC-12 copy lives (RBCBATCH_SHARED_DATA or ../shared/data)."""
    return SHARED_DATA / "chula_rbc12"


def chula_arrays(
    root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    crop_um: float = CROP_UM,
    out_px: int = OUT_PX,
    seed: int = SPLIT_SEED,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Chula train/val/test crops: split -> (x uint8 N×px×px×3, y int64 N), cached as .npz.

    The cache folder is keyed by crop size and seed so that runs with other settings never
    read stale arrays.
    """
    root = Path(root) if root is not None else default_chula_root()
    base = Path(cache_dir) if cache_dir is not None else CACHE_DIR / "chula"
    folder = base / f"seed{seed}_{crop_um:g}um_{out_px}px"
    if not all((folder / f"{s}.npz").is_file() for s in ("train", "val", "test")):
        summary = build_chula_arrays(root, folder, seed=seed, crop_um=crop_um, out_px=out_px)
        log.info("built chula arrays in %s: %s", folder, summary)
    out = {}
    for split in ("train", "val", "test"):
        with np.load(folder / f"{split}.npz") as z:
            out[split] = (z["x"], z["y"].astype(np.int64))
    return out


def chula_test_crops(
    root: str | Path | None = None,
    crop_um: float = CROP_UM,
    out_px: int = OUT_PX,
    seed: int = SPLIT_SEED,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` (all if None) Chula test crops, straight from the images.

    Same order as ``build_chula_arrays``'s test.npz (groups in split order, points in label
    order), without touching a cache: x uint8 N×px×px×3, y int64 N.
    """
    root = Path(root) if root is not None else default_chula_root()
    groups = chula_split(chula_records(root), seed=seed)["test"]
    um_per_px = CHULA_UM_PER_PX
    xs, ys, n = [], [], 0
    for g in groups:
        if limit is not None and n >= limit:
            break
        pts = g["points"] if limit is None else g["points"][: limit - n]
        image = read_slide(str(g["image_id"]), g["path"])
        xs.append(cell_crops(image, pts, um_per_px, crop_um, out_px))
        ys.append(pts[:, 2].astype(np.int64))
        n += len(pts)
    if not xs:
        return np.empty((0, out_px, out_px, 3), np.uint8), np.empty(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def synthetic_crops(
    seed: int = SPLIT_SEED,
    fields_per_case: int = SYNTH_FIELDS_PER_CASE,
    crop_um: float = CROP_UM,
    out_px: int = OUT_PX,
) -> tuple[np.ndarray, np.ndarray]:
    """Crops of fully visible, non-border synthetic red cells: (x uint8 N×px×px×3, y int64 N).

    Fields come from both sites and all conditions, each cropped at its own µm/px. Half of the
    fields use a patient profile whose cell mix is flat over the synthetic classes, so that
    rare classes (macrocytes, schistocytes) are not swamped by normal cells. Labels are
    CHULA_CLASSES ids (the synthetic class names are a subset).
    """
    from rbcbatch.dev.synth import CELL_TYPES, CONDITIONS, SITES, patient_profile, render_field

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    drawn = [c for c in CELL_TYPES if c in SYNTH_CLASSES]  # classes the generator can draw
    flat = {c: 1.0 / len(drawn) for c in drawn}
    for site, site_p in SITES.items():
        for condition in CONDITIONS:
            for i in range(fields_per_case):
                profile = patient_profile(rng, condition)
                if i % 2:
                    profile = {**profile, "mix": {**dict.fromkeys(profile["mix"], 0.0), **flat}}
                fld = render_field(rng, condition, site, *SYNTH_FIELD_HW, profile=profile)
                cells = [
                    c
                    for c in fld.cells
                    if c["kind"] == "rbc"
                    and c["cell_class"] in SYNTH_CLASSES
                    and c["visible_fraction"] >= SYNTH_FULLY_VISIBLE
                    and not c["touches_border"]
                ]
                if not cells:
                    continue
                pts = np.asarray([[c["centroid_x"], c["centroid_y"]] for c in cells])
                xs.append(cell_crops(fld.image, pts, site_p["um_per_px"], crop_um, out_px))
                ys.append([CHULA_CLASSES.index(c["cell_class"]) for c in cells])
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Tensors, normalisation and augmentation
# ---------------------------------------------------------------------------------------------


def _uniform(gen, n: int, lo: float, hi: float, *shape: int):
    """Uniform float32 tensor (n, *shape) in [lo, hi) from a torch generator."""
    import torch

    return lo + (hi - lo) * torch.rand((n, *shape), generator=gen)


def _stain_jitter(x, gen):
    """Random stain strength/hue in optical-density space, then gamma, contrast, brightness."""
    n = x.shape[0]
    od = -((x * 255.0 + 1.0) / 256.0).log()
    scale = _uniform(gen, n, *OD_CHANNEL_SCALE, 3, 1, 1) * _uniform(gen, n, *OD_STRENGTH, 1, 1, 1)
    od = od * scale + _uniform(gen, n, -OD_BIAS, OD_BIAS, 3, 1, 1)
    x = ((256.0 * (-od).exp() - 1.0) / 255.0).clamp(0.0, 1.0)
    x = x ** _uniform(gen, n, *GAMMA, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * _uniform(gen, n, *CONTRAST, 1, 1, 1) + mean
    return (x + _uniform(gen, n, -BRIGHTNESS, BRIGHTNESS, 1, 1, 1)).clamp(0.0, 1.0)


def _blur_noise(x, gen):
    """Gaussian blur (random sigma, per crop) on a random half, noise on another."""
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    sigma = _uniform(gen, n, *BLUR_SIGMA_PX)
    radius = math.ceil(3 * BLUR_SIGMA_PX[1])
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (n, 2r+1)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (crop, channel)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c).reshape(n, c, h, w)
    blur = torch.rand(n, generator=gen) < BLUR_P
    x = torch.where(blur[:, None, None, None], y, x)
    noisy = (torch.rand(n, generator=gen) < NOISE_P).float()[:, None, None, None]
    sd = _uniform(gen, n, 0.0, NOISE_SD, 1, 1, 1) * noisy
    return (x + sd * torch.randn(x.shape, generator=gen)).clamp(0.0, 1.0)


def _geometry(x, gen):
    """Free rotation, random flip, ±10% scale and a small shift, reflect-padded."""
    import torch
    import torch.nn.functional as F

    n, _, h, _ = x.shape
    angle = _uniform(gen, n, 0.0, 2.0 * math.pi)
    scale = _uniform(gen, n, 1.0 - SCALE_JITTER, 1.0 + SCALE_JITTER)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = _uniform(gen, n, -SHIFT_PX, SHIFT_PX, 2) * (2.0 / h)
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
            torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(x, gen):
    """Training augmentation of float N×3×H×W in [0, 1] (same shape); ``gen`` a torch.Generator."""
    return _geometry(_blur_noise(_stain_jitter(x, gen), gen), gen)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 (C, C): rows true class, columns predicted class."""
    idx = y_true.astype(np.int64) * n_classes + y_pred.astype(np.int64)
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: tuple[str, ...] | list[str] = CHULA_CLASSES
) -> dict[str, Any]:
    """Accuracy, macro-F1 over all classes and per-class recall/F1 (keyed by name).

    A class without support and without predictions scores F1 0 (counted in the macro mean, so
    a subset lacking classes reads low: compare subsets only with themselves).
    """
    n = len(classes)
    cm = confusion_matrix(y_true, y_pred, n)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    return {
        "n": int(cm.sum()),
        "accuracy": round(float(tp.sum() / max(cm.sum(), 1)), 4),
        "macro_f1": round(float(f1.mean()), 4),
        "recall": {c: round(float(r), 4) for c, r in zip(classes, recall, strict=True)},
        "f1": {c: round(float(v), 4) for c, v in zip(classes, f1, strict=True)},
        "confusion": cm.tolist(),
    }


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts, as a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(9, 8), dpi=110)
    ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(len(classes)):
        for j in range(len(classes)):
            if cm[i, j]:
                colour = "white" if rows[i, j] > 0.5 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (row-normalised colour, counts in cells)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def _predict_labels(model, x: np.ndarray) -> np.ndarray:
    return predict_crops(model, x)[0].argmax(axis=1)


def evaluate_classifier(
    weights: str | Path = "resnet_cells",
    subset: int | None = None,
    root: str | Path | None = None,
    confusion_png: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of a classifier on the Chula test split (or its first ``subset`` crops).

    Crops are cut at the card's geometry (input_px, um_per_px × input_px µm) with the card's
    split seed. Returns classification_metrics plus the weights path; with ``confusion_png``
    the confusion matrix is also drawn there.
    """
    import torch

    model, card = load_model(weights)
    crop_um = card.um_per_px * card.input_px
    seed = int(card.training.get("split_seed", SPLIT_SEED))
    x, y = chula_test_crops(root, crop_um, card.input_px, seed, limit=subset)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    metrics = classification_metrics(y, _predict_labels(model, x), card.classes)
    metrics["weights"] = str(weights)
    if confusion_png is not None:
        title = f"{card.name} on Chula test ({metrics['n']} crops)"
        plot_confusion(np.asarray(metrics["confusion"]), card.classes, Path(confusion_png), title)
    return metrics


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU) RNGs."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weights(y: np.ndarray, n_classes: int, power: float = BALANCE_POWER) -> np.ndarray:
    """Per-class weight ∝ count^-power, scaled to mean 1 over the samples: float64 (C,)."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, np.maximum(counts, 1.0) ** -power, 0.0)
    return w / (w[y].mean())


def _epoch_indices(
    rng: np.random.Generator, y: np.ndarray, balance: str, n_classes: int
) -> np.ndarray:
    """Sample order for one epoch: a permutation, or class-weighted draws with replacement."""
    if balance != "sampler":
        return rng.permutation(len(y))
    p = class_weights(y, n_classes)[y]
    return rng.choice(len(y), size=len(y), replace=True, p=p / p.sum())


def build_model(num_classes: int, embedding_dim: int = EMBEDDING_DIM, **kwargs: Any):
    """The ``resnet_cells`` architecture with the card's kwargs."""
    from rbcbatch.models import ARCHITECTURES

    return ARCHITECTURES["resnet_cells"](
        num_classes=num_classes, embedding_dim=embedding_dim, **kwargs
    )


def _train_epoch(model, opt, sched, loss_fn, x, y, order, gen) -> float:
    """One pass over ``order`` (indices into x uint8 / y int64); returns the mean loss."""
    import torch

    model.train()
    total, seen = 0.0, 0
    for start in range(0, len(order) - BATCH + 1, BATCH):  # drop the ragged last batch (BN)
        idx = np.sort(order[start : start + BATCH])
        xb = normalise_crops(augment(crops_to_tensor(x[idx]), gen))
        yb = torch.from_numpy(y[idx])
        logits, _ = model(xb)
        loss = loss_fn(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def _half_copy(model):
    """A float16 copy of the model for a compact weights file (load casts back to float32)."""
    import copy

    return copy.deepcopy(model).half()


def train_classifier(
    root: str | Path | None = None,
    out: str | Path = SHIPPED_WEIGHTS,
    epochs: int = EPOCHS,
    out_px: int = OUT_PX,
    crop_um: float = CROP_UM,
    balance: str = "sampler",
    synth_fields_per_case: int = SYNTH_FIELDS_PER_CASE,
    model_kwargs: dict[str, Any] | None = None,
    lr: float = LR,
    seed: int = SPLIT_SEED,
    threads: int = 2,
    time_limit_s: float | None = TIME_LIMIT_S,
    max_train: int | None = None,
    cache_dir: str | Path | None = None,
    confusion_png: str | Path | None = CONFUSION_PNG,
    progress: Callable[[str], None] = print,
) -> ModelCard:
    """Train ``resnet_cells`` on Chula train (+ synthetic crops), select on val, score on test.

    ``balance``: "sampler" (class-weighted sampling with replacement), "loss" (class-weighted
    cross-entropy) or "none". ``time_limit_s`` stops training after the epoch that crosses it
    (the schedule is not shortened, so the run is then not the seeded one: logged and stored in
    the card). ``max_train`` keeps a random subset of Chula train (pilot runs). Writes weights
    (float16 safetensors) + card to ``out`` and returns the card.
    """
    # OpenMP threads that spin while waiting starve a CPU shared with other jobs: 2 threads
    # took 4.0 s per batch with PASSIVE unset vs 0.45 s with it (64 px, width 32, one other
    # 2-thread job on the 2 cores). Only effective when torch is not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    start_wall = time.perf_counter()
    torch.set_num_threads(threads)
    seed_everything(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n_cls = len(CHULA_CLASSES)

    data = chula_arrays(root, cache_dir, crop_um, out_px, SPLIT_SEED)
    x_tr, y_tr = data["train"]
    if max_train is not None and max_train < len(y_tr):
        keep = np.sort(rng.choice(len(y_tr), max_train, replace=False))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    n_chula = len(y_tr)
    x_syn, y_syn = (
        synthetic_crops(seed, synth_fields_per_case, crop_um, out_px)
        if synth_fields_per_case > 0
        else (np.empty((0, out_px, out_px, 3), np.uint8), np.empty(0, np.int64))
    )
    x_tr, y_tr = np.concatenate([x_tr, x_syn]), np.concatenate([y_tr, y_syn])
    x_val, y_val = data["val"]
    progress(f"train {n_chula} chula + {len(y_syn)} synthetic crops, val {len(y_val)}")

    kwargs = {"num_classes": n_cls, "embedding_dim": EMBEDDING_DIM, **MODEL_KWARGS}
    kwargs.update(model_kwargs or {})
    model = build_model(**kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps = epochs * (len(y_tr) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    weight = (
        torch.tensor(class_weights(y_tr, n_cls), dtype=torch.float32) if balance == "loss" else None
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=LABEL_SMOOTHING)

    best_f1, best_state, best_epoch, history = -1.0, None, -1, []
    train_start, stopped_early = time.perf_counter(), False
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = _epoch_indices(rng, y_tr, balance, n_cls)
        loss = _train_epoch(model, opt, sched, loss_fn, x_tr, y_tr, order, gen)
        val = classification_metrics(y_val, _predict_labels(model, x_val))
        history.append(
            {"epoch": epoch + 1, "loss": round(loss, 4), "val_acc": val["accuracy"],
             "val_macro_f1": val["macro_f1"], "seconds": round(time.perf_counter() - t0, 1)}
        )  # fmt: skip
        progress(str(history[-1]))
        if val["macro_f1"] > best_f1:
            best_f1, best_epoch = val["macro_f1"], epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if time_limit_s is not None and time.perf_counter() - train_start > time_limit_s:
            stopped_early = epoch + 1 < epochs
            progress(f"time limit reached after epoch {epoch + 1}")
            break
    train_s = time.perf_counter() - train_start
    model.load_state_dict(best_state)

    card = ModelCard(
        name="resnet_cells",
        task="classifier",
        architecture="resnet_cells",
        kwargs=kwargs,
        classes=list(CHULA_CLASSES),
        um_per_px=crop_um / out_px,
        input_px=out_px,
        training={
            "data": {
                "chula_rbc12": f"train split, {n_chula} crops ({crop_um:g} µm at {out_px} px, "
                f"source {CHULA_UM_PER_PX} µm/px)",
                "synthetic": f"{len(y_syn)} crops of fully visible non-border RBCs from "
                f"rbcbatch.dev.synth fields, {synth_fields_per_case} per site x condition (half "
                "with a flat class mix), each cropped at its site's um/px; training only",
            },
            "split": "chula_split by image-MD5 group (duplicates never straddle splits), "
            "fractions 0.7/0.15/0.15; val selects the epoch, test only scored",
            "split_seed": SPLIT_SEED,
            "seed": seed,
            "crop_um": crop_um,
            "epochs": epochs,
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "stopped_by_time_limit": stopped_early,
            "batch": BATCH,
            "optimizer": f"AdamW lr {lr:g} wd {WEIGHT_DECAY:g}, OneCycle pct_start 0.2",
            "loss": f"cross-entropy, label smoothing {LABEL_SMOOTHING:g}",
            "class_balance": f"{balance}, weight ∝ count^-{BALANCE_POWER:g}",
            "augmentation": (
                f"OD-space stain jitter (channel x{OD_CHANNEL_SCALE}, strength x{OD_STRENGTH}, "
                f"bias ±{OD_BIAS}), gamma {GAMMA}, contrast {CONTRAST}, brightness "
                f"±{BRIGHTNESS}, blur p{BLUR_P} sigma {BLUR_SIGMA_PX} px, noise p{NOISE_P} "
                f"sd<{NOISE_SD}, free rotation, flip, scale ±{SCALE_JITTER:.0%}, shift "
                f"±{SHIFT_PX:g} px; per-crop per-channel standardisation"
            ),
            "pilots": PILOTS,
            "history": history,
            "train_wall_s": round(train_s, 1),
            "machine": f"2-core CPU ({platform.machine()}), torch {torch.__version__}, "
            f"{threads} threads",
            "weights_dtype": "float16 (loaded as float32)",
        },
    )
    out = Path(out)
    save_model(_half_copy(model), card, out)
    return _score_and_finalise(out, card, root, confusion_png, start_wall, progress)


def _score_and_finalise(
    out: Path,
    card: ModelCard,
    root: str | Path | None,
    confusion_png: str | Path | None,
    start_wall: float,
    progress: Callable[[str], None],
) -> ModelCard:
    """Score the saved (float16) weights on val, test and the test subset; rewrite the card."""
    model, _ = load_model(out)
    crop_um = card.training["crop_um"]
    data = chula_arrays(root, None, crop_um, card.input_px, SPLIT_SEED)
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        x, y = data[split]
        m = classification_metrics(y, _predict_labels(model, x))
        metrics[split] = {k: m[k] for k in ("n", "accuracy", "macro_f1", "recall", "f1")}
        if split == "test":
            metrics[split]["confusion"] = m["confusion"]
            if confusion_png is not None:
                title = f"resnet_cells on Chula test ({m['n']} crops), macro-F1 {m['macro_f1']}"
                plot_confusion(np.asarray(m["confusion"]), card.classes, Path(confusion_png), title)
        progress(f"{split}: acc {m['accuracy']} macro-F1 {m['macro_f1']} recall {m['recall']}")
    n_sub = 300
    x_sub, y_sub = chula_test_crops(root, crop_um, card.input_px, SPLIT_SEED, limit=n_sub)
    sub = classification_metrics(y_sub, _predict_labels(model, x_sub))
    metrics[f"subset_{n_sub}"] = {
        "what": f"first {n_sub} Chula test crops (chula_test_crops order)",
        "n": sub["n"],
        "accuracy": sub["accuracy"],
        "macro_f1": sub["macro_f1"],
    }
    training = {**card.training, "total_wall_s": round(time.perf_counter() - start_wall, 1)}
    # The weights stay as saved; only the card is rewritten, with their sha256.
    final = replace(card, metrics=metrics, training=training, sha256=file_sha256(out))
    card_path(out).write_text(final.to_json())
    return final

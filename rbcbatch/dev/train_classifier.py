"""Training and evaluation of the learned red-cell morphology classifier (``resnet_cells``).

Data (``dev.classifier_data``): Chula RBC-12 point labels, split by image-MD5 group
(``chula_split``, seed 0) so that duplicated images never straddle splits; normal controls from
two other laboratories (PBC healthy donors' training split, AneRBC-I healthy 001-003); and
synthetic crops for the training split only. Every crop is cut as the pipeline cuts it: the
image segmented and measured by the default stages, crops of fixed µm stain-normalised against
the image's own red cells (``classify.crops.slide_crops``). Val (Chula) picks the epoch
(macro-F1); test is only ever scored, never trained or selected on.

Generalisation to other sites comes from the per-slide stain normalisation, from the controls of
other laboratories, and from augmentation: residual stain jitter in optical-density space, gamma,
brightness and contrast, blur, noise, JPEG re-compression, free rotation, flips and ±15% scale.
Crops are standardised with fixed per-channel constants (not per crop), so a cell's density
against its slide survives. A run checkpoints after every epoch and resumes from there.

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

from rbcbatch.classify.crops import cell_crops, slide_crops
from rbcbatch.classify.resnet import (
    card_input,
    crops_to_tensor,
    fixed_standardisation,
    normalise_crops,
    predict_crops,
)
from rbcbatch.dev.classifier_data import (
    chula_slide_arrays,
    control_arrays,
    measure_image,
    synthetic_slide_arrays,
)
from rbcbatch.dev.datasets import (
    CHULA_CLASSES,
    CHULA_UM_PER_PX,
    REPO,
    chula_records,
    chula_split,
    shared_data_dir,
)
from rbcbatch.engine.config import Models, RunConfig
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
    "train_classifier",
]

log = logging.getLogger(__name__)

# Working data (crop arrays) beside the sources; git-ignored.
CACHE_DIR = REPO / ".cache"
# Real data sets live beside the repository (same rule as tests/conftest.py).
SHARED_DATA = shared_data_dir()
SHIPPED_WEIGHTS = WEIGHTS_DIR / "resnet_cells.safetensors"
# Where a run keeps its after-every-epoch checkpoint (resumed with resume=True).
CHECKPOINT = CACHE_DIR / "train" / "resnet_cells.ckpt"

# Crop geometry: 14 µm holds a macrocyte with some context (datasets.cell_crops); 64 px of it
# is 0.219 µm/px, close to Chula's native 0.195 µm/px, so crops lose almost no detail.
CROP_UM = 14.0
OUT_PX = 64
EMBEDDING_DIM = 64  # the pipeline's per-cell embedding width (models._resnet_cells default)
SPLIT_SEED = 0  # chula_split seed of the published numbers


# Augmentation ranges. Crops are already stain-normalised per slide, so the stain jitter only
# covers what that leaves (a slide's stain is not one OD scale per channel): ±10% per channel
# and ±10% in strength, kept below the density gap between a spherocyte and its slide's
# discocytes, which is the cue. Scale ±15% covers the site's pixel-size estimate (its 95%
# interval must lie within ±10%) and cell-size variation between people.
OD_CHANNEL_SCALE = (0.9, 1.1)
OD_STRENGTH = (0.9, 1.1)
OD_BIAS = 0.02  # OD units, ± uniform: background tint
GAMMA = (0.9, 1.1)
CONTRAST = (0.9, 1.1)
BRIGHTNESS = 0.04  # ± uniform, intensities in [0, 1]
BLUR_P, BLUR_SIGMA_PX = 0.5, (0.3, 1.5)  # camera/focus blur at 64 px per 14 µm
NOISE_P, NOISE_SD = 0.5, 0.02
JPEG_P, JPEG_QUALITY = 0.3, (40, 95)  # archives keep smears as JPEG at many qualities
SCALE_JITTER = 0.15
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
# 28 epochs of ~19.6k crops took 1987 s on the 2-core machine while another job shared it;
# this run has ~27k crops an epoch and checkpoints, so it may run longer and resume.
EPOCHS = 40
# No limit by default: a run checkpoints every epoch and resumes (resume=True).
TIME_LIMIT_S: float | None = None
# Crops for the fixed per-channel standardisation constants (a seeded sample of the training set).
STANDARDISE_SAMPLE = 4000

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

CONFUSION_PNG = REPO / "bench" / "classifier_confusion.png"


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def default_chula_root() -> Path:
    """Where the Chula RBC-12 copy lives (RBCBATCH_SHARED_DATA or ../shared/data)."""
    return SHARED_DATA / "chula_rbc12"


def chula_test_crops(
    root: str | Path | None = None,
    crop_um: float = CROP_UM,
    out_px: int = OUT_PX,
    seed: int = SPLIT_SEED,
    limit: int | None = None,
    stain: str = "slide",
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` (all if None) Chula test crops, straight from the images.

    Same order as ``chula_slide_arrays``'s test split (groups in split order, points in label
    order), without touching a cache: x uint8 N×px×px×3, y int64 N. ``stain`` "slide" cuts
    them as the pipeline does for current weights (each image segmented and measured, crops
    stain-normalised against it); "none" as scanned (the first weights).
    """
    root = Path(root) if root is not None else default_chula_root()
    groups = chula_split(chula_records(root), seed=seed)["test"]
    models = Models(RunConfig())
    xs, ys, n = [], [], 0
    for g in groups:
        if limit is not None and n >= limit:
            break
        pts = g["points"] if limit is None else g["points"][: limit - n]
        image = read_slide(str(g["image_id"]), g["path"])
        if stain == "slide":
            columns, _ = measure_image(image, CHULA_UM_PER_PX, models)
            xs.append(slide_crops(image, pts, columns, CHULA_UM_PER_PX, crop_um, out_px))
        else:
            xs.append(cell_crops(image, pts, CHULA_UM_PER_PX, crop_um, out_px))
        ys.append(pts[:, 2].astype(np.int64))
        n += len(pts)
    if not xs:
        return np.empty((0, out_px, out_px, 3), np.uint8), np.empty(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def training_sources(
    crop_um: float,
    out_px: int,
    synth_fields_per_case: int,
    seed: int,
    progress: Callable,
    data: Path | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every training source by name -> (x uint8, y int64), Chula val/test apart."""
    chula = chula_slide_arrays(crop_um, out_px, SPLIT_SEED, progress, data)
    sources = {
        "chula_train": chula["train"],
        "chula_val": chula["val"],
        "chula_test": chula["test"],
    }
    for name, arrays in control_arrays(crop_um, out_px, seed, progress, data).items():
        sources[f"control_{name}"] = arrays
    if synth_fields_per_case > 0:
        sources["synthetic"] = synthetic_slide_arrays(crop_um, out_px, synth_fields_per_case, seed)
    return sources


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


def jpeg_recompress(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random JPEG_P of uint8 N×H×W×3 crops encoded and decoded at a random quality."""
    import cv2

    out = x.copy()
    for i in np.flatnonzero(rng.random(len(x)) < JPEG_P):
        quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        ok, buf = cv2.imencode(".jpg", x[i][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            out[i] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return out


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


def _predict_labels(model, x: np.ndarray, input_spec: dict) -> np.ndarray:
    probs, _ = predict_crops(model, x, standardise=fixed_standardisation(input_spec))
    return probs.argmax(axis=1)


def evaluate_classifier(
    weights: str | Path = "resnet_cells",
    subset: int | None = None,
    root: str | Path | None = None,
    confusion_png: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of a classifier on the Chula test split (or its first ``subset`` crops).

    Crops are cut as the card says (input_px, um_per_px × input_px µm, stain normalisation)
    with the card's split seed. Returns classification_metrics plus the weights path; with
    ``confusion_png`` the confusion matrix is also drawn there.
    """
    import torch

    model, card = load_model(weights)
    spec = card_input(card)
    crop_um = card.um_per_px * card.input_px
    seed = int(card.training.get("split_seed", SPLIT_SEED))
    x, y = chula_test_crops(root, crop_um, card.input_px, seed, limit=subset, stain=spec["stain"])
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    metrics = classification_metrics(y, _predict_labels(model, x, spec), card.classes)
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


def _train_epoch(model, opt, sched, loss_fn, x, y, order, gen, rng, fixed) -> float:
    """One pass over ``order`` (indices into x uint8 / y int64); returns the mean loss.

    Augmentation runs on the CPU (its random streams stay the same wherever the model is);
    the network steps on the model's device."""
    import torch

    device = next(model.parameters()).device
    model.train()
    total, seen = 0.0, 0
    for start in range(0, len(order) - BATCH + 1, BATCH):  # drop the ragged last batch (BN)
        idx = np.sort(order[start : start + BATCH])
        xb = augment(crops_to_tensor(jpeg_recompress(x[idx], rng)), gen)
        logits, _ = model(normalise_crops(xb, fixed).to(device, non_blocking=True))
        loss = loss_fn(logits, torch.from_numpy(y[idx]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def _machine(threads: int) -> str:
    """Where the network was trained, for the card."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU, torch {torch.__version__}, {threads} threads"


def _half_copy(model):
    """A float16 copy of the model for a compact weights file (load casts back to float32)."""
    import copy

    return copy.deepcopy(model).half()


def channel_statistics(x: np.ndarray, seed: int, n: int = STANDARDISE_SAMPLE) -> dict:
    """Per-channel mean and SD (intensities in [0, 1]) of a seeded sample of uint8 crops."""
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(len(x), min(n, len(x)), replace=False))].astype(np.float64)
    sample /= 255.0
    return {
        "mean": [round(float(v), 4) for v in sample.mean(axis=(0, 1, 2))],
        "sd": [round(float(v), 4) for v in sample.std(axis=(0, 1, 2))],
    }


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, settings: dict) -> dict | None:
    """The checkpoint at ``path`` if it was written with the same settings; refuses another.
    Tensors load onto the CPU (the model and optimiser copy them to their device), so a run
    begun on a GPU can go on on a CPU and back."""
    import torch

    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False, map_location="cpu")
    if state["settings"] != settings:
        raise ValueError(
            f"checkpoint {path} was written with other settings ({state['settings']}); "
            "delete it or train with those settings"
        )
    return state


def fit_classifier(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    input_spec: dict,
    settings: dict,
    ckpt_path: Path | None,
    resume: bool,
    time_limit_s: float | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The training loop: model (best val macro-F1 epoch), history, best_epoch, trained_s,
    stopped_early. Saves model, optimiser, schedule and random states to ``ckpt_path`` after
    every epoch; with ``resume`` goes on from there, so an interrupted run ends with the
    same weights as one that was never stopped (same settings only)."""
    import torch

    x_tr, y_tr = train
    x_val, y_val = val
    epochs, balance, lr = settings["epochs"], settings["balance"], settings["lr"]
    n_cls = settings["kwargs"]["num_classes"]
    fixed = fixed_standardisation(input_spec)
    seed_everything(settings["seed"])
    rng = np.random.default_rng(settings["seed"])
    gen = torch.Generator().manual_seed(settings["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(**settings["kwargs"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps = epochs * (len(y_tr) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    weight = (
        torch.tensor(class_weights(y_tr, n_cls), dtype=torch.float32, device=device)
        if balance == "loss"
        else None
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=LABEL_SMOOTHING)

    state = _load_checkpoint(ckpt_path, settings) if resume and ckpt_path is not None else None
    best = {"f1": -1.0, "epoch": -1, "state": None}
    history: list[dict] = []
    trained_s = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        best, history, trained_s = state["best"], state["history"], state["trained_s"]
        progress(f"resumed from {ckpt_path} after epoch {len(history)}")

    call_start, stopped_early = time.perf_counter(), False
    for epoch in range(len(history), epochs):
        t0 = time.perf_counter()
        order = _epoch_indices(rng, y_tr, balance, n_cls)
        loss = _train_epoch(model, opt, sched, loss_fn, x_tr, y_tr, order, gen, rng, fixed)
        val = classification_metrics(y_val, _predict_labels(model, x_val, input_spec))
        history.append(
            {"epoch": epoch + 1, "loss": round(loss, 4), "val_acc": val["accuracy"],
             "val_macro_f1": val["macro_f1"], "val_spherocyte_recall": val["recall"]["spherocyte"],
             "seconds": round(time.perf_counter() - t0, 1)}
        )  # fmt: skip
        trained_s += time.perf_counter() - t0
        progress(str(history[-1]))
        if val["macro_f1"] > best["f1"]:
            best = {"f1": val["macro_f1"], "epoch": epoch + 1,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}  # fmt: skip
        if ckpt_path is not None:
            _save_checkpoint(
                ckpt_path,
                {"settings": settings, "model": model.state_dict(), "opt": opt.state_dict(),
                 "sched": sched.state_dict(), "rng": rng.bit_generator.state,
                 "gen": gen.get_state(), "best": best, "history": history,
                 "trained_s": trained_s},
            )  # fmt: skip
        if time_limit_s is not None and time.perf_counter() - call_start > time_limit_s:
            stopped_early = epoch + 1 < epochs
            progress(f"time limit reached after epoch {epoch + 1}")
            break
    model.load_state_dict(best["state"])
    model.cpu()
    return {"model": model, "history": history, "best_epoch": best["epoch"],
            "trained_s": trained_s, "stopped_early": stopped_early}  # fmt: skip


def train_classifier(
    data: str | Path | None = None,
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
    checkpoint: str | Path | None = CHECKPOINT,
    resume: bool = False,
    confusion_png: str | Path | None = CONFUSION_PNG,
    progress: Callable[[str], None] = print,
) -> ModelCard:
    """Train ``resnet_cells`` on Chula train + normal controls (+ synthetic crops), select on
    Chula val, score on Chula test.

    ``data``: the folder of the real data sets (default ../shared/data or
    $RBCBATCH_SHARED_DATA). ``balance``: "sampler" (class-weighted sampling with replacement), "loss" (class-weighted
    cross-entropy) or "none". The model, optimiser, schedule and random states are saved to
    ``checkpoint`` after every epoch; ``resume`` goes on from there (same settings only).
    ``time_limit_s`` stops after the epoch that crosses it (this call's time; the checkpoint
    stays, so a later ``resume`` finishes the schedule). ``max_train`` keeps a random subset of
    the training crops (pilot runs). Writes weights (float16 safetensors) + card to ``out``
    when the schedule is done or the limit is hit, and returns the card.
    """
    # OpenMP threads that spin while waiting starve a CPU shared with other jobs: 2 threads
    # took 4.0 s per batch with PASSIVE unset vs 0.45 s with it (64 px, width 32, one other
    # 2-thread job on the 2 cores). Only effective when torch is not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    start_wall = time.perf_counter()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    n_cls = len(CHULA_CLASSES)

    data = Path(data) if data is not None else None
    sources = training_sources(crop_um, out_px, synth_fields_per_case, seed, progress, data)
    train_names = [k for k in sources if k not in ("chula_val", "chula_test")]
    x_tr = np.concatenate([sources[k][0] for k in train_names])
    y_tr = np.concatenate([sources[k][1] for k in train_names])
    if max_train is not None and max_train < len(y_tr):
        keep = np.sort(rng.choice(len(y_tr), max_train, replace=False))
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    x_val, y_val = sources["chula_val"]
    counts = {k: len(sources[k][1]) for k in sources}
    progress(f"crops per source {counts}; training on {len(y_tr)}")
    input_spec = {"stain": "slide", "standardise": "fixed", **channel_statistics(x_tr, seed)}

    kwargs = {"num_classes": n_cls, "embedding_dim": EMBEDDING_DIM, **MODEL_KWARGS}
    kwargs.update(model_kwargs or {})
    settings = {"epochs": epochs, "out_px": out_px, "crop_um": crop_um, "balance": balance,
                "lr": lr, "seed": seed, "kwargs": kwargs, "n_train": len(y_tr)}  # fmt: skip
    fit = fit_classifier(
        (x_tr, y_tr),
        (x_val, y_val),
        input_spec,
        settings,
        Path(checkpoint) if checkpoint is not None else None,
        resume,
        time_limit_s,
        progress,
    )
    model, history, best_epoch = fit["model"], fit["history"], fit["best_epoch"]

    sources_card = {
        "chula_rbc12": f"train split, {counts['chula_train']} crops ({crop_um:g} µm at {out_px} "
        f"px, source {CHULA_UM_PER_PX} µm/px)",
        "controls": {
            "pbc": f"{counts['control_pbc']} red cells of the PBC training split (every image "
            "not held back), labelled normal",
            "anerbc": f"{counts['control_anerbc']} red cells of AneRBC-I healthy 001-003, "
            "labelled normal",
            "what": "fully visible red cells with contact_fraction <= 0.3 from the default "
            "segmenter, at the group's estimated pixel size; weak labels",
        },
        "synthetic": f"{counts.get('synthetic', 0)} crops of fully visible non-border RBCs from "
        f"rbcbatch.dev.synth fields, {synth_fields_per_case} per site x condition (half with "
        "a flat class mix), each cropped at its site's um/px; training only",
    }
    card = ModelCard(
        name="resnet_cells",
        task="classifier",
        architecture="resnet_cells",
        kwargs=kwargs,
        classes=list(CHULA_CLASSES),
        um_per_px=crop_um / out_px,
        input_px=out_px,
        training={
            "data": sources_card,
            "input": input_spec,
            "split": "chula_split by image-MD5 group (duplicates never straddle splits), "
            "fractions 0.7/0.15/0.15; Chula val selects the epoch, test only scored; held out "
            "of every source: AneRBC-I 004-006 and the PBC held-back split",
            "split_seed": SPLIT_SEED,
            "seed": seed,
            "crop_um": crop_um,
            "epochs": epochs,
            "epochs_run": len(history),
            "best_epoch": best_epoch,
            "stopped_by_time_limit": fit["stopped_early"],
            "batch": BATCH,
            "optimizer": f"AdamW lr {lr:g} wd {WEIGHT_DECAY:g}, OneCycle pct_start 0.2",
            "loss": f"cross-entropy, label smoothing {LABEL_SMOOTHING:g}",
            "class_balance": f"{balance}, weight ∝ count^-{BALANCE_POWER:g}",
            "augmentation": (
                f"per-slide stain normalisation (classify.crops.slide_crops), then OD-space "
                f"stain jitter (channel x{OD_CHANNEL_SCALE}, strength x{OD_STRENGTH}, bias "
                f"±{OD_BIAS}), gamma {GAMMA}, contrast {CONTRAST}, brightness ±{BRIGHTNESS}, "
                f"blur p{BLUR_P} sigma {BLUR_SIGMA_PX} px, noise p{NOISE_P} sd<{NOISE_SD}, "
                f"JPEG p{JPEG_P} quality {JPEG_QUALITY}, free rotation, flip, scale "
                f"±{SCALE_JITTER:.0%}, shift ±{SHIFT_PX:g} px; fixed per-channel "
                "standardisation"
            ),
            "pilots": PILOTS,
            "history": history,
            "train_wall_s": round(fit["trained_s"], 1),
            "machine": _machine(threads),
            "weights_dtype": "float16 (loaded as float32)",
        },
    )
    out = Path(out)
    save_model(_half_copy(model), card, out)
    chula_root = data / "chula_rbc12" if data is not None else None
    return _score_and_finalise(out, card, sources, chula_root, start_wall, confusion_png, progress)


def _score_and_finalise(
    out: Path,
    card: ModelCard,
    sources: dict[str, tuple[np.ndarray, np.ndarray]],
    data_root: Path | None,
    start_wall: float,
    confusion_png: str | Path | None,
    progress: Callable[[str], None],
) -> ModelCard:
    """Score the saved (float16) weights on Chula val, test and the test subset; rewrite the card."""
    model, _ = load_model(out)
    spec = card_input(card)
    metrics: dict[str, Any] = {}
    for split in ("val", "test"):
        x, y = sources[f"chula_{split}"]
        m = classification_metrics(y, _predict_labels(model, x, spec))
        metrics[split] = {k: m[k] for k in ("n", "accuracy", "macro_f1", "recall", "f1")}
        if split == "test":
            metrics[split]["confusion"] = m["confusion"]
            if confusion_png is not None:
                title = f"resnet_cells on Chula test ({m['n']} crops), macro-F1 {m['macro_f1']}"
                plot_confusion(np.asarray(m["confusion"]), card.classes, Path(confusion_png), title)
        progress(f"{split}: acc {m['accuracy']} macro-F1 {m['macro_f1']} recall {m['recall']}")
    n_sub = 300
    x_sub, y_sub = chula_test_crops(
        data_root, card.training["crop_um"], card.input_px, SPLIT_SEED, limit=n_sub
    )
    sub = classification_metrics(y_sub, _predict_labels(model, x_sub, spec))
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

"""The learned morphology classifier: µm-normalised crops around each cell → ResNet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rbcbatch.classify.calls import CellCalls
from rbcbatch.classify.crops import cell_crops, slide_crops


class ResNetClassifier:
    """The learned classifier: crops normalised to µm around each centroid → ResNet.

    Loads its weights once (checked against the card's sha256); maps a slide's cells in
    batches under inference mode.
    """

    name = "resnet"

    def __init__(self, weights: str = "resnet_cells", device: str | None = None) -> None:
        from rbcbatch.models import load_model

        device = device or _default_device()
        self.model, self.card = load_model(weights, device=device)
        self.classes = tuple(self.card.classes)
        self.crop_um = float(self.card.um_per_px * self.card.input_px)
        self.input = card_input(self.card)

    def config(self) -> dict:
        return {
            "name": self.name,
            "weights": self.card.name,
            "sha256": self.card.sha256,
            "classes": list(self.classes),
            "crop_um": self.crop_um,
            "input_px": self.card.input_px,
            "input": self.input,
        }

    def __call__(
        self, columns: Mapping[str, np.ndarray], image: np.ndarray, um_per_px: float
    ) -> CellCalls:
        return self.classify_many([(columns, image, um_per_px)])[0]

    def classify_many(
        self, slides: Sequence[tuple[Mapping[str, np.ndarray], np.ndarray, float]]
    ) -> list[CellCalls]:
        """Calls for the cells of several slides, (columns, image, µm/px) each: every slide's
        crops are cut and stain-normalised against that slide, then all of them go through the
        network in shared batches."""
        cut = slide_crops if self.input["stain"] == "slide" else _absolute_crops
        crops = [
            cut(image, _centroids(columns), columns, um_per_px, self.crop_um, self.card.input_px)
            for columns, image, um_per_px in slides
            if len(columns["cell_id"])
        ]
        probs, embedding = np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0))
        if crops:
            probs, embedding = predict_crops(
                self.model, np.concatenate(crops), standardise=fixed_standardisation(self.input)
            )
        calls, start = [], 0
        for columns, _, _ in slides:
            n = len(columns["cell_id"])
            calls.append(self._calls(probs[start : start + n], embedding[start : start + n]))
            start += n
        return calls

    def _calls(self, probs: np.ndarray, embedding: np.ndarray) -> CellCalls:
        if len(probs) == 0:
            return CellCalls(
                np.array([], dtype=object),
                np.zeros(0, np.float32),
                np.zeros((0, len(self.classes)), np.float32),
                np.zeros((0, 0), np.float16),
            )
        best = probs.argmax(axis=1)
        return CellCalls(
            classes=np.asarray(self.classes, dtype=object)[best],
            probability=probs[np.arange(len(best)), best].astype(np.float32),
            probabilities=probs.astype(np.float32),
            embedding=embedding.astype(np.float16),
        )


def _centroids(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.stack([columns["centroid_x"], columns["centroid_y"]], axis=1)


def _absolute_crops(image, points, columns, um_per_px, crop_um, out_px):
    """Crops as the first weights were trained on: µm-scaled, colours as scanned."""
    return cell_crops(image, points, um_per_px, crop_um, out_px)


# What the first shipped weights expect (cards without an "input" entry): colours as scanned,
# each crop standardised on its own.
LEGACY_INPUT = {"stain": "none", "standardise": "crop"}


def card_input(card) -> dict:
    """How a card's crops are cut and normalised: {"stain": "slide"|"none", "standardise":
    "crop"|"fixed", and for "fixed" the per-channel "mean" and "sd" of its training crops}."""
    return dict(card.training.get("input", LEGACY_INPUT))


def fixed_standardisation(spec: dict) -> tuple[list[float], list[float]] | None:
    """(mean, sd) per channel for fixed standardisation, or None for per-crop."""
    if spec.get("standardise") == "fixed":
        return list(spec["mean"]), list(spec["sd"])
    return None


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# Per-crop normalisation: a floor on the channel SD so that an empty (flat) crop stays finite
# (intensities in [0, 1]; a real crop's channel SD is ~0.1).
NORM_MIN_SD = 0.02


def crops_to_tensor(crops: np.ndarray):
    """uint8 N×H×W×3 RGB -> float32 torch tensor N×3×H×W in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0


def normalise_crops(x, fixed: tuple | None = None):
    """Per-channel standardisation of float N×3×H×W in [0, 1] (same shape, float32).

    ``fixed`` None: each crop on its own, which removes stain strength and illumination
    differences between sites (the first weights); shapes survive because the transform is
    affine per channel, but a cell's density against its neighbours is lost. ``fixed`` (mean,
    sd) per channel: one transform for all crops, for crops already stain-normalised against
    their slide (`slide_crops`), so a spherocyte stays denser than its slide's discocytes.
    """
    if fixed is not None:
        import torch

        mean = torch.tensor(fixed[0], dtype=x.dtype).reshape(1, 3, 1, 1)
        sd = torch.tensor(fixed[1], dtype=x.dtype).reshape(1, 3, 1, 1)
        return (x - mean) / sd
    mean = x.mean(dim=(2, 3), keepdim=True)
    sd = x.std(dim=(2, 3), keepdim=True).clamp_min(NORM_MIN_SD)
    return (x - mean) / sd


def _dihedral(x, k: int):
    """The k-th of the 8 rotations/flips of a square N×3×H×W batch (k in 0-7)."""
    x = x.flip(3) if k >= 4 else x
    return x.rot90(k % 4, dims=(2, 3))


def predict_crops(
    model,
    crops_uint8: np.ndarray,
    batch_size: int = 256,
    tta: bool = False,
    standardise: tuple | None = None,
):
    """Class probabilities and embeddings of cell crops, batched under inference mode.

    crops_uint8: uint8 N×H×W×3 RGB, cut with ``cell_crops`` at the card's µm/px and input_px.
    ``tta`` averages probabilities and embeddings over the 8 rotations/flips (8x the time);
    ``standardise`` is `normalise_crops`'s ``fixed`` (the card's `fixed_standardisation`).
    Returns (probs float32 N×C summing to 1, embedding float32 N×D).
    """
    import torch

    device = next(model.parameters()).device
    n_classes, dim = model.head.out_features, model.head.in_features
    probs, embs = [np.empty((0, n_classes), np.float32)], [np.empty((0, dim), np.float32)]
    views = range(8) if tta else range(1)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(crops_uint8), batch_size):
            batch = crops_to_tensor(crops_uint8[start : start + batch_size])
            x = normalise_crops(batch, standardise)
            x = x.to(device)
            p, e = 0.0, 0.0
            for k in views:
                logits, emb = model(_dihedral(x, k))
                p = p + torch.softmax(logits.float(), dim=1) / len(views)
                e = e + emb.float() / len(views)
            probs.append(p.cpu().numpy())
            embs.append(e.cpu().numpy())
    model.train(was_training)
    return np.concatenate(probs), np.concatenate(embs)

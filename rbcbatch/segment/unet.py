"""Learned red-cell segmentation: a small encoder-decoder network, then a seeded watershed.

The network sees a tile as optical density (OD) against the slide's background colour
(``SlideStats.background_rgb``), so bare glass is ~0 whatever the lab's lamp or stain, and cells
are additive absorbers (Beer-Lambert), as in the classical segmenter. It outputs five channels:

* 0-3: logits of background / red cell / WBC / platelet (softmax);
* 4: logit of the "interior" map, each object's distance to its own outline divided by the
  largest such distance in the object (sigmoid, 1 at the centre, 0 on the outline).

Touching cells merge in the foreground but the interior map dips between them, so its
high-confidence cores seed a watershed of the foreground, one seed per cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from rbcbatch.imaging.density import optical_density
from rbcbatch.segment.classical import Segmentation, SlideStats
from rbcbatch.vocabulary import OBJECT_KINDS

__all__ = ["UNetSegmenter", "image_to_input", "postprocess"]

# Order of the semantic output channels; channel i of the softmax is class i.
SEMANTIC_CLASSES = ("background", "rbc", "wbc", "platelet")
INTERIOR_CHANNEL = 4
# OD is clipped to this range: pixels a little brighter than the background estimate stay
# slightly negative (vignetting), and OD 3 is 20x darker than glass (opaque debris).
OD_RANGE = (-0.5, 3.0)
# Network input = OD * this scale: cell OD (0.1-0.6 on the synthetic sites and AneRBC) becomes
# ~0.2-1.2, the range the first BatchNorm layer was trained on.
OD_INPUT_SCALE = 2.0
# Tiles are padded to a multiple of this (the encoder's total stride is at most 32).
PAD_MULTIPLE = 32
# Post-processing defaults; the shipped card's training.postprocess overrides them with the
# values chosen on the validation split (see train_segmenter).
FG_THRESHOLD = 0.5  # a pixel is foreground when P(background) < 1 - this
SEED_THRESHOLD = 0.5  # interior probability of a seed pixel
# Size limits, as in the classical segmenter (ClassicalParams): specks below 0.5 um^2 are
# dropped, red cells need 4 um^2 (a 2.3 um fragment) unless cut by the tile edge.
MIN_OBJECT_AREA_UM2 = 0.5
MIN_RBC_AREA_UM2 = 4.0
# Largest batch of tiles run through the network at once on a GPU; below it the card's free
# memory decides (UNetSegmenter.batch_limit). On CPU tiles go one at a time: one thread ran
# 4 x 704^2 tiles in 2.0 s singly vs 2.4 s as one batch (cache-bound), so batching only pays
# on a GPU.
MAX_BATCH = 64
CPU_BATCH = 1
# GPU memory per input pixel of a forward pass: 8 x 704^2 tiles took ~1.5 GB of activations
# (~380 B/px); the margin covers the allocator's fragmentation.
GPU_BYTES_PER_PIXEL = 600


def image_to_input(image: np.ndarray, background_rgb) -> np.ndarray:
    """Network input float32 (3, H, W) from an RGB uint8 tile (H, W, 3) and its background.

    OD = log((background + 1) / (pixel + 1)) per channel, clipped to OD_RANGE and scaled.
    """
    od = np.clip(optical_density(image, background_rgb), *OD_RANGE) * OD_INPUT_SCALE
    return np.ascontiguousarray(od.transpose(2, 0, 1))


def _padded(size: int) -> int:
    return -(-size // PAD_MULTIPLE) * PAD_MULTIPLE


def postprocess(
    probs: np.ndarray,
    interior: np.ndarray,
    um_per_px: float,
    fg_threshold: float = FG_THRESHOLD,
    seed_threshold: float = SEED_THRESHOLD,
) -> Segmentation:
    """Instances from the network's outputs for one tile.

    probs: float32 (4, H, W) softmax of SEMANTIC_CLASSES; interior: float32 (H, W) in [0, 1].
    Seeds = connected cores of ``interior > seed_threshold`` inside the foreground; the
    watershed of ``-interior`` grows them over the foreground. Foreground pieces without a seed
    become objects of their own. An object's kind is the class with the largest summed
    probability over its pixels.
    """
    fg = probs[0] < 1.0 - fg_threshold
    seeds, n_seeds = ndi.label(fg & (interior > seed_threshold))
    labels = watershed(-interior, seeds, mask=fg) if n_seeds else np.zeros(fg.shape, np.int32)
    orphans, n_orphans = ndi.label(fg & (labels == 0))
    labels = np.where(orphans > 0, orphans + n_seeds, labels).astype(np.int32)
    n = n_seeds + n_orphans + 1
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n)
    votes = np.stack(
        [np.bincount(flat, weights=probs[c].ravel(), minlength=n) for c in (1, 2, 3)], axis=1
    )
    kind = (np.argmax(votes, axis=1) + 1).astype(np.uint8)  # 1 rbc, 2 wbc, 3 platelet

    px2 = um_per_px * um_per_px
    edge = np.zeros(n, dtype=bool)
    edge[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    keep = area >= MIN_OBJECT_AREA_UM2 / px2
    keep &= (kind != OBJECT_KINDS["rbc"]) | (area >= MIN_RBC_AREA_UM2 / px2) | edge
    keep[0] = False
    lut = np.zeros(n, dtype=np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return Segmentation(labels=lut[labels], kinds=kind[keep])


class UNetSegmenter:
    """Network + seeded watershed segmenter for RGB tiles at the card's ``um_per_px``.

    weights: a shipped model name or a path to a .safetensors file with its card beside it.
    device: "cpu", "cuda", ...; None picks CUDA when available.
    """

    name = "unet"

    def __init__(self, weights: str = "unet_rbc", device: str | None = None) -> None:
        import torch

        from rbcbatch.models import load_model

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, card = load_model(weights, device=str(torch.device(device)))
        self._setup(model, card, device)

    @classmethod
    def from_model(cls, model, card, device: str = "cpu") -> UNetSegmenter:
        """Wrap an in-memory network and its card (validation during training)."""
        seg = cls.__new__(cls)
        seg._setup(model, card, device)
        return seg

    def _setup(self, model, card, device: str) -> None:
        import torch

        self.device = torch.device(device)
        model = model.to(self.device).eval()
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.card = card
        self.um_per_px = float(card.um_per_px)
        post = card.training.get("postprocess", {})
        self.fg_threshold = float(post.get("fg_threshold", FG_THRESHOLD))
        self.seed_threshold = float(post.get("seed_threshold", SEED_THRESHOLD))

    def config(self) -> dict:
        """JSON-serialisable description (hashed into run configs); pins the exact weights."""
        return {
            "name": self.name,
            "weights": self.card.name,
            "sha256": self.card.sha256,
            "architecture": self.card.architecture,
            "kwargs": self.card.kwargs,
            "um_per_px": self.um_per_px,
            "fg_threshold": self.fg_threshold,
            "seed_threshold": self.seed_threshold,
        }

    def __call__(self, image: np.ndarray, stats: SlideStats) -> Segmentation:
        """Segment one RGB uint8 tile (H, W, 3) into red cells, WBCs and platelets."""
        return self.segment_batch([image], stats)[0]

    def segment_batch(
        self, images: list[np.ndarray], stats: SlideStats | Sequence[SlideStats]
    ) -> list[Segmentation]:
        """Segment tiles of one slide (one `stats`) or of many (one per tile); tiles of equal
        padded size share a network batch, whichever slide they come from.

        Grouping by padded size (rather than padding all to the largest) keeps every tile's
        result identical to a call on that tile alone.
        """
        per_tile = [stats] * len(images) if isinstance(stats, SlideStats) else list(stats)
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected an RGB tile (H, W, 3), got shape {image.shape}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((_padded(image.shape[0]), _padded(image.shape[1])), []).append(i)
        out: list[Segmentation | None] = [None] * len(images)
        for shape, members in groups.items():
            limit = self.batch_limit(shape)
            for start in range(0, len(members), limit):
                chunk = members[start : start + limit]
                probs, interior = self._predict(
                    [images[i] for i in chunk], shape, [per_tile[i] for i in chunk]
                )
                for j, i in enumerate(chunk):
                    h, w = images[i].shape[:2]
                    out[i] = postprocess(
                        probs[j, :, :h, :w],
                        interior[j, :h, :w],
                        self.um_per_px,
                        self.fg_threshold,
                        self.seed_threshold,
                    )
        return out  # type: ignore[return-value]

    def batch_limit(self, shape: tuple[int, int]) -> int:
        """Tiles per network call: one on a CPU (no gain from more there), and on a GPU as
        many as half its free memory holds at GPU_BYTES_PER_PIXEL, within [1, MAX_BATCH]."""
        if self.device.type != "cuda":
            return CPU_BATCH
        import torch

        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(0.5 * free // (GPU_BYTES_PER_PIXEL * shape[0] * shape[1]))
        return max(1, min(MAX_BATCH, fits))

    def _predict(
        self,
        images: list[np.ndarray],
        shape: tuple[int, int],
        stats: Sequence[SlideStats],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Softmax (N, 4, H, W) and interior (N, H, W), float32, for tiles padded to ``shape``;
        `stats`: each tile's slide statistics.

        Padding is OD 0, i.e. bare glass beyond the tile, like the zero padding of the
        convolutions at the edges of training crops.
        """
        import torch

        self.model.eval()  # BatchNorm with running statistics, also when called mid-training
        batch = np.zeros((len(images), 3, *shape), dtype=np.float32)
        for j, image in enumerate(images):
            h, w = image.shape[:2]
            batch[j, :, :h, :w] = image_to_input(image, stats[j].background_rgb)
        x = torch.from_numpy(batch).to(self.device)
        with torch.inference_mode():
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = self.model(x)
            else:
                logits = self.model(x)
            logits = logits.float()
            probs = torch.softmax(logits[:, :INTERIOR_CHANNEL], dim=1)
            interior = torch.sigmoid(logits[:, INTERIOR_CHANNEL])
        return probs.cpu().numpy(), interior.cpu().numpy()

"""Learned models: a registry keyed by name, weights in safetensors beside a JSON model card.

A card holds what is needed to rebuild and trust a model: its architecture and constructor
kwargs, classes, the µm/px and input size it expects, how it was trained (data, split, seed,
time) and what it scored, and the sha256 of its weights. Loading checks that hash, so a
corrupt or swapped weights file is a clear error, never a silent wrong answer. A user's own
weights path works the same way as the shipped ones.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rbcbatch.errors import WeightsError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ModelCard:
    """Everything about a trained model except its weights."""

    name: str
    task: str  # "segmenter" or "classifier"
    architecture: str  # a key of ARCHITECTURES
    kwargs: dict
    classes: list[str]
    um_per_px: float
    input_px: int
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    sha256: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def _resnet18_trunk(width: int = 64, stem_pool: bool = True):
    """torchvision ResNet-18 (BasicBlock ×[2, 2, 2, 2]) without its fc; stage widths w, 2w, 4w, 8w.

    width 64 is torchvision's resnet18 exactly; a narrower trunk rebuilds the stem and stages
    with torchvision's own blocks and init. ``stem_pool=False`` drops the stem's max-pool (twice
    the feature-map resolution for small crops, ~4x the compute).
    """
    from torch import nn
    from torchvision.models import resnet18
    from torchvision.models.resnet import BasicBlock

    trunk = resnet18(weights=None)
    if width != 64:
        trunk.inplanes = width
        trunk.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        trunk.bn1 = nn.BatchNorm2d(width)
        for i in range(4):
            stage = trunk._make_layer(BasicBlock, width * 2**i, 2, stride=1 if i == 0 else 2)
            setattr(trunk, f"layer{i + 1}", stage)
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if not stem_pool:
        trunk.maxpool = nn.Identity()
    trunk.fc = nn.Identity()
    return trunk


def _resnet_cells(
    num_classes: int, embedding_dim: int = 64, width: int = 64, stem_pool: bool = True
):
    """ResNet-18 trunk (``_resnet18_trunk``), a small embedding layer, then the class head.

    Input: float N×3×H×W (crops normalised to µm); returns (logits N×C, embedding N×D).
    """
    import torch
    from torch import nn

    class ResNetCells(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = _resnet18_trunk(width, stem_pool)
            self.embed = nn.Sequential(
                nn.Linear(8 * width, embedding_dim), nn.BatchNorm1d(embedding_dim), nn.ReLU()
            )
            self.head = nn.Linear(embedding_dim, num_classes)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb = self.embed(self.trunk(x))
            return self.head(emb), emb

    return ResNetCells()


def _unet(
    encoder_name: str = "resnet18",
    classes: int = 5,
    decoder: str = "unet",
    encoder_depth: int = 5,
    decoder_channels: list[int] | None = None,
):
    """segmentation-models-pytorch encoder-decoder (U-Net or LinkNet), trained from scratch.

    ``encoder_depth`` < 5 drops the deepest ResNet stages; they are deleted from the module so
    that the weights file holds only what the forward pass uses. ``decoder_channels`` is for the
    U-Net decoder only (one entry per encoder stage).
    """
    import segmentation_models_pytorch as smp

    common = dict(
        encoder_name=encoder_name,
        encoder_weights=None,
        in_channels=3,
        classes=classes,
        encoder_depth=encoder_depth,
    )
    if decoder == "unet":
        channels = decoder_channels or [256, 128, 64, 32, 16][-encoder_depth:]
        model = smp.Unet(**common, decoder_channels=list(channels))
    elif decoder == "linknet":
        model = smp.Linknet(**common)
    else:
        raise ValueError(f"unknown decoder {decoder!r}; expected 'unet' or 'linknet'")
    if encoder_name.startswith("resnet"):
        for stage in range(encoder_depth, 5):  # ResNet layer k is encoder stage k + 1
            delattr(model.encoder, f"layer{stage}")
    return model


# Architecture name -> builder(**card.kwargs). Plain dict: an unknown name is a KeyError listing the options.
ARCHITECTURES: dict[str, Callable] = {"resnet_cells": _resnet_cells, "unet": _unet}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def resolve_weights(name_or_path: str | Path) -> Path:
    """A shipped model's name (`unet_rbc`) or a path to a user's .safetensors file."""
    path = Path(name_or_path)
    if path.suffix == ".safetensors":
        return path
    shipped = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if not shipped.exists():
        known = sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))
        raise WeightsError(
            f"no model named {name_or_path!r}; shipped models: {known}, or give a path to a .safetensors file"
        )
    return shipped


def save_model(model, card: ModelCard, weights: Path) -> ModelCard:
    """Write weights (safetensors) and the card with their sha256; returns the final card."""
    from safetensors.torch import save_file

    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"name": card.name, "architecture": card.architecture})
    final = ModelCard(**{**asdict(card), "sha256": file_sha256(weights)})
    card_path(weights).write_text(final.to_json())
    return final


def load_card(weights: Path) -> ModelCard:
    path = card_path(weights)
    if not path.exists():
        raise WeightsError(f"{weights} has no model card ({path.name} beside it)")
    try:
        return ModelCard(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise WeightsError(f"model card {path} is not valid: {e}") from e


def load_model(name_or_path: str | Path, device: str = "cpu"):
    """Build the model named by its card and load its checked weights; returns (model, card)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = resolve_weights(name_or_path)
    if not weights.exists():
        raise WeightsError(f"weights file {weights} does not exist")
    card = load_card(weights)
    actual = file_sha256(weights)
    if card.sha256 and actual != card.sha256:
        raise WeightsError(
            f"{weights} has sha256 {actual[:12]}… but its card says {card.sha256[:12]}…: "
            "the file is corrupt or not the one the card describes"
        )
    try:
        builder = ARCHITECTURES[card.architecture]
    except KeyError:
        raise WeightsError(
            f"card names unknown architecture {card.architecture!r}; known: {sorted(ARCHITECTURES)}"
        ) from None
    model = builder(**card.kwargs)
    try:
        state = load_file(str(weights), device=device)
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise WeightsError(f"cannot load weights {weights}: {e}") from e
    return model.to(device).eval(), card

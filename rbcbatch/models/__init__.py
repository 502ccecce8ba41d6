"""The model registry: architectures by name, shipped weights with their cards and sha256."""

from rbcbatch.models.registry import (
    ARCHITECTURES,
    WEIGHTS_DIR,
    ModelCard,
    card_path,
    file_sha256,
    load_card,
    load_model,
    resolve_weights,
    save_model,
)

__all__ = [
    "ARCHITECTURES",
    "WEIGHTS_DIR",
    "ModelCard",
    "card_path",
    "file_sha256",
    "load_card",
    "load_model",
    "resolve_weights",
    "save_model",
]

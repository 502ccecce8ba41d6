"""What every cell classifier answers, and the interface the engine calls."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class CellCalls:
    """A classifier's answer for n cells: class names, and for learned models the evidence.

    classes: object (n,); probability: float32 (n,) of the chosen class; probabilities:
    float32 (n, C) over the classifier's `classes`; embedding: float16 (n, D).
    """

    classes: np.ndarray
    probability: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    embedding: np.ndarray | None = None


class CellClassifier(Protocol):
    """A morphology classifier: built once per worker, then called per slide or region."""

    name: str
    classes: tuple[str, ...]

    def config(self) -> dict:
        """What the classifier is (name, weights hash, thresholds): it goes into run.json."""
        ...

    def __call__(
        self, columns: Mapping[str, np.ndarray], image: np.ndarray, um_per_px: float
    ) -> CellCalls:
        """Calls for the cells in `columns` (rbcbatch.measure columns) on their RGB image."""
        ...

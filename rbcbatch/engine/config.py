"""What a run computes: its configuration, the models it builds from it, and their hashes.

`RunConfig` is everything that changes a run's numbers (its hash goes on every row); `Models`
builds the segmenter and classifier it names once per worker, from small name -> builder
registries (an unknown name is a KeyError that lists the choices).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from rbcbatch.classify.calls import CellClassifier
from rbcbatch.classify.resnet import ResNetClassifier
from rbcbatch.classify.rules import RulesClassifier
from rbcbatch.imaging.tiling import TileGeometry
from rbcbatch.io.deidentify import run_note
from rbcbatch.io.sources import MAX_WHOLE_IMAGE_PIXELS
from rbcbatch.segment.classical import ClassicalSegmenter
from rbcbatch.vocabulary import DEFAULT_CLASSIFIER


def _unet_segmenter():
    from rbcbatch.segment.unet import UNetSegmenter  # torch and smp load only when asked for

    return UNetSegmenter()


# Name -> builder. Learned models load their checked weights once, in the actor that builds them.
SEGMENTERS: dict[str, Callable] = {"classical": ClassicalSegmenter, "unet": _unet_segmenter}
CLASSIFIERS: dict[str, Callable] = {"rules": RulesClassifier, "resnet": ResNetClassifier}


def _lookup(registry: dict[str, Callable], name: str, what: str) -> Callable:
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown {what} {name!r}; choose one of {sorted(registry)}") from None


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes what a run computes (its hash goes on every row)."""

    segmenter: str = "classical"
    classifier: str = DEFAULT_CLASSIFIER
    tile_px: int = 512
    halo_px: int = 96
    max_pixels: int = MAX_WHOLE_IMAGE_PIXELS
    # Tiled TIFFs with more level-0 pixels than this go region by region (engine.regions);
    # smaller images and every other format are decoded whole, as before.
    region_min_pixels: int = 64_000_000
    # Region core edge in working pixels, a multiple of tile_px: 4096 at 0.25 µm/px is ~1 mm.
    region_px: int = 4096
    # De-identified runs (rbcbatch.io.deidentify): the id of the key that hashed the patient and
    # slide ids; empty when the catalog's own ids are kept.
    deidentify_key_id: str = ""

    def __post_init__(self) -> None:
        _lookup(SEGMENTERS, self.segmenter, "segmenter")
        _lookup(CLASSIFIERS, self.classifier, "classifier")
        if self.region_px < self.tile_px or self.region_px % self.tile_px:
            raise ValueError(
                f"region_px ({self.region_px}) must be a multiple of tile_px ({self.tile_px})"
            )

    def to_dict(self) -> dict:
        config = asdict(self)
        if not self.deidentify_key_id:  # runs with the catalog's ids keep their config hash
            del config["deidentify_key_id"]
        return config


def stable_hash(obj: dict) -> str:
    """Short sha256 of a JSON document with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Models:
    """The models of one run, built once per actor."""

    config: RunConfig
    segmenter: object = field(init=False)
    classifier: CellClassifier = field(init=False)
    geometry: TileGeometry = field(init=False)

    def __post_init__(self) -> None:
        self.segmenter = _lookup(SEGMENTERS, self.config.segmenter, "segmenter")()
        self.classifier = _lookup(CLASSIFIERS, self.config.classifier, "classifier")()
        self.geometry = TileGeometry(
            self.config.tile_px, self.config.halo_px, self.segmenter.um_per_px
        )

    def describe(self) -> dict:
        return {
            "run": self.config.to_dict(),
            "segmenter": self.segmenter.config(),
            "classifier": self.classifier.config(),
            "geometry": self.geometry.to_dict(),
            **(
                {"deidentified": run_note(self.config.deidentify_key_id)}
                if self.config.deidentify_key_id
                else {}
            ),
        }

    @property
    def model_hash(self) -> str:
        return stable_hash(
            {"segmenter": self.segmenter.config(), "classifier": self.classifier.config()}
        )

"""Morphology call per red cell.

The vocabulary below is shared by the synthetic generator (its truth), the classifiers and the
analytics. A cell's class is one of MORPHOLOGY_CLASSES; objects that are not red cells carry
their kind instead (OBJECT_KINDS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

# Red-cell morphology classes, in the order used for probability vectors and reports.
MORPHOLOGY_CLASSES: tuple[str, ...] = (
    "normal",
    "spherocyte",
    "elliptocyte",
    "target",
    "schistocyte",
    "microcyte",
    "macrocyte",
    "hypochromic",
    "other",
)

# Kinds of segmented object; the integer is the value used in semantic maps (0 = background).
OBJECT_KINDS: dict[str, int] = {"rbc": 1, "wbc": 2, "platelet": 3}


# The rule-based call: a transparent baseline that a learned classifier replaces later. Its
# inputs are columns of rbcbatch.measure.CELL_MEASURES, so each call can be checked in the cells
# table.
@dataclass(frozen=True)
class MorphologyRules:
    """Thresholds of the rule-based morphology call (µm and unitless ratios).

    Literature values are from ICSH recommendations for red-cell morphology (Palmer et al., Int J
    Lab Hematol 2015) and standard haematology texts (Bain, Blood Cells, 5th ed.); values marked
    "tuned" were set on synthetic fields with true instance masks (see classify_rules).
    """

    # Below this equivalent diameter an object is not measurable as a red cell (platelets are
    # 1.5-3 µm): called "other".
    min_cell_diameter_um: float = 2.5
    # Schistocytes are fragments, smaller than a red cell (3-6 µm, tuned to 5.6) ...
    schistocyte_max_diameter_um: float = 5.6
    # ... and not round: a disk cut by a chord has circularity ~0.75 (half disk) to ~0.9, a
    # round cell of this size >= 0.95 with the Crofton perimeter (tuned) ...
    schistocyte_max_circularity: float = 0.88
    # ... or with a bite out of it (helmet cells, keratocytes): solidity of a round cell is ~0.97.
    schistocyte_max_solidity: float = 0.9
    # Elliptocytes: long axis / short axis. ICSH counts ovalocytes from ~1.25 and elliptocytes
    # at >= 2; normal discocytes lie below ~1.2. 1.4 catches both (tuned).
    elliptocyte_min_aspect: float = 1.4
    # Target cells: a dense central spot (core OD / annulus OD above this, tuned) ...
    target_min_core_ratio: float = 1.2
    # ... inside a pale ring (annulus OD / rim OD below this, tuned).
    target_max_ring_ratio: float = 0.8
    # Spherocytes are small (mean ~6.0-6.5 µm against 7.5 for discocytes, tuned) ...
    spherocyte_max_diameter_um: float = 6.7
    # ... and have no central pallor: centre OD / rim OD near 1 (a discocyte's is ~0.5-0.7).
    spherocyte_min_pallor_ratio: float = 0.85
    # Microcyte: below the normal 6.2-8.2 µm diameter range (Bain): < 6 µm.
    microcyte_max_diameter_um: float = 6.0
    # Macrocyte: above the normal range, > 9 µm.
    macrocyte_min_diameter_um: float = 9.0
    # Hypochromia: central pallor wider than half the diameter, i.e. more than a quarter of the
    # cell's area is pale.
    hypochromic_min_pallor_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name, value in self.to_dict().items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"MorphologyRules.{name} must be a positive number, got {value}")
        if not self.min_cell_diameter_um < self.schistocyte_max_diameter_um:
            raise ValueError("min_cell_diameter_um must be below schistocyte_max_diameter_um")
        if not self.microcyte_max_diameter_um < self.macrocyte_min_diameter_um:
            raise ValueError("microcyte_max_diameter_um must be below macrocyte_min_diameter_um")
        if not self.spherocyte_max_diameter_um < self.macrocyte_min_diameter_um:
            raise ValueError("spherocyte_max_diameter_um must be below macrocyte_min_diameter_um")
        if not self.elliptocyte_min_aspect > 1:
            raise ValueError("elliptocyte_min_aspect must exceed 1")
        if not self.target_min_core_ratio > 1:
            raise ValueError("target_min_core_ratio must exceed 1 (a denser core)")
        if not self.target_max_ring_ratio < 1:
            raise ValueError("target_max_ring_ratio must be below 1 (a paler ring)")
        for name in (
            "schistocyte_max_circularity",
            "schistocyte_max_solidity",
            "hypochromic_min_pallor_fraction",
        ):
            if not getattr(self, name) < 1:
                raise ValueError(f"MorphologyRules.{name} must be below 1")

    def to_dict(self) -> dict[str, float]:
        """Plain dict of the thresholds, for config hashing and run manifests."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


# Measure columns the rules read.
RULE_COLUMNS: tuple[str, ...] = (
    "diameter_um",
    "circularity",
    "solidity",
    "aspect_ratio",
    "pallor_ratio",
    "pallor_area_fraction",
    "ring_ratio",
    "core_ratio",
)


def classify_rules(
    columns: Mapping[str, np.ndarray], rules: MorphologyRules = MorphologyRules()
) -> np.ndarray:
    """Rule-based morphology call per cell: object array (n,) of MORPHOLOGY_CLASSES names.

    columns: measure columns (rbcbatch.measure.measure_cells output, or a table with the same
    names), each (n,). A decision list; the first rule that holds wins:

    1. other        diameter below min_cell_diameter_um, or diameter undefined
    2. schistocyte  small (diameter <= schistocyte_max_diameter_um) and irregular (circularity
                    or solidity below its threshold): a fragment, whatever its pallor
    3. elliptocyte  aspect_ratio >= elliptocyte_min_aspect: shape before staining
    4. target       dense core inside a pale ring (core_ratio, ring_ratio): before spherocyte,
                    whose "no pallor" test a target's dense centre would also pass
    5. spherocyte   small and no central pallor (pallor_ratio >= spherocyte_min_pallor_ratio)
    6. microcyte    diameter < microcyte_max_diameter_um (with pallor, else rule 5 took it)
    7. macrocyte    diameter > macrocyte_min_diameter_um
    8. hypochromic  pallor_area_fraction > hypochromic_min_pallor_fraction
    9. normal       none of the above

    Size comes before hypochromia, so a hypochromic microcyte is called "microcyte". NaN inputs
    make the rule that reads them not hold.
    """
    missing = [c for c in RULE_COLUMNS if c not in columns]
    if missing:
        raise KeyError(f"classify_rules needs columns {missing}")
    col = {c: np.asarray(columns[c], dtype=np.float64) for c in RULE_COLUMNS}
    n = col["diameter_um"].shape[0]
    d = col["diameter_um"]
    small_fragment = d <= rules.schistocyte_max_diameter_um
    irregular = (col["circularity"] < rules.schistocyte_max_circularity) | (
        col["solidity"] < rules.schistocyte_max_solidity
    )
    decisions = [
        ("other", ~(d >= rules.min_cell_diameter_um)),
        ("schistocyte", small_fragment & irregular),
        ("elliptocyte", col["aspect_ratio"] >= rules.elliptocyte_min_aspect),
        (
            "target",
            (col["core_ratio"] >= rules.target_min_core_ratio)
            & (col["ring_ratio"] <= rules.target_max_ring_ratio),
        ),
        (
            "spherocyte",
            (d <= rules.spherocyte_max_diameter_um)
            & (col["pallor_ratio"] >= rules.spherocyte_min_pallor_ratio),
        ),
        ("microcyte", d < rules.microcyte_max_diameter_um),
        ("macrocyte", d > rules.macrocyte_min_diameter_um),
        ("hypochromic", col["pallor_area_fraction"] > rules.hypochromic_min_pallor_fraction),
    ]
    out = np.full(n, "normal", dtype=object)
    undecided = np.ones(n, dtype=bool)
    for name, holds in decisions:
        hit = undecided & holds
        out[hit] = name
        undecided &= ~hit
    return out

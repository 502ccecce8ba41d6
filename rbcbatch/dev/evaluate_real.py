"""What the screening calls on real smears of laboratories it was not tuned on.

The cohort-level failure a new site sees first is healthy people's red cells called abnormal:
normal smears flagged HS. This runs the whole pipeline (`engine.run`, as `rbcbatch run` does) on
the real healthy smears in ../shared/data that no rule or model was tuned on, and reports per
data set the share of red cells called normal and called spherocyte, and the HS flags:

- AneRBC-I 004-006 (healthy `_h` and anemic `_a`; 001-003 tuned the segmenter): one individual
  per image, read at the 0.25 µm/px the segmenter was tuned with (the set states none), and
  again with the pixel size left to the run's estimate from the cells (`anerbc-estimated`).
- PBC healthy donors (MGG, CellaVision DM96): the held-back split, every PBC_HOLDOUT_EVERY-th
  image of each class folder in name order, never to be used for training or tuning. Each image
  is one slide and one "donor" (the set does not say which images share a donor); the pixel size
  is left to the run's site/scanner estimate (the set states none; about 0.1 µm/px).
"""

from __future__ import annotations

import csv
from pathlib import Path

from rbcbatch.dev.evaluate import ANERBC_HELD_OUT, ANERBC_UM_PER_PX

# The PBC images held back from all training, tuning and threshold choice: every 5th file of
# each class folder (sorted by name), starting with the first. 240 of the 1,200 here.
PBC_HOLDOUT_EVERY = 5
PBC_CLASSES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)
CATALOG_FIELDS = ("slide_id", "uri", "patient_id", "site", "scanner", "stain", "um_per_px", "label")


def pbc_split(root: Path) -> dict[str, list[Path]]:
    """{"held_back": [...], "train": [...]} of the PBC images: a fixed split by name."""
    split: dict[str, list[Path]] = {"held_back": [], "train": []}
    for cls in PBC_CLASSES:
        for i, path in enumerate(sorted((root / cls).glob("*.jpg"))):
            split["held_back" if i % PBC_HOLDOUT_EVERY == 0 else "train"].append(path)
    return split


def anerbc_rows(root: Path, ids: tuple[str, ...] = ANERBC_HELD_OUT) -> list[dict]:
    """Catalog rows of the AneRBC images `ids`, healthy and anemic, one individual each."""
    rows = []
    for group, suffix, label in (("Healthy", "h", "normal"), ("Anemic", "a", "anemic")):
        folder = root / "AneRBC-I" / f"{group}_individuals" / "Original_images"
        for number in ids:
            path = folder / f"{number}_{suffix}.png"
            rows.append(
                {
                    "slide_id": f"anerbc_{number}_{suffix}",
                    "uri": str(path),
                    "patient_id": f"anerbc_{number}_{suffix}",
                    "site": "anerbc",
                    "scanner": "anerbc",
                    "stain": "unknown",
                    "um_per_px": ANERBC_UM_PER_PX,
                    "label": label,
                }
            )
    return rows


def pbc_rows(root: Path) -> list[dict]:
    """Catalog rows of the held-back PBC images; no pixel size (estimated per site/scanner)."""
    return [
        {
            "slide_id": f"pbc_{path.stem}",
            "uri": str(path),
            "patient_id": f"pbc_{path.stem}",
            "site": "pbc",
            "scanner": "cellavision_dm96",
            "stain": "mgg",
            "um_per_px": "",
            "label": "normal",
        }
        for path in pbc_split(root)["held_back"]
    ]


def write_catalog(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CATALOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


# Per data set: red cells (not cut by the image edge) called normal and spherocyte, and the
# patients' HS flags by label.
SHARES_SQL = """
SELECT s.site AS data_set, s.label, count(DISTINCT s.patient_id) AS individuals,
       count(*) AS red_cells,
       round(100.0 * count(*) FILTER (WHERE c.class = 'normal') / count(*), 1) AS normal_pct,
       round(100.0 * count(*) FILTER (WHERE c.class = 'spherocyte') / count(*), 1)
           AS spherocyte_pct,
       max(s.um_per_px) AS um_per_px, any_value(s.um_per_px_source) AS um_per_px_source
FROM cells c JOIN slides s USING (slide_id)
WHERE c.kind = 'rbc' AND NOT c.touches_edge
GROUP BY ALL ORDER BY 1, 2
"""
FLAGS_SQL = """
SELECT site AS data_set, label, count(*) AS individuals,
       count(*) FILTER (WHERE hs_flag = 'positive') AS hs_positive,
       count(*) FILTER (WHERE hs_flag = 'insufficient') AS hs_insufficient,
       count(*) FILTER (WHERE anemia_flag = 'positive') AS anemia_positive,
       round(max(spherocyte_pct), 1) AS max_spherocyte_pct
FROM patients GROUP BY ALL ORDER BY 1, 2
"""
PER_INDIVIDUAL_SQL = """
SELECT patient_id, label, n_rbc, round(spherocyte_pct, 1) AS spherocyte_pct, hs_flag, anemia_flag
FROM patients ORDER BY patient_id
"""


def real_catalogs(data: Path, out: Path) -> dict[str, Path]:
    """The catalogs of the real held-out data sets found under `data`."""
    catalogs = {}
    if (data / "anerbc_sample").is_dir():
        rows = anerbc_rows(data / "anerbc_sample")
        catalogs["anerbc"] = write_catalog(out / "anerbc.csv", rows)
        # The same images with the pixel size left to the run's estimate from their cells.
        blank = [{**r, "um_per_px": ""} for r in rows]
        catalogs["anerbc-estimated"] = write_catalog(out / "anerbc-estimated.csv", blank)
    if (data / "pbc_subset").is_dir():
        catalogs["pbc"] = write_catalog(out / "pbc.csv", pbc_rows(data / "pbc_subset"))
    return catalogs

"""Loaders of the real annotated smear data sets, for training and evaluating learned models.

The data sets live beside the repository (never inside it); each folder has a DATASET.md that
describes its layout, licence and known flaws. Loaders return plain dicts and numpy arrays.

- Chula RBC-12: 640x480 smears with point labels of 13 red-cell classes. Byte-identical images
  with different label files exist, so records are grouped by MD5 and split by group. Cells are
  cut out as square crops of a fixed size in µm for the morphology classifier.
- AneRBC-I sample: 12 dense smears with foreground masks and an anemic / healthy label.
- BCCD: 640x480 smears with Pascal-VOC boxes of RBC, WBC and platelets.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rbcbatch.classify.crops import cell_crops
from rbcbatch.io.sources import read_slide

try:  # hardened parser where installed; the plain one otherwise (entities are refused below)
    from defusedxml import ElementTree as ET  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    import xml.etree.ElementTree as ET

__all__ = [
    "ANERBC_TRAIN_NUMBERS",
    "BCCD_CLASSES",
    "CHULA_CLASSES",
    "CHULA_UM_PER_PX",
    "anerbc_pairs",
    "anerbc_split",
    "bccd_boxes",
    "build_chula_arrays",
    "chula_groups",
    "chula_records",
    "chula_split",
    "class_counts",
    "load_anerbc",
    "read_chula_labels",
]

log = logging.getLogger(__name__)

# The repository's root: real data sets live beside it (same rule as tests/conftest.py).
REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """Where the real data sets are: $RBCBATCH_SHARED_DATA, else ../shared/data."""
    return Path(os.environ.get("RBCBATCH_SHARED_DATA", REPO.parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------
# Chula RBC-12
# ---------------------------------------------------------------------------------------------

# Class ids 0-12 in the order of the table in chula_rbc12/DATASET.md (upstream README).
CHULA_CLASSES: tuple[str, ...] = (
    "normal",
    "macrocyte",
    "microcyte",
    "spherocyte",
    "target",
    "stomatocyte",
    "ovalocyte",
    "teardrop",
    "burr",
    "schistocyte",
    "other",  # "uncategorised" upstream
    "hypochromic",  # "hypochromia" upstream
    "elliptocyte",
)

# Two clicks on the same cell by two annotators of a duplicated image land a few px apart; a
# Chula red cell is ~40 px across, so 3 px cannot join two different cells.
CHULA_NEAR_DUPLICATE_PX = 3.0

# Chula gives no pixel size (1000x oil objective, Nikon DS-Fi2 camera). Estimated from the cells:
# rbcbatch.segment.calibrate.cell_diameters_px on 20 label-bearing images (every 29th non-elliptocyte record, ids 1-669;
# ids 707-738 left out because elongated cells bias an equivalent-circle diameter) pooled 1,105
# isolated cells with a median diameter of 38.4 px -> 7.5 / 38.4 = 0.195 um/px (per-image
# estimates 0.157-0.236, median 0.197; the 140 of those cells labelled "normal" give 0.193).
# Cross-checks: the "20.00 um" scale bar burnt into image 176 spans 103 px (0.194 um/px); the
# DS-Fi2's 8.8 mm wide sensor behind 100x, saved 640 px wide, gives 0.196 if the (undocumented)
# C-mount adapter is 0.7x. Other burnt-in bars are unreadable.
CHULA_UM_PER_PX = 0.195

# Where the Chula labels sit relative to their root folder.
_CHULA_IMAGES = "Dataset"
_CHULA_LABELS = "Label"


def _chula_dirs(root: str | Path) -> tuple[Path, Path]:
    """The image and label folders of a Chula RBC-12 copy, or FileNotFoundError."""
    root = Path(root)
    images, labels = root / _CHULA_IMAGES, root / _CHULA_LABELS
    if not (images.is_dir() and labels.is_dir()):
        raise FileNotFoundError(f"{root} has no {_CHULA_IMAGES}/ and {_CHULA_LABELS}/ folders")
    return images, labels


def parse_chula_label(text: str, source: str = "") -> np.ndarray:
    """Points of one label file as int32 (N, 3) columns x, y, class_id (N = 0 for an empty file).

    Every line is ``x y class_id``; anything else raises ValueError naming ``source``.
    """
    values = text.split()
    if len(values) % 3:
        raise ValueError(f"{source}: {len(values)} numbers is not a whole number of 'x y class'")
    points = np.asarray([int(v) for v in values], dtype=np.int32).reshape(-1, 3)
    bad = (points[:, 2] < 0) | (points[:, 2] >= len(CHULA_CLASSES))
    if bad.any():
        raise ValueError(f"{source}: class id {int(points[bad][0, 2])} outside 0-12")
    return points


def read_chula_labels(root: str | Path) -> dict[int, np.ndarray]:
    """Every label file, empty ones included: image id -> int32 (N, 3) points (x, y, class)."""
    _, labels = _chula_dirs(root)
    out = {}
    for path in labels.glob("*.txt"):
        out[int(path.stem)] = parse_chula_label(path.read_text(), str(path))
    return dict(sorted(out.items()))


def file_md5(path: str | Path) -> str:
    """Hex MD5 of a file's bytes (how byte-identical images are found)."""
    return hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()


def chula_records(root: str | Path) -> list[dict[str, Any]]:
    """One record per image with a non-empty label file, sorted by image id.

    Keys: ``image_id`` int, ``path`` str, ``md5`` str (of the image bytes), ``points`` int32
    (N, 3) columns x, y, class_id. Empty label files (2 upstream) are skipped and logged; count
    them with ``read_chula_labels``.
    """
    images, _ = _chula_dirs(root)
    records, empty = [], []
    for image_id, points in read_chula_labels(root).items():
        if len(points) == 0:
            empty.append(image_id)
            continue
        path = images / f"{image_id}.jpg"
        records.append(
            {"image_id": image_id, "path": str(path), "md5": file_md5(path), "points": points}
        )
    if empty:
        log.info("chula: skipped %d empty label files: %s", len(empty), empty)
    return records


def dedupe_points(points: np.ndarray, radius_px: float = CHULA_NEAR_DUPLICATE_PX) -> np.ndarray:
    """Drop repeated annotations of one cell: int32 (N, 3) x, y, class -> (M, 3), M <= N.

    A point is dropped when an earlier kept point has the same class and lies within
    ``radius_px`` (exact repeats included). Points of different classes are all kept: they are
    disagreements between annotators, not repeats.
    """
    kept: list[int] = []
    xy = points[:, :2].astype(np.float64)
    r2 = radius_px * radius_px
    for i in range(len(points)):
        same = [j for j in kept if points[j, 2] == points[i, 2]]
        if same and np.min(((xy[same] - xy[i]) ** 2).sum(axis=1)) <= r2:
            continue
        kept.append(i)
    return points[kept]


def chula_groups(
    records: list[dict[str, Any]], near_px: float = CHULA_NEAR_DUPLICATE_PX
) -> list[dict[str, Any]]:
    """Merge records of byte-identical images (same MD5) into one record per distinct image.

    A group keeps the smallest member's ``image_id`` and ``path``, lists all members in
    ``member_ids`` and pools their points: exact repeats are dropped everywhere, and in a group
    of several label files also same-class points within ``near_px`` (the same cell annotated
    twice). Sorted by image_id. Idempotent: merging merged groups changes nothing.
    """
    by_md5: dict[str, list[dict[str, Any]]] = {}
    for rec in sorted(records, key=lambda r: r["image_id"]):
        by_md5.setdefault(rec["md5"], []).append(rec)
    groups = []
    for md5, members in by_md5.items():
        ids = sorted({i for m in members for i in m.get("member_ids", (m["image_id"],))})
        points = np.concatenate([m["points"] for m in members])
        points = _first_occurrences(points) if len(ids) == 1 else dedupe_points(points, near_px)
        groups.append(
            {
                "image_id": ids[0],
                "member_ids": tuple(ids),
                "path": members[0]["path"],
                "md5": md5,
                "points": points,
            }
        )
    return sorted(groups, key=lambda g: g["image_id"])


def _first_occurrences(points: np.ndarray) -> np.ndarray:
    """Rows of (N, 3) points without exact repeats, in their original order."""
    _, first = np.unique(points, axis=0, return_index=True)
    return points[np.sort(first)]


def class_counts(split_records: list[dict[str, Any]]) -> np.ndarray:
    """Points per Chula class over records or groups: int64 (13,), indexed by class id."""
    counts = np.zeros(len(CHULA_CLASSES), dtype=np.int64)
    for rec in split_records:
        counts += np.bincount(rec["points"][:, 2], minlength=len(CHULA_CLASSES))
    return counts


SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def chula_split(
    records: list[dict[str, Any]],
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    near_px: float = CHULA_NEAR_DUPLICATE_PX,
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic train / val / test split of Chula by MD5 group (no image leaks across).

    Records are merged with ``chula_groups(records, near_px)`` first, so each split holds group
    records. Groups are assigned greedily, those with the rarest classes first: a group goes to
    the split that lacks its rarest class most (a split without that class at all first, then
    the largest shortfall against ``fraction x groups with that class``, then the largest
    shortfall in groups overall). So a class that is the rarest class of at least 3 groups lands
    in every split (on Chula every class with >= 3 groups does; tested). ``seed`` orders the
    groups within one rarity level, which for most groups decides the split.
    """
    if len(fractions) != 3 or min(fractions) <= 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be 3 positive numbers summing to 1, got {fractions}")
    groups = chula_groups(records, near_px)
    n_cls = len(CHULA_CLASSES)
    present = np.zeros((len(groups), n_cls), dtype=bool)
    for i, g in enumerate(groups):
        present[i, np.unique(g["points"][:, 2])] = True
    groups_per_class = present.sum(axis=0)
    rarity = np.where(present, groups_per_class[None, :], np.iinfo(np.int64).max)
    rarest = rarity.argmin(axis=1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(groups))
    order = order[np.argsort(groups_per_class[rarest[order]], kind="stable")]

    frac = np.asarray(fractions, dtype=np.float64)
    have = np.zeros((3, n_cls), dtype=np.int64)  # groups holding each class, per split
    sizes = np.zeros(3, dtype=np.int64)
    assigned = np.empty(len(groups), dtype=np.int64)
    for i in order:
        c = rarest[i]
        shortfall = frac * groups_per_class[c] - have[:, c]
        overall = frac * len(groups) - sizes
        # Lexicographic: split missing the class, then class shortfall, then overall shortfall.
        key = [(have[s, c] == 0, shortfall[s], overall[s]) for s in range(3)]
        s = max(range(3), key=lambda k: key[k])
        assigned[i] = s
        have[s] += present[i]
        sizes[s] += 1
    return {
        name: [groups[i] for i in np.flatnonzero(assigned == s)]
        for s, name in enumerate(SPLIT_NAMES)
    }


# ---------------------------------------------------------------------------------------------
# Crops and pixel size
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Arrays for training
# ---------------------------------------------------------------------------------------------


def _split_arrays(
    groups: list[dict[str, Any]], um_per_px: float, crop_um: float, out_px: int
) -> dict[str, np.ndarray]:
    """Crops and labels of all points of some groups, as the arrays stored in one .npz."""
    xs, ys, ids, keys = [], [], [], []
    for g in groups:
        image = read_slide(str(g["image_id"]), g["path"])
        pts = g["points"]
        xs.append(cell_crops(image, pts, um_per_px, crop_um, out_px))
        ys.append(pts[:, 2])
        ids.append(np.full(len(pts), g["image_id"]))
        keys.append(np.full(len(pts), g["md5"][:12]))
    if not xs:
        return {
            "x": np.empty((0, out_px, out_px, 3), np.uint8),
            "y": np.empty(0, np.int16),
            "image_id": np.empty(0, np.int32),
            "group": np.empty(0, "<U12"),
        }
    return {
        "x": np.concatenate(xs),
        "y": np.concatenate(ys).astype(np.int16),
        "image_id": np.concatenate(ids).astype(np.int32),
        "group": np.concatenate(keys).astype("<U12"),
    }


def build_chula_arrays(
    root: str | Path,
    out_dir: str | Path,
    seed: int = 0,
    crop_um: float = 14.0,
    out_px: int = 64,
    um_per_px: float = CHULA_UM_PER_PX,
) -> dict[str, Any]:
    """Write train.npz, val.npz and test.npz of Chula cell crops into ``out_dir``.

    Each file holds ``x`` uint8 (N, out_px, out_px, 3), ``y`` int16 (N,) class ids, ``image_id``
    int32 (N,) and ``group`` (N,) the first 12 hex digits of the image MD5. ``out_dir`` should
    be git-ignored. Returns per split the number of groups, crops and crops per class, plus the
    settings used and the wall time.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = chula_split(chula_records(root), seed=seed)
    summary: dict[str, Any] = {
        "seed": seed,
        "um_per_px": um_per_px,
        "crop_um": crop_um,
        "out_px": out_px,
        "classes": list(CHULA_CLASSES),
    }
    for name, groups in splits.items():
        arrays = _split_arrays(groups, um_per_px, crop_um, out_px)
        np.savez_compressed(out / f"{name}.npz", **arrays)
        summary[name] = {
            "groups": len(groups),
            "crops": len(arrays["y"]),
            "per_class": class_counts(groups).tolist(),
        }
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


# ---------------------------------------------------------------------------------------------
# AneRBC-I sample
# ---------------------------------------------------------------------------------------------

# The classical segmenter was tuned on images 001-003 of each group only; every other image
# stays held out for every model.
ANERBC_TRAIN_NUMBERS = frozenset({1, 2, 3})
# Folder of each group and its labels.csv label (0 = healthy, 1 = anemic; AneRBC DATASET.md).
_ANERBC_GROUPS = {"anemic": ("Anemic_individuals", 1), "healthy": ("Healthy_individuals", 0)}
# Masks are white background with dark, tinted cells (DATASET.md): grey below this is a cell.
ANERBC_MASK_THRESHOLD = 128


def anerbc_pairs(root: str | Path) -> list[dict[str, Any]]:
    """Image / mask pairs of the AneRBC-I sample, sorted by group then name.

    Keys: ``name`` ("001_a"), ``number`` int, ``group`` "anemic" / "healthy", ``label`` 1 / 0,
    ``image`` and ``mask`` paths (str). ``root`` holds AneRBC-I/ (or is it).
    """
    root = Path(root)
    base = root / "AneRBC-I" if (root / "AneRBC-I").is_dir() else root
    pairs = []
    for group, (folder, label) in _ANERBC_GROUPS.items():
        images = base / folder / "Original_images"
        if not images.is_dir():
            raise FileNotFoundError(f"no AneRBC-I folder {images}")
        for image in sorted(images.glob("*.png")):
            mask = base / folder / "Binary_segmented" / image.name
            if not mask.is_file():
                raise FileNotFoundError(f"AneRBC-I image {image} has no mask {mask}")
            pairs.append(
                {
                    "name": image.stem,
                    "number": int(image.stem.split("_")[0]),
                    "group": group,
                    "label": label,
                    "image": str(image),
                    "mask": str(mask),
                }
            )
    return pairs


def anerbc_split(pairs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Fixed split: train = images 001-003 of each group, test = all others (004-006 here)."""
    return {
        "train": [p for p in pairs if p["number"] in ANERBC_TRAIN_NUMBERS],
        "test": [p for p in pairs if p["number"] not in ANERBC_TRAIN_NUMBERS],
    }


def load_anerbc(pair: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 (H, W, 3) RGB and foreground mask bool (H, W) (cells True) of one pair."""
    image = read_slide(pair["name"], pair["image"])
    gray = cv2.cvtColor(read_slide(pair["name"], pair["mask"]), cv2.COLOR_RGB2GRAY)
    if gray.shape != image.shape[:2]:
        raise ValueError(f"{pair['name']}: mask {gray.shape} and image {image.shape[:2]} differ")
    return image, gray < ANERBC_MASK_THRESHOLD


# ---------------------------------------------------------------------------------------------
# BCCD
# ---------------------------------------------------------------------------------------------

BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")
BCCD_SPLITS: tuple[str, ...] = ("train", "val", "trainval", "test")


def _parse_voc(path: Path) -> ET.Element:
    """Parse one local VOC file, refusing DTDs and entities (never needed by VOC)."""
    data = path.read_bytes()
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ValueError(f"{path}: DTD or entity declarations are not accepted")
    return ET.fromstring(data)


def _voc_boxes(
    root_el: ET.Element, source: str
) -> tuple[list[tuple[str, int, int, int, int]], int]:
    """Boxes (cls, xmin, ymin, xmax, ymax) of one VOC annotation and how many had no area."""
    boxes, empty = [], 0
    for obj in root_el.iter("object"):
        cls = (obj.findtext("name") or "").strip()
        if cls not in BCCD_CLASSES:
            raise ValueError(f"{source}: unknown class {cls!r}")
        bb = obj.find("bndbox")
        if bb is None:
            raise ValueError(f"{source}: object without bndbox")
        x0, y0, x1, y1 = (
            int(float(bb.findtext(k) or "nan")) for k in ("xmin", "ymin", "xmax", "ymax")
        )
        if x1 <= x0 or y1 <= y0:
            empty += 1
            continue
        boxes.append((cls, x0, y0, x1, y1))
    return boxes, empty


def bccd_boxes(root: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Boxes of the BCCD images of one split (train/val/trainval/test; None = all annotated).

    Returns one dict per image: ``image_id`` ("BloodImage_00000"), ``path`` str, ``boxes`` list
    of (cls, xmin, ymin, xmax, ymax) in pixels, cls in BCCD_CLASSES. Zero-area boxes (2
    upstream) are dropped and logged. ``root`` holds BCCD/ (or is it).
    """
    root = Path(root)
    base = root / "BCCD" if (root / "BCCD").is_dir() else root
    ann = base / "Annotations"
    if split is None:
        ids = sorted(p.stem for p in ann.glob("*.xml"))
    elif split in BCCD_SPLITS:
        lines = (base / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        ids = [s.strip() for s in lines if s.strip()]
    else:
        raise ValueError(f"unknown BCCD split {split!r}; expected one of {BCCD_SPLITS} or None")
    out, dropped = [], 0
    for image_id in ids:
        xml = ann / f"{image_id}.xml"
        boxes, empty = _voc_boxes(_parse_voc(xml), str(xml))
        dropped += empty
        out.append(
            {
                "image_id": image_id,
                "path": str(base / "JPEGImages" / f"{image_id}.jpg"),
                "boxes": boxes,
            }
        )
    if dropped:
        log.info("bccd %s: dropped %d zero-area boxes", split or "all", dropped)
    return out

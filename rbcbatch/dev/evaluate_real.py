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
- Chula RBC-12, the test split (`chula_split(..., seed=0)["test"]`, 98 groups of byte-identical
  images): one slide each, read at CHULA_UM_PER_PX and again with the pixel size left empty
  (`chula-estimated`). The annotated points score the run's cells and class calls
  (rbcbatch.dev.real_scoring).
- BCCD, the test split (72 images; the set states no pixel size): left to the run's estimate
  (`bccd-estimated`), which the run refuses (its interval is too wide: every slide fails), and
  given as 7.5 µm over the train split's median RBC box (`bccd`), the run whose objects are
  matched to the RBC, WBC and platelet boxes.

Besides the red cells called and the flags, `score_tables` gives one table per data set of
everything that can be scored there, each model figure beside a trivial baseline, and for the
runs without a pixel size: slides failed, the estimate per site and scanner against the known
value, and whether each patient's flags equal those of the run with the pixel size given.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import cv2
import duckdb
import numpy as np

from rbcbatch.analytics import query
from rbcbatch.dev import real_scoring as rs
from rbcbatch.dev.datasets import (
    BCCD_CLASSES,
    CHULA_CLASSES,
    CHULA_UM_PER_PX,
    bccd_boxes,
    chula_records,
    chula_split,
    class_counts,
)
from rbcbatch.dev.evaluate import ANERBC_HELD_OUT, ANERBC_UM_PER_PX
from rbcbatch.evaluation.metrics import foreground_scores
from rbcbatch.segment.calibrate import RBC_DIAMETER_UM
from rbcbatch.store.run_store import RunStore

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


# ---------------------------------------------------------------------------------------------
# Chula RBC-12 and BCCD: catalogs and truth
# ---------------------------------------------------------------------------------------------

# Chula's 13 class ids onto rbcbatch's vocabulary (rbcbatch.vocabulary.MORPHOLOGY_CLASSES): the
# loader already names them so ("uncategorised" -> other, "hypochromia" -> hypochromic).
CHULA_VOCABULARY: dict[int, str] = dict(enumerate(CHULA_CLASSES))
CHULA_SPLIT_SEED = 0
# None: every test group (98). A number takes the first that many groups by image id, a fixed
# subset, should the whole split ever be too slow.
CHULA_TEST_LIMIT: int | None = None
BCCD_SPLIT = "test"
# BCCD's box classes and the run's object kinds that answer them.
BCCD_KINDS: dict[str, str] = {"RBC": "rbc", "WBC": "wbc", "Platelets": "platelet"}
# Every BCCD image is 640 x 480 (DATASET.md: all 364 headers read).
BCCD_IMAGE_SIZE = (640, 480)
# What each data set's pixel size is known to be, where it is, and what that rests on.
CHULA_KNOWN = "known: cells, scale bar and camera agree (datasets.CHULA_UM_PER_PX)"
ANERBC_KNOWN = f"not stated; {ANERBC_UM_PER_PX} assumed in the run given a pixel size"
PBC_KNOWN = "not stated; about 0.1 (DATASET.md)"
BCCD_KNOWN = "not stated; from the train split's median RBC box taken as a 7.5 µm cell"


def chula_test_groups(root: Path, limit: int | None = CHULA_TEST_LIMIT) -> list[dict[str, Any]]:
    """The Chula test split's image groups (image path, points x, y, class id), by image id."""
    groups = chula_split(chula_records(root), seed=CHULA_SPLIT_SEED)["test"]
    return groups if limit is None else groups[:limit]


def chula_train_counts(root: Path) -> dict[str, int]:
    """Points per class name in the Chula train split (the majority baseline's class)."""
    train = chula_split(chula_records(root), seed=CHULA_SPLIT_SEED)["train"]
    return {CHULA_VOCABULARY[i]: int(n) for i, n in enumerate(class_counts(train))}


def chula_slide_id(group: dict[str, Any]) -> str:
    return f"chula_{group['image_id']}"


def chula_rows(groups: list[dict[str, Any]], um_per_px: float | str) -> list[dict]:
    """Catalog rows of Chula image groups, one slide and one "patient" each (the set names no
    patients); um_per_px "" leaves it to the run's site/scanner estimate."""
    return [
        {
            "slide_id": chula_slide_id(g),
            "uri": g["path"],
            "patient_id": chula_slide_id(g),
            "site": "chula",
            "scanner": "nikon_ds_fi2_l3",
            "stain": "unknown",
            "um_per_px": um_per_px,
            "label": "unknown",
        }
        for g in groups
    ]


def bccd_test_images(root: Path) -> list[dict[str, Any]]:
    """BCCD test images with their boxes (the 2 zero-area boxes upstream dropped by the loader)."""
    return bccd_boxes(root, BCCD_SPLIT)


def bccd_slide_id(image: dict[str, Any]) -> str:
    return f"bccd_{image['image_id']}"


def bccd_um_per_px(train_images: list[dict[str, Any]]) -> float:
    """A BCCD pixel size from the annotators' boxes: RBC_DIAMETER_UM over the mean of the train
    split's median RBC box width and height (a box is the cell's diameter plus a pixel or two).
    The set states none, and the run's own estimate from the cells is refused there."""
    rbc = [b["RBC"] for b in boxes_by_class(train_images).values()]
    w, h = rs.median_box_size(np.concatenate([np.zeros((0, 4), np.int64), *rbc]))
    return round(RBC_DIAMETER_UM / ((w + h) / 2), 4)


def bccd_rows(images: list[dict[str, Any]], um_per_px: float | str = "") -> list[dict]:
    """Catalog rows of BCCD images, one slide each; um_per_px "" (the set states none) leaves
    it to the run's estimate."""
    return [
        {
            "slide_id": bccd_slide_id(im),
            "uri": im["path"],
            "patient_id": bccd_slide_id(im),
            "site": "bccd",
            "scanner": "unknown",
            "stain": "unknown",
            "um_per_px": um_per_px,
            "label": "unknown",
        }
        for im in images
    ]


def boxes_by_class(images: list[dict[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    """slide_id -> BCCD class -> int64 (N, 4) boxes x0, y0, x1, y1 as annotated."""
    out = {}
    for im in images:
        out[bccd_slide_id(im)] = {
            cls: np.asarray([b[1:] for b in im["boxes"] if b[0] == cls], np.int64).reshape(-1, 4)
            for cls in BCCD_CLASSES
        }
    return out


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
    if (data / "chula_rbc12").is_dir():
        groups = chula_test_groups(data / "chula_rbc12")
        catalogs["chula"] = write_catalog(out / "chula.csv", chula_rows(groups, CHULA_UM_PER_PX))
        catalogs["chula-estimated"] = write_catalog(
            out / "chula-estimated.csv", chula_rows(groups, "")
        )
    if (data / "bccd").is_dir():
        images = bccd_test_images(data / "bccd")
        # The run's own estimate is refused there (too wide an interval), so the boxes are
        # scored on a run given the pixel size of the train split's boxes, the estimate's beside.
        um_per_px = bccd_um_per_px(bccd_boxes(data / "bccd", "train"))
        catalogs["bccd"] = write_catalog(out / "bccd.csv", bccd_rows(images, um_per_px))
        catalogs["bccd-estimated"] = write_catalog(out / "bccd-estimated.csv", bccd_rows(images))
    return catalogs


def read_catalog_rows(path: Path) -> list[dict]:
    """The rows of a catalog CSV written by `write_catalog`."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def catalog_size(path: Path) -> int:
    """Slides in a catalog CSV."""
    return len(read_catalog_rows(path))


# ---------------------------------------------------------------------------------------------
# What the scores read from a run
# ---------------------------------------------------------------------------------------------

# Every object's call: a red-cell class, or the kind of a white cell or platelet.
CALLS_SQL = "SELECT slide_id, cell_id, class FROM cells"
# Every object's box (cells cut by the image edge too: annotators box those as well).
BOXES_SQL = """
SELECT slide_id, kind, bbox_x0, bbox_y0, bbox_x1, bbox_y1 FROM cells ORDER BY slide_id, cell_id
"""
# The pixel size per site and scanner: one value per group when estimated (engine.calibration).
PIXEL_SIZE_SQL = """
SELECT site, scanner, count(*) AS slides, string_agg(DISTINCT um_per_px_source, ',')
       AS um_per_px_source, min(um_per_px) AS um_per_px_min, max(um_per_px) AS um_per_px_max,
       max(calibration_cells) AS calibration_cells
FROM slides GROUP BY ALL ORDER BY 1, 2
"""
# Failed slides per stage and error (failures.parquet, consolidated at the end of a run).
FAILURES_SQL = """
SELECT stage, error_type, count(*) AS slides, min(message) AS message
FROM read_parquet(?) GROUP BY ALL ORDER BY slides DESC, stage
"""
PATIENT_FLAGS_SQL = """
SELECT patient_id, label, hs_flag, anemia_flag FROM patients ORDER BY patient_id
"""


def run_calls(run_dir: Path) -> dict[str, dict[int, str]]:
    """slide_id -> cell_id -> call, of a run."""
    out: dict[str, dict[int, str]] = {}
    for row in query(str(run_dir), CALLS_SQL).to_pylist():
        out.setdefault(row["slide_id"], {})[int(row["cell_id"])] = row["class"]
    return out


def chula_point_calls(
    run_dir: Path, groups: list[dict[str, Any]]
) -> tuple[list[str], list[str | None]]:
    """Every annotated point's class name and the call of the run's cell whose mask holds it
    (level 0 of masks.zarr); None where no cell does or the slide did not commit."""
    store, calls = RunStore(str(run_dir)), run_calls(run_dir)
    true: list[str] = []
    called: list[str | None] = []
    for g in groups:
        slide = chula_slide_id(g)
        true += [CHULA_VOCABULARY[int(c)] for c in g["points"][:, 2]]
        if slide not in calls:
            called += [None] * len(g["points"])
            continue
        labels = store.label_levels(slide)[0][...]
        called += rs.calls_at_points(rs.cells_at_points(labels, g["points"]), calls[slide])
    return true, called


def run_boxes(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """slide_id -> object kind -> int64 (N, 4) bboxes x0, y0, x1, y1 (half-open), of a run."""
    table = query(str(run_dir), BOXES_SQL).to_pydict()
    grouped: dict[str, dict[str, list]] = {}
    for slide, kind, *box in zip(
        table["slide_id"],
        table["kind"],
        *(table[k] for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")),
        strict=True,
    ):
        grouped.setdefault(slide, {}).setdefault(kind, []).append(box)
    return {
        s: {k: np.asarray(v, np.int64).reshape(-1, 4) for k, v in kinds.items()}
        for s, kinds in grouped.items()
    }


def patient_flags(run_dir: Path) -> list[dict]:
    """patient_id, label, hs_flag, anemia_flag of every patient of a run."""
    return query(str(run_dir), PATIENT_FLAGS_SQL).to_pylist()


def pixel_sizes(run_dir: Path) -> list[dict]:
    return query(str(run_dir), PIXEL_SIZE_SQL).to_pylist()


def run_failures(run_dir: Path) -> list[dict]:
    """A run's failed slides per stage and error, with one message (`FAILURES_SQL`)."""
    path = run_dir / "failures.parquet"
    if not path.is_file():
        return []
    with duckdb.connect() as con:
        cursor = con.execute(FAILURES_SQL, [str(path)])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


# ---------------------------------------------------------------------------------------------
# Scores (pure: from what the runs hold and the truth)
# ---------------------------------------------------------------------------------------------

_EMPTY = np.zeros((0, 4), np.int64)


def bccd_counts(
    pred: dict[str, dict[str, np.ndarray]],
    truth: dict[str, dict[str, np.ndarray]],
    baseline_sizes: dict[str, tuple[int, int]],
) -> dict[str, dict[str, dict[str, int]]]:
    """Detection counts (matched, n_pred, n_true) summed over BCCD images, per box class: the
    run's objects of the class's kind ("model"), the run's objects of any kind ("any_kind",
    found at all), and a grid of the train split's median box of that class ("baseline")."""
    width, height = BCCD_IMAGE_SIZE
    out = {}
    for cls, kind in BCCD_KINDS.items():
        grid = rs.grid_boxes(width, height, *baseline_sizes[cls])
        model, any_kind, base = [], [], []
        for slide, boxes in truth.items():
            objects = pred.get(slide, {})
            everything = np.concatenate([_EMPTY, *objects.values()])
            model.append(rs.detection_counts(objects.get(kind, _EMPTY), boxes[cls]))
            any_kind.append(rs.detection_counts(everything, boxes[cls]))
            base.append(rs.detection_counts(grid, boxes[cls]))
        out[cls] = {
            "model": rs.add_counts(model),
            "any_kind": rs.add_counts(any_kind),
            "baseline": rs.add_counts(base),
        }
    return out


def bccd_baseline_sizes(train_images: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """The median box (width, height) of each BCCD class in the train split."""
    truth = boxes_by_class(train_images)
    return {
        cls: rs.median_box_size(np.concatenate([_EMPTY, *(b[cls] for b in truth.values())]))
        for cls in BCCD_CLASSES
    }


def flags_by_patient(rows: list[dict]) -> dict[str, tuple[str, str]]:
    return {r["patient_id"]: (r["hs_flag"], r["anemia_flag"]) for r in rows}


def pixel_size_rows(
    n_catalog: int,
    sizes: list[dict],
    failures: list[dict],
    reference: tuple[float | None, str],
    flags_equal: tuple[tuple[int, int], str] | None = None,
) -> list[dict]:
    """Table rows of a run with the pixel size left empty: slides failed (and why, per stage
    and error), the estimate per site and scanner (`PIXEL_SIZE_SQL` rows) beside the reference
    value (value or None, what it is), and the patients' flags equal to those of the run with
    the pixel size given ((equal, patients), what was given)."""
    ref, ref_is = reference
    committed = sum(r["slides"] for r in sizes)
    rows = [
        _row(
            "pixel size empty: slides failed", rs.fmt_pct(n_catalog - committed, n_catalog), "", ""
        )
    ]
    rows += [
        _row(f"  failed at {f['stage']} ({f['error_type']}, {f['slides']})", f["message"], "", "")
        for f in failures
    ]
    for r in sizes:
        lo, hi = r["um_per_px_min"], r["um_per_px_max"]
        value = f"{lo:.4f}" if lo == hi else f"{lo:.4f}-{hi:.4f}"
        off = f" ({(lo + hi) / 2 / ref - 1:+.1%})" if ref else ""
        rows.append(
            _row(
                f"µm/px {r['um_per_px_source']}, {r['site']} / {r['scanner']}",
                f"{value}{off} from {r['calibration_cells']} cells",
                "" if ref is None else f"{ref:.4f}",
                ref_is,
            )
        )
    if flags_equal is not None:
        (equal, n), given = flags_equal
        rows.append(
            _row(
                f"patients' HS and anemia flags equal to the run with {given}",
                rs.fmt_ratio(equal, n),
                "",
                "",
            )
        )
    return rows


MODEL = "model"
BASELINE = "baseline"


def _row(metric: str, model: str, baseline: str, baseline_is: str) -> dict:
    return {"metric": metric, MODEL: model, BASELINE: baseline, "baseline is": baseline_is}


def chula_rows_scored(
    given: dict, estimated: dict | None, majority: str, classes: tuple[str, ...] = CHULA_CLASSES
) -> list[dict]:
    """Table rows of the Chula scores: `given` and `estimated` are `point_scores` of the runs
    with the pixel size given and left empty; the baseline calls every found cell `majority`."""
    found = given["classes"]
    n_found = found["macro"]["n"]
    # The baseline scored on the same found points.
    true_found = [c for c in classes for _ in range(found[c]["n"])]
    base = rs.class_scores(true_found, [majority] * n_found, classes)
    base_text = f"every cell '{majority}' (train split's most frequent class)"
    rows = [
        _row(
            "points in a cell's mask (cell recall)",
            rs.fmt_ratio(given["found"], given["points"]),
            "",
            "",
        ),
        _row(
            "macro-F1 over the 13 classes",
            rs.fmt_value(found["macro"]["macro_f1"]),
            rs.fmt_value(base["macro"]["macro_f1"]),
            base_text,
        ),
        _row(
            "spherocyte recall",
            rs.fmt_ratio(found["spherocyte"]["tp"], found["spherocyte"]["n"]),
            rs.fmt_value(base["spherocyte"]["recall"]),
            base_text,
        ),
        _row(
            "spherocyte precision",
            rs.fmt_ratio(found["spherocyte"]["tp"], found["spherocyte"]["called"]),
            rs.fmt_value(base["spherocyte"]["precision"]),
            base_text,
        ),
    ]
    rows += [_row(m, mv, bv, base_text) for m, mv, bv in rs.class_rows(classes, found, base)]
    if estimated is not None:
        est = estimated["classes"]
        rows += [
            _row(
                "pixel size empty: cell recall",
                rs.fmt_ratio(estimated["found"], estimated["points"]),
                "",
                "",
            ),
            _row(
                "pixel size empty: macro-F1",
                rs.fmt_value(est["macro"]["macro_f1"]),
                rs.fmt_value(found["macro"]["macro_f1"]),
                "the run with 0.195 given",
            ),
            _row(
                "pixel size empty: spherocyte recall / precision",
                f"{rs.fmt_value(est['spherocyte']['recall'])} / {rs.fmt_value(est['spherocyte']['precision'])}",
                f"{rs.fmt_value(found['spherocyte']['recall'])} / {rs.fmt_value(found['spherocyte']['precision'])}",
                "the run with 0.195 given",
            ),
        ]
    return rows


def bccd_rows_scored(counts: dict[str, dict[str, dict[str, int]]], sizes: dict) -> list[dict]:
    """Table rows of the BCCD detection counts (`bccd_counts`)."""
    rows = []
    for cls, kind in BCCD_KINDS.items():
        c = counts[cls]
        base = rs.recall_precision(c["baseline"])
        base_text = f"grid of {sizes[cls][0]}x{sizes[cls][1]} px boxes (train median {cls} box)"
        rows.append(
            _row(
                f"{cls} recall (objects of kind {kind})",
                rs.fmt_ratio(c["model"]["matched"], c["model"]["n_true"]),
                rs.fmt_value(base["recall"]),
                base_text,
            )
        )
        rows.append(
            _row(
                f"{cls} precision (objects of kind {kind})",
                rs.fmt_ratio(c["model"]["matched"], c["model"]["n_pred"]),
                rs.fmt_value(base["precision"]),
                base_text,
            )
        )
        if kind != "rbc":
            rows.append(
                _row(
                    f"{cls} boxes matched by an object of any kind",
                    rs.fmt_ratio(c["any_kind"]["matched"], c["any_kind"]["n_true"]),
                    rs.fmt_value(base["recall"]),
                    base_text,
                )
            )
    return rows


def flag_rows(runs: dict[str, list[dict]]) -> list[dict]:
    """Table rows of the flags against the labels, per run (name -> `patient_flags` rows): the
    HS flag on individuals none of whom has HS, the anemia flag on anemic and healthy ones;
    beside each, the baseline that flags nobody."""
    rows = []
    nobody = "flag nobody"
    for name, patients in runs.items():
        labels = {p["patient_id"]: p["label"] for p in patients}
        hs = rs.flag_counts({p["patient_id"]: p["hs_flag"] for p in patients}, labels)
        anemia = rs.flag_counts({p["patient_id"]: p["anemia_flag"] for p in patients}, labels)
        n = sum(v["individuals"] for v in hs.values())
        not_hs = n - sum(v["positive"] for v in hs.values())
        insufficient = sum(v["insufficient"] for v in hs.values())
        rows.append(
            _row(
                f"{name}: HS flag not positive (nobody has HS; {insufficient} insufficient)",
                rs.fmt_ratio(not_hs, n),
                rs.fmt_ratio(n, n),
                nobody,
            )
        )
        if "anemic" in anemia:
            a = anemia["anemic"]
            rows.append(
                _row(
                    f"{name}: anemic individuals flagged anemic ({a['insufficient']} insufficient)",
                    rs.fmt_ratio(a["positive"], a["individuals"]),
                    rs.fmt_ratio(0, a["individuals"]),
                    nobody,
                )
            )
        if "normal" in anemia:
            h = anemia["normal"]
            rows.append(
                _row(
                    f"{name}: healthy individuals not flagged anemic "
                    f"({h['insufficient']} insufficient)",
                    rs.fmt_ratio(h["individuals"] - h["positive"], h["individuals"]),
                    rs.fmt_ratio(h["individuals"], h["individuals"]),
                    nobody,
                )
            )
    return rows


# ---------------------------------------------------------------------------------------------
# One table per data set
# ---------------------------------------------------------------------------------------------

PRECISION_CAVEAT_CHULA = (
    "precision over annotated cells only: Chula's points do not cover every cell"
)
PRECISION_CAVEAT_BCCD = "precision understated: BCCD's RBC boxes do not cover every red cell"


def _named(rows: list[dict], model: str) -> list[dict]:
    """Rows with the model column named after the model."""
    return [{k if k != MODEL else model: v for k, v in r.items()} for r in rows]


def blank_run_rows(
    blank: Path,
    catalog: Path,
    reference: tuple[float | None, str],
    given: tuple[Path, str] | None = None,
) -> list[dict]:
    """`pixel_size_rows` of the run `blank` (pixel size left empty) of `catalog`; given: the
    run of the same slides with the pixel size given, and what was given."""
    agree = None
    if given is not None:
        equal = rs.flags_agreement(
            flags_by_patient(patient_flags(given[0])), flags_by_patient(patient_flags(blank))
        )
        agree = (equal, given[1])
    return pixel_size_rows(
        catalog_size(catalog), pixel_sizes(blank), run_failures(blank), reference, agree
    )


def chula_table(root: Path, runs: dict[str, Path], catalogs: dict[str, Path], model: str):
    """(title, rows) of Chula: points matched to cells and class calls, the run with the pixel
    size given and (when run) the one with it left empty."""
    groups = chula_test_groups(root)
    given = rs.point_scores(*chula_point_calls(runs["chula"], groups), CHULA_CLASSES)
    estimated, px_rows = None, []
    if "chula-estimated" in runs:
        blank = runs["chula-estimated"]
        estimated = rs.point_scores(*chula_point_calls(blank, groups), CHULA_CLASSES)
        px_rows = blank_run_rows(
            blank,
            catalogs["chula-estimated"],
            (CHULA_UM_PER_PX, CHULA_KNOWN),
            (runs["chula"], f"{CHULA_UM_PER_PX} µm/px given"),
        )
    majority = rs.majority_class(chula_train_counts(root))
    rows = chula_rows_scored(given, estimated, majority) + px_rows
    title = (
        f"Chula RBC-12 test split ({len(groups)} image groups, {given['points']} points, "
        f"{CHULA_UM_PER_PX} µm/px given), {model}: points in cells' masks, class calls of those "
        f"cells; {PRECISION_CAVEAT_CHULA}"
    )
    return title, _named(rows, model)


def bccd_table(root: Path, runs: dict[str, Path], catalogs: dict[str, Path], model: str):
    """(title, rows) of BCCD: the run's objects matched to the boxes at IoU >= 0.5, on the run
    given the pixel size of the train split's boxes; the run left to its estimate beside."""
    images, train = bccd_test_images(root), bccd_boxes(root, "train")
    sizes, um_per_px = bccd_baseline_sizes(train), bccd_um_per_px(train)
    counts = bccd_counts(run_boxes(runs["bccd"]), boxes_by_class(images), sizes)
    rows = bccd_rows_scored(counts, sizes)
    if "bccd-estimated" in runs:
        rows += blank_run_rows(
            runs["bccd-estimated"],
            catalogs["bccd-estimated"],
            (um_per_px, BCCD_KNOWN),
            (runs["bccd"], f"{um_per_px} µm/px given (train boxes)"),
        )
    n_boxes = sum(len(im["boxes"]) for im in images)
    title = (
        f"BCCD test split ({len(images)} images, {n_boxes} boxes; {um_per_px} µm/px from the "
        f"train split's RBC boxes), {model}: objects matched to boxes one-to-one at IoU >= "
        f"{rs.IOU_THRESHOLD}; {PRECISION_CAVEAT_BCCD}"
    )
    return title, _named(rows, model)


def anerbc_dice(run_dir: Path, catalog: Path) -> list[dict]:
    """Per image of `catalog`: foreground Dice of the run's mask and of the Otsu baseline
    against the image's AneRBC mask (``Binary_segmented``, grey < 128 is a cell)."""
    store = RunStore(str(run_dir))
    rows = []
    for row in read_catalog_rows(catalog):
        image_path = Path(row["uri"])
        truth_path = image_path.parent.parent / "Binary_segmented" / image_path.name
        truth = cv2.imread(str(truth_path), cv2.IMREAD_GRAYSCALE) < 128
        image = cv2.cvtColor(cv2.imread(str(image_path)), cv2.COLOR_BGR2RGB)
        found = store.label_levels(row["slide_id"])[0][:] > 0
        rows.append(
            {
                "image": image_path.name,
                "model": foreground_scores(found, truth)["dice"],
                "baseline": foreground_scores(rs.otsu_foreground(image), truth)["dice"],
            }
        )
    return rows


def dice_rows(per_image: list[dict]) -> list[dict]:
    """Table rows: mean and lowest foreground Dice over the images, model beside baseline."""
    otsu = "Otsu threshold of the grey image, holes filled"
    return [
        _row(
            f"foreground Dice, {how} of {len(per_image)} images",
            f"{fn([r['model'] for r in per_image]):.3f}",
            f"{fn([r['baseline'] for r in per_image]):.3f}",
            otsu,
        )
        for how, fn in (("mean", np.mean), ("lowest", np.min))
    ]


def anerbc_table(runs: dict[str, Path], catalogs: dict[str, Path], model: str):
    """(title, rows) of AneRBC 004-006: Dice against the masks, flags against the labels, both
    pixel sizes."""
    assumed = f"{ANERBC_UM_PER_PX} µm/px assumed"
    dice = dice_rows(anerbc_dice(runs["anerbc"], catalogs["anerbc"]))
    flags = {assumed: patient_flags(runs["anerbc"])}
    px_rows = []
    if "anerbc-estimated" in runs:
        blank = runs["anerbc-estimated"]
        flags["pixel size estimated"] = patient_flags(blank)
        px_rows = blank_run_rows(
            blank,
            catalogs["anerbc-estimated"],
            (ANERBC_UM_PER_PX, ANERBC_KNOWN),
            (runs["anerbc"], assumed),
        )
    title = (
        f"AneRBC-I 004-006 (3 healthy, 3 anemic individuals), {model}: Dice against the masks "
        f"(run at {assumed}), flags against labels"
    )
    return title, _named(dice + flag_rows(flags) + px_rows, model)


def pbc_table(runs: dict[str, Path], catalogs: dict[str, Path], model: str):
    """(title, rows) of the PBC held-back split: the flags of healthy donors, the pixel size."""
    rows = flag_rows({"pbc": patient_flags(runs["pbc"])})
    rows += blank_run_rows(runs["pbc"], catalogs["pbc"], (None, PBC_KNOWN))
    title = f"PBC held-back split (240 images of healthy donors; pixel size estimated), {model}"
    return title, _named(rows, model)


def score_tables(
    data: Path, runs: dict[str, Path], catalogs: dict[str, Path], model: str
) -> list[tuple[str, list[dict]]]:
    """One (title, rows) per real data set that was run: everything scored there, each model
    figure beside its baseline. runs / catalogs: by the names of `real_catalogs`."""
    tables = []
    if "chula" in runs:
        tables.append(chula_table(data / "chula_rbc12", runs, catalogs, model))
    if "bccd" in runs:
        tables.append(bccd_table(data / "bccd", runs, catalogs, model))
    if "anerbc" in runs:
        tables.append(anerbc_table(runs, catalogs, model))
    if "pbc" in runs:
        tables.append(pbc_table(runs, catalogs, model))
    return tables

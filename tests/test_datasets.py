"""Loaders of the real data sets (Chula RBC-12, AneRBC-I sample, BCCD) and the µm-normalised crops.

Counts asserted here are the ones stated in each data set's DATASET.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rbcbatch.classify.crops import cell_crops
from rbcbatch.dev import datasets as D
from rbcbatch.dev.synth import render_field
from rbcbatch.io.sources import sniff_format
from rbcbatch.segment import calibrate as C
from tests.conftest import shared_dataset

# Points per class of all 623 Chula label files (chula_rbc12/DATASET.md, class table).
CHULA_TABLE = (6330, 689, 461, 3449, 2753, 1996, 2140, 307, 785, 897, 184, 1063, 1052)
# Images containing each class (same table).
CHULA_IMAGES_WITH_CLASS = (346, 183, 180, 214, 264, 92, 258, 127, 82, 222, 34, 181, 32)


@pytest.fixture(scope="module")
def chula_root():
    return shared_dataset("chula_rbc12")


@pytest.fixture(scope="module")
def chula(chula_root):
    return D.chula_records(chula_root)


@pytest.fixture(scope="module")
def chula_splits(chula):
    return D.chula_split(chula, seed=0)


# --- Chula records and groups ----------------------------------------------------------------


def test_chula_label_files_and_records(chula_root, chula):
    labels = D.read_chula_labels(chula_root)
    assert len(labels) == 623
    empty = [i for i, p in labels.items() if len(p) == 0]
    assert len(empty) == 2
    assert len(chula) == 623 - len(empty)
    rec = chula[0]
    assert rec["image_id"] == 1 and rec["path"].endswith("Dataset/1.jpg")
    assert len(rec["md5"]) == 32
    assert rec["points"].dtype == np.int32 and rec["points"].shape[1] == 3
    assert rec["points"][0].tolist() == [594, 95, 0]  # first line of Label/1.txt


def test_chula_class_totals_match_dataset_md(chula):
    counts = D.class_counts(chula)
    assert counts.tolist() == list(CHULA_TABLE)
    assert counts.sum() == 22106
    with_class = np.zeros(len(D.CHULA_CLASSES), dtype=int)
    for rec in chula:
        with_class[np.unique(rec["points"][:, 2])] += 1
    assert with_class.tolist() == list(CHULA_IMAGES_WITH_CLASS)
    elliptocyte_ids = {r["image_id"] for r in chula if (r["points"][:, 2] == 12).any()}
    assert elliptocyte_ids == set(range(707, 739))
    assert len(D.CHULA_CLASSES) == 13 and D.CHULA_CLASSES[3] == "spherocyte"


def test_chula_groups_merge_identical_images(chula):
    groups = D.chula_groups(chula)
    multi = {g["member_ids"]: g for g in groups if len(g["member_ids"]) > 1}
    # 22 byte-identical pairs upstream; 609 of the pair 562/609 has no label file.
    assert len(multi) == 21
    assert len(groups) == len(chula) - 21
    assert len({g["md5"] for g in groups}) == len(groups)
    by_id = {r["image_id"]: r for r in chula}
    g = multi[(248, 249)]
    assert g["image_id"] == 248
    n_members = len(by_id[248]["points"]) + len(by_id[249]["points"])
    assert len(g["points"]) <= n_members == 110
    # Pooled but deduplicated: fewer points overall, and merging again changes nothing.
    total = int(D.class_counts(groups).sum())
    assert 22106 - 200 < total < 22106
    again = D.chula_groups(groups)
    assert [len(x["points"]) for x in again] == [len(x["points"]) for x in groups]


def test_dedupe_points_same_class_within_radius():
    pts = np.array(
        [[10, 10, 0], [10, 10, 0], [12, 12, 0], [12, 12, 3], [20, 10, 0], [13, 10, 0]],
        dtype=np.int32,
    )
    kept = D.dedupe_points(pts, radius_px=3.0)
    # exact repeat and the same-class point 2.8 px away go; another class or 10 px away stay;
    # (13, 10) is exactly 3 px from (10, 10): within the radius.
    assert kept.tolist() == [[10, 10, 0], [12, 12, 3], [20, 10, 0]]


# --- Chula split ------------------------------------------------------------------------------


def test_chula_split_has_no_md5_across_splits(chula, chula_splits):
    md5s = {name: {g["md5"] for g in groups} for name, groups in chula_splits.items()}
    assert set(md5s) == {"train", "val", "test"}
    assert not md5s["train"] & md5s["val"]
    assert not md5s["train"] & md5s["test"]
    assert not md5s["val"] & md5s["test"]
    all_groups = D.chula_groups(chula)
    assert sum(len(v) for v in md5s.values()) == len(all_groups)
    # Every labelled image lands in exactly one split, through its group.
    members = [i for groups in chula_splits.values() for g in groups for i in g["member_ids"]]
    assert sorted(members) == [r["image_id"] for r in chula]
    sizes = np.array([len(chula_splits[k]) for k in ("train", "val", "test")]) / len(all_groups)
    assert np.allclose(sizes, (0.7, 0.15, 0.15), atol=0.05)


def test_chula_split_is_deterministic_for_a_seed(chula, chula_splits):
    def ids(splits):
        return {k: [g["image_id"] for g in v] for k, v in splits.items()}

    assert ids(D.chula_split(chula, seed=0)) == ids(chula_splits)
    assert ids(D.chula_split(chula, seed=1)) != ids(chula_splits)


def test_chula_split_puts_every_common_class_in_every_split(chula, chula_splits):
    groups_with = np.zeros(len(D.CHULA_CLASSES), dtype=int)
    for g in D.chula_groups(chula):
        groups_with[np.unique(g["points"][:, 2])] += 1
    for seed in (0, 1):
        splits = chula_splits if seed == 0 else D.chula_split(chula, seed=seed)
        for name, groups in splits.items():
            counts = D.class_counts(groups)
            missing = [
                D.CHULA_CLASSES[c] for c in np.flatnonzero(groups_with >= 3) if not counts[c]
            ]
            assert not missing, f"seed {seed}: {name} lacks {missing}"


def test_chula_split_rejects_bad_fractions(chula):
    with pytest.raises(ValueError, match="fractions"):
        D.chula_split(chula[:10], fractions=(0.8, 0.15, 0.15))


# --- Chula images -----------------------------------------------------------------------------


def test_chula_png_named_jpg_decode(chula_root):
    from rbcbatch.io.sources import read_slide

    pngs = []
    for image_id in range(1, 739):
        path = chula_root / "Dataset" / f"{image_id}.jpg"
        with open(path, "rb") as f:
            if sniff_format(f.read(16)) == "png":
                pngs.append(path)
    assert [int(p.stem) for p in pngs] == list(range(707, 739))
    for path in pngs:
        image = read_slide(path.stem, str(path))
        assert image.shape == (480, 640, 3) and image.dtype == np.uint8


def test_chula_crops_of_real_image(chula):
    from rbcbatch.io.sources import read_slide

    rec = chula[0]
    image = read_slide(str(rec["image_id"]), rec["path"])
    crops = cell_crops(image, rec["points"], D.CHULA_UM_PER_PX)
    assert crops.shape == (len(rec["points"]), 64, 64, 3) and crops.dtype == np.uint8
    # Centred on a red cell: the centre is darker than the crop's brightest (background) part.
    centre = crops[:, 28:36, 28:36].mean(axis=(1, 2, 3))
    assert np.median(centre) < np.median(crops.reshape(len(crops), -1).max(axis=1)) - 20


# --- crops and pixel size on synthetic input --------------------------------------------------


def _disk_image(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    image = np.full((h, w, 3), 230, dtype=np.uint8)
    image[inside] = (120, 60, 90)
    return image


@pytest.mark.parametrize("um_per_px", [0.195, 0.25, 0.1])
def test_cell_crop_shows_disk_at_expected_size(um_per_px):
    diameter_um, crop_um, out_px = 7.5, 14.0, 64
    r = diameter_um / 2 / um_per_px
    image = _disk_image(300, 400, 200.0, 150.0, r)
    crops = cell_crops(image, np.array([[200, 150], [0, 0]]), um_per_px, crop_um, out_px)
    assert crops.shape == (2, out_px, out_px, 3)
    dark = crops[0, ..., 1] < 145
    expected = diameter_um / crop_um * out_px  # 34.3 px whatever the source pixel size
    assert abs(2 * math.sqrt(dark.sum() / math.pi) - expected) < 1.0
    ys, xs = np.nonzero(dark)
    assert abs(xs.mean() - (out_px - 1) / 2) < 1.0 and abs(ys.mean() - (out_px - 1) / 2) < 1.0
    # At the corner, reflect padding mirrors the image: no cell there, only background.
    assert crops[1].min() == 230


def test_cell_crop_reflects_a_corner_disk_into_a_whole_one():
    um_per_px = 0.2
    image = _disk_image(200, 200, 0.0, 0.0, 7.5 / 2 / um_per_px)
    crop = cell_crops(image, np.array([[0, 0, 3]]), um_per_px)[0]
    dark = crop[..., 1] < 145
    assert abs(2 * math.sqrt(dark.sum() / math.pi) - 7.5 / 14 * 64) < 1.5
    assert dark[:32].sum() > 0.4 * dark.sum() and dark[:, :32].sum() > 0.4 * dark.sum()


def test_cell_crops_empty_and_invalid():
    image = np.zeros((50, 50, 3), np.uint8)
    assert cell_crops(image, np.empty((0, 3)), 0.2).shape == (0, 64, 64, 3)
    with pytest.raises(ValueError):
        cell_crops(image, np.array([[1, 2]]), 0.0)


@pytest.mark.parametrize("site", ["site_a", "site_b"])
def test_estimate_um_per_px_on_synthetic_field(site):
    from rbcbatch.dev.synth import SITES

    field = render_field(np.random.default_rng(0), "normal", site, 600, 800)
    est, n = C.estimate_um_per_px(field.image)
    truth = SITES[site]["um_per_px"]
    assert n >= 20
    assert abs(est - truth) / truth < 0.10


def test_estimate_um_per_px_blank_image():
    est, n = C.estimate_um_per_px(np.full((100, 100, 3), 220, np.uint8))
    assert n == 0 and math.isnan(est)


# --- AneRBC -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def anerbc():
    return D.anerbc_pairs(shared_dataset("anerbc_sample"))


def test_anerbc_pairs_and_fixed_split(anerbc):
    assert len(anerbc) == 12
    assert sum(p["label"] for p in anerbc) == 6
    assert all((p["group"] == "anemic") == (p["label"] == 1) for p in anerbc)
    assert all(p["name"].endswith("_a" if p["label"] else "_h") for p in anerbc)
    split = D.anerbc_split(anerbc)
    train = {p["name"] for p in split["train"]}
    test = {p["name"] for p in split["test"]}
    assert len(train) == len(test) == 6 and not train & test
    assert train == {f"00{i}_{g}" for i in (1, 2, 3) for g in "ah"}
    assert test == {f"00{i}_{g}" for i in (4, 5, 6) for g in "ah"}


def test_anerbc_masks_match_the_stained_cells(anerbc):
    fractions = {}
    for pair in anerbc:
        image, mask = D.load_anerbc(pair)
        assert image.shape == (960, 1224, 3) and image.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        fractions[pair["name"]] = float(mask.mean())
    # Measured 0.21 (004_a, a sparse field) to 0.50 (006_h); DATASET.md: 0.35 / 0.36 for 001.
    assert all(0.15 < f < 0.6 for f in fractions.values()), fractions
    assert abs(fractions["001_a"] - 0.35) < 0.01 and abs(fractions["001_h"] - 0.36) < 0.01
    # Right polarity and alignment: the mask agrees with the image's own stain threshold.
    image, mask = D.load_anerbc(anerbc[0])
    assert (C._foreground(image) == mask).mean() > 0.95


# --- BCCD -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bccd_root():
    return shared_dataset("bccd")


def _class_totals(images: list[dict]) -> dict[str, int]:
    totals = dict.fromkeys(D.BCCD_CLASSES, 0)
    for img in images:
        for box in img["boxes"]:
            totals[box[0]] += 1
    return totals


def test_bccd_all_boxes_without_zero_area(bccd_root):
    images = D.bccd_boxes(bccd_root)
    assert len(images) == 364
    assert _class_totals(images) == {"RBC": 4155 - 2, "WBC": 372, "Platelets": 361}
    for img in images:
        for _, x0, y0, x1, y1 in img["boxes"]:
            assert 0 <= x0 < x1 and 0 <= y0 < y1
    assert images[0]["image_id"] == "BloodImage_00000"
    assert images[0]["boxes"][0] == ("WBC", 260, 177, 491, 376)


def test_bccd_splits_partition_the_images(bccd_root):
    split = {name: D.bccd_boxes(bccd_root, name) for name in D.BCCD_SPLITS}
    sizes = {name: len(v) for name, v in split.items()}
    assert sizes == {"train": 205, "val": 87, "trainval": 292, "test": 72}
    ids = {name: {img["image_id"] for img in v} for name, v in split.items()}
    assert ids["train"] | ids["val"] == ids["trainval"] and not ids["train"] & ids["val"]
    assert len(ids["trainval"] | ids["test"]) == 364 and not ids["trainval"] & ids["test"]
    train_val = _class_totals(split["train"] + split["val"])
    assert train_val == _class_totals(split["trainval"])
    both = _class_totals(split["trainval"] + split["test"])
    assert both == {"RBC": 4153, "WBC": 372, "Platelets": 361}
    assert all((bccd_root / "BCCD" / "JPEGImages" / f"{i}.jpg").is_file() for i in ids["test"])


def test_bccd_rejects_entities_and_unknown_split(tmp_path, bccd_root):
    bad = tmp_path / "BCCD" / "Annotations"
    bad.mkdir(parents=True)
    (bad / "x.xml").write_text('<!DOCTYPE a [<!ENTITY e "boom">]><annotation>&e;</annotation>')
    with pytest.raises(ValueError, match="entity"):
        D.bccd_boxes(tmp_path)
    with pytest.raises(ValueError, match="split"):
        D.bccd_boxes(bccd_root, "holdout")


# --- arrays -----------------------------------------------------------------------------------


def test_split_arrays_layout(chula_splits):
    groups = chula_splits["val"][:3]
    arrays = D._split_arrays(groups, D.CHULA_UM_PER_PX, 14.0, 32)
    n = sum(len(g["points"]) for g in groups)
    assert arrays["x"].shape == (n, 32, 32, 3) and arrays["x"].dtype == np.uint8
    assert arrays["y"].dtype == np.int16 and arrays["image_id"].dtype == np.int32
    assert arrays["group"].dtype == np.dtype("<U12")
    assert set(arrays["group"]) == {g["md5"][:12] for g in groups}
    assert np.bincount(arrays["y"], minlength=13).tolist() == D.class_counts(groups).tolist()

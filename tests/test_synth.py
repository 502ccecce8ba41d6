"""Synthetic cohort generator: determinism, truth consistency and cohort files."""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
import pandas as pd
import pytest

from rbcbatch.dev import synth
from rbcbatch.vocabulary import MORPHOLOGY_CLASSES, OBJECT_KINDS

H, W = 150, 200  # small fields keep the tests fast


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("cohort")
    return synth.synth_cohort(out, n_patients=3, images_per_patient=2, seed=5, height=H, width=W)


def _field(seed: int, condition: str = "normal", site: str = "site_a", **kw) -> synth.Field:
    return synth.render_field(np.random.default_rng(seed), condition, site, 240, 320, **kw)


def test_render_field_is_deterministic() -> None:
    a, b = _field(3), _field(3)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.labels, b.labels)
    assert a.cells == b.cells
    assert not np.array_equal(a.image, _field(4).image)


def test_field_types_and_shapes() -> None:
    f = _field(1, "hs", "site_b")
    assert f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8
    assert f.labels.shape == (240, 320) and f.labels.dtype == np.uint32
    for cell in f.cells:
        assert cell["kind"] in OBJECT_KINDS
        expected = MORPHOLOGY_CLASSES if cell["kind"] == "rbc" else (cell["kind"],)
        assert cell["cell_class"] in expected


@pytest.mark.parametrize(("condition", "site"), [("normal", "site_a"), ("ida", "site_b")])
def test_truth_matches_label_image(condition: str, site: str) -> None:
    f = _field(11, condition, site)
    um = synth.SITES[site]["um_per_px"]
    ids, counts = np.unique(f.labels, return_counts=True)
    counts = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    counts.pop(0)
    cell_ids = [c["cell_id"] for c in f.cells]
    assert cell_ids == list(range(1, len(f.cells) + 1))
    assert sorted(counts) == cell_ids
    edge = set(
        np.concatenate([f.labels[0], f.labels[-1], f.labels[:, 0], f.labels[:, -1]]).tolist()
    )
    for c in f.cells:
        n = counts[c["cell_id"]]
        assert c["area_um2"] == pytest.approx(n * um * um)
        ys, xs = np.nonzero(f.labels == c["cell_id"])
        assert c["centroid_x"] == pytest.approx(xs.mean())
        assert c["centroid_y"] == pytest.approx(ys.mean())
        assert c["touches_border"] == (c["cell_id"] in edge)
        assert c["full_area_um2"] == pytest.approx(np.pi * (c["diameter_um"] / 2) ** 2)
        assert 0 < c["visible_fraction"] <= 1.0
        if not c["touches_border"]:  # occlusion is capped: at least ~75 % stays visible
            assert c["visible_fraction"] >= synth.MIN_VISIBLE - 1e-9


def test_layout_density_and_sizes() -> None:
    f = _field(2)
    um2 = synth.SITES["site_a"]["um_per_px"] ** 2
    rbc = [c for c in f.cells if c["kind"] == "rbc"]
    coverage = sum(c["area_um2"] for c in rbc) / (f.labels.size * um2)
    assert 0.25 < coverage < 0.45
    normal = [c["diameter_um"] for c in rbc if c["cell_class"] == "normal"]
    assert 7.0 < np.mean(normal) < 8.0
    plates = [c["diameter_um"] for c in f.cells if c["kind"] == "platelet"]
    assert all(1.5 < d < 3.6 for d in plates)


def test_spherocytes_smaller_and_enriched_in_hs() -> None:
    normals, spheros = [], []
    frac = {}
    for condition in ("normal", "hs"):
        classes = []
        for seed in range(3):
            f = _field(100 + seed, condition)
            rbc = [c for c in f.cells if c["kind"] == "rbc"]
            classes += [c["cell_class"] for c in rbc]
            normals += [c["diameter_um"] for c in rbc if c["cell_class"] == "normal"]
            spheros += [c["diameter_um"] for c in rbc if c["cell_class"] == "spherocyte"]
        frac[condition] = classes.count("spherocyte") / len(classes)
    assert np.mean(spheros) < np.mean(normals) - 1.0
    assert frac["hs"] > 0.12 > 0.04 > frac["normal"]


def test_ida_is_microcytic() -> None:
    diam = {}
    for condition in ("normal", "ida"):
        f = _field(7, condition)
        diam[condition] = np.mean([c["diameter_um"] for c in f.cells if c["kind"] == "rbc"])
    assert diam["ida"] < diam["normal"] - 0.4


def test_stain_shift_moves_colour() -> None:
    base = _field(9)
    shifted = _field(9, stain_shift=1.5)
    assert np.array_equal(base.labels, shifted.labels)  # same layout, other colours
    diff = np.abs(base.image.astype(float).mean((0, 1)) - shifted.image.astype(float).mean((0, 1)))
    assert diff.max() > 8.0


def test_jpeg_option_compresses_image_only() -> None:
    raw = _field(12)
    jpg = _field(12, jpeg_quality=80)
    assert np.array_equal(raw.labels, jpg.labels)
    diff = np.abs(raw.image.astype(float) - jpg.image.astype(float))
    assert 0.0 < diff.mean() < 3.0


def test_sites_differ_in_colour() -> None:
    a = _field(21, site="site_a").image.reshape(-1, 3).astype(float)
    b = _field(21, site="site_b").image.reshape(-1, 3).astype(float)
    bg_a, bg_b = np.percentile(a, 90, axis=0), np.percentile(b, 90, axis=0)
    assert np.abs(bg_a - bg_b).max() > 10.0


def test_cohort_catalog(cohort: pathlib.Path) -> None:
    cat = pd.read_csv(cohort)
    assert list(cat.columns) == synth.CATALOG_COLUMNS
    assert len(cat) == 6
    assert cat["slide_id"].tolist()[:3] == ["P001_S1", "P001_S2", "P002_S1"]
    assert (cat["cohort"] == "synthetic").all()
    by_patient = cat.groupby("patient_id").first()
    assert by_patient["label"].tolist() == ["normal", "hs", "ida"]
    assert by_patient["site"].tolist() == ["site_a", "site_b", "site_a"]
    assert by_patient["um_per_px"].tolist() == [0.25, 0.20, 0.25]
    for uri in cat["uri"]:
        assert not pathlib.Path(uri).is_absolute()
        assert (cohort.parent / uri).is_file()


def test_cohort_file_formats(cohort: pathlib.Path) -> None:
    cat = pd.read_csv(cohort)
    heads = {u: (cohort.parent / u).read_bytes()[:8] for u in cat["uri"]}
    png = b"\x89PNG\r\n\x1a\n"
    jpg_named = [u for u in heads if u.endswith(".jpg")]
    assert any(heads[u] == png for u in jpg_named), "expected a PNG saved under a .jpg name"
    assert any(heads[u][:3] == b"\xff\xd8\xff" for u in jpg_named), "expected a real JPEG"
    assert all(heads[u] == png for u in heads if u.endswith(".png"))


def test_cohort_truth(cohort: pathlib.Path) -> None:
    root = cohort.parent
    truth = pd.read_parquet(root / "truth.parquet")
    assert list(truth.columns) == synth.TRUTH_COLUMNS
    for slide_id, rows in truth.groupby("slide_id"):
        mask = cv2.imread(str(root / "truth_masks" / f"{slide_id}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint16 and mask.shape == (H, W)
        ids, counts = np.unique(mask[mask > 0], return_counts=True)
        assert ids.tolist() == sorted(rows["cell_id"].tolist())
        um = 0.25 if rows["site"].iloc[0] == "site_a" else 0.20
        area = rows.set_index("cell_id")["area_um2"].loc[ids]
        assert np.allclose(area.to_numpy(), counts * um * um)
    img = cv2.imread(str(root / "images" / "P001_S1.png"))
    assert img.shape == (H, W, 3)


def test_cohort_is_byte_identical(cohort: pathlib.Path, tmp_path: pathlib.Path) -> None:
    again = synth.synth_cohort(
        tmp_path, n_patients=3, images_per_patient=2, seed=5, height=H, width=W
    )
    assert again.read_bytes() == cohort.read_bytes()
    for sub in ("images", "truth_masks"):
        files = sorted((cohort.parent / sub).iterdir())
        assert files
        for f in files:
            assert (again.parent / sub / f.name).read_bytes() == f.read_bytes()


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError):
        synth.render_field(np.random.default_rng(0), "anaemia", "site_a", 50, 50)
    with pytest.raises(ValueError):
        synth.render_field(np.random.default_rng(0), "normal", "site_z", 50, 50)

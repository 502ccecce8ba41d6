"""The rule-based morphology call: each rule, their precedence, and the thresholds' checks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rbcbatch.classify.rules import RULE_COLUMNS, MorphologyRules, classify_rules
from rbcbatch.measure import measure_cells
from rbcbatch.vocabulary import MORPHOLOGY_CLASSES, OBJECT_KINDS

# A free-lying normal discocyte as the measures describe it: 7.5 µm, round, central pallor
# (centre at 0.7 of the rim's density), a few pale pixels, no dense core.
NORMAL = {
    "diameter_um": 7.5,
    "ellipse_fit": 1.0,
    "solidity": 0.98,
    "aspect_ratio": 1.05,
    "pallor_ratio": 0.7,
    "pallor_area_fraction": 0.05,
    "ring_ratio": 1.05,
    "core_ratio": 0.70,
    "contact_fraction": 0.0,
}


def call(*rows: dict, rules: MorphologyRules = MorphologyRules()) -> list[str]:
    """Classify rows given as changes to NORMAL."""
    full = [{**NORMAL, **row} for row in rows]
    columns = {c: np.array([r[c] for r in full], dtype=np.float32) for c in NORMAL}
    return list(classify_rules(columns, rules))


def test_shared_vocabulary_is_unchanged():
    assert MORPHOLOGY_CLASSES == (
        "normal",
        "spherocyte",
        "elliptocyte",
        "target",
        "schistocyte",
        "microcyte",
        "macrocyte",
        "hypochromic",
        "stomatocyte",
        "ovalocyte",
        "teardrop",
        "burr",
        "other",
    )
    assert OBJECT_KINDS == {"rbc": 1, "wbc": 2, "platelet": 3}
    assert set(RULE_COLUMNS) == set(NORMAL)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({}, "normal"),
        # Small, no pallor: thickest in the middle.
        (
            {"diameter_um": 6.0, "pallor_ratio": 1.25, "ring_ratio": 1.2, "core_ratio": 1.05},
            "spherocyte",
        ),
        ({"aspect_ratio": 2.0}, "elliptocyte"),
        ({"aspect_ratio": 1.85, "ellipse_fit": 0.98}, "elliptocyte"),
        # An oval discocyte: below the elliptocyte bar.
        ({"aspect_ratio": 1.45, "ellipse_fit": 0.98}, "normal"),
        # Dense spot (core 1.4 x the annulus) inside a pale ring (0.72 x the rim).
        ({"core_ratio": 1.4, "ring_ratio": 0.72, "pallor_ratio": 0.8}, "target"),
        # A 4 µm fragment with a straight cut.
        (
            {"diameter_um": 4.2, "ellipse_fit": 0.8, "aspect_ratio": 1.6, "pallor_ratio": 1.3},
            "schistocyte",
        ),
        # A 5 µm cell with a bite out of it: round outline otherwise, but not convex.
        ({"diameter_um": 5.0, "solidity": 0.8, "ellipse_fit": 0.97}, "schistocyte"),
        ({"diameter_um": 4.6, "pallor_ratio": 0.6}, "microcyte"),
        ({"diameter_um": 9.6}, "macrocyte"),
        ({"pallor_area_fraction": 0.4, "pallor_ratio": 0.45, "ring_ratio": 0.6}, "hypochromic"),
        # A healthy smear's wide central pallor (PBC's 75th percentile) is not hypochromia.
        ({"pallor_area_fraction": 0.22, "pallor_ratio": 0.45, "ring_ratio": 0.6}, "normal"),
        ({"diameter_um": 2.0}, "other"),
        ({"diameter_um": np.nan}, "other"),
    ],
)
def test_each_rule(row, expected):
    assert call(row) == [expected]


def test_thresholds_are_strict_where_documented():
    # < 5 µm is microcytic, 5.0 itself is not; > 9.5 µm is macrocytic, 9.5 itself is not.
    assert call({"diameter_um": 4.99}, {"diameter_um": 5.0}) == ["microcyte", "normal"]
    assert call({"diameter_um": 9.51}, {"diameter_um": 9.5}) == ["macrocyte", "normal"]
    # Pale area above 0.36 is hypochromic.
    assert call({"pallor_area_fraction": 0.37}, {"pallor_area_fraction": 0.35}) == [
        "hypochromic",
        "normal",
    ]


def test_precedence_between_overlapping_rules():
    fragment = {"diameter_um": 4.2, "ellipse_fit": 0.8, "aspect_ratio": 1.8, "pallor_ratio": 1.3}
    assert call(
        # An elongated small fragment is a schistocyte, not an elliptocyte.
        fragment,
        # The same outline next to a neighbour may be cut by it: no schistocyte call; no
        # elliptocyte either (not an ellipse), nor spherocyte (not round): its size only.
        {**fragment, "contact_fraction": 0.3},
        # Cut by a neighbour but still nearly round, small without pallor: spherocyte.
        {**fragment, "contact_fraction": 0.3, "ellipse_fit": 0.95, "aspect_ratio": 1.2},
        # Irregular but full-sized: not a fragment.
        {"diameter_um": 7.2, "ellipse_fit": 0.8},
        # Elongated, small and without pallor: shape first, elliptocyte.
        {"diameter_um": 6.0, "aspect_ratio": 1.9, "pallor_ratio": 1.2},
        # A small target cell's dense centre passes the "no pallor" test: target first.
        {"diameter_um": 6.2, "core_ratio": 1.4, "ring_ratio": 0.7, "pallor_ratio": 1.15},
        # A pale ring without a dense core is hypochromia, not a target cell.
        {"core_ratio": 0.6, "ring_ratio": 0.6, "pallor_area_fraction": 0.4},
        # Small without pallor: spherocyte before microcyte.
        {"diameter_um": 4.8, "pallor_ratio": 1.2},
        # Small with a wide pallor: hypochromic before microcyte; large ditto before macrocyte.
        {"diameter_um": 4.8, "pallor_area_fraction": 0.4},
        {"diameter_um": 9.8, "pallor_area_fraction": 0.4},
        # Dense but full-sized: not a spherocyte.
        {"diameter_um": 7.5, "pallor_ratio": 1.3},
        # Undefined pallor on a small cell: only the size rule can hold.
        {"diameter_um": 4.5, "pallor_ratio": np.nan, "pallor_area_fraction": np.nan},
    ) == [
        "schistocyte",
        "microcyte",
        "spherocyte",
        "normal",
        "elliptocyte",
        "target",
        "hypochromic",
        "spherocyte",
        "hypochromic",
        "hypochromic",
        "normal",
        "microcyte",
    ]


def test_output_shape_and_vocabulary():
    out = classify_rules({c: np.full(5, v, dtype=np.float32) for c, v in NORMAL.items()})
    assert out.shape == (5,) and out.dtype == object
    assert set(out) <= set(MORPHOLOGY_CLASSES)
    empty = classify_rules({c: np.empty(0, dtype=np.float32) for c in NORMAL})
    assert empty.shape == (0,)


def test_missing_column_is_named():
    columns = {c: np.ones(1) for c in NORMAL if c != "core_ratio"}
    with pytest.raises(KeyError, match="core_ratio"):
        classify_rules(columns)


def test_rules_can_be_changed():
    assert call({"diameter_um": 9.5}, rules=MorphologyRules(macrocyte_min_diameter_um=10.0)) == [
        "normal"
    ]


def test_rules_validation_and_dict():
    rules = MorphologyRules()
    d = rules.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(MorphologyRules)]
    assert MorphologyRules(**d) == rules
    json.dumps(d)  # hashable config
    assert MorphologyRules(schistocyte_max_contact=0.0).schistocyte_max_contact == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.macrocyte_min_diameter_um = 10.0  # type: ignore[misc]
    for bad in (
        {"microcyte_max_diameter_um": -1.0},
        {"spherocyte_min_pallor_ratio": float("nan")},
        {"microcyte_max_diameter_um": 9.5},  # above the macrocyte threshold
        {"min_cell_diameter_um": 7.0},  # above the schistocyte size
        {"elliptocyte_min_aspect": 0.9},
        {"target_min_core_ratio": 0.9},
        {"target_max_ring_ratio": 1.1},
        {"hypochromic_min_pallor_fraction": 1.5},
        {"spherocyte_min_ellipse_fit": 1.1},
        {"schistocyte_max_contact": -0.1},
    ):
        with pytest.raises(ValueError):
            MorphologyRules(**bad)


def _draw_cell(image, labels, cell_id, centre, semi_axes, thickness, angle=0.0):
    """Render one cell with a radial thickness profile (Beer-Lambert, OD 0.5 per unit)."""
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    dy, dx = yy - centre[0], xx - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / semi_axes[1], (-s * dx + c * dy) / semi_axes[0]
    rho = np.sqrt(u * u + v * v)
    inside = rho <= 1.0
    labels[inside] = cell_id
    od = 0.5 * thickness(rho[inside])
    image[inside] = np.clip(230.0 * 10.0 ** (-od[:, None] * np.array([0.6, 1.4, 1.0])), 0, 255)


def test_measured_shapes_are_called_by_the_rules():
    """End to end on drawn cells at 0.2 µm/px: measures feed the rules."""
    labels = np.zeros((120, 200), dtype=np.uint32)
    image = np.full((120, 200, 3), 230, dtype=np.uint8)

    def discocyte(rho):  # dense torus, central pallor over a third of the diameter
        return 1.0 - 0.5 * np.exp(-((rho / 0.33) ** 4))

    def sphere(rho):  # a sphere's chord: thickest in the middle
        return 1.5 * np.sqrt(1.0 - rho**2)

    def target(rho):  # pale ring with a dense central spot
        return 1.0 - 0.6 * np.exp(-((rho / 0.6) ** 4)) + 0.9 * np.exp(-((rho / 0.18) ** 2))

    _draw_cell(image, labels, 1, (30, 30), (18.75, 18.75), discocyte)  # 7.5 µm
    _draw_cell(image, labels, 2, (30, 80), (15, 15), sphere)  # 6.0 µm
    _draw_cell(image, labels, 3, (30, 140), (12, 24), discocyte, angle=0.5)  # 2:1
    _draw_cell(image, labels, 4, (85, 30), (19.5, 19.5), target)  # 7.8 µm
    _draw_cell(image, labels, 5, (85, 80), (25, 25), discocyte)  # 10 µm
    _draw_cell(image, labels, 6, (85, 130), (11.5, 11.5), discocyte)  # 4.6 µm
    cols = measure_cells(labels, image, 0.2)
    assert list(classify_rules(cols)) == [
        "normal",
        "spherocyte",
        "elliptocyte",
        "target",
        "macrocyte",
        "microcyte",
    ]


def test_spherocytes_on_synthetic_truth_masks():
    """Spherocyte recall >= 0.85 and precision >= 0.8 on fields not used for tuning."""
    from rbcbatch.dev.synth import SITES, render_field

    truth, called = [], []
    for i, (condition, site) in enumerate(
        [("hs", "site_a"), ("hs", "site_b"), ("normal", "site_a")]
    ):
        field = render_field(np.random.default_rng([2024, i]), condition, site, 400, 500)
        cols = measure_cells(field.labels, field.image, SITES[site]["um_per_px"])
        kinds = {c["cell_id"]: (c["kind"], c["cell_class"]) for c in field.cells}
        rbc = np.array([kinds[i][0] == "rbc" for i in cols["cell_id"]]) & ~cols["touches_edge"]
        truth += [kinds[i][1] for i in cols["cell_id"][rbc]]
        called += list(classify_rules(cols)[rbc])
    truth_s = np.array(truth) == "spherocyte"
    called_s = np.array(called) == "spherocyte"
    hits = np.count_nonzero(truth_s & called_s)
    assert truth_s.sum() >= 50
    assert hits / truth_s.sum() >= 0.85
    assert hits / called_s.sum() >= 0.8


def _slide(discocyte: dict, n: int, *cells: dict) -> list[str]:
    """The calls of `cells` on a slide that also holds `n` copies of `discocyte`."""
    return call(*([discocyte] * n), *cells)[n:]


def test_spherocytes_are_called_against_the_slides_own_discocytes():
    # A slide read at too fine a pixel size: its discocytes measure 5.5 µm, not 7.5.
    small = {**NORMAL, "diameter_um": 5.5, "pallor_ratio": 0.7}
    dense = {**NORMAL, "pallor_ratio": 1.05, "pallor_area_fraction": 0.0}
    # 1.05 x 5.5 = 5.78 µm: a dense 5.6 µm cell is no larger than its neighbours, a 6.0 is.
    assert _slide(small, 40, {**dense, "diameter_um": 5.6}, {**dense, "diameter_um": 6.0}) == [
        "spherocyte",
        "normal",
    ]
    # Too few reference discocytes: the absolute 6.5 µm cut-off decides.
    assert _slide(small, 10, {**dense, "diameter_um": 6.0}) == ["spherocyte"]
    # Discocytes with little pallor (median 0.78) raise the bar to 0.88: 0.85 is not dense.
    faint = {**NORMAL, "diameter_um": 7.5, "pallor_ratio": 0.78}
    assert _slide(faint, 40, {**dense, "diameter_um": 5.9, "pallor_ratio": 0.85}) == ["normal"]
    assert _slide(faint, 40, {**dense, "diameter_um": 6.0, "pallor_ratio": 1.2}) == ["spherocyte"]
    # Large-looking discocytes never lift the absolute cut-off.
    large = {**NORMAL, "diameter_um": 9.5, "pallor_ratio": 0.7}
    assert _slide(large, 40, {**dense, "diameter_um": 7.5}) == ["normal"]

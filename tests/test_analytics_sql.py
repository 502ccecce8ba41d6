"""The cohort SQL (Wilson intervals, grades, flags with evidence, CBC, sites) against values
worked out by hand on a small run folder written directly (no Ray)."""

from __future__ import annotations

import functools
import json
import math

import duckdb
import pyarrow as pa
import pytest
import yaml
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from rbcbatch.analytics import WILSON_MACROS, ScreeningRules, query, wilson_interval
from rbcbatch.analytics.grading import SHIPPED_DIR, load_scheme
from rbcbatch.cli import app
from rbcbatch.errors import GradingSchemeError
from rbcbatch.io.catalog import load_catalog
from rbcbatch.store.run_store import RunStore
from tests.conftest import REPO
from tests.test_analytics import neutral_table

Z = 1.959963984540054
RULES = ScreeningRules(
    min_rbc=40, hs_spherocyte_pct=10.0, anemia_micro_hypo_pct=10.0, anemia_mean_diameter_um=6.7
)
# Diameter (µm) given to every red cell of a class: means can be worked out by hand.
DIAMETER = {
    "normal": 7.5,
    "spherocyte": 6.0,
    "microcyte": 5.5,
    "hypochromic": 7.0,
    "schistocyte": 4.0,
}


def wilson_by_quadratic(k: int, n: int) -> tuple[float, float]:
    """The Wilson bounds as the roots of (k/n - p)^2 = z^2 p (1 - p) / n, solved for p."""
    p = k / n
    a, b, c = n + Z * Z, -(2 * n * p + Z * Z), n * p * p
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def cells_table(slide: str, patient: str, site: str, rows: list[tuple]) -> pa.Table:
    """rows: (kind, class[, touches_edge]); diameters from DIAMETER, other columns neutral."""
    values = {
        "kind": [r[0] for r in rows],
        "class": [r[1] for r in rows],
        "diameter_um": [DIAMETER.get(r[1], 12.0) for r in rows],
        "touches_edge": [len(r) > 2 and r[2] for r in rows],
        "cell_id": list(range(1, len(rows) + 1)),
        "slide_id": [slide] * len(rows),
        "patient_id": [patient] * len(rows),
        "run_id": ["r1"] * len(rows),
        "cohort": ["c"] * len(rows),
        "site": [site] * len(rows),
    }
    return neutral_table(values, len(rows))


def rbc(**counts: int) -> list[tuple]:
    return [("rbc", name) for name, k in counts.items() for _ in range(k)]


def add_slide(store: RunStore, slide: str, patient: str, site: str, rows: list[tuple], **record):
    store.write_cells("c", patient, slide, cells_table(slide, patient, site, rows))
    store.commit(
        {
            "slide_id": slide,
            "patient_id": patient,
            "cohort": "c",
            "status": "ok",
            "run_id": "r1",
            "site": site,
            "scanner": f"scan-{site}",
            "stain": "wright",
            "n_objects": len(rows),
            **record,
        }
    )


# Spherocytes, schistocytes and microcytes at and around the cut-offs of both shipped schemes:
# patient: (n red cells, spherocytes, schistocytes, microcytes), then the expected grades
# (spherocyte, schistocyte, microcyte) under icsh2015 and cap_simple, worked out by hand.
GRADE_CASES = {
    "G00": ((100, 0, 0, 0), ("0", "0", "0"), ("none", "none", "none")),
    "G01": ((100, 1, 1, 0), ("0", "2+", "0"), ("present", "present", "none")),
    "G02": ((200, 5, 1, 0), ("0", "1+", "0"), ("present", "none", "none")),  # 2.5, 0.5
    "G03": ((200, 6, 4, 0), ("0", "2+", "0"), ("many", "present", "none")),  # 3.0, 2.0
    "G04": ((1000, 49, 21, 0), ("0", "3+", "0"), ("many", "present", "none")),  # 4.9, 2.1
    "G05": ((100, 5, 3, 0), ("1+", "3+", "0"), ("many", "many", "none")),  # 5, 3
    "G20": ((100, 20, 0, 10), ("1+", "0", "0"), ("many", "none", "present")),  # micro 10
    "G21": ((100, 21, 0, 11), ("2+", "0", "1+"), ("many", "none", "present")),  # micro 11
    "G50": ((100, 50, 0, 0), ("2+", "0", "0"), ("many", "none", "none")),
    "G51": ((100, 51, 0, 0), ("3+", "0", "0"), ("many", "none", "none")),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("sql") / "run")
    store = RunStore(path)
    store.open({"test": True}, "h1")
    # PA: 250 counted red cells (7 spherocytes, 20 microcytes, 5 hypochromic, 1 schistocyte),
    # 3 spherocytes cut by the edge and 2 WBCs left out; a CBC with high MCHC and low Hb.
    pa_rows = rbc(normal=217, spherocyte=7, microcyte=20, hypochromic=5, schistocyte=1)
    pa_rows += [("rbc", "spherocyte", True)] * 3 + [("wbc", "wbc")] * 2
    add_slide(store, "A1", "PA", "s1", pa_rows, hb_g_dl=11.0, mchc_g_dl=37.0, rdw_pct=15.5)
    # PB: 40 of 40 spherocytes over two slides; Hb on both slides (mean 11), no MCHC.
    add_slide(store, "B1", "PB", "s2", rbc(spherocyte=25), hb_g_dl=10.0)
    add_slide(store, "B2", "PB", "s2", rbc(spherocyte=15), hb_g_dl=12.0)
    # PC: one red cell short of min_rbc. PD: a committed slide without red cells.
    add_slide(store, "C1", "PC", "s2", rbc(normal=39), mchc_g_dl=33.0)
    add_slide(store, "D1", "PD", "s1", [("wbc", "wbc")])
    for patient, ((n, sph, schisto, micro), _, _) in GRADE_CASES.items():
        rows = rbc(
            spherocyte=sph, schistocyte=schisto, microcyte=micro, normal=n - sph - schisto - micro
        )
        add_slide(store, f"{patient}_S1", patient, "g", rows)
    return path


@functools.cache
def patients(run_dir: str, grading: str | None = None) -> dict[str, dict]:
    """The patients view as {patient_id: row}; each (run, scheme) is queried once."""
    rows = query(run_dir, "SELECT * FROM patients", RULES, grading=grading).to_pylist()
    return {r["patient_id"]: r for r in rows}


@pytest.mark.parametrize("k, n", [(7, 250), (0, 40), (40, 40), (1, 1), (25, 250), (3, 1000)])
def test_wilson_sql_python_and_quadratic_agree(k, n):
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(wilson_by_quadratic(k, n), abs=1e-12)
    got = (
        connect_macros().execute("SELECT wilson_lo(?, ?), wilson_hi(?, ?)", [k, n, k, n]).fetchone()
    )
    assert got == pytest.approx((lo, hi), abs=1e-12)


def connect_macros() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(WILSON_MACROS)
    return con


def test_wilson_closed_forms_at_the_ends():
    # 0 of n: [0, z²/(n+z²)]; n of n: [n/(n+z²), 1].
    assert wilson_interval(0, 40) == pytest.approx((0.0, Z * Z / (40 + Z * Z)))
    assert wilson_interval(40, 40) == pytest.approx((40 / (40 + Z * Z), 1.0))
    assert wilson_interval(0, 40)[1] == pytest.approx(0.08762, abs=1e-5)
    assert wilson_interval(7, 250) == pytest.approx((0.01363, 0.05666), abs=1e-5)
    assert wilson_interval(0, 0) == (None, None)
    assert connect_macros().execute("SELECT wilson_lo(0, 0), wilson_hi(3, 0)").fetchone() == (
        None,
        None,
    )


def test_patient_shares_intervals_and_diameters(run_dir):
    a = patients(run_dir)["PA"]
    assert a["n_rbc"] == 250 and a["n_slides"] == 1
    assert (a["n_spherocyte"], a["n_microcyte"], a["n_hypochromic"], a["n_normal"]) == (
        7,
        20,
        5,
        217,
    )
    assert a["spherocyte_pct"] == pytest.approx(2.8)
    lo, hi = wilson_interval(7, 250)
    assert (a["spherocyte_pct_lo"], a["spherocyte_pct_hi"]) == pytest.approx((100 * lo, 100 * hi))
    assert a["microcyte_pct"] == pytest.approx(8.0) and a["hypochromic_pct"] == pytest.approx(2.0)
    assert a["schistocyte_pct"] == pytest.approx(0.4)
    assert a["poikilocyte_pct"] == pytest.approx(100 * 8 / 250)  # 7 spherocytes + 1 schistocyte
    assert a["macrocyte_pct"] == 0.0
    assert a["macrocyte_pct_hi"] == pytest.approx(100 * Z * Z / (250 + Z * Z))
    mean = (217 * 7.5 + 7 * 6.0 + 20 * 5.5 + 5 * 7.0 + 4.0) / 250
    assert a["diameter_mean_um"] == pytest.approx(mean)
    values = [7.5] * 217 + [6.0] * 7 + [5.5] * 20 + [7.0] * 5 + [4.0]
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 249)
    assert a["diameter_sd_um"] == pytest.approx(sd)
    assert a["diameter_cv_pct"] == pytest.approx(100 * sd / mean)
    b = patients(run_dir)["PB"]
    assert (b["n_rbc"], b["n_slides"], b["spherocyte_pct"]) == (40, 2, 100.0)
    assert (b["spherocyte_pct_lo"], b["spherocyte_pct_hi"]) == pytest.approx(
        (100 * 40 / (40 + Z * Z), 100.0)
    )
    assert (b["schistocyte_pct_lo"], b["schistocyte_pct_hi"]) == pytest.approx(
        (0.0, 100 * Z * Z / (40 + Z * Z))
    )
    d = patients(run_dir)["PD"]
    assert d["n_rbc"] == 0 and d["spherocyte_pct"] is None and d["spherocyte_pct_lo"] is None


def test_columns_are_stable_and_spherocyte_comes_first(run_dir):
    columns = query(run_dir, "SELECT * FROM patients LIMIT 0").column_names
    assert columns[:9] == [
        "cohort",
        "patient_id",
        "site",
        "label",
        "n_slides",
        "n_rbc",
        "spherocyte_pct",
        "spherocyte_pct_lo",
        "spherocyte_pct_hi",
    ]
    for name in (
        "hs_flag",
        "hs_rule",
        "hs_evidence",
        "hs_supported_by_cbc",
        "anemia_flag",
        "anemia_rule",
        "anemia_evidence",
        "anemia_supported_by_cbc",
        "spherocyte_grade",
        "grading_scheme",
        "hb_g_dl",
        "mchc_g_dl",
        "rdw_pct",
        "diameter_cv_pct",
    ):
        assert name in columns
    assert (
        columns
        == query(run_dir, "SELECT * FROM patients LIMIT 0", grading="cap_simple").column_names
    )


@pytest.mark.parametrize("scheme, which", [("icsh2015", 1), ("cap_simple", 2)])
def test_grades_at_and_around_cutoffs(run_dir, scheme, which):
    rows = patients(run_dir, grading=scheme)
    for patient, case in GRADE_CASES.items():
        row = rows[patient]
        got = (row["spherocyte_grade"], row["schistocyte_grade"], row["microcyte_grade"])
        assert got == case[which], (patient, row["spherocyte_pct"], row["schistocyte_pct"])
        assert row["grading_scheme"] == scheme
        # Neither shipped scheme grades anisocytosis or poikilocytosis as a whole.
        assert row["anisocytosis_grade"] is None and row["poikilocytosis_grade"] is None
    # Too few red cells: no grade, whatever the share.
    assert rows["PC"]["spherocyte_grade"] is None and rows["PD"]["spherocyte_grade"] is None
    assert rows["PB"]["spherocyte_grade"] == {"icsh2015": "3+", "cap_simple": "many"}[scheme]


def test_a_laboratorys_own_scheme_from_a_path(run_dir, tmp_path):
    own = tmp_path / "lab.yaml"
    own.write_text(
        yaml.safe_dump(
            {
                "name": "lab7",
                "grades": ["-", "+", "++"],
                "features": {
                    "spherocyte": [{"grade": "+", "above": 2.5}, {"grade": "++", "at_least": 5}],
                    "anisocytosis": [{"grade": "+", "above": 8}],
                },
            }
        )
    )
    rows = patients(run_dir, grading=str(own))
    assert [rows[p]["spherocyte_grade"] for p in ("G02", "G03", "G04", "G05")] == [
        "-",
        "+",
        "+",
        "++",
    ]
    assert rows["G00"]["anisocytosis_grade"] == "-"  # all 7.5 µm: CV 0
    cv = rows["PA"]["diameter_cv_pct"]
    assert cv > 8 and rows["PA"]["anisocytosis_grade"] == "+"
    assert rows["PA"]["grading_scheme"] == "lab7" and rows["PA"]["target_grade"] is None


@pytest.mark.parametrize(
    "scheme, message",
    [
        (
            {
                "name": "x",
                "grades": ["0", "1+"],
                "features": {"spherocytes": [{"grade": "1+", "above": 5}]},
            },
            "spherocytes",
        ),
        (
            {
                "name": "x",
                "grades": ["0", "1+", "2+"],
                "features": {
                    "spherocyte": [{"grade": "1+", "above": 5}, {"grade": "2+", "above": 5}]
                },
            },
            "increase strictly",
        ),
        (
            {
                "name": "x",
                "grades": ["0", "1+", "2+"],
                "features": {
                    "spherocyte": [{"grade": "2+", "above": 5}, {"grade": "1+", "above": 9}]
                },
            },
            "grades must go up",
        ),
        (
            {
                "name": "x",
                "grades": ["0", "1+"],
                "features": {"spherocyte": [{"grade": "3+", "above": 5}]},
            },
            "must be one of",
        ),
        (
            {
                "name": "x",
                "grades": ["0", "1+"],
                "features": {"spherocyte": [{"grade": "1+", "above": 5, "at_least": 5}]},
            },
            "spherocyte.0",
        ),
        ({"name": "x", "grades": ["0", "it's"], "features": {}}, "grades.1"),
    ],
)
def test_bad_schemes_are_clear_errors(tmp_path, scheme, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(scheme))
    with pytest.raises(GradingSchemeError, match="not a valid grading scheme") as e:
        load_scheme(str(path))
    assert message in str(e.value)


def test_unknown_scheme_names_the_choices():
    with pytest.raises(GradingSchemeError, match="cap_simple, icsh2015"):
        load_scheme("icsh2016")


def test_shipped_schemes_validate_against_the_published_schema():
    schema = json.loads((REPO / "schemas" / "grading.schema.json").read_text())
    for path in sorted(SHIPPED_DIR.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert list(Draft202012Validator(schema).iter_errors(data)) == [], path
        assert load_scheme(path.stem).name == path.stem
    assert {p.stem for p in SHIPPED_DIR.glob("*.yaml")} == {"icsh2015", "cap_simple"}


def test_flags_rules_and_evidence(run_dir):
    rows = patients(run_dir)
    a, b, c, d = rows["PA"], rows["PB"], rows["PC"], rows["PD"]
    # PA: 2.8% spherocytes < 10: HS negative; microcytes + hypochromic 25/250 = 10% >= 10:
    # anemia positive (the threshold is inclusive); mean diameter 7.27 µm is not below 6.7.
    assert (a["hs_flag"], a["anemia_flag"]) == ("negative", "positive")
    # PB: 100% spherocytes; mean diameter 6.0 < 6.7.
    assert (b["hs_flag"], b["anemia_flag"]) == ("positive", "positive")
    assert (c["hs_flag"], c["anemia_flag"]) == ("insufficient", "insufficient")
    assert (d["hs_flag"], d["anemia_flag"]) == ("insufficient", "insufficient")
    assert rows["G21"]["hs_flag"] == "positive" and rows["G05"]["hs_flag"] == "negative"
    assert a["hs_rule"] == (
        "positive when spherocyte_pct >= 10; insufficient below 40 red cells (cells touching "
        "the image edge left out); CBC support: MCHC > 36 g/dL"
    )
    assert "microcyte_pct + hypochromic_pct >= 10 or diameter_mean_um < 6.7" in a["anemia_rule"]

    hs = json.loads(a["hs_evidence"])
    lo, hi = wilson_interval(7, 250)
    assert hs["decision"] == "negative" and (hs["n_rbc"], hs["min_rbc"]) == (250, 40)
    assert hs["criteria"] == [
        {
            "indicator": "spherocyte_pct",
            "value": 2.8,
            "ci95": [round(100 * lo, 3), round(100 * hi, 3)],
            "cells": 7,
            "op": ">=",
            "threshold": 10.0,
            "met": False,
            "ci95_spans_threshold": False,
        }
    ]
    assert hs["cbc_support"] == [
        {"indicator": "mchc_g_dl", "value": 37.0, "op": ">", "threshold": 36.0, "met": True}
    ]
    assert hs["grades"] == {"scheme": "icsh2015", "spherocyte": "0"}
    # These hand-made commit records state no pixel-size source: nothing estimated.
    assert hs["um_per_px"] == {"sources": [], "estimated": False}

    anemia = json.loads(a["anemia_evidence"])
    micro_hypo, diameter = anemia["criteria"]
    lo, hi = wilson_interval(25, 250)
    assert micro_hypo == {
        "indicator": "microcyte_pct + hypochromic_pct",
        "value": 10.0,
        "ci95": [round(100 * lo, 3), round(100 * hi, 3)],
        "cells": 25,
        "op": ">=",
        "threshold": 10.0,
        "met": True,
        "ci95_spans_threshold": True,
    }
    mean, half = a["diameter_mean_um"], Z * a["diameter_sd_um"] / math.sqrt(250)
    assert diameter["value"] == round(mean, 3) and diameter["met"] is False
    assert diameter["ci95"] == [round(mean - half, 3), round(mean + half, 3)]
    assert (diameter["op"], diameter["threshold"]) == ("<", 6.7)
    assert anemia["cbc_support"][0] == {
        "indicator": "hb_g_dl",
        "value": 11.0,
        "op": "<",
        "threshold": 12.0,
        "met": True,
    }
    assert anemia["grades"] == {"scheme": "icsh2015", "microcyte": "0", "hypochromic": "0"}

    insufficient = json.loads(c["hs_evidence"])
    assert (insufficient["decision"], insufficient["n_rbc"]) == ("insufficient", 39)
    assert insufficient["criteria"][0]["value"] == 0.0
    empty = json.loads(d["anemia_evidence"])
    assert empty["criteria"][0]["value"] is None and empty["criteria"][0]["met"] is None


def test_cbc_join_present_and_absent(run_dir):
    rows = patients(run_dir)
    a, b, c, g = rows["PA"], rows["PB"], rows["PC"], rows["G05"]
    assert (a["hb_g_dl"], a["mchc_g_dl"], a["rdw_pct"]) == (11.0, 37.0, 15.5)
    assert (a["hs_supported_by_cbc"], a["anemia_supported_by_cbc"]) == (True, True)
    assert (b["hb_g_dl"], b["mchc_g_dl"]) == (11.0, None)  # mean of its two slides
    assert (b["hs_supported_by_cbc"], b["anemia_supported_by_cbc"]) == (None, True)
    assert (c["mchc_g_dl"], c["hs_supported_by_cbc"]) == (33.0, False)
    assert (g["hb_g_dl"], g["hs_supported_by_cbc"], g["anemia_supported_by_cbc"]) == (
        None,
        None,
        None,
    )
    assert json.loads(g["hs_evidence"])["cbc_support"][0]["value"] is None
    # CBC values support, never decide: the same flags with a stricter MCHC and Hb.
    strict = ScreeningRules(**{**RULES.to_dict(), "hs_mchc_g_dl": 40.0, "anemia_hb_g_dl": 5.0})
    again = {
        r["patient_id"]: r for r in query(run_dir, "SELECT * FROM patients", strict).to_pylist()
    }
    assert all(again[p]["hs_flag"] == rows[p]["hs_flag"] for p in rows)
    assert (again["PA"]["hs_supported_by_cbc"], again["PA"]["anemia_supported_by_cbc"]) == (
        False,
        False,
    )


def test_sites_view(run_dir):
    sites = {r["site"]: r for r in query(run_dir, "SELECT * FROM sites").to_pylist()}
    s1, s2 = sites["s1"], sites["s2"]
    assert (s1["scanner"], s1["stain"]) == ("scan-s1", "wright")
    assert (s1["n_slides"], s1["n_patients"], s1["n_objects"], s1["n_rbc"]) == (2, 2, 256, 250)
    assert s1["diameter_mean_um"] == pytest.approx(
        (217 * 7.5 + 7 * 6.0 + 20 * 5.5 + 5 * 7.0 + 4.0) / 250
    )
    assert s1["spherocyte_pct"] == pytest.approx(2.8) and s1["normal_pct"] == pytest.approx(86.8)
    assert (s2["n_slides"], s2["n_patients"], s2["n_rbc"]) == (3, 2, 79)
    assert s2["diameter_mean_um"] == pytest.approx((40 * 6.0 + 39 * 7.5) / 79)
    assert s2["spherocyte_pct"] == pytest.approx(100 * 40 / 79)
    assert sites["g"]["n_patients"] == len(GRADE_CASES)


def test_catalog_carries_cbc_columns_and_rejects_bad_values(tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text(
        "slide_id,uri,patient_id,site,um_per_px,hb_g_dl,mchc_g_dl,rdw_pct\n"
        "S1,a.png,P1,s,0.25,10.5,37.2,16\n"
        "S2,b.png,P1,s,0.25,,,\n"
        "S3,c.png,P2,s,0.25,125,,\n"
        "S4,d.png,P2,s,0.25,,high,\n"
    )
    loaded = load_catalog(str(catalog))
    first, second = loaded.slides
    assert (first.hb_g_dl, first.mchc_g_dl, first.rdw_pct) == (10.5, 37.2, 16.0)
    assert (second.hb_g_dl, second.mchc_g_dl, second.rdw_pct) == (None, None, None)
    messages = [f.message for f in loaded.rejected]
    assert messages == [
        "hb_g_dl '125' is outside 1–25 g/dL; give it in g/dL",
        "mchc_g_dl 'high' is not a number",
    ]


def test_cli_query_with_grading_and_a_bad_scheme(run_dir, tmp_path):
    runner = CliRunner()
    sql = "SELECT patient_id, spherocyte_grade FROM patients WHERE patient_id = 'G03'"
    result = runner.invoke(app, ["query", run_dir, sql, "--csv", "--grading", "cap_simple"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == '"G03","many"'
    result = runner.invoke(app, ["query", run_dir, sql, "--grading", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "unknown grading scheme" in result.output

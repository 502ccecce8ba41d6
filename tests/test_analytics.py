"""The DuckDB views against hand-computed values on a small fixed table."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from rbcbatch.analytics import ScreeningRules, connect, query
from rbcbatch.store.run_store import RunStore
from rbcbatch.store.schema import cells_schema

RULES = ScreeningRules(
    min_rbc=3, hs_spherocyte_pct=20.0, anemia_micro_hypo_pct=20.0, anemia_mean_diameter_um=6.0
)


def neutral_table(values: dict[str, list], n: int) -> pa.Table:
    """A cells table of n rows: the given columns, every other column a neutral value."""
    schema = cells_schema()
    data = {}
    for f in schema:
        if f.name in values:
            data[f.name] = values[f.name]
        elif pa.types.is_list(f.type):
            data[f.name] = [None] * n
        elif pa.types.is_string(f.type):
            data[f.name] = ["x"] * n
        elif pa.types.is_boolean(f.type):
            data[f.name] = [False] * n
        else:
            data[f.name] = [1] * n
    return pa.table(
        {k: pa.array(v, type=schema.field(k).type) for k, v in data.items()}, schema=schema
    )


def cells(
    slide_id: str, patient_id: str, rows: list[tuple[str, str, float]], run_id: str = "r1"
) -> pa.Table:
    """rows: (kind, class, diameter_um[, touches_edge]); every other column gets a neutral value."""
    n = len(rows)
    return neutral_table(
        {
            "kind": [r[0] for r in rows],
            "class": [r[1] for r in rows],
            "diameter_um": [r[2] for r in rows],
            "touches_edge": [len(r) > 3 and r[3] for r in rows],
            "cell_id": list(range(1, n + 1)),
            "slide_id": [slide_id] * n,
            "patient_id": [patient_id] * n,
            "run_id": [run_id] * n,
            "cohort": ["c"] * n,
        },
        n,
    )


@pytest.fixture()
def run_dir(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.open({"test": True}, "h1")
    a = [
        ("rbc", "spherocyte", 6.0),
        ("rbc", "normal", 7.0),
        ("rbc", "normal", 8.0),
        ("rbc", "microcyte", 5.0),
        ("wbc", "wbc", 12.0),
        ("rbc", "schistocyte", 3.0, True),
    ]  # cut by the image edge: left out of indicators
    b = [("rbc", "normal", 7.0), ("rbc", "spherocyte", 6.0)]
    c1 = [("rbc", "normal", 7.0), ("rbc", "normal", 7.5)]
    c2 = [("rbc", "normal", 8.0), ("platelet", "platelet", 2.0)]
    for slide, patient, rows in (
        ("A1", "PA", a),
        ("B1", "PB", b),
        ("C1", "PC", c1),
        ("C2", "PC", c2),
    ):
        store.write_cells("c", patient, slide, cells(slide, patient, rows))
        store.commit(
            {
                "slide_id": slide,
                "patient_id": patient,
                "cohort": "c",
                "status": "ok",
                "run_id": "r1",
                "label": {"PA": "hs", "PB": "normal", "PC": "normal"}[patient],
            }
        )
    # Written but never committed (a killed run), and a stale part from another run id:
    store.write_cells("c", "PA", "A2", cells("A2", "PA", [("rbc", "spherocyte", 6.0)] * 50))
    store.write_cells(
        "c", "PC", "C3", cells("C3", "PC", [("rbc", "spherocyte", 6.0)] * 50, run_id="old")
    )
    store.commit(
        {"slide_id": "C3", "patient_id": "PC", "cohort": "c", "status": "ok", "run_id": "r1"}
    )
    return str(tmp_path / "run")


def test_cells_view_shows_committed_slides_only(run_dir):
    rows = query(
        run_dir, "SELECT slide_id, count(*) n FROM cells GROUP BY ALL ORDER BY 1"
    ).to_pylist()
    assert rows == [
        {"slide_id": "A1", "n": 6},
        {"slide_id": "B1", "n": 2},
        {"slide_id": "C1", "n": 2},
        {"slide_id": "C2", "n": 2},
    ]


def test_patient_indicators_and_flags_match_hand_computation(run_dir):
    con = connect(run_dir, RULES)
    rows = {
        r["patient_id"]: r for r in con.sql("SELECT * FROM patients").to_arrow_table().to_pylist()
    }
    a = rows["PA"]
    assert a["n_rbc"] == 4 and a["n_slides"] == 1 and a["label"] == "hs"
    assert a["spherocyte_pct"] == pytest.approx(25.0)
    assert a["microcyte_pct"] == pytest.approx(25.0)
    assert a["poikilocyte_pct"] == pytest.approx(25.0)
    assert a["diameter_mean_um"] == pytest.approx(6.5)
    sd = math.sqrt((0.5**2 + 0.5**2 + 1.5**2 + 1.5**2) / 3)
    assert a["diameter_sd_um"] == pytest.approx(sd)
    assert a["diameter_cv_pct"] == pytest.approx(100 * sd / 6.5)
    assert (a["hs_flag"], a["anemia_flag"]) == ("positive", "positive")
    assert rows["PB"]["n_rbc"] == 2
    assert (rows["PB"]["hs_flag"], rows["PB"]["anemia_flag"]) == ("insufficient", "insufficient")
    c = rows["PC"]
    assert c["n_rbc"] == 3 and c["n_slides"] == 3 and c["spherocyte_pct"] == 0.0
    assert c["diameter_mean_um"] == pytest.approx(7.5)
    assert (c["hs_flag"], c["anemia_flag"]) == ("negative", "negative")


def test_thresholds_come_from_one_place(run_dir, tmp_path):
    strict = tmp_path / "rules.yaml"
    strict.write_text(
        "min_rbc: 3\nhs_spherocyte_pct: 30\nanemia_micro_hypo_pct: 30\nanemia_mean_diameter_um: 6.0\n"
    )
    rules = ScreeningRules.from_yaml(str(strict))
    row = query(
        run_dir, "SELECT hs_flag, anemia_flag FROM patients WHERE patient_id = 'PA'", rules
    ).to_pylist()
    assert row == [{"hs_flag": "negative", "anemia_flag": "negative"}]
    strict.write_text("hs_spherocyte: 3\n")
    with pytest.raises(ValueError, match="unknown screening rule"):
        ScreeningRules.from_yaml(str(strict))


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an rbcbatch run folder"):
        connect(str(tmp_path))


def test_empty_run_has_empty_views(tmp_path):
    RunStore(str(tmp_path / "r")).open({}, "h")
    assert query(str(tmp_path / "r"), "SELECT count(*) n FROM cells").to_pylist() == [{"n": 0}]
    assert query(str(tmp_path / "r"), "SELECT count(*) n FROM patients").to_pylist() == [{"n": 0}]

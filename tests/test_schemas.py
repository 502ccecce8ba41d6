from __future__ import annotations

import json

from rbcbatch.cli.schemas import check_schema_files, documents
from rbcbatch.measure import CELL_MEASURES
from tests.conftest import REPO


def test_schema_files_match_the_code():
    assert check_schema_files(REPO / "schemas") == []


def test_cells_schema_holds_every_measure_with_its_type():
    doc = json.loads((REPO / "schemas" / "cells.schema.json").read_text())
    types = {c["name"]: c["type"] for c in doc["columns"]}
    for name, dtype in CELL_MEASURES.items():
        assert types[name] == str(dtype)
    for required in (
        "run_id",
        "slide_id",
        "patient_id",
        "cell_id",
        "class",
        "kind",
        "centroid_x",
        "centroid_y",
        "area_um2",
        "diameter_um",
        "config_hash",
        "model_hash",
    ):
        assert required in types


def test_a_changed_file_is_reported(tmp_path):
    check_schema_files(tmp_path, write=True)
    doc = documents()["cells.schema.json"]
    doc["columns"] = doc["columns"][:-1]
    (tmp_path / "cells.schema.json").write_text(json.dumps(doc))
    assert any("cells.schema.json differs" in p for p in check_schema_files(tmp_path))

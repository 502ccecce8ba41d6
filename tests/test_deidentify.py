"""De-identification: keyed pseudonyms, no raw id in any byte of a run's outputs, resume."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rbcbatch.analytics import query
from rbcbatch.cli import app
from rbcbatch.engine.run import run
from rbcbatch.errors import DeidentifyError
from rbcbatch.io.deidentify import (
    KEY_ENV,
    key_from_env,
    key_id,
    pseudonym,
    row_deidentifier,
    withhold_uri,
)
from rbcbatch.store.run_store import RunStore

KEY = b"a de-identification key, 41 bytes long.."
OTHER_KEY = b"another key of at least sixteen bytes"


def test_key_comes_from_the_environment_and_must_be_long_enough():
    assert key_from_env({KEY_ENV: "0123456789abcdef"}) == b"0123456789abcdef"
    with pytest.raises(DeidentifyError, match=f"needs a key in the environment variable {KEY_ENV}"):
        key_from_env({})
    with pytest.raises(DeidentifyError, match="is 15 bytes long; .* at least 16"):
        key_from_env({KEY_ENV: "0123456789abcde"})


def test_pseudonyms_are_keyed_hmacs_and_stable():
    expected = "pt-" + hmac.new(KEY, b"patient_id:P001", hashlib.sha256).hexdigest()[:16]
    assert pseudonym("P001", KEY) == expected == pseudonym("P001", KEY, "patient_id")
    assert pseudonym("P001", OTHER_KEY) != expected
    assert re.fullmatch(r"sl-[0-9a-f]{16}", pseudonym("P001", KEY, "slide_id"))
    assert pseudonym("P001", KEY, "slide_id")[3:] != expected[3:]  # each column its own hash
    assert key_id(KEY) != key_id(OTHER_KEY) and KEY.hex()[:16] not in key_id(KEY)
    row = {"slide_id": "P001_S1", "patient_id": "P001", "uri": "x.png", "cohort": ""}
    out = row_deidentifier(KEY)(row)
    assert out == {**row, "slide_id": pseudonym("P001_S1", KEY, "slide_id"), "patient_id": expected}
    assert row_deidentifier(KEY)({**row, "slide_id": ""})["slide_id"] == ""  # still rejected
    assert row_deidentifier(None) is None


def test_withhold_uri_takes_out_the_path_and_its_names():
    uri = "s3://archive/cohort/P001/P001_S1.tiff"
    text = "cannot read s3://archive/cohort/P001/P001_S1.tiff: P001_S1.tiff is truncated (P001)"
    out = withhold_uri(text, uri)
    assert "P001" not in out and out.startswith("cannot read <uri withheld>:")


def test_run_without_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    result = CliRunner().invoke(
        app, ["run", str(tmp_path / "catalog.csv"), "--out", str(tmp_path / "o"), "--deidentify"]
    )
    assert result.exit_code == 2
    assert f"needs a key in the environment variable {KEY_ENV}" in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


def test_identified_folder_refuses_deidentified_results(tmp_path):
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("slide_id,uri,patient_id,site,um_per_px\nP1_S1,x.png,P1,s,0.25\n")
    RunStore(str(tmp_path / "run")).open({"run": {"segmenter": "classical"}}, "h")
    with pytest.raises(DeidentifyError, match="catalog's own patient and slide ids"):
        run(str(catalog), str(tmp_path / "run"), deidentify_key=KEY)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two patients × one 360×480 field, P001 with a CBC, and a P003 slide whose file is
    missing (its failure must not name it either)."""
    from rbcbatch.dev.synth import synth_cohort

    out = tmp_path_factory.mktemp("deid_cohort")
    catalog = synth_cohort(out, n_patients=2, images_per_patient=1, seed=5, height=360, width=480)
    with open(catalog, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        cbc = row["patient_id"] == "P001"
        row.update(hb_g_dl="10.5" if cbc else "", mchc_g_dl="37.2" if cbc else "", rdw_pct="")
    rows.append(
        {**rows[0], "slide_id": "P003_S1", "patient_id": "P003", "uri": "images/P003/P003_S1.png"}
    )
    with open(catalog, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return catalog


def leaks(folder: Path, needles: list[bytes]) -> tuple[list[str], dict[str, int]]:
    """Every file of `folder` holding a needle, in its bytes or (Parquet) its decoded values;
    and how many files of each kind were read."""
    found, kinds = [], {"parquet": 0, "json": 0, "zarr.json": 0, "other": 0}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blobs = [path.read_bytes()]
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            blobs.append(repr(table.to_pylist()).encode())
            blobs.append(repr(table.schema.metadata).encode())
        kind = (
            "zarr.json"
            if path.name == "zarr.json"
            else path.suffix[1:]
            if path.suffix in (".parquet", ".json")
            else "other"
        )
        kinds[kind] += 1
        found += [f"{path.relative_to(folder)}: {n!r}" for n in needles for b in blobs if n in b]
    return found, kinds


@pytest.mark.slow
def test_deidentified_run_writes_no_raw_id_and_resumes(cohort, tmp_path, ray_local):
    out = tmp_path / "run"
    summary = run(str(cohort), str(out), deidentify_key=KEY, workers=1)
    assert (summary.processed, summary.n_failed) == (3, 1)

    needles = [b"P001", b"P002", b"P003", str(cohort.parent).encode(), KEY]
    found, kinds = leaks(out, needles)
    assert found == []
    # The scan read every kind of output: cells, manifest and failures; records and run.json;
    # Zarr metadata with the mask attributes.
    assert kinds["parquet"] >= 4 and kinds["json"] >= 3 and kinds["zarr.json"] >= 4, kinds
    # No slide pixels either: the labels' parent image (the overview) stores no chunk, the
    # labels do.
    slides_dirs = [d for d in (out / "masks.zarr").iterdir() if d.is_dir()]
    assert len(slides_dirs) == 2
    for d in slides_dirs:
        assert not [p for p in d.glob("[0-9]*/c/**/*") if p.is_file()], d
        assert [p for p in d.glob("labels/cells/0/c/**/*") if p.is_file()], d

    pt = {p: pseudonym(p, KEY) for p in ("P001", "P002")}
    seen = leaks(out, [pt["P001"].encode()])[0]  # the scan does find what is there
    assert any(s.startswith("manifest.parquet") for s in seen) and len(seen) >= 3
    rows = query(str(out), "SELECT * FROM patients ORDER BY n_rbc").to_pylist()
    assert sorted(r["patient_id"] for r in rows) == sorted(pt.values())
    slides = query(str(out), "SELECT slide_id, uri, hb_g_dl FROM slides ORDER BY 1").to_pylist()
    assert {s["slide_id"] for s in slides} == {
        pseudonym(f"{p}_S1", KEY, "slide_id") for p in ("P001", "P002")
    }
    assert all(s["uri"] is None for s in slides)
    by_id = {r["patient_id"]: r for r in rows}
    assert (by_id[pt["P001"]]["hb_g_dl"], by_id[pt["P001"]]["mchc_g_dl"]) == (10.5, 37.2)
    assert by_id[pt["P001"]]["hs_supported_by_cbc"] is True
    assert by_id[pt["P002"]]["hb_g_dl"] is None and by_id[pt["P002"]]["n_rbc"] > 20
    failures = pq.read_table(out / "failures.parquet").to_pylist()
    assert [f["slide_id"] for f in failures] == [pseudonym("P003_S1", KEY, "slide_id")]
    assert failures[0]["uri"] is None and "<uri withheld>" in failures[0]["message"]
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["deidentified"]["key_id"] == key_id(KEY)
    assert config["deidentified"]["uri"] == "not written"

    # Same key: the committed slides are skipped (the missing one is tried again).
    again = run(str(cohort), str(out), deidentify_key=KEY, workers=1)
    assert (again.skipped, again.processed, again.n_failed) == (2, 1, 1)
    assert leaks(out, needles)[0] == []
    with pytest.raises(DeidentifyError, match="de-identified with another key"):
        run(str(cohort), str(out), deidentify_key=OTHER_KEY)
    with pytest.raises(DeidentifyError, match="holds de-identified results"):
        run(str(cohort), str(out), new_config=True)

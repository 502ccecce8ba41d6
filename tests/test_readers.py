"""The cells folder as every common Parquet reader opens it (pandas, pyarrow, polars, DuckDB),
and the compaction into one file per patient that finalize does, crashes included."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from rbcbatch.analytics import connect
from rbcbatch.analytics.views import _empty_table
from rbcbatch.engine.run import run
from rbcbatch.store.run_store import SLIDES_KEY, RunStore
from rbcbatch.store.schema import cells_schema
from tests.conftest import catalog_rows, write_catalog
from tests.test_analytics import cells as cells_table

IDS = ("cohort", "patient_id", "slide_id")


# -- what every reader must see alike ----------------------------------------------------------
def read_every_way(cells: Path) -> dict[str, tuple[list[tuple[str, int]], list[str], object]]:
    """Per reader: its (slide_id, cell_id) rows, its patient ids and its column types."""
    out = {}
    for name, table in (
        ("pyarrow", pq.read_table(cells)),
        ("dataset", ds.dataset(cells, format="parquet").to_table()),
    ):
        out[name] = (
            list(zip(table["slide_id"].to_pylist(), table["cell_id"].to_pylist(), strict=True)),
            table["patient_id"].to_pylist(),
            table.schema.remove_metadata(),
        )
    frame = pd.read_parquet(cells)
    out["pandas"] = (
        list(zip(frame["slide_id"], frame["cell_id"].tolist(), strict=True)),
        frame["patient_id"].tolist(),
        frame.dtypes.to_dict(),
    )
    for name, lazy in (
        ("polars folder", pl.scan_parquet(cells)),
        ("polars glob", pl.scan_parquet(f"{cells}/**/*.parquet")),
    ):
        df = lazy.collect()
        out[name] = (df.select("slide_id", "cell_id").rows(), df["patient_id"].to_list(), df.schema)
    assert pl.read_parquet(cells).height == len(out["polars folder"][0])
    relation = duckdb.sql(f"SELECT * FROM read_parquet('{cells}/**/*.parquet')")  # its defaults
    out["duckdb"] = (
        relation.select("slide_id, cell_id").fetchall(),
        [r[0] for r in relation.select("patient_id").fetchall()],
        dict(zip(relation.columns, map(str, relation.types), strict=True)),
    )
    return out


def expected_types() -> dict[str, object]:
    """Each reader's types of the cells schema itself (an empty table of it)."""
    schema, empty = cells_schema(), cells_schema().empty_table()
    registered = duckdb.connect()
    registered.register("empty", _empty_table(schema))  # as the cells view has it with no files
    relation = registered.sql("SELECT * FROM empty")
    return {
        "pyarrow": schema,
        "dataset": schema,
        "pandas": empty.to_pandas().dtypes.to_dict(),
        "polars folder": pl.from_arrow(empty).schema,
        "polars glob": pl.from_arrow(empty).schema,
        "duckdb": dict(zip(relation.columns, map(str, relation.types), strict=True)),
    }


def assert_readers_agree(run_dir: Path, patient: str = "00123") -> list[tuple[str, int]]:
    """Every reader gives the `cells` view's rows, no row twice, ids as strings; returns them."""
    with connect(str(run_dir)) as con:
        view = sorted(con.sql("SELECT slide_id, cell_id FROM cells").fetchall())
        view_columns = con.sql("SELECT * FROM cells LIMIT 0").columns
    assert len(view) == len(set(view)) > 0
    types = expected_types()
    for name, (rows, patients, got) in read_every_way(run_dir / "cells").items():
        assert sorted(rows) == view, name
        assert patient in patients, name  # "00123" stays a string, never 123
        if name == "pandas":
            assert list(got) == cells_schema().names
            assert all(pd.api.types.is_string_dtype(got[c]) for c in IDS)
        assert got == types[name], name
    assert view_columns == cells_schema().names
    return view


def cell_files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir / "cells")) for p in run_dir.glob("cells/**/*.parquet"))


def slides_in(path: Path) -> dict[str, str]:
    return json.loads(pq.read_schema(path).metadata[SLIDES_KEY])


# -- a real run --------------------------------------------------------------------------------
PATIENTS = {"P001": "00123", "P002": "7", "P003": "P3"}  # ids that look like numbers stay ids


@pytest.fixture(scope="module")
def catalog(tiny_cohort, tmp_path_factory) -> list[dict]:
    rows = catalog_rows(tiny_cohort)
    assert sorted({r["patient_id"] for r in rows}) == sorted(PATIENTS)
    return [{**r, "patient_id": PATIENTS[r["patient_id"]], "cohort": "2024"} for r in rows]


@pytest.fixture(scope="module")
def first_run(catalog, ray_local, tmp_path_factory) -> Path:
    """Five of the six slides: P3 has one of its two."""
    tmp = tmp_path_factory.mktemp("readers")
    out = tmp / "run"
    summary = run(str(write_catalog(tmp / "catalog.csv", catalog[:5])), str(out), workers=1)
    assert summary.processed == 5 and not summary.failed
    return out


@pytest.mark.slow
def test_every_reader_opens_a_run_folder_as_it_is(first_run, catalog):
    assert cell_files(first_run) == ["2024/00123.parquet", "2024/7.parquet", "2024/P3.parquet"]
    assert not list(first_run.glob("cells/**/.*")), "no temporary file in cells/"
    rows = assert_readers_agree(first_run)
    manifest = pq.read_table(first_run / "manifest.parquet").to_pylist()
    assert len(rows) == sum(m["n_objects"] for m in manifest)
    for patient in ("00123", "7"):
        path = first_run / "cells" / "2024" / f"{patient}.parquet"
        slides = [r["slide_id"] for r in catalog[:5] if r["patient_id"] == patient]
        assert sorted(slides_in(path)) == sorted(slides)
        assert pq.ParquetFile(path).num_row_groups == len(slides)  # one per (small) slide
    store = RunStore(str(first_run))
    for m in manifest:  # a slide's own rows, read from its patient's file
        table = store.read_cells(m["slide_id"])
        assert table.num_rows == m["n_objects"] and table.schema.equals(cells_schema())
        assert set(table["slide_id"].to_pylist()) == {m["slide_id"]}


@pytest.mark.slow
def test_a_later_run_rewrites_only_the_patients_with_new_slides(first_run, catalog, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    untouched = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("cells/2024/[07]*")}
    summary = run(str(write_catalog(tmp_path / "catalog.csv", catalog)), str(out), workers=1)
    assert (summary.processed, summary.skipped) == (1, 5)

    assert cell_files(out) == ["2024/00123.parquet", "2024/7.parquet", "2024/P3.parquet"]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in untouched} == untouched
    p3 = out / "cells" / "2024" / "P3.parquet"
    assert sorted(slides_in(p3)) == sorted(r["slide_id"] for r in catalog[4:])
    assert pq.ParquetFile(p3).num_row_groups == 2
    rows = assert_readers_agree(out)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 6 and len(rows) == sum(m["n_objects"] for m in manifest)


# -- compaction, step by step, on a hand-made run folder -----------------------------------------
def add_slide(
    store: RunStore, slide: str, patient: str, n: int = 3, run_id: str = "r1", commit=True
):
    rows = [("rbc", "normal", 7.0)] * n
    store.write_cells("c", patient, slide, cells_table(slide, patient, rows, run_id=run_id))
    if commit:
        record = {"slide_id": slide, "patient_id": patient, "cohort": "c", "run_id": run_id}
        store.commit({**record, "status": "ok"})


def die_at_removing_slide_files(monkeypatch, fs) -> None:
    """The run dies where compaction first removes a slide file: its patient file is in place."""
    rm = fs.rm

    def rm_or_die(path, *args, **kwargs):
        if re.search(r"/cells/[^/]+/[^/]+/[^/]+\.parquet$", str(path)):
            raise KeyboardInterrupt("killed")
        return rm(path, *args, **kwargs)

    monkeypatch.setattr(fs, "rm", rm_or_die)


@pytest.fixture()
def store(tmp_path) -> RunStore:
    """Patient 00123 with three slides (one of them without cells), patient 7 with one."""
    store = RunStore(str(tmp_path / "run"))
    store.open({"test": True}, "h1")
    for slide, patient, n in (("A1", "00123", 3), ("A2", "00123", 0), ("A3", "00123", 4)):
        add_slide(store, slide, patient, n)
    add_slide(store, "B1", "7", 2)
    return store


def test_finalize_folds_the_slide_files_into_one_file_per_patient(store):
    run_dir = Path(store.url)
    assert len(cell_files(run_dir)) == 4
    before = {s: store.read_cells(s) for s in ("A1", "A2", "A3", "B1")}
    assert_readers_agree(run_dir)  # slide files before compaction read alike too

    store.finalize()
    assert cell_files(run_dir) == ["c/00123.parquet", "c/7.parquet"]
    assert not (run_dir / "cells" / "c" / "00123").exists()  # the emptied folder is gone
    path = run_dir / "cells" / "c" / "00123.parquet"
    assert slides_in(path) == {"A1": "r1", "A2": "r1", "A3": "r1"}
    groups = pq.ParquetFile(path).metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [3, 4]
    assert {s: store.read_cells(s) for s in before} == before
    assert len(assert_readers_agree(run_dir)) == 9
    # a slide's rows are found by the row groups' statistics alone
    stats = groups.row_group(1).column(cells_schema().get_field_index("slide_id")).statistics
    assert (stats.min, stats.max) == ("A3", "A3")

    store.finalize()  # nothing new: nothing rewritten
    assert store.compact_cells() == 0


def test_a_run_killed_after_the_move_is_repaired_without_counting_twice(store, monkeypatch):
    run_dir = Path(store.url)
    die_at_removing_slide_files(monkeypatch, store.fs)
    with pytest.raises(KeyboardInterrupt):
        store.finalize()
    monkeypatch.undo()
    assert "c/00123.parquet" in cell_files(run_dir) and "c/00123/A1.parquet" in cell_files(run_dir)
    patient_file = (run_dir / "cells" / "c" / "00123.parquet").read_bytes()

    again = RunStore(store.url)
    again.finalize()  # the next run's
    assert cell_files(run_dir) == ["c/00123.parquet", "c/7.parquet"]
    assert (run_dir / "cells" / "c" / "00123.parquet").read_bytes() == patient_file  # not redone
    assert len(assert_readers_agree(run_dir)) == 9


def test_a_run_killed_before_the_move_leaves_no_temporary_file_in_cells(store, monkeypatch):
    run_dir = Path(store.url)
    mv = store.fs.mv

    def killed(source, target, **kwargs):
        if target.endswith("/c/00123.parquet"):
            raise KeyboardInterrupt("killed")
        return mv(source, target, **kwargs)

    monkeypatch.setattr(store.fs, "mv", killed)
    with pytest.raises(KeyboardInterrupt):
        store.finalize()
    monkeypatch.undo()
    assert list(run_dir.glob("_tmp/cells/.c+00123.parquet.tmp"))
    assert not list(run_dir.glob("cells/**/.*"))
    assert len(assert_readers_agree(run_dir)) == 9  # polars reads the folder: no stray suffix

    RunStore(store.url).finalize()
    assert cell_files(run_dir) == ["c/00123.parquet", "c/7.parquet"]
    assert len(assert_readers_agree(run_dir)) == 9


def test_only_committed_slides_of_their_committed_run_are_folded_in(store):
    run_dir = Path(store.url)
    add_slide(store, "A4", "00123", 5, commit=False)  # a killed run's, never committed
    add_slide(store, "B2", "7", 6, run_id="old")  # a stale part: its record says r2
    store.commit({"slide_id": "B2", "patient_id": "7", "cohort": "c", "run_id": "r2"})
    store.finalize()
    assert cell_files(run_dir) == [
        "c/00123.parquet",
        "c/00123/A4.parquet",
        "c/7.parquet",
        "c/7/B2.parquet",
    ]
    assert slides_in(run_dir / "cells" / "c" / "7.parquet") == {"B1": "r1"}
    with connect(store.url) as con:
        assert con.sql("SELECT count(*) FROM cells").fetchall() == [(9,)]

    # A new configuration's run redoes B1 and B2: the patient's file then holds its rows alone.
    add_slide(store, "B1", "7", 1, run_id="r2")
    add_slide(store, "B2", "7", 2, run_id="r2")
    store.finalize()
    assert slides_in(run_dir / "cells" / "c" / "7.parquet") == {"B1": "r2", "B2": "r2"}
    assert pq.read_table(run_dir / "cells" / "c" / "7.parquet").num_rows == 3
    assert "c/7/B2.parquet" not in cell_files(run_dir)


def test_an_older_run_in_the_hive_layout_still_queries_and_is_folded_in(tmp_path):
    store = RunStore(str(tmp_path / "run"))
    store.open({"test": True}, "h1")
    for slide, patient, n in (("A1", "00123", 3), ("A2", "00123", 2), ("B1", "7", 4)):
        folder = tmp_path / "run" / "cells" / "cohort=c" / f"patient_id={patient}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = [("rbc", "normal", 7.0)] * n
        pq.write_table(cells_table(slide, patient, rows), folder / f"{slide}.parquet")
        store.commit({"slide_id": slide, "patient_id": patient, "cohort": "c", "run_id": "r1"})
    with connect(store.url) as con:
        rows = con.sql("SELECT patient_id, count(*) FROM cells GROUP BY 1 ORDER BY 1").fetchall()
        described = dict(
            con.sql("SELECT column_name, column_type FROM (DESCRIBE cells)").fetchall()
        )
    assert rows == [("00123", 5), ("7", 4)]
    assert described["patient_id"] == described["cohort"] == "VARCHAR"
    assert store.read_cells("A1").num_rows == 3

    store.finalize()  # the next run in that folder moves it to the plain layout
    assert cell_files(tmp_path / "run") == ["c/00123.parquet", "c/7.parquet"]
    assert not (tmp_path / "run" / "cells" / "cohort=c").exists()
    assert len(assert_readers_agree(tmp_path / "run")) == 9


@pytest.mark.slow
def test_compaction_and_its_repair_on_s3(s3_endpoint, monkeypatch):
    import s3fs

    from rbcbatch.io.storage import resolve_options
    from tests.test_s3 import new_bucket, s3_options

    options = s3_options(s3_endpoint)
    fs = s3fs.S3FileSystem(**resolve_options(options, "s3://"))
    url = f"s3://{new_bucket(fs, 'compact')}/run"
    store = RunStore(url, resolve_options(options, url))
    store.open({"test": True}, "h1")
    for slide, patient, n in (("A1", "00123", 3), ("A2", "00123", 4), ("B1", "7", 2)):
        add_slide(store, slide, patient, n)
    die_at_removing_slide_files(monkeypatch, store.fs)
    with pytest.raises(KeyboardInterrupt):
        store.finalize()
    monkeypatch.undo()
    prefix = url.removeprefix("s3://")
    assert fs.exists(f"{prefix}/cells/c/00123.parquet") and fs.exists(
        f"{prefix}/cells/c/00123/A1.parquet"
    )
    RunStore(url, resolve_options(options, url)).finalize()

    fs.invalidate_cache()
    files = sorted(f.removeprefix(f"{prefix}/") for f in fs.find(prefix) if "cells" in f)
    assert files == ["cells/c/00123.parquet", "cells/c/7.parquet"]  # no temporary left either
    table = pq.read_table(f"{prefix}/cells", filesystem=fs)
    assert sorted(table["patient_id"].to_pylist()) == ["00123"] * 7 + ["7"] * 2
    with connect(url, storage_options=options) as con:
        assert con.sql("SELECT count(*) FROM cells").fetchall() == [(9,)]

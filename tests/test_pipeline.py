"""End-to-end runs on real Ray with real files: outputs, schema, bad input, resume after a kill."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import zarr

from rbcbatch.engine.run import run
from rbcbatch.store.schema import cells_schema

pytestmark = pytest.mark.slow
RBCBATCH = [sys.executable, "-m", "rbcbatch.cli"]


def read_cells(run_dir: Path):
    table = pq.read_table(run_dir / "cells", partitioning=None)  # every column is in the files
    return table.sort_by([("slide_id", "ascending"), ("cell_id", "ascending")])


def assert_same_rows(a, b, ignore=("run_id",)) -> None:
    """Equal cell tables, NaN equal to NaN (undefined measures of tiny cells are NaN)."""
    left = a.drop_columns(list(ignore)).to_pandas()
    right = b.drop_columns(list(ignore)).to_pandas()
    pd.testing.assert_frame_equal(left, right, check_exact=True)


@pytest.fixture(scope="module")
def clean_run(tiny_cohort, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "run"
    summary = run(str(tiny_cohort), str(out))
    return out, summary


def test_outputs_follow_the_contract(clean_run, tiny_cohort):
    out, summary = clean_run
    assert summary.n_failed == 0 and summary.processed == 6
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [m["status"] for m in manifest] == ["ok"] * 6
    cells = read_cells(out)
    assert cells.schema.equals(cells_schema())
    assert set(pc.unique(cells["run_id"]).to_pylist()) == {summary.run_id}
    root = zarr.open_group(str(out / "masks.zarr"), mode="r")
    for m in manifest:
        slide = cells.filter(pc.equal(cells["slide_id"], m["slide_id"]))
        group = root[f"{m['slide_id']}/labels/cells"]
        labels = group["0"][...]
        assert labels.shape == (m["height"], m["width"]) and labels.dtype == np.uint32
        assert set(np.unique(labels[labels > 0]).tolist()) == set(slide["cell_id"].to_pylist())
        assert m["n_objects"] == slide.num_rows
        # centroids are full-resolution slide pixels lying on their own label
        ids = slide["cell_id"].to_numpy()
        cy = np.round(slide["centroid_y"].to_numpy()).astype(int).clip(0, labels.shape[0] - 1)
        cx = np.round(slide["centroid_x"].to_numpy()).astype(int).clip(0, labels.shape[1] - 1)
        rbc = (slide["kind"].to_numpy(zero_copy_only=False) == "rbc") & (
            slide["solidity"].to_numpy() > 0.9
        )
        assert (labels[cy, cx] == ids)[rbc].mean() > 0.97
        ome = group.attrs["ome"]["multiscales"][0]
        assert ome["datasets"][0]["coordinateTransformations"][0]["scale"] == [m["um_per_px"]] * 2
        assert np.array_equal(group["1"][...], labels[::2, ::2])
    area_um2 = cells["area_um2"].to_numpy()
    assert 30 < np.median(area_um2) < 60  # red cells are ~7 µm across: area in µm², not pixels


def test_rerun_skips_committed_slides(clean_run, tiny_cohort):
    out, _ = clean_run
    before = read_cells(out)
    again = run(str(tiny_cohort), str(out))
    assert (again.processed, again.skipped, again.n_failed) == (0, 6, 0)
    assert_same_rows(read_cells(out), before, ignore=())


def write_bad_inputs(folder: Path, good_catalog: Path) -> Path:
    """A catalog mixing two good slides with every kind of bad input."""
    good = good_catalog.read_text().splitlines()
    header, rows = good[0], good[1:3]
    images = good_catalog.parent
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    png = folder / "huge.png"
    from tests.test_sources import huge_png_header

    png.write_bytes(huge_png_header(80_000, 80_000))
    first_uri = str(images / rows[0].split(",")[1])
    bad = [
        f"bad_corrupt,{folder / 'corrupt.jpg'},PX,site_a,scanA,wright,0.25,synthetic,normal",
        f"bad_empty,{folder / 'empty.png'},PX,site_a,scanA,wright,0.25,synthetic,normal",
        f"bad_text,{folder / 'text.png'},PX,site_a,scanA,wright,0.25,synthetic,normal",
        f"bad_missing,{folder / 'missing.png'},PX,site_a,scanA,wright,0.25,synthetic,normal",
        f"bad_huge,{png},PX,site_a,scanA,wright,0.25,synthetic,normal",
        f"../x,{first_uri},PX,site_a,scanA,wright,0.25,synthetic,normal",
        f",{first_uri},PX,site_a,scanA,wright,0.25,synthetic,normal",
        rows[0].replace(rows[0].split(",")[1], first_uri),  # duplicate of the first good row
    ]
    good_rows = [r.replace(r.split(",")[1], str(images / r.split(",")[1])) for r in rows]
    path = folder / "mixed.csv"
    path.write_text("\n".join([header, *good_rows, *bad]) + "\n")
    return path


EXPECTED_FAILURES = {
    "bad_corrupt": "corrupt or truncated JPEG",
    "bad_empty": "file is empty",
    "bad_text": "not an image",
    "bad_missing": "no such file",
    "bad_huge": "over the",
    "../x": "not a safe name",
    "": "slide_id is empty",
}


def test_each_bad_input_is_one_failure_and_the_rest_finish(tiny_cohort, ray_local, tmp_path):
    catalog = write_bad_inputs(tmp_path, tiny_cohort)
    summary = run(str(catalog), str(tmp_path / "run"))
    failures = pq.read_table(tmp_path / "run" / "failures.parquet").to_pylist()
    assert len(failures) == len(EXPECTED_FAILURES) + 1 == summary.n_failed
    by_id = {}
    for f in failures:
        by_id.setdefault(f["slide_id"], []).append(f)
    for slide_id, text in EXPECTED_FAILURES.items():
        assert text in by_id[slide_id][-1]["message"], (slide_id, by_id[slide_id])
    duplicate = [f for f in failures if "duplicate" in f["message"]]
    assert len(duplicate) == 1 and duplicate[0]["stage"] == "catalog"
    manifest = pq.read_table(tmp_path / "run" / "manifest.parquet").to_pylist()
    assert sorted(m["slide_id"] for m in manifest if m["status"] == "ok") == sorted(
        line.split(",")[0] for line in tiny_cohort.read_text().splitlines()[1:3]
    )


def test_cli_exit_status_counts_failures(tiny_cohort, tmp_path):
    catalog = write_bad_inputs(tmp_path, tiny_cohort)
    proc = subprocess.run(
        [*RBCBATCH, "run", str(catalog), "--out", str(tmp_path / "run"), "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == 1, proc.stderr
    assert "8 of 10 slide(s) failed" in proc.stderr
    ok = subprocess.run(
        [*RBCBATCH, "query", str(tmp_path / "run"), "SELECT count(*) AS n FROM slides", "--csv"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert ok.returncode == 0 and ok.stdout.splitlines() == ['"n"', "2"]


def _env() -> dict:
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}


def test_resume_after_a_real_kill_gives_the_clean_run(clean_run, tiny_cohort, tmp_path):
    """Kill `rbcbatch run` (and its Ray) mid-run with SIGKILL, run again, compare with a clean run."""
    clean_out, _ = clean_run
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [*RBCBATCH, "run", str(tiny_cohort), "--out", str(out), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    committed = out / "_slides"
    while time.monotonic() < deadline:
        n = len(list(committed.glob("*.json"))) if committed.exists() else 0
        if n >= 2:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    n_committed = len(list(committed.glob("*.json")))
    assert 2 <= n_committed < 6, f"kill came too late to test resume: {n_committed} committed"
    resumed = run(str(tiny_cohort), str(out))
    assert resumed.skipped == n_committed and resumed.processed == 6 - n_committed
    assert resumed.n_failed == 0
    assert_same_rows(read_cells(out), read_cells(clean_out))
    a = zarr.open_group(str(out / "masks.zarr"), mode="r")
    b = zarr.open_group(str(clean_out / "masks.zarr"), mode="r")
    assert sorted(a.group_keys()) == sorted(b.group_keys())
    for key in b.group_keys():
        assert np.array_equal(a[f"{key}/labels/cells/0"][...], b[f"{key}/labels/cells/0"][...])
    leftovers = [p for p in out.rglob(".*.tmp")]
    assert len(leftovers) <= 1  # at most the write the kill interrupted
    shutil.rmtree(out)


def test_demo_agreement_against_truth(clean_run, tiny_cohort):
    from rbcbatch.dev.demo import agreement_tables

    out, _ = clean_run
    tables = dict(agreement_tables(str(out), tiny_cohort.parent / "truth.parquet"))
    counts = tables["RBC counts vs synthetic truth"].to_pylist()[0]
    assert counts["slides"] == 6 and abs(counts["pooled_count_error_pct"]) < 5.0
    flags = {r["flag"]: r for r in tables["screening flags vs synthetic truth"].to_pylist()}
    assert flags["hs_flag"]["tp"] + flags["hs_flag"]["fn"] + flags["hs_flag"]["insufficient"] >= 1
    assert flags["hs_flag"]["fp"] == 0


def test_missing_pixel_size_is_estimated_and_recorded(tiny_cohort, ray_local, tmp_path):
    lines = tiny_cohort.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("um_per_px")
    rows = []
    for line in lines[1:3]:
        cells = line.split(",")
        cells[1] = str(tiny_cohort.parent / cells[1])
        truth = float(cells[col])
        cells[col] = ""
        rows.append(",".join(cells))
    catalog = tmp_path / "no_pixel_size.csv"
    catalog.write_text("\n".join([lines[0], *rows]) + "\n")
    summary = run(str(catalog), str(tmp_path / "run"))
    assert summary.n_failed == 0
    manifest = pq.read_table(tmp_path / "run" / "manifest.parquet").to_pylist()
    for m in manifest:
        assert m["um_per_px_source"] == "estimated" and m["calibration_cells"] >= 20
        assert m["um_per_px"] == pytest.approx(truth, rel=0.15)
    cells = read_cells(tmp_path / "run")
    assert set(pc.unique(cells["um_per_px"]).to_pylist()) == {m["um_per_px"] for m in manifest}


def test_stages_take_gpus_for_learned_models_only():
    from rbcbatch.engine.config import RunConfig
    from rbcbatch.engine.run import stage_shape

    cluster = {"CPU": 16.0, "GPU": 2.0, "memory": 64e9}
    rules = stage_shape(RunConfig(classifier="rules"), cluster, None, 100)
    # Without a learned model the GPUs stay out: 16 CPU actors, each leaving a share to the
    # read and write tasks (16 - 2 x 0.25 CPUs shared by 16).
    assert (rules.model_actors, rules.model, rules.task) == (
        16,
        {"num_cpus": 15.5 / 16},
        {"num_cpus": 0.25},
    )
    learned = stage_shape(RunConfig(), cluster, None, 100)  # the default classifier is learned
    assert (learned.model_actors, learned.model) == (2, {"num_gpus": 1, "num_cpus": 1})
    assert learned.task == {"num_cpus": 1}
    # A read task asks for 12 bytes a pixel of the largest whole image, within memory per CPU.
    assert learned.read(100_000_000, cluster) == {"num_cpus": 1, "memory": int(1.2e9)}
    assert learned.read(10**9, cluster) == {"num_cpus": 1, "memory": int(64e9 / 16)}
    laptop = stage_shape(RunConfig(), {"CPU": 2.0}, None, 1)
    assert (laptop.model_actors, laptop.model, laptop.task) == (
        1,
        {"num_cpus": 1.0},
        {"num_cpus": 0.25},
    )
    two = stage_shape(RunConfig(), {"CPU": 2.0}, None, 10)
    assert (two.model_actors, two.model["num_cpus"]) == (2, 0.75)


def test_learned_classifier_writes_probabilities_and_embeddings(tiny_cohort, ray_local, tmp_path):
    from rbcbatch.engine.config import RunConfig

    lines = tiny_cohort.read_text().splitlines()
    rows = [
        ",".join(
            [c if j != 1 else str(tiny_cohort.parent / c) for j, c in enumerate(line.split(","))]
        )
        for line in lines[1:3]
    ]
    catalog = tmp_path / "two.csv"
    catalog.write_text("\n".join([lines[0], *rows]) + "\n")
    summary = run(str(catalog), str(tmp_path / "run"), RunConfig(classifier="resnet"))
    assert summary.n_failed == 0
    cells = read_cells(tmp_path / "run")
    rbc = cells.filter(pc.equal(cells["kind"], "rbc"))
    assert rbc.num_rows > 50
    probs = np.array(rbc["probabilities"].to_pylist(), dtype=np.float64)
    assert probs.shape[1] == 13 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)
    assert np.allclose(probs.max(axis=1), rbc["class_probability"].to_numpy(), atol=1e-6)
    assert {len(e) for e in rbc["embedding"].to_pylist()} == {64}
    other = cells.filter(pc.not_equal(cells["kind"], "rbc"))
    assert other["embedding"].null_count == other.num_rows

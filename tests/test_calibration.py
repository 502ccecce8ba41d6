"""Pixel size per site and scanner: one estimate from a group's isolated cells, a sparse slide
carried by its group, an unstable group failing by name, and flags equal to a run with the
pixel size given."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from rbcbatch.engine.calibration import (
    GROUP_MAX_REL_WIDTH,
    SlideCells,
    calibrate_groups,
    estimate_group,
)
from rbcbatch.io.catalog import SlideSpec
from rbcbatch.segment.calibrate import RBC_DIAMETER_UM
from tests.conftest import catalog_rows, write_catalog


def diameters(rng, n: int, px: float, sd: float = 0.08) -> np.ndarray:
    """n isolated-cell diameters (px) around `px`, with the 8% spread of real red cells."""
    return rng.normal(px, sd * px, n)


def cells(rng, n: int, px: float, shape=(480, 640)) -> SlideCells:
    return SlideCells(diameters(rng, n, px), shape)


def spec(slide_id: str, site: str = "a", scanner: str = "s1", um: float | None = None):
    return SlideSpec(slide_id, f"/x/{slide_id}.png", "p", site, um, scanner=scanner)


def test_a_group_estimate_pools_its_slides():
    rng = np.random.default_rng(0)
    estimate = estimate_group("a", "s1", [diameters(rng, 60, 30.0) for _ in range(4)])
    assert estimate.um_per_px == pytest.approx(RBC_DIAMETER_UM / 30.0, rel=0.02)
    lo, hi = estimate.interval
    assert lo < estimate.um_per_px < hi and (hi - lo) / estimate.um_per_px < GROUP_MAX_REL_WIDTH
    assert (estimate.n_slides, estimate.n_cells, estimate.problem) == (4, 240, "")


def test_slides_of_two_magnifications_under_one_group_are_refused():
    rng = np.random.default_rng(1)
    mixed = [diameters(rng, 60, 30.0), diameters(rng, 60, 60.0), diameters(rng, 60, 30.0)]
    estimate = estimate_group("a", "s1", mixed)
    assert estimate.um_per_px is None and "magnifications" in estimate.problem
    # Few cells: a wide interval.
    few = estimate_group("a", "s1", [diameters(np.random.default_rng(3), 21, 30.0, sd=0.4)])
    assert few.um_per_px is None and "95% interval" in few.problem


def test_two_magnifications_of_two_image_sizes_are_estimated_per_size():
    """Chula's 640- and 1280-px images under one site and scanner: 2x apart, both right."""
    rng = np.random.default_rng(4)
    small, large = (480, 640), (960, 1280)
    found = {f"s{i}": cells(rng, 60, 38.0, small) for i in range(3)}
    found |= {f"l{i}": cells(rng, 60, 76.0, large) for i in range(3)}
    ready, failures, estimates = calibrate_groups([spec(k) for k in found], found)
    assert failures == [] and len(estimates) == 2
    by_id = {s.slide_id: s.um_per_px for s in ready}
    assert by_id["s0"] == pytest.approx(RBC_DIAMETER_UM / 38.0, rel=0.03)
    assert by_id["l0"] == pytest.approx(by_id["s0"] / 2, rel=0.03)
    assert {e.image_size for e in estimates} == {small, large}
    assert "images 1280x960 px" in next(e.name for e in estimates if e.image_size == large)
    # One image size with two magnifications stays a failure naming the group.
    same = {k: SlideCells(v.diameters, small) for k, v in found.items()}
    _, failures, _ = calibrate_groups([spec(k) for k in same], same)
    assert len(failures) == 6 and "magnifications" in failures[0].message


def test_a_resumed_run_keeps_the_estimate_committed_for_its_group_and_size():
    rng = np.random.default_rng(5)
    found = {"a": cells(rng, 80, 30.0), "b": cells(rng, 80, 30.0, (960, 1280))}
    earlier = {("a", "s1", (480, 640)): (0.2468, 321)}
    ready, _, _ = calibrate_groups([spec("a"), spec("b")], found, earlier)
    by_id = {s.slide_id: s for s in ready}
    assert (by_id["a"].um_per_px, by_id["a"].calibration_cells) == (0.2468, 321)
    assert by_id["b"].um_per_px == pytest.approx(RBC_DIAMETER_UM / 30.0, rel=0.03)


def test_a_sparse_slide_is_carried_by_its_group_and_a_sparse_group_fails_by_name():
    rng = np.random.default_rng(2)
    specs = [
        spec("dense1"),
        spec("dense2"),
        spec("sparse"),  # 4 isolated cells: alone it could not be calibrated
        spec("given", um=0.3),  # the catalog's value is kept
        spec("lonely", site="b", scanner="s9"),  # its group has 5 cells in all
        spec("unreadable"),
    ]
    found = {
        "dense1": cells(rng, 80, 30.0),
        "dense2": cells(rng, 80, 30.0),
        "sparse": cells(rng, 4, 30.0, shape=(90, 120)),  # a corner of a field
        "given": cells(rng, 80, 10.0),
        "lonely": cells(rng, 5, 30.0),
        "unreadable": None,
    }
    ready, failures, estimates = calibrate_groups(specs, found)
    by_id = {s.slide_id: s for s in ready}
    assert set(by_id) == {"dense1", "dense2", "sparse", "given", "unreadable"}
    group_um = by_id["dense1"].um_per_px
    assert group_um == pytest.approx(0.25, rel=0.03)
    assert by_id["sparse"].um_per_px == by_id["dense2"].um_per_px == group_um
    assert by_id["sparse"].um_per_px_source == "estimated"
    assert by_id["sparse"].calibration_cells == 164
    assert (by_id["given"].um_per_px, by_id["given"].um_per_px_source) == (0.3, "")
    assert by_id["unreadable"].um_per_px is None  # its processing reports why it cannot be read
    [failure] = failures
    assert (failure.slide_id, failure.stage) == ("lonely", "calibrate")
    assert "site 'b', scanner 's9'" in failure.message and "only 5 isolated" in failure.message
    assert {(e.site, e.scanner) for e in estimates} == {("a", "s1"), ("b", "s9")}


@pytest.mark.slow
def test_a_cohort_without_pixel_sizes_gets_them_per_site_and_flags_as_with_them(
    ray_local, tmp_path
):
    from PIL import Image

    from rbcbatch.analytics import query
    from rbcbatch.dev.synth import synth_cohort
    from rbcbatch.engine.run import run

    # Two sites of two patients each (site_a normal + IDA, site_b HS + normal), as a cohort
    # mixes conditions within a site.
    cohort = synth_cohort(tmp_path / "cohort", 4, 2, seed=11, height=360, width=480)
    rows = catalog_rows(cohort)
    truth = {r["slide_id"]: float(r["um_per_px"]) for r in rows}
    # A slide with a handful of cells: a corner of one field. Alone it cannot be calibrated.
    first = rows[0]
    corner = tmp_path / "corner.png"
    Image.open(first["uri"]).crop((0, 0, 120, 90)).save(corner)
    rows.append({**first, "slide_id": "P001_corner", "uri": str(corner)})
    truth["P001_corner"] = float(first["um_per_px"])
    given = run(str(write_catalog(tmp_path / "given.csv", rows)), str(tmp_path / "given"))
    blank = [{**r, "um_per_px": ""} for r in rows]
    estimated = run(str(write_catalog(tmp_path / "blank.csv", blank)), str(tmp_path / "blank"))
    assert given.n_failed == 0 and estimated.n_failed == 0, estimated.failed

    manifest = pq.read_table(tmp_path / "blank" / "manifest.parquet").to_pylist()
    per_group: dict[tuple, set] = {}
    for m in manifest:
        assert m["um_per_px_source"] == "estimated"
        # The median isolated cell reads high where small cells are common (as per slide).
        assert m["um_per_px"] == pytest.approx(truth[m["slide_id"]], rel=0.15)
        per_group.setdefault((m["site"], m["scanner"]), set()).add(m["um_per_px"])
    assert all(len(values) == 1 for values in per_group.values())  # one estimate per group

    sql = "SELECT patient_id, hs_flag, anemia_flag, hs_evidence FROM patients ORDER BY 1"
    with_size = query(str(tmp_path / "given"), sql).to_pylist()
    without = query(str(tmp_path / "blank"), sql).to_pylist()
    flags = [(r["patient_id"], r["hs_flag"], r["anemia_flag"]) for r in with_size]
    assert flags == [(r["patient_id"], r["hs_flag"], r["anemia_flag"]) for r in without]
    assert json.loads(without[0]["hs_evidence"])["um_per_px"] == {
        "sources": ["estimated"],
        "estimated": True,
    }
    assert json.loads(with_size[0]["hs_evidence"])["um_per_px"]["estimated"] is False

    # Resumed, the group keeps its estimate: a new slide of it is measured at the same scale.
    extra = {**blank[1], "slide_id": "P001_again"}
    again = run(
        str(write_catalog(tmp_path / "blank.csv", [*blank, extra])), str(tmp_path / "blank")
    )
    assert again.processed == 1 and again.n_failed == 0
    records = {
        m["slide_id"]: m for m in pq.read_table(tmp_path / "blank" / "manifest.parquet").to_pylist()
    }
    assert records["P001_again"]["um_per_px"] == records[blank[1]["slide_id"]]["um_per_px"]

"""`rbcbatch submit` end to end: a real Ray head with its job server on loopback, jobs submitted
through the CLI and followed to their end, and what they write equal to `rbcbatch run-job` here.

One head serves the whole module. It runs in its own process session (`ray start --head --block`
under a small keeper that stops it when its stdin closes), so it never meets the pytest
process's own Ray (`ray_local`), and nothing is left running when the module ends or pytest dies.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rbcbatch.analytics import connect
from rbcbatch.cli import app
from rbcbatch.jobs.submit import follow
from tests.conftest import catalog_rows, free_port, wait_until_serving, write_catalog
from tests.test_jobs import said, slide_files, snapshot, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Keeps `ray start --head --block` (argv[1:]) running until its stdin closes (the fixture ends,
# or pytest dies), then stops it and kills, by process id, whatever is left in its session:
# Ray's workers and a job's driver. Never `ray stop`, which stops every Ray on the machine.
_KEEPER = """
import os, signal, subprocess, sys
head = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
try:
    sys.stdin.read()
finally:
    head.terminate()
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        head.kill()
    me, session = os.getpid(), os.getsid(0)
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if pid != me and os.getsid(pid) == session:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _session_processes(session: int) -> list[int]:
    """Live processes of a session (zombies hold nothing and go when they are reaped)."""
    alive = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and os.getsid(int(p)) == session:
                state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    alive.append(int(p))
        except OSError:
            pass
    return alive


@pytest.fixture(scope="module")
def job_server():
    """A Ray head (2 CPUs) with its dashboard and job server on 127.0.0.1; yields its URL."""
    temp_dir = tempfile.mkdtemp(prefix="rbc-ray-")  # short: Ray's socket paths must stay short
    port, dashboard = free_port(), free_port()
    url = f"http://127.0.0.1:{dashboard}"
    head = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        f"--port={port}", f"--temp-dir={temp_dir}", "--num-cpus=2",
        f"--object-store-memory={100 * 1024 * 1024}", "--disable-usage-stats",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        # Every Ray on a host wants the agent's port 52365 (the tests' own Ray too): take others.
        f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # nodes on 127.0.0.1
        # Explicit, so that a token some other Ray left in ~/.ray does not turn auth on.
        "RAY_AUTH_MODE": "disabled",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once, not after 30 s of draining
    }
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 (open for the module's life)
    keeper = subprocess.Popen(
        [sys.executable, "-c", _KEEPER, *head],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        wait_until_serving(
            f"{url}/api/version",
            keeper,
            90,
            "a Ray job server",
            log=lambda: (Path(temp_dir) / "head.log").read_text(errors="replace")[-3000:],
        )
        yield url
    finally:
        keeper.stdin.close()
        try:
            keeper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(keeper.pid, signal.SIGKILL)
            keeper.wait()
        log.close()
        deadline = time.monotonic() + 10  # processes the keeper killed may take a moment to go
        while (left := _session_processes(keeper.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert left == [], f"Ray processes outlived the job server's keeper: {left}"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Two patients × 2 small fields (4 slides, ~170 cells); returns the catalog path."""
    from rbcbatch.dev.synth import synth_cohort

    out = tmp_path_factory.mktemp("submit_cohort")
    return synth_cohort(out, n_patients=2, images_per_patient=2, seed=5, height=240, width=320)


def submit(spec: Path, address: str, *extra: str):
    """`rbcbatch submit SPEC` with this venv's Python running rbcbatch on the cluster."""
    argv = ["submit", str(spec), "--address", address, "--python", sys.executable, *extra]
    return CliRunner().invoke(app, argv)


def job_id_of(result) -> str:
    job_id = result.stdout.split()[0]
    assert job_id.startswith("raysubmit_"), result.output
    return job_id


# What two runs of the same spec must agree on: everything but run ids, times and memory.
SLIDES = """
    SELECT slide_id, status, um_per_px, width, height, n_objects, n_rbc, config_hash, model_hash
    FROM slides ORDER BY slide_id
"""
CELLS = "SELECT * EXCLUDE (run_id) FROM cells ORDER BY slide_id, cell_id"


def outputs(run_dir: Path):
    """What a run committed: its slides' rows and its cells, as DataFrames."""
    con = connect(str(run_dir))
    try:
        return con.sql(SLIDES).df(), con.sql(CELLS).df()
    finally:
        con.close()


def test_a_screening_job_runs_on_the_cluster_to_what_run_job_writes_here(
    job_server, cohort, ray_local, tmp_path
):
    # The catalog's image paths are relative to it; they must resolve where the job runs.
    with open(cohort, newline="") as f:
        assert not any(Path(row["uri"]).is_absolute() for row in csv.DictReader(f))
    spec = {"kind": "screening", "catalog": str(cohort), "segmenter": "classical",
            "classifier": "rules"}  # fmt: skip
    there = write_spec(tmp_path, {**spec, "out": str(tmp_path / "cluster")}, "cluster.yaml")
    here = write_spec(tmp_path, {**spec, "out": str(tmp_path / "here")}, "here.yaml")

    result = submit(there, job_server)
    assert result.exit_code == 0, result.output
    job_id = job_id_of(result)
    text = said(result)
    assert f"job {job_id} SUCCEEDED" in text
    # run-job's own summary line, passed on from the job's log as it came; Ray's lines are not.
    assert "4 slide(s) processed, 0 already committed" in text
    assert "job_manager.py" not in text and "Uploading package" not in text

    local = CliRunner().invoke(app, ["run-job", str(here)])
    assert local.exit_code == 0, local.output
    slides, cells = outputs(tmp_path / "cluster")
    assert list(slides.slide_id) == sorted(r["slide_id"] for r in catalog_rows(cohort))
    assert set(slides.status) == {"ok"} and len(cells) > 100
    local_slides, local_cells = outputs(tmp_path / "here")
    pd.testing.assert_frame_equal(slides, local_slides, check_exact=True)
    pd.testing.assert_frame_equal(cells, local_cells, check_exact=True)


@pytest.mark.parametrize(
    ("case", "exit_code", "says"),
    [
        ("no catalog", 2, ["error: catalog not found"]),
        ("a corrupt slide", 1, ["failed 'P001_S2': read:", "not an image we can read",
                                "1 of 2 slide(s) failed; see failures.parquet"]),
    ],
)  # fmt: skip
def test_a_failing_job_exits_with_run_jobs_status_and_shows_its_log_tail(
    job_server, cohort, tmp_path, case, exit_code, says
):
    if case == "no catalog":
        catalog = tmp_path / "nowhere" / "catalog.csv"
    else:
        rows = catalog_rows(cohort)[:2]
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png at all")
        rows[1] = {**rows[1], "uri": str(broken)}
        catalog = write_catalog(tmp_path / "catalog.csv", rows)
    spec = write_spec(
        tmp_path, {"kind": "screening", "catalog": str(catalog), "out": str(tmp_path / "run")}
    )
    result = submit(spec, job_server)
    assert result.exit_code == exit_code, result.output
    job_id = job_id_of(result)
    text = said(result)
    assert f"job {job_id} FAILED (exit status {exit_code})" in text
    tail = text.split("line(s) of its log", 1)[1]  # the tail comes after the status line
    assert all(line in tail for line in says), tail


def test_the_nightly_job_submitted_twice_processes_only_the_new_slides(
    job_server, cohort, tmp_path
):
    rows = catalog_rows(cohort)
    earlier, new = rows[:2], rows[2:]  # the second patient's scans arrive a day later
    catalog = write_catalog(tmp_path / "catalog.csv", earlier)
    out = tmp_path / "nightly"
    spec = write_spec(
        tmp_path,
        {"kind": "nightly", "catalog": str(catalog), "out": str(out), "skip_committed": True},
    )
    first = submit(spec, job_server)
    assert first.exit_code == 0, first.output
    assert "nightly: 2 new slide(s) and 0 earlier failure(s) to process" in said(first)
    before = snapshot([p for r in earlier for p in slide_files(out, r["slide_id"])])
    first_runs = {m["slide_id"]: m["run_id"] for m in read_manifest(out)}

    write_catalog(catalog, rows)  # the catalog grows
    second = submit(spec, job_server)
    assert second.exit_code == 0, second.output
    text = said(second)
    assert (
        "nightly: 2 new slide(s) and 0 earlier failure(s) to process; 2 of 4 already committed"
        in text
    )
    assert "2 slide(s) processed, 2 already committed" in text
    assert snapshot([p for r in earlier for p in slide_files(out, r["slide_id"])]) == before

    manifest = {m["slide_id"]: m for m in read_manifest(out)}
    assert sorted(manifest) == sorted(r["slide_id"] for r in rows)
    assert {m["status"] for m in manifest.values()} == {"ok"}
    # The earlier slides keep the first night's commit; the new ones were the second's work.
    assert {r["slide_id"]: manifest[r["slide_id"]]["run_id"] for r in earlier} == first_runs
    second_runs = {manifest[r["slide_id"]]["run_id"] for r in new}
    assert len(second_runs) == 1 and second_runs.isdisjoint(first_runs.values())


def read_manifest(out: Path) -> list[dict]:
    return pq.read_table(out / "manifest.parquet").to_pylist()


def test_no_wait_only_submits_and_the_job_can_be_followed_later(job_server, tmp_path):
    spec = write_spec(
        tmp_path, {"kind": "shift", "run": str(tmp_path / "no-run"), "reference_site": "site_a"}
    )
    result = submit(spec, job_server, "--no-wait")
    assert result.exit_code == 0, result.output
    job_id = job_id_of(result)
    assert f"ray job logs {job_id} --address {job_server} --follow" in said(result)
    assert "FAILED" not in result.output and "SUCCEEDED" not in result.output

    end = follow(job_id, job_server, poll_s=0.5)  # the shift job finds no run folder: exit 2
    assert (end.status, end.driver_exit_code, end.exit_code) == ("FAILED", 2, 2)
    assert "is not an rbcbatch run folder" in " ".join(" ".join(end.log_tail).split())

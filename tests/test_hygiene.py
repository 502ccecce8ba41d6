"""Run hygiene: Ray's lines off the console, full and read-only run folders, one run per folder,
real-data tests that cannot pass by skipping under CI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rbcbatch.errors import RunFolderInUseError
from rbcbatch.store import lease as L

REPO = Path(__file__).resolve().parents[1]
RBCBATCH = [sys.executable, "-m", "rbcbatch.cli"]
# What Ray writes on a console when nothing stops it (seen on this machine): its Python loggers'
# "2026-12-01 10:00:00,000\tWARNING file.py:85 -- ...", the driver's C++ core worker
# "[2026-12-01 10:00:00,000 E 123 123] core_worker.cc:...", raylet lines and Python warnings.
RAY_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING|ERROR)\b"
    r"|^\[\d{4}-\d\d-\d\d [^]]*\] \w+\.cc:"
    r"|\(raylet\)|Token authentication|UserWarning|Started a local Ray instance",
    re.M,
)


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [*RBCBATCH, *args], capture_output=True, text=True, env=env, timeout=600, **kwargs
    )


# -- the lease, without Ray -----------------------------------------------------------------
@pytest.fixture
def local_fs(tmp_path):
    import fsspec

    return fsspec.filesystem("file"), str(tmp_path / "run")


def test_a_live_lease_refuses_a_second_run_and_names_the_first(local_fs):
    fs, root = local_fs
    first = L.acquire(fs, root, root, "run-1")
    with pytest.raises(RunFolderInUseError) as e:
        L.acquire(fs, root, root, "run-2")
    message = str(e.value)
    assert "run-1" in message and first["host"] in message and str(os.getpid()) in message
    assert "--force" in message
    # Told otherwise, the second takes over; the first's release then leaves it alone.
    L.acquire(fs, root, root, "run-2", force=True)
    L.release(fs, root, "run-1")
    assert L.read_lease(fs, root)["run_id"] == "run-2"
    L.release(fs, root, "run-2")
    assert L.read_lease(fs, root) is None


def test_a_dead_holder_does_not_lock_the_folder(local_fs):
    fs, root = local_fs
    # A run on this host whose process is gone (SIGKILL): taken over at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.makedirs(root, exist_ok=True)
    stale = {"run_id": "old", "host": L.this_host(), "pid": dead.pid, "renewed_at": time.time()}
    fs.pipe_file(f"{root}/{L.LEASE_FILE}", json.dumps(stale).encode())
    assert not L.is_live(stale)
    assert L.acquire(fs, root, root, "new")["run_id"] == "new"
    # This very process, from a run that has ended without releasing (its store went away).
    mine = {
        "run_id": "earlier",
        "host": L.this_host(),
        "pid": os.getpid(),
        "renewed_at": time.time(),
    }
    assert not L.is_live(mine)
    # Another host: live while renewed within the TTL, dead after.
    other = {"run_id": "far", "host": "elsewhere", "pid": 1, "renewed_at": time.time() - 10}
    assert L.is_live(other)
    assert not L.is_live({**other, "renewed_at": time.time() - L.LEASE_TTL_S - 1})


def test_the_lease_is_renewed_while_held(local_fs, monkeypatch):
    fs, root = local_fs
    monkeypatch.setattr(L, "RENEW_EVERY_S", 0.05)
    with L.holding(fs, root, root, "run-r") as lease:
        time.sleep(0.3)
        renewed = L.read_lease(fs, root)["renewed_at"]
    assert renewed > lease["renewed_at"]
    assert L.read_lease(fs, root) is None


# -- real runs ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_concurrent_run_into_the_same_folder_is_refused(tiny_cohort, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(
        [*RBCBATCH, "run", str(tiny_cohort), "--out", str(out), "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / L.LEASE_FILE).exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lease"
            time.sleep(0.1)
        holder = json.loads((out / L.LEASE_FILE).read_text())
        second = cli("run", str(tiny_cohort), "--out", str(out))
        assert second.returncode == 2, second.stderr
        said = " ".join(second.stderr.split())  # rich wraps lines at the console width
        assert "is in use by run" in said and holder["run_id"] in said
        assert first.wait(timeout=300) == 0, first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
    assert len(list((out / "_slides").glob("*.json"))) == 6
    assert not (out / L.LEASE_FILE).exists()  # released at the end


@pytest.mark.slow
def test_demo_prints_no_ray_lines_and_keeps_them_in_the_run_log(tmp_path):
    done = cli(
        "demo", "--out", str(tmp_path / "demo"), "--patients", "3", "--images-per-patient", "1"
    )
    assert done.returncode == 0, done.stderr
    console = done.stdout + done.stderr
    assert "demo finished" in console
    assert not RAY_LINE.search(console), RAY_LINE.search(console).group(0)
    logs = list((tmp_path / "demo" / "run" / "_logs").glob("ray-*.log"))
    assert len(logs) == 1
    # The lines did happen: they went to the log.
    assert RAY_LINE.search(logs[0].read_text())


# -- a run folder that cannot be written ------------------------------------------------------
@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount(size, read_only=False) -> a fresh tmpfs folder, unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str, read_only: bool = False) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(folder: Path) -> Path:
    """Write into `folder` until its file system is full; returns the filler file."""
    filler = folder / "filler.bin"
    block = b"\0" * (1 << 20)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.fixture(scope="module")
def twelve_slides(tmp_path_factory) -> Path:
    from rbcbatch.dev.synth import synth_cohort

    out = tmp_path_factory.mktemp("twelve")
    return synth_cohort(out, n_patients=3, images_per_patient=4, seed=5, height=360, width=480)


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_is_a_storage_error_and_loses_no_commit(
    twelve_slides, mount_tmpfs
):
    from rbcbatch.analytics import connect

    disk = mount_tmpfs("64m")
    out = disk / "run"
    filled: list[Path] = []

    def fill_after_first_commit() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if list((out / "_slides").glob("*.json")) if (out / "_slides").exists() else []:
                filled.append(_fill(disk))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=fill_after_first_commit, daemon=True)
    watcher.start()
    done = cli("run", str(twelve_slides), "--out", str(out), "--workers", "1")
    watcher.join(timeout=10)
    assert filled, "the run finished before the disk could be filled"
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    message = " ".join(done.stderr.lower().split())
    assert "no space left" in message and "storage error" in message
    assert "Traceback" not in done.stderr
    committed = {p.stem for p in (out / "_slides").glob("*.json")}
    assert 1 <= len(committed) < 12
    # Every committed slide is whole: its cells query and its mask opens.
    filled[0].unlink()
    con = connect(str(out))
    per_slide = dict(con.execute("SELECT slide_id, count(*) FROM cells GROUP BY 1").fetchall())
    assert set(per_slide) == committed and min(per_slide.values()) > 0
    # With space again, the same command finishes the rest.
    again = cli("run", str(twelve_slides), "--out", str(out), "--workers", "1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(committed)} already committed" in " ".join(again.stderr.split())
    assert len(list((out / "_slides").glob("*.json"))) == 12


@pytest.mark.slow
def test_a_read_only_run_folder_is_a_storage_error(tiny_cohort, mount_tmpfs):
    disk = mount_tmpfs("1m", read_only=True)
    done = cli("run", str(tiny_cohort), "--out", str(disk / "run"))
    assert done.returncode == 2, done.stderr
    assert "read-only" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr


# -- real data under CI -----------------------------------------------------------------------
def test_real_data_tests_fail_instead_of_skipping_under_ci(tmp_path):
    env = {**os.environ, "CI": "1", "RBCBATCH_SHARED_DATA": str(tmp_path / "nowhere")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_datasets.py::test_bccd_all_boxes_without_zero_area",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout
    assert "CI is set, so the real-data tests must run" in done.stdout
    assert "1 failed" in done.stdout or "1 error" in done.stdout

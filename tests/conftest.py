"""Shared fixtures: the real data folder, one small local Ray for the session, tiny cohorts."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RBCBATCH_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a real data set beside the repository, or skip the test saying why.

    Under CI (the CI variable set) a missing data set fails the test instead: CI has
    ../shared/data, so its absence is a broken checkout, not a reason to pass.
    """
    path = SHARED_DATA / name
    if not path.is_dir():
        why = f"real data set {name!r} not found at {path} (set RBCBATCH_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; CI is set, so the real-data tests must run", pytrace=False)
        pytest.skip(why)
    return path


def catalog_rows(catalog: Path) -> list[dict]:
    """The catalog's rows with absolute image paths, so a catalog can live anywhere."""
    with open(catalog, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["uri"] = str(catalog.parent / row["uri"])
    return rows


def write_catalog(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def wait_until_serving(url: str, proc, seconds: float, what: str, log=None) -> None:
    """Poll `url` until it answers; fail the test if `proc` exits or `seconds` pass first."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                detail = log() if log else f"exit {proc.poll()}"
                pytest.fail(f"{what} did not come up at {url}:\n{detail}")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 2 CPUs, a small object store, loopback only."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """Three patients (normal, hs, ida) × 2 small fields; returns the catalog path."""
    from rbcbatch.dev.synth import synth_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    return synth_cohort(out, n_patients=3, images_per_patient=2, seed=11, height=360, width=480)


@pytest.fixture(scope="session")
def tiny_resnet_run(tiny_cohort, ray_local, tmp_path_factory) -> Path:
    """The tiny cohort run with the learned classifier (probabilities, embeddings); read only."""
    from rbcbatch.engine.config import RunConfig
    from rbcbatch.engine.run import run

    out = tmp_path_factory.mktemp("tiny_resnet_run") / "run"
    summary = run(str(tiny_cohort), str(out), RunConfig(classifier="resnet"), workers=2)
    assert summary.n_failed == 0, summary.failed
    return out


# Starts moto's S3 server and exits with it when its stdin closes, so a killed test run never
# leaves a server behind.
_MOTO_SCRIPT = """
import os, sys, threading
threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
from moto.server import main
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's server in its own process); yields its URL."""
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_SCRIPT, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(f"{url}/moto-api/data.json", proc, 60, "moto's S3 server")
        yield url
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

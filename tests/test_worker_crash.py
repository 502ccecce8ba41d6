"""A slide that kills its worker every time is given up after MAX_SLIDE_ATTEMPTS; the rest finish.

The worker is really killed (SIGKILL) each time it starts the slide, as a decoder crash or the
kernel's out-of-memory killer would; Ray restarts the actor and retries its batch.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from rbcbatch.dev.synth import synth_cohort
from rbcbatch.engine.run import run
from rbcbatch.engine.stages import MAX_SLIDE_ATTEMPTS

pytestmark = pytest.mark.slow

POISON = "P002_S1"
VOLATILE = ["run_id"]


def kill_worker_at_each_attempt(out: Path, slide_id: str, stop: threading.Event, kills: list):
    """Watch the run folder; SIGKILL the worker whenever it starts another attempt at the slide."""
    seen = 0
    while not stop.is_set():
        for marker in out.glob(f"_attempts/*/{slide_id}.json"):
            try:
                record = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue  # being written
            if record["attempts"] > seen:
                seen = record["attempts"]
                os.kill(record["pid"], signal.SIGKILL)
                kills.append(record["pid"])
        time.sleep(0.01)


def cells(run_dir: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(run_dir.glob("cells/**/*.parquet"))]
    table = pd.concat(frames).drop(columns=VOLATILE)
    return table.sort_values(["slide_id", "cell_id"]).reset_index(drop=True)


def test_slide_that_kills_its_worker_fails_alone(tmp_path, ray_local):
    catalog = synth_cohort(tmp_path / "cohort", 3, 2, seed=3, height=480, width=640)
    clean = tmp_path / "clean"
    run(str(catalog), str(clean), workers=1)

    out = tmp_path / "crashing"
    stop, kills = threading.Event(), []
    watcher = threading.Thread(
        target=kill_worker_at_each_attempt, args=(out, POISON, stop, kills), daemon=True
    )
    watcher.start()
    try:
        summary = run(str(catalog), str(out), workers=1)
    finally:
        stop.set()
        watcher.join()

    assert len(kills) == MAX_SLIDE_ATTEMPTS  # each allowed attempt really died
    assert [f["slide_id"] for f in summary.failed] == [POISON]
    assert f"died {MAX_SLIDE_ATTEMPTS} times" in summary.failed[0]["message"]
    failures = pd.read_parquet(out / "failures.parquet")
    assert failures["slide_id"].tolist() == [POISON]
    assert failures["error_type"].tolist() == ["WorkerDied"]
    committed = {p.stem for p in (out / "_slides").glob("*.json")}
    everything = {p.stem for p in (clean / "_slides").glob("*.json")}
    assert committed == everything - {POISON}
    expected = cells(clean)
    expected = expected[expected["slide_id"] != POISON].reset_index(drop=True)
    pd.testing.assert_frame_equal(cells(out), expected)
    assert not list(out.glob("_attempts/**/*.json"))  # the run's bookkeeping is cleared at its end

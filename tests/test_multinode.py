"""A real multi-node Ray cluster on loopback: a run that loses a worker node mid-way gives the same
outputs as a clean run, and a run the cluster cannot serve stops with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from rbcbatch.analytics import connect
from rbcbatch.engine.run import run
from tests.test_pipeline import assert_same_rows, read_cells

pytestmark = pytest.mark.slow
MB = 1024 * 1024
N_SLIDES = 10


def describes_the_run(field: str) -> bool:
    """Commit-record fields about the attempt, not the slide: run id, times, seconds, memory."""
    return field == "run_id" or field.endswith(("_at", "_s", "_mb"))


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs (nothing can run there) on 127.0.0.1; tests add worker nodes.

    The session's local Ray, if a test before this module started one, is shut down first; later
    tests start Ray again through `run`. The cluster keeps its files (and the address file that
    a plain `ray.init()` on this machine would follow) in a private temporary folder.
    """
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    ray_tmp = tempfile.mkdtemp(prefix="rbmn", dir="/tmp")  # short: Ray's socket paths live here
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TMPDIR", ray_tmp)
        env.delenv("RAY_ADDRESS", raising=False)
        nodes = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": 80 * MB,
                "include_dashboard": False,
            },
        )
        try:
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    from rbcbatch.dev.synth import synth_cohort

    out = tmp_path_factory.mktemp("multinode_cohort")
    return synth_cohort(out, n_patients=5, images_per_patient=2, seed=23, height=360, width=480)


def add_worker(cluster) -> None:
    cluster.add_node(num_cpus=1, object_store_memory=80 * MB)


def pool_actors(job_id: str | None = None) -> dict[str, dict]:
    """The slide actors the cluster's GCS knows (alive, restarting or dead), by actor id.

    Read from the GCS actor table because the public state API needs the dashboard.
    """
    from ray._private import state

    return {
        actor_id: info
        for actor_id, info in state.actors().items()
        if "ModelStage" in info["ActorClassName"] and (job_id is None or info["JobID"] == job_id)
    }


class RemoveNodeAfterFirstSlide:
    """on_slide callback: when the first slide is back, kill a worker node that holds a slide
    actor (abruptly, as a crashed machine). Runs in the driver's main thread, as Cluster needs."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.slides: list[str] = []
        self.lost_node: str | None = None
        self.lost_actor: str | None = None

    def __call__(self, row: dict) -> None:
        import ray

        self.slides.append(row["slide_id"])
        if self.lost_node:
            return
        job = ray.get_runtime_context().get_job_id()
        alive = {
            info["Address"]["NodeID"]: actor_id
            for actor_id, info in pool_actors(job).items()
            if info["State"] == "ALIVE"
        }
        victim = next(node for node in self.cluster.worker_nodes if node.node_id in alive)
        self.lost_node, self.lost_actor = victim.node_id, alive[victim.node_id]
        self.cluster.remove_node(victim, allow_graceful=False)


def nodes_once_dead(node_id: str, deadline_s: float = 90.0) -> dict[str, dict]:
    """ray.nodes() by id, once the GCS has noticed the node is gone: its health checks take a
    while to give up on a killed raylet, and the run may finish on the other node before."""
    import ray

    give_up = time.monotonic() + deadline_s
    while True:
        nodes = {n["NodeID"]: n for n in ray.nodes()}
        if not nodes[node_id]["Alive"] or time.monotonic() > give_up:
            return nodes
        time.sleep(1.0)


def rbcbatch_run(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`rbcbatch run ...` in its own process, messages unwrapped."""
    return subprocess.run(
        [sys.executable, "-m", "rbcbatch.cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "1000"},
    )


def without_ray_address() -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_run_on_a_cluster_without_cpus_stops_with_a_clear_error(cluster, cohort, tmp_path):
    """No node can host a slide actor: after the stall timeout `rbcbatch run` (joining the cluster
    through RAY_ADDRESS) ends with an error that says how far it got and what to do."""
    assert not cluster.worker_nodes, "this test needs the head node alone (it runs first)"
    out = tmp_path / "run"
    env = {**without_ray_address(), "RAY_ADDRESS": cluster.address}
    proc = rbcbatch_run(str(cohort), "--out", str(out), "--stall-timeout", "5", env=env)
    message = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"for 5 s: 0 of {N_SLIDES} slides finished" in message, message
    assert "P001_S1" in message and "run again to resume" in message
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 0 and not (out / "_slides").exists()


@pytest.fixture(scope="module")
def workers(cluster):
    """Two worker nodes of 1 CPU each join the head."""
    add_worker(cluster)
    add_worker(cluster)
    cluster.wait_for_nodes()
    return cluster


@pytest.fixture(scope="module")
def clean_run(workers, cohort, tmp_path_factory) -> Path:
    """`rbcbatch run --address` from another process: the reference the lossy run must equal."""
    out = tmp_path_factory.mktemp("multinode_clean") / "run"
    args = (str(cohort), "--out", str(out), "--address", workers.address)
    proc = rbcbatch_run(*args, env=without_ray_address())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_losing_a_worker_node_mid_run_gives_the_clean_run(workers, clean_run, cohort, tmp_path):
    """Kill a node that holds a slide actor after the first slide: the run finishes on what is
    left, and its rows, manifest and masks equal the clean run's (none lost, none twice)."""

    out = tmp_path / "run"
    remover = RemoveNodeAfterFirstSlide(workers)
    summary = run(str(cohort), str(out), address=workers.address, on_slide=remover)

    # the lost node really held work: Ray reports it dead, and its actor was restarted elsewhere
    assert remover.lost_node is not None
    nodes = nodes_once_dead(remover.lost_node)
    assert nodes[remover.lost_node]["Alive"] is False
    lost_actor = pool_actors()[remover.lost_actor]
    assert lost_actor["NumRestarts"] >= 1
    assert lost_actor["Address"]["NodeID"] != remover.lost_node
    assert {n["NodeManagerAddress"] for n in nodes.values()} == {"127.0.0.1"}

    assert (summary.processed, summary.n_failed) == (N_SLIDES, 0)
    assert sorted(remover.slides) == sorted(set(remover.slides)) and len(remover.slides) == N_SLIDES

    committed = sorted(p.stem for p in (out / "_slides").glob("*.json"))
    assert committed == sorted(p.stem for p in (clean_run / "_slides").glob("*.json"))
    assert len(committed) == N_SLIDES
    assert_same_manifests(out, clean_run)

    cells, clean_cells = read_cells(out), read_cells(clean_run)
    assert cells.num_rows == clean_cells.num_rows > 50 * N_SLIDES
    keys = list(zip(cells["slide_id"].to_pylist(), cells["cell_id"].to_pylist(), strict=True))
    assert len(set(keys)) == len(keys)
    assert_same_rows(cells, clean_cells)
    records = [json.loads(p.read_text()) for p in (out / "_slides").glob("*.json")]
    assert sorted(
        str(p.relative_to(out / "cells")) for p in (out / "cells").rglob("*.parquet")
    ) == [
        f"{c}/{p}.parquet" for c, p in sorted({(r["cohort"], r["patient_id"]) for r in records})
    ]  # one file per patient after the run
    view = "SELECT count(*), count(DISTINCT (slide_id, cell_id)) FROM cells"
    assert connect(str(out)).execute(view).fetchone() == (clean_cells.num_rows,) * 2

    masks = zarr.open_group(str(out / "masks.zarr"), mode="r")
    clean_masks = zarr.open_group(str(clean_run / "masks.zarr"), mode="r")
    assert sorted(masks.group_keys()) == sorted(clean_masks.group_keys()) == committed
    for slide in committed:
        labels, clean_labels = masks[f"{slide}/labels/cells"], clean_masks[f"{slide}/labels/cells"]
        levels = sorted(clean_labels.array_keys())
        assert sorted(labels.array_keys()) == levels
        for level in levels:
            assert np.array_equal(labels[level][...], clean_labels[level][...])


def test_cli_address_runs_on_the_cluster(clean_run, workers):
    """The clean run's slide actors were the cluster's: its GCS lists them on worker nodes."""
    import ray

    if not ray.is_initialized():
        ray.init(address=workers.address, log_to_driver=False)
    ours = ray.get_runtime_context().get_job_id()
    worker_ids = {n["NodeID"] for n in ray.nodes()} - {workers.head_node.node_id}
    theirs = [
        actor
        for actor in pool_actors().values()
        if actor["JobID"] != ours and actor["Address"]["NodeID"] in worker_ids
    ]
    assert theirs, "no slide actor of the command's run is in the cluster's actor table"
    manifest = pq.read_table(clean_run / "manifest.parquet").to_pylist()
    assert [m["status"] for m in manifest] == ["ok"] * N_SLIDES


def assert_same_manifests(out: Path, clean: Path) -> None:
    """Per-slide commit records agree on everything but run identity and timing."""
    for record in sorted((clean / "_slides").glob("*.json")):
        expected = json.loads(record.read_text())
        got = json.loads((out / "_slides" / record.name).read_text())
        assert got.keys() == expected.keys()
        for key in [k for k in expected if not describes_the_run(k)]:
            assert got[key] == expected[key], (record.stem, key)

"""The run: catalog → Ray Data (read tasks → model actors → write tasks) → commits.

Ray Data streams the uncommitted catalog rows through three stages (engine.stages) whose
resources come from the cluster's shape (`stage_shape`): CPU tasks read and tile slides, a pool
of model actors (a GPU each where there are GPUs) segments, measures and classifies batches of
slides, CPU tasks write and commit each slide. A slide that fails is a failures row, a lost
node's work is retried elsewhere, and a run that stops moving ends with RunStalledError instead
of hanging. Resumable and idempotent: committed slides are skipped.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from rbcbatch.engine.calibration import calibrate_groups, slide_diameters
from rbcbatch.engine.config import Models, RunConfig, stable_hash
from rbcbatch.engine.stages import ModelStage, StageContext, failure_row, read_slides, write_slides
from rbcbatch.errors import Failure, RbcbatchError, RunStalledError
from rbcbatch.io.catalog import SlideSpec, load_catalog
from rbcbatch.io.deidentify import check_run_folder, key_id, row_deidentifier
from rbcbatch.io.storage import explains_storage_errors, resolve_options
from rbcbatch.store.lease import holding
from rbcbatch.store.run_store import RunStore


@dataclass
class RunSummary:
    run_id: str
    total: int
    skipped: int
    processed: int
    failed: list[dict]
    objects: int
    seconds: float

    @property
    def n_failed(self) -> int:
        return len(self.failed)


# CPUs a read or write task asks for on a machine without GPUs, where the model actors take
# the rest: those stages are ~10 % of a slide's CPU time there (bench/RESULTS.md), and a
# fraction lets them overlap the model stage without leaving a core idle.
CPU_TASK_SHARE = 0.25
# Memory a read task asks for per pixel of the largest image it may decode whole: the RGB
# image, its resampled copy and their transients (~4 copies of 3 bytes).
READ_BYTES_PER_PIXEL = 12


@dataclass(frozen=True)
class StageShape:
    """How many of each stage run, and what each asks the cluster for."""

    model_actors: int
    model: dict  # Ray resources of one model actor
    task: dict  # Ray resources of one read or write task
    torch_threads: int  # threads of the model actor's torch on a CPU

    def read(self, max_pixels: int, cluster: dict) -> dict:
        """A read task's resources: its CPUs, and memory for the largest image it may decode
        whole, within the cluster's memory per CPU."""
        per_cpu = float(cluster.get("memory", 0)) / max(1.0, float(cluster.get("CPU", 1)))
        need = READ_BYTES_PER_PIXEL * max_pixels
        return {**self.task, **({"memory": int(min(need, per_cpu))} if per_cpu > 0 else {})}


def stage_shape(config: RunConfig, cluster: dict, workers: int | None, pending: int) -> StageShape:
    """The stages' resources from the cluster's shape. With GPUs and a learned model: one
    model actor per GPU (and a CPU to feed it), read and write tasks a CPU each on the other
    cores. Without: one model actor per CPU (or `workers`), read and write tasks a quarter of
    a CPU each beside them."""
    learned = config.segmenter != "classical" or config.classifier != "rules"
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    slides = max(1, pending)  # never more actors than slides
    if learned and gpus:
        size = max(1, min(workers or gpus, gpus, slides))
        return StageShape(size, {"num_gpus": 1, "num_cpus": 1}, {"num_cpus": 1}, 1)
    size = max(1, min(workers or cpus, slides))
    per_actor = min(1.0, max(CPU_TASK_SHARE, (cpus - 2 * CPU_TASK_SHARE) / size))
    threads = max(1, round(cpus / size))  # every core works for the networks
    return StageShape(size, {"num_cpus": per_actor}, {"num_cpus": CPU_TASK_SHARE}, threads)


# Seconds without any slide batch entering or leaving the worker pool after which a run is
# declared stuck. Ray Data's own default (30 min), so a legitimately slow batch of large slides
# is not cut short; a lost node that nothing replaces ends the run instead of hanging it.
STALL_TIMEOUT_S = 1800.0


def ray_stall_timeout(stall_timeout_s: float | None) -> float:
    """Ray Data's no-progress timeout for a stall timeout in seconds (None or ≤ 0: never)."""
    return float(stall_timeout_s) if stall_timeout_s and stall_timeout_s > 0 else -1.0


def stalled_message(timeout_s: float, pending: list[str], finished: set[str]) -> str:
    """What a stuck run tells the person who started it: how far it got and what to do."""
    left = [slide_id for slide_id in pending if slide_id not in finished]
    shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    return (
        f"no slide moved through the worker pool for {timeout_s:g} s: "
        f"{len(pending) - len(left)} of {len(pending)} slides finished, not finished: {shown}. "
        "The cluster may have lost a node that nothing replaced (or lacks the CPUs/GPUs the "
        "actors need), or a read never returned. Committed slides are kept; run again to resume, "
        "or raise the stall timeout if one batch of slides really takes this long."
    )


def earlier_estimates(records: list[dict]) -> dict[tuple, tuple[float, int]]:
    """(site, scanner, (height, width)) -> (µm/px, cells) of the slides an earlier run
    committed with an estimated pixel size."""
    return {
        (r.get("site") or "", r.get("scanner") or "", (int(r["height"]), int(r["width"]))): (
            r["um_per_px"],
            int(r.get("calibration_cells") or 0),
        )
        for r in records
        if r.get("um_per_px_source") == "estimated" and r.get("height") and r.get("width")
    }


def calibrate_pending(
    pending: list[SlideSpec],
    store: RunStore,
    storage_options: dict | None,
    config: RunConfig,
    stall_timeout_s: float | None,
) -> tuple[list[SlideSpec], list[Failure]]:
    """Fill in the pixel size of slides the catalog gives none, per site and scanner
    (engine.calibration), from their slides' isolated cells, read by Ray tasks. A slide whose
    group and image size an earlier run committed with an estimate keeps that estimate, so a
    resumed run measures a group at one scale. Returns the specs to process and the failures of
    slides whose group cannot be calibrated."""
    import ray

    todo = [s for s in pending if s.um_per_px is None]
    if not todo:
        return pending, []
    task = ray.remote(num_cpus=1)(slide_diameters)
    refs = [
        task.remote(s, storage_options, config.max_pixels, config.region_min_pixels) for s in todo
    ]
    try:
        timeout = stall_timeout_s if stall_timeout_s and stall_timeout_s > 0 else None
        found = ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError as e:
        raise RunStalledError(
            f"the pixel-size pass (isolated cells of {len(todo)} slides without um_per_px) did "
            f"not finish in {stall_timeout_s:g} s: the cluster may lack CPUs for it. Give "
            "um_per_px in the catalog, or raise the stall timeout."
        ) from e
    cells = {s.slide_id: d for s, d in zip(todo, found, strict=True)}
    earlier = earlier_estimates(store.read_records("_slides"))
    ready, failures, _ = calibrate_groups(pending, cells, earlier)
    return ready, failures


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a cluster (address or RAY_ADDRESS) or start a local one bound to loopback."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # "local": a new Ray even when `ray start` left a cluster's address file on this host
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@explains_storage_errors("catalog_uri", "out")
def run(
    catalog_uri: str,
    out: str,
    config: RunConfig | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    storage_options: dict | None = None,
    new_config: bool = False,
    slides_per_batch: int = 2,
    stall_timeout_s: float | None = STALL_TIMEOUT_S,
    on_start: Callable[[int, int], None] | None = None,
    on_slide: Callable[[dict], None] | None = None,
    deidentify_key: bytes | None = None,
    force: bool = False,
) -> RunSummary:
    """Process every uncommitted slide of a catalog into `out`; resumable and idempotent.

    Survives the loss of worker nodes while others (or replacements) can take over the actors;
    raises RunStalledError when no slide batch moves for `stall_timeout_s` (None: wait forever).
    With `deidentify_key`, patient and slide ids are keyed hashes from the catalog on and no
    output holds an image URI (rbcbatch.io.deidentify). Refuses a folder whose lease another
    live run holds (RunFolderInUseError) unless `force`.
    """
    config = config or RunConfig()
    if deidentify_key is not None:
        config = replace(config, deidentify_key_id=key_id(deidentify_key))
    started = time.perf_counter()
    storage_options = resolve_options(storage_options, catalog_uri, out)
    catalog = load_catalog(catalog_uri, storage_options, row_deidentifier(deidentify_key))
    storage_options = resolve_options(storage_options, *(s.uri for s in catalog.slides))
    models = Models(config)
    description = models.describe()
    store = RunStore(out, storage_options, deidentified=bool(config.deidentify_key_id))
    check_run_folder(store, config.deidentify_key_id)
    run_id = new_run_id()
    # One run at a time per folder (store.lease): taken before open() may forget commits.
    with holding(store.fs, store.root, store.url, run_id, force=force):
        store.open(description, stable_hash(description), allow_new_config=new_config)
        failed: list[dict] = []
        for failure in catalog.rejected:
            store.record_failure(failure, run_id, f"catalog-row-{len(failed) + 1}")
            failed.append(failure_row(failure))
        done = store.committed()
        pending = [s for s in catalog.slides if s.slide_id not in done]
        skipped = len(catalog.slides) - len(pending)
        if any(s.um_per_px is None for s in pending):
            connect_ray(address)
            pending, uncalibrated = calibrate_pending(
                pending, store, storage_options, config, stall_timeout_s
            )
            for failure in uncalibrated:
                store.record_failure(failure, run_id, f"slide-{failure.slide_id}")
                failed.append(failure_row(failure))
        if on_start:
            on_start(len(pending), skipped)
        objects = 0
        if pending:
            connect_ray(address)
            import ray
            from ray.data.exceptions import ExecutionTimeoutError

            cluster = ray.cluster_resources()
            shape = stage_shape(config, cluster, workers, len(pending))
            ctx = StageContext.of(out, storage_options, config, run_id, models)
            items = [s.to_dict() for s in pending]
            # One block per slide: a read task that dies takes only its own slide with it.
            ds = (
                ray.data.from_items(items, override_num_blocks=len(items))
                .map_batches(
                    read_slides,
                    fn_kwargs={"ctx": ctx, "geometry": models.geometry.to_dict()},
                    batch_size=1,
                    **shape.read(config.max_pixels, cluster),
                )
                .map_batches(
                    ModelStage,
                    fn_constructor_kwargs={"ctx": ctx, "torch_threads": shape.torch_threads},
                    batch_size=slides_per_batch,
                    # Two batches in flight per actor: the next one's input is fetched while
                    # the actor works, and no actor queues up work another could take.
                    compute=ray.data.ActorPoolStrategy(
                        size=shape.model_actors, max_tasks_in_flight_per_actor=2
                    ),
                    # Only CPU/GPU counts, never a node-specific resource: an actor lost with
                    # its node is restarted wherever a CPU/GPU is free, and the batches it held
                    # are retried there (Ray Data's defaults, max_restarts=-1 and
                    # max_task_retries=-1). A redone slide overwrites what its lost attempt
                    # left: its outputs go to fixed paths and its commit record is written last.
                    **shape.model,
                )
                .map_batches(write_slides, fn_kwargs={"ctx": ctx}, batch_size=1, **shape.task)
            )
            ds.context.execution_no_progress_timeout_s = ray_stall_timeout(stall_timeout_s)
            # An error that escapes a slide's own failure handling (the store itself is unreachable)
            # reaches the driver as itself, not as Ray's UserCodeException, so run() can say what
            # happened (StorageError) instead of printing a worker's traceback.
            ds.context.raise_original_map_exception = True
            finished: set[str] = set()
            try:
                for row in ds.iter_rows():
                    row = dict(row)
                    finished.add(row["slide_id"])
                    objects += int(row["n_objects"])
                    if row["status"] != "ok":
                        failed.append(row)
                    if on_slide:
                        on_slide(row)
            except ExecutionTimeoutError as e:
                store.finalize()  # the manifest shows what was committed before the stall
                pending_ids = [s.slide_id for s in pending]
                raise RunStalledError(
                    stalled_message(stall_timeout_s, pending_ids, finished)
                ) from e
            store.clear_attempts(run_id)
        store.finalize()
        if not pending and not catalog.slides and not catalog.rejected:
            raise RbcbatchError(f"catalog {catalog_uri} has no rows")
        return RunSummary(
            run_id,
            len(catalog.slides) + len(catalog.rejected),
            skipped,
            len(pending),
            failed,
            objects,
            time.perf_counter() - started,
        )

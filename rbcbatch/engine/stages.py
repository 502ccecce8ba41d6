"""The run's three Ray Data stages: read (CPU tasks) → model (GPU or CPU actors) → write (CPU tasks).

- `read_slides`: one task per slide decodes it, settles its pixel size, resamples it to the
  segmenter's working resolution, estimates its statistics and cuts its tiles. Many such tasks
  run at once on CPU cores, streaming, so the model stage always has slides waiting.
- `ModelStage`: an actor that builds the models once, takes batches of several slides, runs the
  tiles of all of them through the segmentation network in shared batches, then per slide
  stitches, measures every cell as tensor operations and classifies the crops of all the
  batch's slides in shared network batches, on the GPU when it has one.
- `write_slides`: one task per slide writes its mask and cells and commits it, after its last
  tile.

Rows between stages are one slide each: its id and its state so far, pickled (`payload`). A slide
that fails at any stage becomes a failures row there and passes on as a row that says so; the
others go on. A stage whose worker dies is retried by Ray; each slide's attempts are counted
per stage (store.begin_attempt), so a slide that kills its worker every time is given up after
MAX_SLIDE_ATTEMPTS while the others finish.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass, field

import numpy as np

from rbcbatch import __version__
from rbcbatch.engine.config import Models, RunConfig, stable_hash
from rbcbatch.engine.regions import open_if_large, process_large_slide
from rbcbatch.engine.slide import (
    SlideWork,
    cells_table,
    commit_record,
    pixel_size,
    prepare_slide,
    segment_tiles,
    stitch_slide,
)
from rbcbatch.errors import Failure
from rbcbatch.imaging.tiling import TileGeometry
from rbcbatch.io.catalog import SlideSpec
from rbcbatch.io.sources import read_slide
from rbcbatch.io.storage import destination_unwritable
from rbcbatch.segment.calibrate import cell_diameters_px
from rbcbatch.store.run_store import RunStore

# A slide whose worker died this many times in one stage (a crash, running out of memory, a
# lost node) is recorded as failed instead of tried again: Ray retries tasks and restarts actors,
# so one slide that kills its worker every time would otherwise hold the run until the stall
# timeout.
MAX_SLIDE_ATTEMPTS = 3

# What a row between stages holds (`status`): a slide read and tiled, one whose large image the
# model stage processes region by region, one segmented and measured, one committed, one failed.
READ, LARGE, MEASURED, COMMITTED, FAILED = "read", "large", "measured", "committed", "failed"


@dataclass
class SlideState:
    """One slide as it moves between stages (pickled into a row's `payload`)."""

    spec: SlideSpec
    timing: dict = field(default_factory=dict)
    calibration: tuple = ("catalog", 0)
    image: np.ndarray | None = None  # uint8 H×W×3 at the slide's pixel size
    work: SlideWork | None = None  # read → model
    labels: np.ndarray | None = None  # model → write: uint32 H×W
    kinds: dict | None = None  # within the model stage: {cell id: object kind}
    columns: dict | None = None  # within the model stage: the measurements
    table: object = None  # model → write: the cells table (pyarrow)
    record: dict | None = None  # committed: its commit record
    failure: Failure | None = None


@dataclass(frozen=True)
class StageContext:
    """What every stage needs to know about the run (plain values: it travels to workers)."""

    run_url: str
    storage_options: dict | None
    config: dict
    run_id: str
    provenance: dict

    @classmethod
    def of(cls, run_url: str, storage_options, config: RunConfig, run_id: str, models: Models):
        provenance = {
            "run_id": run_id,
            "config_hash": stable_hash(models.describe()),
            "code_version": __version__,
        }
        return cls(run_url, storage_options, config.to_dict(), run_id, provenance)

    @property
    def run_config(self) -> RunConfig:
        return RunConfig(**self.config)

    def store(self) -> RunStore:
        deidentified = bool(self.run_config.deidentify_key_id)
        return RunStore(self.run_url, self.storage_options, deidentified)


def to_row(state: SlideState, status: str) -> dict:
    return {
        "slide_id": state.spec.slide_id,
        "status": status,
        "payload": pickle.dumps(state, protocol=5),
    }


def rows_of(batch: dict) -> list[tuple[str, SlideState]]:
    """(status, state) of every row of a batch."""
    return [
        (str(status), pickle.loads(payload))
        for status, payload in zip(batch["status"], batch["payload"], strict=True)
    ]


def batch_of(rows: list[dict]) -> dict[str, list]:
    keys = ("slide_id", "status", "payload")
    return {k: [r[k] for r in rows] for k in keys}


def fail(store: RunStore, ctx: StageContext, state: SlideState, exc: BaseException) -> dict:
    """Record a slide's failure (unless the run folder itself is unwritable: that stops the run)
    and the row that carries it on."""
    if destination_unwritable(exc):
        raise exc  # the run folder is full or read-only: stop the run (a StorageError)
    state.failure = Failure.from_exception(state.spec.slide_id, state.spec.uri, "process", exc)
    return give_up(store, ctx, state, state.failure)


def give_up(store: RunStore, ctx: StageContext, state: SlideState, failure: Failure) -> dict:
    state.failure = failure
    state.image = state.work = state.labels = state.table = None
    store.record_failure(failure, ctx.run_id, f"slide-{state.spec.slide_id}")
    return to_row(state, FAILED)


def worker_died(spec: SlideSpec, attempts: int, stage: str) -> Failure:
    return Failure(
        spec.slide_id,
        spec.uri,
        stage,
        "WorkerDied",
        f"the worker processing this slide died {attempts} times (a crash, running out of "
        "memory or a lost node); it is not tried again in this run",
    )


def claim_attempt(store: RunStore, ctx: StageContext, spec: SlideSpec, stage: str) -> int:
    """Count one more attempt of this stage at the slide; returns its number (1 the first)."""
    attempt = store.attempts(ctx.run_id, spec.slide_id, stage) + 1
    if attempt <= MAX_SLIDE_ATTEMPTS:
        store.begin_attempt(ctx.run_id, spec.slide_id, attempt, os.getpid(), stage)
    return attempt


# ---------------------------------------------------------------------------------------------
# Read: CPU tasks, one slide each
# ---------------------------------------------------------------------------------------------


def read_slides(batch: dict[str, np.ndarray], ctx: StageContext, geometry: dict) -> dict[str, list]:
    """Ray Data task: decode, calibrate, resample and tile each catalog row of the batch."""
    store, tiles = ctx.store(), TileGeometry(**geometry)
    out = []
    for i in range(len(batch["slide_id"])):
        spec = SlideSpec(**{k: _scalar(v[i]) for k, v in batch.items()})
        state = SlideState(spec)
        attempt = claim_attempt(store, ctx, spec, "read")
        if attempt > MAX_SLIDE_ATTEMPTS:
            out.append(give_up(store, ctx, state, worker_died(spec, attempt - 1, "read")))
            continue
        try:
            out.append(read_one(state, ctx, tiles))
        except Exception as exc:  # one bad slide is a failures row, never a lost run
            out.append(fail(store, ctx, state, exc))
    return batch_of(out)


def read_one(state: SlideState, ctx: StageContext, geometry: TileGeometry) -> dict:
    """The row of one slide read and tiled, or of one left whole for the model stage's
    region-by-region path (tiled TIFFs over region_min_pixels)."""
    config = ctx.run_config
    spec = state.spec
    slide = open_if_large(spec, ctx.storage_options, config.region_min_pixels)
    if slide is not None:
        slide.close()
        return to_row(state, LARGE)
    t0 = time.perf_counter()
    image = read_slide(spec.slide_id, spec.uri, ctx.storage_options, config.max_pixels)
    spec, *calibration = pixel_size(spec, None, lambda: cell_diameters_px(image))
    state.spec, state.calibration, state.image = spec, tuple(calibration), image
    state.work = prepare_slide(image, spec.um_per_px, geometry)
    state.timing["read_s"] = time.perf_counter() - t0
    return to_row(state, READ)


# ---------------------------------------------------------------------------------------------
# Model: actors (a GPU each where there are GPUs), batches of slides
# ---------------------------------------------------------------------------------------------


class ModelStage:
    """Ray Data actor: builds the models once; segments, measures and classifies batches of
    slides, their tiles and crops in shared network batches."""

    def __init__(self, ctx: StageContext, torch_threads: int | None = None):
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        self.ctx = ctx
        self.config = ctx.run_config
        self.models = Models(self.config)
        self.store = ctx.store()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = rows_of(batch)
        todo = [state.spec.slide_id for status, state in rows if status in (READ, LARGE)]
        run_id = self.ctx.run_id
        if any(self.store.attempts(run_id, slide_id, "model") for slide_id in todo):
            return batch_of(self.one_by_one(rows))
        for slide_id in todo:  # none was started before: each starts its first attempt
            self.store.begin_attempt(run_id, slide_id, 1, os.getpid(), "model")
        return batch_of(self.process(rows))

    def one_by_one(self, rows: list[tuple[str, SlideState]]) -> list[dict]:
        """A batch Ray retried after its worker died: each slide alone, the one that was
        started last (the likely culprit) first, its attempt counted before it starts, so that
        a slide that kills its worker every time is given up while its batch-mates finish."""
        out = [to_row(s, status) for status, s in rows if status not in (READ, LARGE)]
        todo = [(status, s) for status, s in rows if status in (READ, LARGE)]
        last = {
            s.spec.slide_id: self.store.attempt_started(self.ctx.run_id, s.spec.slide_id, "model")
            for _, s in todo
        }
        todo.sort(key=lambda row: -last[row[1].spec.slide_id])
        for status, state in todo:
            attempt = claim_attempt(self.store, self.ctx, state.spec, "model")
            if attempt > MAX_SLIDE_ATTEMPTS:
                failure = worker_died(state.spec, attempt - 1, "model")
                out.append(give_up(self.store, self.ctx, state, failure))
                continue
            out.extend(self.process([(status, state)]))
        return out

    def process(self, rows: list[tuple[str, SlideState]]) -> list[dict]:
        """Large slides region by region; the others' tiles in shared network batches, then
        each slide stitched and measured, then all their crops classified together."""
        out = [to_row(s, status) for status, s in rows if status not in (READ, LARGE)]
        out += [self.guard(s, self.process_large) for status, s in rows if status == LARGE]
        ready = [state for status, state in rows if status == READ]
        started = time.perf_counter()
        try:
            segmented = segment_tiles([s.work for s in ready], self.models)
        except Exception:  # isolate the slide that broke the batch: each one again alone
            segmented = [None] * len(ready)
        per_tile = (time.perf_counter() - started) / max(1, sum(len(s.work.tiles) for s in ready))
        measured = []
        for state, segs in zip(ready, segmented, strict=True):
            state.timing["segment_s"] = per_tile * len(state.work.tiles)
            row = self.guard(state, self.stitch_and_measure, segs)
            if row is None:
                measured.append(state)
            else:
                out.append(row)
        return out + self.classify(measured)

    def guard(self, state: SlideState, fn, *args) -> dict | None:
        """fn(state, *args), or the failed row of the slide it raised for."""
        try:
            return fn(state, *args)
        except Exception as exc:  # one bad slide is a failures row, never a lost run
            return fail(self.store, self.ctx, state, exc)

    def process_large(self, state: SlideState) -> dict:
        """A whole-slide image, region by region (engine.regions), committed here."""
        slide = open_if_large(state.spec, self.ctx.storage_options, self.config.region_min_pixels)
        with slide:
            state.record = process_large_slide(
                slide,
                state.spec,
                self.models,
                self.store,
                self.ctx.provenance,
                self.config.region_px,
            )
        return to_row(state, COMMITTED)

    def stitch_and_measure(self, state: SlideState, segs) -> None:
        """Stitch the slide's tiles (segmenting them here if its batch failed) and measure
        every cell as tensor operations, on the GPU when there is one."""
        t0 = time.perf_counter()
        if segs is None:
            segs = segment_tiles([state.work], self.models)[0]
        state.labels, state.kinds = stitch_slide(state.work, segs)
        t1 = time.perf_counter()
        # torch loads only where cells are measured: read and write tasks stay light
        from rbcbatch.measure.tensor import measure_cells_tensor

        state.columns = measure_cells_tensor(
            state.labels,
            state.image,
            state.spec.um_per_px,
            background_rgb=state.work.stats.background_rgb,
        )
        state.work = None
        state.timing["segment_s"] += t1 - t0
        state.timing["measure_s"] = time.perf_counter() - t1
        return None

    def classify(self, states: list[SlideState]) -> list[dict]:
        """Classify the cells of all the slides in shared network batches (a classifier
        without `classify_many` goes slide by slide), then build each slide's cells table."""
        classifier = self.models.classifier
        many = getattr(classifier, "classify_many", None)
        started = time.perf_counter()
        try:
            if many is None:
                raise NotImplementedError
            calls = many([(s.columns, s.image, s.spec.um_per_px) for s in states])
        except Exception:  # no batch method, or one slide broke the batch: slide by slide
            calls = [None] * len(states)
        per_cell = (time.perf_counter() - started) / max(
            1, sum(len(s.columns["cell_id"]) for s in states)
        )
        out = []
        for state, slide_calls in zip(states, calls, strict=True):
            state.timing["measure_s"] += per_cell * len(state.columns["cell_id"])
            out.append(self.guard(state, self.cells_table, slide_calls))
        return out

    def cells_table(self, state: SlideState, calls) -> dict:
        t0 = time.perf_counter()
        if calls is None:
            calls = self.models.classifier(state.columns, state.image, state.spec.um_per_px)
        state.table = cells_table(
            state.columns, state.kinds, calls, self.models, state.spec, self.ctx.provenance
        )
        state.record = {"model_hash": self.models.model_hash}
        state.columns = state.kinds = None
        state.timing["measure_s"] += time.perf_counter() - t0
        return to_row(state, MEASURED)


# ---------------------------------------------------------------------------------------------
# Write: CPU tasks, one slide each
# ---------------------------------------------------------------------------------------------


def write_slides(batch: dict[str, np.ndarray], ctx: StageContext) -> dict[str, list]:
    """Ray Data task: write each measured slide's mask and cells, then commit it; every row
    leaves as the slide's outcome (slide_id, status, n_objects, message)."""
    store = ctx.store()
    out = {"slide_id": [], "status": [], "n_objects": [], "message": []}
    for status, state in rows_of(batch):
        if status == MEASURED:
            try:
                state.record = write_one(store, ctx, state)
            except Exception as exc:  # one bad slide is a failures row, never a lost run
                fail(store, ctx, state, exc)
        row = failure_row(state.failure) if state.failure else {"status": "ok", "message": ""}
        out["slide_id"].append(state.spec.slide_id)
        out["status"].append(row["status"])
        out["n_objects"].append(0 if state.failure else int(state.record["n_objects"]))
        out["message"].append(row["message"])
    return out


def write_one(store: RunStore, ctx: StageContext, state: SlideState) -> dict:
    """Write a slide's mask and cells, then its commit record: the slide is done."""
    spec, table = state.spec, state.table
    t0 = time.perf_counter()
    store.write_mask(
        spec.slide_id,
        state.labels,
        spec.um_per_px,
        {"slide_id": spec.slide_id, "uri": spec.uri, **ctx.provenance},
        state.image,
    )
    store.write_cells(spec.cohort, spec.patient_id, spec.slide_id, table)
    state.timing["write_s"] = time.perf_counter() - t0
    record = commit_record(
        spec,
        state.calibration,
        state.image.shape[:2],
        (table.num_rows, table.column("kind").to_pylist().count("rbc")),
        state.record["model_hash"],
        ctx.provenance,
        state.timing,
    )
    store.commit(record)
    return record


def failure_row(failure: Failure) -> dict:
    """A failed slide or catalog row as the run reports it (RunSummary.failed, the CLI)."""
    return {
        "slide_id": failure.slide_id,
        "status": "failed",
        "message": f"{failure.stage}: {failure.message}",
    }


def _scalar(value):
    """A batch cell as a plain Python value; Arrow nulls (NaN in float columns) become None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def process_here(specs: list[SlideSpec], ctx: StageContext, geometry: dict) -> dict[str, list]:
    """The three stages on one batch of slides in this process, without Ray (tests, debugging):
    the outcome rows `write_slides` returns."""
    rows = [
        read_slides(
            {k: np.array([v], dtype=object) for k, v in spec.to_dict().items()}, ctx, geometry
        )
        for spec in specs
    ]
    batch = {k: [v for r in rows for v in r[k]] for k in ("slide_id", "status", "payload")}
    return write_slides(ModelStage(ctx)(batch), ctx)

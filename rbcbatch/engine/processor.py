"""The Ray Data actor that processes and commits batches of slides.

Each actor builds its models once and, per slide, reads and decodes the image, resamples it to
the segmenter's working resolution, segments it tile by tile, maps the labels back to full
resolution, measures and classifies every cell in µm, and commits the slide's mask, cells and
record. Tiled whole-slide images go region by region (engine.regions). A slide that fails
becomes a failures row; the others go on.
"""

from __future__ import annotations

import os
import time

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
from rbcbatch.io.catalog import SlideSpec
from rbcbatch.io.sources import read_slide
from rbcbatch.io.storage import destination_unwritable
from rbcbatch.measure import measure_cells
from rbcbatch.segment.calibrate import cell_diameters_px
from rbcbatch.store.run_store import RunStore

# A slide whose worker died this many times (a crash, running out of memory, a lost node) is
# recorded as failed instead of tried again: Ray restarts actors and retries their batches without
# limit, so one slide that kills its worker every time would otherwise hold the run until the
# stall timeout.
MAX_SLIDE_ATTEMPTS = 3


class SlideProcessor:
    """Ray Data actor: builds the models once, then processes and commits batches of slides."""

    def __init__(self, run_url: str, storage_options: dict | None, config: dict, run_id: str):
        self.config = RunConfig(**config)
        self.models = Models(self.config)
        self.store = RunStore(
            run_url, storage_options, deidentified=bool(self.config.deidentify_key_id)
        )
        self.storage_options = storage_options
        self.provenance = {
            "run_id": run_id,
            "config_hash": stable_hash(self.models.describe()),
            "code_version": __version__,
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """Process a batch of slides; a batch Ray retries after its worker died goes slide by slide."""
        specs = [
            SlideSpec(**{k: _scalar(v[i]) for k, v in batch.items()})
            for i in range(len(batch["slide_id"]))
        ]
        run_id = self.provenance["run_id"]
        if any(self.store.attempts(run_id, spec.slide_id) for spec in specs):
            return self.retry_one_by_one(specs)
        for spec in specs:
            self.store.begin_attempt(run_id, spec.slide_id, 1, os.getpid())
        return self.process(specs)

    def retry_one_by_one(self, specs: list[SlideSpec]) -> dict[str, list]:
        """A retried batch: each slide alone, its attempt counted first, so that a slide that
        kills its worker every time (a decoder crash, memory) is known and given up after
        MAX_SLIDE_ATTEMPTS while its batch-mates finish. Slides committed before the worker died
        are reported, not redone."""
        out = _empty_outcome()
        run_id, committed = self.provenance["run_id"], self.store.committed()
        for spec in specs:
            if spec.slide_id in committed:
                self._report(out, spec, self.store.commit_record(spec.slide_id), None)
                continue
            attempt = self.store.attempts(run_id, spec.slide_id) + 1
            if attempt > MAX_SLIDE_ATTEMPTS:
                failure = Failure(
                    spec.slide_id,
                    spec.uri,
                    "process",
                    "WorkerDied",
                    f"the worker processing this slide died {attempt - 1} times (a crash, running "
                    "out of memory or a lost node); it is not tried again in this run",
                )
                self.store.record_failure(failure, run_id, f"slide-{spec.slide_id}")
                self._report(out, spec, None, failure)
                continue
            self.store.begin_attempt(run_id, spec.slide_id, attempt, os.getpid())
            for key, values in self.process([spec]).items():
                out[key].extend(values)
        return out

    def process(self, specs: list[SlideSpec]) -> dict[str, list]:
        """Read every slide, segment all their tiles together, then finish each."""
        out = _empty_outcome()
        ready = []
        for spec in specs:
            slide, failure = self._guard(spec, self.open_large, spec)
            if failure is None and slide is not None:  # a whole-slide image: region by region
                self._report(out, spec, *self._guard(spec, self.process_large, spec, slide))
                continue
            outcome, failure = (None, failure) if failure else self._guard(spec, self.read, spec)
            if failure is None:
                ready.append(outcome)
            else:
                self._report(out, spec, None, failure)
        started = time.perf_counter()
        try:
            segmented = segment_tiles([work for _, _, work, _ in ready], self.models)
        except Exception:  # isolate the slide that broke the batch: go one by one
            segmented = [None] * len(ready)
        elapsed = time.perf_counter() - started
        total_tiles = max(1, sum(len(work.tiles) for _, _, work, _ in ready))
        for _, _, work, timing in ready:  # the batch's model time, shared out by tiles
            timing["batch_segment_s"] = elapsed * len(work.tiles) / total_tiles
        for (spec, image, work, timing), segs in zip(ready, segmented, strict=True):
            record, failure = self._guard(spec, self.finish, spec, image, work, segs, timing)
            self._report(out, spec, record, failure)
        return out

    def _guard(self, spec: SlideSpec, fn, *args) -> tuple[object, Failure | None]:
        """Run one slide's step: (its result, None), or (None, the failure it recorded)."""
        try:
            return fn(*args), None
        except Exception as exc:  # one bad slide is a failures row, never a lost run
            if destination_unwritable(exc):
                raise  # the run folder is full or read-only: stop the run (a StorageError)
            failure = Failure.from_exception(spec.slide_id, spec.uri, "process", exc)
            self.store.record_failure(failure, self.provenance["run_id"], f"slide-{spec.slide_id}")
            return None, failure

    @staticmethod
    def _report(
        out: dict[str, list], spec: SlideSpec, record: dict | None, failure: Failure | None
    ) -> None:
        row = failure_row(failure) if failure else {"status": "ok", "message": ""}
        out["slide_id"].append(spec.slide_id)
        out["status"].append(row["status"])
        out["n_objects"].append(0 if failure else record["n_objects"])
        out["message"].append(row["message"])

    def open_large(self, spec: SlideSpec):
        """The slide opened lazily when it is a tiled TIFF over region_min_pixels, else None."""
        return open_if_large(spec, self.storage_options, self.config.region_min_pixels)

    def process_large(self, spec: SlideSpec, slide) -> dict:
        """Segment, measure and commit a whole-slide image region by region."""
        with slide:
            return process_large_slide(
                slide, spec, self.models, self.store, self.provenance, self.config.region_px
            )

    def read(self, spec: SlideSpec) -> tuple:
        t0 = time.perf_counter()
        image = read_slide(spec.slide_id, spec.uri, self.storage_options, self.config.max_pixels)
        spec, *calibration = pixel_size(spec, None, lambda: cell_diameters_px(image))
        work = prepare_slide(image, spec.um_per_px, self.models)
        return (
            spec,
            image,
            work,
            {"t0": t0, "read_s": time.perf_counter() - t0, "calibration": tuple(calibration)},
        )

    def finish(
        self, spec: SlideSpec, image: np.ndarray, work: SlideWork, segs, timing: dict
    ) -> dict:
        t1 = time.perf_counter()
        if segs is None:
            segs = segment_tiles([work], self.models)[0]
        labels, kinds = stitch_slide(work, segs)
        t2 = time.perf_counter()
        columns = measure_cells(
            labels, image, spec.um_per_px, background_rgb=work.stats.background_rgb
        )
        calls = self.models.classifier(columns, image, spec.um_per_px)
        table = cells_table(columns, kinds, calls, self.models, spec, self.provenance)
        t3 = time.perf_counter()
        self.store.write_mask(
            spec.slide_id,
            labels,
            spec.um_per_px,
            {"slide_id": spec.slide_id, "uri": spec.uri, **self.provenance},
            image,
        )
        self.store.write_cells(spec.cohort, spec.patient_id, spec.slide_id, table)
        record = commit_record(
            spec,
            timing["calibration"],
            image.shape[:2],
            (table.num_rows, table.column("kind").to_pylist().count("rbc")),
            self.models.model_hash,
            self.provenance,
            {
                "read_s": timing["read_s"],
                "segment_s": timing.get("batch_segment_s", 0.0) + t2 - t1,
                "measure_s": t3 - t2,
                "write_s": time.perf_counter() - t3,
            },
        )
        self.store.commit(record)
        return record


def failure_row(failure: Failure) -> dict:
    """A failed slide or catalog row as the run reports it (RunSummary.failed, the CLI)."""
    return {
        "slide_id": failure.slide_id,
        "status": "failed",
        "message": f"{failure.stage}: {failure.message}",
    }


def _empty_outcome() -> dict[str, list]:
    return {"slide_id": [], "status": [], "n_objects": [], "message": []}


def _scalar(value):
    """A batch cell as a plain Python value; Arrow nulls (NaN in float columns) become None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value

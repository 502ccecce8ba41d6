"""The run: catalog → Ray Data → per-slide segment, stitch, measure, classify → commit.

Ray Data streams catalog rows to a pool of actors. Each actor builds its models once and, per
slide, reads and decodes the image, resamples it to the segmenter's working resolution, segments
it tile by tile (halo + centroid-in-core stitching), maps the labels back to full resolution,
measures and classifies every cell in µm, and commits the slide's mask, cells and record.
A slide that fails becomes a failures row; the others go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa

from rbcbatch import __version__
from rbcbatch.calibrate import estimate_um_per_px
from rbcbatch.catalog import SlideSpec, load_catalog
from rbcbatch.classify import CellCalls, ResNetClassifier, RulesClassifier
from rbcbatch.deidentify import check_run_folder, key_id, row_deidentifier, run_note
from rbcbatch.errors import Failure, RbcbatchError, RunStalledError, SlideError
from rbcbatch.measure import measure_cells
from rbcbatch.segment import ClassicalSegmenter, estimate_slide_stats
from rbcbatch.sinks import RunStore, cells_schema, now_iso
from rbcbatch.sources import MAX_WHOLE_IMAGE_PIXELS, read_slide, resample, resize_labels
from rbcbatch.stitch import core_object_ids, paint_tile
from rbcbatch.storage import explains_storage_errors, resolve_options
from rbcbatch.tiling import TileGeometry, tile_grid

# Slide statistics (background, thresholds) are estimated on an overview of at most this size.
OVERVIEW_PIXELS = 4_000_000
# A slide whose worker died this many times (a crash, running out of memory, a lost node) is
# recorded as failed instead of tried again: Ray restarts actors and retries their batches without
# limit, so one slide that kills its worker every time would otherwise hold the run until the
# stall timeout.
MAX_SLIDE_ATTEMPTS = 3
# Fewest isolated cells a pixel-size estimate may rest on: the median of 20 diameters with a
# typical 8% spread is within ~2% of the population median.
MIN_CALIBRATION_CELLS = 20

KIND_NAMES = {1: "rbc", 2: "wbc", 3: "platelet"}


def _unet_segmenter():
    from rbcbatch.segment_unet import UNetSegmenter  # torch and smp load only when asked for

    return UNetSegmenter()


# Name -> builder. Learned models load their checked weights once, in the actor that builds them.
SEGMENTERS: dict[str, Callable] = {"classical": ClassicalSegmenter, "unet": _unet_segmenter}
CLASSIFIERS: dict[str, Callable] = {"rules": RulesClassifier, "resnet": ResNetClassifier}


def _lookup(registry: dict[str, Callable], name: str, what: str) -> Callable:
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown {what} {name!r}; choose one of {sorted(registry)}") from None


@dataclass(frozen=True)
class RunConfig:
    """Everything that changes what a run computes (its hash goes on every row)."""

    segmenter: str = "classical"
    classifier: str = "rules"
    tile_px: int = 512
    halo_px: int = 96
    max_pixels: int = MAX_WHOLE_IMAGE_PIXELS
    # Tiled TIFFs with more level-0 pixels than this go region by region (rbcbatch.regions);
    # smaller images and every other format are decoded whole, as before.
    region_min_pixels: int = 64_000_000
    # Region core edge in working pixels, a multiple of tile_px: 4096 at 0.25 µm/px is ~1 mm.
    region_px: int = 4096
    # De-identified runs (rbcbatch.deidentify): the id of the key that hashed the patient and
    # slide ids; empty when the catalog's own ids are kept.
    deidentify_key_id: str = ""

    def __post_init__(self) -> None:
        _lookup(SEGMENTERS, self.segmenter, "segmenter")
        _lookup(CLASSIFIERS, self.classifier, "classifier")
        if self.region_px < self.tile_px or self.region_px % self.tile_px:
            raise ValueError(
                f"region_px ({self.region_px}) must be a multiple of tile_px ({self.tile_px})"
            )

    def to_dict(self) -> dict:
        config = asdict(self)
        if not self.deidentify_key_id:  # runs with the catalog's ids keep their config hash
            del config["deidentify_key_id"]
        return config


def stable_hash(obj: dict) -> str:
    """Short sha256 of a JSON document with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Models:
    """The models of one run, built once per actor."""

    config: RunConfig
    segmenter: object = field(init=False)
    classifier: object = field(init=False)
    geometry: TileGeometry = field(init=False)

    def __post_init__(self) -> None:
        self.segmenter = _lookup(SEGMENTERS, self.config.segmenter, "segmenter")()
        self.classifier = _lookup(CLASSIFIERS, self.config.classifier, "classifier")()
        self.geometry = TileGeometry(
            self.config.tile_px, self.config.halo_px, self.segmenter.um_per_px
        )

    def describe(self) -> dict:
        return {
            "run": self.config.to_dict(),
            "segmenter": self.segmenter.config(),
            "classifier": self.classifier.config(),
            "geometry": self.geometry.to_dict(),
            **(
                {"deidentified": run_note(self.config.deidentify_key_id)}
                if self.config.deidentify_key_id
                else {}
            ),
        }

    @property
    def model_hash(self) -> str:
        return stable_hash(
            {"segmenter": self.segmenter.config(), "classifier": self.classifier.config()}
        )


@dataclass
class SlideWork:
    """A slide ready for segmentation: its working-resolution image, statistics and tiles."""

    work: np.ndarray  # uint8 h×w×3 at the segmenter's µm/px
    stats: object
    tiles: list
    full_shape: tuple[int, int]


def prepare_slide(image: np.ndarray, um_per_px: float, models: Models) -> SlideWork:
    """Resample to the working resolution, estimate slide statistics once, cut the tiles."""
    work = resample(image, um_per_px / models.geometry.um_per_px)
    overview_scale = min(1.0, (OVERVIEW_PIXELS / (work.shape[0] * work.shape[1])) ** 0.5)
    stats = estimate_slide_stats(resample(work, overview_scale))
    tiles = tile_grid(work.shape[0], work.shape[1], models.geometry)
    return SlideWork(work, stats, tiles, image.shape[:2])


def segment_tiles(works: list[SlideWork], models: Models, tile_batch: int = 16) -> list[list]:
    """Segment every tile of several slides; returns, per slide, its Segmentations in tile order.

    Segmenters with a batch method get up to `tile_batch` tiles of one slide at a time (a batch
    shares the slide's statistics); the classical one is called tile by tile.
    """
    batch_fn = getattr(models.segmenter, "segment_batch", None)
    per_slide = []
    for w in works:
        crops = [np.ascontiguousarray(w.work[t.outer_slices]) for t in w.tiles]
        if batch_fn is None:
            per_slide.append([models.segmenter(crop, w.stats) for crop in crops])
            continue
        segs = []
        for start in range(0, len(crops), tile_batch):
            segs.extend(batch_fn(crops[start : start + tile_batch], w.stats))
        per_slide.append(segs)
    return per_slide


def stitch_slide(work: SlideWork, segmentations: list) -> tuple[np.ndarray, dict[int, int]]:
    """Keep each tile's core objects, paint them with slide-wide ids, back to full resolution."""
    canvas = np.zeros(work.work.shape[:2], dtype=np.uint32)
    kinds: dict[int, int] = {}
    next_id = 1
    for tile, seg in zip(work.tiles, segmentations, strict=True):
        keep = core_object_ids(seg.labels, tile)
        for offset, local in enumerate(keep):
            kinds[next_id + offset] = int(seg.kinds[local - 1])
        next_id = paint_tile(canvas, seg.labels, tile, keep, next_id)
    return resize_labels(canvas, *work.full_shape), kinds


def segment_slide(
    image: np.ndarray, um_per_px: float, models: Models
) -> tuple[np.ndarray, dict[int, int], object]:
    """Instance labels of one slide at full resolution, each label's object kind, and stats.

    image: uint8 H×W×3 at the slide's pixel size. Returns (labels uint32 H×W, {id: kind}, stats).
    """
    work = prepare_slide(image, um_per_px, models)
    labels, kinds = stitch_slide(work, segment_tiles([work], models)[0])
    return labels, kinds, work.stats


def cells_table(
    columns: dict[str, np.ndarray],
    kinds: dict[int, int],
    calls: CellCalls,
    models: Models,
    spec: SlideSpec,
    provenance: dict,
) -> pa.Table:
    """Measurements + calls + provenance, in the cells schema's column order.

    Objects that are not red cells keep their kind as class and carry no probabilities.
    """
    n = len(columns["cell_id"])
    kind = np.array([KIND_NAMES[kinds[int(i)]] for i in columns["cell_id"]], dtype=object)
    is_rbc = kind == "rbc"
    learned = {
        "class": np.where(is_rbc, calls.classes, kind) if n else kind,
        "class_probability": _masked(calls.probability, is_rbc),
        "probabilities": _masked(calls.probabilities, is_rbc),
        "embedding": _masked(calls.embedding, is_rbc),
    }
    values = {
        "cohort": spec.cohort,
        "patient_id": spec.patient_id,
        "slide_id": spec.slide_id,
        "site": spec.site,
        "scanner": spec.scanner,
        "stain": spec.stain,
        "um_per_px": spec.um_per_px,
        "segmenter": models.config.segmenter,
        "classifier": models.config.classifier,
        "model_hash": models.model_hash,
        **provenance,
    }
    schema = cells_schema()
    arrays = []
    for f in schema:
        if f.name in columns:
            data = columns[f.name]
        elif f.name == "kind":
            data = kind
        elif f.name in learned:
            data = learned[f.name]
        else:
            data = [values[f.name]] * n
        arrays.append(pa.array(data, type=f.type) if data is not None else pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _masked(values: np.ndarray | None, keep: np.ndarray) -> list | None:
    """Per-row values where `keep`, None elsewhere; None when the classifier gives none."""
    if values is None:
        return None
    rows = list(values) if values.ndim > 1 else values.tolist()
    return [v if k else None for v, k in zip(rows, keep, strict=True)]


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
            failure = Failure.from_exception(spec.slide_id, spec.uri, "process", exc)
            self.store.record_failure(failure, self.provenance["run_id"], f"slide-{spec.slide_id}")
            return None, failure

    @staticmethod
    def _report(
        out: dict[str, list], spec: SlideSpec, record: dict | None, failure: Failure | None
    ) -> None:
        out["slide_id"].append(spec.slide_id)
        out["status"].append("failed" if failure else "ok")
        out["n_objects"].append(0 if failure else record["n_objects"])
        out["message"].append(f"{failure.stage}: {failure.message}" if failure else "")

    def open_large(self, spec: SlideSpec):
        """The slide opened lazily when it is a tiled TIFF over region_min_pixels, else None."""
        from rbcbatch.regions import open_if_large  # regions builds on this module

        return open_if_large(spec, self.storage_options, self.config.region_min_pixels)

    def process_large(self, spec: SlideSpec, slide) -> dict:
        """Segment, measure and commit a whole-slide image region by region."""
        from rbcbatch.regions import process_large_slide

        with slide:
            return process_large_slide(
                slide, spec, self.models, self.store, self.provenance, self.config.region_px
            )

    def read(self, spec: SlideSpec) -> tuple:
        t0 = time.perf_counter()
        image = read_slide(spec.slide_id, spec.uri, self.storage_options, self.config.max_pixels)
        spec, calibration_cells = calibrated(spec, image)
        work = prepare_slide(image, spec.um_per_px, self.models)
        return (
            spec,
            image,
            work,
            {"t0": t0, "read_s": time.perf_counter() - t0, "cells": calibration_cells},
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
        )
        self.store.write_cells(spec.cohort, spec.patient_id, spec.slide_id, table)
        kind_col = table.column("kind").to_pylist()
        record = {
            **{k: v for k, v in spec.to_dict().items() if k != "row"},
            "status": "ok",
            "um_per_px_source": "estimated" if timing["cells"] else "catalog",
            "calibration_cells": timing["cells"],
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "n_objects": table.num_rows,
            "n_rbc": kind_col.count("rbc"),
            "model_hash": self.models.model_hash,
            **self.provenance,
            "read_s": timing["read_s"],
            "segment_s": timing.get("batch_segment_s", 0.0) + t2 - t1,
            "measure_s": t3 - t2,
            "write_s": time.perf_counter() - t3,
            "peak_rss_mb": peak_rss_mb(),
            "finished_at": now_iso(),
        }
        self.store.commit(record)
        return record


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _empty_outcome() -> dict[str, list]:
    return {"slide_id": [], "status": [], "n_objects": [], "message": []}


def calibrated(spec: SlideSpec, image: np.ndarray) -> tuple[SlideSpec, int]:
    """The spec with a pixel size: the catalog's, or one estimated from the cells (and on how many)."""
    if spec.um_per_px is not None:
        return spec, 0
    um_per_px, n_cells = estimate_um_per_px(image)
    if n_cells < MIN_CALIBRATION_CELLS:
        raise SlideError(
            spec.slide_id,
            "calibrate",
            f"um_per_px is not in the catalog and only {n_cells} isolated red cells were found to "
            f"estimate it (need {MIN_CALIBRATION_CELLS}); give the pixel size in the catalog",
        )
    return replace(spec, um_per_px=round(um_per_px, 4)), n_cells


def _scalar(value):
    """A batch cell as a plain Python value; Arrow nulls (NaN in float columns) become None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


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


def actor_pool_shape(
    config: RunConfig, cluster: dict, workers: int | None, pending: int
) -> tuple[int, dict]:
    """Pool size and per-actor resources: one GPU per actor for learned models where GPUs
    exist, else one CPU per actor; never more actors than slides."""
    learned = config.segmenter != "classical" or config.classifier != "rules"
    gpus = int(cluster.get("GPU", 0))
    if learned and gpus:
        return max(1, min(workers or gpus, gpus, pending)), {"num_gpus": 1, "num_cpus": 1}
    cpus = int(cluster.get("CPU", 1))
    return max(1, min(workers or cpus, pending)), {"num_cpus": 1}


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
) -> RunSummary:
    """Process every uncommitted slide of a catalog into `out`; resumable and idempotent.

    Survives the loss of worker nodes while others (or replacements) can take over the actors;
    raises RunStalledError when no slide batch moves for `stall_timeout_s` (None: wait forever).
    With `deidentify_key`, patient and slide ids are keyed hashes from the catalog on and no
    output holds an image URI (rbcbatch.deidentify).
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
    store.open(description, stable_hash(description), allow_new_config=new_config)
    run_id = new_run_id()
    failed: list[dict] = []
    for failure in catalog.rejected:
        store.record_failure(failure, run_id, f"catalog-row-{len(failed) + 1}")
        failed.append(
            {
                "slide_id": failure.slide_id,
                "status": "failed",
                "message": f"catalog: {failure.message}",
            }
        )
    done = store.committed()
    pending = [s for s in catalog.slides if s.slide_id not in done]
    if on_start:
        on_start(len(pending), len(catalog.slides) - len(pending))
    objects = 0
    if pending:
        connect_ray(address)
        import ray
        from ray.data.exceptions import ExecutionTimeoutError

        size, resources = actor_pool_shape(config, ray.cluster_resources(), workers, len(pending))
        items = [s.to_dict() for s in pending]
        blocks = max(1, len(items) // slides_per_batch)
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            SlideProcessor,
            fn_constructor_kwargs={
                "run_url": out,
                "storage_options": storage_options,
                "config": config.to_dict(),
                "run_id": run_id,
            },
            batch_size=slides_per_batch,
            compute=ray.data.ActorPoolStrategy(size=size),
            # Only CPU/GPU counts, never a node-specific resource: an actor lost with its node is
            # restarted wherever a CPU/GPU is free, and the batches it held are retried there
            # (Ray Data's actor-pool defaults, max_restarts=-1 and max_task_retries=-1; passing
            # them here is deprecated). A redone slide overwrites what its lost attempt left:
            # its outputs go to fixed paths and its commit record is written last.
            **resources,
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
            raise RunStalledError(stalled_message(stall_timeout_s, pending_ids, finished)) from e
        store.clear_attempts(run_id)
    store.finalize()
    if not pending and not catalog.slides and not catalog.rejected:
        raise RbcbatchError(f"catalog {catalog_uri} has no rows")
    return RunSummary(
        run_id,
        len(catalog.slides) + len(catalog.rejected),
        len(done & {s.slide_id for s in catalog.slides}),
        len(pending),
        failed,
        objects,
        time.perf_counter() - started,
    )

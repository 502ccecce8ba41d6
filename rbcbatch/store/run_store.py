"""Where a run's results go, and the one step that makes a slide's results visible.

Layout of a run folder (local path or fsspec URL):

    masks.zarr/<slide_id>/           OME-Zarr 0.5 image per slide (store.masks): an RGB overview
        labels/cells/{0,1,...}       with its uint32 labels, level 0 full resolution
    cells/<cohort>/<patient_id>.parquet   a patient's cells, a row group per slide (or region)
    cells/<cohort>/<patient_id>/<slide_id>.parquet   a slide's, until finalize folds it in
    _slides/<slide_id>.json          the commit record of a slide (its manifest row)
    _failed/<key>.json               a failure of the latest attempt at a slide or catalog row
    run.json                         the run's configuration and its hash
    manifest.parquet, failures.parquet   consolidated from _slides/ and _failed/ after each run

A slide is committed when its record exists in `_slides/`; the record is written last, after its
mask and cells, so a killed run leaves at most files that a re-run overwrites, never a
half-visible slide (the `cells` view keeps only committed slides).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from rbcbatch.errors import Failure, RunDirError
from rbcbatch.io.deidentify import withhold_uri
from rbcbatch.io.storage import scrub
from rbcbatch.store.masks import (
    LABELS_PATH,
    MASK_CHUNK,
    image_attrs,
    label_attrs,
    label_group_path,
    labels_attrs,
    mask_level_shapes,
    overview_level_shapes,
    overview_pyramid,
)
from rbcbatch.store.schema import FAILURE_FIELDS, MANIFEST_FIELDS, cells_schema

logger = logging.getLogger(__name__)

# Key-value metadata of a patient's cells file: JSON {slide_id: run_id} of the slides it holds,
# so that compaction tells a slide file it already folded in (a run died before removing it)
# from a newer one.
SLIDES_KEY = b"rbcbatch.slides"
# Buffer of a cells file written piece by piece: s3fs uploads it in parts of this size, which
# S3 wants at least 5 MiB (the read block rbcbatch.io.storage sets is smaller, 256 KiB).
WRITE_BLOCK_SIZE = 16 * 2**20


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class RunStore:
    """A run folder on any fsspec filesystem, with the write and commit steps of slides.

    deidentified: no image URI is written (records, mask attributes, failures and their
    messages), as URIs often name the patient (rbcbatch.io.deidentify).
    """

    def __init__(self, url: str, storage_options: dict | None = None, deidentified: bool = False):
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.deidentified = deidentified
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def mask_url(self, slide_id: str | None = None) -> str:
        """URL of masks.zarr, or of a slide's OME-Zarr image in it (its labels: `open_labels`)."""
        base = f"{self.url}/masks.zarr"
        return f"{base}/{slide_id}" if slide_id else base

    def cells_path(self, cohort: str, patient_id: str, slide_id: str) -> str:
        """A slide's own cells file, from its write until finalize folds it into its patient's.

        No `key=value` folder names: readers would add cohort and patient_id from them (as a
        dictionary, `00123` as an integer) beside the same columns in the files."""
        return self.path("cells", cohort, patient_id, f"{slide_id}.parquet")

    def patient_cells_path(self, cohort: str, patient_id: str) -> str:
        """A patient's cells file: its committed slides, each in row groups of its own."""
        return self.path("cells", cohort, f"{patient_id}.parquet")

    def _cells_tmp(self, path: str) -> str:
        """Where a cells file is written before its move into place: outside cells/, so that no
        reader of that folder ever meets one (polars refuses a folder holding other suffixes),
        in one flat folder ('+' is in no safe name: rbcbatch.io.catalog)."""
        relative = path[len(self.path("cells")) + 1 :].replace("/", "+")
        return self.path("_tmp", "cells", f".{relative}.tmp")

    # -- small atomic writes -------------------------------------------------------------
    def _put_atomic(self, path: str, data: bytes) -> None:
        """Write bytes under a temporary name, then move into place (a rename on local disks)."""
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, path)

    def _put_json(self, path: str, obj: dict) -> None:
        self._put_atomic(path, json.dumps(obj, sort_keys=True, default=str).encode())

    def read_records(self, folder: str) -> list[dict]:
        path = self.path(folder)
        if not self.fs.exists(path):
            return []
        files = sorted(p for p in self.fs.ls(path, detail=False) if p.endswith(".json"))
        return [json.loads(blob) for blob in self.fs.cat(files).values()] if files else []

    # -- the run ------------------------------------------------------------------------
    def open(self, config: dict, config_hash: str, allow_new_config: bool = False) -> None:
        """Create the folder, or check an existing one was made with the same configuration."""
        run_json = self.path("run.json")
        if self.fs.exists(run_json):
            previous = json.loads(self.fs.cat_file(run_json))
            if previous.get("config_hash") != config_hash and not allow_new_config:
                raise RunDirError(
                    f"{self.url} holds results made with configuration {previous.get('config_hash')} "
                    f"and this run's is {config_hash}; mixing them would give cells measured "
                    "two ways. Use another --out folder, or pass --new-config to re-run every slide."
                )
            if previous.get("config_hash") != config_hash:
                self.forget_commits()
        self.fs.makedirs(self.root, exist_ok=True)
        self._put_json(
            run_json, {"config": config, "config_hash": config_hash, "created_at": now_iso()}
        )
        zarr.open_group(self.mask_url(), mode="a", storage_options=self._zarr_options())
        self.clear_failures(prefix="catalog-")

    def _public(self, record: dict) -> dict:
        """The record as it may be written: without its URI when de-identifying."""
        return {**record, "uri": None} if self.deidentified and "uri" in record else record

    def _zarr_options(self) -> dict | None:
        return self.storage_options or None if "://" in self.url else None

    def committed(self) -> set[str]:
        path = self.path("_slides")
        if not self.fs.exists(path):
            return set()
        return {
            p.rsplit("/", 1)[1][: -len(".json")]
            for p in self.fs.ls(path, detail=False)
            if p.endswith(".json")
        }

    def forget_commits(self) -> None:
        if self.fs.exists(self.path("_slides")):
            self.fs.rm(self.path("_slides"), recursive=True)

    # -- one slide ----------------------------------------------------------------------
    def write_mask(
        self,
        slide_id: str,
        labels: np.ndarray,
        um_per_px: float,
        attrs: dict,
        image: np.ndarray,
    ) -> None:
        """Write a slide's label array (uint32 (H, W)) and its 2× nearest-neighbour pyramid,
        chunk-aligned, with the overview of its full-resolution RGB `image` (uint8 (H, W, 3))
        as their parent image."""
        levels = self.create_mask_levels(slide_id, labels.shape, um_per_px, attrs, image)
        level = labels
        for array in levels:
            array[...] = level
            level = level[::2, ::2]

    def create_mask_levels(
        self,
        slide_id: str,
        shape: tuple[int, int],
        um_per_px: float,
        attrs: dict,
        overview: np.ndarray,
    ) -> list[zarr.Array]:
        """A slide's mask group, with empty label arrays (all 0) of its pyramid to fill, for a
        slide written window by window (chunks left at 0 are never stored).

        overview: uint8 (h, w, 3) RGB of the whole slide at any resolution (a coarse level of a
        whole-slide image will do); it is written, area-averaged, as the labels' parent image.
        De-identified runs keep the parent image's arrays empty (all 0): a slide's pixels may
        show its paper label or a name written on the glass.
        """
        group = zarr.open_group(
            self.mask_url(slide_id), mode="w", storage_options=self._zarr_options()
        )
        shapes = mask_level_shapes(shape)
        overview_arrays = [
            group.create_array(
                str(index),
                shape=(3, h, w),
                dtype="uint8",
                chunks=(3, min(MASK_CHUNK, h), min(MASK_CHUNK, w)),
                fill_value=0,
                dimension_names=["c", "y", "x"],
                config={"write_empty_chunks": False},
            )
            for index, (h, w) in enumerate(overview_level_shapes(shape, len(shapes)))
        ]
        if not self.deidentified:  # the pixels are computed only where they are written
            for array, level in zip(
                overview_arrays, overview_pyramid(overview, shape, len(shapes)), strict=True
            ):
                array[...] = level
        group.attrs.update(image_attrs(slide_id, um_per_px, len(shapes)))
        group.create_group("labels", attributes=labels_attrs())
        cells = group.create_group(
            LABELS_PATH, attributes=label_attrs(um_per_px, len(shapes), self._public(attrs))
        )
        return [
            cells.create_array(
                str(index),
                shape=level_shape,
                dtype="uint32",
                chunks=(min(MASK_CHUNK, level_shape[0]), min(MASK_CHUNK, level_shape[1])),
                fill_value=0,
                dimension_names=["y", "x"],
                config={"write_empty_chunks": False},
            )
            for index, level_shape in enumerate(shapes)
        ]

    def open_labels(self, slide_id: str) -> zarr.Group:
        """A slide's label pyramid group (read only), in this layout or that of older runs."""
        masks = zarr.open_group(self.mask_url(), mode="r", storage_options=self._zarr_options())
        return masks[label_group_path(masks, slide_id)]

    def label_levels(self, slide_id: str) -> list[zarr.Array]:
        """A slide's label arrays, level 0 (full resolution) first, as its metadata lists them."""
        group = self.open_labels(slide_id)
        datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
        return [group[d["path"]] for d in datasets]

    @contextmanager
    def cells_writer(
        self, cohort: str, patient_id: str, slide_id: str
    ) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer for a slide's cells, appended in row groups; the file is written under
        a temporary name and moved into place only when the block ends without error."""
        path = self.cells_path(cohort, patient_id, slide_id)
        tmp = self._cells_tmp(path)
        self.fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
        try:
            with (
                self.fs.open(tmp, "wb", block_size=WRITE_BLOCK_SIZE) as f,
                pq.ParquetWriter(f, cells_schema(), compression="zstd") as writer,
            ):
                yield writer
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        self._move_into_place(tmp, path)

    def write_cells(self, cohort: str, patient_id: str, slide_id: str, table: pa.Table) -> None:
        with self.cells_writer(cohort, patient_id, slide_id) as writer:
            writer.write_table(table)

    def _move_into_place(self, tmp: str, path: str) -> None:
        """A rename on local disks; on object stores a copy, which appears whole or not at all."""
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.mv(tmp, path)

    def read_cells(self, slide_id: str) -> pa.Table:
        """A committed slide's cells (of its committed run), from its own file or its patient's:
        the same before and after finalize, and in the hive layout of older runs."""
        record = self.commit_record(slide_id)
        cohort, patient_id = record["cohort"], record["patient_id"]
        candidates = [
            self.cells_path(cohort, patient_id, slide_id),
            self.path(
                "cells", f"cohort={cohort}", f"patient_id={patient_id}", f"{slide_id}.parquet"
            ),
            self.patient_cells_path(cohort, patient_id),
        ]
        path = next((p for p in candidates if self.fs.exists(p)), None)
        if path is None:
            raise FileNotFoundError(f"no cells file of slide {slide_id} in {self.url}/cells")
        return pq.read_table(
            path,
            filesystem=self.fs,
            partitioning=None,
            filters=[("slide_id", "==", slide_id), ("run_id", "==", record["run_id"])],
        ).replace_schema_metadata(None)

    # -- compaction: one file per patient -----------------------------------------------
    def compact_cells(self, records: list[dict] | None = None) -> int:
        """Fold the committed slides' own files into one file per patient; returns how many
        patient files were (re)written.

        A query then reads one footer per patient, not one per slide. Per patient: its file is
        written anew under a temporary name (outside cells/) from the slide files and the slides
        it already held, a row group per slide (a region-by-region slide keeps its regions'),
        streamed row group by row group; moved into place; then the slide files are removed.
        The file's metadata (SLIDES_KEY) lists its slides with their run ids, so a slide file
        left by a run that died after the move is seen to be in it and removed. Only committed
        slides of their committed run are folded in: a slide file of an uncommitted slide, or
        of a run other than its commit record's, stays as it is (the `cells` view leaves it out).
        Slide files of older runs' hive layout (cells/cohort=<c>/patient_id=<p>/) are folded in
        alike. Patients without slide files are not read at all.
        """
        records = self.read_records("_slides") if records is None else records
        by_patient: dict[tuple[str, str], dict[str, str]] = {}
        for r in records:
            if r.get("cohort") and r.get("patient_id") and r.get("run_id"):
                key = (r["cohort"], r["patient_id"])
                by_patient.setdefault(key, {})[r["slide_id"]] = r["run_id"]
        patient_of = {s: key for key, slides in by_patient.items() for s in slides}
        loose: dict[tuple[str, str], dict[str, str]] = {}
        for path in self.fs.glob(self.path("cells", "*", "*", "*.parquet")):
            slide_id = path.rsplit("/", 1)[1][: -len(".parquet")]
            if slide_id in patient_of:
                loose.setdefault(patient_of[slide_id], {})[slide_id] = path
        return sum(
            self._compact_patient(cohort, patient_id, by_patient[cohort, patient_id], files)
            for (cohort, patient_id), files in sorted(loose.items())
        )

    def _compact_patient(
        self, cohort: str, patient_id: str, slides: dict[str, str], loose: dict[str, str]
    ) -> bool:
        """slides: {slide_id: committed run_id} of the patient; loose: {slide_id: path} of its
        slide files. True when the patient's file was written."""
        target = self.patient_cells_path(cohort, patient_id)
        held = self._held_slides(target)
        if held is None:
            return False
        duplicates = {s: p for s, p in loose.items() if held.get(s) == slides[s]}
        fresh = {
            s: p for s, p in loose.items() if s not in duplicates and self._holds_run(p, slides[s])
        }
        if fresh:
            keep = {s: r for s, r in sorted(slides.items()) if s in fresh or held.get(s) == r}
            self._write_patient(target, keep, fresh)
        for path in [*duplicates.values(), *fresh.values()]:
            self.fs.rm(path)
        for path in {p.rsplit("/", 1)[0] for p in [*duplicates.values(), *fresh.values()]}:
            self._remove_if_empty(path)
        return bool(fresh)

    def _held_slides(self, target: str) -> dict[str, str] | None:
        """{slide_id: run_id} a patient's file holds ({} when there is none yet; None when it
        cannot be rewritten: another schema)."""
        if not self.fs.exists(target):
            return {}
        with self.fs.open(target, "rb") as f:
            schema = pq.read_schema(f)
        if not schema.equals(cells_schema()):
            logger.warning(
                "%s has another cells schema; its slide files are left as they are", target
            )
            return None
        return json.loads((schema.metadata or {}).get(SLIDES_KEY, b"{}"))

    def _holds_run(self, path: str, run_id: str) -> bool:
        """True when the slide file has the cells schema and every row is of run `run_id`
        (from the row groups' statistics where written, else from the column)."""
        with self.fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            if not parquet.schema_arrow.equals(cells_schema()):
                logger.warning("%s has another cells schema; it is left as it is", path)
                return False
            return all(
                _row_group_values(parquet, index, "run_id") == {run_id}
                for index in range(parquet.num_row_groups)
                if parquet.metadata.row_group(index).num_rows
            )

    def _write_patient(self, target: str, keep: dict[str, str], fresh: dict[str, str]) -> None:
        """Write the patient's file: `keep`'s slides in slide order, from their slide file
        (`fresh`) or the row groups of the file in place; one source row group at a time."""
        tmp = self._cells_tmp(target)
        self.fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
        schema = cells_schema().with_metadata({SLIDES_KEY: json.dumps(keep, sort_keys=True)})
        with ExitStack() as stack:
            held = None
            if any(s not in fresh for s in keep):
                held = pq.ParquetFile(stack.enter_context(self.fs.open(target, "rb")))
            held_groups: dict[str, list[int]] = {}
            for index in range(held.num_row_groups if held else 0):
                for slide_id in _row_group_values(held, index, "slide_id"):
                    held_groups.setdefault(slide_id, []).append(index)
            writer = stack.enter_context(
                pq.ParquetWriter(
                    stack.enter_context(self.fs.open(tmp, "wb", block_size=WRITE_BLOCK_SIZE)),
                    schema,
                    compression="zstd",
                )
            )
            for slide_id in keep:
                if slide_id in fresh:
                    with self.fs.open(fresh[slide_id], "rb") as f:
                        source = pq.ParquetFile(f)
                        for index in range(source.num_row_groups):
                            _copy_row_group(source, index, writer)
                else:
                    for index in held_groups.get(slide_id, []):
                        _copy_row_group(held, index, writer)
        self._move_into_place(tmp, target)

    def _remove_if_empty(self, folder: str) -> None:
        """Remove a slide files' folder left empty, and its parent under cells/ (the cohort=
        folder of the hive layout); object stores have no folders to remove."""
        cells = self.path("cells")
        if "file" not in self.fs.protocol:
            return
        while folder.startswith(cells + "/") and self.fs.isdir(folder):
            if self.fs.ls(folder, detail=False):
                return
            self.fs.rmdir(folder)
            folder = folder.rsplit("/", 1)[0]

    # -- attempts: which slide was in hand when a worker died --------------------------
    def _attempt_path(self, run_id: str, slide_id: str, stage: str) -> str:
        """The read stage's markers sit directly under the run's folder, later stages' in a
        folder each."""
        parts = (run_id,) if stage == "read" else (run_id, stage)
        return self.path("_attempts", *parts, f"{slide_id}.json")

    def _attempt(self, run_id: str, slide_id: str, stage: str) -> dict:
        path = self._attempt_path(run_id, slide_id, stage)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else {}

    def attempts(self, run_id: str, slide_id: str, stage: str = "read") -> int:
        """How many times this run's `stage` has started processing the slide (0 if never)."""
        return int(self._attempt(run_id, slide_id, stage).get("attempts", 0))

    def attempt_started(self, run_id: str, slide_id: str, stage: str = "read") -> int:
        """When the stage last started the slide (ns since the epoch; 0 if never)."""
        return int(self._attempt(run_id, slide_id, stage).get("started_ns", 0))

    def begin_attempt(
        self, run_id: str, slide_id: str, attempt: int, pid: int, stage: str = "read"
    ) -> None:
        """Record that a worker (process `pid`) of `stage` starts the slide for the n-th time."""
        self._put_json(
            self._attempt_path(run_id, slide_id, stage),
            {
                "attempts": attempt,
                "pid": pid,
                "started_at": now_iso(),
                "started_ns": time.time_ns(),
            },
        )

    def clear_attempts(self, run_id: str) -> None:
        if self.fs.exists(self.path("_attempts", run_id)):
            self.fs.rm(self.path("_attempts", run_id), recursive=True)

    def commit_record(self, slide_id: str) -> dict:
        return json.loads(self.fs.cat_file(self.path("_slides", f"{slide_id}.json")))

    def commit(self, record: dict) -> None:
        """The commit step: from here on the slide counts as done and is skipped on re-runs."""
        record = self._public(record)
        self._put_json(self.path("_slides", f"{record['slide_id']}.json"), record)
        failed = self.path("_failed", f"slide-{record['slide_id']}.json")
        if self.fs.exists(failed):
            self.fs.rm(failed)

    def record_failure(self, failure: Failure, run_id: str, key: str) -> None:
        row = {**asdict(failure), "run_id": run_id, "failed_at": now_iso()}
        for name in ("uri", "message"):  # a store's error text must never carry its credentials
            row[name] = scrub(row[name], self.storage_options)
        if self.deidentified:
            row["message"] = withhold_uri(row["message"], failure.uri)
            row["uri"] = None
        self._put_json(self.path("_failed", f"{key}.json"), row)

    def clear_failures(self, prefix: str) -> None:
        folder = self.path("_failed")
        if self.fs.exists(folder):
            for p in self.fs.ls(folder, detail=False):
                if p.rsplit("/", 1)[1].startswith(prefix):
                    self.fs.rm(p)

    # -- consolidation ------------------------------------------------------------------
    def finalize(self) -> tuple[pa.Table, pa.Table]:
        """Rewrite manifest.parquet and failures.parquet from the per-slide records, then fold
        the committed slides' cells files into their patients' (compact_cells)."""
        committed = self.read_records("_slides")
        committed_ids = {r["slide_id"] for r in committed}
        failures = [
            f
            for f in self.read_records("_failed")
            if f["slide_id"] not in committed_ids or f["stage"] == "catalog"
        ]
        failed_rows = [
            {
                "slide_id": f["slide_id"],
                "uri": f["uri"],
                "status": "failed",
                "run_id": f["run_id"],
                "finished_at": f["failed_at"],
            }
            for f in failures
            if f["stage"] != "catalog"
        ]
        manifest = _table(committed + failed_rows, MANIFEST_FIELDS)
        failure_table = _table(failures, FAILURE_FIELDS)
        for name, table in (("manifest.parquet", manifest), ("failures.parquet", failure_table)):
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            self._put_atomic(self.path(name), buffer.getvalue())
        self.compact_cells(committed)
        return manifest, failure_table


def _row_group_values(parquet: pq.ParquetFile, index: int, column: str) -> set[str]:
    """The values of a string column in one row group: from its statistics when they are exact
    (min equal to max), else read."""
    group = parquet.metadata.row_group(index)
    position = parquet.schema_arrow.get_field_index(column)
    stats = group.column(position).statistics
    if stats is not None and stats.has_min_max and stats.min == stats.max:
        return {stats.min}
    values = parquet.read_row_group(index, columns=[column]).column(0)
    return set(values.unique().to_pylist())


def _copy_row_group(source: pq.ParquetFile, index: int, writer: pq.ParquetWriter) -> None:
    """One row group of `source` as one row group of `writer` (empty ones are dropped)."""
    table = source.read_row_group(index)
    if table.num_rows:
        writer.write_table(table, row_group_size=table.num_rows)


def _table(rows: list[dict], fields: dict[str, pa.DataType]) -> pa.Table:
    rows = sorted(
        rows,
        key=lambda r: (r.get("slide_id") or "", r.get("finished_at") or r.get("failed_at") or ""),
    )
    columns = {name: [r.get(name) for r in rows] for name in fields}
    return pa.table({name: pa.array(values, type=fields[name]) for name, values in columns.items()})

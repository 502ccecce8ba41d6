"""Where a run's results go, and the one step that makes a slide's results visible.

Layout of a run folder (local path or fsspec URL):

    masks.zarr/<slide_id>/{0,1,...}   uint32 labels, level 0 full resolution, OME-Zarr metadata
    cells/cohort=<c>/patient_id=<p>/<slide_id>.parquet
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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from rbcbatch.errors import Failure, RunDirError
from rbcbatch.io.deidentify import withhold_uri
from rbcbatch.io.storage import scrub
from rbcbatch.store.masks import MASK_CHUNK, mask_attrs, mask_level_shapes
from rbcbatch.store.schema import FAILURE_FIELDS, MANIFEST_FIELDS, cells_schema


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
        base = f"{self.url}/masks.zarr"
        return f"{base}/{slide_id}" if slide_id else base

    def cells_path(self, cohort: str, patient_id: str, slide_id: str) -> str:
        return self.path(
            "cells", f"cohort={cohort}", f"patient_id={patient_id}", f"{slide_id}.parquet"
        )

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
    def write_mask(self, slide_id: str, labels: np.ndarray, um_per_px: float, attrs: dict) -> None:
        """Write a slide's label array and its 2× nearest-neighbour pyramid, chunk-aligned."""
        group = zarr.open_group(
            self.mask_url(slide_id), mode="w", storage_options=self._zarr_options()
        )
        n_levels = len(mask_level_shapes(labels.shape))
        level = labels
        for index in range(n_levels):
            chunks = (min(MASK_CHUNK, level.shape[0]), min(MASK_CHUNK, level.shape[1]))
            array = group.create_array(
                str(index), shape=level.shape, dtype="uint32", chunks=chunks, fill_value=0
            )
            array[...] = level
            level = level[::2, ::2]
        group.attrs.update(mask_attrs(slide_id, um_per_px, n_levels, self._public(attrs)))

    def create_mask_levels(
        self, slide_id: str, shape: tuple[int, int], um_per_px: float, attrs: dict
    ) -> list[zarr.Array]:
        """Empty label arrays (all 0) of a slide's mask pyramid, with write_mask's metadata, for
        a slide written window by window. Chunks left at 0 are never stored."""
        group = zarr.open_group(
            self.mask_url(slide_id), mode="w", storage_options=self._zarr_options()
        )
        arrays = [
            group.create_array(
                str(index),
                shape=level_shape,
                dtype="uint32",
                chunks=(min(MASK_CHUNK, level_shape[0]), min(MASK_CHUNK, level_shape[1])),
                fill_value=0,
                config={"write_empty_chunks": False},
            )
            for index, level_shape in enumerate(mask_level_shapes(shape))
        ]
        group.attrs.update(mask_attrs(slide_id, um_per_px, len(arrays), self._public(attrs)))
        return arrays

    @contextmanager
    def cells_writer(
        self, cohort: str, patient_id: str, slide_id: str
    ) -> Iterator[pq.ParquetWriter]:
        """A Parquet writer for a slide's cells, appended in row groups; the file is written under
        a temporary name and moved into place only when the block ends without error."""
        path = self.cells_path(cohort, patient_id, slide_id)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.tmp"
        try:
            with (
                self.fs.open(tmp, "wb") as f,
                pq.ParquetWriter(f, cells_schema(), compression="zstd") as writer,
            ):
                yield writer
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        self.fs.mv(tmp, path)

    def write_cells(self, cohort: str, patient_id: str, slide_id: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self._put_atomic(self.cells_path(cohort, patient_id, slide_id), buffer.getvalue())

    # -- attempts: which slide was in hand when a worker died --------------------------
    def attempts(self, run_id: str, slide_id: str) -> int:
        """How many times this run has started processing the slide (0 if never)."""
        path = self.path("_attempts", run_id, f"{slide_id}.json")
        return json.loads(self.fs.cat_file(path))["attempts"] if self.fs.exists(path) else 0

    def begin_attempt(self, run_id: str, slide_id: str, attempt: int, pid: int) -> None:
        """Record that a worker (process `pid`) starts processing the slide for the n-th time."""
        self._put_json(
            self.path("_attempts", run_id, f"{slide_id}.json"),
            {"attempts": attempt, "pid": pid, "started_at": now_iso()},
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
        """Rewrite manifest.parquet and failures.parquet from the per-slide records."""
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
        return manifest, failure_table


def _table(rows: list[dict], fields: dict[str, pa.DataType]) -> pa.Table:
    rows = sorted(
        rows,
        key=lambda r: (r.get("slide_id") or "", r.get("finished_at") or r.get("failed_at") or ""),
    )
    columns = {name: [r.get(name) for r in rows] for name in fields}
    return pa.table({name: pa.array(values, type=fields[name]) for name, values in columns.items()})

"""A compact record of what a release finds on the demo cohort, to compare releases against.

A change to the engine (how tiles are batched, where and how cells are measured) must leave a
run's cells and masks as they were. `python -m rbcbatch.dev.release_reference OUT.parquet`
synthesises `make demo`'s cohort, runs it with the default segmenter and classifier and writes
one row per object: slide and cell ids, kind, morphology class, every measurement of
CELL_MEASURES, the sha256 of the slide's level-0 mask, and the models' hash (so a comparison
knows whether the classes can be expected to agree).
`tests/test_release_reference.py` runs the current code on the same cohort and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rbcbatch.dev.synth import synth_cohort
from rbcbatch.measure.cells import CELL_MEASURES

# make demo's cohort (cli.dev.demo's defaults).
DEMO_PATIENTS, DEMO_FIELDS, DEMO_SEED = 12, 3, 7
REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "data" / "demo_reference.parquet"
KEYS = ("slide_id", "cell_id")


def demo_cohort(out: Path) -> Path:
    """`make demo`'s synthetic cohort written under `out`; returns its catalog."""
    return synth_cohort(out, DEMO_PATIENTS, DEMO_FIELDS, DEMO_SEED)


def mask_hashes(run_dir: Path) -> dict[str, str]:
    """slide_id -> sha256 of its level-0 label array (uint32, C order) in the run's masks."""
    import zarr

    from rbcbatch.store.masks import label_group_path

    root = zarr.open_group(str(run_dir / "masks.zarr"), mode="r")
    out = {}
    for slide_id in root.group_keys():
        labels = root[f"{label_group_path(root, slide_id)}/0"][:]
        out[slide_id] = hashlib.sha256(np.ascontiguousarray(labels, np.uint32)).hexdigest()
    return out


def run_fingerprint(run_dir: Path) -> pa.Table:
    """One row per object of a finished run, sorted by slide and cell: KEYS, kind, class,
    model_hash (segmenter and classifier weights), um_per_px, CELL_MEASURES and
    mask_sha256."""
    import duckdb

    columns = [c for c in CELL_MEASURES if c != "cell_id"]
    cells = str(run_dir / "cells" / "**" / "*.parquet").replace("'", "''")
    table = (
        duckdb.connect()
        .sql(
            'SELECT slide_id, cell_id, kind, "class", model_hash, um_per_px, '
            + ", ".join(columns)
            + f" FROM read_parquet('{cells}', union_by_name = true) ORDER BY slide_id, cell_id"
        )
        .to_arrow_table()
    )
    hashes = mask_hashes(run_dir)
    slides = table.column("slide_id").to_pylist()
    table = table.append_column("mask_sha256", pa.array([hashes[s] for s in slides]))
    return compact(table)


def compact(table: pa.Table) -> pa.Table:
    """float64 columns as float32 (the measurements are float32 rounding apart at best), so the
    record stays small in the repository."""
    schema = pa.schema(
        [f.with_type(pa.float32()) if f.type == pa.float64() else f for f in table.schema]
    )
    return table.cast(schema)


def build(out: Path, workdir: Path | None = None) -> pa.Table:
    """Run the demo cohort with the default models and write its fingerprint to `out`."""
    from rbcbatch.engine.run import run

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        catalog = demo_cohort(Path(tmp) / "cohort")
        summary = run(str(catalog), str(Path(tmp) / "run"))
        if summary.n_failed:
            raise RuntimeError(f"the demo cohort had failed slides: {summary.failed}")
        table = run_fingerprint(Path(tmp) / "run")
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out, compression="zstd")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=REFERENCE)
    args = parser.parse_args()
    table = build(args.out)
    print(f"{table.num_rows} objects of {len(set(table.column('slide_id').to_pylist()))} slides")


if __name__ == "__main__":
    main()

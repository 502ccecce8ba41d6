"""The contracts in schemas/, generated from the code that writes the data.

`schemas/*.json` are what users and other programs read; the code's Arrow schemas are what
rbcbatch writes. `check_schema_files` (and a test) hold the two together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from rbcbatch.analytics.grading import grading_schema
from rbcbatch.io.catalog import CBC_COLUMNS, OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from rbcbatch.jobs.specs import job_schema
from rbcbatch.store.schema import FAILURE_FIELDS, MANIFEST_FIELDS, cells_schema, schema_document


def _column_document(name: str) -> dict:
    column = {
        "name": name,
        "type": "double" if name == "um_per_px" or name in CBC_COLUMNS else "string",
        "required": name in REQUIRED_COLUMNS,
    }
    if name in CBC_COLUMNS:
        low, high, unit = CBC_COLUMNS[name]
        column["description"] = (
            f"CBC value in {unit} ({low:g}-{high:g}), optional; copied into the slide's commit "
            "record and averaged per patient as supporting evidence of the screening flags"
        )
    return column


def catalog_document() -> dict:
    return {
        "name": "catalog",
        "description": "One row per slide. CSV (with a header) or Parquet; relative uris are "
        "resolved against the catalog's folder.",
        "columns": [_column_document(c) for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS],
    }


def documents() -> dict[str, dict]:
    """File name in schemas/ → its expected content."""
    return {
        "catalog.schema.json": catalog_document(),
        "cells.schema.json": schema_document(cells_schema(), "cells"),
        "manifest.schema.json": schema_document(
            pa.schema(list(MANIFEST_FIELDS.items())), "manifest"
        ),
        "failures.schema.json": schema_document(
            pa.schema(list(FAILURE_FIELDS.items())), "failures"
        ),
        "job.schema.json": job_schema(),
        "grading.schema.json": grading_schema(),
    }


def check_schema_files(folder: Path, write: bool = False) -> list[str]:
    """Differences between the files in `folder` and the code; with write=True, fix them."""
    problems = []
    for name, expected in documents().items():
        path = folder / name
        text = json.dumps(expected, indent=2) + "\n"
        if write:
            path.write_text(text)
        elif not path.exists():
            problems.append(f"{path} is missing; run `rbcbatch schemas --write`")
        elif json.loads(path.read_text()) != expected:
            problems.append(
                f"{path} differs from the code's schema; run `rbcbatch schemas --write`"
            )
    return problems

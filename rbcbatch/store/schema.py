"""The tables a run writes: their Arrow schemas, the source of the JSON documents in schemas/.

Cells: provenance, then the measurements (`rbcbatch.measure.CELL_MEASURES`), then the calls and
the models that made them. Manifest: one row per slide (its commit record). Failures: one row
per slide or catalog row that failed.
"""

from __future__ import annotations

import pyarrow as pa

from rbcbatch.measure import CELL_MEASURES

PROVENANCE_FIELDS: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "cohort": pa.string(),
    "patient_id": pa.string(),
    "slide_id": pa.string(),
    "site": pa.string(),
    "scanner": pa.string(),
    "stain": pa.string(),
    "um_per_px": pa.float64(),
}
CALL_FIELDS: dict[str, pa.DataType] = {
    "kind": pa.string(),
    "class": pa.string(),
    # Learned classifiers only (null for the rules and for non-RBC objects): the chosen class's
    # probability, all probabilities in the classifier's class order (run.json lists it), and
    # the penultimate-layer embedding that shift analysis reads.
    "class_probability": pa.float32(),
    "probabilities": pa.list_(pa.float32()),
    "embedding": pa.list_(pa.float16()),
    "segmenter": pa.string(),
    "classifier": pa.string(),
    "model_hash": pa.string(),
    "config_hash": pa.string(),
    "code_version": pa.string(),
}

MANIFEST_FIELDS: dict[str, pa.DataType] = {
    "slide_id": pa.string(),
    "uri": pa.string(),
    "status": pa.string(),
    "cohort": pa.string(),
    "patient_id": pa.string(),
    "site": pa.string(),
    "scanner": pa.string(),
    "stain": pa.string(),
    "label": pa.string(),
    # CBC values from the catalog (optional; null where it gives none): haemoglobin and MCHC in
    # g/dL, RDW in %. The `patients` view uses them as supporting evidence of its flags.
    "hb_g_dl": pa.float64(),
    "mchc_g_dl": pa.float64(),
    "rdw_pct": pa.float64(),
    "um_per_px": pa.float64(),
    "um_per_px_source": pa.string(),  # "catalog", "file" (the slide's own), or "estimated"
    # Cells the estimate rests on: its site and scanner group's (engine.calibration), or a
    # whole-slide image's own; 0 when from the catalog or the file.
    "calibration_cells": pa.int64(),
    "width": pa.int64(),
    "height": pa.int64(),
    "n_objects": pa.int64(),
    "n_rbc": pa.int64(),
    "run_id": pa.string(),
    "config_hash": pa.string(),
    "model_hash": pa.string(),
    "code_version": pa.string(),
    "read_s": pa.float64(),
    "segment_s": pa.float64(),
    "measure_s": pa.float64(),
    "write_s": pa.float64(),
    # Peak resident memory of the worker process up to this slide's commit (ru_maxrss).
    "peak_rss_mb": pa.float64(),
    "finished_at": pa.string(),
}

FAILURE_FIELDS: dict[str, pa.DataType] = {
    "slide_id": pa.string(),
    "uri": pa.string(),
    "stage": pa.string(),
    "error_type": pa.string(),
    "message": pa.string(),
    "run_id": pa.string(),
    "failed_at": pa.string(),
}


def cells_schema() -> pa.Schema:
    """The cells Parquet schema: provenance, then measurements, then the calls and models."""
    fields = {**PROVENANCE_FIELDS, **CELL_MEASURES, **CALL_FIELDS}
    return pa.schema([pa.field(name, dtype) for name, dtype in fields.items()])


def schema_document(schema: pa.Schema, name: str) -> dict:
    """A JSON-able description of an Arrow schema, the form kept in schemas/."""
    return {
        "name": name,
        "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
    }

"""The slide catalog: which slides belong to the cohort, whose they are, and their pixel size.

A catalog is a CSV or Parquet table, local or on object storage. Rows that cannot be processed
safely (unsafe or duplicate slide ids, missing pixel size) become failures here, before any
work starts; the rest become `SlideSpec`s. Its contract is `schemas/catalog.schema.json`.

Optional CBC columns (CBC_COLUMNS: hb_g_dl, mchc_g_dl, rdw_pct) travel with the slide into its
commit record and the `patients` view, where they support the screening flags.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from rbcbatch.errors import CatalogError, Failure

REQUIRED_COLUMNS = ("slide_id", "uri", "patient_id", "site", "um_per_px")
# Optional CBC values of the slide's patient (usually the same on each of its slides), with the
# range a value must lie in: outside it the unit is wrong (Hb or MCHC in g/L, not g/dL) or the
# value is a typo. Name -> (lowest, highest, unit).
CBC_COLUMNS: dict[str, tuple[float, float, str]] = {
    "hb_g_dl": (1.0, 25.0, "g/dL"),  # haemoglobin
    "mchc_g_dl": (20.0, 50.0, "g/dL"),  # mean corpuscular haemoglobin concentration
    "rdw_pct": (5.0, 50.0, "%"),  # red-cell distribution width (CV)
}
OPTIONAL_COLUMNS = ("cohort", "scanner", "stain", "label", *CBC_COLUMNS)

# Names used as folder and Zarr group names: no separators, no leading dot, no "..".
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# Pixel sizes outside this range are typos (a 100x oil objective gives ~0.1 µm/px; a 4x scan ~2.5).
UM_PER_PX_RANGE = (0.01, 10.0)


@dataclass(frozen=True)
class SlideSpec:
    """One catalog row that passed validation; `uri` is absolute (a path or a URL)."""

    slide_id: str
    uri: str
    patient_id: str
    site: str
    um_per_px: float | None  # None: not in the catalog, estimated from the cells at run time
    cohort: str = "default"
    scanner: str = ""
    stain: str = ""
    label: str = ""
    hb_g_dl: float | None = None  # CBC values from the catalog, None where it gives none
    mchc_g_dl: float | None = None
    rdw_pct: float | None = None
    row: int = 0
    # Where um_per_px came from when the run filled it in (engine.calibration: "estimated" from
    # the isolated cells of the slide's site and scanner) and how many cells that rests on;
    # empty and 0 for a pixel size from the catalog.
    um_per_px_source: str = ""
    calibration_cells: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Catalog:
    slides: list[SlideSpec]
    rejected: list[Failure]


def is_safe_name(name: str) -> bool:
    """True when `name` can be used as a single path component on any store."""
    return bool(_SAFE_NAME.match(name)) and ".." not in name


def resolve_uri(uri: str, catalog_uri: str) -> str:
    """Make a catalog-relative path absolute, so catalogs can travel with their images."""
    if "://" in uri or uri.startswith("/"):
        return uri
    if "://" in catalog_uri:
        return f"{catalog_uri.rsplit('/', 1)[0]}/{uri}"
    return os.path.join(os.path.dirname(os.path.abspath(catalog_uri)), uri)


def read_catalog_rows(uri: str, storage_options: dict | None = None) -> list[dict]:
    """Read the catalog (CSV or Parquet, told apart by content) as rows of raw values."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            data = f.read()
    except FileNotFoundError as e:
        raise CatalogError(f"catalog not found: {uri}") from e
    except OSError as e:
        raise CatalogError(f"cannot read catalog {uri}: {e}") from e
    if data[:4] == b"PAR1":
        try:
            table = pq.read_table(pa.BufferReader(data))
        except pa.ArrowException as e:
            raise CatalogError(f"catalog {uri} is not valid Parquet: {e}") from e
        header, rows = table.column_names, table.to_pylist()
    else:
        try:
            reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
            header, rows = list(reader.fieldnames or []), list(reader)
        except (UnicodeDecodeError, csv.Error) as e:
            raise CatalogError(f"catalog {uri} is neither Parquet nor UTF-8 CSV: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CatalogError(
            f"catalog {uri} lacks required column(s) {missing}; "
            f"required: {list(REQUIRED_COLUMNS)}, optional: {list(OPTIONAL_COLUMNS)}"
        )
    return rows


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value).strip()


def _row_problem(row: dict, seen: dict[str, int]) -> str | None:
    """Why this row cannot be processed, or None when it can."""
    slide_id = row["slide_id"]
    if not slide_id:
        return "slide_id is empty"
    if not is_safe_name(slide_id):
        return (
            f"slide_id {slide_id!r} is not a safe name: use letters, digits, '.', '_' or '-' "
            "(at most 128, no leading dot, no '..')"
        )
    if slide_id in seen:
        return f"slide_id {slide_id!r} is a duplicate of catalog row {seen[slide_id]}"
    if not row["uri"]:
        return "uri is empty"
    if not row["patient_id"] or not is_safe_name(row["patient_id"]):
        return f"patient_id {row['patient_id']!r} is empty or not a safe name"
    if row["cohort"] and not is_safe_name(row["cohort"]):
        return f"cohort {row['cohort']!r} is not a safe name"
    cbc = _cbc_problem(row)
    if cbc:
        return cbc
    if not row["um_per_px"]:
        return None  # unknown: the pipeline estimates it from the cells and says so
    try:
        um = float(row["um_per_px"])
    except ValueError:
        return f"um_per_px {row['um_per_px']!r} is not a number"
    if not (UM_PER_PX_RANGE[0] <= um <= UM_PER_PX_RANGE[1]):
        return (
            f"um_per_px {row['um_per_px']!r} is outside "
            f"{UM_PER_PX_RANGE[0]}–{UM_PER_PX_RANGE[1]} µm/px"
        )
    return None


def _cbc_problem(row: dict) -> str | None:
    """Why a CBC value of this row cannot be used, or None (empty values are allowed)."""
    for name, (low, high, unit) in CBC_COLUMNS.items():
        if not row[name]:
            continue
        try:
            value = float(row[name])
        except ValueError:
            return f"{name} {row[name]!r} is not a number"
        if not low <= value <= high:
            return f"{name} {row[name]!r} is outside {low:g}–{high:g} {unit}; give it in {unit}"
    return None


def load_catalog(
    uri: str,
    storage_options: dict | None = None,
    transform: Callable[[dict], dict] | None = None,
) -> Catalog:
    """Validate every row; good rows become SlideSpecs, bad rows become catalog failures.

    transform: applied to each row's text values before they are checked (de-identification
    replaces ids there, so that nothing after it sees them).
    """
    columns = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    slides: list[SlideSpec] = []
    rejected: list[Failure] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(read_catalog_rows(uri, storage_options), start=1):
        row = {c: _text(raw.get(c)) for c in columns}
        if transform is not None:
            row = transform(row)
        problem = _row_problem(row, seen)
        if problem:
            rejected.append(
                Failure(row["slide_id"], row["uri"], "catalog", "CatalogRowError", problem)
            )
            continue
        seen[row["slide_id"]] = index
        slides.append(
            SlideSpec(
                slide_id=row["slide_id"],
                uri=resolve_uri(row["uri"], uri),
                patient_id=row["patient_id"],
                site=row["site"],
                um_per_px=float(row["um_per_px"]) if row["um_per_px"] else None,
                cohort=row["cohort"] or "default",
                scanner=row["scanner"],
                stain=row["stain"],
                label=row["label"],
                **{c: float(row[c]) if row[c] else None for c in CBC_COLUMNS},
                row=index,
            )
        )
    return Catalog(slides, rejected)

"""The HTML report people read: one self-contained file per run (`rbcbatch report --html`).

Everything is inline (CSS in a <style> block, plots and cell crops as base64 PNG data URIs, no
scripts, no external URLs), so the file can be mailed, archived or opened offline, and it shows
only what the run holds: the `patients` view, per-patient diameter histograms and class mix,
example cells of each class cut from the slides and outlined from the run's masks, agreement
with truth where it exists, the dataset-shift map where `rbcbatch.analytics.shift` and embeddings exist,
and the run's provenance. `screenshot` renders the file in headless Chromium, as a reader sees it.
Cell crops and the truth matching live in `rbcbatch.report.cells`; the page's layout in
templates/report.html (Jinja2, autoescaped).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import duckdb
import numpy as np

from rbcbatch import __version__
from rbcbatch.analytics import ScreeningRules, connect
from rbcbatch.errors import RbcbatchError
from rbcbatch.io.storage import explains_storage_errors, resolve_options
from rbcbatch.report.cells import (
    CROP_PX,
    CROP_UM,
    CROPS_PER_CLASS,
    cell_confusion,
    check_truth_dir,
    crop_gallery,
    example_cells,
    find_truth_dir,
    ordered_classes,
)
from rbcbatch.store.run_store import RunStore

# Small multiples: patients per figure (4 columns x 6 rows fits a screen); the first figure is
# open, the others fold away, and past MAX_PANEL_PATIENTS the report says how many it left out.
PANELS_PER_PAGE = 24
PANEL_COLUMNS = 4
MAX_PANEL_PATIENTS = 240
# Diameter histogram range and bin width (µm). Red cells are 6-9 µm; 2-12 µm holds fragments
# and macrocytes. Values outside fall into the end bins.
HIST_RANGE_UM = (2.0, 12.0)
HIST_BIN_UM = 0.25

CLASS_COLOURS = {
    "normal": "#c9c9c9",
    "spherocyte": "#d62728",
    "elliptocyte": "#ff7f0e",
    "target": "#2ca02c",
    "schistocyte": "#8c564b",
    "microcyte": "#1f77b4",
    "macrocyte": "#9467bd",
    "hypochromic": "#9ecae1",
    "stomatocyte": "#e377c2",
    "ovalocyte": "#fdd0a2",
    "teardrop": "#17becf",
    "burr": "#bcbd22",
    "other": "#636363",
    "wbc": "#54278f",
    "platelet": "#fd8d3c",
}
FLAG_CSS = {"positive": "pos", "negative": "neg", "insufficient": "ins"}


# -- reading the run ---------------------------------------------------------------------------
def patient_rows(con: duckdb.DuckDBPyConnection) -> tuple[list[str], list[dict]]:
    """The `patients` view as it is: its column names and its rows (whatever columns it has)."""
    table = con.sql("SELECT * FROM patients").to_arrow_table()
    return table.column_names, table.to_pylist()


def diameter_counts(
    con: duckdb.DuckDBPyConnection,
    bounds: tuple[float, float] = HIST_RANGE_UM,
    bin_um: float = HIST_BIN_UM,
) -> dict[tuple[str, str], np.ndarray]:
    """{(cohort, patient_id): counts per diameter bin} of red cells not cut by the image edge
    (the cells the `patients` view counts). Counted in DuckDB: no cell rows are held here."""
    n_bins = int(round((bounds[1] - bounds[0]) / bin_um))
    rows = con.execute(
        """SELECT cohort, patient_id,
                  least(greatest(floor((diameter_um - $lo) / $w), 0), $n - 1)::INT AS bin,
                  count(*) AS n
           FROM cells WHERE kind = 'rbc' AND NOT touches_edge GROUP BY ALL""",
        {"lo": bounds[0], "w": bin_um, "n": n_bins},
    ).fetchall()
    counts: dict[tuple[str, str], np.ndarray] = {}
    for cohort, patient_id, index, n in rows:
        counts.setdefault((cohort, patient_id), np.zeros(n_bins, dtype=np.int64))[index] += n
    return counts


def class_mix(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], dict[str, int]]:
    """{(cohort, patient_id): {class: red cells}} over red cells not cut by the image edge."""
    rows = con.execute(
        """SELECT cohort, patient_id, class, count(*) FROM cells
           WHERE kind = 'rbc' AND NOT touches_edge GROUP BY ALL"""
    ).fetchall()
    mix: dict[tuple[str, str], dict[str, int]] = {}
    for cohort, patient_id, cls, n in rows:
        mix.setdefault((cohort, patient_id), {})[cls] = int(n)
    return mix


# -- the patient table -------------------------------------------------------------------------
def format_value(name: str, value) -> str:
    """How a patients-view value is shown: percentages to 0.1, µm to 0.01, other floats to 3
    significant digits (1.00, 0.0693); missing values as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if name.endswith("_pct"):
            return f"{value:.1f}"
        if name.endswith("_um") or "_um_" in name:
            return f"{value:.2f}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:#.3g}".rstrip(".")  # 3 significant digits, trailing zeros kept
    return str(value)


def interval_columns(columns: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{base column: (its _lo column, its _hi column)} for every base that has both."""
    present = set(columns)
    return {
        c: (f"{c}_lo", f"{c}_hi") for c in columns if f"{c}_lo" in present and f"{c}_hi" in present
    }


IDENTITY_COLUMNS = ("cohort", "patient_id", "site", "label", "n_slides", "n_rbc")


def arrange_columns(columns: Sequence[str]) -> list[str]:
    """Columns in reading order: who the patient is, then each flag with the columns named
    after it (hs_flag, hs_rule, hs_evidence, ...), indicators, grades, counts, the rest; the
    view's order within each group."""
    flag_prefixes = tuple(c.removesuffix("flag") for c in columns if c.endswith("_flag"))

    def group(name: str) -> tuple[int, int]:
        if name in IDENTITY_COLUMNS:
            return 0, IDENTITY_COLUMNS.index(name)
        if flag_prefixes and name.startswith(flag_prefixes):
            return 1, next(i for i, p in enumerate(flag_prefixes) if name.startswith(p))
        if name.endswith(("_pct", "_um", "_g_dl")):
            return 2, 0
        if name.endswith("_grade"):
            return 3, 0
        return (4, 0) if name.startswith("n_") else (5, 0)

    return sorted(columns, key=group)  # stable: the view's order within a group


def constant_columns(columns: Sequence[str], rows: list[dict]) -> list[str]:
    """Columns that say the same for every patient and are not numbers (a rule's text, a
    grading scheme, a measure nobody supplied): shown once under the table, not in each row.
    Needs two patients or more; identity columns always stay."""
    if len(rows) < 2:
        return []

    def says_the_same(name: str) -> bool:
        values = [r.get(name) for r in rows]
        if name in IDENTITY_COLUMNS:
            return False
        if all(v is None for v in values):
            return True
        return len({repr(v) for v in values}) == 1 and not isinstance(values[0], int | float)

    return [c for c in columns if says_the_same(c)]


def exact(value) -> str:
    """A value as the file keeps it for programs: floats in full (repr), None as ''."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def json_object(value) -> dict | None:
    """The dict a JSON-object string holds (a flag's evidence), else None."""
    if not isinstance(value, str) or not value.startswith("{"):
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def table_cells(
    columns: Sequence[str], rows: list[dict]
) -> tuple[list[str], list[list[dict]], list[dict]]:
    """Header, cells and constant columns of the patient table.

    Every view column appears once: in the table (in `arrange_columns` order) with its
    confidence interval beside it when the view has `<column>_lo` and `<column>_hi`, or, when
    it says the same for every patient, once in the list under the table. JSON objects (a
    flag's evidence) fold into a details element. Each cell keeps the exact value."""
    intervals = interval_columns(columns)
    hidden = {c for pair in intervals.values() for c in pair}
    constant = set(constant_columns([c for c in columns if c not in hidden], rows))
    shown = [c for c in arrange_columns(columns) if c not in hidden and c not in constant]
    body = []
    for row in rows:
        cells = []
        for name in shown:
            value = row.get(name)
            cell = {
                "name": name,
                "text": format_value(name, value),
                "value": exact(value),
                "numeric": isinstance(value, int | float) and not isinstance(value, bool),
                "css": FLAG_CSS.get(value, "") if name.endswith("_flag") else "",
            }
            details = json_object(value)
            if details is not None:
                cell["summary"] = "evidence"
                cell["json"] = json.dumps(details, indent=1)
            if name in intervals:
                lo, hi = (row.get(c) for c in intervals[name])
                if lo is not None and hi is not None:
                    cell["interval"] = f"{format_value(name, lo)}–{format_value(name, hi)}"
                    cell["lo"], cell["hi"] = repr(lo), repr(hi)
            cells.append(cell)
        body.append(cells)
    same = [
        {"name": c, "text": format_value(c, rows[0].get(c)), "value": exact(rows[0].get(c))}
        for c in columns
        if c in constant
    ]
    return shown, body, same


# -- plots -------------------------------------------------------------------------------------
def figure_png(fig) -> bytes:
    """A matplotlib Figure as PNG bytes (no tool name or URL in the file's metadata)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def patient_title(row: dict, several_cohorts: bool) -> str:
    name = f"{row['cohort']}/{row['patient_id']}" if several_cohorts else str(row["patient_id"])
    return f"{name} · {row.get('site') or '?'}" + (f" · {row['label']}" if row.get("label") else "")


def positive_flags(row: dict) -> list[str]:
    return [
        c.removesuffix("_flag").upper()
        for c, v in row.items()
        if c.endswith("_flag") and v == "positive"
    ]


def small_multiples_png(
    patients: list[dict],
    counts: dict[tuple[str, str], np.ndarray],
    mix: dict[tuple[str, str], dict[str, int]],
    classes: list[str],
    several_cohorts: bool = False,
) -> bytes:
    """One figure of per-patient panels: diameter histogram (% of the patient's red cells per
    bin, same axes for all) over a 100% bar of the class mix."""
    from matplotlib.figure import Figure

    lo, hi = HIST_RANGE_UM
    n_rows = math.ceil(len(patients) / PANEL_COLUMNS)
    fig = Figure(figsize=(12.4, 0.7 + 2.25 * n_rows))
    grid = fig.add_gridspec(
        2 * n_rows,
        PANEL_COLUMNS,
        height_ratios=[5, 1] * n_rows,
        hspace=0.25,
        wspace=0.18,
        left=0.04,
        right=0.99,
        top=1 - 0.55 / fig.get_figheight(),
        bottom=0.35 / fig.get_figheight(),
    )
    edges = np.arange(lo, hi + HIST_BIN_UM / 2, HIST_BIN_UM)
    ymax = max([100.0 * c.max() / c.sum() for c in counts.values() if c.sum()] + [1.0])
    for index, row in enumerate(patients):
        key = (row["cohort"], row["patient_id"])
        r, c = divmod(index, PANEL_COLUMNS)
        ax = fig.add_subplot(grid[2 * r, c])
        hist = counts.get(key, np.zeros(len(edges) - 1))
        total = hist.sum()
        share = 100.0 * hist / total if total else hist
        ax.stairs(share, edges, fill=True, color="#8fa8c8", edgecolor="#3b5b85", linewidth=0.8)
        mean = row.get("diameter_mean_um")
        if mean is not None:
            ax.axvline(mean, color="#222", linewidth=0.9, linestyle="--")
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, ymax * 1.1)
        ax.tick_params(labelsize=7, length=2, pad=1)
        if r < n_rows - 1 or index + PANEL_COLUMNS < len(patients):
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("diameter (µm)", fontsize=7, labelpad=1)
        flags = positive_flags(row)
        ax.set_title(
            patient_title(row, several_cohorts)
            + ("   " + " ".join(f"{f}+" for f in flags) if flags else ""),
            fontsize=8,
            loc="left",
            pad=2,
            color="#b00020" if flags else "#222",
        )
        mean_text = f", mean {mean:.2f} µm" if mean is not None else ""
        ax.text(
            0.98,
            0.92,
            f"n={int(total)}{mean_text}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            color="#444",
        )
        bar = fig.add_subplot(grid[2 * r + 1, c])
        left = 0.0
        patient_mix = mix.get(key, {})
        n_mix = sum(patient_mix.values())
        for cls in classes:
            width = 100.0 * patient_mix.get(cls, 0) / n_mix if n_mix else 0.0
            if width:
                bar.barh(0, width, left=left, color=CLASS_COLOURS.get(cls, "#999"), height=1.0)
                left += width
        bar.set_xlim(0, 100)
        bar.set_ylim(-0.5, 0.5)
        bar.set_axis_off()
    handles = [_patch(cls) for cls in classes]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=min(len(classes), 8),
        fontsize=7.5,
        frameon=False,
        bbox_to_anchor=(0.5, 1.0),
        handlelength=1.2,
        columnspacing=1.0,
    )
    return figure_png(fig)


def _patch(cls: str):
    from matplotlib.patches import Patch

    return Patch(color=CLASS_COLOURS.get(cls, "#999"), label=cls)


def confusion_png(matrix: np.ndarray, truth_classes: list[str], called_classes: list[str]) -> bytes:
    """Heatmap of a truth x call count matrix, coloured by row share, each cell's count printed."""
    from matplotlib.figure import Figure

    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    fig = Figure(figsize=(1.6 + 0.62 * len(called_classes), 1.2 + 0.42 * len(truth_classes)))
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), n in np.ndenumerate(matrix):
        if n:
            ax.text(
                j,
                i,
                str(n),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.6 else "#222",
            )
    ax.set_xticks(range(len(called_classes)), called_classes, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(truth_classes)), truth_classes, fontsize=8)
    ax.set_xlabel("called", fontsize=8)
    ax.set_ylabel("truth", fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


# -- agreement with truth ----------------------------------------------------------------------
def flag_table(rows: list[dict], columns: Sequence[str]) -> dict | None:
    """Patients per catalog label and flag value, for every *_flag column; None when no patient
    has a label. {"flags": [(flag, [values])], "rows": [(label, [counts])]}"""
    labelled = [r for r in rows if r.get("label")]
    if not labelled:
        return None
    flags = [c for c in columns if c.endswith("_flag")]
    values = {
        f: [v for v in ("positive", "negative", "insufficient") if any(r[f] == v for r in rows)]
        + sorted({str(r[f]) for r in rows} - {"positive", "negative", "insufficient"})
        for f in flags
    }
    table = []
    for label in sorted({r["label"] for r in labelled}):
        group = [r for r in labelled if r["label"] == label]
        table.append(
            (
                label,
                len(group),
                [sum(str(r[f]) == v for r in group) for f in flags for v in values[f]],
            )
        )
    return {
        "flags": [(f, values[f]) for f in flags],
        "rows": table,
        "unlabelled": len(rows) - len(labelled),
    }


# -- dataset shift -----------------------------------------------------------------------------
def shift_section(
    run_dir: str, n_embedded: int, storage_options: dict | None, shift_options: dict | None = None
) -> dict:
    """The dataset-shift map and scores per site, or a one-line note saying why there are none.
    shift_options: more keyword arguments of rbcbatch.analytics.shift.shift_analysis (e.g. settings)."""
    if n_embedded == 0:
        return {
            "note": "No dataset-shift map: this run's cells carry no embeddings "
            "(run with --classifier resnet to get them)."
        }
    try:
        from rbcbatch.analytics.shift import shift_analysis, shift_map_png
    except ImportError as e:
        return {
            "note": f"No dataset-shift map: rbcbatch.analytics.shift is not available here ({e})."
        }
    try:
        result = shift_analysis(
            run_dir, by="site", storage_options=storage_options, **(shift_options or {})
        )
    except RbcbatchError as e:  # too few cells or a single site: the analysis says which
        return {"note": f"No dataset-shift map: {e}"}
    scores = result.scores
    return {
        "by": result.by,
        "reference": result.reference,
        "columns": list(scores.columns),
        "rows": [
            [format_value(c, v.item() if hasattr(v, "item") else v) for c, v in row.items()]
            for row in scores.to_dict("records")
        ],
        "map": data_uri(without_metadata(shift_map_png(result))),
    }


def without_metadata(png: bytes) -> bytes:
    """The same picture re-encoded with no text chunks (a plotting library's name and URL)."""
    pixels = cv2.imdecode(np.frombuffer(png, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError("not a PNG image")
    ok, buffer = cv2.imencode(".png", pixels)
    return buffer.tobytes()


# -- provenance --------------------------------------------------------------------------------
def model_line(description: dict) -> str:
    """'name (weights file, sha256 abc…)' or 'name version v' from a model's config()."""
    name = description.get("name", "?")
    if description.get("sha256"):
        return f"{name} ({description.get('weights', '?')}, sha256 {description['sha256'][:16]})"
    return f"{name}" + (f" version {description['version']}" if description.get("version") else "")


def provenance(con: duckdb.DuckDBPyConnection, store: RunStore, rules: ScreeningRules) -> dict:
    """Run ids, models, hashes, code version and dates, from run.json and the commit records."""
    run_json = json.loads(store.fs.cat_file(store.path("run.json")))
    config = run_json.get("config", {})
    runs = (
        con.sql(
            """SELECT run_id, count(*) AS slides, min(finished_at) AS first, max(finished_at) AS last,
                  string_agg(DISTINCT model_hash, ', ') AS model_hash,
                  string_agg(DISTINCT config_hash, ', ') AS config_hash,
                  string_agg(DISTINCT code_version, ', ') AS code_version
           FROM slides GROUP BY run_id ORDER BY first"""
        )
        .to_arrow_table()
        .to_pylist()
    )
    failures = 0
    if store.fs.exists(store.path("failures.parquet")):
        import pyarrow.parquet as pq

        with store.fs.open(store.path("failures.parquet"), "rb") as f:
            failures = pq.read_metadata(f).num_rows
    return {
        "run_folder": store.url,
        "config_hash": run_json.get("config_hash", "?"),
        "created_at": run_json.get("created_at", "?"),
        "segmenter": model_line(config.get("segmenter", {})),
        "classifier": model_line(config.get("classifier", {})),
        "runs": runs,
        "failures": failures,
        "rules": rules.to_dict(),
        "made_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "version": __version__,
    }


# -- the report --------------------------------------------------------------------------------
def pages(items: Sequence, size: int) -> list[tuple[int, int, Sequence]]:
    """[(first, last, items)] in chunks of `size`, 1-based and inclusive for people."""
    return [
        (i + 1, min(i + size, len(items)), items[i : i + size]) for i in range(0, len(items), size)
    ]


@explains_storage_errors("run_dir")
def build_report(
    run_dir: str,
    rules: ScreeningRules | None = None,
    truth_dir: str | Path | None = None,
    storage_options: dict | None = None,
    shift_options: dict | None = None,
    grading: str | None = None,
) -> str:
    """The report of a run folder as one HTML document (a string).

    truth_dir: folder with truth.parquet and truth_masks/ for the cell-level confusion matrix;
    None looks beside the slides' catalog (a synthetic cohort), and finding none leaves it out.
    shift_options: keyword arguments for rbcbatch.analytics.shift.shift_analysis beyond the run and `by`.
    grading: the grading scheme of the *_grade columns (see rbcbatch.analytics.connect).
    """
    import jinja2
    import markupsafe

    rules = rules or ScreeningRules()
    options = resolve_options(storage_options, run_dir)
    truth = check_truth_dir(Path(truth_dir)) if truth_dir is not None else None
    con = connect(run_dir, rules, storage_options, grading)
    store = RunStore(run_dir, options)
    try:
        columns, rows = patient_rows(con)
        several_cohorts = len({r["cohort"] for r in rows}) > 1
        counts, mix = diameter_counts(con), class_mix(con)
        classes = ordered_classes(c for m in mix.values() for c in m)
        shown = rows[:MAX_PANEL_PATIENTS]
        panel_pages = [
            {
                "first": a,
                "last": b,
                "uri": data_uri(
                    small_multiples_png(list(chunk), counts, mix, classes, several_cohorts)
                ),
            }
            for a, b, chunk in pages(shown, PANELS_PER_PAGE)
        ]
        header, body, same = table_cells(columns, rows)
        gallery, crop_notes = crop_gallery(store, example_cells(con), options)
        for group in gallery:
            for crop in group["crops"]:
                crop["uri"] = data_uri(crop.pop("png"))
        truth_source = "given with --truth"
        if truth is None:
            truth = find_truth_dir(u for (u,) in con.execute("SELECT uri FROM slides").fetchall())
            truth_source = "found beside the catalog"
        confusion = cell_confusion(con, store, truth) if truth is not None else None
        n_embedded = con.execute(
            "SELECT count(*) FROM cells WHERE embedding IS NOT NULL"
        ).fetchall()[0][0]
        totals = con.execute(
            """SELECT (SELECT count(*) FROM slides), (SELECT count(*) FROM cells WHERE kind = 'rbc'),
                      (SELECT count(*) FROM cells)"""
        ).fetchall()[0]
        context = {
            "title": f"rbcbatch report · {store.url.rsplit('/', 1)[-1]}",
            "n_patients": len(rows),
            "n_slides": totals[0],
            "n_rbc": totals[1],
            "n_objects": totals[2],
            "header": header,
            "body": body,
            "same": same,
            "flag_counts": [
                (c, sum(r[c] == "positive" for r in rows)) for c in columns if c.endswith("_flag")
            ],
            "has_intervals": bool(interval_columns(columns)),
            "panel_pages": panel_pages,
            "panels_left_out": len(rows) - len(shown),
            "hist": {"lo": HIST_RANGE_UM[0], "hi": HIST_RANGE_UM[1], "bin": HIST_BIN_UM},
            "gallery": gallery,
            "crop_notes": crop_notes,
            "crop_um": CROP_UM,
            "crop_px": CROP_PX,
            "crops_per_class": CROPS_PER_CLASS,
            "colours": CLASS_COLOURS,
            "flags": flag_table(rows, columns),
            "confusion": confusion,
            "confusion_uri": (
                data_uri(
                    confusion_png(
                        confusion.matrix, confusion.truth_classes, confusion.called_classes
                    )
                )
                if confusion is not None and confusion.matched
                else None
            ),
            "truth_dir": str(truth) if truth is not None else None,
            "truth_source": truth_source,
            "shift": shift_section(run_dir, n_embedded, storage_options, shift_options),
            "prov": provenance(con, store, rules),
        }
    finally:
        con.close()
    env = jinja2.Environment(autoescape=True)
    env.filters["wbr"] = lambda name: markupsafe.Markup(html.escape(name).replace("_", "_<wbr>"))
    template = (Path(__file__).parent / "templates" / "report.html").read_text(encoding="utf-8")
    return env.from_string(template).render(**context)


def write_report(
    run_dir: str,
    out: str | Path,
    rules: ScreeningRules | None = None,
    truth_dir: str | Path | None = None,
    storage_options: dict | None = None,
    grading: str | None = None,
) -> Path:
    """Write the report of a run folder to `out` (HTML); returns its path."""
    document = build_report(run_dir, rules, truth_dir, storage_options, grading=grading)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out


# -- looking at it -----------------------------------------------------------------------------
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium-family browser, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    width: int = 1280,
    height: int = 2400,
    chromium: str | None = None,
    timeout_s: float = 120.0,
) -> Path:
    """Render an HTML file in headless Chromium and save the top `width` x `height` pixels as PNG.

    The browser gets a throw-away profile and no network features (sync, updates, QUIC), so the
    picture shows only what the file itself holds.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(
            "no Chromium found; install it (Debian: apt-get install -y chromium) to render reports"
        )
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rbcbatch-chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png_path}",
            html_path.as_uri(),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not png_path.is_file():
        raise RuntimeError(
            f"Chromium could not render {html_path} (exit {done.returncode}): {done.stderr[-800:]}"
        )
    return png_path

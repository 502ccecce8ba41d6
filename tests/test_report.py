"""The HTML report: it shows the patients view's own numbers, holds nothing from outside the
file, every picture in it is a PNG, its confusion matrices agree with the synthetic truth, and
a real browser renders it as a page."""

from __future__ import annotations

import base64
import importlib.util
import io
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from rbcbatch.analytics import connect
from rbcbatch.cli import app
from rbcbatch.report.cells import (
    CROP_PX,
    CROPS_PER_CLASS,
    OUTLINE_RGB,
    crop_box,
    outlined_crop,
    padded_window,
)
from rbcbatch.report.html import (
    build_report,
    find_chromium,
    format_value,
    pages,
    screenshot,
    shift_section,
    table_cells,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReportPage(HTMLParser):
    """What a test needs from the report: the patient table's cells, every element's URL-like
    attributes, the images, and the tags used."""

    def __init__(self, document: str):
        super().__init__()
        self.tags: set[str] = set()
        self.links: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.images: list[dict] = []
        self.patient_rows: list[dict[str, dict]] = []
        self.same_for_all: dict[str, str] = {}  # column: exact value
        self.flag_rows: list[list[str]] = []
        self._table: str | None = None
        self._cell: dict | None = None
        self._row: list[str] | None = None
        self.feed(document)
        self.patient_rows = [row for row in self.patient_rows if row]  # the header row has none

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        for name in ("src", "href", "action", "poster", "srcset"):
            if name in attrs:
                self.links.append((tag, name, attrs[name]))
        if tag == "img":
            self.images.append(attrs)
        if tag == "table":
            self._table = attrs.get("id")
        elif tag == "tr" and self._table == "patient-table":
            self.patient_rows.append({})
        elif tag == "tr" and self._table == "flag-table":
            self._row = []
        elif tag == "td" and self._table == "patient-table" and "data-col" in attrs:
            self._cell = {**attrs, "text": ""}
            self.patient_rows[-1][attrs["data-col"]] = self._cell
        elif tag == "dd" and "data-col" in attrs:
            self.same_for_all[attrs["data-col"]] = attrs["data-value"]
        elif tag == "td" and self._row is not None:
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.flag_rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None and "text" in self._cell:
            self._cell["text"] += data
        if self._row:
            self._row[-1] += data


def png_of(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,"), uri[:40]
    data = base64.b64decode(uri.split(",", 1)[1], validate=True)
    assert data[:8] == PNG_SIGNATURE
    Image.open(io.BytesIO(data)).verify()
    return Image.open(io.BytesIO(data))


def quick_shift_options() -> dict | None:
    """A smaller t-SNE map and fewer permutations than the report's defaults: same code, less
    time (the shift analysis has its own tests)."""
    if importlib.util.find_spec("rbcbatch.analytics.shift") is None:
        return None
    from rbcbatch.analytics.shift import ShiftSettings

    return {"settings": ShiftSettings(map_cells=300, n_permutations=20)}


@pytest.fixture(scope="module")
def report_html(tiny_resnet_run) -> str:
    return build_report(str(tiny_resnet_run), shift_options=quick_shift_options())


@pytest.fixture(scope="module")
def page(report_html) -> ReportPage:
    return ReportPage(report_html)


def view_rows(run_dir) -> list[dict]:
    con = connect(str(run_dir))
    try:
        return con.sql("SELECT * FROM patients").to_arrow_table().to_pylist()
    finally:
        con.close()


def exact(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


@pytest.mark.slow
def test_patient_table_shows_the_views_values(tiny_resnet_run, page):
    rows = view_rows(tiny_resnet_run)
    assert [r["patient_id"]["data-value"] for r in page.patient_rows] == ["P001", "P002", "P003"]
    assert [r["patient_id"] for r in rows] == ["P001", "P002", "P003"]
    for shown, row in zip(page.patient_rows, rows, strict=True):
        assert row["n_rbc"] > 100  # a real run, not an empty table
        for name, value in row.items():
            base = name.removesuffix("_lo").removesuffix("_hi")
            if name in shown:
                cell = shown[name]
                if isinstance(value, float):  # DuckDB's parallel sums vary in the last bit
                    assert float(cell["data-value"]) == pytest.approx(value, rel=1e-12), name
                else:
                    assert cell["data-value"] == exact(value), name
                text = cell["text"].strip()
                if value is None:
                    assert text == "–"
                elif isinstance(value, float):
                    assert text.startswith(format_value(name, value)), name
                elif not str(value).startswith("{"):  # JSON evidence folds into details
                    assert text == str(value)
            elif base != name and base in shown:  # an interval shown beside its value
                assert float(shown[base]["data-" + name[-2:]]) == pytest.approx(value, rel=1e-12)
            else:  # said once under the table: the same for every patient
                assert page.same_for_all[name] == exact(value), name
                assert all(r[name] == value for r in rows)
    # The rounding people read, worked out by hand for one value of each kind.
    p1, shown1 = rows[0], page.patient_rows[0]
    assert shown1["spherocyte_pct"]["text"].startswith(f"{p1['spherocyte_pct']:.1f}")
    assert shown1["diameter_mean_um"]["text"].startswith(f"{p1['diameter_mean_um']:.2f}")
    assert shown1["n_rbc"]["text"] == str(p1["n_rbc"])


@pytest.mark.slow
def test_report_is_self_contained(report_html, page):
    assert not re.search(r"https?://|ftp://|//cdn|@import", report_html)
    assert not {"script", "link", "iframe", "object", "embed"} & page.tags
    assert "url(" not in report_html
    for tag, attribute, value in page.links:
        assert value.startswith(("data:image/png;base64,", "#")), (tag, attribute, value[:60])


@pytest.mark.slow
def test_every_image_is_a_png_data_uri(page):
    crops = [img for img in page.images if "#" in img.get("alt", "")]
    plots = [img for img in page.images if "#" not in img.get("alt", "")]
    assert len(crops) >= 3 and len(plots) >= 2  # the small multiples and the confusion matrix
    for img in page.images:
        image = png_of(img["src"])
        assert min(image.size) >= 32
    for img in crops:
        assert png_of(img["src"]).size == (CROP_PX, CROP_PX)
    per_class: dict[str, int] = {}
    for img in crops:
        cls = img["alt"].split(" ", 1)[0]
        per_class[cls] = per_class.get(cls, 0) + 1
    assert max(per_class.values()) <= CROPS_PER_CLASS
    assert "normal" in per_class


@pytest.mark.slow
def test_flag_table_counts_patients_by_label(tiny_resnet_run, page, report_html):
    rows = view_rows(tiny_resnet_run)
    # One patient per condition in the tiny cohort: each row says which flags that patient got.
    assert [r[0] for r in page.flag_rows] == ["hs", "ida", "normal"]
    header = re.search(r'<table id="flag-table">.*?</thead>', report_html, re.S).group(0)
    values = re.findall(r"<th>(positive|negative|insufficient)</th>", header)
    flags = [f for f in rows[0] if f.endswith("_flag")]
    for shown in page.flag_rows:
        patient = next(r for r in rows if r["label"] == shown[0])
        assert shown[1] == "1"
        expected, k = [], 0
        for flag in flags:
            n_values = len({r[flag] for r in rows})
            expected += [str(int(patient[flag] == v)) for v in values[k : k + n_values]]
            k += n_values
        assert shown[2:] == expected


@pytest.mark.slow
def test_cell_confusion_against_the_synthetic_truth(tiny_cohort, report_html):
    truth = pd.read_parquet(tiny_cohort.parent / "truth.parquet")
    true_rbc = int(((truth.kind == "rbc") & ~truth.touches_border).sum())
    assert "found beside the catalog" in report_html
    assert str(tiny_cohort.parent) in report_html
    matched = int(re.search(r'<span id="matched">(\d+)</span> of (\d+)', report_html).group(1))
    stated_true = int(re.search(r'<span id="matched">\d+</span> of (\d+)', report_html).group(1))
    assert stated_true == true_rbc
    # The classical segmenter finds ~97% of red cells (README); edge-cut cells are left out of
    # both sides, so most true cells are matched and never more than there are.
    assert 0.8 * true_rbc <= matched <= true_rbc
    agreement = float(re.search(r"agrees with the truth for ([\d.]+)%", report_html).group(1))
    assert 50.0 <= agreement <= 100.0


@pytest.mark.slow
def test_provenance_names_the_run_and_models(tiny_resnet_run, report_html):
    con = connect(str(tiny_resnet_run))
    pairs = con.execute("SELECT DISTINCT run_id, config_hash FROM slides").fetchall()
    con.close()
    for value in {v for pair in pairs for v in pair}:
        assert value in report_html
    assert "resnet" in report_html and "sha256" in report_html


@pytest.mark.slow
def test_shift_section(tiny_resnet_run, report_html):
    assert "--classifier resnet" in shift_section(str(tiny_resnet_run), 0, None)["note"]
    if importlib.util.find_spec("rbcbatch.analytics.shift") is None:
        assert "rbcbatch.analytics.shift is not available" in report_html
    else:
        assert 'id="shift-table"' in report_html
        assert 'alt="dataset-shift map"' in report_html


def test_outlined_crop_draws_the_cells_outline():
    yy, xx = np.mgrid[:40, :40]
    image = np.full((40, 40, 3), 230, dtype=np.uint8)
    labels = np.zeros((40, 40), dtype=np.uint32)
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 8**2] = 5
    labels[(yy - 4) ** 2 + (xx - 4) ** 2 <= 3**2] = 7  # a neighbour: never outlined
    crop = outlined_crop(image, labels, 5, out_px=40)
    ys, xs = np.nonzero(np.all(crop == OUTLINE_RGB, axis=-1))
    radius = np.hypot(ys - 20, xs - 20)
    assert len(ys) >= 2 * np.pi * 7  # a closed ring around the disk
    assert radius.min() >= 6.5 and radius.max() <= 8.6
    untouched = np.all(crop == 230, axis=-1)
    assert untouched[labels == 7].all() and untouched[:, 30:].all()


def test_crop_box_is_fixed_in_um_and_pads_past_the_edge():
    # 18 µm at 0.5 µm/px is 36 px, centred on (10, 10): it starts 8 px before the slide.
    assert crop_box(10.0, 10.0, 0.5, 18.0) == (-8, 28, -8, 28)
    assert crop_box(100.0, 50.0, 0.25, 18.0) == (14, 86, 64, 136)
    slide = np.arange(20 * 30, dtype=np.int32).reshape(20, 30)
    window = padded_window(
        lambda y0, y1, x0, x1: slide[y0:y1, x0:x1], (-2, 3, 27, 32), slide.shape, -1
    )
    assert window.shape == (5, 5)
    assert (window[:2] == -1).all() and (window[:, 3:] == -1).all()
    assert (window[2:, :3] == slide[0:3, 27:30]).all()


def test_intervals_are_shown_when_the_view_has_them():
    columns = [
        "patient_id",
        "spherocyte_pct",
        "spherocyte_pct_lo",
        "spherocyte_pct_hi",
        "microcyte_pct",
        "microcyte_pct_lo",
        "hs_flag",
    ]
    row = {
        "patient_id": "A",
        "spherocyte_pct": 12.34,
        "spherocyte_pct_lo": 9.81,
        "spherocyte_pct_hi": 15.02,
        "microcyte_pct": 3.0,
        "microcyte_pct_lo": 1.0,
        "hs_flag": "positive",
    }
    header, body, same = table_cells(columns, [row])
    # A pair folds into its column; a lone _lo stays a column of its own; flags come first.
    assert header == [
        "patient_id",
        "hs_flag",
        "spherocyte_pct",
        "microcyte_pct",
        "microcyte_pct_lo",
    ]
    assert same == []
    cells = {c["name"]: c for c in body[0]}
    assert cells["spherocyte_pct"]["text"] == "12.3"
    assert cells["spherocyte_pct"]["interval"] == "9.8–15.0"
    assert "interval" not in cells["microcyte_pct"]
    assert cells["hs_flag"]["css"] == "pos"
    header, body, _ = table_cells(["patient_id", "spherocyte_pct"], [row])
    assert header == ["patient_id", "spherocyte_pct"] and "interval" not in body[0][1]


def test_text_that_is_the_same_for_every_patient_is_said_once():
    columns = ["patient_id", "n_rbc", "hs_flag", "hs_rule", "hs_evidence", "hb_g_dl"]
    rows = [
        {
            "patient_id": "A",
            "n_rbc": 300,
            "hs_flag": "negative",
            "hs_rule": "pct >= 10",
            "hs_evidence": '{"decision": "negative", "n_rbc": 300}',
            "hb_g_dl": None,
        },
        {
            "patient_id": "B",
            "n_rbc": 300,
            "hs_flag": "positive",
            "hs_rule": "pct >= 10",
            "hs_evidence": '{"decision": "positive", "n_rbc": 300}',
            "hb_g_dl": None,
        },
    ]
    header, body, same = table_cells(columns, rows)
    assert header == ["patient_id", "n_rbc", "hs_flag", "hs_evidence"]
    assert [(c["name"], c["value"]) for c in same] == [("hs_rule", "pct >= 10"), ("hb_g_dl", "")]
    evidence = body[1][3]
    assert evidence["summary"] == "evidence" and '"decision": "positive"' in evidence["json"]
    assert evidence["value"] == rows[1]["hs_evidence"]


def test_small_multiples_paginate_a_large_cohort():
    assert [(a, b, len(c)) for a, b, c in pages(list(range(100)), 24)] == [
        (1, 24, 24),
        (25, 48, 24),
        (49, 72, 24),
        (73, 96, 24),
        (97, 100, 4),
    ]


@pytest.mark.slow
def test_cli_writes_the_report_and_explains_bad_input(tiny_resnet_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r" / "report.html"
    result = runner.invoke(
        app, ["report", str(tiny_resnet_run), "--html", str(out), "--grading", "cap_simple"]
    )
    assert result.exit_code == 0, result.output
    document = out.read_text()
    assert "P002" in document and 'data-value="cap_simple"' in document
    result = runner.invoke(
        app, ["report", str(tiny_resnet_run), "--html", str(out), "--truth", str(tmp_path)]
    )
    assert result.exit_code == 2 and "truth.parquet" in result.output
    result = runner.invoke(app, ["report", str(tmp_path), "--html", str(out)])
    assert result.exit_code == 2
    assert "not an rbcbatch run folder" in " ".join(result.output.split())


@pytest.mark.slow
def test_chromium_renders_the_report_as_a_page(report_html, tmp_path):
    if find_chromium() is None:
        pytest.skip("Chromium not installed (Debian: apt-get install -y chromium); not rendered")
    html = tmp_path / "report.html"
    html.write_text(report_html, encoding="utf-8")
    png = screenshot(html, tmp_path / "report.png", width=1280, height=1600)
    image = Image.open(png).convert("RGB")
    assert image.size == (1280, 1600)
    pixels = np.asarray(image).astype(np.int16)
    grey = pixels.mean(axis=-1)
    assert grey.std() > 20  # not a blank page
    assert (grey < 235).mean() > 0.05  # text, tables and plots cover part of it
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # plots and cell crops drawn
    # The header band is the stylesheet's accent colour: the inline CSS was applied.
    assert np.abs(pixels[12, 640] - (43, 87, 151)).max() <= 3


def test_best_match_pairs_cells_by_iou():
    from rbcbatch.evaluation.metrics import best_match

    pred = np.zeros((6, 6), dtype=np.uint32)
    true = np.zeros((6, 6), dtype=np.uint32)
    pred[0:3, 0:3] = 1  # 9 px over a true cell of 6 px: IoU 6/9
    true[0:2, 0:3] = 4
    pred[4:6, 4:6] = 2  # 4 px inside a true cell of 9 px: IoU 4/9
    true[3:6, 3:6] = 9
    pred[5, 0] = 3  # no true cell under it
    assert best_match(pred, true) == {1: 4}
    assert best_match(pred, true, iou_threshold=0.4) == {1: 4, 2: 9}


def test_values_are_rounded_for_reading():
    assert format_value("spherocyte_pct", 12.345) == "12.3"
    assert format_value("diameter_mean_um", 7.256) == "7.26"
    assert format_value("auc", 1.0) == "1.00"
    assert format_value("p_value", 0.004975) == "0.00498"
    assert format_value("mmd", 123.4) == "123"
    assert format_value("count", 12345.6) == "12,346"
    assert format_value("n_rbc", 694) == "694"
    assert format_value("hb_g_dl", None) == "–"
    assert format_value("flagged", True) == "yes"


def test_a_run_with_nothing_committed_gives_a_report_that_says_so(tmp_path):
    from rbcbatch.store.run_store import RunStore

    RunStore(str(tmp_path / "run")).open({"segmenter": {"name": "classical"}}, "cfg1")
    document = build_report(str(tmp_path / "run"))
    page = ReportPage(document)
    assert "the run has no committed slides yet" in document
    assert page.patient_rows == [] and page.images == []
    assert "No cell-level truth" in document and "carry no embeddings" in document

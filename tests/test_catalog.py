from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rbcbatch.errors import CatalogError
from rbcbatch.io.catalog import is_safe_name, load_catalog

HEADER = "slide_id,uri,patient_id,site,um_per_px,label\n"


def write(tmp_path, body: str, name: str = "catalog.csv"):
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def test_good_rows_resolve_relative_uris_and_keep_leading_zeros(tmp_path):
    cat = load_catalog(str(write(tmp_path, "001,images/a.png,P01,site_a,0.25,hs\n")))
    assert [s.slide_id for s in cat.slides] == ["001"]
    assert cat.slides[0].uri == str(tmp_path / "images" / "a.png")
    assert cat.slides[0].um_per_px == 0.25
    assert cat.slides[0].cohort == "default"
    assert cat.rejected == []


@pytest.mark.parametrize(
    "slide_id, reason",
    [
        ("../x", "not a safe name"),
        ("", "slide_id is empty"),
        (".hidden", "not a safe name"),
        ("a/b", "not a safe name"),
        ("a..b", "not a safe name"),
    ],
)
def test_unsafe_slide_ids_are_rejected_rows(tmp_path, slide_id, reason):
    body = f"{slide_id},x.png,P01,s,0.25,\nok1,y.png,P01,s,0.25,\n"
    cat = load_catalog(str(write(tmp_path, body)))
    assert [s.slide_id for s in cat.slides] == ["ok1"]
    assert len(cat.rejected) == 1
    assert reason in cat.rejected[0].message
    assert cat.rejected[0].stage == "catalog"


def test_duplicate_slide_id_rejects_the_second_row_only(tmp_path):
    cat = load_catalog(str(write(tmp_path, "s1,a.png,P1,s,0.25,\ns1,b.png,P2,s,0.25,\n")))
    assert [(s.slide_id, s.uri.endswith("a.png")) for s in cat.slides] == [("s1", True)]
    assert "duplicate of catalog row 1" in cat.rejected[0].message


@pytest.mark.parametrize(
    "um, reason", [("abc", "not a number"), ("50", "outside"), ("-1", "outside")]
)
def test_bad_pixel_size_is_rejected(tmp_path, um, reason):
    cat = load_catalog(str(write(tmp_path, f"s1,a.png,P1,s,{um},\n")))
    assert cat.slides == [] and reason in cat.rejected[0].message


def test_missing_columns_and_missing_file_are_catalog_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,uri\ns1,a.png\n")
    with pytest.raises(CatalogError, match="lacks required column"):
        load_catalog(str(bad))
    with pytest.raises(CatalogError, match="not found"):
        load_catalog(str(tmp_path / "nope.csv"))


def test_parquet_catalog(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(
        pa.table(
            {
                "slide_id": ["a"],
                "uri": ["/x/a.png"],
                "patient_id": ["P"],
                "site": ["s"],
                "um_per_px": [0.3],
            }
        ),
        path,
    )
    cat = load_catalog(str(path))
    assert cat.slides[0].uri == "/x/a.png" and cat.slides[0].um_per_px == 0.3


def test_safe_names():
    assert is_safe_name("P001_S1.v2")
    assert not any(is_safe_name(n) for n in ["", "..", "../x", "a/b", "-x", "a b", "x" * 200])


def test_missing_pixel_size_is_left_for_calibration(tmp_path):
    cat = load_catalog(str(write(tmp_path, "s1,a.png,P1,s,,\n")))
    assert cat.rejected == [] and cat.slides[0].um_per_px is None

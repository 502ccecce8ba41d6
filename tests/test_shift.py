"""Dataset shift: a stain-shifted site is flagged, an unshifted one is not, on a real run.

Three laboratories image the same kinds of patients (normal, HS, IDA) with the same site
parameters: `lab_ref` (the reference, the most fields), `lab_same` (other patients, other seeds)
and `lab_stain` (as lab_same, but the stain moved by one unit of `rbcbatch.dev.synth`'s stain shift,
about the distance between the two synthetic sites). One pipeline run with the learned
classifier (so every red cell has an embedding) serves every test of the module.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from rbcbatch.analytics.shift import (
    ShiftError,
    ShiftSettings,
    balanced_sample,
    compare,
    mann_whitney_rows,
    matched_pair,
    parse_classes,
    read_cell_features,
    shift_analysis,
    shift_map_png,
)
from rbcbatch.cli import app
from rbcbatch.jobs.specs import load_spec, run_job

# (site name in the catalog, synth seed, stain shift, fields per patient, scanner)
LABS = [
    ("lab_ref", 21, None, 3, "scanA"),
    ("lab_same", 22, None, 2, "scanA"),
    ("lab_stain", 23, 1.0, 2, "scanC"),
]
# A small map keeps the module fast; the default (1,500 cells) is exercised by run-job.
SMALL = ShiftSettings(map_cells=600)


def three_lab_catalog(root) -> str:
    """One catalog over three synthetic cohorts, each renamed as its own laboratory."""
    from rbcbatch.dev.synth import synth_cohort

    parts = []
    for name, seed, stain_shift, fields, scanner in LABS:
        catalog = synth_cohort(
            root / name,
            n_patients=3,
            images_per_patient=fields,
            seed=seed,
            height=360,
            width=480,
            conditions=("normal", "hs", "ida"),
            sites=("site_a",),
            stain_shift=stain_shift,
        )
        lab = pd.read_csv(catalog)
        lab["uri"] = f"{name}/" + lab["uri"]
        lab["site"] = name
        lab["scanner"] = scanner
        lab["patient_id"] = f"{name}-" + lab["patient_id"]
        lab["slide_id"] = f"{name}-" + lab["slide_id"]
        parts.append(lab)
    path = root / "catalog.csv"
    pd.concat(parts).to_csv(path, index=False)
    return str(path)


@pytest.fixture(scope="module")
def shift_run(tmp_path_factory, ray_local) -> str:
    from rbcbatch.engine.config import RunConfig
    from rbcbatch.engine.run import run

    root = tmp_path_factory.mktemp("shift_cohort")
    summary = run(
        three_lab_catalog(root),
        str(root / "run"),
        RunConfig(segmenter="classical", classifier="resnet"),
    )
    assert summary.n_failed == 0, summary.failed
    return str(root / "run")


@pytest.fixture(scope="module")
def report(shift_run):
    return shift_analysis(shift_run, seed=0, settings=SMALL)


@pytest.fixture(scope="module")
def run_without_embeddings(shift_run, tmp_path_factory) -> str:
    """The same run as a rules-classifier run stores it: no embedding on any row."""
    root = tmp_path_factory.mktemp("no_embeddings") / "run"
    shutil.copytree(shift_run, root, ignore=shutil.ignore_patterns("masks.zarr", "shift"))
    for path in (root / "cells").rglob("*.parquet"):
        table = pq.read_table(path, partitioning=None)
        i = table.schema.get_field_index("embedding")
        empty = pa.nulls(table.num_rows, table.schema.field(i).type)
        pq.write_table(table.set_column(i, table.schema.field(i), empty), path)
    return str(root)


def said(result) -> str:
    """CLI output with the console's line wrapping undone."""
    return " ".join(result.output.split())


def scores_of(report) -> dict:
    return {row["group"]: row for row in report.scores.to_dict("records")}


# -- the synthetic cohort ------------------------------------------------------------------------
def test_stain_shifted_site_is_flagged_and_the_unshifted_one_is_not(report):
    scores = scores_of(report)
    print("\n" + report.scores.to_string())
    assert report.reference == "lab_ref"  # the most red cells: three fields per patient
    assert set(scores) == {"lab_same", "lab_stain"}
    stain, same = scores["lab_stain"], scores["lab_same"]
    assert stain["auc"] >= 0.95 and stain["p_value"] <= 0.01 and stain["flagged"]
    assert same["auc"] < 0.65 and not same["flagged"]
    assert stain["mmd"] > 5 * same["mmd"]
    for row in scores.values():
        assert row["n_patients"] == 3 and row["n_cells"] >= 150 and row["cv_by"] == "patient"
    assert report.flagged == ["lab_stain"]


def test_hs_patients_do_not_read_as_shifted_against_normal_patients(shift_run):
    """Same labs, different condition: comparing normal-called cells keeps spherocytes out."""
    cells, X, _ = read_cell_features(shift_run)
    label = pd.read_csv(f"{shift_run}/../catalog.csv").groupby("patient_id")["label"].first()
    unshifted = cells["group"].isin(["lab_ref", "lab_same"]).to_numpy()
    cells, X = cells[unshifted].reset_index(drop=True), X[unshifted]
    cells["group"] = cells["patient_id"].map(label).to_numpy()  # normal / hs / ida
    patients, slides = cells["patient_id"].to_numpy(), cells["slide_id"].to_numpy()

    def versus_normal(ours, theirs):
        idx = np.concatenate([ours, theirs])
        y = np.r_[np.ones(len(ours), dtype=np.int64), np.zeros(len(theirs), dtype=np.int64)]
        rng = np.random.default_rng(0)
        return compare(X[idx], y, patients[idx], slides[idx], ShiftSettings(), rng)

    matched = versus_normal(*matched_pair(cells, "hs", "normal", ("normal",), 400, rng_0()))
    hs, normal = (np.flatnonzero(cells["group"] == g) for g in ("hs", "normal"))
    n = min(len(hs), len(normal), 400)
    every_cell = versus_normal(
        hs[balanced_sample(patients[hs], n, rng_0())],
        normal[balanced_sample(patients[normal], n, rng_0())],
    )
    print(f"\nHS vs normal patients, normal-called cells: {matched}\nall red cells: {every_cell}")
    assert not matched["flagged"] and matched["auc"] < 0.65 and matched["p_value"] > 0.05
    # Without the control the spherocytes alone make the groups differ: the MMD doubles. (With
    # two patients per side the AUC is too noisy to show it: 0.3-0.6 over seeds.)
    assert every_cell["mmd"] > 1.5 * matched["mmd"]


def rng_0() -> np.random.Generator:
    return np.random.default_rng(0)


def test_colour_alone_sees_the_stain_shift_on_a_run_without_embeddings(run_without_embeddings):
    with pytest.raises(ShiftError, match="no cell embeddings") as caught:
        shift_analysis(run_without_embeddings, settings=SMALL)
    assert "--classifier resnet" in str(caught.value) and "--features colour" in str(caught.value)
    colour = shift_analysis(
        run_without_embeddings, features="colour", settings=ShiftSettings(map_cells=0)
    )
    scores = scores_of(colour)
    print("\n" + colour.scores.to_string())
    assert colour.feature_names == ["mean_r", "mean_g", "mean_b", "mean_od"]
    assert scores["lab_stain"]["flagged"] and scores["lab_stain"]["auc"] >= 0.95
    assert not scores["lab_same"]["flagged"] and scores["lab_same"]["auc"] < 0.65


def test_grouping_by_scanner_puts_the_two_unshifted_labs_together(shift_run):
    by_scanner = shift_analysis(shift_run, by="scanner", settings=ShiftSettings(map_cells=0))
    assert by_scanner.reference == "scanA"  # lab_ref and lab_same
    assert list(by_scanner.scores["group"]) == ["scanC"]
    assert by_scanner.flagged == ["scanC"]


def test_same_seed_same_scores(shift_run, report):
    again = shift_analysis(shift_run, seed=0, settings=ShiftSettings(map_cells=0))
    pd.testing.assert_frame_equal(again.scores, report.scores)
    other = shift_analysis(shift_run, seed=1, settings=ShiftSettings(map_cells=0))
    assert other.flagged == ["lab_stain"]  # the verdict does not hang on the seed


def test_the_map_shows_the_shifted_site_apart(report):
    tsne = report.map
    assert list(tsne.columns) == ["x", "y", "group", "class", "patient_id", "slide_id"]
    assert tsne["group"].value_counts().to_dict() == {
        g: 200 for g in ("lab_ref", "lab_same", "lab_stain")
    }
    assert np.isfinite(tsne[["x", "y"]].to_numpy()).all()
    assert tsne["class"].nunique() > 3  # every red-cell class, not only the compared ones
    # Share of each cell's 10 nearest map neighbours from its own laboratory: the shifted lab's
    # cells sit together; the unshifted lab's mix with the reference's (half would be chance).
    _, near = cKDTree(tsne[["x", "y"]].to_numpy()).query(tsne[["x", "y"]].to_numpy(), k=11)
    group = tsne["group"].to_numpy()
    own = {g: (group[near[group == g, 1:]] == g).mean() for g in set(group)}
    print(f"\nown-lab share of map neighbours: {own}")
    assert own["lab_stain"] > 0.8 and own["lab_same"] < 0.65

    png = shift_map_png(report)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size[0] > 2 * 300 and image.size[1] > 300


# -- the command and the job ---------------------------------------------------------------------
def test_shift_command_writes_scores_and_map(shift_run):
    result = CliRunner().invoke(
        app, ["shift", shift_run, "--map-cells", "300", "--permutations", "100"]
    )
    assert result.exit_code == 0, result.output
    assert "lab_stain" in result.output and "out of distribution" in result.output
    out = f"{shift_run}/shift"
    csv = pd.read_csv(f"{out}/shift_scores.csv")
    parquet = pd.read_parquet(f"{out}/shift_scores.parquet")
    assert list(csv["group"]) == ["lab_same", "lab_stain"] == list(parquet["group"])
    assert list(csv["flagged"]) == [False, True]
    assert set(csv["reference"]) == {"lab_ref"} and set(csv["n_permutations"]) == {100}
    assert csv["auc"].to_numpy() == pytest.approx(parquet["auc"].to_numpy())
    assert Image.open(f"{out}/shift_map.png").format == "PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--by", "cohort"], "only one cohort (synthetic)"),
        (["--reference", "lab_x"], "unknown reference site 'lab_x'; the run has lab_ref"),
        (["--classes", "target"], "site 'lab_same' against 'lab_ref': only"),
        (["--classes", "nromal"], "no red cell of class nromal"),
        (["--by", "stain_name"], "cannot group by 'stain_name'"),
    ],
)
def test_shift_command_explains_what_it_cannot_do(shift_run, tmp_path, args, message):
    result = CliRunner().invoke(app, ["shift", shift_run, "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in said(result)
    assert not list(tmp_path.iterdir())  # nothing written


def test_shift_command_refuses_a_folder_that_is_no_run(tmp_path):
    result = CliRunner().invoke(app, ["shift", str(tmp_path)])
    assert result.exit_code == 2 and "not an rbcbatch run folder" in said(result)


def test_shift_job_runs_the_analysis(shift_run, tmp_path):
    spec_path = tmp_path / "shift.yaml"
    out = tmp_path / "report"
    spec_path.write_text(
        yaml.safe_dump(
            {"kind": "shift", "run": shift_run, "reference_site": "lab_ref", "out": str(out)}
        )
    )
    outcome = run_job(load_spec(spec_path))
    assert outcome.exit_code == 0
    said = "\n".join(outcome.lines)
    assert "lab_stain: AUC" in said and "OUT OF DISTRIBUTION" in said
    assert sorted(p.name for p in out.iterdir()) == [
        "shift_map.png",
        "shift_scores.csv",
        "shift_scores.parquet",
    ]
    assert len(outcome.result.map) > 1000  # the default map: 1,500 cells at most


# -- the pieces, on hand-made data ---------------------------------------------------------------
def test_balanced_sample_takes_turns_over_patients():
    patients = np.array(["a"] * 100 + ["b"] * 10)
    rng = np.random.default_rng(0)
    for n, expected in ((20, {"a": 10, "b": 10}), (30, {"a": 20, "b": 10})):
        picked = balanced_sample(patients, n, rng)
        assert len(set(picked)) == n
        assert pd.Series(patients[picked]).value_counts().to_dict() == expected
    with pytest.raises(ValueError, match="cannot sample 111 rows from 110"):
        balanced_sample(patients, 111, rng)


def test_matched_pair_compares_like_with_like():
    # group: 30 spherocytes + 20 normal (an HS-heavy site); reference: 5 spherocytes + 40 normal
    cells = pd.DataFrame(
        {
            "group": ["g"] * 50 + ["ref"] * 45,
            "class": ["spherocyte"] * 30 + ["normal"] * 20 + ["spherocyte"] * 5 + ["normal"] * 40,
            "patient_id": ["p1", "p2"] * 25 + ["r1"] * 45,
        }
    )
    rng = np.random.default_rng(0)
    ours, theirs = matched_pair(cells, "g", "ref", ("normal",), 400, rng)
    assert len(ours) == len(theirs) == 20
    assert set(cells["class"][ours]) == set(cells["class"][theirs]) == {"normal"}
    ours, theirs = matched_pair(cells, "g", "ref", None, 400, rng)
    assert cells["class"][ours].value_counts().to_dict() == {"normal": 20, "spherocyte": 5}
    assert cells["class"][theirs].value_counts().to_dict() == {"normal": 20, "spherocyte": 5}
    ours, theirs = matched_pair(cells, "g", "ref", None, 10, rng)  # scaled down together
    assert cells["class"][ours].value_counts().to_dict() == {"normal": 8, "spherocyte": 2}


def test_mann_whitney_counts_pairs_by_hand():
    labels = np.array([[1, 1, 0, 0], [1, 0, 1, 0]])
    scores = np.array([[0.9, 0.2, 0.5, 0.1], [0.3, 0.3, 0.3, 0.1]])
    u, pairs = mann_whitney_rows(labels, scores)
    # row 0: 0.9 > 0.5, 0.9 > 0.1, 0.2 > 0.1, 0.2 < 0.5 -> 3 of 4
    # row 1: each 0.3 ties the other side's 0.3 (1/2) and beats its 0.1 (1) -> 2 x 1.5 = 3 of 4
    assert u.tolist() == [3.0, 3.0] and pairs.tolist() == [4.0, 4.0]


def test_compare_flags_a_shifted_gaussian_and_not_an_equal_one():
    rng = np.random.default_rng(5)
    n = 240
    patients = np.repeat([f"p{i}" for i in range(8)], n // 8)  # four patients per side
    y = (np.arange(n) >= n // 2).astype(np.int64)
    alike = rng.normal(size=(n, 6))
    shifted = alike.copy()
    shifted[y == 1, 0] += 1.5
    settings = ShiftSettings(n_permutations=100)
    same = compare(alike, y, patients, patients, settings, np.random.default_rng(0))
    apart = compare(shifted, y, patients, patients, settings, np.random.default_rng(0))
    assert apart["flagged"] and apart["auc"] > 0.8 and apart["p_value"] < 0.02
    assert apart["mmd_p_value"] < 0.02
    assert not same["flagged"] and abs(same["auc"] - 0.5) < 0.1 and same["p_value"] > 0.05
    assert same["cv_by"] == "patient"


def test_settings_and_class_lists_refuse_nonsense():
    assert parse_classes("all") is None
    assert parse_classes("normal, target") == ("normal", "target")
    with pytest.raises(ValueError, match="names no class"):
        parse_classes(" , ")
    with pytest.raises(ValueError, match="alpha"):
        ShiftSettings(alpha=0.0)
    with pytest.raises(ValueError, match="max_cells"):
        ShiftSettings(min_cells=100, max_cells=50)

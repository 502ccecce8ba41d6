"""Job specs: the shipped ones validate, bad ones are refused naming the field, the nightly run
processes only what is new, and a spec submitted to a cluster becomes a real CLI command."""

from __future__ import annotations

import inspect
import json
import shlex
import shutil
import socket
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from rbcbatch.cli import app
from rbcbatch.errors import JobSpecError, RbcbatchError
from rbcbatch.jobs.specs import (
    KINDS,
    check_spec,
    env_storage_options,
    load_spec,
    run_job,
    training_call,
)
from rbcbatch.jobs.submit import JobEnd, job_command, own_lines, submission, submit
from rbcbatch.store.run_store import RunStore
from tests.conftest import REPO, catalog_rows, write_catalog
from tests.test_deploy_yaml import check_rbcbatch_argv

JOB_FILES = sorted((REPO / "jobs").glob("*.yaml"))


def said(result) -> str:
    """CLI output with line wrapping undone (the console wraps long messages)."""
    return " ".join(result.output.split())


def write_spec(folder: Path, spec: dict, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# -- the shipped specs and the schema ------------------------------------------------------------
@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_each_shipped_spec_validates_against_code_and_published_schema(path):
    spec = load_spec(path)
    published = json.loads((REPO / "schemas" / "job.schema.json").read_text())
    assert list(Draft202012Validator(published).iter_errors(spec)) == []


def test_the_shipped_specs_cover_every_kind():
    assert {load_spec(p)["kind"] for p in JOB_FILES} == set(KINDS)


BASE = {"kind": "screening", "catalog": "c.csv", "out": "run"}


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        ({**BASE, "kind": "screen"}, "$.kind", "is not one of"),
        ({"kind": "nightly", "out": "run", "skip_committed": True}, "$.catalog", "required"),
        ({**BASE, "kind": "nightly"}, "$.skip_committed", "required"),
        ({**BASE, "kind": "nightly", "skip_committed": False}, "$.skip_committed", "True"),
        ({**BASE, "kind": "nightly", "skip_committed": True, "new_config": True}, "$.new_config",
         "unknown field"),
        ({**BASE, "workers": 0}, "$.workers", "minimum"),
        ({**BASE, "segmenter": "yolo"}, "$.segmenter", "'classical', 'unet'"),
        ({**BASE, "ray_address": "x"}, "$.ray_address", "unknown field"),
        ({"kind": "training", "what": "segmenter", "out": "w", "epochs": 3}, "$.epochs",
         "the segmenter takes steps"),
        ({"kind": "training", "what": "classifier", "out": "w", "steps": 3}, "$.steps",
         "the classifier takes epochs"),
        ({"kind": "shift", "run": "r"}, "$.reference_site", "required"),
        ({**BASE, "storage_env": {"client_kwargs.endpoint_url": 9000}}, "$.storage_env",
         "environment variable name"),
    ],
)  # fmt: skip
def test_a_bad_spec_is_refused_naming_the_field(spec, field, says):
    with pytest.raises(JobSpecError) as caught:
        check_spec(spec, "job.yaml")
    message = str(caught.value)
    assert message.startswith("job.yaml: ") and says in message
    assert any(p.startswith(field) for p in caught.value.problems), caught.value.problems


SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**BASE, "aws_secret_access_key": SECRET}, "$.aws_secret_access_key"),
        ({**BASE, "storage_options": {"secret": SECRET}}, "$.storage_options.secret"),
        ({**BASE, "notes": [{"api_key": SECRET}]}, "$.notes[0].api_key"),
        ({**BASE, "storage_env": {"secret": SECRET}}, "$.storage_env.secret"),
        ({**BASE, "storage_env": {"key": "AKIAIOSFODNN7EXAMPLE"}}, "$.storage_env.key"),
    ],
)
def test_a_secret_in_a_spec_is_refused_without_repeating_it(spec, field):
    with pytest.raises(JobSpecError) as caught:
        check_spec(spec, "job.yaml")
    assert [p.split(":")[0] for p in caught.value.problems] == [field]
    assert SECRET not in str(caught.value) and "AKIAIOSFODNN7EXAMPLE" not in str(caught.value)


def test_a_spec_that_is_not_yaml_or_not_there_is_refused(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: screening\ncatalog: [unclosed\n")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        load_spec(broken)
    with pytest.raises(JobSpecError, match=r"\$: no such file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(JobSpecError, match=r"\$: cannot be read \(IsADirectoryError"):
        load_spec(tmp_path)
    (tmp_path / "list.yaml").write_text("- kind: screening\n")
    with pytest.raises(JobSpecError, match="a YAML mapping with a `kind`"):
        load_spec(tmp_path / "list.yaml")


def test_storage_env_reads_the_named_variables_only():
    storage_env = {"key": "MY_KEY", "client_kwargs.endpoint_url": "MY_ENDPOINT"}
    env = {"MY_KEY": "k-value", "MY_ENDPOINT": "http://127.0.0.1:9000", "OTHER": "x"}
    assert env_storage_options(storage_env, env) == {
        "key": "k-value",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
    }
    with pytest.raises(
        RbcbatchError, match="storage_env.key names the environment variable MY_KEY"
    ):
        env_storage_options(storage_env, {"MY_ENDPOINT": "x"})


@pytest.mark.parametrize("what", ["segmenter", "classifier"])
def test_a_training_spec_calls_the_training_function_with_arguments_it_takes(what):
    spec = {"kind": "training", "what": what, "out": "w.safetensors", "minutes": 2.5, "seed": 3}
    spec.update({"steps": 40} if what == "segmenter" else {"epochs": 4}, data="/data")
    check_spec(spec)
    fn, kwargs = training_call(spec)
    assert fn.__name__ == f"train_{what}"
    bound = inspect.signature(fn).bind(**kwargs).arguments  # raises on a name fn does not take
    assert bound["seed"] == 3
    if what == "segmenter":
        assert bound["phase"].steps == 40 and bound["minutes"] == 2.5
        assert bound["anerbc_root"] == Path("/data/anerbc_sample")
    else:
        assert bound["epochs"] == 4 and bound["time_limit_s"] == 150.0
        assert bound["data"] == Path("/data")


# -- the command line ----------------------------------------------------------------------------
def test_run_job_refuses_a_bad_spec_with_exit_status_2(tmp_path):
    path = write_spec(tmp_path, {"kind": "nightly", "out": "run", "skip_committed": True})
    result = CliRunner().invoke(app, ["run-job", str(path)])
    assert result.exit_code == 2
    assert "$.catalog: required field is missing" in said(result)


def test_run_job_runs_the_shift_spec_and_says_when_its_run_folder_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the spec's run folder (demo_out/run_resnet) is relative: not here
    result = CliRunner().invoke(app, ["run-job", str(REPO / "jobs" / "shift.yaml")])
    assert result.exit_code == 2
    assert "demo_out/run_resnet is not an rbcbatch run folder" in said(result)


# -- submitting ----------------------------------------------------------------------------------
def test_a_local_spec_is_sent_alone_and_run_by_a_real_command(tmp_path):
    argv, runtime_env = submission(str(REPO / "jobs" / "nightly.yaml"), tmp_path)
    entrypoint = shlex.join(argv)
    assert check_rbcbatch_argv(shlex.split(entrypoint))["spec"] == "nightly.yaml"
    working_dir = Path(runtime_env["working_dir"])
    assert sorted(p.name for p in working_dir.iterdir()) == ["nightly.yaml"]
    assert load_spec(working_dir / argv[2]) == load_spec(REPO / "jobs" / "nightly.yaml")


def test_a_spec_at_a_url_is_read_by_the_job_itself(tmp_path):
    argv, runtime_env = submission("s3://bucket/jobs/nightly.yaml", tmp_path)
    assert argv == ["rbcbatch", "run-job", "s3://bucket/jobs/nightly.yaml"] and runtime_env == {}
    check_rbcbatch_argv(argv)
    assert list(tmp_path.iterdir()) == []


def test_a_named_python_runs_the_same_command_as_a_module(tmp_path):
    argv, _ = submission(str(REPO / "jobs" / "nightly.yaml"), tmp_path, python="/opt/py/bin/python")
    assert argv[:3] == ["/opt/py/bin/python", "-m", "rbcbatch.cli"]
    assert check_rbcbatch_argv(["rbcbatch", *argv[3:]])["spec"] == "nightly.yaml"
    assert job_command("python3") == ["python3", "-m", "rbcbatch.cli"]  # from the cluster's PATH
    with pytest.raises(RbcbatchError, match="give an absolute path"):
        job_command(".venv/bin/python")  # it would be looked for in the job's working dir
    result = CliRunner().invoke(app, ["submit", str(REPO / "jobs" / "nightly.yaml"), "--address",
                                      "http://127.0.0.1:1", "--python", ".venv/bin/python"])  # fmt: skip
    assert result.exit_code == 2 and "a relative path means nothing" in said(result)


ENTRYPOINT = "JOB_ENTRYPOINT_COMMAND_ERROR"


@pytest.mark.parametrize(
    ("status", "driver_exit_code", "exit_code", "says"),
    [
        ("SUCCEEDED", 0, 0, "SUCCEEDED"),
        ("FAILED", 1, 1, "FAILED (exit status 1)"),  # run-job: some slides failed
        ("FAILED", 2, 2, "FAILED (exit status 2)"),  # run-job: a bad spec or configuration
        ("FAILED", 127, 2, "the cluster could not start rbcbatch"),
        ("FAILED", None, 2, "FAILED: runtime env setup failed"),
        ("STOPPED", None, 2, "STOPPED: Job was intentionally stopped."),
    ],
)
def test_a_jobs_end_is_told_with_run_jobs_own_exit_status(
    status, driver_exit_code, exit_code, says
):
    if driver_exit_code is not None:  # the entrypoint ran: the server's message adds nothing
        message, error_type = "Job entrypoint command failed, last available logs", ENTRYPOINT
    else:
        message, error_type = says.split(": ", 1)[1], None
    tail = [] if status == "SUCCEEDED" else ["error: catalog not found: /x.csv"]
    end = JobEnd("raysubmit_x", status, driver_exit_code, message, error_type, tail)
    assert end.exit_code == exit_code
    report = "\n".join(end.report("http://head:8265"))
    assert says in report and "last available logs" not in report
    if status != "SUCCEEDED":
        assert report.endswith("ray job logs raysubmit_x --address http://head:8265):\n"
                               "  error: catalog not found: /x.csv")  # fmt: skip


def test_a_jobs_own_lines_are_told_apart_from_rays():
    log = (
        "2026-12-01 22:50:09,315\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
        "Running entrypoint for job raysubmit_x: rbcbatch run-job job.yaml\n"
        "[2026-12-01 22:50:10,001 W 123 456] core_worker.cc:12: a warning from Ray\n"
        "nightly: 2 new slide(s) and 0 earlier failure(s) to process\n"
        "\n"
        "Traceback (most recent call last):\n"
    )
    assert own_lines(log) == [
        "nightly: 2 new slide(s) and 0 earlier failure(s) to process",
        "Traceback (most recent call last):",
    ]


def test_submit_refuses_local_relative_paths_before_contacting_anything():
    with pytest.raises(JobSpecError) as caught:
        submit(REPO / "jobs" / "screening.yaml", "http://127.0.0.1:1")
    assert [p.split(":")[0] for p in caught.value.problems] == ["$.catalog", "$.out"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_submit_without_a_job_server_says_where_it_looked():
    address = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RbcbatchError, match=f"no Ray job server answered at {address}"):
        submit(REPO / "jobs" / "nightly.yaml", address)
    result = CliRunner().invoke(app, ["submit", str(REPO / "jobs" / "nightly.yaml"), "--address",
                                      address])  # fmt: skip
    assert result.exit_code == 2 and f"no Ray job server answered at {address}" in said(result)


# -- the nightly incremental run -----------------------------------------------------------------
def slide_files(out: Path, slide_id: str, cells: bool = True) -> list[Path]:
    """Every file of a slide's mask group, and the cells file holding its rows: its patient's,
    which a later run rewrites only when the patient has new slides."""
    record = json.loads((out / "_slides" / f"{slide_id}.json").read_text())
    patient = Path(RunStore(str(out)).patient_cells_path(record["cohort"], record["patient_id"]))
    masks = [p for p in (out / "masks.zarr" / slide_id).rglob("*") if p.is_file()]
    assert patient.is_file() and masks, slide_id
    return [patient, *masks] if cells else masks


def snapshot(paths: list[Path]) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def read_cells(out: Path) -> pd.DataFrame:
    table = pq.read_table(out / "cells", partitioning=None)
    table = table.sort_by([("slide_id", "ascending"), ("cell_id", "ascending")])
    return table.drop_columns(["run_id"]).to_pandas()


@pytest.mark.slow
def test_nightly_processes_only_new_slides_and_ends_like_one_clean_run(
    tiny_cohort, ray_local, tmp_path
):
    rows = catalog_rows(tiny_cohort)
    assert len(rows) == 6
    late = rows[3]  # its scan arrives a day late: the first night fails it, the second retries
    late_image = tmp_path / "late" / Path(late["uri"]).name
    late_image.parent.mkdir()
    rows[3] = {**late, "uri": str(late_image)}
    catalog = write_catalog(tmp_path / "catalog.csv", rows[:4])
    out = tmp_path / "nightly"
    spec = write_spec(
        tmp_path,
        {"kind": "nightly", "catalog": str(catalog), "out": str(out), "skip_committed": True},
    )

    first = run_job(load_spec(spec))
    assert (first.states.new, first.states.retried, first.states.committed) == (4, 0, 0)
    assert first.summary.processed == 4 and first.exit_code == 1
    assert [f["slide_id"] for f in first.summary.failed] == [late["slide_id"]]
    done = [r["slide_id"] for r in rows[:3]]
    # rows[2]'s patient gets rows[3] the second night: its cells file is rewritten to hold both
    before = snapshot([p for s in done for p in slide_files(out, s, cells=s != done[2])])

    shutil.copyfile(late["uri"], late_image)
    write_catalog(catalog, rows)  # the catalog grows
    result = CliRunner().invoke(app, ["run-job", str(spec)])
    assert result.exit_code == 0, result.output
    assert (
        "nightly: 2 new slide(s) and 1 earlier failure(s) to process; 3 of 6 already committed"
        in said(result)
    )
    assert "3 slide(s) processed, 3 already committed" in said(result)
    assert snapshot([p for s in done for p in slide_files(out, s, cells=s != done[2])]) == before

    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sorted(m["slide_id"] for m in manifest) == sorted(r["slide_id"] for r in rows)
    assert {m["status"] for m in manifest} == {"ok"}

    clean_out = tmp_path / "clean"
    clean = write_spec(
        tmp_path,
        {"kind": "screening", "catalog": str(catalog), "out": str(clean_out)},
        name="clean.yaml",
    )
    assert run_job(load_spec(clean)).summary.processed == 6
    nightly_cells, clean_cells = read_cells(out), read_cells(clean_out)
    assert len(nightly_cells) > 100
    pd.testing.assert_frame_equal(nightly_cells, clean_cells, check_exact=True)

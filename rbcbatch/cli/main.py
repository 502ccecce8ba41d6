"""The `rbcbatch` command line. Scripts and schedulers call these; keep them stable.

The run-time commands are here; the development commands (synth, demo, evaluate, train) are
in rbcbatch.cli.dev, which reaches rbcbatch.dev only inside them.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from rbcbatch.cli.common import (
    GRADING_OPTION,
    PATIENT_COLUMNS,
    STORAGE_OPTION,
    VERBOSE_OPTION,
    _fail,
    _print_table,
    _rules,
    _storage_options,
    app,
    console,
    out_console,
    ray_output_to_log,
    run_catalog,
)
from rbcbatch.errors import RbcbatchError
from rbcbatch.vocabulary import DEFAULT_CLASSIFIER


@app.command("run")
def run_cmd(
    catalog: str = typer.Argument(..., help="Catalog CSV or Parquet (local path or s3:// URL)."),
    out: str = typer.Option(
        ..., "--out", help="Run folder; re-running into it resumes (committed slides are skipped)."
    ),
    segmenter: str = typer.Option(
        "classical",
        help="Segmenter: classical (OD threshold + watershed) or unet (learned, shipped weights).",
    ),
    classifier: str = typer.Option(
        DEFAULT_CLASSIFIER,
        help="Morphology classifier: resnet (learned, shipped weights; the default) or rules "
        "(measured thresholds, no network).",
    ),
    workers: int = typer.Option(
        None, help="Actors in the pool (default: one per CPU in the cluster)."
    ),
    address: str = typer.Option(
        None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."
    ),
    new_config: bool = typer.Option(
        False,
        "--new-config",
        help="Allow a changed configuration in an existing run folder; every slide is redone.",
    ),
    stall_timeout: float = typer.Option(
        None,
        "--stall-timeout",
        help="Stop with an error when no slide moves through the workers for this many seconds "
        "(default 1800; 0 waits forever). Committed slides are kept; re-run to resume.",
    ),
    storage_option: list[str] = STORAGE_OPTION,
    deidentify: bool = typer.Option(
        False,
        "--deidentify",
        help="Replace patient and slide ids by keyed hashes (HMAC-SHA256, key from the "
        "environment variable RBCBATCH_DEID_KEY, at least 16 bytes) before anything is written, "
        "and write no image URIs. Resuming needs the same key.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Run even if another rbcbatch run seems to hold the folder (its lease is live); "
        "use only when that run is known to be gone.",
    ),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Segment, measure and classify every red cell of a catalog's slides.

    Exit status: 0 when every slide is committed, 1 when some failed (their reasons are in
    OUT/failures.parquet), 2 for a usage, configuration or storage error (a full disk, a
    read-only or unreachable run folder, a folder in use by another run).
    """
    deidentify_key = None
    if deidentify:
        from rbcbatch.io.deidentify import key_from_env, key_id

        try:
            deidentify_key = key_from_env()
        except RbcbatchError as e:
            _fail(str(e))
        console.print(
            f"de-identifying: patient and slide ids hashed with key id {key_id(deidentify_key)}"
        )
    try:
        summary = run_catalog(
            catalog,
            out,
            segmenter,
            classifier,
            workers,
            address,
            new_config,
            stall_timeout=stall_timeout,
            storage_options=_storage_options(storage_option, catalog, out, announce=True),
            deidentify_key=deidentify_key,
            verbose=verbose,
            force=force,
        )
    except (RbcbatchError, KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    console.print(
        f"run {summary.run_id}: {summary.processed} slide(s) processed, {summary.skipped} already "
        f"committed, {summary.objects} objects, {summary.seconds:.1f} s → {out}"
    )
    if summary.n_failed:
        for row in summary.failed[:20]:
            console.print(f"  [red]failed[/red] {row['slide_id']!r}: {row['message']}")
        console.print(
            f"[red]{summary.n_failed} of {summary.total} slide(s) failed[/red]; see {out}/failures.parquet"
        )
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="A run folder written by `rbcbatch run`."),
    rules: Path = typer.Option(
        None, help="YAML file overriding screening thresholds (see ScreeningRules)."
    ),
    csv: bool = typer.Option(False, "--csv", help="Print CSV with a header instead of a table."),
    grading: str = GRADING_OPTION,
    storage_option: list[str] = STORAGE_OPTION,
    html: Path = typer.Option(
        None,
        "--html",
        help="Write the report as one self-contained HTML file (tables, plots, example cells, "
        "provenance) instead of printing the table.",
    ),
    truth: Path = typer.Option(
        None,
        "--truth",
        help="With --html: folder holding truth.parquet and truth_masks/ (`rbcbatch synth`) for "
        "the cell-level confusion matrix (default: looked for beside the catalog).",
    ),
) -> None:
    """Print the patient table: indicators and HS / anemia screening flags (or, with --html,
    write the whole report as one HTML file)."""
    from rbcbatch.analytics import query as run_query

    options = _storage_options(storage_option, run_dir)
    if html is not None:
        from rbcbatch.report.html import write_report

        try:
            write_report(run_dir, html, _rules(rules), truth, options, grading)
        except (FileNotFoundError, ValueError, RbcbatchError) as e:
            _fail(str(e))
        console.print(f"wrote {html}")
        return
    try:
        table = run_query(
            run_dir, f"SELECT {PATIENT_COLUMNS} FROM patients", _rules(rules), options, grading
        )
    except (FileNotFoundError, ValueError, RbcbatchError) as e:
        _fail(str(e))
    _print_table(table, "patients", csv)


@app.command()
def query(
    run_dir: str = typer.Argument(..., help="A run folder written by `rbcbatch run`."),
    sql: str = typer.Argument(..., help="SQL over the views cells, slides, sites, patients."),
    csv: bool = typer.Option(False, "--csv", help="Print CSV with a header."),
    rules: Path = typer.Option(None, help="YAML file overriding screening thresholds."),
    storage_option: list[str] = STORAGE_OPTION,
    grading: str = GRADING_OPTION,
) -> None:
    """Run SQL over a run's views (cells, slides, sites, patients)."""
    import duckdb

    from rbcbatch.analytics import query as run_query

    options = _storage_options(storage_option, run_dir)
    try:
        table = run_query(run_dir, sql, _rules(rules), options, grading)
    except (FileNotFoundError, ValueError, duckdb.Error, RbcbatchError) as e:
        _fail(str(e))
    _print_table(table, None, csv)


@app.command()
def schemas(
    write: bool = typer.Option(
        False, "--write", help="Rewrite the files in the folder instead of checking them."
    ),
    folder: Path = typer.Option(Path("schemas"), help="Folder holding the schema files."),
) -> None:
    """Check (or rewrite) schemas/*.json against the code's Parquet schemas."""
    from rbcbatch.cli.schemas import check_schema_files

    problems = check_schema_files(folder, write=write)
    for p in problems:
        console.print(f"[red]{p}[/red]")
    raise typer.Exit(1 if problems else 0)


@app.command("run-job")
def run_job_cmd(
    spec: str = typer.Argument(..., help="Job spec YAML: a path or a URL (see jobs/README.md)."),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Run a job spec here: screening, nightly (only slides not committed yet), training or shift.

    Exit status: 0 when the job is done, 1 when some slides failed, 2 for a bad spec, a
    configuration or storage error, or a job kind this version cannot run.
    """
    from rbcbatch.jobs.specs import load_spec, run_job

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    try:
        job = load_spec(spec)
        with ray_output_to_log(str(job.get("out") or "."), console, None, verbose):
            outcome = run_job(job, say=say)
    except (RbcbatchError, KeyError, ValueError) as e:
        _fail(str(e).strip("'\""))
    for line in outcome.lines:
        say(line)
    raise typer.Exit(outcome.exit_code)


@app.command()
def submit(
    spec: str = typer.Argument(
        ..., help="Job spec YAML: a local file (sent with the job) or a URL the cluster can read."
    ),
    address: str = typer.Option(
        ...,
        "--address",
        envvar="RAY_ADDRESS",
        help="The cluster's Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS).",
    ),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="Only submit: print the submission id and return."
    ),
    python: str | None = typer.Option(
        None,
        "--python",
        help="Absolute path of the Python that runs rbcbatch on the cluster (`PYTHON -m "
        "rbcbatch.cli run-job SPEC`); default: the cluster's `rbcbatch` command.",
    ),
) -> None:
    """Run a job spec on a Ray cluster (`rbcbatch run-job SPEC` via the Jobs API) and follow it.

    The spec is checked here first; its locations must be URLs (s3://...) or absolute paths
    that every node can read. Prints the submission id, then the job's own log lines as they
    come. Exit status: the job's, as run-job gives it (0 done, 1 some slides failed, 2 an
    error); 2 as well when the job could not be submitted or ended otherwise (the tail of its
    log is printed). With --no-wait: 0 once the job is submitted.
    """
    from rbcbatch.jobs.submit import follow
    from rbcbatch.jobs.submit import submit as submit_job

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    try:
        job_id = submit_job(spec, address, python=python)
    except RbcbatchError as e:
        _fail(str(e))
    out_console.print(job_id)
    if no_wait:
        say(f"submitted {spec}; follow it with: ray job logs {job_id} --address {address} --follow")
        return
    say(f"submitted {spec} as {job_id}; following it (Ctrl-C stops following, not the job)")
    try:
        end = follow(job_id, address, say=say)
    except KeyboardInterrupt:
        say(
            f"stopped following {job_id}, which goes on: ray job logs {job_id} --address "
            f"{address} --follow (or ray job stop {job_id} --address {address})"
        )
        raise typer.Exit(130) from None
    except RbcbatchError as e:
        _fail(str(e))
    for line in end.report(address):
        say(line)
    raise typer.Exit(end.exit_code)


@app.command()
def shift(
    run_dir: str = typer.Argument(..., help="A run folder written by `rbcbatch run`."),
    by: str = typer.Option("site", help="Compare groups of this column: site, scanner, cohort."),
    reference: str = typer.Option(
        None, "--reference", help="The reference group (default: the one with the most red cells)."
    ),
    out: str = typer.Option(None, "--out", help="Folder for the outputs (default: RUN_DIR/shift)."),
    features: str = typer.Option(
        "all",
        help="Cell features compared: all (64-d embedding + colour), embedding, or colour (mean "
        "RGB and optical density; works on runs made with the rules classifier).",
    ),
    classes: str = typer.Option(
        "normal",
        help="Predicted classes compared, comma-separated, in equal numbers per side; 'all' "
        "matches every class's share (controls for the morphology mix).",
    ),
    permutations: int = typer.Option(200, help="Label permutations behind each p-value."),
    auc_threshold: float = typer.Option(0.75, help="Flag a group whose AUC reaches this ..."),
    alpha: float = typer.Option(0.05, help="... and whose permutation p-value is below this."),
    min_cells: int = typer.Option(50, help="Fewest matched cells per side a comparison needs."),
    map_cells: int = typer.Option(1500, help="Cells in the t-SNE map (0: no map)."),
    seed: int = typer.Option(0, help="Seed of the samples, permutations and map."),
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """Dataset shift: how far each site's red cells are from a reference site's.

    Prints one row per group (AUC of a classifier telling it from the reference, 0.5 = alike;
    permutation p-value; MMD; flagged) and writes shift_scores.csv, shift_scores.parquet and
    shift_map.png (t-SNE by group and by class). Exit status 0, or 2 when the analysis cannot
    be done (the message says why).
    """
    import pyarrow as pa

    from rbcbatch.analytics.shift import (
        ShiftSettings,
        parse_classes,
        shift_analysis,
        write_shift_outputs,
    )

    options = _storage_options(storage_option, run_dir)
    out = out or f"{run_dir.rstrip('/')}/shift"
    try:
        settings = ShiftSettings(
            classes=parse_classes(classes),
            n_permutations=permutations,
            auc_threshold=auc_threshold,
            alpha=alpha,
            min_cells=min_cells,
            max_cells=max(ShiftSettings.max_cells, min_cells),
            map_cells=map_cells,
        )
        report = shift_analysis(run_dir, by, reference, options, seed, features, settings)
        written = write_shift_outputs(report, out, options)
    except (ValueError, RbcbatchError) as e:
        _fail(str(e))
    _print_table(
        pa.Table.from_pandas(report.scores, preserve_index=False),
        f"shift by {by} against {report.reference} ({report.features} features)",
    )
    flagged = ", ".join(report.flagged) or "none"
    console.print(f"out of distribution (AUC >= {auc_threshold}, p < {alpha}): {flagged}")
    for path in written:
        console.print(f"wrote {path}", markup=False, highlight=False)


def main() -> None:  # pragma: no cover
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

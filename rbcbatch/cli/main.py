"""The `rbcbatch` command line. Scripts and schedulers call these; keep them stable."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rbcbatch.cli.console import ray_output_to_log
from rbcbatch.errors import RbcbatchError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Screen blood-smear archives for anemia and hereditary spherocytosis, cell by cell.",
)
console = Console(stderr=True)
# Tables are wide; when piped (no terminal to measure), print them at a width that fits them.
out_console = Console() if sys.stdout.isatty() else Console(width=220)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@app.command()
def synth(
    out_dir: Path = typer.Argument(
        ..., help="Folder to write images, catalog.csv, truth.parquet and truth_masks/ into."
    ),
    patients: int = typer.Option(
        6, "--patients", min=1, help="Number of patients (conditions round-robin normal, hs, ida)."
    ),
    images_per_patient: int = typer.Option(
        2, "--images-per-patient", min=1, help="Smear fields per patient."
    ),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same bytes."),
    height: int = typer.Option(600, help="Image height in pixels."),
    width: int = typer.Option(800, help="Image width in pixels."),
) -> None:
    """Generate a synthetic cohort with exact per-cell ground truth."""
    from rbcbatch.dev.synth import synth_cohort

    catalog = synth_cohort(out_dir, patients, images_per_patient, seed, height=height, width=width)
    out_console.print(f"wrote {patients * images_per_patient} images; catalog: {catalog}")


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
    )


def run_catalog(
    catalog: str,
    out: str,
    segmenter: str,
    classifier: str,
    workers: int | None,
    address: str | None,
    new_config: bool,
    quiet: bool = False,
    stall_timeout: float | None = None,
    storage_options: dict | None = None,
    deidentify_key: bytes | None = None,
    verbose: bool = False,
    force: bool = False,
):
    """Run the pipeline with a progress bar; returns the RunSummary. Ray's own output goes to
    OUT/_logs/ unless `verbose`."""
    from rbcbatch.engine.config import RunConfig
    from rbcbatch.engine.run import STALL_TIMEOUT_S, run

    config = RunConfig(segmenter=segmenter, classifier=classifier)
    state = {"objects": 0, "failed": 0}
    with (
        ray_output_to_log(out, console, storage_options, verbose),
        _progress() as progress,
    ):
        task = progress.add_task("slides", total=None, note="starting Ray")

        def on_start(pending: int, skipped: int) -> None:
            note = f"{skipped} already committed, skipped" if skipped else ""
            progress.update(task, total=pending, note=note)

        def on_slide(row: dict) -> None:
            state["objects"] += int(row["n_objects"])
            state["failed"] += row["status"] != "ok"
            progress.update(
                task, advance=1, note=f"{state['objects']} cells, {state['failed']} failed"
            )

        summary = run(
            catalog,
            out,
            config,
            address=address,
            workers=workers,
            new_config=new_config,
            stall_timeout_s=STALL_TIMEOUT_S if stall_timeout is None else stall_timeout,
            storage_options=storage_options,
            on_start=on_start,
            on_slide=on_slide,
            deidentify_key=deidentify_key,
            force=force,
        )
    return summary


VERBOSE_OPTION = typer.Option(
    False,
    "--verbose",
    help="Show Ray's own log lines on the console (by default they go to OUT/_logs/ray-*.log).",
)

STORAGE_OPTION = typer.Option(
    None,
    "--storage-option",
    help="fsspec/s3fs option NAME=VALUE, repeatable; dotted names nest, values parse as JSON "
    "(client_kwargs.endpoint_url=http://host:9000, anon=true). Merged over the AWS_* "
    "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
    "AWS_ENDPOINT_URL[_S3], AWS_REGION).",
)


def _storage_options(pairs: list[str] | None, *urls: str, announce: bool = False) -> dict | None:
    """Explicit options from --storage-option; with `announce`, says what s3 gets (no secrets)."""
    from rbcbatch.io.storage import is_s3, options_from_cli, redacted, resolve_options

    try:
        explicit = options_from_cli(pairs)
    except ValueError as e:
        _fail(str(e))
    if announce and any(is_s3(u) for u in urls):
        console.print(f"storage options: {redacted(resolve_options(explicit, *urls))}")
    return explicit or None


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
        "rules",
        help="Morphology classifier: rules (measured thresholds) or resnet (learned, shipped weights).",
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


def _print_table(table, title: str | None = None, csv: bool = False) -> None:
    if csv:
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
        return
    view = Table(title=title, show_lines=False)
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.to_pylist():
        view.add_row(
            *[
                f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))
                for v in row.values()
            ]
        )
    out_console.print(view)


PATIENT_COLUMNS = (
    "patient_id, site, label, n_slides, n_rbc, spherocyte_pct, spherocyte_pct_lo, "
    "spherocyte_pct_hi, spherocyte_grade, microcyte_pct, macrocyte_pct, hypochromic_pct, "
    "poikilocyte_pct, diameter_mean_um, diameter_cv_pct, hs_flag, anemia_flag"
)

GRADING_OPTION = typer.Option(
    None,
    "--grading",
    help="Grading scheme of the *_grade columns: icsh2015 (default), cap_simple, or the path of "
    "a YAML table of cut-offs (schemas/grading.schema.json).",
)


def _rules(path: Path | None):
    from rbcbatch.analytics import ScreeningRules

    return ScreeningRules.from_yaml(str(path)) if path else ScreeningRules()


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
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Folder for the synthetic cohort and the run."),
    patients: int = typer.Option(12, help="Patients in the synthetic cohort."),
    images_per_patient: int = typer.Option(3, help="Smear fields per patient."),
    seed: int = typer.Option(7, help="Random seed of the cohort."),
    workers: int = typer.Option(None, help="Actors in the pool (default: one per CPU)."),
    verbose: bool = VERBOSE_OPTION,
) -> None:
    """Synthesise a cohort, run it, print the patient table and how well it matches truth."""
    from rbcbatch.dev.demo import agreement_tables
    from rbcbatch.dev.synth import synth_cohort

    started = time.perf_counter()
    cohort_dir, run_dir = out / "cohort", out / "run"
    console.print(
        f"[bold]1/3[/bold] synthesising {patients} patients × {images_per_patient} fields → {cohort_dir}"
    )
    catalog = synth_cohort(cohort_dir, patients, images_per_patient, seed)
    console.print(f"[bold]2/3[/bold] running the pipeline → {run_dir}")
    summary = run_catalog(
        str(catalog), str(run_dir), "classical", "rules", workers, None, True, verbose=verbose
    )
    console.print(f"[bold]3/3[/bold] report ({summary.objects} objects in {summary.seconds:.1f} s)")
    from rbcbatch.analytics import query as run_query

    _print_table(run_query(str(run_dir), f"SELECT {PATIENT_COLUMNS} FROM patients"), "patients")
    for title, table in agreement_tables(str(run_dir), cohort_dir / "truth.parquet"):
        _print_table(table, title)
    out_console.print(
        f"demo finished in {time.perf_counter() - started:.1f} s; query it with: "
        f'rbcbatch query {run_dir} "SELECT * FROM patients"'
    )
    if summary.n_failed:
        raise typer.Exit(1)


@app.command()
def evaluate(
    segmenter: str = typer.Option("classical", help="Segmenter to score."),
    classifier: str = typer.Option(
        "rules", help="Morphology classifier to score on synthetic cells."
    ),
    data: Path = typer.Option(
        None, help="Folder holding anerbc_sample/ (default: ../shared/data beside the repository)."
    ),
    synthetic_images: int = typer.Option(24, help="Synthetic fields to score (held-out seed)."),
) -> None:
    """Score segmentation on synthetic truth (count, instance F1) and on real AneRBC masks (Dice)."""
    import pyarrow as pa

    from rbcbatch.dev.evaluate import (
        ANERBC_HELD_OUT,
        ANERBC_TUNED,
        ANERBC_UM_PER_PX,
        default_models,
        evaluate_anerbc,
        evaluate_morphology,
        evaluate_synthetic,
        mean_row,
        synthetic_summary,
    )

    models = default_models(segmenter, classifier)
    rows = evaluate_synthetic(models, synthetic_images)
    _print_table(
        pa.Table.from_pylist(rows), f"{segmenter}: synthetic fields, RBC instances at IoU >= 0.5"
    )
    _print_table(pa.Table.from_pylist([synthetic_summary(rows)]), f"{segmenter}: synthetic summary")
    _print_table(
        pa.Table.from_pylist(evaluate_morphology(models, synthetic_images)),
        f"{classifier} morphology on {segmenter} segments matched to synthetic truth (held-out seed)",
    )
    from rbcbatch.dev.datasets import shared_data_dir

    data = data or shared_data_dir()
    if classifier == "resnet" and (data / "chula_rbc12").is_dir():
        from rbcbatch.dev.train_classifier import evaluate_classifier

        scores = evaluate_classifier(
            "resnet_cells", root=data / "chula_rbc12", confusion_png="classifier_confusion.png"
        )
        recall, f1 = scores["recall"], scores["f1"]
        rows = [
            {"class": c, "recall": recall[c], "f1": f1[c]}
            for c in sorted(recall, key=lambda c: (c != "spherocyte", c))
        ]
        _print_table(
            pa.Table.from_pylist(rows),
            f"resnet on the Chula RBC-12 test split: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}",
        )
        console.print("confusion matrix: classifier_confusion.png")
    if not (data / "anerbc_sample").is_dir():
        console.print(
            f"[yellow]AneRBC sample not found under {data}; skipping the real-image scores[/yellow]"
        )
        return
    for title, ids in (("held out", ANERBC_HELD_OUT), ("used for tuning", ANERBC_TUNED)):
        scored = evaluate_anerbc(models, data, ids)
        _print_table(
            pa.Table.from_pylist(scored + [mean_row(scored, "mean")]),
            f"{segmenter}: AneRBC-I foreground vs given masks, {title} (assumed {ANERBC_UM_PER_PX} µm/px)",
        )


@app.command()
def train(
    what: str = typer.Argument(..., help="segmenter or classifier"),
    out: Path = typer.Option(
        None, help="Weights file to write (default: the shipped one in rbcbatch/models/weights/)."
    ),
    seed: int = typer.Option(0, help="Random seed (data split, initialisation, augmentation)."),
    minutes: float = typer.Option(
        None, help="Wall-time budget; training stops at the best checkpoint so far."
    ),
    epochs: int = typer.Option(20, help="Classifier: epochs."),
    steps: int = typer.Option(1000, help="Segmenter: optimiser steps."),
) -> None:
    """Reproduce the shipped weights: train a model and write its weights and model card.

    Reads the real data from ../shared/data (or $RBCBATCH_SHARED_DATA); CPU works, a GPU is faster.
    """
    if what == "classifier":
        from rbcbatch.dev.train_classifier import SHIPPED_WEIGHTS, train_classifier

        card = train_classifier(
            out=out or SHIPPED_WEIGHTS,
            epochs=epochs,
            seed=seed,
            time_limit_s=minutes * 60 if minutes else None,
        )
    elif what == "segmenter":
        from dataclasses import replace

        from rbcbatch.dev.train_segmenter import MAIN_PHASE, train_segmenter
        from rbcbatch.models import WEIGHTS_DIR

        card = train_segmenter(
            out_weights=out or WEIGHTS_DIR / "unet_rbc.safetensors",
            seed=seed,
            phase=replace(MAIN_PHASE, steps=steps),
            **({"minutes": minutes} if minutes else {}),
        )
    else:
        _fail(f"unknown model {what!r}; choose segmenter or classifier")
    out_console.print_json(data=card.metrics)


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

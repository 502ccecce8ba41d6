"""What the commands share: the Typer app, the consoles, errors, progress and common options."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rbcbatch.cli.console import ray_output_to_log

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

"""The development commands: synthetic cohorts, the demo, evaluation and training.

Each reaches rbcbatch.dev only inside itself, so the run-time commands never load it.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from rbcbatch.cli.common import (
    PATIENT_COLUMNS,
    VERBOSE_OPTION,
    _fail,
    _print_table,
    app,
    console,
    out_console,
    run_catalog,
)
from rbcbatch.vocabulary import DEFAULT_CLASSIFIER


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
        str(catalog),
        str(run_dir),
        "classical",
        DEFAULT_CLASSIFIER,
        workers,
        None,
        True,
        verbose=verbose,
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
        DEFAULT_CLASSIFIER, help="Morphology classifier to score (resnet or rules)."
    ),
    data: Path = typer.Option(
        None, help="Folder holding anerbc_sample/ (default: ../shared/data beside the repository)."
    ),
    synthetic_images: int = typer.Option(24, help="Synthetic fields to score (held-out seed)."),
    real: bool = typer.Option(
        False,
        "--real",
        help="Instead: run the whole pipeline on the real held-out smears (AneRBC 004-006, the "
        "PBC held-back split, the Chula RBC-12 and BCCD test splits) and report per data set "
        "the red cells called normal and spherocyte, the HS and anemia flags, and a table of "
        "what its truth scores (points, boxes, labels, pixel size) beside a baseline.",
    ),
    out: Path = typer.Option(
        Path("eval_real"), help="With --real: folder for the catalogs and runs (kept to query)."
    ),
) -> None:
    """Score segmentation on synthetic truth (count, instance F1) and on real AneRBC masks (Dice)."""
    import pyarrow as pa

    if real:
        _evaluate_real(segmenter, classifier, data, out)
        return

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
    epochs: int = typer.Option(None, help="Classifier: epochs (default: the shipped run's)."),
    steps: int = typer.Option(1000, help="Segmenter: optimiser steps."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Classifier: go on from the checkpoint of an interrupted run (.cache/train/).",
    ),
    threads: int = typer.Option(
        2, help="Classifier: torch CPU threads (fewer leaves cores to other work)."
    ),
) -> None:
    """Reproduce the shipped weights: train a model and write its weights and model card.

    Reads the real data from ../shared/data (or $RBCBATCH_SHARED_DATA); CPU works, a GPU is faster.
    """
    if what == "classifier":
        from rbcbatch.dev.train_classifier import EPOCHS, SHIPPED_WEIGHTS, train_classifier

        card = train_classifier(
            out=out or SHIPPED_WEIGHTS,
            epochs=epochs or EPOCHS,
            seed=seed,
            time_limit_s=minutes * 60 if minutes else None,
            resume=resume,
            threads=threads,
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


def _evaluate_real(segmenter: str, classifier: str, data: Path | None, out: Path) -> None:
    """`evaluate --real`: the screening's calls on real smears it was not tuned on, and one
    table per data set of what its own truth can score (points, boxes, labels, pixel size)."""
    import pyarrow as pa

    from rbcbatch.analytics import query
    from rbcbatch.dev.datasets import shared_data_dir
    from rbcbatch.dev.evaluate_real import (
        FLAGS_SQL,
        PER_INDIVIDUAL_SQL,
        SHARES_SQL,
        real_catalogs,
        score_tables,
    )

    started = time.perf_counter()
    data = data or shared_data_dir()
    catalogs = real_catalogs(data, out)
    if not catalogs:
        _fail(f"no real data set (anerbc_sample/, pbc_subset/, chula_rbc12/, bccd/) under {data}")
    runs: dict[str, Path] = {}
    for name, catalog in catalogs.items():
        run_dir = out / f"{name}-{segmenter}-{classifier}"
        console.print(f"[bold]{name}[/bold]: {catalog} → {run_dir}")
        summary = run_catalog(str(catalog), str(run_dir), segmenter, classifier, None, None, True)
        runs[name] = run_dir
        if summary.n_failed:
            console.print(
                f"[yellow]{summary.n_failed} slide(s) failed[/yellow]: {run_dir}/failures.parquet"
            )
        title = f"{name}, {segmenter} + {classifier}"
        _print_table(query(str(run_dir), SHARES_SQL), f"{title}: red cells called")
        _print_table(query(str(run_dir), FLAGS_SQL), f"{title}: flags by label")
        if name.startswith("anerbc"):
            _print_table(query(str(run_dir), PER_INDIVIDUAL_SQL), f"{title}: per individual")
    for title, rows in score_tables(data, runs, catalogs, f"{segmenter} + {classifier}"):
        _print_table(pa.Table.from_pylist(rows), title)
    out_console.print(f"evaluate --real finished in {time.perf_counter() - started:.0f} s")

"""Throughput, side by side in one run: naive loop, pipeline, model-only ceiling; 1..N workers.

Usage: python bench/throughput.py [--images 32] [--workers 2] [--segmenter unet]
                                  [--classifier resnet] [--out /tmp/rbcbatch-bench]
                                  [--results bench/RESULTS.md]

All figures are megapixels of slide per second (MP/s) over the same synthetic cohort:

* naive: one process, one image at a time (decode, segment the whole image through the same
  tiling, measure, classify, write), the way a script without a scheduler would do it;
* pipeline: `rbcbatch.engine.run` with 1..N actors, Ray start-up excluded (paid once per
  command), actor start-up and model loading included;
* model-only: the segmentation network alone on the same tiles, already cut and converted to
  input tensors in memory, in N processes at once: the ceiling the pipeline can approach.

The table goes to stdout and, with --results, replaces the section of that Markdown file that
describes this machine, so a GPU machine's run and a CPU machine's run can sit side by side.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def machine_name() -> str:
    """CPU model, core count and GPU (if any) in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs, {gpu}"


def naive_loop(catalog: Path, out: Path, config) -> float:
    """Seconds for one process to do every slide in turn (models built before the clock starts)."""
    from rbcbatch.engine.config import Models
    from rbcbatch.engine.slide import cells_table, segment_slide
    from rbcbatch.io.catalog import load_catalog
    from rbcbatch.io.sources import read_slide
    from rbcbatch.measure import measure_cells
    from rbcbatch.store.run_store import RunStore

    models = Models(config)
    store = RunStore(str(out))
    provenance = {"run_id": "naive", "config_hash": "naive", "code_version": "naive"}
    slides = load_catalog(str(catalog)).slides
    started = time.perf_counter()
    for spec in slides:
        image = read_slide(spec.slide_id, spec.uri)
        labels, kinds, stats = segment_slide(image, spec.um_per_px, models)
        columns = measure_cells(labels, image, spec.um_per_px, background_rgb=stats.background_rgb)
        calls = models.classifier(columns, image, spec.um_per_px)
        table = cells_table(columns, kinds, calls, models, spec, provenance)
        store.write_mask(spec.slide_id, labels, spec.um_per_px, {"slide_id": spec.slide_id}, image)
        store.write_cells(spec.cohort, spec.patient_id, spec.slide_id, table)
    return time.perf_counter() - started


def model_inputs(catalog: Path, config) -> list:
    """The segmentation network's input tensors for every tile of every slide, as the pipeline
    cuts them (working resolution, halo, padding)."""
    import numpy as np

    from rbcbatch.engine.config import Models
    from rbcbatch.engine.slide import prepare_slide
    from rbcbatch.io.catalog import load_catalog
    from rbcbatch.io.sources import read_slide
    from rbcbatch.segment.unet import _padded, image_to_input

    models = Models(config)
    inputs = []
    for spec in load_catalog(str(catalog)).slides:
        work = prepare_slide(read_slide(spec.slide_id, spec.uri), spec.um_per_px, models)
        for tile in work.tiles:
            crop = work.work[tile.outer_slices]
            x = np.zeros((1, 3, _padded(crop.shape[0]), _padded(crop.shape[1])), np.float32)
            x[0, :, : crop.shape[0], : crop.shape[1]] = image_to_input(
                crop, work.stats.background_rgb
            )
            inputs.append(x)
    return inputs


def _model_only_worker(args) -> float:
    """One process: run the network over its share of tiles, return the seconds it took."""
    inputs, barrier = args
    import torch

    from rbcbatch.segment.unet import UNetSegmenter

    torch.set_num_threads(1)
    seg = UNetSegmenter()
    with torch.inference_mode():
        seg.model(torch.from_numpy(inputs[0]))  # warm-up: allocator, kernels
        barrier.wait()
        started = time.perf_counter()
        for x in inputs:
            seg.model(torch.from_numpy(x).to(seg.device))
    return time.perf_counter() - started


def model_only(inputs: list, workers: int) -> float:
    """Seconds for `workers` processes (one thread each) to run the network over all tiles."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(workers)
        shares = [(inputs[i::workers], barrier) for i in range(workers)]
        with ctx.Pool(workers) as pool:
            return max(pool.map(_model_only_worker, shares))


def results_markdown(machine: str, setup: str, rows: list[tuple], ratios: list[str]) -> str:
    lines = [
        f"## {machine}",
        "",
        setup,
        "",
        "| what | workers | seconds | MP/s |",
        "|---|---:|---:|---:|",
        *[f"| {what} | {w} | {s:.1f} | {mps:.2f} |" for what, w, s, mps in rows],
        "",
        *[f"- {r}" for r in ratios],
        "",
    ]
    return "\n".join(lines)


def write_results(path: Path, section: str, machine: str) -> None:
    """Replace this machine's section of the results file (or append it)."""
    head = "# Throughput results\n\nWritten by `python bench/throughput.py --results bench/RESULTS.md`.\n\n"
    text = path.read_text() if path.exists() else head
    parts = text.split("\n## ")
    kept = [parts[0]] + [p for p in parts[1:] if not p.startswith(machine)]
    path.write_text("\n## ".join(kept).rstrip("\n") + "\n\n" + section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--segmenter", default="unet")
    parser.add_argument("--classifier", default="resnet")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rbcbatch-bench"))
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from rbcbatch.dev.synth import synth_cohort
    from rbcbatch.engine.config import RunConfig
    from rbcbatch.engine.run import connect_ray, run

    config = RunConfig(segmenter=args.segmenter, classifier=args.classifier)
    shutil.rmtree(args.out, ignore_errors=True)
    catalog = synth_cohort(args.out / "cohort", max(1, args.images // 2), 2, seed=5)
    megapixels = sum(r["width"] * r["height"] for r in _sizes(catalog)) / 1e6
    rows = []

    import torch

    naive_threads = torch.get_num_threads()
    seconds = naive_loop(catalog, args.out / "naive", config)
    rows.append(("naive loop", 1, seconds, megapixels / seconds))

    t0 = time.perf_counter()
    connect_ray()
    ray_start = time.perf_counter() - t0
    worker_counts = sorted({1, args.workers})
    pipeline = {}
    for workers in worker_counts:
        out = args.out / f"run_w{workers}"
        summary = run(str(catalog), str(out), config, workers=workers)
        assert summary.n_failed == 0, summary.failed
        assert pq.read_table(out / "manifest.parquet").num_rows == len(_sizes(catalog))
        pipeline[workers] = megapixels / summary.seconds
        rows.append(("pipeline", workers, summary.seconds, pipeline[workers]))

    ceiling = {}
    if args.segmenter == "unet":
        inputs = model_inputs(catalog, config)
        for workers in worker_counts:
            seconds = model_only(inputs, workers)
            ceiling[workers] = megapixels / seconds
            rows.append(("model only", workers, seconds, ceiling[workers]))

    n = worker_counts[-1]
    naive = rows[0][3]
    ratios = [
        f"pipeline / naive loop ({n} workers vs 1 process): {pipeline[n] / naive:.2f}",
        f"scaling efficiency 1 → {n} workers: {pipeline[n] / (n * pipeline[1]):.2f} "
        f"(speed-up {pipeline[n] / pipeline[1]:.2f}×)",
    ]
    if ceiling:
        ratios.insert(
            0, f"pipeline / model-only ceiling ({n} workers): {pipeline[n] / ceiling[n]:.2f}"
        )
    machine = machine_name()
    setup = (
        f"{len(_sizes(catalog))} synthetic 800×600 fields ({megapixels:.1f} MP), segmenter "
        f"`{args.segmenter}`, classifier `{args.classifier}`, float32 on CPU / the card's autocast on "
        f"GPU; Ray start-up {ray_start:.1f} s excluded, actor start-up and model loading "
        f"included. The naive loop's network runs on {naive_threads} torch threads (every core); "
        f"each pipeline actor and each model-only process on one. "
        f"Measured {time.strftime('%Y-%m-%d')}."
    )
    section = results_markdown(machine, setup, rows, ratios)
    print(section)
    if args.results:
        write_results(args.results, section, machine)


def _sizes(catalog: Path) -> list[dict]:
    """Width and height of each slide, read from the files' headers."""
    from PIL import Image

    from rbcbatch.io.catalog import load_catalog

    sizes = []
    for spec in load_catalog(str(catalog)).slides:
        with Image.open(spec.uri) as im:
            sizes.append({"width": im.width, "height": im.height})
    return sizes


if __name__ == "__main__":
    main()

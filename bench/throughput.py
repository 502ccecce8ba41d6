"""Throughput, side by side in one run: naive loop, pipeline, model-only ceiling; 1..N workers.

Usage: python bench/throughput.py [--images 32] [--workers 2] [--segmenter unet]
                                  [--classifier resnet] [--out /tmp/rbcbatch-bench]
                                  [--results bench/RESULTS.md]

All figures are megapixels of slide per second (MP/s) over the same synthetic cohort:

* naive: one process, one image at a time (decode, segment the whole image through the same
  tiling, measure, classify, write), the way a script without a scheduler would do it;
* pipeline: `rbcbatch.engine.run` (read tasks → 1..N model actors → write tasks), Ray
  start-up excluded (paid once per command), actor start-up and model loading included; its
  model stage's busy fraction from the slides' commit records;
* model-only: the segmentation network alone on the same tiles, already cut and converted to
  input tensors in memory, in N processes at once: the ceiling the pipeline can approach.

Then each stage alone on one thread (read, prepare, segmentation network, instance separation,
stitch, measurements, crops, classifier network, write) as MP/s per core, against the budget a
GPU node sets (GPU_TARGET_MPS over CORES_PER_GPU cores).

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


# The budget the design holds every CPU stage to (docs/DESIGN.md): one GPU runs the shipped
# networks at ~600 MP/s, a GPU node has ~16 cores per GPU, so a CPU stage needs 600 / 16 ≈ 40
# MP/s per core to keep it fed.
GPU_TARGET_MPS = 600.0
CORES_PER_GPU = 16


def stage_seconds(catalog: Path, config, out: Path) -> dict[str, float]:
    """Seconds of each stage of the flow over every slide, on this thread alone, in the order
    a slide meets them. The networks are timed apart from the work around them."""
    import numpy as np

    from rbcbatch.classify.crops import slide_crops
    from rbcbatch.classify.resnet import fixed_standardisation, predict_crops
    from rbcbatch.engine.config import Models
    from rbcbatch.engine.slide import cells_table, prepare_slide, stitch_slide
    from rbcbatch.io.catalog import load_catalog
    from rbcbatch.io.sources import read_slide
    from rbcbatch.measure.tensor import measure_cells_tensor
    from rbcbatch.segment.unet import _padded, postprocess
    from rbcbatch.store.run_store import RunStore

    models = Models(config)
    seg, clf = models.segmenter, models.classifier
    store = RunStore(str(out))
    provenance = {"run_id": "stages", "config_hash": "stages", "code_version": "stages"}
    t = dict.fromkeys(
        ("read", "prepare", "segmentation network", "instance separation", "stitch",
         "measure (tensor)", "crops", "classifier network", "write"), 0.0
    )  # fmt: skip

    def timed(name, fn, *args, **kw):
        started = time.perf_counter()
        result = fn(*args, **kw)
        t[name] += time.perf_counter() - started
        return result

    for spec in load_catalog(str(catalog)).slides:
        image = timed("read", read_slide, spec.slide_id, spec.uri)
        work = timed("prepare", prepare_slide, image, spec.um_per_px, models.geometry)
        segs = []
        for tile in work.tiles:
            crop = np.ascontiguousarray(work.work[tile.outer_slices])
            if not hasattr(seg, "_predict"):  # the classical segmenter: no network
                segs.append(timed("instance separation", seg, crop, work.stats))
                continue
            shape = (_padded(crop.shape[0]), _padded(crop.shape[1]))
            probs, interior = timed(
                "segmentation network", seg._predict, [crop], shape, [work.stats]
            )
            h, w = crop.shape[:2]
            segs.append(
                timed("instance separation", postprocess, probs[0, :, :h, :w], interior[0, :h, :w],
                      seg.um_per_px, seg.fg_threshold, seg.seed_threshold)
            )  # fmt: skip
        labels, kinds = timed("stitch", stitch_slide, work, segs)
        columns = timed(
            "measure (tensor)", measure_cells_tensor, labels, image, spec.um_per_px,
            background_rgb=work.stats.background_rgb,
        )  # fmt: skip
        if hasattr(clf, "card"):
            points = np.stack([columns["centroid_x"], columns["centroid_y"]], axis=1)
            crops = timed("crops", slide_crops, image, points, columns, spec.um_per_px,
                          clf.crop_um, clf.card.input_px)  # fmt: skip
            timed("classifier network", predict_crops, clf.model, crops,
                  standardise=fixed_standardisation(clf.input))  # fmt: skip
        calls = clf(columns, image, spec.um_per_px)  # the calls themselves, untimed
        started = time.perf_counter()
        table = cells_table(columns, kinds, calls, models, spec, provenance)
        store.write_mask(spec.slide_id, labels, spec.um_per_px, {"slide_id": spec.slide_id}, image)
        store.write_cells(spec.cohort, spec.patient_id, spec.slide_id, table)
        t["write"] += time.perf_counter() - started
    return {k: v for k, v in t.items() if v > 0}


# Where each stage runs on a GPU node in this design (engine.stages): CPU tasks, the model
# actor's GPU, or the model actor's own CPU beside its GPU.
STAGE_PLACES = {
    "read": "CPU task",
    "prepare": "CPU task",
    "segmentation network": "GPU",
    "instance separation": "model actor's CPU",
    "stitch": "model actor's CPU",
    "measure (tensor)": "GPU",
    "crops": "model actor's CPU",
    "classifier network": "GPU",
    "write": "CPU task",
}


def budget_markdown(seconds: dict[str, float], megapixels: float) -> str:
    """Per-stage MP/s per core against the budget of one GPU at GPU_TARGET_MPS: a CPU task
    stage must reach GPU_TARGET_MPS / CORES_PER_GPU per core; work the model actor does on its
    own CPU must reach GPU_TARGET_MPS on that one core, or move."""
    need = GPU_TARGET_MPS / CORES_PER_GPU
    lines = [
        "Per-stage budget: each stage alone on one thread of this machine over the same fields. "
        f"One GPU at {GPU_TARGET_MPS:g} MP/s stays fed only if every CPU task stage reaches "
        f"{need:g} MP/s per core ({GPU_TARGET_MPS:g} / {CORES_PER_GPU} cores per GPU) and the "
        f"work the model actor does on its one CPU reaches {GPU_TARGET_MPS:g} MP/s there.",
        "",
        "| stage | seconds | MP/s per core | where on a GPU node | cores for 600 MP/s | verdict |",
        "|---|---:|---:|---|---:|---|",
    ]
    for name, s in seconds.items():
        rate = megapixels / s
        where = STAGE_PLACES[name]
        if where == "GPU":
            verdict = "on the GPU"
        elif where == "CPU task":
            verdict = "meets the budget" if rate >= need else "falls short"
        else:
            verdict = (
                "meets the budget" if rate >= GPU_TARGET_MPS else "falls short (holds the GPU)"
            )
        cores = GPU_TARGET_MPS / rate
        lines.append(f"| {name} | {s:.2f} | {rate:.2f} | {where} | {cores:.0f} | {verdict} |")
    return "\n".join(lines) + "\n"


def busy_fraction(run_dir: Path, seconds: float, actors: int) -> float:
    """Share of the model actors' wall time spent segmenting, measuring and classifying
    (the commit records' segment_s + measure_s)."""
    import pyarrow.parquet as pq

    manifest = pq.read_table(run_dir / "manifest.parquet").to_pydict()
    busy = sum(manifest["segment_s"]) + sum(manifest["measure_s"])
    return busy / (seconds * actors)


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
        work = prepare_slide(read_slide(spec.slide_id, spec.uri), spec.um_per_px, models.geometry)
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


def results_markdown(
    machine: str, setup: str, rows: list[tuple], ratios: list[str], budget: str
) -> str:
    lines = [
        f"## {machine}",
        "",
        setup,
        "",
        "| what | workers | seconds | MP/s | model stage busy |",
        "|---|---:|---:|---:|---:|",
        *[f"| {what} | {w} | {s:.1f} | {mps:.2f} | {busy} |" for what, w, s, mps, busy in rows],
        "",
        *[f"- {r}" for r in ratios],
        "",
        budget,
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
    rows.append(("naive loop", 1, seconds, megapixels / seconds, ""))
    torch.set_num_threads(1)
    budget = budget_markdown(stage_seconds(catalog, config, args.out / "stages"), megapixels)
    torch.set_num_threads(naive_threads)

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
        busy = busy_fraction(out, summary.seconds, workers)
        rows.append(("pipeline", workers, summary.seconds, pipeline[workers], f"{busy:.2f}"))

    ceiling = {}
    if args.segmenter == "unet":
        inputs = model_inputs(catalog, config)
        for workers in worker_counts:
            seconds = model_only(inputs, workers)
            ceiling[workers] = megapixels / seconds
            rows.append(("model only", workers, seconds, ceiling[workers], ""))

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
        f"the pipeline's read and write tasks share the cores with its model actors "
        f"(engine.run.stage_shape), each model-only process runs on one. "
        f"Measured {time.strftime('%Y-%m-%d')}."
    )
    section = results_markdown(machine, setup, rows, ratios, budget)
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

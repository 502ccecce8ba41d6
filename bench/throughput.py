"""Throughput of a screening run on this machine: cells/s and megapixels/s, 1 vs N workers.

Usage: python bench/throughput.py [--images 24] [--workers 2] [--out /tmp/rbcbatch-bench]

Both runs use the same synthetic cohort and one Ray instance; the Ray start-up is excluded from
the timed part (it is paid once per run command, not per slide) and reported separately.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rbcbatch-bench"))
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from rbcbatch.pipeline import connect_ray, run
    from rbcbatch.synth import synth_cohort

    shutil.rmtree(args.out, ignore_errors=True)
    catalog = synth_cohort(args.out / "cohort", args.images // 2, 2, seed=5)
    t0 = time.perf_counter()
    connect_ray()
    ray_start = time.perf_counter() - t0
    results = []
    for workers in sorted({1, args.workers}):
        out = args.out / f"run_w{workers}"
        summary = run(str(catalog), str(out), workers=workers)
        manifest = pq.read_table(out / "manifest.parquet").to_pylist()
        megapixels = sum(m["width"] * m["height"] for m in manifest) / 1e6
        results.append((workers, summary.seconds, summary.objects, megapixels))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.images} synthetic 800×600 fields; Ray start-up {ray_start:.1f} s (not timed below)")
    print("workers | seconds | cells | cells/s | MP/s | speed-up vs 1 worker")
    base = results[0][1]
    for workers, seconds, objects, mp in results:
        print(f"{workers:7d} | {seconds:7.1f} | {objects:5d} | {objects / seconds:7.0f} | "
              f"{mp / seconds:4.2f} | {base / seconds:.2f}")


if __name__ == "__main__":
    main()

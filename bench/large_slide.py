"""Peak memory and time of one large slide through `rbcbatch run --workers 1`.

Usage: python bench/large_slide.py [--side 40000] [--covered] [--out /tmp/rbcbatch-large]

Writes a side² pyramidal OME-TIFF at 0.25 µm/px (rbcbatch.dev.synth_wsi): by default glass with four
patches of smear (as tests/test_large_slide.py), with --covered copies of one field over the
whole slide (every region full of cells, the worst case for memory). Prints the slide's manifest
record: peak RSS of the worker process, read/segment/measure/write seconds, objects; and the
command's wall time (Ray start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rbcbatch.dev.synth_wsi import covering_patches, four_patches, write_pyramid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=40_000)
    parser.add_argument("--covered", action="store_true", help="cells over the whole slide")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rbcbatch-large"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    started = time.perf_counter()
    patches, glass = covering_patches(args.side) if args.covered else four_patches(args.side, 4096)
    slide = write_pyramid(args.out / "slide.ome.tif", args.side, args.side, glass, patches, 0.25)
    print(
        f"wrote {slide} ({slide.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s"
    )
    catalog = args.out / "catalog.csv"
    catalog.write_text(
        "slide_id,uri,patient_id,site,um_per_px,cohort,scanner,stain,label\n"
        f"large,{slide.name},p1,site_a,,c1,scanA,wright,\n"
    )
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "rbcbatch.cli",
            "run",
            str(catalog),
            "--out",
            str(args.out / "run"),
            "--workers",
            "1",
        ],
        check=True,
        env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"},
    )
    wall = time.perf_counter() - started
    record = json.loads((args.out / "run" / "_slides" / "large.json").read_text())
    decoded_gb = args.side**2 * 3 / 1e9
    print(
        f"{args.side}² slide ({decoded_gb:.2f} GB decoded), {record['n_objects']} objects: "
        f"peak RSS of the worker {record['peak_rss_mb']:.0f} MB; read {record['read_s']:.1f} s, "
        f"segment {record['segment_s']:.1f} s, measure {record['measure_s']:.1f} s, "
        f"write {record['write_s']:.1f} s; `rbcbatch run` {wall:.0f} s wall"
    )


if __name__ == "__main__":
    main()

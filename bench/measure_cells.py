"""Per-cell measurement speed, in one run: the scikit-image reference against the tensor path.

Usage: python bench/measure_cells.py [--fields 8] [--threads 1]

Both measure the same synthetic 800×600 fields' true labels (one thread each by default, as one
pipeline actor per core runs); figures are megapixels of slide per second (MP/s) per core and
their ratio (tests/test_measure_tensor.py checks that the two agree).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from rbcbatch.dev.synth import CONDITIONS, SITES, render_field
    from rbcbatch.measure.cells import measure_cells
    from rbcbatch.measure.tensor import measure_cells_tensor

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(11)
    conditions, sites = sorted(CONDITIONS), sorted(SITES)
    fields = [
        render_field(rng, conditions[i % len(conditions)], sites[i % len(sites)], 600, 800)
        for i in range(args.fields)
    ]
    megapixels = sum(f.labels.size for f in fields) / 1e6
    cells = sum(len(np.unique(f.labels)) - 1 for f in fields)
    measure_cells_tensor(fields[0].labels, fields[0].image, 0.25)  # warm-up
    times = {}
    for name, fn in (("scikit-image reference", measure_cells), ("tensor", measure_cells_tensor)):
        started = time.perf_counter()
        for f in fields:
            fn(f.labels, f.image, SITES[sites[0]]["um_per_px"])
        times[name] = time.perf_counter() - started
    print(f"{args.fields} fields, {megapixels:.1f} MP, {cells} objects, {args.threads} thread(s)")
    for name, seconds in times.items():
        print(
            f"  {name:24s} {seconds:6.2f} s  {megapixels / seconds / args.threads:6.2f} MP/s per core"
        )
    ref, new = times["scikit-image reference"], times["tensor"]
    print(f"  tensor / reference speed: {ref / new:.2f}x")


if __name__ == "__main__":
    main()

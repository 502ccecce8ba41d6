"""Render a run's HTML report in headless Chromium and save what a reader sees as a PNG.

    python docs/screenshot.py demo_out/run_resnet --out docs/report.png

Writes the report (report.html beside the run folder unless --html is given), renders its top 1280 x 2400 pixels,
and stores the picture with a 256-colour palette so it stays small enough to keep in the
repository.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from rbcbatch.report.html import screenshot, write_report


def palette_png(path: Path, colours: int = 256) -> int:
    """Rewrite a screenshot with an adaptive palette (text and plots stay sharp); its new size."""
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder written by `rbcbatch run`")
    parser.add_argument("--out", default="docs/report.png", help="PNG to write")
    parser.add_argument(
        "--html", default=None, help="HTML to write (default: report.html beside RUN_DIR)"
    )
    parser.add_argument("--truth", default=None, help="truth folder (default: beside the catalog)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    out = Path(args.out)
    html = Path(args.html) if args.html else Path(args.run_dir).resolve().parent / "report.html"
    write_report(args.run_dir, html, truth_dir=args.truth)
    screenshot(html, out, args.width, args.height)
    size = palette_png(out)
    print(f"{html} ({html.stat().st_size / 1e6:.2f} MB) rendered to {out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

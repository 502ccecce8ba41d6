"""Cells seen in the slides and the run's masks, for the report: example crops and truth.

Example cells are cut from the slide images at a fixed size in µm (so every crop has the same
scale) with the cell's outline drawn from level 0 of the slide's label pyramid in `masks.zarr`
(`RunStore.label_levels`, which reads older runs' layout too), whose labels are the cells'
`cell_id`s. The cell-level agreement with truth matches each slide's mask to the
synthetic truth masks one-to-one at IoU >= 0.5, as `rbcbatch evaluate` does, and counts
(true class, called class) over the red cells the `patients` view counts.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import cv2
import duckdb
import numpy as np

from rbcbatch.errors import RbcbatchError
from rbcbatch.store.run_store import RunStore
from rbcbatch.vocabulary import MORPHOLOGY_CLASSES, OBJECT_KINDS

# Example cells: a few per class, each a square of CROP_UM µm (a WBC is 12-16 µm) shown at
# CROP_PX pixels, so every crop has the same scale whatever the slide's pixel size.
CROPS_PER_CLASS = 6
CROP_UM = 18.0
CROP_PX = 96
OUTLINE_RGB = (0, 150, 255)
OUTSIDE_RGB = (190, 190, 190)  # crop pixels beyond the slide's edge
# Masks larger than this are not read whole for the cell-level confusion matrix (a whole-slide
# mask can be gigabytes); such slides are left out and counted.
CONFUSION_MAX_MASK_PIXELS = 64_000_000
# Morphology classes, then the other kinds of object, in the order reports list them.
CLASS_ORDER = (*MORPHOLOGY_CLASSES, *(k for k in OBJECT_KINDS if k != "rbc"))


def ordered_classes(names: Iterable[str]) -> list[str]:
    """Classes in the report's order (morphology, then other kinds), unknown names last."""
    names = set(names)
    return [c for c in CLASS_ORDER if c in names] + sorted(names - set(CLASS_ORDER))


# -- example cells -----------------------------------------------------------------------------
def example_cells(con: duckdb.DuckDBPyConnection, per_class: int = CROPS_PER_CLASS) -> list[dict]:
    """Up to `per_class` cells of each class, not cut by the image edge: the most confident
    call first (learned classifiers), else the first by slide and cell id."""
    cursor = con.execute(
        """SELECT c.class, c.slide_id, c.cell_id, c.centroid_x, c.centroid_y, c.um_per_px,
                  c.class_probability, s.uri, s.width, s.height
           FROM (SELECT *, row_number() OVER (PARTITION BY class ORDER BY
                         class_probability DESC NULLS LAST, slide_id, cell_id) AS rank
                 FROM cells WHERE NOT touches_edge) c
           JOIN slides s USING (slide_id)
           WHERE rank <= ? ORDER BY class, rank""",
        [per_class],
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def crop_box(
    cx: float, cy: float, um_per_px: float, crop_um: float = CROP_UM
) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a square of `crop_um` µm centred on a centroid, in slide pixels;
    it may reach past the slide's edge."""
    side = max(1, round(crop_um / um_per_px))
    x0 = int(math.floor(cx + 0.5 - side / 2))
    y0 = int(math.floor(cy + 0.5 - side / 2))
    return y0, y0 + side, x0, x0 + side


def padded_window(read, box: tuple[int, int, int, int], shape: tuple[int, int], fill) -> np.ndarray:
    """read(y0, y1, x0, x1) -> array of that window, for a box that may leave the (h, w) slide;
    the part outside is `fill`."""
    y0, y1, x0, x1 = box
    h, w = shape
    inner = (max(y0, 0), min(y1, h), max(x0, 0), min(x1, w))
    sample = read(*inner) if inner[0] < inner[1] and inner[2] < inner[3] else None
    trailing = () if sample is None else sample.shape[2:]
    dtype = np.uint8 if sample is None else sample.dtype
    out = np.empty((y1 - y0, x1 - x0, *trailing), dtype=dtype)
    out[...] = fill
    if sample is not None:
        out[inner[0] - y0 : inner[1] - y0, inner[2] - x0 : inner[3] - x0] = sample
    return out


def outlined_crop(
    pixels: np.ndarray, labels: np.ndarray, cell_id: int, out_px: int = CROP_PX
) -> np.ndarray:
    """A crop (uint8 h x w x 3) resized to out_px², with the outline of `cell_id` in `labels`
    (same h x w) drawn one pixel wide in OUTLINE_RGB at the output resolution."""
    interp = cv2.INTER_AREA if pixels.shape[0] > out_px else cv2.INTER_LINEAR
    crop = cv2.resize(np.ascontiguousarray(pixels), (out_px, out_px), interpolation=interp)
    inside = (labels == cell_id).astype(np.float32)
    inside = cv2.resize(inside, (out_px, out_px), interpolation=cv2.INTER_LINEAR) >= 0.5
    contours, _ = cv2.findContours(
        inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    cv2.drawContours(crop, contours, -1, OUTLINE_RGB, 1)
    return crop


def palette_png(rgb: np.ndarray, colours: int = 128) -> bytes:
    """PNG of an RGB crop with an adaptive palette: a third of the bytes of full colour (stained
    smears are a few hues) and no visible loss at crop size."""
    from PIL import Image

    image = Image.fromarray(rgb).quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def read_mask(mask, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    return mask[y0:y1, x0:x1]


class SlidePixels:
    """Windows of one slide's pixels: read region by region from a tiled TIFF, else decoded
    once whole (the pipeline's own readers)."""

    def __init__(self, slide_id: str, uri: str, storage_options: dict | None):
        from rbcbatch.io.sources import read_slide
        from rbcbatch.io.wsi import is_tiff, open_slide

        self.whole, self.slide = None, None
        if is_tiff(uri, storage_options):
            slide = open_slide(uri, storage_options, slide_id)
            if slide.is_tiled:
                self.slide = slide
            else:
                slide.close()
        if self.slide is None:
            self.whole = read_slide(slide_id, uri, storage_options)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.whole is not None:
            return self.whole[y0:y1, x0:x1]
        return self.slide.read_region(0, y0, x0, y1 - y0, x1 - x0)

    def close(self) -> None:
        if self.slide is not None:
            self.slide.close()


def crop_gallery(
    store: RunStore, cells: list[dict], storage_options: dict | None
) -> tuple[list[dict], list[str]]:
    """[{class, crops: [{png, caption, prob}]}] of the example cells, and notes on slides that
    could not be shown. Slides are opened one at a time, in slide order."""
    crops: dict[int, dict] = {}
    notes: list[str] = []
    by_slide: dict[str, list[int]] = {}
    for index, cell in enumerate(cells):
        by_slide.setdefault(cell["slide_id"], []).append(index)
    unnamed = sorted(s for s, idx in by_slide.items() if not cells[idx[0]]["uri"])
    if unnamed:
        notes.append(
            f"{len(unnamed)} slide(s) are not shown: the run does not name their images "
            "(a de-identified run keeps no image URIs)."
        )
    for slide_id, indices in sorted(by_slide.items()):
        first = cells[indices[0]]
        if slide_id in unnamed:
            continue
        try:
            pixels = SlidePixels(slide_id, first["uri"], storage_options)
        except RbcbatchError as e:
            notes.append(f"slide {slide_id} could not be read for example cells: {e}")
            continue
        try:
            mask = store.label_levels(slide_id)[0]
            shape = (int(first["height"]), int(first["width"]))
            for index in indices:
                cell = cells[index]
                box = crop_box(cell["centroid_x"], cell["centroid_y"], cell["um_per_px"])
                image = padded_window(pixels.read, box, shape, OUTSIDE_RGB)
                labels = padded_window(partial(read_mask, mask), box, shape, 0)
                rgb = outlined_crop(image, labels, int(cell["cell_id"]))
                prob = cell["class_probability"]
                crops[index] = {
                    "png": palette_png(rgb),
                    "caption": f"{slide_id} #{cell['cell_id']}",
                    "prob": "" if prob is None else f"p={prob:.2f}",
                }
        finally:
            pixels.close()
    gallery: dict[str, list[dict]] = {}
    for index, cell in enumerate(cells):
        if index in crops:
            gallery.setdefault(cell["class"], []).append(crops[index])
    return [{"class": c, "crops": gallery[c]} for c in ordered_classes(gallery)], notes


# -- agreement with truth ----------------------------------------------------------------------
def find_truth_dir(slide_uris: Iterable[str]) -> Path | None:
    """The folder `rbcbatch synth` wrote (truth.parquet and truth_masks/ beside catalog.csv),
    looked for in the folders of the slides and their parents; None when there is none."""
    seen: set[Path] = set()
    for uri in slide_uris:
        if not uri or ("://" in uri and not uri.startswith("file://")):
            continue
        folder = Path(uri.removeprefix("file://")).parent
        for candidate in (folder, folder.parent):
            if candidate in seen:
                continue
            seen.add(candidate)
            if (candidate / "truth.parquet").is_file() and (candidate / "truth_masks").is_dir():
                return candidate
    return None


def check_truth_dir(path: Path) -> Path:
    if not (path / "truth.parquet").is_file() or not (path / "truth_masks").is_dir():
        raise FileNotFoundError(
            f"{path} has no truth.parquet and truth_masks/; --truth wants the folder "
            "`rbcbatch synth` wrote (catalog.csv, truth.parquet, truth_masks/)"
        )
    return path


@dataclass
class CellConfusion:
    """Called class against true class of red cells matched to a true red cell (IoU >= 0.5)."""

    truth_classes: list[str]
    called_classes: list[str]
    matrix: np.ndarray  # int64 (len(truth_classes), len(called_classes))
    slides: int
    true_rbc: int  # true red cells on those slides not cut by the image edge
    skipped: list[str] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return int(self.matrix.sum())

    @property
    def agreement(self) -> float:
        common = [c for c in self.truth_classes if c in self.called_classes]
        hits = sum(
            self.matrix[self.truth_classes.index(c), self.called_classes.index(c)] for c in common
        )
        return float(hits / self.matched) if self.matched else float("nan")


def cell_confusion(
    con: duckdb.DuckDBPyConnection, store: RunStore, truth_dir: Path
) -> CellConfusion:
    """Match each committed slide's mask to its truth mask and count (true class, called class)
    over red cells that match a true red cell and are not cut by the image edge (the cells the
    patients view counts)."""
    import pyarrow.parquet as pq

    from rbcbatch.evaluation.metrics import best_match

    truth = pq.read_table(
        truth_dir / "truth.parquet",
        columns=["slide_id", "cell_id", "kind", "cell_class", "touches_border"],
    ).to_pylist()
    true_class: dict[str, dict[int, str]] = {}
    for t in truth:
        if t["kind"] == "rbc":
            true_class.setdefault(t["slide_id"], {})[int(t["cell_id"])] = t["cell_class"]
    uncut_rbc: dict[str, int] = {}
    for t in truth:
        if t["kind"] == "rbc" and not t["touches_border"]:
            uncut_rbc[t["slide_id"]] = uncut_rbc.get(t["slide_id"], 0) + 1
    called: dict[str, list[tuple[int, str]]] = {}
    for slide_id, cell_id, cls in con.execute(
        "SELECT slide_id, cell_id, class FROM cells WHERE kind = 'rbc' AND NOT touches_edge"
    ).fetchall():
        called.setdefault(slide_id, []).append((int(cell_id), cls))
    pairs: dict[tuple[str, str], int] = {}
    slides, true_rbc, skipped = 0, 0, []
    for slide_id, width, height in con.execute(
        "SELECT slide_id, width, height FROM slides ORDER BY slide_id"
    ).fetchall():
        mask_file = truth_dir / "truth_masks" / f"{slide_id}.png"
        if slide_id not in true_class or not mask_file.is_file():
            continue
        if width * height > CONFUSION_MAX_MASK_PIXELS:
            skipped.append(f"{slide_id} (mask of {width}×{height} too large to match whole)")
            continue
        true_labels = cv2.imread(str(mask_file), cv2.IMREAD_UNCHANGED)
        labels = store.label_levels(slide_id)[0][...]
        if true_labels is None or true_labels.shape != labels.shape:
            skipped.append(f"{slide_id} (truth mask missing or of another size)")
            continue
        matches = best_match(labels, true_labels.astype(np.uint32))
        slides += 1
        true_rbc += uncut_rbc.get(slide_id, 0)
        for cell_id, cls in called.get(slide_id, []):
            true_id = matches.get(cell_id)
            if true_id in true_class[slide_id]:
                key = (true_class[slide_id][true_id], cls)
                pairs[key] = pairs.get(key, 0) + 1
    truth_classes = ordered_classes(t for t, _ in pairs)
    called_classes = ordered_classes(c for _, c in pairs)
    matrix = np.zeros((len(truth_classes), len(called_classes)), dtype=np.int64)
    for (t, c), n in pairs.items():
        matrix[truth_classes.index(t), called_classes.index(c)] = n
    return CellConfusion(truth_classes, called_classes, matrix, slides, true_rbc, skipped)

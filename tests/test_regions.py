"""Large slides region by region: geometry against the whole-image path, the same cells from
both paths on a real tiled TIFF, and bad large slides as failures rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from scipy.spatial import cKDTree

from rbcbatch.dev.synth import render_field
from rbcbatch.dev.synth_wsi import write_tiled
from rbcbatch.engine.config import Models, RunConfig, stable_hash
from rbcbatch.engine.regions import (
    GlassView,
    SlideGrid,
    darkest_windows,
    labels_to_full,
    paint_first_claim,
    read_working,
    region_cores,
    region_tiles,
)
from rbcbatch.engine.stages import StageContext, process_here
from rbcbatch.imaging.tiling import TileGeometry, tile_grid
from rbcbatch.io.catalog import SlideSpec
from rbcbatch.io.sources import resample, resize_labels
from rbcbatch.io.wsi import open_slide
from rbcbatch.store.masks import fill_pyramid, mask_level_shapes
from rbcbatch.store.run_store import RunStore
from rbcbatch.store.schema import MANIFEST_FIELDS
from tests.test_wsi import gradient_image

GEOMETRY = TileGeometry(512, 96, 0.25)


def test_region_tiles_are_the_slide_tile_grid():
    work_shape = (2500, 1700)
    grid = tile_grid(*work_shape, GEOMETRY)
    regions = [region_tiles(core, work_shape, GEOMETRY) for core in region_cores(work_shape, 1024)]
    assert len(regions) == 3 * 2 and [len(r) for r in regions] == [4, 4, 4, 4, 2, 2]
    flat = sorted((t for r in regions for t in r), key=lambda t: t.index)
    assert flat == grid  # same cores, halos and indices: the tile rule holds across regions
    for core, tiles in zip(region_cores(work_shape, 1024), regions, strict=True):
        assert all(core[0] <= t.core[0] and t.core[1] <= core[1] for t in tiles)
        assert all(core[2] <= t.core[2] and t.core[3] <= core[3] for t in tiles)


@pytest.mark.parametrize("um_per_px", [0.125, 0.5])  # working scale 2 (down) and 1/2 (up)
def test_working_windows_equal_the_whole_resampled_image(tmp_path, um_per_px):
    image = gradient_image(700, 900, seed=3)
    path = write_tiled(tmp_path / "g.tif", image, um_per_px, n_levels=1)
    scale = um_per_px / GEOMETRY.um_per_px
    whole = resample(image, scale)
    grid = SlideGrid.of(image.shape[:2], scale)
    assert grid.work_shape == whole.shape[:2]
    with open_slide(str(path)) as slide:
        for box in [
            (0, 100, 0, 130),
            (37, 301, 50, 222),
            (whole.shape[0] - 90, whole.shape[0], whole.shape[1] - 77, whole.shape[1]),
        ]:
            y0, y1, x0, x1 = box
            assert np.array_equal(read_working(slide, box, grid), whole[y0:y1, x0:x1]), box


@pytest.mark.parametrize("scale", [0.5, 2.0, 0.37, 1.63])
def test_region_labels_land_where_the_whole_image_path_puts_them(scale):
    full_shape = (611, 733)
    grid = SlideGrid.of(full_shape, scale)
    rng = np.random.default_rng(1)
    canvas = rng.integers(0, 50, grid.work_shape).astype(np.uint32)
    whole = resize_labels(canvas, *full_shape)
    for y0, y1, x0, x1 in [
        (0, 40, 0, 33),
        (17, 101, 29, 150),
        (grid.work_shape[0] - 21, grid.work_shape[0], 5, grid.work_shape[1]),
    ]:
        labels, box = labels_to_full(canvas[y0:y1, x0:x1], (y0, x0), grid)
        assert np.array_equal(labels, whole[box[0] : box[1], box[2] : box[3]])
        rows = np.floor((np.arange(full_shape[0]) + 0.5) * grid.scale_y).astype(int)
        assert (
            box[0] == np.flatnonzero(rows >= y0)[0] and box[1] == np.flatnonzero(rows < y1)[-1] + 1
        )


def test_glass_view_window_test():
    content = np.zeros((50, 60), bool)
    content[20, 30] = True  # one dark view pixel: level-0 rows 80-83, cols 120-123
    view = GlassView(content, (4.0, 4.0))
    assert view.window_has_content((80, 84, 120, 124))
    assert view.window_has_content((0, 77, 0, 117))  # one view pixel of margin
    assert not view.window_has_content((0, 72, 0, 200))
    assert not view.window_has_content((92, 200, 0, 240))


def test_statistics_windows_are_where_the_view_is_darkest():
    view = np.full((100, 120, 3), 230, np.uint8)  # 16× view of a 1600 × 1920 slide
    view[60:70, 80:90] = 150  # cells: level-0 rows 960-1120, cols 1280-1440
    view[5:8, 5:8] = 200  # a speck in the first window
    windows = darkest_windows(view, (16.0, 16.0), (1600, 1920), 256, (1.0, 1.0), 3)
    assert windows == [(1024, 1280, 1280, 1536), (768, 1024, 1280, 1536), (0, 256, 0, 256)]
    # working pixels at half the level-0 scale: the same place in 128-px windows
    assert darkest_windows(view, (16.0, 16.0), (800, 960), 128, (0.5, 0.5), 1) == [
        (512, 640, 640, 768)
    ]


def test_first_claim_wins_between_regions():
    level0 = np.zeros((6, 6), np.uint32)
    paint_first_claim(level0, np.array([[1, 1], [1, 0]], np.uint32), (1, 3, 1, 3))
    paint_first_claim(level0, np.array([[2, 2], [2, 2]], np.uint32), (2, 4, 2, 4))
    assert level0[1:4, 1:4].tolist() == [[1, 1, 0], [1, 2, 2], [0, 2, 2]]


def test_pyramid_built_block_by_block_equals_write_mask(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.zeros((1500, 1300), np.uint32)
    labels[100:400, 900:1250] = rng.integers(1, 9, (300, 350))
    labels[1100:1490, 10:300] = rng.integers(9, 20, (390, 290))
    image = rng.integers(0, 256, (*labels.shape, 3)).astype(np.uint8)
    store = RunStore(str(tmp_path / "run"))
    store.write_mask("whole", labels, 0.25, {"slide_id": "whole"}, image)
    levels = store.create_mask_levels(
        "blocks", labels.shape, 0.25, {"slide_id": "blocks"}, image[::4, ::4]
    )
    levels[0][100:400, 900:1250] = labels[100:400, 900:1250]
    levels[0][1100:1490, 10:300] = labels[1100:1490, 10:300]
    fill_pyramid(levels, [(100, 400, 900, 1250), (1100, 1490, 10, 300)], block=128)
    a, b = (zarr.open_group(store.mask_url(s), mode="r") for s in ("whole", "blocks"))
    la, lb = a["labels/cells"], b["labels/cells"]
    assert sorted(la.array_keys()) == sorted(lb.array_keys()) == ["0", "1", "2", "3"]
    assert [lb[str(k)].shape for k in range(4)] == mask_level_shapes(labels.shape)
    for k in range(4):
        assert np.array_equal(la[str(k)][...], lb[str(k)][...]), k
    assert la.attrs["ome"] == lb.attrs["ome"]
    # the overview, from the full image or from a coarse view of it: the same levels
    assert [a[str(k)].shape for k in range(4)] == [b[str(k)].shape for k in range(4)]
    assert a.attrs["ome"] == {
        **b.attrs["ome"],
        "multiscales": [{**b.attrs["ome"]["multiscales"][0], "name": "whole"}],
    }


def process(out, specs: list[SlideSpec], **config) -> dict:
    """Run the pipeline's three stages in this process on one batch of slides."""
    run_config = RunConfig(**config)
    models = Models(run_config)
    description = models.describe()
    RunStore(str(out)).open(description, stable_hash(description))
    ctx = StageContext.of(str(out), None, run_config, "run-1", models)
    return process_here(specs, ctx, models.geometry.to_dict())


def spec_of(slide_id: str, path, um_per_px: float | None) -> SlideSpec:
    return SlideSpec(slide_id, str(path), "p1", "site_a", um_per_px, "c1", "scanA", "wright", "")


def read_slide_cells(out, slide_id: str):
    return RunStore(str(out)).read_cells(slide_id)


@pytest.fixture(scope="module")
def cells_everywhere(tmp_path_factory):
    """A 1536² field crowded with cells (0.25 µm/px) as a tiled pyramidal OME-TIFF."""
    field = render_field(np.random.default_rng(5), "hs", "site_a", 1536, 1536, um_per_px=0.25)
    folder = tmp_path_factory.mktemp("mid")
    return write_tiled(folder / "mid.ome.tif", field.image, 0.25), field


@pytest.mark.slow
def test_region_path_gives_the_whole_image_paths_cells(cells_everywhere, tmp_path):
    """Four regions of 2×2, 2×1, 1×2 and 1×1 tiles against the whole image: same cells."""
    path, field = cells_everywhere
    spec = spec_of("mid", path, 0.25)
    whole = process(tmp_path / "whole", [spec], region_min_pixels=10**12)
    regions = process(tmp_path / "regions", [spec], region_min_pixels=0, region_px=1024)
    assert whole["status"] == regions["status"] == ["ok"]
    a, b = (
        read_slide_cells(tmp_path / "whole", "mid"),
        read_slide_cells(tmp_path / "regions", "mid"),
    )
    assert a.num_rows == b.num_rows > 400
    ids = b["cell_id"].to_numpy()
    assert len(np.unique(ids)) == len(ids)
    pa_ = np.stack([a["centroid_y"].to_numpy(), a["centroid_x"].to_numpy()], axis=1)
    pb = np.stack([b["centroid_y"].to_numpy(), b["centroid_x"].to_numpy()], axis=1)
    dist, match = cKDTree(pb).query(pa_)
    assert dist.max() < 1.0 and len(np.unique(match)) == len(match)  # one-to-one
    # cells that cross the region borders (x or y = 1024) are there, once, measured alike
    crossing = ((b["bbox_y0"].to_numpy() < 1024) & (b["bbox_y1"].to_numpy() > 1024)) | (
        (b["bbox_x0"].to_numpy() < 1024) & (b["bbox_x1"].to_numpy() > 1024)
    )
    assert crossing.sum() >= 20
    for column in ("area_um2", "contact_fraction", "touches_edge", "kind", "class"):
        left = a[column].to_numpy(zero_copy_only=False)
        right = b[column].to_numpy(zero_copy_only=False)[match]
        agree = left == right if left.dtype.kind in "bOU" else np.isclose(left, right)
        assert agree.mean() > 0.99, column
    # the masks hold the same objects: region ids map one-to-one onto whole-image ids
    mask_a, mask_b = (
        zarr.open_array(str(tmp_path / run / "masks.zarr/mid/labels/cells/0"), mode="r")[...]
        for run in ("whole", "regions")
    )
    lut = np.zeros(int(mask_b.max()) + 1, np.uint32)
    lut[b["cell_id"].to_numpy()[match]] = a["cell_id"].to_numpy()
    assert (lut[mask_b] == mask_a).mean() > 0.9999
    records = [
        json.loads((tmp_path / run / "_slides" / "mid.json").read_text())
        for run in ("whole", "regions")
    ]
    assert set(records[0]) == set(records[1]) >= set(MANIFEST_FIELDS) - {"label"} | {"peak_rss_mb"}
    assert records[1]["n_objects"] == b.num_rows and records[1]["width"] == 1536


def test_bad_large_slides_are_failures_and_the_others_finish(cells_everywhere, tmp_path):
    path, _ = cells_everywhere
    data = path.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 2])
    with open_slide(str(path)) as slide:  # valid structure, garbage in one level-0 tile
        page = slide._tif.series[0].levels[0].keyframe
        offset, count = int(page.dataoffsets[4]), int(page.databytecounts[4])
    corrupt_bytes = bytearray(data)
    corrupt_bytes[offset : offset + count] = b"\x07" * count
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(bytes(corrupt_bytes))
    small = tmp_path / "small.tif"
    small.write_bytes(data)
    specs = [
        spec_of("truncated", truncated, 0.25),
        spec_of("corrupt", corrupt, 0.25),
        spec_of("small", small, 0.0625),  # read at 4× the working scale: 384² px, quick
    ]
    out = process(tmp_path / "run", specs, region_min_pixels=0, region_px=512)
    assert out["status"] == ["failed", "failed", "ok"]
    assert "truncated" in out["message"][0] and out["message"][0].startswith("read:")
    assert "corrupt or truncated tile data" in out["message"][1]
    failed = {p.stem for p in (tmp_path / "run" / "_failed").glob("*.json")}
    assert failed == {"slide-truncated", "slide-corrupt"}
    assert {p.stem for p in (tmp_path / "run" / "_slides").glob("*.json")} == {"small"}
    assert not list((tmp_path / "run").rglob(".*.tmp"))  # nothing half-written left


@pytest.mark.slow
def test_pixel_size_estimated_when_neither_catalog_nor_file_has_it(cells_everywhere, tmp_path):
    _, field = cells_everywhere
    path = write_tiled(tmp_path / "nosize.tif", field.image[:768, :768], um_per_px=None)
    spec = spec_of("nosize", path, None)
    whole = process(tmp_path / "whole", [spec], region_min_pixels=10**12)
    regions = process(tmp_path / "regions", [spec], region_min_pixels=0, region_px=512)
    a, b = (
        json.loads((tmp_path / run / "_slides" / "nosize.json").read_text())
        for run in ("whole", "regions")
    )
    assert b["um_per_px_source"] == a["um_per_px_source"] == "estimated"
    assert b["calibration_cells"] >= 20 and b["um_per_px"] == pytest.approx(0.25, rel=0.15)
    assert b["um_per_px"] == pytest.approx(a["um_per_px"], rel=0.02)
    # a scale that is not a whole ratio: windows are resampled on their own, so a few cells
    # at the region borders may come out differently, never many
    assert whole["n_objects"][0] > 100
    assert abs(regions["n_objects"][0] - whole["n_objects"][0]) <= 0.01 * whole["n_objects"][0]

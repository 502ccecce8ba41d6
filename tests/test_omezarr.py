"""masks.zarr is OME-Zarr 0.5: every slide's group, from the whole-image and the region-by-region
paths, validates with ome-zarr-models and opens with ome-zarr's reader as an image with one
label image; masks written in the older layout (label arrays at `<slide_id>/0, 1, ...`) are
still read by the store and the report."""

from __future__ import annotations

import io
import logging

import cv2
import numpy as np
import pytest
import zarr

from rbcbatch.dev.synth import render_field
from rbcbatch.dev.synth_wsi import write_tiled
from rbcbatch.report.cells import crop_gallery
from rbcbatch.store.masks import (
    label_group_path,
    mask_level_shapes,
    overview_level_shapes,
    overview_pyramid,
)
from rbcbatch.store.run_store import RunStore
from tests.test_regions import process, spec_of

SIDE = 768  # three label levels (768, 384, 192), four 512-px regions of the working image


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two runs of one tiled TIFF and one PNG: whole images only, and the TIFF region by region
    (the PNG goes the whole-image way in both). {run name: run folder}."""
    folder = tmp_path_factory.mktemp("omezarr")
    field = render_field(np.random.default_rng(3), "normal", "site_a", SIDE, SIDE, um_per_px=0.25)
    tif = write_tiled(folder / "tif.ome.tif", field.image, 0.25)
    png = folder / "png.png"
    cv2.imwrite(str(png), cv2.cvtColor(field.image[:600, :500], cv2.COLOR_RGB2BGR))
    specs = [spec_of("tif", tif, 0.25), spec_of("png", png, 0.25)]
    out = {"whole": folder / "whole", "regions": folder / "regions"}
    assert process(out["whole"], specs, region_min_pixels=10**12)["status"] == ["ok", "ok"]
    regions = process(out["regions"], specs, region_min_pixels=0, region_px=512)
    assert regions["status"] == ["ok", "ok"]
    return out


def read_back(group_path) -> tuple[list, str]:
    """ome-zarr's reader on one slide group: its nodes and what it logged at WARNING or above."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("ome_zarr")
    logger.addHandler(handler)
    try:
        nodes = list(Reader(parse_url(str(group_path), mode="r"))())
    finally:
        logger.removeHandler(handler)
    return nodes, logged.getvalue()


@pytest.mark.parametrize("run", ["whole", "regions"])
def test_every_slide_is_a_valid_ome_zarr_image_with_its_labels(runs, run):
    from ome_zarr.reader import Label, Labels, Multiscales
    from ome_zarr_models.v05 import Image

    out = runs[run]
    root = zarr.open_group(str(out / "masks.zarr"), mode="r")
    assert sorted(root.group_keys()) == ["png", "tif"]
    for slide_id in root.group_keys():
        record = RunStore(str(out)).commit_record(slide_id)
        shape = (record["height"], record["width"])
        n_levels = len(mask_level_shapes(shape))
        assert n_levels >= 3

        image = Image.from_zarr(root[slide_id])  # validates labels/ and labels/cells too
        assert image.labels is not None and image.labels.label_paths == ["cells"]

        nodes, logged = read_back(out / "masks.zarr" / slide_id)
        assert logged == "", logged  # no "no parent found for ..." nor any other warning
        images = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
        groups = [n for n in nodes if n.load(Labels)]
        labels = [n for n in nodes if n.load(Label) and n.load(Multiscales)]
        assert len(images) == len(groups) == len(labels) == 1, slide_id
        assert [tuple(d.shape) for d in images[0].data] == [
            (3, *s) for s in overview_level_shapes(shape, n_levels)
        ]
        assert [tuple(d.shape) for d in labels[0].data] == mask_level_shapes(shape)
        assert all(d.dtype == np.uint32 for d in labels[0].data)

        # level 0 holds exactly the cells' ids; level 1 is level 0 [::2, ::2]
        level0 = np.asarray(labels[0].data[0])
        cells = RunStore(str(out)).read_cells(slide_id)
        ids = set(cells["cell_id"].to_pylist())
        assert len(ids) > 20 and set(np.unique(level0[level0 > 0]).tolist()) == ids
        assert np.array_equal(np.asarray(labels[0].data[1]), level0[::2, ::2])
        levels = RunStore(str(out)).label_levels(slide_id)
        assert len(levels) == n_levels and np.array_equal(levels[0][...], level0)


def test_overview_levels_halve_from_an_eighth_of_the_labels():
    assert overview_level_shapes((17, 9), 3) == [(3, 2), (2, 1), (1, 1)]
    grey = np.full((40, 24, 3), (10, 20, 30), np.uint8)
    levels = list(overview_pyramid(grey, (80, 48), 3))  # a view at half the labels' resolution
    assert [lv.shape for lv in levels] == [(3, 10, 6), (3, 5, 3), (3, 3, 2)]
    assert all(lv.dtype == np.uint8 and (lv[:, 0, 0] == (10, 20, 30)).all() for lv in levels)


def write_old_layout(store: RunStore, slide_id: str, labels: np.ndarray, um_per_px: float):
    """A slide's mask as runs wrote it before overviews: label arrays at <slide_id>/0, 1, ...
    with the label metadata on that group and no parent image."""
    group = zarr.open_group(store.mask_url(slide_id), mode="w")
    level = labels
    for index in range(len(mask_level_shapes(labels.shape))):
        group.create_array(str(index), data=level, chunks=(512, 512), fill_value=0)
        level = level[::2, ::2]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [s, s]}]}
        for i, s in enumerate(um_per_px * 2**k for k in range(index + 1))
    ]
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    group.attrs.update(
        {
            "ome": {
                "version": "0.5",
                "multiscales": [{"name": slide_id, "axes": axes, "datasets": datasets}],
                "image-label": {"version": "0.5"},
            },
            "rbcbatch": {"slide_id": slide_id},
        }
    )


def test_masks_of_older_runs_are_still_read(tmp_path):
    yy, xx = np.mgrid[:600, :500]
    labels = np.zeros((600, 500), np.uint32)
    labels[(yy - 300) ** 2 + (xx - 250) ** 2 <= 14**2] = 3
    labels[(yy - 100) ** 2 + (xx - 400) ** 2 <= 12**2] = 7
    image = np.full((600, 500, 3), 230, np.uint8)
    image[labels > 0] = (200, 90, 110)
    png = tmp_path / "slide.png"
    cv2.imwrite(str(png), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    store = RunStore(str(tmp_path / "run"))
    zarr.open_group(store.mask_url(), mode="a")
    write_old_layout(store, "old", labels, 0.25)
    store.write_mask("new", labels, 0.25, {"slide_id": "new"}, image)

    root = zarr.open_group(store.mask_url(), mode="r")
    assert label_group_path(root, "old") == "old"
    assert label_group_path(root, "new") == "new/labels/cells"
    with pytest.raises(KeyError, match="no label pyramid for slide 'gone'"):
        label_group_path(root, "gone")
    for slide_id in ("old", "new"):
        levels = store.label_levels(slide_id)
        assert [a.shape for a in levels] == mask_level_shapes(labels.shape)
        assert np.array_equal(levels[0][...], labels)
        assert np.array_equal(levels[2][...], labels[::4, ::4])

    # the report outlines a cell from either layout alike (an id not in the mask: no outline)
    cell = {"uri": str(png), "height": 600, "width": 500, "um_per_px": 0.25, "cell_id": 3}
    cell |= {"centroid_x": 250.0, "centroid_y": 300.0, "class_probability": None, "class": "normal"}
    cells = [{**cell, "slide_id": "old"}, {**cell, "slide_id": "new"}]
    gallery, notes = crop_gallery(store, [*cells, {**cells[0], "cell_id": 99}], None)
    assert notes == []
    (normal,) = gallery
    old, new, unmasked = normal["crops"]
    assert (old["caption"], new["caption"]) == ("old #3", "new #3")
    assert old["png"] == new["png"] != unmasked["png"]

"""Whole-slide reading: real tiled and pyramidal TIFF files written with tifffile, read back."""

from __future__ import annotations

import uuid

import cv2
import fsspec
import numpy as np
import pytest
import tifffile

from rbcbatch.dev.synth_wsi import Patch, write_pyramid, write_tiled
from rbcbatch.errors import SlideReadError
from rbcbatch.io.wsi import REMOTE_BLOCK_SIZE, is_tiff, open_slide, read_shrunk

GLASS = (231, 226, 219)


def gradient_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB with structure at every scale (no two tiles alike)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([(ys * 7 + xs * 3) % 256, (xs * 5) % 256, (ys * 11) % 256], axis=2)
    return (base + rng.integers(0, 20, base.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 1300×1700 OME-TIFF pyramid (3 levels) of glass with two patches, one across tiles."""
    patches = [
        Patch(100, 200, gradient_image(300, 400, 1)),
        Patch(700, 900, gradient_image(500, 600, 2)),
    ]
    path = tmp_path_factory.mktemp("wsi") / "slide.ome.tif"
    write_pyramid(path, 1300, 1700, GLASS, patches, um_per_px=0.25, n_levels=3)
    return path, patches


def test_levels_pixel_size_and_regions_read_back(pyramid):
    path, patches = pyramid
    with open_slide(str(path)) as slide:
        assert slide.levels == [(1300, 1700), (650, 850), (325, 425)]
        assert slide.um_per_px == 0.25 and slide.is_tiled and slide.pixels == 1300 * 1700
        assert slide.downsample(2) == (4.0, 4.0)
        p = patches[1]
        region = slide.read_region(0, p.y - 5, p.x - 7, 510, 612)  # crosses tile borders
        assert region.dtype == np.uint8 and region.shape == (510, 612, 3)
        assert np.array_equal(region[5:505, 7:607], p.image)  # deflate is lossless
        assert (region[:5] == GLASS).all() and (region[:, :7] == GLASS).all()
        level1 = slide.read_region(1, p.y // 2, p.x // 2, 250, 300)
        expected = cv2.resize(p.image, (300, 250), interpolation=cv2.INTER_AREA)
        assert np.array_equal(level1, expected)
        with pytest.raises(ValueError, match="outside level 0"):
            slide.read_region(0, 1200, 0, 200, 10)


def test_shrunk_view_equals_area_resize_of_the_whole(tmp_path):
    image = gradient_image(900, 1100)
    path = write_tiled(tmp_path / "flat.tif", image, um_per_px=None, n_levels=1)
    with open_slide(str(path)) as slide:
        assert slide.levels == [(900, 1100)] and slide.um_per_px is None
        view, downsample = read_shrunk(slide, 4)  # no pyramid: level 0 shrunk block by block
    assert view.shape == (225, 275, 3) and downsample == (4.0, 4.0)
    assert np.array_equal(view, cv2.resize(image, (275, 225), interpolation=cv2.INTER_AREA))


def test_shrunk_view_uses_the_pyramid(pyramid):
    path, _ = pyramid
    with open_slide(str(path)) as slide:
        view, downsample = read_shrunk(slide, 8)  # level 2 (4x) shrunk 2x more
        level2 = slide.read_region(2, 0, 0, 325, 425)
    assert view.shape == (163, 213, 3) and downsample == (8.0, 8.0)
    expected = cv2.resize(level2[:324, :424], (212, 162), interpolation=cv2.INTER_AREA)
    assert np.array_equal(view[:162, :212], expected)
    assert np.array_equal(
        view[162, :212],
        cv2.resize(  # last row: one level-2 row, kept whole
            level2[324:, :424], (212, 1), interpolation=cv2.INTER_AREA
        )[0],
    )


@pytest.mark.parametrize(
    ("resolution", "unit", "expected"),
    [
        ((40_000, 40_000), "CENTIMETER", 0.25),  # 40,000 px per cm
        ((50_800, 50_800), "INCH", 0.5),
        ((72, 72), "INCH", None),  # an image editor's placeholder, not a scan
        ((1, 1), "NONE", None),
    ],
)
def test_pixel_size_from_tiff_resolution_tags(tmp_path, resolution, unit, expected):
    path = tmp_path / "res.tif"
    tifffile.imwrite(
        path,
        gradient_image(600, 600),
        tile=(256, 256),
        resolution=resolution,
        resolutionunit=unit,
        photometric="rgb",
    )
    with open_slide(str(path)) as slide:
        assert slide.um_per_px == (pytest.approx(expected) if expected else None)


def test_svs_mpp_and_jpeg_tiles(tmp_path):
    """Aperio SVS: MPP in the description, JPEG-compressed tiles (decoded by imagecodecs)."""
    image = cv2.GaussianBlur(gradient_image(768, 1024), (0, 0), 2)
    path = tmp_path / "scan.svs"
    description = (
        "Aperio Image Library v12.0.15\r\n1024x768 [0,0 1024x768] (256x256) JPEG/RGB Q=90"
        "|AppMag = 40|MPP = 0.2520"
    )
    tifffile.imwrite(
        path,
        image,
        tile=(256, 256),
        compression="jpeg",
        photometric="rgb",
        description=description,
        metadata=None,
    )
    with open_slide(str(path)) as slide:
        assert slide.um_per_px == pytest.approx(0.252)
        region = slide.read_region(0, 100, 200, 400, 500)
    diff = np.abs(region.astype(int) - image[100:500, 200:700].astype(int))
    assert diff.mean() < 3.0


def test_grey_slide_reads_as_rgb(tmp_path):
    grey = gradient_image(520, 530)[:, :, 0]
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, tile=(256, 256))
    with open_slide(str(path)) as slide:
        region = slide.read_region(0, 10, 20, 300, 400)
    assert region.shape == (300, 400, 3)
    assert all(np.array_equal(region[:, :, c], grey[10:310, 20:420]) for c in range(3))


def test_remote_url_reads_through_fsspec(pyramid):
    path, patches = pyramid
    url = "memory://slides/slide.ome.tif"
    with fsspec.open(url, "wb") as f:
        f.write(path.read_bytes())
    assert is_tiff(url, {}) and not is_tiff("memory://slides/none.tif", {})
    with open_slide(url, storage_options={}) as slide:
        p = patches[0]
        assert slide.levels[0] == (1300, 1700) and slide.um_per_px == 0.25
        assert np.array_equal(slide.read_region(0, p.y, p.x, 300, 400), p.image)


def test_truncated_file_is_a_clear_error(pyramid, tmp_path):
    path, _ = pyramid
    data = path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideReadError, match="truncated"):
        open_slide(str(cut), slide_id="s1")
    header_only = tmp_path / "header.tif"
    header_only.write_bytes(data[:300])
    with pytest.raises(SlideReadError, match="corrupt|truncated|not a readable TIFF"):
        open_slide(str(header_only))


def test_corrupt_tile_is_a_clear_error_when_read(pyramid, tmp_path):
    path, patches = pyramid
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        tile = 1 * 4 + 1  # second row, second column of 512² tiles (inside patch 0's rows)
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(range(256)) * (count // 256) + bytes(count % 256)
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    with open_slide(str(bad), slide_id="s2") as slide:
        assert slide.read_region(0, 0, 0, 100, 100).shape == (100, 100, 3)  # other tiles fine
        with pytest.raises(SlideReadError, match="corrupt or truncated tile data") as err:
            slide.read_region(0, 600, 600, 50, 50)
    assert err.value.slide_id == "s2" and err.value.stage == "read"


def test_missing_and_non_tiff_files(tmp_path):
    with pytest.raises(SlideReadError, match="no such file"):
        open_slide(str(tmp_path / "missing.tif"))
    png = tmp_path / "x.tif"
    png.write_bytes(cv2.imencode(".png", gradient_image(20, 20))[1].tobytes())
    assert not is_tiff(str(png)) and not is_tiff(str(tmp_path / "missing.tif"))
    with pytest.raises(SlideReadError, match="not a readable TIFF"):
        open_slide(str(png))


@pytest.mark.slow
def test_s3_region_read_fetches_about_its_tiles(s3_endpoint, tmp_path):
    """On a real S3 API (moto's server on loopback): one 512² region of a 4096² slide reads a
    few hundred KiB, not the file, because the file object reads ahead in small blocks."""
    import s3fs

    options = {
        "key": "wsi-test-key",
        "secret": "wsi-test-secret",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "eu-west-1"},
    }
    fs = s3fs.S3FileSystem(**options)
    bucket = f"wsi-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    image = gradient_image(4096, 4096, seed=4)  # no two 512² tiles alike
    path = write_tiled(tmp_path / "big.ome.tif", image, um_per_px=0.25, n_levels=3)
    fs.put(str(path), f"{bucket}/big.ome.tif")
    url = f"s3://{bucket}/big.ome.tif"
    assert is_tiff(url, options)
    with open_slide(url, storage_options=options) as slide:
        assert slide.levels[0] == (4096, 4096) and slide.um_per_px == 0.25
        region = slide.read_region(0, 1024, 1536, 512, 512)  # exactly one tile
        fetched = slide._handle.cache.total_requested_bytes
    assert np.array_equal(region, image[1024:1536, 1536:2048])
    tile_bytes = path.stat().st_size / (64 + 16 + 4)  # about one tile's share of the file
    assert fetched < 4 * tile_bytes + 4 * REMOTE_BLOCK_SIZE, (fetched, path.stat().st_size)

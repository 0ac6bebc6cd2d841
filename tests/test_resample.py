"""Area downsampling of a window (datasets/resample.py) and the packer's crops against plain OpenCV references."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from geodiff4d.datasets import resample
from geodiff4d.datasets.normal_maps import unit
from geodiff4d.datasets.packing import crop, crop_normals
from geodiff4d.datasets.resample import area_window


def _reference(image: np.ndarray, box: tuple[int, int, int], resolution: int) -> np.ndarray:
    """The zero-padded window copied out, then cv2.resize INTER_AREA (what packing did before)."""
    x, y, side = box
    canvas = np.zeros((side, side, *image.shape[2:]), image.dtype)
    sx0, sy0, sx1, sy1 = max(x, 0), max(y, 0), min(x + side, image.shape[1]), min(y + side, image.shape[0])
    if sx1 > sx0 and sy1 > sy0:
        canvas[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = image[sy0:sy1, sx0:sx1]
    return cv2.resize(canvas, (resolution, resolution), interpolation=cv2.INTER_AREA)


def _windows(rng: np.random.Generator, count: int):
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(20, 200, 2))
        resolution = int(rng.integers(4, 64))
        side = int(rng.integers(resolution, 300))
        yield (
            (height, width),
            (int(rng.integers(-side, width + 5)), int(rng.integers(-side, height + 5)), side),
            resolution,
        )


@pytest.mark.parametrize("block_bytes", [resample.BLOCK_BYTES, 64])  # 64: blocks of 8 output rows
@pytest.mark.parametrize(
    "dtype, channels", [(np.uint8, 3), (np.uint8, None), (np.float32, 4), (np.float32, None)]
)
def test_area_window_matches_opencv_inter_area(dtype, channels, block_bytes, monkeypatch):
    monkeypatch.setattr(resample, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    for (height, width), box, resolution in _windows(rng, 40):
        shape = (height, width) if channels is None else (height, width, channels)
        image = (
            rng.integers(0, 256, shape).astype(np.uint8)
            if dtype == np.uint8
            else rng.random(shape, np.float32)
        )
        got, want = area_window(image, box, resolution), _reference(image, box, resolution)
        assert got.shape == want.shape and got.dtype == want.dtype
        # float32: OpenCV's weights and summation order; uint8 may round a tie the other way (integer scales)
        tolerance = 1 if dtype == np.uint8 else 1e-6
        assert np.abs(got.astype(np.float64) - want).max() <= tolerance, box


def test_area_window_outside_the_image_is_zero_and_small_windows_are_refused():
    image = np.full((10, 10, 3), 200, np.uint8)
    assert not area_window(image, (20, 0, 8), 4).any()
    with pytest.raises(ValueError, match="downsamples"):
        area_window(image, (0, 0, 3), 4)


def test_crop_normals_matches_two_separate_crops():
    """One 4-channel resample of (normal * mask, mask) = the normal and weight crops done apart."""
    rng = np.random.default_rng(1)
    for (height, width), box, resolution in _windows(rng, 20):
        for box_ in (box, (box[0], box[1], max(2, resolution // 2))):  # down- and upsampling
            normal = unit(rng.normal(size=(height, width, 3)).astype(np.float32))
            mask = rng.random((height, width)) > 0.3
            weight = crop(mask.astype(np.float32), box_, resolution)
            summed = crop((normal * mask[..., None]).astype(np.float32), box_, resolution)
            want = np.where((weight > 0.5)[..., None], unit(summed), 0.0)
            got, inside = crop_normals(normal, mask, box_, resolution)
            assert np.array_equal(inside, weight > 0.5)
            assert np.abs(got - want).max() <= 1e-6

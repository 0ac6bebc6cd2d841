"""bench/compare_runs.py's image comparison: PSNR as scikit-image computes it, for 8- and 16-bit PNGs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio

from geodiff4d.core.io.images import write_png

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from compare_runs import compare, image_psnr  # noqa: E402  (a script, not a package)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_image_psnr_is_scikit_images_with_the_dtypes_peak(tmp_path, dtype):
    rng = np.random.default_rng(0)
    peak = np.iinfo(dtype).max
    a = rng.integers(0, peak, (24, 20, 3), dtype=dtype)
    b = np.clip(a.astype(np.int64) + rng.integers(-900, 900, a.shape), 0, peak).astype(dtype)
    write_png(tmp_path / "a.png", a)
    write_png(tmp_path / "b.png", b)
    want = peak_signal_noise_ratio(a, b, data_range=peak)
    assert image_psnr(tmp_path / "a.png", tmp_path / "b.png") == pytest.approx(want, rel=1e-9)
    assert image_psnr(tmp_path / "a.png", tmp_path / "a.png") == math.inf


def test_images_of_another_shape_are_not_given_a_psnr(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((8, 9), np.uint8))
    assert math.isnan(image_psnr(tmp_path / "a.png", tmp_path / "b.png"))


def test_compare_reports_each_differing_image_and_their_median(tmp_path, capsys):
    for run, value in (("A", 100), ("B", 101)):
        (tmp_path / run).mkdir()
        write_png(tmp_path / run / "frame.png", np.full((4, 4), value, np.uint8))
        write_png(tmp_path / run / "same.png", np.zeros((4, 4), np.uint8))
    compare(tmp_path / "A", tmp_path / "B", "runs")
    out = capsys.readouterr().out
    psnr = 10 * math.log10(255**2)  # every pixel one level apart
    assert "1 identical, 1 differing" in out
    assert f"differ: frame.png (PSNR {psnr:.1f} dB)" in out
    assert f"1 differing images: PSNR median {psnr:.1f} dB" in out

"""Foreground-only means foreground-only: masked scores ignore the prediction outside the GT mask, and a frame with an
empty GT foreground is not scored (and counted), with --masked or --background."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data

from geodiff4d.eval.inputs import Clip
from geodiff4d.eval.leaderboard import aggregate, unscored_note
from geodiff4d.eval.scoring import MetricModels, composite_on_background, score_clip
from geodiff4d.eval.settings import EvalSettings

SIZE = 64
N_FRAMES = 4
ALPHA_SCORED = ("psnr", "ssim", "lpips", "jod")


def _clip(frames: np.ndarray, masks: np.ndarray | None = None) -> Clip:
    return Clip(frames, masks, 25.0, "test")


@pytest.fixture(scope="module")
def head() -> tuple[np.ndarray, np.ndarray]:
    """A panning astronaut clip [T, 64, 64, 3] and a soft-edged GT alpha [T, 64, 64] around the head."""
    face = cv2.resize(skimage.data.astronaut()[:320, 80:400], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    frames = np.stack([np.roll(face, t, axis=1) for t in range(N_FRAMES)])
    alpha = np.zeros((SIZE, SIZE), np.float32)
    cv2.ellipse(alpha, (32, 28), (18, 24), 0, 0, 360, 1.0, -1)
    alpha = cv2.GaussianBlur(alpha, (0, 0), 1.5)
    alpha[alpha < 1e-3] = 0
    return frames, np.repeat(alpha[None], N_FRAMES, axis=0)


def _outside(frames: np.ndarray, masks: np.ndarray, seed: int) -> np.ndarray:
    """``frames`` wherever the GT alpha is non-zero, random pixels everywhere else."""
    noise = np.random.default_rng(seed).integers(0, 256, frames.shape, dtype=np.uint8)
    return np.where(masks[..., None] > 0, frames, noise)


@pytest.fixture(scope="module")
def masked_models() -> MetricModels:
    return MetricModels(EvalSettings(metrics=ALPHA_SCORED, masked=True))


def test_masked_scores_ignore_pixels_outside_the_mask(head, masked_models):
    """A prediction equal to the GT inside the mask scores perfect (before: SSIM ~0.94, LPIPS ~0.14 with another
    background), and two predictions differing only outside the mask score the same."""
    gt, masks = head
    if masked_models.lpips is None:
        pytest.skip(f"LPIPS weights not installed: {masked_models.lpips_missing}")
    first, jod_first = score_clip(masked_models, _clip(_outside(gt, masks, 0)), _clip(gt, masks))
    second, jod_second = score_clip(masked_models, _clip(_outside(gt, masks, 1)), _clip(gt, masks))
    assert first["psnr"] == [100.0] * N_FRAMES
    assert first["ssim"] == pytest.approx([1.0] * N_FRAMES, abs=1e-6)
    assert first["lpips"] == pytest.approx([0.0] * N_FRAMES, abs=1e-6)
    assert jod_first == pytest.approx(10.0, abs=1e-3)
    for metric in ("psnr", "ssim", "lpips"):
        assert first[metric] == pytest.approx(second[metric], abs=1e-6), metric
    assert jod_first == pytest.approx(jod_second, abs=1e-6)


def test_masked_scores_still_see_errors_inside_the_mask(head, masked_models):
    gt, masks = head
    shifted = np.roll(gt, 3, axis=2)
    columns, video_jod = score_clip(masked_models, _clip(shifted), _clip(gt, masks))
    assert max(columns["psnr"]) < 30 and max(columns["ssim"]) < 0.9 and video_jod < 9.5


@pytest.mark.parametrize("setting", [{"masked": True}, {"background": 0.5}])
def test_empty_ground_truth_foreground_is_not_scored_and_counted(head, setting):
    """Frames 1 and 3 have an empty GT alpha: before, --background alone scored them PSNR 100 / SSIM 1."""
    gt, masks = head
    masks = masks.copy()
    masks[[1, 3]] = 0
    models = MetricModels(EvalSettings(metrics=("psnr", "ssim", "jod"), **setting))
    pred, ref = _clip(np.roll(gt, 3, axis=2)), _clip(gt, masks)
    if "background" in setting:  # as the evaluation job does before scoring
        pred, ref = (composite_on_background(c, masks, 0.5) for c in (pred, ref))
    columns, video_jod = score_clip(models, pred, ref)
    for metric in ("psnr", "ssim"):
        assert math.isnan(columns[metric][1]) and math.isnan(columns[metric][3]), metric
        assert np.isfinite(columns[metric][0]) and columns[metric][0] < 100, metric
    assert np.isfinite(video_jod) and video_jod < 10

    rows = pd.DataFrame(
        [
            {
                "method": "m",
                "subject": "s",
                "sequence": "q",
                "camera": "c",
                "frame": t,
                "psnr": columns["psnr"][t],
            }
            for t in range(N_FRAMES)
        ]
    )
    videos = pd.DataFrame([{"method": "m", "subject": "s", "sequence": "q", "camera": "c", "jod": video_jod}])
    table = aggregate(rows, videos, ["psnr", "jod"])
    assert table.loc[0, "psnr_unscored"] == 2 and table.loc[0, "jod_unscored"] == 0
    assert table.loc[0, "psnr"] == pytest.approx(np.mean([columns["psnr"][0], columns["psnr"][2]]))
    assert "m: PSNR 2 of 4 frames" in unscored_note(table, ["psnr", "jod"])

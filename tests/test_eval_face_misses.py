"""Face metrics cannot be won by failing: on a real face, blanking frames never improves a method's mean or rank."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data

from geodiff4d.eval.inputs import Clip
from geodiff4d.eval.leaderboard import aggregate
from geodiff4d.eval.scoring import MetricModels, face_scores, score_clip, worst_face_score
from geodiff4d.eval.settings import FACE_METRICS, HIGHER_IS_BETTER, EvalSettings

N_FRAMES = 4
UNIT = {"subject": "s1", "sequence": "EXP-1", "camera": "cam_a"}


def _degraded(frame: np.ndarray, noise: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    noisy = np.clip(frame + rng.normal(0, noise * 255, frame.shape), 0, 255).astype(np.uint8)
    return cv2.GaussianBlur(noisy, (0, 0), blur) if blur else noisy


@pytest.fixture(scope="module")
def scored() -> dict[str, dict[str, list]]:
    """Per-frame face columns of a method against a panning astronaut clip, and of grey frames in its place.
    The method is close on frames 0-1 and noisier on 2-3 (still found by every backend)."""
    face = cv2.resize(skimage.data.astronaut()[:320, 80:400], (160, 160), interpolation=cv2.INTER_AREA)
    gt = np.stack([np.roll(face, 2 * t, axis=1) for t in range(N_FRAMES)])  # [T, 160, 160, 3]
    rng = np.random.default_rng(0)
    method = np.stack(
        [_degraded(f, 0.02, 0, rng) if t < 2 else _degraded(f, 0.08, 1.0, rng) for t, f in enumerate(gt)]
    )
    models = MetricModels(EvalSettings(metrics=FACE_METRICS))
    reference = Clip(gt, None, 25.0, "gt")
    return {
        name: score_clip(models, Clip(frames, None, 25.0, name), reference)[0]
        for name, frames in (("method", method), ("grey", np.full_like(gt, 128)))
    }


def _blanked(scored: dict, frames: set[int]) -> dict[str, list]:
    """The method's columns with ``frames`` replaced by grey ones: face metrics are scored frame by frame, so this
    is what scoring the mixed clip gives."""
    return {
        column: [scored["grey" if t in frames else "method"][column][t] for t in range(N_FRAMES)]
        for column in scored["method"]
    }


def _board(methods: dict[str, dict[str, list]]) -> pd.DataFrame:
    frames = pd.DataFrame(
        [
            {"method": name, **UNIT, "frame": t, **{c: values[t] for c, values in columns.items()}}
            for name, columns in methods.items()
            for t in range(N_FRAMES)
        ]
    )
    videos = pd.DataFrame([{"method": name, **UNIT} for name in methods])
    return aggregate(frames, videos, list(FACE_METRICS)).set_index("method")


def test_grey_frames_do_not_beat_the_frames_they_replace(scored):
    """The issue's case: identical on frames 0-1, one method noisier on 2-3, the other grey there. Before, the
    grey one ranked first on CSIM (0.985 vs 0.884), its misses dropped from its mean."""
    board = _board({"kept": scored["method"], "blanked": _blanked(scored, {2, 3})})
    for metric in FACE_METRICS:
        assert board.loc["kept", f"{metric}_rank"] == 1, metric
        assert board.loc["blanked", f"{metric}_rank"] == 2, metric
        assert (
            board.loc["kept", f"{metric}_miss_rate"] == 0
            and board.loc["blanked", f"{metric}_miss_rate"] == 0.5
        )
    assert board.loc["blanked", "csim"] == pytest.approx((sum(scored["method"]["csim"][:2]) - 2) / N_FRAMES)


@pytest.mark.parametrize("seed", range(12))
def test_blanking_any_frames_never_improves_mean_or_rank(scored, seed):
    """Property over seeded random subsets: a method with some frames replaced by faceless grey frames never
    scores a better mean than itself, and never ranks above it or above a rival it ranked below."""
    rng = np.random.default_rng(seed)
    blank = set(rng.choice(N_FRAMES, size=rng.integers(1, N_FRAMES + 1), replace=False).tolist())
    rival = _blanked(scored, {int(rng.integers(N_FRAMES))})
    before = _board({"candidate": scored["method"], "rival": rival})
    after = _board({"candidate": _blanked(scored, blank), "rival": rival, "original": scored["method"]})
    for metric in FACE_METRICS:
        sign = 1 if HIGHER_IS_BETTER[metric] else -1
        assert sign * after.loc["candidate", metric] <= sign * after.loc["original", metric], (metric, blank)
        assert after.loc["candidate", f"{metric}_rank"] >= after.loc["original", f"{metric}_rank"], metric
        assert after.loc["candidate", f"{metric}_rank"] >= before.loc["candidate", f"{metric}_rank"], metric


def test_frames_whose_reference_has_no_face_are_not_scored():
    """Scored frames are defined by the reference alone: no face there is NaN for every method, not a miss; a
    measured value is bounded by the miss value, so even an off-image landmark set is no worse than a miss."""
    features = {"face": np.array([1.0, 0.0]), "far": np.array([500.0, 0.0]), "none": None}
    distance = lambda a, b: None if a is None else float(np.abs(a - b).mean())  # noqa: E731
    worst = worst_face_score(EvalSettings(), "akd", 30, 40)
    assert worst == 50.0
    values, missed = face_scores(
        ["face", "none", "far", "face"],
        [None, features["face"], features["face"], features["face"]],
        features.get,
        distance,
        worst,
        HIGHER_IS_BETTER["akd"],
    )
    assert math.isnan(values[0]) and values[1:] == [50.0, 50.0, 0.0]
    assert missed == [False, True, False, False]
    assert worst_face_score(EvalSettings(), "csim", 30, 40) == -1.0
    assert worst_face_score(EvalSettings(), "aed", 30, 40) == 1.0

"""Normal accuracy (normal_deg) against independent computations, and end to end through an evaluation run."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from geodiff4d.datasets.normal_maps import write_normal_png
from geodiff4d.eval.inputs import InputError
from geodiff4d.eval.normals import normal_error_deg
from geodiff4d.eval.run import evaluate


def _cylinder(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normals [H, W, 3] of a cylinder along x, all perpendicular to x (turning them about x moves each by exactly
    the angle), and a foreground mask [H, W]."""
    phi = np.radians(np.linspace(-80, 80, width))[None, :].repeat(height, axis=0)
    mask = np.zeros((height, width), bool)
    mask[4:-4, 6:-6] = True
    return np.stack([np.zeros_like(phi), np.sin(phi), np.cos(phi)], axis=-1), mask


def _rotation_x(degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def test_hand_made_pair_matches_arccos_of_dot_products():
    rng = np.random.default_rng(3)
    gt = rng.normal(size=(2, 4, 5, 3))
    gt /= np.linalg.norm(gt, axis=-1, keepdims=True)
    pred = gt + rng.normal(scale=0.3, size=gt.shape)
    pred /= np.linalg.norm(pred, axis=-1, keepdims=True)
    mask = rng.random((2, 4, 5)) > 0.3
    expected = [
        np.degrees(np.arccos(np.clip((pred[t] * gt[t]).sum(-1), -1, 1)))[mask[t]].mean() for t in range(2)
    ]
    assert normal_error_deg(pred, gt, mask) == pytest.approx(expected, abs=1e-9)


def test_known_rotation_gives_its_angle_and_empty_pixels_count_90():
    gt, mask = (a[None] for a in _cylinder(32, 48))
    rotated = gt @ _rotation_x(25.0).T
    assert normal_error_deg(rotated, gt, mask) == pytest.approx([25.0], abs=1e-6)
    half = rotated.copy()
    half[:, :, :24] = 0.0  # the method wrote no normal on the left half
    left = mask[0, :, :24].sum()
    expected = (90.0 * left + 25.0 * (mask.sum() - left)) / mask.sum()
    assert normal_error_deg(half, gt, mask) == pytest.approx([expected], abs=1e-6)
    with pytest.raises(InputError, match="shape"):
        normal_error_deg(rotated[:, :10], gt)


def _frame_folder(root: Path, normals: np.ndarray, mask: np.ndarray, frames: int = 2) -> None:
    rgb = np.where(mask[..., None], 200, 30).astype(np.uint8)
    for t in range(frames):
        rel = Path("s01") / "EXP-1" / "cam_a" / f"{t:05d}.png"
        for part, image in (("rgb", rgb), ("mask", (mask * 255).astype(np.uint8))):
            (root / part / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / part / rel), image)
        write_normal_png(root / "normal" / rel, normals, mask)


def test_evaluation_run_reports_normal_deg(tmp_path, local_ray):
    normals, mask = _cylinder(40, 40)
    _frame_folder(tmp_path / "gt", normals, mask)
    _frame_folder(tmp_path / "good", normals, mask)
    _frame_folder(tmp_path / "tilted", normals @ _rotation_x(10.0).T, mask)
    _frame_folder(tmp_path / "rgb_only", normals, mask)
    shutil.rmtree(tmp_path / "rgb_only" / "normal")
    methods = {name: tmp_path / name / "rgb" for name in ("good", "tilted", "rgb_only")}
    with pytest.raises(InputError, match="--gt-normal"):
        evaluate(
            methods,
            tmp_path / "gt" / "rgb",
            "self",
            tmp_path / "run0",
            metrics=["normal_deg"],
            progress=False,
        )
    evaluate(
        methods,
        tmp_path / "gt" / "rgb",
        "self",
        tmp_path / "run",
        metrics=["psnr", "normal_deg"],
        gt_mask=tmp_path / "gt" / "mask",
        gt_normal=tmp_path / "gt" / "normal",
        progress=False,
    )
    rows = pd.concat(pd.read_parquet(p) for p in (tmp_path / "run" / "frames").glob("*.parquet"))
    error = rows.groupby("method")["normal_deg"].mean()
    assert error["good"] < 0.1  # 16-bit PNG quantization only
    assert error["tilted"] == pytest.approx(10.0, abs=0.1)
    assert np.isnan(error["rgb_only"])

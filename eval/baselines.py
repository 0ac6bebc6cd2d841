"""Simple baselines for the demo leaderboard, written as method trees from a ground-truth source.

``reference_copy`` shows what a method that ignores pose and expression scores (every frame is the subject's
reference image: the first frame of the frontal camera); ``gt_noise`` what near-perfect output scores (the
ground truth plus Gaussian noise). Both are floors/ceilings to read a real method's numbers against.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import cv2
import numpy as np

from geodiff4d.cluster.atomic import atomic_write_bytes
from geodiff4d.eval.inputs import ClipSource, open_ground_truth

GT_NOISE_SIGMA = 0.05  # of the [0,1] range


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """uint8 RGB frames [T, H, W, 3] -> ``folder/{t:05d}.png``, each written to a temp name and renamed."""
    for t, frame in enumerate(frames):
        ok, png = cv2.imencode(".png", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"cannot encode {folder / f'{t:05d}.png'}")
        atomic_write_bytes(folder / f"{t:05d}.png", png.tobytes())


def _reference_image(gt: ClipSource, subject: str, sequence: str) -> np.ndarray:
    frontal = getattr(gt, "frontal_camera", None)
    camera = frontal(subject, sequence) if frontal else gt.cameras(subject, sequence)[0]
    return gt.clip(subject, sequence, camera).frames[0]  # [H, W, 3]


def reference_copy(gt: ClipSource, out: str | Path) -> Path:
    """Every predicted frame of every camera = the subject's reference image (resized to the camera's size)."""
    out = Path(out)
    for subject, sequence in gt.units():
        reference = _reference_image(gt, subject, sequence)
        for camera in gt.cameras(subject, sequence):
            frames = gt.clip(subject, sequence, camera).frames
            t, h, w = frames.shape[:3]
            image = reference if reference.shape[:2] == (h, w) else cv2.resize(reference, (w, h),
                                                                               interpolation=cv2.INTER_AREA)
            write_frames(out / subject / sequence / camera, np.repeat(image[None], t, axis=0))
    return out


def gt_noise(gt: ClipSource, out: str | Path, sigma: float = GT_NOISE_SIGMA, seed: int = 0) -> Path:
    """Ground truth + Gaussian noise of ``sigma``; each camera's noise is seeded by (seed, its path)."""
    out = Path(out)
    for subject, sequence in gt.units():
        for camera in gt.cameras(subject, sequence):
            frames = gt.clip(subject, sequence, camera).frames
            rng = np.random.default_rng([seed, zlib.crc32(f"{subject}/{sequence}/{camera}".encode())])
            noisy = frames + rng.normal(0.0, sigma * 255.0, frames.shape)
            write_frames(out / subject / sequence / camera, np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return out


def demo_baselines(gt_nersemble_root: str | Path, pred_root: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write both baselines under ``pred_root/<name>`` from a NeRSemble folder: ``{name: method folder}``,
    ready for ``evaluate(pred_root, gt_nersemble_root)``."""
    gt = open_ground_truth(gt_nersemble_root)
    pred_root = Path(pred_root)
    return {"reference_copy": reference_copy(gt, pred_root / "reference_copy"),
            "gt_noise": gt_noise(gt, pred_root / "gt_noise", seed=seed)}

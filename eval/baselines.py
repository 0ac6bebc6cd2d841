"""Simple baselines for the demo leaderboard, written as method trees from a ground-truth source.

``reference_copy`` shows what a method that ignores pose and expression scores (every frame is the subject's
reference image, as a real method receives it: from a camera or sequence that is not scored, e.g. the mono
benchmark's train camera); ``gt_noise`` what near-perfect output scores (the ground truth plus Gaussian noise).
Both are floors/ceilings to read a real method's numbers against. A baseline never copies a scored frame: a
reference identical to one would score that frame perfectly.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from geodiff4d.core.io.images import write_png
from geodiff4d.eval.inputs import ClipSource, InputError, open_ground_truth

GT_NOISE_SIGMA = 0.05  # of the [0,1] range


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """uint8 RGB frames [T, H, W, 3] -> ``folder/{t:05d}.png``, each written to a temp name and renamed."""
    for t, frame in enumerate(frames):
        write_png(folder / f"{t:05d}.png", frame)


def reference_images(source: ClipSource, camera: str | None = None, frame: int = 0) -> dict[str, np.ndarray]:
    """Each subject's reference image [H, W, 3]: ``frame`` of ``camera`` (default: the frontal camera, else the
    first) in the subject's first sequence of ``source``."""
    images = {}
    for subject, sequence in source.units():
        if subject in images:
            continue
        frontal = getattr(source, "frontal_camera", None)
        chosen = camera or (frontal(subject, sequence) if frontal else source.cameras(subject, sequence)[0])
        images[subject] = source.clip(subject, sequence, chosen).frames[frame]
    return images


def reference_copy(gt: ClipSource, out: str | Path, references: Mapping[str, np.ndarray]) -> Path:
    """Every predicted frame of every camera = the subject's reference image (resized to the camera's size);
    refuses a reference that is itself one of the scored ground-truth frames."""
    out = Path(out)
    for subject, sequence in gt.units():
        if subject not in references:
            raise InputError(f"reference copy: no reference image for subject {subject}")
        for camera in gt.cameras(subject, sequence):
            frames = gt.clip(subject, sequence, camera).frames
            t, h, w = frames.shape[:3]
            reference = references[subject]
            image = (
                reference
                if reference.shape[:2] == (h, w)
                else cv2.resize(reference, (w, h), interpolation=cv2.INTER_AREA)
            )
            identical = np.flatnonzero(
                (frames == image[None]).all(axis=(1, 2, 3))
            )  # [k] scored frames equal to it
            if len(identical):
                raise InputError(
                    f"reference copy: {subject}'s reference image is scored frame {identical[0]} of "
                    f"{subject}/{sequence}/{camera} itself; take it from a camera or sequence that "
                    "is not scored (e.g. the train camera)"
                )
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


def demo_baselines(
    gt_root: str | Path, pred_root: str | Path, references: Mapping[str, np.ndarray], seed: int = 0
) -> dict[str, Path]:
    """Write both baselines under ``pred_root/<name>`` for a ground truth (a NeRSemble folder or a frame tree):
    ``{name: method folder}``, ready for ``evaluate(pred_root, gt_root)``."""
    gt = open_ground_truth(gt_root)
    pred_root = Path(pred_root)
    return {
        "reference_copy": reference_copy(gt, pred_root / "reference_copy", references),
        "gt_noise": gt_noise(gt, pred_root / "gt_noise", seed=seed),
    }

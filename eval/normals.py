"""Normal accuracy: angular error (degrees) of a method's normal maps against ground-truth normals.

Normals follow the project convention (camera space, x right, y up, z toward the camera; 16-bit PNGs with
background 0, datasets/normal_maps.py). A method's normals live beside its frames, as a frame folder has them:
``X/normal/...`` mirrors ``X/rgb/...``. The error is averaged over the ground-truth foreground; a foreground
pixel where the method wrote no normal counts as 90 degrees (a zero vector is orthogonal to everything, and 90
degrees is also the mean error of a random direction), so covering less of the head is never rewarded.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from geodiff4d.datasets.normal_maps import NormalMapError, angular_error_deg, decode_normal_png, unit
from geodiff4d.eval.inputs import FRAME_SUFFIXES, InputError, sibling_tree


def normal_root(rgb_root: str | Path) -> Path | None:
    """The normal tree beside a method's ``rgb/`` tree (a frame folder's layout), if there is one."""
    return sibling_tree(rgb_root, "normal")


def read_normal_clip(root: Path, subject: str, sequence: str, camera: str) -> np.ndarray | None:
    """Unit normals [T, H, W, 3] (zero on the background) of one camera; None when the camera has none."""
    folder = root / subject / sequence / camera
    files = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES) if folder.is_dir() else []
    )
    if not files:
        return None
    try:
        return np.stack([decode_normal_png(p)[0] for p in files])
    except (NormalMapError, ValueError) as error:
        raise InputError(f"{folder}: {error}") from error


def resize_normals(normals: np.ndarray, height: int | None) -> np.ndarray:
    """Area-resize normal maps [T, H, W, 3] to ``height`` rows (aspect kept), renormalized; zero stays zero."""
    if height is None or normals.shape[1] == height:
        return normals
    width = round(normals.shape[2] * height / normals.shape[1])
    return unit(np.stack([cv2.resize(n, (width, height), interpolation=cv2.INTER_AREA) for n in normals]))


def normal_error_deg(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> list[float]:
    """Per frame: mean angle in degrees between ``pred`` and ``gt`` [T, H, W, 3] over the ground-truth foreground
    (``mask`` [T, H, W] > 0.5 where given, and a ground-truth normal present); NaN for a frame with none."""
    if pred.shape != gt.shape:
        raise InputError(f"normal maps of shape {pred.shape[1:3]} against ground truth {gt.shape[1:3]}")
    present = np.linalg.norm(gt, axis=-1) > 0  # [T, H, W]
    foreground = present if mask is None else present & (np.asarray(mask) > 0.5)
    out = []
    for t in range(len(gt)):
        errors = angular_error_deg(pred[t], gt[t], foreground[t])
        out.append(float(errors.mean()) if errors.size else float("nan"))
    return out

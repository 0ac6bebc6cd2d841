"""Frame folders (ARCHITECTURE §3) as reconstruction reads and rendering writes them.

ROOT/rgb/{subject}/{sequence}/{camera}/{frame:05d}.png, ROOT/normal/... and ROOT/mask/... mirroring it,
ROOT/cameras/{subject}/{sequence}.json (serial -> camera JSON). Tracking (per-frame FLAME parameters) is
read from ROOT/tracking/{subject}/{sequence}.npz in NeRSemble's flame2023_tracking.npz names, or from any
path an external tracker wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from geodiff4d.datasets.cameras import Camera
from geodiff4d.datasets.normal_maps import decode_normal_png, encode_normal_png
from geodiff4d.recon.files import atomic_output


class FrameFolderError(ValueError):
    """Missing or malformed frame-folder content; the message names the file."""


@dataclass
class FrameImage:
    sequence: str
    camera: str
    frame: int
    rgb: np.ndarray  # [H, W, 3] float32
    mask: np.ndarray  # [H, W] float32
    normal: np.ndarray | None  # [H, W, 3] our convention


def subjects(root: Path) -> list[str]:
    folder = Path(root) / "rgb"
    if not folder.is_dir():
        raise FrameFolderError(f"{folder}: frame folder has no rgb/ directory")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def sequences(root: Path, subject: str) -> list[str]:
    return sorted(p.name for p in (Path(root) / "rgb" / subject).iterdir() if p.is_dir())


def read_cameras(path: Path) -> dict[str, Camera]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FrameFolderError(f"{path}: cannot read cameras: {exc}") from exc
    return {serial: Camera.from_json(value, source=f"{path}[{serial}]") for serial, value in data.items()}


def write_cameras(path: Path, cameras: dict[str, Camera]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps({serial: cam.to_json() for serial, cam in cameras.items()}, indent=1))


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image).astype(np.float32) / 255.0
    except OSError as exc:
        raise FrameFolderError(f"{path}: cannot read image: {exc}") from exc


def read_frames(root: Path, subject: str, sequence: str, cameras: list[str] | None = None) -> list[FrameImage]:
    """All (camera, frame) images of one sequence, sorted; mask and normal are optional per frame."""
    root = Path(root)
    images = []
    seq_dir = root / "rgb" / subject / sequence
    for cam_dir in sorted(p for p in seq_dir.iterdir() if p.is_dir()):
        if cameras is not None and cam_dir.name not in cameras:
            continue
        for rgb_path in sorted(cam_dir.glob("*.png")):
            rel = rgb_path.relative_to(root / "rgb")
            rgb = _read_png(rgb_path)[..., :3]
            mask_path, normal_path = root / "mask" / rel, root / "normal" / rel
            mask = _read_png(mask_path) if mask_path.is_file() else np.ones(rgb.shape[:2], np.float32)
            mask = mask[..., 0] if mask.ndim == 3 else mask
            normal = decode_normal_png(normal_path)[0] if normal_path.is_file() else None
            images.append(FrameImage(sequence, cam_dir.name, int(rgb_path.stem), rgb, mask, normal))
    if not images:
        raise FrameFolderError(f"{seq_dir}: no frames")
    return images


def write_frame(root: Path, subject: str, sequence: str, camera: str, frame: int,
                rgb: torch.Tensor, alpha: torch.Tensor, normal: torch.Tensor) -> None:  # fmt: skip
    """Write rgb [3,H,W], mask (alpha > 0.5) and unit normal [3,H,W] PNGs of one rendered frame, atomically."""
    rel = Path(subject) / sequence / camera / f"{frame:05d}.png"
    rgb8 = (rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    mask = alpha.numpy() > 0.5
    for kind, writer in (
        ("rgb", lambda p: Image.fromarray(rgb8).save(p, format="PNG")),
        ("mask", lambda p: Image.fromarray((mask * 255).astype(np.uint8)).save(p, format="PNG")),
        ("normal", lambda p: p.write_bytes(encode_normal_png(normal.permute(1, 2, 0).numpy(), mask))),
    ):
        with atomic_output(root / kind / rel) as tmp:
            writer(tmp)

"""Frame folders (docs/formats.md, "Frame folders"): what sampling writes, reconstruction reads, rendering writes, eval scores.

ROOT/rgb/{subject}/{sequence}/{camera}/{frame:05d}.png, ROOT/normal/... and ROOT/mask/... mirroring it,
ROOT/cameras/{subject}/{sequence}.json (serial -> camera JSON). Per-frame FLAME parameters live in
ROOT/tracking/{subject}/{sequence}.npz in NeRSemble's flame2023_tracking.npz names (any tracker's output in
those names can replace them). :func:`export_frame_folder` turns a (procedural) NeRSemble folder into one.
A folder `generate --format tar` wrote holds its images in ROOT/tars/ instead (datasets.frame_tars); the readers
here take either.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.core.io.images import decode_image, from_float, to_float, write_png
from geodiff4d.core.io.json_yaml import read_json, write_json
from geodiff4d.core.io.tensors import tensor_to_image
from geodiff4d.datasets.cameras import Camera
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.flame_tracking import find_tracking, write_nersemble_tracking
from geodiff4d.datasets.frame_tars import TARS, TarFrames, is_tar_folder
from geodiff4d.datasets.nersemble import NersembleDataset
from geodiff4d.datasets.normal_maps import decode_normal_png, encode_normal_png
from geodiff4d.datasets.procedural import gt_normal_path


class FrameFolderError(UserError, ValueError):
    """Missing or malformed frame-folder content; the message names the file."""


@dataclass
class FrameImage:
    sequence: str
    camera: str
    frame: int
    rgb: np.ndarray  # [H, W, 3] float32
    mask: np.ndarray  # [H, W] float32
    normal: np.ndarray | None  # [H, W, 3] our convention


def _images_root(root: Path) -> Path:
    """rgb/, or tars/ in a tar frame folder: its sub-folders are subjects, theirs sequences."""
    return Path(root) / (TARS if is_tar_folder(root) else "rgb")


def subjects(root: Path) -> list[str]:
    folder = _images_root(root)
    if not folder.is_dir():
        raise FrameFolderError(f"{folder}: frame folder has no rgb/ directory")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def sequences(root: Path, subject: str) -> list[str]:
    folder = _images_root(root) / subject
    if not folder.is_dir():
        raise FrameFolderError(f"{folder}: subject not found in the frame folder")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def tracking_path(root: Path, subject: str, sequence: str) -> Path:
    return Path(root) / "tracking" / subject / f"{sequence}.npz"


def read_cameras(path: Path) -> dict[str, Camera]:
    data = read_json(path, FrameFolderError)
    return {serial: Camera.from_json(value, source=f"{path}[{serial}]") for serial, value in data.items()}


def write_cameras(path: Path, cameras: dict[str, Camera]) -> None:
    write_json(path, {serial: cam.to_json() for serial, cam in cameras.items()}, indent=1, sort_keys=False)


def write_tracking(path: Path, params: FlameParams, frames: np.ndarray | None = None) -> None:
    """FLAME parameters per frame in NeRSemble's tracking names (``frames`` defaults to 0..T-1)."""
    write_nersemble_tracking(path, params, frames)


def _camera_dirs(root: Path, subject: str, sequence: str, cameras: list[str] | None) -> list[Path]:
    seq_dir = Path(root) / "rgb" / subject / sequence
    if not seq_dir.is_dir():
        raise FrameFolderError(f"{seq_dir}: sequence not found")
    return sorted(p for p in seq_dir.iterdir() if p.is_dir() and (cameras is None or p.name in cameras))


def sequence_index(
    root: Path, subject: str, sequence: str, cameras: list[str] | None = None
) -> tuple[list[str], list[int]]:
    """The camera serials and frame numbers of one sequence, from file names (or tar indexes) alone."""
    if is_tar_folder(root):
        tars = TarFrames(root, subject, sequence)
        serials = [c for c in tars.cameras() if cameras is None or c in cameras]
        frames = sorted({f for c in serials for f in tars.frames(c)})
    else:
        dirs = _camera_dirs(root, subject, sequence, cameras)
        serials, frames = [d.name for d in dirs], sorted({int(p.stem) for d in dirs for p in d.glob("*.png")})
    if not frames:
        raise FrameFolderError(f"{_images_root(root) / subject / sequence}: no frames")
    return serials, frames


def _frame_image(
    sequence: str, camera: str, frame: int, rgb: bytes, mask: bytes | None, normal: bytes | None, name: str
) -> FrameImage:
    """One frame from its PNG bytes (mask and normal optional), decoded alike from files and tars."""
    rgb_image = to_float(decode_image(rgb, name))[..., :3]
    mask_image = (
        to_float(decode_image(mask, name)) if mask is not None else np.ones(rgb_image.shape[:2], np.float32)
    )
    mask_image = mask_image[..., 0] if mask_image.ndim == 3 else mask_image
    normal_image = decode_normal_png(normal)[0] if normal is not None else None
    return FrameImage(sequence, camera, frame, rgb_image, mask_image, normal_image)


def _optional_bytes(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def iter_frames(
    root: Path,
    subject: str,
    sequence: str,
    cameras: list[str] | None = None,
    frames: Collection[int] | None = None,
) -> Iterator[FrameImage]:
    """The (camera, frame) images of one sequence (every frame, or ``frames``), sorted, decoded one at a time
    so that a caller can keep them compactly; mask and normal are optional per frame."""
    root = Path(root)
    if is_tar_folder(root):
        tars = TarFrames(root, subject, sequence)
        for camera in (c for c in tars.cameras() if cameras is None or c in cameras):
            for frame in (f for f in tars.frames(camera) if frames is None or f in frames):
                rgb, mask, normal = (tars.read(camera, frame, part) for part in ("rgb", "mask", "normal"))
                yield _frame_image(
                    sequence, camera, frame, rgb, mask, normal, f"{subject}/{sequence}/{camera}"
                )
        return
    for cam_dir in _camera_dirs(root, subject, sequence, cameras):
        for rgb_path in sorted(cam_dir.glob("*.png")):
            if frames is not None and int(rgb_path.stem) not in frames:
                continue
            rel = rgb_path.relative_to(root / "rgb")
            mask, normal = (_optional_bytes(root / part / rel) for part in ("mask", "normal"))
            yield _frame_image(
                sequence, cam_dir.name, int(rgb_path.stem), rgb_path.read_bytes(), mask, normal, str(rgb_path)
            )


def read_frames(
    root: Path,
    subject: str,
    sequence: str,
    cameras: list[str] | None = None,
    frames: Collection[int] | None = None,
) -> list[FrameImage]:
    """All (camera, frame) images of one sequence (or of ``frames``), sorted."""
    images = list(iter_frames(root, subject, sequence, cameras, frames))
    if not images:
        raise FrameFolderError(f"{Path(root) / 'rgb' / subject / sequence}: no frames")
    return images


def frame_relpath(subject: str, sequence: str, camera: str, frame: int) -> Path:
    return Path(subject) / sequence / camera / f"{frame:05d}.png"


def write_frame(
    root: Path,
    subject: str,
    sequence: str,
    camera: str,
    frame: int,
    rgb: torch.Tensor,
    alpha: torch.Tensor,
    normal: torch.Tensor | None,
) -> None:
    """Write rgb [3,H,W], mask (alpha > 0.5) and unit normal [3,H,W] PNGs of one frame, atomically."""
    rel = frame_relpath(subject, sequence, camera, frame)
    mask = alpha.detach().cpu().numpy() > 0.5
    rgb8 = tensor_to_image(rgb, rounding="half_up")
    write_png(Path(root) / "rgb" / rel, rgb8, encoder="pillow")
    write_png(Path(root) / "mask" / rel, from_float(mask.astype(np.float32)), encoder="pillow")
    if normal is not None:
        normal_hwc = normal.detach().cpu().permute(1, 2, 0).numpy()
        atomic_write_bytes(Path(root) / "normal" / rel, encode_normal_png(normal_hwc, mask))


def export_frame_folder(
    nersemble_root: str | Path, out: str | Path, subjects: list[str] | None = None
) -> list[str]:
    """Turn a NeRSemble v2 folder into a frame folder: rgb (as captured), mask (alpha), normal (the procedural
    ground truth where present), cameras JSON and the FLAME tracking npz per sequence. Returns the subjects."""
    nersemble_root, out = Path(nersemble_root), Path(out)
    dataset = NersembleDataset(nersemble_root)
    chosen = subjects or dataset.subjects()
    for subject in chosen:
        for sequence in dataset.sequences(subject):
            write_cameras(out / "cameras" / subject / f"{sequence}.json", dataset.cameras(subject, sequence))
            tracking = find_tracking(dataset.sequence_dir(subject, sequence))
            if tracking is not None:
                atomic_write_bytes(tracking_path(out, subject, sequence), tracking[1].read_bytes())
            for serial in dataset.sequence_serials(subject, sequence):
                for frame in dataset.frames(subject, sequence, serial):
                    rel = frame_relpath(subject, sequence, serial, frame.frame)
                    write_png(out / "rgb" / rel, frame.rgb, encoder="pillow")
                    if frame.alpha8 is not None:
                        write_png(out / "mask" / rel, frame.alpha8, encoder="pillow")
                    normal = gt_normal_path(nersemble_root, subject, sequence, serial, frame.frame)
                    if normal.is_file():
                        atomic_write_bytes(out / "normal" / rel, normal.read_bytes())
    return chosen

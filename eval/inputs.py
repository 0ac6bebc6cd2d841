"""Prediction and ground-truth trees: discovery, frame reading and the checks that pair them.

Layout (predictions, and ground truth in the same layout): ``ROOT/<subject>/<sequence>/<camera>/<frame:05d>.png``
or one ``ROOT/<subject>/<sequence>/<camera>.mp4`` per camera; a ``mask_root`` mirrors it with foreground masks.
Ground truth can also be a NeRSemble v2 folder (alpha maps become the masks). Several methods live side by
side as ``PRED_ROOT/<method>/...``, or are named one at a time as ``NAME=PATH``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.images import read_image, to_float

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
NERSEMBLE_FRONTAL = "222200037"  # the rig's centre camera, facing the subject at eye level


class InputError(UserError, ValueError):
    """A prediction or ground-truth tree does not match; the message names the method/subject/camera/file."""


@dataclass
class Clip:
    """One camera of one sequence: uint8 RGB frames [T, H, W, 3], optional float masks [T, H, W] in [0,1]."""

    frames: np.ndarray
    masks: np.ndarray | None
    fps: float
    source: str  # folder or file the frames came from, for error messages


def _read_image(path: Path) -> np.ndarray:
    image = read_image(path)
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    return image if image.ndim == 2 else np.ascontiguousarray(image[..., :3])


def _read_mp4(path: Path, gray: bool = False) -> tuple[np.ndarray, float]:
    """All frames and the frame rate (25 when the file does not say)."""
    from geodiff4d.core.io.video import read_video, video_fps

    fps = video_fps(path)
    return read_video(path, gray=gray), fps if fps is not None else 25.0


class ClipSource(Protocol):
    name: str

    def units(self) -> list[tuple[str, str]]:
        """Sorted (subject, sequence) pairs."""

    def cameras(self, subject: str, sequence: str) -> list[str]: ...

    def clip(self, subject: str, sequence: str, camera: str) -> Clip: ...


@dataclass
class FolderSource:
    """A tree in our layout (a method's predictions, or ground truth in the same layout)."""

    name: str
    root: Path
    mask_root: Path | None = None
    fps: float = 25.0

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise InputError(f"{self.name}: folder {self.root} does not exist")

    def units(self) -> list[tuple[str, str]]:
        return sorted(
            (sub.name, seq.name)
            for sub in self.root.iterdir()
            if sub.is_dir()
            for seq in sub.iterdir()
            if seq.is_dir()
        )

    def cameras(self, subject: str, sequence: str) -> list[str]:
        folder = self.root / subject / sequence
        if not folder.is_dir():
            raise InputError(f"{self.name}: sequence folder {folder} is missing")
        return sorted(
            p.stem if p.suffix == ".mp4" else p.name
            for p in folder.iterdir()
            if p.is_dir() or p.suffix == ".mp4"
        )

    def _frames(
        self, root: Path, subject: str, sequence: str, camera: str, gray: bool
    ) -> tuple[np.ndarray, float, str]:
        folder = root / subject / sequence / camera
        video = folder.with_suffix(".mp4")
        if folder.is_dir():
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not files:
                raise InputError(f"{self.name}: no frames in {folder}")
            images = [_read_image(p) for p in files]
            sizes = {im.shape[:2] for im in images}
            if len(sizes) > 1:
                raise InputError(f"{self.name}: frames of different sizes {sorted(sizes)} in {folder}")
            stack = np.stack(images)
            if gray and stack.ndim == 4:
                stack = stack[..., 0]
            if not gray and stack.ndim == 3:
                stack = np.repeat(stack[..., None], 3, axis=-1)
            return stack, self.fps, str(folder)
        if video.is_file():
            frames, fps = _read_mp4(video, gray=gray)
            return frames, fps, str(video)
        raise InputError(f"{self.name}: camera {camera!r} missing: neither {folder} nor {video} exists")

    def clip(self, subject: str, sequence: str, camera: str) -> Clip:
        frames, fps, source = self._frames(self.root, subject, sequence, camera, gray=False)
        masks = None
        if self.mask_root is not None:
            m, _, _ = self._frames(Path(self.mask_root), subject, sequence, camera, gray=True)
            masks = to_float(m)
        return Clip(frames, masks, fps, source)


class NersembleSource:
    """Ground truth read directly from a NeRSemble v2 folder; camera names are the serials (``cam_`` optional)."""

    def __init__(self, root: str | Path):
        from geodiff4d.datasets.nersemble import NersembleDataset

        self.name = "nersemble"
        self.dataset = NersembleDataset(root)

    def units(self) -> list[tuple[str, str]]:
        return sorted((s, q) for s in self.dataset.subjects() for q in self.dataset.sequences(s))

    def cameras(self, subject: str, sequence: str) -> list[str]:
        return sorted(self.dataset.sequence_serials(subject, sequence))

    def clip(self, subject: str, sequence: str, camera: str) -> Clip:
        from geodiff4d.datasets.colour_calibration import correct_colour  # as packed for training

        serial = camera.removeprefix("cam_")
        frames = list(self.dataset.frames(subject, sequence, serial))
        rgb = np.stack(
            [f.rgb if f.color_matrix is None else correct_colour(f.rgb, f.color_matrix) for f in frames]
        )  # [T, H, W, 3]
        alphas = [f.alpha for f in frames]
        masks = None if any(a is None for a in alphas) else np.stack(alphas)  # [T, H, W]
        fps = self.dataset.fps(subject, sequence)  # the recording's own rate, whatever --fps says
        return Clip(rgb, masks, fps, str(self.dataset.video_path(subject, sequence, serial)))

    def frontal_camera(self, subject: str, sequence: str) -> str:
        """NeRSemble's frontal serial when recorded, else the camera nearest the rig's mean viewing direction."""
        serials = self.cameras(subject, sequence)
        if NERSEMBLE_FRONTAL in serials:
            return NERSEMBLE_FRONTAL
        cameras = self.dataset.cameras(subject, sequence)
        directions = np.stack(
            [cameras[s].center / np.linalg.norm(cameras[s].center) for s in serials]
        )  # [C, 3]
        return serials[int(np.argmax(directions @ directions.mean(axis=0)))]


def open_ground_truth(path: str | Path, mask_root: str | Path | None = None, fps: float = 25.0) -> ClipSource:
    """A NeRSemble v2 folder (has ``*/calibration/camera_params.json``; frame rate: its videos') or a tree in our
    layout (frame rate: an MP4's own, ``fps`` for frame folders)."""
    path = Path(path)
    if any(path.glob("*/calibration/camera_params.json")):
        return NersembleSource(path)
    return FolderSource("ground truth", path, Path(mask_root) if mask_root else None, fps)


def tree_files(root: Path) -> list[Path]:
    """Every file under ``root``, following directory symlinks (``rglob`` does not descend into them, and the
    benchmark's ground-truth camera folders are symlinks); a folder reached twice (a link cycle) is walked once."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        files += [Path(folder) / name for name in names]
    return sorted(f for f in files if f.is_file())


def tree_fingerprint(path: str | Path | None) -> str | None:
    """A digest of every file under ``path`` (relative name, size, modification time of the file a link points
    to; a file is its own tree), through directory symlinks: changes when any file is added, removed, rewritten
    or touched. Cheap enough for whole NeRSemble releases, since no content is read; a copy with new timestamps
    counts as changed, which errs on the safe side."""
    if path is None:
        return None
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root} does not exist")
    files = [root] if root.is_file() else tree_files(root)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(
            f"{file.relative_to(root) if file != root else file.name}\0{stat.st_size}\0"
            f"{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()


def sibling_tree(rgb_root: str | Path, name: str) -> Path | None:
    """The ``name`` tree (``mask``, ``normal``) beside a method's ``rgb/`` tree (a frame folder's layout), if any."""
    root = Path(rgb_root)
    sibling = root.parent / name
    return sibling if root.name == "rgb" and sibling.is_dir() else None


def discover_methods(pred: str | Path | dict[str, str | Path]) -> dict[str, Path]:
    """Methods to score: ``{name: path}`` as given, or every sub-folder of a ``PRED_ROOT``."""
    if isinstance(pred, dict):
        return {name: Path(p) for name, p in sorted(pred.items())}
    root = Path(pred)
    if not root.is_dir():
        raise InputError(f"prediction root {root} does not exist")
    methods = {p.name: p for p in sorted(root.iterdir()) if p.is_dir()}
    if not methods:
        raise InputError(f"prediction root {root} has no method folders")
    return methods


def parse_named_paths(items: list[str]) -> dict[str, Path]:
    """``["ours=out/rgb", "cap4d=/data/cap4d"]`` -> ``{"ours": Path(...), ...}`` (the CLI's ``--pred NAME=PATH``)."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"expected NAME=PATH, got {item!r}")
        named[name] = Path(path)
    return named


def match_cameras(method: str, pred_cams: list[str], gt_cams: list[str], where: str) -> dict[str, str]:
    """Pred camera -> GT camera (``cam_`` prefix optional); a GT camera with no prediction is an error."""
    by_key = {c.removeprefix("cam_"): c for c in pred_cams}
    missing = [c for c in gt_cams if c.removeprefix("cam_") not in by_key]
    if missing:
        raise InputError(f"{method}: {where}: missing cameras {missing} (predicted: {sorted(pred_cams)})")
    return {by_key[c.removeprefix("cam_")]: c for c in gt_cams}


def check_clips(method: str, where: str, pred: Clip, gt: Clip) -> None:
    """Frame counts and sizes must agree; the error names both sources."""
    if len(pred.frames) != len(gt.frames):
        raise InputError(
            f"{method}: {where}: frame count {len(pred.frames)} in {pred.source} "
            f"!= {len(gt.frames)} in {gt.source}"
        )
    if pred.frames.shape[1:3] != gt.frames.shape[1:3]:
        raise InputError(
            f"{method}: {where}: frame size {pred.frames.shape[1:3]} in {pred.source} "
            f"!= {gt.frames.shape[1:3]} in {gt.source}"
        )

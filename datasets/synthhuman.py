"""SynthHuman layout: a flat folder of rgb_/alpha_/depth_/normal_/cam_ files per index (7-digit, zero-padded).

Depth is z-depth in centimetres with 65504 (float16 max) marking invalid pixels; cam_ holds the 3x3 K.
The normal axis convention is undocumented, so it is one assumed constant here, used by both the writer and
the reader, and ``derive_normal_convention`` checks it against depth + K on any copy of the data.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.core.io.exr import ExrError, read_exr, write_exr
from geodiff4d.core.io.images import from_float, read_image, to_float, write_png
from geodiff4d.datasets.cameras import Camera, CameraError
from geodiff4d.datasets.normal_maps import OPENCV_TO_OURS, angular_error_deg, normals_from_depth, unit

# ours = SYNTHHUMAN_NORMAL_TO_OURS @ stored. Assumption: stored in OpenCV camera space (x right, y down,
# z forward; a surface facing the camera is (0, 0, -1)); ours has y up and z toward the camera.
SYNTHHUMAN_NORMAL_TO_OURS = np.diag(OPENCV_TO_OURS)  # our assumption: stored in OpenCV camera axes
INVALID_DEPTH_CM = 65504.0
MEMBERS = ("rgb", "alpha", "depth", "normal", "cam")
_SUFFIX = {"rgb": ".png", "alpha": ".png", "depth": ".exr", "normal": ".exr", "cam": ".txt"}
_INDEX_RE = re.compile(r"^rgb_(\d{7})\.png$")


class SynthHumanError(UserError, ValueError):
    """Missing or inconsistent SynthHuman files; the message names the file."""


@dataclass
class SynthHumanSample:
    index: int
    rgb: np.ndarray  # float32 [H, W, 3] in [0, 1]
    alpha: np.ndarray  # float32 [H, W] in [0, 1]
    depth_m: np.ndarray  # float32 [H, W] metres, 0 where invalid
    mask: np.ndarray  # bool [H, W], valid depth
    normal: np.ndarray  # float32 [H, W, 3] our convention (x right, y up, z toward camera), 0 background
    K: np.ndarray  # float64 [3, 3]
    camera: Camera  # identity world_to_cam: SynthHuman frames are single camera-space views


def member_path(root: str | os.PathLike, index: int, member: str) -> Path:
    return Path(root) / f"{member}_{index:07d}{_SUFFIX[member]}"


def write_synthhuman_sample(
    root: str | os.PathLike,
    index: int,
    rgb: np.ndarray,
    alpha: np.ndarray,
    depth_m: np.ndarray,
    normal_ours: np.ndarray,
    K: np.ndarray,
) -> None:
    """Write one sample. rgb [H,W,3] and alpha [H,W] uint8 or float [0,1]; depth_m 0 = invalid; normals ours."""
    rgb, alpha = from_float(rgb), from_float(alpha)
    depth_m = np.asarray(depth_m, dtype=np.float64)
    normal_ours = np.asarray(normal_ours, dtype=np.float64)
    height, width = depth_m.shape
    if (
        rgb.shape != (height, width, 3)
        or alpha.shape != (height, width)
        or normal_ours.shape != (height, width, 3)
    ):
        raise SynthHumanError(
            f"sample {index}: inconsistent shapes rgb {rgb.shape}, alpha {alpha.shape}, "
            f"depth {depth_m.shape}, normal {normal_ours.shape}"
        )
    valid = np.isfinite(depth_m) & (depth_m > 0)
    depth_cm = np.where(valid, depth_m * 100.0, INVALID_DEPTH_CM)
    stored_normal = normal_ours @ SYNTHHUMAN_NORMAL_TO_OURS  # row-vector form of M^T @ n
    paths = {member: member_path(root, index, member) for member in MEMBERS}
    write_png(paths["rgb"], rgb)
    write_png(paths["alpha"], alpha)
    write_exr(paths["depth"], depth_cm.astype(np.float32))
    write_exr(paths["normal"], stored_normal.astype(np.float32))
    K_text = "\n".join(" ".join(f"{value:.17g}" for value in row) for row in np.asarray(K, np.float64)) + "\n"
    atomic_write_bytes(paths["cam"], K_text.encode())


def _read_K(path: Path) -> np.ndarray:
    try:
        K = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise SynthHumanError(f"{path}: unreadable intrinsics: {exc}") from exc
    if K.shape != (3, 3):
        raise SynthHumanError(f"{path}: intrinsics must be a 3x3 matrix, got shape {K.shape}")
    return K


class SynthHumanDataset:
    """Random access over a SynthHuman folder; every index must have all five members."""

    def __init__(self, root: str | os.PathLike, indices: Sequence[int] | None = None):
        """``indices``: samples a listing of this folder already found (a packing worker trusts its job's listing
        instead of listing a large folder again; a member missing since then fails when it is read)."""
        self.root = Path(root)
        if not self.root.is_dir():
            raise SynthHumanError(f"{self.root}: SynthHuman folder not found")
        if indices is not None:
            self._indices = sorted(indices)
            self._known = frozenset(self._indices)
            return
        names = {entry.name for entry in self.root.iterdir()}
        self._indices = sorted(int(m.group(1)) for name in names if (m := _INDEX_RE.match(name)))
        if not self._indices:
            raise SynthHumanError(f"{self.root}: no rgb_XXXXXXX.png files")
        for index in self._indices:
            for member in MEMBERS:
                path = member_path(self.root, index, member)
                if path.name not in names:
                    raise SynthHumanError(f"{path}: missing (sample {index} has an rgb image)")
        self._known = frozenset(self._indices)

    def indices(self) -> list[int]:
        return list(self._indices)

    def __len__(self) -> int:
        return len(self._indices)

    def path(self, index: int, member: str) -> Path:
        return member_path(self.root, index, member)

    def _exr(self, index: int, member: str) -> np.ndarray:
        try:
            return read_exr(self.path(index, member))
        except ExrError as exc:
            raise SynthHumanError(str(exc)) from exc

    def raw_normal(self, index: int) -> np.ndarray:
        """Normals as stored in the file, [H, W, 3], before the axis convention is applied."""
        normal = self._exr(index, "normal")
        if normal.ndim != 3 or normal.shape[2] < 3:
            raise SynthHumanError(
                f"{self.path(index, 'normal')}: expected 3 channels, got shape {normal.shape}"
            )
        return normal[..., :3]

    def __getitem__(self, index: int) -> SynthHumanSample:
        if index not in self._known:
            raise KeyError(f"{self.root}: no SynthHuman sample {index}")
        rgb = to_float(read_image(self.path(index, "rgb")))
        if rgb.ndim != 3 or rgb.shape[2] not in (3, 4):
            raise SynthHumanError(f"{self.path(index, 'rgb')}: expected an RGB image, got shape {rgb.shape}")
        rgb = np.ascontiguousarray(rgb[..., :3])
        alpha = to_float(read_image(self.path(index, "alpha")))
        alpha = alpha[..., 0] if alpha.ndim == 3 else alpha
        depth_cm = self._exr(index, "depth")
        normal = unit(self.raw_normal(index).astype(np.float64) @ SYNTHHUMAN_NORMAL_TO_OURS.T)
        height, width = rgb.shape[:2]
        for member, array in (("alpha", alpha), ("depth", depth_cm), ("normal", normal)):
            if array.shape[:2] != (height, width) or (member == "depth" and array.ndim != 2):
                raise SynthHumanError(
                    f"{self.path(index, member)}: shape {array.shape} does not match rgb {height}x{width}"
                )
        mask = np.isfinite(depth_cm) & (depth_cm > 0) & (depth_cm < INVALID_DEPTH_CM)
        K = _read_K(self.path(index, "cam"))
        try:
            camera = Camera(np.eye(4), K, width, height)
        except CameraError as exc:
            raise SynthHumanError(f"{self.path(index, 'cam')}: {exc}") from exc
        return SynthHumanSample(
            index=index,
            rgb=rgb,
            alpha=alpha.astype(np.float32),
            depth_m=np.where(mask, depth_cm / 100.0, 0.0).astype(np.float32),
            mask=mask,
            normal=normal.astype(np.float32),
            K=K,
            camera=camera,
        )


def signed_permutations() -> list[np.ndarray]:
    """The 48 signed 3x3 permutation matrices (every axis relabelling with sign flips)."""
    matrices = []
    for order in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            matrix = np.zeros((3, 3))
            matrix[np.arange(3), order] = signs
            matrices.append(matrix)
    return matrices


@dataclass
class NormalConventionFit:
    matrix: np.ndarray  # [3, 3] best signed permutation: ours = matrix @ stored
    median_error_deg: float  # median angle to depth-derived normals with that matrix
    runner_up_error_deg: float  # the second-best matrix's median, the margin of the decision
    n_pixels: int

    @property
    def matches_assumed(self) -> bool:
        return bool(np.array_equal(self.matrix, SYNTHHUMAN_NORMAL_TO_OURS))


def derive_normal_convention(
    dataset: SynthHumanDataset, n_samples: int = 8, max_pixels: int = 200_000
) -> NormalConventionFit:
    """Which of the 48 signed axis permutations maps stored normals onto normals derived from depth + K."""
    indices = dataset.indices()
    chosen = sorted(
        {indices[i] for i in np.linspace(0, len(indices) - 1, min(n_samples, len(indices))).astype(int)}
    )
    stored_all, derived_all = [], []
    for index in chosen:
        sample = dataset[index]
        derived = normals_from_depth(sample.depth_m, sample.K, sample.mask)
        stored = dataset.raw_normal(index)
        valid = (np.linalg.norm(derived, axis=-1) > 0) & (np.linalg.norm(stored, axis=-1) > 1e-6)
        stored_all.append(stored[valid])
        derived_all.append(derived[valid])
    stored, derived = np.concatenate(stored_all), np.concatenate(derived_all)  # [N, 3]
    if len(stored) == 0:
        raise SynthHumanError(f"{dataset.root}: no pixels with both valid depth and normals")
    stride = max(1, len(stored) // max_pixels)
    stored, derived = stored[::stride], derived[::stride]
    medians = [float(np.median(angular_error_deg(stored @ m.T, derived))) for m in signed_permutations()]
    order = np.argsort(medians, kind="stable")
    return NormalConventionFit(
        matrix=signed_permutations()[order[0]],
        median_error_deg=medians[order[0]],
        runner_up_error_deg=medians[order[1]],
        n_pixels=len(stored),
    )

"""FLAME tracking files: what they hold, how they are found and how they become ``FlameParams``.

The in-memory representation is ``FlameParams`` with the meaning of the released NeRSemble tracking (the official
``nersemble_benchmark`` ``FlameProvider``): FLAME skinned with zero global rotation, then placed by the
model-to-world transform ``scale * R(rotation) v + translation``, ``R`` intrinsic Euler XYZ
(``FlameParams.model_to_world``; ``FlameModel`` applies it). Every place that poses FLAME from a tracking file
reads it through this module:

- NeRSemble v2 (``flame2023_tracking_v2.npz``, what the benchmark ships by default) and v1
  (``flame2023_tracking.npz``, optional): shape (1, 300), expression (T, 100), rotation (T, 3),
  rotation_matrices (T, 3, 3), translation (T, 3), jaw/neck (T, 3), eyes (T, 6), scale (1, 1), frames (T,).
  v2 is preferred, v1 the fallback. In a release, row t is video frame t: the official
  ``FlameProvider.get_vertices(timestep)`` indexes rows by timestep and never reads ``frames``, so a sequence's
  ``frames`` must be 0..T-1 (anything else is refused, never remapped; frame folders, which hold chosen frames,
  keep the mapping). Both files are fitted with FLAME 2023 (their names say so).
- VHAP / GaussianAvatars ``flame_param.npz``: shape (300,), expr (T, 100), rotation (T, 3) *axis-angle about the
  root joint* (FLAME's own global pose), neck_pose/jaw_pose (T, 3), eyes_pose (T, 6), translation (T, 3) added
  after skinning, no scale, and per-vertex static_offset/dynamic_offset. Converting it needs the head model,
  because a rotation about the root joint is a rotation about the origin plus a shape-dependent translation.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.datasets.flame import FlameModel, FlameParams

TRACKING_V2 = "flame2023_tracking_v2.npz"
TRACKING_V1 = "flame2023_tracking.npz"
TRACKING_FILES = {"v2": TRACKING_V2, "v1": TRACKING_V1}  # in order of preference
TRACKING_SHAPE_DIM, TRACKING_EXPR_DIM = 300, 100
TRACKING_FLAME_VERSION = "2023"  # flame2023_tracking*.npz are fitted with FLAME 2023
# what the official FLAME files of other versions are called: FLAME 2017/2019/2020 ship as generic_model.pkl
_OTHER_FLAME_NAMES = ("generic_model", "2017", "2019", "2020")
ROTATION_MATRIX_TOLERANCE = 1e-4  # rotation_matrices vs Euler XYZ of rotation (float32 files)
_PER_FRAME_WIDTH = {"rotation": 3, "translation": 3, "jaw": 3, "neck": 3, "eyes": 6}
_VHAP_PER_FRAME_WIDTH = {
    "expr": None,
    "rotation": 3,
    "neck_pose": 3,
    "jaw_pose": 3,
    "eyes_pose": 6,
    "translation": 3,
}


class TrackingError(UserError, ValueError):
    """Missing, malformed or unsupported tracking file; the message names the file."""


@dataclass
class FlameTracking:
    params: FlameParams  # [T] frames, shape/scale repeated per frame, sized to the requested model
    frames: np.ndarray  # [T] video frame index of each row
    path: Path  # the file it came from
    kind: str  # "v2", "v1" (NeRSemble) or "vhap"


# ----------------------------------------------------------------------------------------------- finding


def tracking_paths(sequence_dir: str | os.PathLike) -> dict[str, Path]:
    """The NeRSemble tracking files a sequence folder may hold, v2 first."""
    return {kind: Path(sequence_dir) / "tracking" / name for kind, name in TRACKING_FILES.items()}


def find_tracking(sequence_dir: str | os.PathLike) -> tuple[str, Path] | None:
    """(kind, path) of the preferred tracking file present (v2, else v1), None when neither exists."""
    return next(((kind, path) for kind, path in tracking_paths(sequence_dir).items() if path.is_file()), None)


def missing_tracking_message(sequence_dir: str | os.PathLike) -> str:
    v2, v1 = tracking_paths(sequence_dir).values()
    return f"no FLAME tracking: neither {v2} nor {v1} exists"


# ----------------------------------------------------------------------------------------------- reading


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise TrackingError(f"{path}: tracking file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise TrackingError(f"{path}: unreadable tracking file: {exc}") from exc


def _check_fits(
    path: Path, arrays: Mapping[str, np.ndarray], n_shape: int, n_expr: int, names: tuple[str, str]
) -> None:
    """Refuse to drop non-zero coefficients: real tracking read with a smaller head model loses its identity."""
    for name, kept in zip(names, (n_shape, n_expr), strict=True):
        dropped = np.asarray(arrays[name])[..., kept:]
        if dropped.size and np.any(dropped != 0):
            width = np.asarray(arrays[name]).shape[-1]
            raise TrackingError(
                f"{path}: {name} has {width} coefficients but the head model has {kept}: pass the FLAME model the "
                f"tracking was made with (--flame FLAME2023.pkl) instead of the procedural head"
            )


def read_nersemble_tracking(
    path: str | os.PathLike, n_shape: int | None = None, n_expr: int | None = None, *, kind: str = "v2"
) -> FlameTracking:
    """A NeRSemble tracking npz -> FlameParams [T]; shape/expression zero-padded to the model's sizes.

    Non-zero coefficients beyond the model's sizes are an error (never silently truncated), and so are
    ``rotation_matrices`` that are not the Euler XYZ rotation of ``rotation`` (another convention).
    """
    path = Path(path)
    arrays = _load_arrays(path)
    missing = [
        name for name in ("shape", "expression", "scale", "frames", *_PER_FRAME_WIDTH) if name not in arrays
    ]
    if missing:
        raise TrackingError(f"{path}: missing array(s) {missing}")
    n_frames = arrays["frames"].shape[0] if arrays["frames"].ndim else 0
    n_shape_file, n_expr_file = (
        arrays[name].shape[-1] if arrays[name].ndim else 0 for name in ("shape", "expression")
    )
    expected = {
        "frames": (n_frames,),
        "scale": (1, 1),
        "shape": (1, n_shape_file),
        "expression": (n_frames, n_expr_file),
    }
    expected |= {name: (n_frames, width) for name, width in _PER_FRAME_WIDTH.items()}
    if "rotation_matrices" in arrays:
        expected["rotation_matrices"] = (n_frames, 3, 3)
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise TrackingError(f"{path}: array {name} must have shape {shape}, got {arrays[name].shape}")
    n_shape, n_expr = n_shape or n_shape_file, n_expr or n_expr_file
    _check_fits(path, arrays, n_shape, n_expr, ("shape", "expression"))
    params = FlameParams.from_numpy_dict(arrays, n_shape, n_expr)
    if "rotation_matrices" in arrays and n_frames:
        implied = Rotation.from_euler("XYZ", arrays["rotation"].astype(np.float64)).as_matrix()
        error = float(np.abs(implied - arrays["rotation_matrices"]).max())
        if error > ROTATION_MATRIX_TOLERANCE:
            raise TrackingError(
                f"{path}: rotation_matrices differ from the Euler XYZ rotation of 'rotation' by {error:.2g}: "
                "not the released NeRSemble convention"
            )
    return FlameTracking(params, arrays["frames"].astype(np.int64), path, kind)


def read_vhap_tracking(path: str | os.PathLike, model: FlameModel) -> FlameTracking:
    """A VHAP / GaussianAvatars ``flame_param.npz`` -> the same motion in NeRSemble's meaning.

    VHAP places the head by FLAME's root joint: ``v = R (v0 - J0) + J0 + t`` with ``v0`` skinned with zero root
    rotation and ``J0`` the root joint of the shaped (and expressed) template. That is ``scale = 1``,
    ``R`` as Euler XYZ, translation ``t + J0 - R J0``. Per-vertex offsets have no place in our head model, so
    non-zero ``static_offset``/``dynamic_offset`` are refused rather than dropped.
    """
    path = Path(path)
    arrays = _load_arrays(path)
    missing = [name for name in ("shape", *_VHAP_PER_FRAME_WIDTH) if name not in arrays]
    if missing:
        raise TrackingError(f"{path}: missing VHAP array(s) {missing}")
    n_frames = arrays["rotation"].shape[0] if arrays["rotation"].ndim == 2 else 0
    for name, width in _VHAP_PER_FRAME_WIDTH.items():
        shape = arrays[name].shape
        if len(shape) != 2 or shape[0] != n_frames or (width is not None and shape[1] != width):
            raise TrackingError(
                f"{path}: array {name} must have shape ({n_frames}, {width or 'D'}), got {shape}"
            )
    for name in ("static_offset", "dynamic_offset"):
        if name in arrays and np.any(arrays[name] != 0):
            raise TrackingError(
                f"{path}: non-zero {name}: per-vertex FLAME offsets are not supported by our head model"
            )
    shape = np.asarray(arrays["shape"], np.float32).reshape(1, -1)
    _check_fits(
        path, {"shape": shape, "expr": arrays["expr"]}, model.n_shape, model.n_expr, ("shape", "expr")
    )
    nersemble = {
        "shape": shape,
        "expression": arrays["expr"],
        "rotation": np.zeros((n_frames, 3)),
        "neck": arrays["neck_pose"],
        "jaw": arrays["jaw_pose"],
        "eyes": arrays["eyes_pose"],
        "translation": np.zeros((n_frames, 3)),
        "scale": np.ones((1, 1)),
    }
    params = FlameParams.from_numpy_dict(nersemble, model.n_shape, model.n_expr)
    with torch.no_grad():
        root = model(params).joints[:, 0].double().numpy()  # [T, 3] root joint, identity placement
    rotation = Rotation.from_rotvec(arrays["rotation"].astype(np.float64))
    translation = arrays["translation"].astype(np.float64) + root - rotation.apply(root)
    params.rotation = torch.as_tensor(rotation.as_euler("XYZ"), dtype=torch.float32)
    params.translation = torch.as_tensor(translation, dtype=torch.float32)
    frames = np.asarray(arrays.get("timestep_id", np.arange(n_frames)), dtype=np.int64).reshape(-1)
    return FlameTracking(params, frames, path, "vhap")


def check_flame_version(model_path: str | os.PathLike, tracking_source: str) -> None:
    """Refuse a FLAME model file whose name says another version than the NeRSemble tracking's (FLAME 2023):
    2020 and 2023 share topology and coefficient counts, so the wrong one poses every frame subtly wrong."""
    name = Path(model_path).name.lower()
    if TRACKING_FLAME_VERSION in name:
        return
    other = next((marker for marker in _OTHER_FLAME_NAMES if marker in name), None)
    if other is not None:
        raise TrackingError(
            f"--flame {model_path}: named like FLAME {'2020 (or 2017/2019)' if other == 'generic_model' else other}, "
            f"but the tracking of {tracking_source} was fitted with FLAME {TRACKING_FLAME_VERSION}: pass flame{TRACKING_FLAME_VERSION}.pkl"
        )


def load_tracking(path: str | os.PathLike, model: FlameModel) -> FlameTracking:
    """Any supported tracking file (NeRSemble v1/v2 or VHAP, told apart by their array names) sized to ``model``."""
    path = Path(path)
    names = set(_load_arrays(path))
    if "expr" in names and "jaw_pose" in names:
        return read_vhap_tracking(path, model)
    kind = "v1" if path.name == TRACKING_V1 else "v2"
    return read_nersemble_tracking(path, model.n_shape, model.n_expr, kind=kind)


def sequence_tracking(
    sequence_dir: str | os.PathLike, n_shape: int | None = None, n_expr: int | None = None
) -> FlameTracking | None:
    """The preferred NeRSemble tracking of a sequence folder (v2, else v1); None when it has neither. Its rows
    must be video frames 0..T-1, as the official provider reads them (frame folders may hold other frames)."""
    found = find_tracking(sequence_dir)
    if found is None:
        return None
    kind, path = found
    tracking = read_nersemble_tracking(path, n_shape, n_expr, kind=kind)
    n_rows = len(tracking.frames)
    if not np.array_equal(tracking.frames, np.arange(n_rows)):
        raise TrackingError(
            f"{path}: frames is not 0..{n_rows - 1} (it starts {tracking.frames[:5].tolist()}): the official "
            "FlameProvider reads row t as video frame t and never reads frames, so this file's rows and frames "
            "disagree"
        )
    return tracking


# ----------------------------------------------------------------------------------------------- writing


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """np.savez without its wall-clock zip timestamps, so equal arrays give byte-identical files; atomic."""
    with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            archive.writestr(
                zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue()
            )


def _pad(values: np.ndarray, width: int, name: str) -> np.ndarray:
    if values.shape[1] > width:
        raise ValueError(f"{name} has {values.shape[1]} coefficients, the tracking format holds {width}")
    return np.pad(values, ((0, 0), (0, width - values.shape[1])))


def write_nersemble_tracking(
    path: str | os.PathLike, params: FlameParams, frames: np.ndarray | None = None
) -> None:
    """A NeRSemble tracking npz (names, shapes, float32, ``rotation_matrices``); shape/expression zero-padded to
    300/100; ``frames`` defaults to 0..T-1."""
    arrays = params.to_numpy_dict()
    frames = np.arange(params.batch_size) if frames is None else np.asarray(frames, dtype=np.int64)
    if frames.shape != (params.batch_size,):
        raise ValueError(f"{path}: frames must have shape ({params.batch_size},), got {frames.shape}")
    arrays["shape"] = _pad(arrays["shape"], TRACKING_SHAPE_DIM, "shape")
    arrays["expression"] = _pad(arrays["expression"], TRACKING_EXPR_DIM, "expression")
    write_npz(path, {**arrays, "frames": frames.astype(np.int64)})

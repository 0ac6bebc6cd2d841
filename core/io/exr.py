"""OpenEXR float images (depth, normals) through the ``OpenEXR`` 3.x package, plus the atomic-write helper.

EXR keeps depth and normals at full float precision where PNG would quantize them; SynthHuman ships both as
EXR. Writes go to a temp file in the target folder and are renamed, so a crash never leaves a half file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import OpenEXR

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_output


class ExrError(UserError, ValueError):
    """An EXR file that cannot be read or written as asked; the message names the file."""


def write_exr(
    path: str | os.PathLike,
    array: np.ndarray,
    channels: str | Sequence[str] | None = None,
    half: bool = False,
) -> None:
    """Write [H, W] (one channel, default name 'Y') or [H, W, C] (default names R, G, B[, A]) floats.

    ``half`` stores float16 (what a 65504 "invalid" sentinel suggests some sources use); default float32.
    """
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or not 1 <= array.shape[2] <= 4:
        raise ExrError(f"{path}: expected [H, W] or [H, W, C<=4] array, got shape {array.shape}")
    n_channels = array.shape[2]
    if channels is None:
        channels = ["Y"] if n_channels == 1 else list("RGBA"[:n_channels])
    elif isinstance(channels, str):
        channels = [channels] if n_channels == 1 else list(channels)
    if len(channels) != n_channels:
        raise ExrError(f"{path}: {n_channels} channels but names {list(channels)}")
    dtype = np.float16 if half else np.float32
    pixels = {name: np.ascontiguousarray(array[..., c], dtype=dtype) for c, name in enumerate(channels)}
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    with atomic_output(path) as tmp, OpenEXR.File(header, pixels) as exr:
        exr.write(str(tmp))


def read_exr(path: str | os.PathLike, channels: Sequence[str] | None = None) -> np.ndarray:
    """Read float32 [H, W] (single-channel file) or [H, W, C] (R, G, B[, A], or the named ``channels``)."""
    path = Path(path)
    if not path.is_file():
        raise ExrError(f"{path}: EXR file not found")
    try:
        with OpenEXR.File(str(path), separate_channels=True) as exr:
            planes = {name: np.asarray(channel.pixels) for name, channel in exr.channels().items()}
    except Exception as exc:  # OpenEXR raises bare RuntimeError/Exception subtypes for corrupt files
        raise ExrError(f"{path}: unreadable EXR: {exc}") from exc
    if channels is None:
        if len(planes) == 1:
            return next(iter(planes.values())).astype(np.float32)
        channels = [name for name in "RGBA" if name in planes]
        if len(channels) < 3:
            raise ExrError(f"{path}: cannot infer channel order from {sorted(planes)}; pass channels=")
    missing = [name for name in channels if name not in planes]
    if missing:
        raise ExrError(f"{path}: missing channel(s) {missing}; file has {sorted(planes)}")
    return np.stack([planes[name] for name in channels], axis=-1).astype(np.float32)

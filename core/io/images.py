"""The one place images are read, written, encoded and decoded (PNG/JPEG through OpenCV, or Pillow).

Arrays here are channel-last and in RGB(A) order, whatever OpenCV's BGR order inside; 8- or 16-bit as stored
(docs/formats.md: 8-bit RGB and masks, 16-bit normals). :func:`to_float` gives float32 in ``[0, 1]`` and
:func:`from_float` goes back, the one conversion between the two. Errors name the file (or sample key) and are
:class:`ImageError`, a user error.

Two encoders write PNG and JPEG: OpenCV (shards, SynthHuman) and Pillow (frame folders, procedural
backdrops, previews). Their bytes differ for the same pixels, so each caller names the one its files have
always been written with.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_write_bytes


class ImageError(UserError, ValueError):
    """An image that cannot be read, decoded or encoded; the message names it."""


Encoder = Literal["opencv", "pillow"]
Rounding = Literal["nearest", "half_up", "truncate"]

_SWAP_RB = {3: cv2.COLOR_RGB2BGR, 4: cv2.COLOR_RGBA2BGRA}  # each is its own inverse
_CVT_DTYPES = (np.uint8, np.uint16, np.float32)  # what cvtColor takes


def _swap_rb(image: np.ndarray) -> np.ndarray:
    """RGB(A) <-> BGR(A): OpenCV's channel order at its edges only.

    cvtColor writes the swapped copy in one pass; copying a channel-reversed numpy view cost ~15x as much,
    several times per packed sample.
    """
    if image.ndim != 3 or image.shape[2] not in _SWAP_RB:
        return image
    if image.dtype in _CVT_DTYPES:
        return cv2.cvtColor(image, _SWAP_RB[image.shape[2]])
    return image[..., [2, 1, 0, 3][: image.shape[2]]]


def encode_png(
    image: np.ndarray, compression: int | None = None, name: str = "image", encoder: Encoder = "opencv"
) -> bytes:
    """uint8/uint16 ``[H, W]``, ``[H, W, 3]`` RGB or ``[H, W, 4]`` RGBA -> PNG bytes. ``compression`` is zlib's
    level 0-9 (None: the encoder's default, which every format test was written with)."""
    if encoder == "pillow":
        return _pillow_bytes(
            image, "PNG", {} if compression is None else {"compress_level": int(compression)}
        )
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)] if compression is not None else []
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(_swap_rb(image)), params)
    if not ok:
        raise ImageError(f"{name}: PNG encoding failed")
    return buffer.tobytes()


def encode_jpeg(image: np.ndarray, quality: int = 95, encoder: Encoder = "pillow") -> bytes:
    """uint8 ``[H, W]`` or ``[H, W, 3]`` RGB -> JPEG bytes at ``quality`` (1-100)."""
    if encoder == "pillow":
        return _pillow_bytes(image, "JPEG", {"quality": int(quality)})
    ok, buffer = cv2.imencode(
        ".jpg", np.ascontiguousarray(_swap_rb(image)), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ImageError("image: JPEG encoding failed")
    return buffer.tobytes()


def _pillow_bytes(image: np.ndarray, image_format: str, options: dict[str, int]) -> bytes:
    from PIL import Image  # only the callers whose files Pillow has always written need it

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """PNG/JPEG bytes -> the stored array (dtype and channels as stored), RGB(A) order."""
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{name}: undecodable image")
    return _swap_rb(image)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as stored (8/16-bit, 1/3/4 channels), RGB(A) order."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image: {exc}") from exc
    return decode_image(data, str(path))


def read_rgb8(path: str | os.PathLike) -> np.ndarray:
    """Any image file as uint8 RGB ``[H, W, 3]`` (grey expanded, alpha dropped, 16-bit reduced)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"{path}: cannot read image")
    return image[..., ::-1].copy()


def write_png(
    path: str | os.PathLike, image: np.ndarray, compression: int | None = None, encoder: Encoder = "opencv"
) -> None:
    """:func:`encode_png` written to a temp name and renamed."""
    atomic_write_bytes(Path(path), encode_png(image, compression, name=str(path), encoder=encoder))


def write_jpeg(
    path: str | os.PathLike, image: np.ndarray, quality: int = 95, encoder: Encoder = "pillow"
) -> None:
    """:func:`encode_jpeg` written to a temp name and renamed."""
    atomic_write_bytes(Path(path), encode_jpeg(image, quality, encoder))


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 -> float32 in ``[0, 1]`` (divided by the dtype's maximum)."""
    return image.astype(np.float32) / np.float32(np.iinfo(image.dtype).max)


def from_float(image: np.ndarray, dtype: type = np.uint8, rounding: Rounding = "nearest") -> np.ndarray:
    """Float in ``[0, 1]`` (clipped) -> ``dtype`` (uint8/uint16) scaled by its maximum; an image already of
    that dtype is returned as is. ``rounding``: ``nearest`` (half to even, as ``np.rint``), ``half_up`` (frame
    folders' ``x + 0.5``, truncated) or ``truncate`` (toward zero: the driving crops of mass sampling)."""
    image = np.asarray(image)
    if image.dtype == dtype:
        return image
    scaled = np.clip(image, 0, 1) * float(np.iinfo(dtype).max)
    if rounding == "nearest":
        scaled = np.rint(scaled)
    elif rounding == "half_up":
        scaled = scaled + 0.5
    return scaled.astype(dtype)

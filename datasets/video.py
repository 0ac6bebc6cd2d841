"""MP4 (H.264) video I/O through PyAV, deterministic so that the same frames give byte-identical files.

NeRSemble ships one MP4 per camera (colour) and one per camera of alpha maps; the procedural generator writes
the same. Determinism: single-threaded libx264 with fixed options, frame-index timestamps and bit-exact muxing
(no encoder version or creation time in the container).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from geodiff4d.cluster.atomic import atomic_output

DEFAULT_CRF = 14  # visually lossless for 8-bit yuv420p, ~40+ dB PSNR on rendered heads


class VideoError(ValueError):
    """A video that cannot be written or read; the message names the file."""


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 25, crf: int = DEFAULT_CRF) -> None:
    """frames uint8 [T, H, W, 3] (RGB) or [T, H, W] (gray, e.g. alpha maps) -> H.264 yuv420p MP4.

    H and W must be even (4:2:0 chroma subsampling).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise VideoError(f"{path}: frames must be uint8, got {frames.dtype}")
    if frames.ndim == 4 and frames.shape[-1] == 3:
        pixel_format = "rgb24"
    elif frames.ndim == 3:
        pixel_format = "gray"
    else:
        raise VideoError(f"{path}: frames must be [T, H, W, 3] or [T, H, W], got shape {frames.shape}")
    n_frames, height, width = frames.shape[:3]
    if n_frames == 0:
        raise VideoError(f"{path}: no frames to write")
    if height % 2 or width % 2:
        raise VideoError(f"{path}: yuv420p needs even width and height, got {width}x{height}")
    with atomic_output(path) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4", options={"fflags": "+bitexact"})
        try:
            stream = container.add_stream(
                "libx264",
                rate=fps,
                # mbtree off: with it, x264 gave run-to-run different bitstreams for identical input
                # (uninitialized lookahead state, observed at 64x48); crf alone still sets the quality.
                options={"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "mbtree=0"},
            )
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = Fraction(1, fps)
            stream.codec_context.thread_count = 1
            for index, image in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format=pixel_format)
                frame.pts = index
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        finally:
            container.close()


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: unreadable video: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    return container


def iter_video(path: str | os.PathLike, gray: bool = False) -> Iterator[np.ndarray]:
    """Yield uint8 frames [H, W, 3] (or [H, W] with ``gray``); raises VideoError if decoding falls short."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        expected, decoded = stream.frames, 0
        try:
            for frame in container.decode(stream):
                decoded += 1
                yield frame.to_ndarray(format="gray" if gray else "rgb24")
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: corrupt video after {decoded} frames: {exc}") from exc
        if decoded == 0 or (expected and decoded != expected):
            raise VideoError(f"{path}: corrupt or truncated video: decoded {decoded} of {expected} frames")
    finally:
        container.close()


def read_video(path: str | os.PathLike, gray: bool = False) -> np.ndarray:
    """All frames: uint8 [T, H, W, 3] (or [T, H, W] with ``gray``)."""
    return np.stack(list(iter_video(path, gray=gray)))


def video_frame_count(path: str | os.PathLike) -> int:
    """Frame count from the container index (no decoding); counts packets when the index lacks it."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as exc:
        raise VideoError(f"{path}: unreadable video: {exc}") from exc
    finally:
        container.close()


def video_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the first video stream."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        return int(stream.width), int(stream.height)
    finally:
        container.close()

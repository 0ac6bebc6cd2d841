"""MP4 (H.264) video I/O through PyAV, deterministic so that the same frames give byte-identical files.

NeRSemble ships one MP4 per camera (colour) and one per camera of alpha maps; the procedural generator writes
the same. Determinism: single-threaded libx264 with fixed options, frame-index timestamps and bit-exact muxing
(no encoder version or creation time in the container).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_output

DEFAULT_CRF = 14  # visually lossless for 8-bit yuv420p, ~40+ dB PSNR on rendered heads
# the stream probe's decoder option for an open that decodes nothing (see _open)
HEADER_ONLY_PROBE = {"skip_frame": "all"}


class VideoError(UserError, ValueError):
    """A video that cannot be written or read; the message names the file."""


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int = 25,
    crf: int = DEFAULT_CRF,
    keyframe_interval: int | None = None,
) -> None:
    """frames uint8 [T, H, W, 3] (RGB) or [T, H, W] (gray, e.g. alpha maps) -> H.264 yuv420p MP4.

    H and W must be even (4:2:0 chroma subsampling). ``keyframe_interval`` caps the GOP (x264's default is
    250, fewer at scene cuts): seeking lands on the keyframe before the target, so a short GOP makes it cheap.
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
    x264_params = "mbtree=0"
    if keyframe_interval:  # a fixed GOP (no scene-cut keyframes), so the cost of a seek is known
        x264_params += f":keyint={keyframe_interval}:min-keyint={keyframe_interval}:scenecut=0"
    with atomic_output(path) as tmp:
        container = av.open(str(tmp), mode="w", format="mp4", options={"fflags": "+bitexact"})
        try:
            stream = container.add_stream(
                "libx264",
                rate=fps,
                # mbtree off: with it, x264 gave run-to-run different bitstreams for identical input
                # (uninitialized lookahead state, observed at 64x48); crf alone still sets the quality.
                options={"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": x264_params},
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


def _open(path: str | os.PathLike, header_only: bool = False) -> av.container.InputContainer:
    """The video's container; ``header_only`` for metadata reads that decode nothing (frame count, size, rate).

    Opening probes the streams by decoding their first frames (~10 ms at 1100x1604, and a pack worker reads
    each capture video's count and size besides decoding it). A header-only open tells the probe's decoder
    to skip every frame (~1 ms): count, size and rate come from the container and the codec's parameter sets,
    the same values; the pixel format stays unknown, so decoding opens with the full probe.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: video file not found")
    try:
        container = av.open(str(path), options=HEADER_ONLY_PROBE if header_only else None)
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{path}: unreadable video: {exc}") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    return container


def _frame_array(frame: av.VideoFrame, reformatter: VideoReformatter, gray: bool) -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W] with ``gray``) through one video's reformatter: ``to_ndarray(format=...)``
    builds a new swscale context per frame, ~3 ms of a 256 px frame's ~3.3 ms; the pixels are the same."""
    return reformatter.reformat(frame, format="gray" if gray else "rgb24").to_ndarray()


def _plane(frame: av.VideoFrame, index: int) -> np.ndarray:
    """Plane ``index`` of a planar frame as a uint8 [h, w] view (no copy; rows padded to the line size)."""
    plane = frame.planes[index]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[: plane.height, : plane.width]


def _planar(frame: av.VideoFrame) -> bool:
    return frame.format.name in ("yuv420p", "yuvj420p")


WINDOW_GRID = 64  # px: LazyRgb's windows are rounded out to it (even, so chroma samples stay whole)
WHOLE_FRAME_SHARE = 0.5  # a LazyRgb window at least this share of the frame converts the frame whole


class LazyRgb:
    """A decoded yuv420p frame converted to RGB only where asked: swscale on a window's planes (window bounds
    rounded out to even pixels, so its chroma samples are the full frame's) gives exactly the pixels of the full
    frame's conversion there, so a head crop of a 3208x2200 capture converts only its own pixels.

    Windows are rounded out to a ``WINDOW_GRID`` px grid, so a moving head's crops repeat a few sizes and the
    video's reformatter keeps its swscale context (a new size rebuilt it: ~1 ms at 1100x1604). A window covering
    ``WHOLE_FRAME_SHARE`` of the frame or more converts the frame whole: the decoder's own frame needs no plane
    copies and converted 1.6x faster per pixel than a copied window.
    """

    def __init__(self, frame: av.VideoFrame, reformatter: VideoReformatter):
        self.frame, self.reformatter, self._full = frame, reformatter, None
        self.shape = (frame.height, frame.width, 3)

    def full(self) -> np.ndarray:
        """uint8 [H, W, 3] of the whole frame (converted once)."""
        if self._full is None:
            self._full = _frame_array(self.frame, self.reformatter, gray=False)
        return self._full

    def window(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """uint8 [y1 - y0, x1 - x0, 3]: the frame's RGB pixels of the window (inside the frame)."""
        if self._full is not None or not _planar(self.frame):
            return self.full()[y0:y1, x0:x1]
        height, width = self.shape[:2]
        ex0, ey0 = x0 - x0 % WINDOW_GRID, y0 - y0 % WINDOW_GRID
        ex1, ey1 = (
            min(-(-x1 // WINDOW_GRID) * WINDOW_GRID, width),
            min(-(-y1 // WINDOW_GRID) * WINDOW_GRID, height),
        )
        if (ex1 - ex0) * (ey1 - ey0) >= WHOLE_FRAME_SHARE * width * height:
            return self.full()[y0:y1, x0:x1]
        if ex1 - ex0 < 2 or ey1 - ey0 < 2 or (ex1 - ex0) % 2 or (ey1 - ey0) % 2:
            return self.full()[y0:y1, x0:x1]  # a sliver at an odd frame edge: not worth a special case
        luma = _plane(self.frame, 0)[ey0:ey1, ex0:ex1]
        chroma = [_plane(self.frame, i)[ey0 // 2 : ey1 // 2, ex0 // 2 : ex1 // 2] for i in (1, 2)]
        stacked = np.concatenate([luma.reshape(-1), *(c.reshape(-1) for c in chroma)])  # yuv420p layout
        window = av.VideoFrame.from_ndarray(stacked.reshape(-1, ex1 - ex0), format=self.frame.format.name)
        window.colorspace, window.color_range = self.frame.colorspace, self.frame.color_range
        rgb = self.reformatter.reformat(window, format="rgb24").to_ndarray()  # [ey1 - ey0, ex1 - ex0, 3]
        return rgb[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0]


def _neutral_red(reformatter: VideoReformatter, frame: av.VideoFrame) -> np.ndarray:
    """The red channel swscale gives each luma level at neutral chroma (128): [256] uint8, for ``frame``'s
    format, colour space and range."""
    luma = np.tile(np.arange(256, dtype=np.uint8).repeat(2), 2)  # Y [2, 512]: each level on a 2x2 block
    planes = np.concatenate([luma, np.full(512, 128, np.uint8)])  # then U [1, 256] and V [1, 256]
    probe = av.VideoFrame.from_ndarray(planes.reshape(3, 512), format=frame.format.name)
    probe.colorspace, probe.color_range = frame.colorspace, frame.color_range
    return reformatter.reformat(probe, format="rgb24").to_ndarray()[0, ::2, 0]


class LazyAlpha:
    """A decoded alpha-map frame read only where asked, as the official data manager reads alpha maps: the red
    channel of the RGB decode. Alpha videos are gray, so their chroma is neutral and red is a function of luma
    (checked on every frame; any other chroma takes the full RGB decode): a table per luma level gives it, for
    only the window a head crop needs (the whole 1100x1604 frame's lookup: 0.66 ms).

    ``tables`` is shared by one video's frames: the table for each (format, colour space, range).
    """

    def __init__(self, frame: av.VideoFrame, reformatter: VideoReformatter, tables: dict):
        self.frame, self.reformatter, self._full = frame, reformatter, None
        self.shape = (frame.height, frame.width)
        self._red_of_luma: np.ndarray | None = None
        if _planar(frame) and all(cv2.minMaxLoc(_plane(frame, i))[:2] == (128.0, 128.0) for i in (1, 2)):
            key = (frame.format.name, frame.colorspace, frame.color_range)
            if key not in tables:
                tables[key] = _neutral_red(VideoReformatter(), frame)
            self._red_of_luma = tables[key]

    def full(self) -> np.ndarray:
        """uint8 [H, W] of the whole frame (read once)."""
        if self._full is None:
            self._full = (
                _frame_array(self.frame, self.reformatter, gray=False)[..., 0]
                if self._red_of_luma is None
                else self.window(0, 0, self.shape[1], self.shape[0])
            )
        return self._full

    def window(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """uint8 [y1 - y0, x1 - x0]: the frame's alpha of the window (inside the frame)."""
        if self._full is not None or self._red_of_luma is None:
            return self.full()[y0:y1, x0:x1]
        return cv2.LUT(_plane(self.frame, 0)[y0:y1, x0:x1], self._red_of_luma)  # ~10x numpy's fancy indexing


def iter_video(path: str | os.PathLike, gray: bool = False) -> Iterator[np.ndarray]:
    """Yield uint8 frames [H, W, 3] (or [H, W] with ``gray``); raises VideoError if decoding falls short."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        expected, decoded, reformatter = stream.frames, 0, VideoReformatter()
        try:
            for frame in container.decode(stream):
                decoded += 1
                yield _frame_array(frame, reformatter, gray)
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: corrupt video after {decoded} frames: {exc}") from exc
        if decoded == 0 or (expected and decoded != expected):
            raise VideoError(f"{path}: corrupt or truncated video: decoded {decoded} of {expected} frames")
    finally:
        container.close()


@dataclass
class DecodeCount:
    """Frames a decoder produced, including those decoded only to reach a seek target (the true cost)."""

    frames: int = 0


def _frame_index(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> int | None:
    """Index of a decoded frame from its timestamp (constant frame rate), None when the stream cannot say."""
    rate = stream.average_rate or stream.guessed_rate
    if frame.pts is None or not rate or stream.time_base is None:
        return None
    return round((frame.pts - (stream.start_time or 0)) * stream.time_base * rate)


class _SeekMissed(Exception):
    """A seek whose first frame cannot be placed at or before the target (raised before anything is yielded)."""


PIXELS = ("rgb", "gray", "alpha", "lazy")


def iter_video_range(
    path: str | os.PathLike,
    start: int,
    stop: int,
    gray: bool = False,
    threads: int = 1,
    count: DecodeCount | None = None,
    pixels: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """Yield (index, uint8 frame) for ``start <= index < stop``, decoding from the keyframe before ``start``.

    ``pixels``: "rgb" [H, W, 3] (the default), "gray" [H, W] (also ``gray=True``), "lazy" (a :class:`LazyRgb`
    converting only the windows asked for) or "alpha" (a :class:`LazyAlpha`: an alpha map's red channel as the
    official reader takes it, from luma alone, only in the windows asked for).

    Decoding from frame 0 for every window would make a sequence split into N windows cost O(N^2) frames, so
    this seeks; timestamps give each frame's index. When they cannot (no pts or frame rate, or a seek that
    lands after ``start``) it decodes from frame 0 and counts instead, which is always right. ``threads`` > 1
    lets FFmpeg decode frames in parallel (bit-exact either way); ``count`` accumulates the frames decoded.
    """
    if not 0 <= start < stop:
        raise VideoError(f"{path}: invalid frame range [{start}, {stop})")
    pixels = pixels or ("gray" if gray else "rgb")
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {PIXELS}, got {pixels!r}")
    count = count if count is not None else DecodeCount()
    try:
        yield from _decode_range(path, start, stop, pixels, threads, count, seek=start > 0)
    except _SeekMissed:
        yield from _decode_range(path, start, stop, pixels, threads, count, seek=False)


def _converter(pixels: str, reformatter: VideoReformatter) -> Callable[[av.VideoFrame], Any]:
    if pixels == "alpha":
        return functools.partial(LazyAlpha, reformatter=reformatter, tables={})
    if pixels == "lazy":
        return functools.partial(LazyRgb, reformatter=reformatter)
    return functools.partial(_frame_array, reformatter=reformatter, gray=pixels == "gray")


def _decode_range(
    path: str | os.PathLike, start: int, stop: int, pixels: str, threads: int, count: DecodeCount, seek: bool
) -> Iterator[tuple[int, Any]]:
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        stream.thread_count = threads
        rate = stream.average_rate or stream.guessed_rate
        if seek:
            if not rate or stream.time_base is None:
                raise _SeekMissed
            container.seek((stream.start_time or 0) + int(start / rate / stream.time_base), stream=stream)
        expected, convert = start, _converter(pixels, VideoReformatter())
        try:
            for position, frame in enumerate(container.decode(stream)):
                count.frames += 1
                index = _frame_index(frame, stream) if seek else position
                if index is None or (expected == start and index > start):
                    if expected == start and seek:
                        raise _SeekMissed
                    raise VideoError(f"{path}: frame timestamps do not give frame {expected}")
                if index < start:
                    continue
                if index != expected:
                    raise VideoError(
                        f"{path}: frame {index} follows frame {expected - 1}: frames missing or reordered"
                    )
                yield index, convert(frame)
                expected += 1
                if expected == stop:
                    return
        except av.FFmpegError as exc:
            raise VideoError(f"{path}: corrupt video after {count.frames} decoded frames: {exc}") from exc
        raise VideoError(
            f"{path}: corrupt or truncated video: it ends at frame {expected}, frame {stop - 1} was needed"
        )
    finally:
        container.close()


def read_video(path: str | os.PathLike, gray: bool = False) -> np.ndarray:
    """All frames: uint8 [T, H, W, 3] (or [T, H, W] with ``gray``)."""
    return np.stack(list(iter_video(path, gray=gray)))


def video_fps(path: str | os.PathLike) -> float | None:
    """Frames per second from the stream's average rate (no decoding); None when the container does not say."""
    container = _open(path, header_only=True)
    try:
        rate = container.streams.video[0].average_rate
        return float(rate) if rate else None
    finally:
        container.close()


def video_frame_count(path: str | os.PathLike) -> int:
    """Frame count from the container index (no decoding); counts packets when the index lacks it."""
    container = _open(path, header_only=True)
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
    container = _open(path, header_only=True)
    try:
        stream = container.streams.video[0]
        return int(stream.width), int(stream.height)
    finally:
        container.close()

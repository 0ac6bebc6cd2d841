"""The official submission zip of NeRSemble's mono FLAME-avatar benchmark, written with ``nersemble-benchmark``'s
own writer, so a method scored here can be uploaded as it is.

The writer takes ``{pid:03d}/{SEQ}/cam_{serial}.mp4`` videos of 512x512 frames at 24.3 fps for the benchmark's
participants, test sequences and serials (train camera + hold-outs). Our input is a method folder in the
evaluation layout, ``ROOT/<pid>/<SEQ>/<camera>/<frame>.png`` or ``<camera>.mp4`` (camera: serial or
``cam_<serial>``). Everything is checked before the first video is encoded; the zip is written to a temp name
and renamed, so an interrupted run never leaves a partial zip under the final name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.eval.inputs import FolderSource, InputError

MONO_FLAME_AVATAR_SIZE = 512  # the writer's (and the benchmark's) frame width and height


def _use_packaged_ffmpeg() -> None:
    """The writer encodes through mediapy, which runs an ``ffmpeg`` program: use the one ``imageio-ffmpeg`` ships
    when the system has none."""
    import mediapy

    if shutil.which("ffmpeg") is None:
        import imageio_ffmpeg

        mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())


def submission_videos(method_root: str | Path) -> list[tuple[str, str, str, int, str]]:
    """(subject folder, sequence, camera folder, participant id, serial) of every video to submit, checked against
    the benchmark's lists; the error names the folder and what the benchmark expects."""
    from nersemble_benchmark.constants import (
        BENCHMARK_MONO_FLAME_AVATAR_IDS,
        BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST,
        BENCHMARK_MONO_FLAME_AVATAR_SERIALS,
    )

    source = FolderSource("submission", Path(method_root))
    videos = []
    for subject, sequence in source.units():
        where = source.root / subject / sequence
        if not subject.isdigit() or int(subject) not in BENCHMARK_MONO_FLAME_AVATAR_IDS:
            raise InputError(
                f"{source.root / subject}: not a participant of the mono FLAME-avatar benchmark "
                f"(expected one of {BENCHMARK_MONO_FLAME_AVATAR_IDS})"
            )
        if sequence not in BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST:
            raise InputError(
                f"{where}: not a test sequence (expected {BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST})"
            )
        for camera in source.cameras(subject, sequence):
            serial = camera.removeprefix("cam_")
            if serial not in BENCHMARK_MONO_FLAME_AVATAR_SERIALS:
                raise InputError(
                    f"{where / camera}: serial {serial} is not submitted "
                    f"(expected {BENCHMARK_MONO_FLAME_AVATAR_SERIALS})"
                )
            videos.append((subject, sequence, camera, int(subject), serial))
    if not videos:
        raise InputError(f"{method_root}: no <participant>/<sequence>/<camera> frames to submit")
    return videos


def _benchmark_frames(frames: np.ndarray, source: str) -> list[np.ndarray]:
    """uint8 RGB frames [T, H, W, 3] at the benchmark's 512x512 (square frames resized, area filter)."""
    height, width = frames.shape[1:3]
    if height != width:
        raise InputError(f"{source}: frames are {width}x{height}; the benchmark takes square 512x512 frames")
    size = MONO_FLAME_AVATAR_SIZE
    if height == size:
        return list(frames)
    return [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames]


def write_mono_flame_avatar_submission(method_root: str | Path, zip_path: str | Path) -> Path:
    """Write ``method_root``'s frames as the benchmark's submission zip at ``zip_path``; returns the zip's path."""
    from nersemble_benchmark.data.submission_data import MonoFlameAvatarSubmissionDataWriter

    videos = submission_videos(method_root)
    source = FolderSource("submission", Path(method_root))
    _use_packaged_ffmpeg()
    zip_path = Path(zip_path)
    with atomic_output(zip_path) as tmp, MonoFlameAvatarSubmissionDataWriter(str(tmp)) as writer:
        for subject, sequence, camera, pid, serial in videos:
            clip = source.clip(subject, sequence, camera)
            writer.add_video(pid, sequence, serial, _benchmark_frames(clip.frames, clip.source))
    return zip_path

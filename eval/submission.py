"""The official submission zip of NeRSemble's mono FLAME-avatar benchmark, written with ``nersemble-benchmark``'s
own writer, so a method scored here can be uploaded as it is.

The writer takes ``{pid:03d}/{SEQ}/cam_{serial}.mp4`` videos of 512x512 frames at 24.3 fps for the benchmark's
participants, test sequences and serials (train camera + hold-outs). Our input is a method folder in the
evaluation layout, ``ROOT/<pid>/<SEQ>/<camera>/<frame>.png`` or ``<camera>.mp4`` (camera: serial or
``cam_<serial>``). Everything is checked before the first video is encoded: no video the benchmark does not take,
every expected video present (participants x test sequences x train + hold-out serials, from the package's
constants; ``allow_incomplete`` writes a partial zip anyway), one frame count per sequence across its cameras,
and with the local benchmark release the count of its FLAME tracking (what the official reader expects; its
own list comes from the benchmark server). The zip is written to a temp name and renamed, so an interrupted run
never leaves a partial zip under the final name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np

from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.eval.inputs import FRAME_SUFFIXES, FolderSource, InputError

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


def expected_videos() -> list[tuple[int, str, str]]:
    """(participant id, test sequence, serial) of every video the official reader needs for a complete zip."""
    from nersemble_benchmark.constants import (
        BENCHMARK_MONO_FLAME_AVATAR_IDS,
        BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST,
        BENCHMARK_MONO_FLAME_AVATAR_SERIALS,
    )

    return [
        (pid, sequence, serial)
        for pid in BENCHMARK_MONO_FLAME_AVATAR_IDS
        for sequence in BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST
        for serial in BENCHMARK_MONO_FLAME_AVATAR_SERIALS
    ]


def check_complete(method_root: str | Path, videos: list[tuple[str, str, str, int, str]]) -> None:
    """Refuse a submission without every expected video; the message names each missing one."""
    present = {(pid, sequence, serial) for _, sequence, _, pid, serial in videos}
    missing = [v for v in expected_videos() if v not in present]
    if missing:
        names = ", ".join(f"{pid:03d}/{sequence}/cam_{serial}" for pid, sequence, serial in missing)
        raise InputError(
            f"{method_root}: incomplete submission, {len(missing)} of {len(expected_videos())} expected videos "
            f"missing: {names} (allow_incomplete / --allow-incomplete writes it anyway)"
        )


def frame_count(source: FolderSource, subject: str, sequence: str, camera: str) -> int:
    """Frames of one camera without decoding them: frame files in its folder, or the video's frame count."""
    folder = source.root / subject / sequence / camera
    if folder.is_dir():
        return sum(1 for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    import av

    with av.open(str(folder.with_suffix(".mp4"))) as container:
        stream = container.streams.video[0]
        return stream.frames or sum(1 for _ in container.decode(stream))


def tracked_frames(benchmark_root: Path, pid: int, sequence: str) -> int:
    """Frames of a test sequence in the local benchmark release: its FLAME tracking, read by the official manager."""
    from nersemble_benchmark.data.benchmark_data import MonoFlameAvatarDataManager

    manager = MonoFlameAvatarDataManager(str(benchmark_root), pid)
    path = Path(manager.get_flame_tracking_path(sequence))
    if not path.is_file():
        raise InputError(f"{benchmark_root}: no FLAME tracking of {pid:03d}/{sequence} at {path}")
    return len(manager.load_flame_tracking(sequence).frames)


def check_frame_counts(
    source: FolderSource, videos: list[tuple[str, str, str, int, str]], benchmark_root: Path | None
) -> None:
    """One frame count per (participant, sequence) across its cameras, and the tracking's with the release."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for subject, sequence, camera, _, _ in videos:
        counts.setdefault((subject, sequence), {})[camera] = frame_count(source, subject, sequence, camera)
    for (subject, sequence), per_camera in counts.items():
        where = source.root / subject / sequence
        if len(set(per_camera.values())) > 1:
            raise InputError(f"{where}: cameras have different frame counts {per_camera}")
        if benchmark_root is not None:
            expected = tracked_frames(benchmark_root, int(subject), sequence)
            if next(iter(per_camera.values())) != expected:
                raise InputError(
                    f"{where}: {next(iter(per_camera.values()))} frames per camera, the benchmark's {sequence} "
                    f"has {expected} (its FLAME tracking)"
                )


def _benchmark_frames(frames: np.ndarray, source: str) -> list[np.ndarray]:
    """uint8 RGB frames [T, H, W, 3] at the benchmark's 512x512 (square frames resized, area filter)."""
    height, width = frames.shape[1:3]
    if height != width:
        raise InputError(f"{source}: frames are {width}x{height}; the benchmark takes square 512x512 frames")
    size = MONO_FLAME_AVATAR_SIZE
    if height == size:
        return list(frames)
    return [cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames]


def write_mono_flame_avatar_submission(
    method_root: str | Path,
    zip_path: str | Path,
    allow_incomplete: bool = False,
    benchmark_root: str | Path | None = None,
) -> Path:
    """Write ``method_root``'s frames as the benchmark's submission zip at ``zip_path``; returns the zip's path.
    ``benchmark_root``: the local benchmark release (``ROOT/mono_flame_avatar/...``), to check frame counts."""
    from nersemble_benchmark.data.submission_data import MonoFlameAvatarSubmissionDataWriter

    videos = submission_videos(method_root)
    if not allow_incomplete:
        check_complete(method_root, videos)
    source = FolderSource("submission", Path(method_root))
    check_frame_counts(source, videos, Path(benchmark_root) if benchmark_root else None)
    _use_packaged_ffmpeg()
    zip_path = Path(zip_path)
    with atomic_output(zip_path) as tmp, MonoFlameAvatarSubmissionDataWriter(str(tmp)) as writer:
        for subject, sequence, camera, pid, serial in videos:
            clip = source.clip(subject, sequence, camera)
            writer.add_video(pid, sequence, serial, _benchmark_frames(clip.frames, clip.source))
    return zip_path

"""The mono FLAME-avatar submission zip, written with nersemble-benchmark's writer, read back with its reader."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from geodiff4d.eval.baselines import write_frames
from geodiff4d.eval.inputs import InputError
from geodiff4d.eval.submission import expected_videos, write_mono_flame_avatar_submission

constants = pytest.importorskip("nersemble_benchmark.constants")
from nersemble_benchmark.data.benchmark_data import FlameTracking, MonoFlameAvatarDataManager  # noqa: E402
from nersemble_benchmark.data.submission_data import MonoFlameAvatarSubmissionDataReader  # noqa: E402

N_FRAMES = 2


def _frames(seed: int) -> np.ndarray:
    """Smooth colour ramps (video coding keeps them), a different one per video: [T, 64, 64, 3]."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    rng = np.random.default_rng(seed)
    frames = [
        np.stack([x * rng.uniform(0.2, 1), y * rng.uniform(0.2, 1), np.full_like(x, rng.uniform())], -1)
        for _ in range(N_FRAMES)
    ]
    return (np.stack(frames) * 255).astype(np.uint8)


def _write_all(root, frames: int = 1, skip: tuple = ()) -> None:
    """Tiny grey frames for every expected video but ``skip``: the writer encodes each at 512x512."""
    for pid, sequence, serial in expected_videos():
        if (pid, sequence, serial) not in skip:
            write_frames(
                root / f"{pid:03d}" / sequence / f"cam_{serial}", np.full((frames, 16, 16, 3), 90, np.uint8)
            )


def test_submission_zip_reads_back_with_the_official_reader(tmp_path):
    pid = constants.BENCHMARK_MONO_FLAME_AVATAR_IDS[0]
    _write_all(tmp_path / "method")
    written = {}
    for s, sequence in enumerate(constants.BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST):
        for c, serial in enumerate(constants.BENCHMARK_MONO_FLAME_AVATAR_SERIALS):
            written[sequence, serial] = _frames(10 * s + c)
            folder = tmp_path / "method" / f"{pid:03d}" / sequence / f"cam_{serial}"
            for old in folder.iterdir():
                old.unlink()
            write_frames(folder, written[sequence, serial])
    zip_path = write_mono_flame_avatar_submission(tmp_path / "method", tmp_path / "out" / "submission.zip")

    reader = MonoFlameAvatarSubmissionDataReader(str(zip_path))
    overview = reader.get_file_overview()
    assert reader.is_complete() and set(overview) == set(constants.BENCHMARK_MONO_FLAME_AVATAR_IDS)
    expected = reader.list_expected_files()
    assert len(expected) == 80 and set(expected) <= {f.filename for f in reader._zipf.filelist}
    for (sequence, serial), frames in written.items():
        assert serial in overview[pid][sequence]
        video = np.stack(reader.load_video(pid, sequence, serial))  # [T, 512, 512, 3]
        assert video.shape == (N_FRAMES, 512, 512, 3)
        downsized = video.reshape(N_FRAMES, 64, 8, 64, 8, 3).mean(axis=(2, 4))  # back to 64 px
        assert np.abs(downsized - frames).mean() < 3.0  # the same pictures, through H.264 at crf 14
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_incomplete_submission_is_refused_naming_what_is_missing(tmp_path):
    """Before, a zip with 1 of the 80 expected videos was written without a word."""
    pid = constants.BENCHMARK_MONO_FLAME_AVATAR_IDS[-1]
    skip = ((pid, "FREE", "222200046"), (pid, "EMO-1-shout+laugh", "222200037"))
    _write_all(tmp_path / "m", skip=skip)
    missing = f"{pid:03d}/FREE/cam_222200046, {pid:03d}/EMO-1-shout+laugh/cam_222200037"
    with pytest.raises(
        InputError, match=re.escape(f"incomplete submission, 2 of 80 expected videos missing: {missing}")
    ):
        write_mono_flame_avatar_submission(tmp_path / "m", tmp_path / "s.zip")
    assert not (tmp_path / "s.zip").exists()
    only = tmp_path / "one" / f"{pid:03d}" / "FREE" / "cam_222200037"
    write_frames(only, _frames(0))
    zip_path = write_mono_flame_avatar_submission(tmp_path / "one", tmp_path / "s.zip", allow_incomplete=True)
    reader = MonoFlameAvatarSubmissionDataReader(str(zip_path))
    assert not reader.is_complete() and list(reader.get_file_overview()) == [pid]


def test_frame_counts_agree_across_cameras_and_with_the_tracking(tmp_path):
    pid = constants.BENCHMARK_MONO_FLAME_AVATAR_IDS[0]
    _write_all(tmp_path / "m", frames=2)
    odd = tmp_path / "m" / f"{pid:03d}" / "FREE" / "cam_222200039"
    write_frames(odd, np.full((3, 16, 16, 3), 90, np.uint8))
    with pytest.raises(InputError, match="FREE: cameras have different frame counts"):
        write_mono_flame_avatar_submission(tmp_path / "m", tmp_path / "s.zip")
    (odd / "00002.png").unlink()
    release = tmp_path / "release"  # the benchmark's FLAME tracking, where the official data manager looks
    manager = MonoFlameAvatarDataManager(str(release), pid)
    for sequence in constants.BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST:
        path = Path(manager.get_flame_tracking_path(sequence))
        path.parent.mkdir(parents=True, exist_ok=True)
        n_frames = 3 if sequence == "FREE" else 2  # the method's FREE is one frame short
        np.savez(
            path, **{f.name: np.zeros(n_frames if f.name == "frames" else 1) for f in fields(FlameTracking)}
        )
    with pytest.raises(InputError, match=f"{pid:03d}/FREE: 2 frames per camera, the benchmark's FREE has 3"):
        write_mono_flame_avatar_submission(tmp_path / "m", tmp_path / "s.zip", benchmark_root=release)
    assert not (tmp_path / "s.zip").exists()


def test_submission_refuses_what_the_benchmark_does_not_take(tmp_path):
    write_frames(tmp_path / "m" / "001" / "FREE" / "cam_222200037", _frames(0))
    with pytest.raises(InputError, match="001: not a participant of the mono FLAME-avatar benchmark"):
        write_mono_flame_avatar_submission(tmp_path / "m", tmp_path / "s.zip")
    pid = constants.BENCHMARK_MONO_FLAME_AVATAR_IDS[0]
    write_frames(tmp_path / "n" / f"{pid}" / "FREE" / "cam_222200040", _frames(0))
    with pytest.raises(InputError, match="serial 222200040 is not submitted"):
        write_mono_flame_avatar_submission(tmp_path / "n", tmp_path / "s.zip")
    assert not (tmp_path / "s.zip").exists()

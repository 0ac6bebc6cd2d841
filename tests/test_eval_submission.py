"""The mono FLAME-avatar submission zip, written with nersemble-benchmark's writer, read back with its reader."""

from __future__ import annotations

import numpy as np
import pytest

from geodiff4d.eval.baselines import write_frames
from geodiff4d.eval.inputs import InputError
from geodiff4d.eval.submission import write_mono_flame_avatar_submission

constants = pytest.importorskip("nersemble_benchmark.constants")
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


def test_submission_zip_reads_back_with_the_official_reader(tmp_path):
    pid = constants.BENCHMARK_MONO_FLAME_AVATAR_IDS[0]
    written = {}
    for s, sequence in enumerate(constants.BENCHMARK_MONO_FLAME_AVATAR_SEQUENCES_TEST):
        for c, serial in enumerate(constants.BENCHMARK_MONO_FLAME_AVATAR_SERIALS):
            written[sequence, serial] = _frames(10 * s + c)
            write_frames(
                tmp_path / "method" / f"{pid:03d}" / sequence / f"cam_{serial}", written[sequence, serial]
            )
    zip_path = write_mono_flame_avatar_submission(tmp_path / "method", tmp_path / "out" / "submission.zip")

    reader = MonoFlameAvatarSubmissionDataReader(str(zip_path))
    overview = reader.get_file_overview()
    assert set(overview) == {pid} and reader.is_complete(pid)
    for (sequence, serial), frames in written.items():
        assert serial in overview[pid][sequence]
        video = np.stack(reader.load_video(pid, sequence, serial))  # [T, 512, 512, 3]
        assert video.shape == (N_FRAMES, 512, 512, 3)
        downsized = video.reshape(N_FRAMES, 64, 8, 64, 8, 3).mean(axis=(2, 4))  # back to 64 px
        assert np.abs(downsized - frames).mean() < 3.0  # the same pictures, through H.264 at crf 14
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_submission_refuses_what_the_benchmark_does_not_take(tmp_path):
    write_frames(tmp_path / "m" / "001" / "FREE" / "cam_222200037", _frames(0))
    with pytest.raises(InputError, match="001: not a participant of the mono FLAME-avatar benchmark"):
        write_mono_flame_avatar_submission(tmp_path / "m", tmp_path / "s.zip")
    pid = constants.BENCHMARK_MONO_FLAME_AVATAR_IDS[0]
    write_frames(tmp_path / "n" / f"{pid}" / "FREE" / "cam_222200040", _frames(0))
    with pytest.raises(InputError, match="serial 222200040 is not submitted"):
        write_mono_flame_avatar_submission(tmp_path / "n", tmp_path / "s.zip")
    assert not (tmp_path / "s.zip").exists()

"""The official NeRSemble toolkits (PyPI nersemble-benchmark / nersemble-data) as the oracle of our writer and reader.

Their data managers read a folder that ``geodiff4d synth`` wrote; our reader must agree with them value for value.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from nersemble_benchmark.data.benchmark_data import MonoFlameAvatarDataManager
from nersemble_data.data.nersemble_data import NeRSembleParticipantDataManager
from nersemble_data.util.color_correction import correct_color

from geodiff4d.core.io.video import write_video
from geodiff4d.datasets.cameras import Camera, intrinsics
from geodiff4d.datasets.colour_calibration import correct_colour
from geodiff4d.datasets.nersemble import NersembleDataset, write_camera_params, write_color_calibration
from geodiff4d.datasets.procedural import SynthJob, SynthSpec

SPEC = SynthSpec(subjects=1, sequences=2, frames=3, cameras=3, resolution=64, synthetic=0, seed=5)
PID, SUBJECT = 1, "001"


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory) -> Path:
    """A synthesized folder (the unit ``geodiff4d synth`` runs per subject, without Ray) seen as the benchmark
    release: ROOT/mono_flame_avatar/{pid:03d}/..."""
    out = tmp_path_factory.mktemp("oracle")
    job = SynthJob(out / "synth", SPEC)
    job.setup()
    job.write_subject(0)
    (out / "benchmark").mkdir()
    (out / "benchmark" / "mono_flame_avatar").symlink_to(out / "synth" / "nersemble")
    return out / "benchmark"


def test_benchmark_data_manager_reads_our_folder_as_we_do(benchmark_root):
    manager = MonoFlameAvatarDataManager(str(benchmark_root), PID)
    ours = NersembleDataset(benchmark_root / "mono_flame_avatar")
    calibration = manager.load_camera_calibration()
    cameras = ours.cameras(SUBJECT)
    assert sorted(calibration.world_2_cam) == sorted(cameras) == ours.serials(SUBJECT)
    for serial, camera in cameras.items():  # dreifus keeps poses and intrinsics in float32
        np.testing.assert_array_equal(
            np.asarray(calibration.world_2_cam[serial]), camera.world_to_cam.astype(np.float32)
        )
        np.testing.assert_array_equal(np.asarray(calibration.intrinsics[serial]), camera.K.astype(np.float32))
    # the manager lists every folder under sequences/, BACKGROUND plates included; we list captured sequences
    assert set(manager.list_sequences()) - {"BACKGROUND"} == set(ours.sequences(SUBJECT))
    for sequence in ours.sequences(SUBJECT):
        assert sorted(manager.list_serials(sequence)) == ours.sequence_serials(SUBJECT, sequence)
        assert manager.get_n_timesteps(sequence) == ours.frame_count(SUBJECT, sequence) == SPEC.frames
        for serial in ours.sequence_serials(SUBJECT, sequence):
            for frame in ours.frames(SUBJECT, sequence, serial):
                official = manager.load_image(sequence, serial, frame.frame, as_uint8=True)
                np.testing.assert_array_equal(frame.rgb, official)
                alpha = manager.load_alpha_map(sequence, serial, frame.frame)[..., 0]
                np.testing.assert_array_equal(np.rint(frame.alpha * 255).astype(np.uint8), alpha)


def test_benchmark_flame_tracking_is_ours_value_for_value(benchmark_root):
    manager = MonoFlameAvatarDataManager(str(benchmark_root), PID)
    ours = NersembleDataset(benchmark_root / "mono_flame_avatar", n_shape=300, n_expr=100)
    for sequence in ours.sequences(SUBJECT):
        official = manager.load_flame_tracking(sequence)  # the default version: v2
        tracking = ours.tracking(SUBJECT, sequence)
        assert tracking.kind == "v2" and Path(manager.get_flame_tracking_path(sequence)) == tracking.path
        arrays = tracking.params.to_numpy_dict()
        np.testing.assert_array_equal(official.frames, tracking.frames)
        for name, value in arrays.items():
            np.testing.assert_array_equal(getattr(official, name), value, err_msg=name)


def _raw_release(root: Path, benchmark_root: Path, ccm: dict[str, np.ndarray]) -> Path:
    """The raw-release variant of the same subject: its videos resized to a downscale of the raw 2200x3208
    images (110x160), one shared K for those, plus a colour calibration."""
    source = NersembleDataset(benchmark_root / "mono_flame_avatar")
    raw, size = root / SUBJECT, (110, 160)
    sequence = source.sequences(SUBJECT)[0]
    for serial in source.sequence_serials(SUBJECT, sequence):
        frames = [cv2.resize(f.rgb, size) for f in source.frames(SUBJECT, sequence, serial)]
        write_video(raw / "sequences" / sequence / "images" / f"cam_{serial}.mp4", np.stack(frames))
    K = intrinsics(300.0, *size)
    cameras = {
        serial: Camera(camera.world_to_cam, K, *size) for serial, camera in source.cameras(SUBJECT).items()
    }
    write_camera_params(raw / "calibration" / "camera_params.json", cameras, variant="raw")
    write_color_calibration(raw / "calibration" / "color_calibration.json", ccm)
    return root


@pytest.mark.parametrize("terms", [3, 4, 5])
def test_colour_calibration_equals_nersemble_data(benchmark_root, tmp_path, terms):
    rng = np.random.default_rng(terms)
    serials = NersembleDataset(benchmark_root / "mono_flame_avatar").serials(SUBJECT)
    ccm = {s: np.eye(3, terms) + rng.normal(0, 0.05, (3, terms)) for s in serials}
    root = _raw_release(tmp_path, benchmark_root, ccm)
    manager = NeRSembleParticipantDataManager(str(root), PID)
    ours = NersembleDataset(root)
    sequence = ours.sequences(SUBJECT)[0]
    for serial in serials:
        frame = next(ours.frames(SUBJECT, sequence, serial))
        assert frame.color_matrix.shape == (3, terms)
        official = manager.load_image(sequence, serial, 0, apply_color_correction=True)  # float path
        np.testing.assert_allclose(correct_colour(frame.rgb / 255.0, frame.color_matrix), official, atol=1e-4)
        official8 = correct_color(manager.load_image(sequence, serial, 0, as_uint8=True), ccm[serial])
        np.testing.assert_array_equal(correct_colour(frame.rgb, frame.color_matrix), official8)


def test_colour_calibration_rejects_an_unknown_matrix_shape(benchmark_root, tmp_path):
    serials = NersembleDataset(benchmark_root / "mono_flame_avatar").serials(SUBJECT)
    root = _raw_release(tmp_path, benchmark_root, {s: np.eye(3, 6) for s in serials})
    with pytest.raises(ValueError, match=r"color_calibration.json.*\(3, terms\)"):
        NersembleDataset(root).color_calibration(SUBJECT)

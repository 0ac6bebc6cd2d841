"""The official NeRSemble toolkits (PyPI nersemble-benchmark / nersemble-data) as the oracle of our writer and reader.

Their data managers read a folder that ``geodiff4d synth`` wrote; our reader must agree with them value for value.
"""

from __future__ import annotations

import functools
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from nersemble_benchmark.data.benchmark_data import MonoFlameAvatarDataManager
from nersemble_data.data.nersemble_data import NeRSembleParticipantDataManager
from nersemble_data.util.color_correction import correct_color

from geodiff4d.core.io.video import write_video
from geodiff4d.datasets.cameras import Camera, intrinsics
from geodiff4d.datasets.colour_calibration import correct_colour
from geodiff4d.datasets.flame import FlameModel
from geodiff4d.datasets.nersemble import NersembleDataset, write_camera_params, write_color_calibration
from geodiff4d.datasets.procedural import SynthJob, SynthSpec
from geodiff4d.datasets.procedural_head import build_procedural_head, save_flame_pickle

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


def _official_flame_folder(folder: Path) -> Path:
    """The procedural head as the official flame-model package loads FLAME: ``flame2023.pkl`` with the shape and
    expression blendshapes at FLAME's 300 + 100 slots (zero elsewhere), plus the landmark embedding files it
    requires (landmarks are not compared)."""
    head = build_procedural_head(0)
    n_shape, n_expr = head["n_shape"], head["n_expr"]
    shapedirs = np.zeros((*head["shapedirs"].shape[:2], 400))
    shapedirs[..., :n_shape] = head["shapedirs"][..., :n_shape]
    shapedirs[..., 300 : 300 + n_expr] = head["shapedirs"][..., n_shape:]
    folder.mkdir()
    save_flame_pickle(
        {**head, "shapedirs": shapedirs, "n_shape": 300, "n_expr": 100}, folder / "flame2023.pkl"
    )
    static = {"lmk_face_idx": head["lmk_faces_idx"], "lmk_b_coords": head["lmk_bary_coords"]}
    (folder / "flame_static_embedding.pkl").write_bytes(pickle.dumps(static))
    contour = {"lmk_face_idx": np.zeros((79, 17), np.int64), "lmk_b_coords": np.full((79, 17, 3), 1 / 3)}
    np.save(folder / "flame_dynamic_embedding.npy", np.array(contour, dtype=object), allow_pickle=True)
    return folder


def test_official_flame_provider_poses_our_tracking_as_we_do(benchmark_root, tmp_path, monkeypatch):
    """Skinning and placement against code nobody here wrote: nersemble-benchmark's FlameProvider (the official
    flame-model FLAME, then its model-to-world transform) poses the tracking it loads from our folder with the
    procedural head in FLAME's format; our FlameModel must give the same vertices for every frame."""
    import flame_model
    from nersemble_benchmark.models import flame as official

    folder = _official_flame_folder(tmp_path / "FLAME")
    monkeypatch.setattr(
        official, "FlameConfig", functools.partial(flame_model.FlameConfig, flame_folder=str(folder))
    )
    manager = MonoFlameAvatarDataManager(str(benchmark_root), PID)
    dataset = NersembleDataset(benchmark_root / "mono_flame_avatar", n_shape=300, n_expr=100)
    model = FlameModel.from_pkl(folder / "flame2023.pkl")
    for sequence in dataset.sequences(SUBJECT):
        provider = official.FlameProvider(manager.load_flame_tracking(sequence))
        with torch.no_grad():
            ours = model(dataset.tracking(SUBJECT, sequence).params).vertices.numpy()  # [T, V, 3]
        assert ours.shape[0] == SPEC.frames
        for t in range(SPEC.frames):
            np.testing.assert_allclose(
                provider.get_vertices(t), ours[t], atol=1e-5, err_msg=f"{sequence} {t}"
            )


def test_raw_calibration_equals_nersemble_data(benchmark_root, tmp_path):
    """nersemble-data's participant manager reads the raw calibration we write: the same poses, and the shared K
    it hands out (for the full 2200x3208 images) is ours once scaled to the 110x160 videos."""
    serials = NersembleDataset(benchmark_root / "mono_flame_avatar").serials(SUBJECT)
    root = _raw_release(tmp_path, benchmark_root, {s: np.eye(3) for s in serials})
    official = NeRSembleParticipantDataManager(str(root), PID).load_camera_calibration()
    full = np.asarray(official.intrinsics, np.float64)  # one K for every camera
    sx, sy = 110 / 2200, 160 / 3208
    expected = np.array(
        [
            [full[0, 0] * sx, full[0, 1] * sx, (full[0, 2] + 0.5) * sx - 0.5],
            [0.0, full[1, 1] * sy, (full[1, 2] + 0.5) * sy - 0.5],
            [0.0, 0.0, 1.0],
        ]
    )
    cameras = NersembleDataset(root).cameras(SUBJECT)
    assert sorted(official.world_2_cam) == sorted(cameras)
    for serial, camera in cameras.items():
        np.testing.assert_array_equal(
            np.asarray(official.world_2_cam[serial]), camera.world_to_cam.astype(np.float32)
        )
        np.testing.assert_allclose(camera.K, expected, rtol=1e-6)

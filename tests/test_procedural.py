"""Procedural data end to end: synth writes real layouts, the readers return exactly what was written."""

from __future__ import annotations

from pathlib import Path

import dlib
import numpy as np
import pytest
import torch

from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.nersemble import NersembleDataset
from geodiff4d.datasets.normal_maps import angular_error_deg, decode_normal_png, normals_from_depth
from geodiff4d.datasets.procedural import (
    SynthSpec,
    gt_flame_path,
    gt_normal_path,
    synth_cameras,
    synthesize,
)
from geodiff4d.datasets.synthhuman import SynthHumanDataset

SPEC = SynthSpec(subjects=4, sequences=1, frames=3, cameras=3, resolution=256, synthetic=4, seed=7)
SEQUENCE = "EXP-1-head"


@pytest.fixture(scope="module")
def synth_out(local_ray, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    report = synthesize(out, SPEC, workers=2, progress=False)
    assert report.ok and len(report.completed) == 5  # 4 subjects + 1 chunk of synthetic samples
    return out


def test_layout_and_resume(synth_out):
    root = synth_out / "nersemble"
    for pid in ("001", "002", "003", "004"):
        seq = root / pid / "sequences" / SEQUENCE
        assert (root / pid / "calibration" / "camera_params.json").is_file()
        assert (seq / "tracking" / "flame2023_tracking_v2.npz").is_file()
        assert len(list((seq / "images").glob("cam_*.mp4"))) == SPEC.cameras
        assert len(list((seq / "alpha_maps").glob("cam_*.mp4"))) == SPEC.cameras
    tracking = np.load(root / "001" / "sequences" / SEQUENCE / "tracking" / "flame2023_tracking_v2.npz")
    assert tracking["shape"].shape == (1, 300) and tracking["expression"].shape == (SPEC.frames, 100)
    assert len(list((synth_out / "synthhuman").glob("rgb_*.png"))) == SPEC.synthetic
    again = synthesize(synth_out, SPEC, workers=2, progress=False)
    assert again.completed == [] and len(again.skipped) == 5


def test_nersemble_round_trip_returns_cameras_and_flame(synth_out, head_model):
    dataset = NersembleDataset(synth_out / "nersemble", n_shape=head_model.n_shape, n_expr=head_model.n_expr)
    expected_cameras = synth_cameras(SPEC)
    for pid in dataset.subjects():
        cameras = dataset.cameras(pid)
        assert sorted(cameras) == sorted(expected_cameras)
        for serial, camera in cameras.items():
            np.testing.assert_allclose(camera.world_to_cam, expected_cameras[serial].world_to_cam, atol=1e-6)
            np.testing.assert_allclose(camera.K, expected_cameras[serial].K, atol=1e-6)
            assert (camera.width, camera.height) == (SPEC.resolution, SPEC.resolution)
        tracked = dataset.tracking(pid, SEQUENCE).params
        truth = FlameParams.from_numpy_dict(
            dict(np.load(gt_flame_path(synth_out / "nersemble", pid, SEQUENCE))),
            head_model.n_shape,
            head_model.n_expr,
        )
        for name in ("shape", "expression", "rotation", "neck", "jaw", "eyes", "translation", "scale"):
            torch.testing.assert_close(getattr(tracked, name), getattr(truth, name), rtol=0, atol=1e-6)


def test_landmarks_project_onto_the_face(synth_out, head_model):
    dataset = NersembleDataset(synth_out / "nersemble", n_shape=head_model.n_shape, n_expr=head_model.n_expr)
    inside = []
    for frame in dataset.frames("002", SEQUENCE, "222200037"):
        landmarks = head_model(frame.flame).landmarks[0].double().numpy()
        pixels = np.rint(frame.camera.project(landmarks)).astype(int)
        assert (pixels >= 0).all() and (pixels < SPEC.resolution).all()
        inside.append(frame.alpha[pixels[:, 1], pixels[:, 0]] > 0.5)
        normal, mask = decode_normal_png(
            gt_normal_path(synth_out / "nersemble", "002", SEQUENCE, "222200037", frame.frame)
        )
        nose_tip = pixels[30]
        assert (
            mask[nose_tip[1], nose_tip[0]] and normal[nose_tip[1], nose_tip[0], 2] > 0.5
        )  # faces the camera
    assert np.mean(inside) > 0.97


def test_dlib_finds_faces_in_frontal_renders(synth_out):
    detector = dlib.get_frontal_face_detector()
    dataset = NersembleDataset(synth_out / "nersemble")
    found = [
        len(detector(frame.rgb, 1)) > 0
        for pid in dataset.subjects()
        for serial in synth_cameras(SPEC)
        for frame in dataset.frames(pid, SEQUENCE, serial)
    ]
    assert len(found) == 4 * SPEC.cameras * SPEC.frames
    assert np.mean(found) >= 0.9, f"dlib found faces in {np.mean(found):.0%} of frontal renders"


def test_synthhuman_normals_agree_with_depth(synth_out):
    dataset = SynthHumanDataset(synth_out / "synthhuman")
    assert len(dataset) == SPEC.synthetic
    for index in dataset.indices():
        sample = dataset[index]
        inner = sample.mask & np.roll(sample.mask, 2, 0) & np.roll(sample.mask, -2, 0)
        inner &= np.roll(sample.mask, 2, 1) & np.roll(sample.mask, -2, 1)
        from_depth = normals_from_depth(sample.depth_m, sample.K, inner)
        valid = inner & (np.linalg.norm(from_depth, axis=-1) > 0.5)
        assert np.median(angular_error_deg(sample.normal, from_depth, valid)) < 3.0


def test_same_seed_gives_byte_identical_files(local_ray, tmp_path):
    spec = SynthSpec(subjects=1, sequences=1, frames=2, cameras=2, resolution=64, synthetic=2, seed=3)
    first, second = tmp_path / "a", tmp_path / "b"
    assert synthesize(first, spec, workers=2, progress=False).ok
    assert synthesize(second, spec, workers=2, progress=False).ok
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert len(files) > 20
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    with pytest.raises(
        ValueError, match=r"synth_spec\.json was written with other settings.*\n(.*\n)*  subjects: 1 -> 2"
    ):
        synthesize(
            first,
            SynthSpec(subjects=2, frames=2, cameras=2, resolution=64, synthetic=2, seed=3),
            progress=False,
        )

"""Ray recon run: a worker killed mid-fit resumes from its last checkpoint; nothing is redone or lost.
Also the render command writes a frame folder from a fitted avatar."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from geodiff4d.datasets.cameras import look_at_camera
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.frame_folder import read_frames, write_cameras
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.recon.ply import read_point_cloud_ply
from geodiff4d.recon.run import ReconConfig, ReconJob, reconstruct, render_avatar

SIZE = 20


class _KillOnceJob(ReconJob):
    """Kills its own worker process at ``kill_step`` of ``kill_subject``, once (a flag file remembers)."""

    kill_subject, kill_step = "s0", 5

    def after_step(self, subject: str, step: int) -> None:
        flag = self.out / f".killed-{subject}"
        if subject == self.kill_subject and step == self.kill_step and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def _frame_folder(root: Path) -> None:
    model = procedural_head_model(0)
    K = np.array([[SIZE * 2.5, 0, (SIZE - 1) / 2], [0, SIZE * 2.5, (SIZE - 1) / 2], [0, 0, 1]])
    cameras = {
        serial: look_at_camera(np.array([x, 0.0, 0.6]), np.zeros(3), np.array([0.0, 1.0, 0.0]), K, SIZE, SIZE)
        for serial, x in (("220700191", -0.2), ("222200037", 0.2))
    }
    rng = np.random.default_rng(0)
    for subject in ("s0", "s1"):
        params = FlameParams.zeros(2, model.n_shape, model.n_expr)
        params.expression[1, 0] = 1.0
        tracking = root / "tracking" / subject / "EXP-1.npz"
        tracking.parent.mkdir(parents=True)
        np.savez(tracking, frames=np.arange(2), **params.to_numpy_dict())
        write_cameras(root / "cameras" / subject / "EXP-1.json", cameras)
        for serial in cameras:
            for frame in range(2):
                path = root / "rgb" / subject / "EXP-1" / serial / f"{frame:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def recon_ray(local_ray):
    """The session's local Ray (conftest), with this module pickled by value for the workers."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield


def test_killed_recon_resumes_from_checkpoint_and_render_writes_frames(recon_ray, tmp_path):
    frames_root, out = tmp_path / "frames", tmp_path / "avatars"
    _frame_folder(frames_root)
    config = ReconConfig(steps=8, fit={"checkpoint_every": 3}, holdout_camera="222200037", progress_every=4)
    job = _KillOnceJob(frames_root, out, config, progress=False)
    from geodiff4d.core.jobs import CommitLog, WorkUnit, run_units

    report = run_units(
        job, [WorkUnit("s0"), WorkUnit("s1")], CommitLog(out / "_commits"), workers=1, progress=False
    )
    assert report.ok and sorted(report.completed) == ["s0", "s1"]
    assert (out / ".killed-s0").exists()  # the worker really died mid-fit
    stats = {s: json.loads((out / "_commits" / f"{s}.stats.json").read_text()) for s in ("s0", "s1")}
    assert stats["s0"]["resumed_from_step"] == 3  # the last checkpoint before the kill at step 5
    assert stats["s1"]["resumed_from_step"] == 0
    assert stats["s0"]["steps"] == stats["s1"]["steps"] == 8
    assert all(np.isfinite(stats[s]["holdout_psnr"]) for s in ("s0", "s1"))  # progress on the held-out camera
    assert list((out / "s0" / "tensorboard").glob("events.out.tfevents.*"))
    for subject in ("s0", "s1"):
        cloud = read_point_cloud_ply(out / subject / "point_cloud.ply")
        assert cloud["means"].shape == (stats[subject]["gaussians"], 3)
        assert (
            cloud["sh_rest"].shape[1:] == (15, 3) and not cloud["sh_rest"].any()
        )  # degree-3 layout, degree 0 fitted
        assert (out / subject / "binding.npz").is_file() and (out / subject / "flame" / "EXP-1.npz").is_file()
    # a rerun redoes nothing
    again = reconstruct(frames_root, out, workers=1, config=config, progress=False)
    assert again.completed == [] and sorted(again.skipped) == ["s0", "s1"]
    # render the avatar into a frame folder at its tracked expressions
    rendered = tmp_path / "rendered"
    fps = render_avatar(out / "s0", frames_root / "cameras" / "s0" / "EXP-1.json", None, rendered)
    assert fps > 0
    images = read_frames(rendered, "s0", "EXP-1")
    assert len(images) == 4 and images[0].rgb.shape == (SIZE, SIZE, 3) and images[0].normal is not None
    assert images[0].mask.sum() > 0  # the head is in view
    torch.testing.assert_close(torch.tensor(images[0].rgb.std() > 0), torch.tensor(True))
    # driven by another tracking of another shape and scale: the avatar keeps its own, takes the expressions
    model = procedural_head_model(0)
    driver = FlameParams.zeros(3, model.n_shape, model.n_expr)
    driver.shape[:] = 1.0
    driver.scale[:] = 1.4
    driver.expression[:, 0] = torch.tensor([0.0, 0.5, 1.0])
    np.savez(tmp_path / "drive.npz", frames=np.arange(3), **driver.to_numpy_dict())
    render_avatar(
        out / "s0",
        frames_root / "cameras" / "s0" / "EXP-1.json",
        tmp_path / "drive.npz",
        rendered,
        head_pose="relative",
    )
    with (
        np.load(rendered / "tracking" / "s0" / "drive.npz") as used,
        np.load(out / "s0" / "flame" / "EXP-1.npz") as own,
    ):
        np.testing.assert_array_equal(used["shape"], own["shape"])
        np.testing.assert_array_equal(used["scale"], own["scale"])
        n_expr = driver.expression.shape[1]  # the file is NeRSemble v2, zero-padded to 100 coefficients
        np.testing.assert_array_equal(used["expression"][:, :n_expr], driver.expression.numpy())
        assert not used["expression"][:, n_expr:].any()
    assert len(read_frames(rendered, "s0", "drive")) == 6


@pytest.mark.slow
def test_recon_with_our_tracking_and_refinement_renders_a_scorable_folder(tmp_path):
    """ReconConfig wires our tracker (cached per subject) and every refinement level into the run and render."""
    frames_root, out = tmp_path / "frames", tmp_path / "avatars"
    _frame_folder(frames_root)
    config = ReconConfig(
        steps=2,
        tracker="ours",
        tracking_options={
            "rigid_steps": 1,
            "landmark_steps": 1,
            "steps": 1,
            "render_size": 12,
            "views_per_step": 1,
        },
        refine={"uv_offsets": True, "attribute_mlp": True, "subdivisions": 0, "uv_size": 8, "hidden": 8},
    )
    job = ReconJob(frames_root, out, config)
    job.setup()
    from geodiff4d.core.jobs import WorkUnit

    stats = job.run(WorkUnit("s0"))
    assert stats["steps"] == 2
    assert (out / "s0" / "tracking" / "EXP-1.npz").is_file()  # our tracking, cached for a resumed run
    assert (out / "s0" / "flame_refined" / "EXP-1.npz").is_file()
    rendered = tmp_path / "rendered"
    render_avatar(out / "s0", frames_root / "cameras" / "s0" / "EXP-1.json", None, rendered)
    assert len(read_frames(rendered, "s0", "EXP-1")) == 4
    # driven by another expression file: the networks run, per-frame residuals are not reused
    drive = FlameParams.zeros(3, job.model.n_shape, job.model.n_expr)
    drive.expression[:, 0] = torch.tensor([0.0, 0.5, 1.0])
    np.savez(tmp_path / "drive.npz", frames=np.arange(3), **drive.to_numpy_dict())
    render_avatar(out / "s0", frames_root / "cameras" / "s0" / "EXP-1.json", tmp_path / "drive.npz", rendered)
    assert len(read_frames(rendered, "s0", "drive")) == 6

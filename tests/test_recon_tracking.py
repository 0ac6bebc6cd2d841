"""Tracking: the disc render of the mesh matches the rasterized silhouette and normals; landmarks match the
eval module's dlib reference; tracking recovers pose and expression from exact multi-view targets."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from geodiff4d.datasets.cameras import nersemble_rig
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.render import render_head
from geodiff4d.recon.binding import render_bound
from geodiff4d.recon.landmarks import LandmarkDetector
from geodiff4d.recon.tracking import (
    TrackingConfig,
    TrackingTargets,
    build_targets,
    mesh_gaussians,
    project,
    rotation_error_deg,
    track,
    track_sequence,
    tracking_errors,
)

SIZE = 48


def _params(model, frames: int) -> FlameParams:
    params = FlameParams.zeros(frames, model.n_shape, model.n_expr)
    g = torch.Generator().manual_seed(3)
    params.shape = (torch.randn(1, model.n_shape, generator=g) * 0.5).expand(frames, -1).clone()
    params.expression = torch.randn(frames, model.n_expr, generator=g) * 0.8
    params.rotation = torch.tensor([[0.1, 0.25, 0.03], [-0.05, -0.2, 0.0]])[:frames]
    params.jaw[:, 0] = torch.tensor([0.2, 0.05])[:frames]
    return params


def _cameras(serials=("222200037", "220700191", "222200046"), size=SIZE):
    rig = nersemble_rig(width=size, height=size)
    return [rig[s] for s in serials]


def test_disc_render_matches_rasterized_silhouette_and_normals(head_model):
    params = _params(head_model, 1)
    camera = _cameras()[0]
    truth = render_head(head_model, params, camera)
    with torch.no_grad():
        vertices = head_model(params).vertices[0]
        w2c, K = (torch.tensor(m, dtype=torch.float32) for m in (camera.world_to_cam, camera.K))
        image = render_bound(
            mesh_gaussians(len(head_model.faces)), vertices, head_model.faces, w2c, K, SIZE, SIZE
        )
    mask, soft = truth.mask > 0.5, image.alpha > 0.5
    # every head pixel is covered; the stacked disc tails at grazing angles widen the rim by about a pixel
    assert float((mask & soft).sum() / mask.sum()) > 0.99
    assert float((mask & soft).sum() / (mask | soft).sum()) > 0.8
    normal = torch.nn.functional.normalize(image.normal, dim=0)
    cos = (normal * truth.normal).sum(0)[mask & soft]
    # flat discs against interpolated vertex normals, at 48 px: a few degrees of faceting
    assert float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))).median()) < 12.0


def test_landmarks_match_the_eval_reference():
    from skimage import data

    from geodiff4d.eval.face_detection import DlibDetector
    from geodiff4d.eval.landmarks import DlibLandmarks

    image = data.astronaut()
    reference = DlibLandmarks()
    reference.detector = DlibDetector(upsample=0)  # ours tries upsampling only when nothing is found
    ours, reference = LandmarkDetector()(image), reference(image)
    assert ours is not None and ours.shape == (68, 2)
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert LandmarkDetector()(np.zeros((64, 64, 3), np.uint8)) is None


def test_rotation_error_is_the_geodesic_angle():
    a = torch.tensor([[0.0, 0.3, 0.0], [0.1, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.3 + np.deg2rad(2.0), 0.0], [0.1, 0.0, np.deg2rad(5.0)]], dtype=torch.float32)
    np.testing.assert_allclose(rotation_error_deg(a, b).numpy(), [2.0, 5.0], atol=0.05)


def _exact_targets(model, params, cameras) -> TrackingTargets:
    renders = [[render_head(model, params[t], cam) for cam in cameras] for t in range(params.batch_size)]
    masks = np.stack([[r.mask.numpy() for r in row] for row in renders])  # [T, C, H, W]
    normals = np.stack([[r.normal.permute(1, 2, 0).numpy() for r in row] for row in renders])
    rgb = np.zeros(masks.shape + (3,), np.uint8)
    targets = build_targets(
        cameras, rgb, masks, normals, detector=None, render_size=TrackingConfig().render_size
    )
    w2c = torch.tensor(np.stack([c.world_to_cam for c in cameras]), dtype=torch.float32)
    K = torch.tensor(np.stack([c.K for c in cameras]), dtype=torch.float32)
    with torch.no_grad():
        targets.landmarks = project(model(params).landmarks, w2c, K)  # exact landmarks in place of dlib's
    targets.has_landmarks[:] = True
    return targets


@pytest.mark.slow
def test_tracking_recovers_pose_and_expression_from_exact_targets(head_model):
    truth = _params(head_model, 2)
    targets = _exact_targets(head_model, truth, _cameras(size=TrackingConfig().render_size))
    estimated = track(head_model, targets, TrackingConfig(steps=60, smooth_weight=0.0))  # unrelated frames
    errors = tracking_errors(estimated, truth)
    assert errors["rotation_deg_max"] < 3.0 and errors["jaw_deg_max"] < 3.0
    assert errors["expression_corr"] > 0.8


_KILLED_CHILD = """
import os, signal, sys, torch
torch.set_num_threads(1)  # as the parent: the same arithmetic, so resumed and uninterrupted runs agree bit for bit
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.recon.tracking import track_sequence
targets, config = torch.load(sys.argv[1], weights_only=False)
load = lambda frames: targets.select([f % 2 for f in frames])
def kill_after_two(done, total):
    if done == 2:
        os.kill(os.getpid(), signal.SIGKILL)
track_sequence(procedural_head_model(0), 6, load, config, checkpoints=sys.argv[2], on_chunk=kill_after_two)
"""


@pytest.fixture
def one_torch_thread():
    """One thread, as the killed child uses: the same arithmetic, so resumed and uninterrupted runs agree."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_killed_chunked_tracking_resumes_after_its_last_finished_chunk(
    head_model, tmp_path, one_torch_thread
):
    """A SIGKILL after chunk 2 of 3: the rerun loads the identity and chunks 1-2 from disk, tracks only chunk 3,
    and returns exactly what an uninterrupted run returns; a changed config clears the stale chunks.
    (Landmark phases only: the render phase is the same per chunk and costs seconds per frame on a CPU.)"""
    config = TrackingConfig(rigid_steps=3, landmark_steps=3, steps=0, chunk_frames=2, identity_frames=3)
    targets = _exact_targets(head_model, _params(head_model, 2), _cameras(serials=("222200037", "220700191")))
    torch.save((targets, config), tmp_path / "targets.pt")
    folder = tmp_path / "chunks"
    child = subprocess.run([sys.executable, "-c", _KILLED_CHILD, str(tmp_path / "targets.pt"), str(folder)])
    assert child.returncode == -9  # really killed
    assert sorted(p.name for p in folder.glob("*.npz")) == [
        "chunk-00000.npz",
        "chunk-00002.npz",
        "identity.npz",
    ]

    loaded: list[list[int]] = []

    def load(frames):
        loaded.append(list(frames))
        return targets.select([f % 2 for f in frames])  # the sequence alternates two poses

    resumed = track_sequence(head_model, 6, load, config, checkpoints=folder)
    assert loaded == [[4, 5]]  # only the unfinished chunk is tracked again
    uninterrupted = track_sequence(head_model, 6, lambda f: targets.select([i % 2 for i in f]), config)
    for name, value in vars(uninterrupted).items():
        torch.testing.assert_close(getattr(resumed, name), value, rtol=0, atol=0, msg=name)
    assert torch.equal(
        resumed.shape, resumed.shape[:1].expand_as(resumed.shape)
    )  # one identity for all chunks

    loaded.clear()
    track_sequence(
        head_model, 6, load, TrackingConfig(**{**vars(config), "rigid_steps": 4}), checkpoints=folder
    )
    assert loaded == [[0, 2, 5], [0, 1], [2, 3], [4, 5]]  # stale chunks of the old config are not reused

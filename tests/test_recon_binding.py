"""Gaussians bound to head-model triangles: frames, invariance under expression, densify/prune."""

from __future__ import annotations

import pytest
import torch

from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.recon.binding import densify, prune, to_local, to_world, triangle_frames
from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.rotations import quat_to_rotmat


@pytest.fixture(scope="module")
def head():
    return procedural_head_model(0)


def _random_gaussians(n_faces: int, per_face: int, seed: int) -> BoundGaussians:
    g = torch.Generator().manual_seed(seed)
    gaussians = BoundGaussians.on_faces(n_faces, per_face, g, sh_degree=1)
    with torch.no_grad():
        gaussians.local_xyz.add_(torch.randn(len(gaussians), 3, generator=g) * 0.2)
        gaussians.local_quat.copy_(torch.randn(len(gaussians), 4, generator=g))
    return gaussians


def test_frame_is_the_specified_triangle_frame():
    vertices = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    frames = triangle_frames(vertices, torch.tensor([[0, 1, 2]]))
    # a0 along v1 - v0, a1 = normalize(a0 x (v2 - v0)) = +z, a2 = a0 x a1 = -y (columns)
    torch.testing.assert_close(frames.rotation[0], torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]))
    torch.testing.assert_close(frames.origin[0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(frames.size[0], torch.tensor((2 + 1 + 5**0.5) / 3))
    assert torch.det(frames.rotation[0]) > 0.99  # proper rotation


def test_position_in_triangle_frame_is_invariant_under_expression(head):
    gaussians = _random_gaussians(len(head.faces), 1, seed=0)
    neutral = FlameParams.zeros(1, head.n_shape, head.n_expr)
    smiling = FlameParams.zeros(1, head.n_shape, head.n_expr)
    smiling.expression[0] = torch.linspace(-2, 2, head.n_expr)
    smiling.jaw[0, 0] = 0.2
    frames = [triangle_frames(head(p).vertices[0], head.faces) for p in (neutral, smiling)]
    worlds = [to_world(gaussians, f) for f in frames]
    moved = (worlds[0][0] - worlds[1][0]).norm(dim=-1)
    assert moved.max() > 5e-3  # the expression really moved Gaussians (metres)
    for frame, (means, quats, scales) in zip(frames, worlds, strict=True):
        local_xyz, local_quat, log_scale = to_local(
            means, quat_to_rotmat(quats), scales, gaussians.face_index, frame
        )
        torch.testing.assert_close(local_xyz, gaussians.local_xyz.detach(), atol=2e-4, rtol=0)
        torch.testing.assert_close(log_scale, gaussians.log_scale.detach(), atol=1e-4, rtol=0)
        same_rotation = quat_to_rotmat(local_quat) - quat_to_rotmat(gaussians.local_quat.detach())
        assert same_rotation.abs().max() < 1e-4


def test_gaussian_follows_its_triangle_rigidly():
    faces = torch.tensor([[0, 1, 2]])
    vertices = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    gaussians = _random_gaussians(1, 3, seed=1)
    rotation = quat_to_rotmat(torch.tensor([0.8, 0.1, -0.5, 0.3]))
    moved_vertices = 2.0 * vertices @ rotation.T + torch.tensor([0.3, -1.0, 2.0])  # similarity transform
    means0, quats0, scales0 = to_world(gaussians, triangle_frames(vertices, faces))
    means1, quats1, scales1 = to_world(gaussians, triangle_frames(moved_vertices, faces))
    torch.testing.assert_close(
        means1, 2.0 * means0 @ rotation.T + torch.tensor([0.3, -1.0, 2.0]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(quat_to_rotmat(quats1), rotation @ quat_to_rotmat(quats0), atol=1e-5, rtol=0)
    torch.testing.assert_close(scales1, 2.0 * scales0, atol=1e-6, rtol=1e-5)


def test_densify_inherits_faces_and_prune_keeps_every_face():
    g = torch.Generator().manual_seed(2)
    gaussians = _random_gaussians(5, 2, seed=2)  # faces 0 0 1 1 2 2 3 3 4 4
    clone = torch.zeros(10, dtype=torch.bool)
    split = torch.zeros(10, dtype=torch.bool)
    clone[[1, 4]] = True
    split[[6, 9]] = True
    grown = densify(gaussians, clone, split, g)
    assert len(grown.gaussians) == 10 - 2 + 2 + 4
    torch.testing.assert_close(grown.gaussians.face_index, gaussians.face_index[grown.source])
    assert grown.fresh.sum() == 6 and not grown.fresh[:8].any()
    children = grown.gaussians.log_scale[-4:].detach()
    torch.testing.assert_close(
        children, gaussians.log_scale.detach()[[6, 9, 6, 9]] - torch.log(torch.tensor(1.6))
    )
    # prune everything on faces 0 and 3, and one of face 1's: faces keep their most opaque Gaussian
    with torch.no_grad():
        gaussians.opacity_logit.copy_(torch.arange(10.0))
    remove = torch.zeros(10, dtype=torch.bool)
    remove[[0, 1, 2, 6, 7]] = True
    pruned = prune(gaussians, remove)
    assert pruned.source.tolist() == [1, 3, 4, 5, 7, 8, 9]
    assert set(pruned.gaussians.face_index.tolist()) == {0, 1, 2, 3, 4}

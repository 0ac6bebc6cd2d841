"""Hierarchical refinement: subdivision is exact, every level starts at the tracked head, gradients reach every
level through the Fitter, and a FLAME residual recovers a pose the tracking missed."""

from __future__ import annotations

import torch

from geodiff4d.datasets.flame import FlameParams
from geodiff4d.recon.binding import triangle_frames
from geodiff4d.recon.fit import FitConfig, Fitter, View
from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.refine import HierarchicalDeformer, RefineConfig, subdivide


def _params(model, frames: int = 2) -> FlameParams:
    params = FlameParams.zeros(frames, model.n_shape, model.n_expr)
    params.expression[1, :3] = torch.tensor([0.8, -0.5, 0.3])
    params.jaw[1, 0] = 0.1
    return params


def test_subdivision_keeps_vertices_and_area():
    vertices = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.5]])
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    mapping, new_faces, uv = subdivide(faces, vertices[:, :2], 4)
    fine = torch.sparse.mm(mapping, vertices)
    assert new_faces.shape == (8, 3) and fine.shape == (4 + 5, 3)  # 5 unique edges
    torch.testing.assert_close(fine[:4], vertices)
    torch.testing.assert_close(uv, fine[:, :2])  # uv of a midpoint is the midpoint of the uvs

    def area(v, f):
        return torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]).norm(dim=-1).sum() / 2

    torch.testing.assert_close(area(fine, new_faces), area(vertices, faces))
    normals = triangle_frames(fine, new_faces).rotation[:, :, 1]
    assert (normals[:, 2] > 0).all()  # winding (orientation) preserved


def test_every_level_starts_at_the_tracked_head(head_model):
    params = _params(head_model)
    deformer = HierarchicalDeformer(head_model, params, RefineConfig(uv_offsets=True, attribute_mlp=True))
    with torch.no_grad():
        tracked = head_model(params).vertices[1]
        refined = deformer(1)
    assert refined.shape[0] > tracked.shape[0] and deformer.faces.shape[0] == 4 * head_model.faces.shape[0]
    torch.testing.assert_close(refined[: head_model.n_vertices], tracked)
    gaussians = BoundGaussians.on_faces(len(deformer.faces), 1, torch.Generator().manual_seed(0))
    residuals = deformer.attribute_residuals(1, gaussians)
    assert all(float(r.detach().abs().max()) == 0.0 for r in residuals.values())
    assert float(deformer.regularizer(1)) == 0.0


def _views(model, params, size=24):
    w2c = torch.eye(4)
    w2c[1, 1], w2c[2, 2], w2c[2, 3] = -1.0, -1.0, 0.6  # looking at the face (+z) from z = 0.6
    K = torch.tensor([[size * 2.5, 0, (size - 1) / 2], [0, size * 2.5, (size - 1) / 2], [0, 0, 1.0]])
    rgb = torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))
    return [View(frame, w2c, K, rgb, torch.ones(size, size)) for frame in range(params.batch_size)]


def test_gradients_reach_every_level_through_the_fitter(head_model):
    params = _params(head_model)
    config = RefineConfig(uv_offsets=True, attribute_mlp=True, subdivisions=0, uv_size=16, hidden=16)
    deformer = HierarchicalDeformer(head_model, params, config)
    every = BoundGaussians.on_faces(len(deformer.faces), 1, torch.Generator().manual_seed(0))
    sparse = torch.arange(0, len(every), 40)  # a few hundred Gaussians keep the CPU test fast
    gaussians = BoundGaussians(every.face_index[sparse], every.selected(sparse), 0)
    fitter = Fitter(
        gaussians,
        deformer,
        deformer.faces,
        _views(head_model, params),
        FitConfig(steps=2, lr={**FitConfig().lr, "deformer": 1e-2}),
    )
    before = {k: v.detach().clone() for k, v in deformer.named_parameters()}
    fitter.run(2)
    changed = {k for k, v in deformer.named_parameters() if not torch.equal(v, before[k])}
    assert "unet.out.weight" in changed and "mlp.net.4.weight" in changed
    assert {"residual_jaw", "residual_expression", "residual_rotation"} <= changed


def test_flame_residual_recovers_a_missed_jaw(head_model):
    truth = _params(head_model)
    tracked = FlameParams(**{k: v.clone() for k, v in vars(truth).items()})
    tracked.jaw[1, 0] = 0.0  # the tracker missed the open jaw
    deformer = HierarchicalDeformer(head_model, tracked, RefineConfig(residual_weight=0.0))
    target = head_model(truth).vertices[1].detach()
    optimizer = torch.optim.Adam([p for p in deformer.parameters() if p.requires_grad], lr=0.02)
    for _ in range(80):
        loss = ((deformer(1) - target) ** 2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    refined = deformer.params(1)
    assert abs(float(refined.jaw[0, 0]) - 0.1) < 0.01  # no expression basis moves the chin: the jaw itself
    assert float(((deformer(1) - target) ** 2).sum(-1).mean().sqrt()) < 5e-4  # metres

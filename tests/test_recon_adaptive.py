"""GaussianAvatars' adaptive density control, learning rates, regularizers and progressive SH in the fitter."""

from __future__ import annotations

import math

import torch
from test_recon_fit import _student, make_problem

from geodiff4d.recon import adaptive
from geodiff4d.recon.binding import prune
from geodiff4d.recon.fit import LEARNING_RATES, FitConfig, Fitter, FixedVertices
from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.losses import scale_regularizer
from geodiff4d.recon.rasterize import GaussianRender
from geodiff4d.recon.refine import HierarchicalDeformer, RefineConfig


def test_gradient_statistics_are_in_normalized_device_coordinates():
    """3DGS differentiates w.r.t. NDC positions, pixel = ((ndc + 1) W - 1) / 2 (its ndc2Pix); the recorded
    gradient must equal that derivative, obtained here by autograd through the map itself."""
    width, height = 64, 48
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(5, 2, generator=g) * torch.tensor([width, height])).requires_grad_()
    weights = torch.randn(5, 2, generator=g)

    def loss_of(px):
        return (torch.sin(px / 7) * weights).sum()

    loss_of(pixels).backward()
    ndc = ((2 * pixels.detach() + 1) / torch.tensor([width, height]) - 1).requires_grad_()
    loss_of(((ndc + 1) * torch.tensor([width, height]) - 1) / 2).backward()
    visible = torch.tensor([True, True, False, True, True])
    empty = torch.zeros(())
    render = GaussianRender(empty, empty, empty, empty, visible, pixels, torch.tensor([1.0, 2, 3, 4, 5]))
    stats = adaptive.DensityStatistics(5)
    stats.add(render, width, height)
    stats.add(render, width, height)
    expected = torch.where(visible, ndc.grad.norm(dim=-1), 0.0)
    torch.testing.assert_close(stats.mean_grad(), expected)
    torch.testing.assert_close(stats.count, 2 * visible.float())
    torch.testing.assert_close(stats.max_radii, torch.tensor([1.0, 2, 0, 4, 5]))


def test_schedule_is_gaussian_avatars_in_proportion_and_on_for_runs_longer_than_the_demo():
    paper = adaptive.schedule(FitConfig(steps=600_000))
    assert (paper.densify_from, paper.densify_every, paper.densify_until, paper.opacity_reset_every) == (
        10_000,
        2_000,
        600_000,
        60_000,
    )
    long = adaptive.schedule(FitConfig(steps=120_000))
    assert (long.densify_from, long.densify_every, long.densify_until, long.opacity_reset_every) == (
        2_000,
        400,
        120_000,
        12_000,
    )
    assert long.densifies(2_400) and not long.densifies(2_000) and not long.densifies(120_000)
    assert long.resets_opacity(12_000) and not long.prunes_large(12_000) and long.prunes_large(12_400)
    short = adaptive.schedule(FitConfig(steps=3000))  # 3DGS's intervals are the floor
    assert (short.densify_from, short.densify_every, short.densify_until, short.opacity_reset_every) == (
        500,
        100,
        3000,
        3000,
    )
    assert not any(short.resets_opacity(step) for step in range(1, 3001))
    assert adaptive.schedule(FitConfig(steps=300)) is None  # the demo's fit
    assert adaptive.schedule(FitConfig(steps=300, adaptive_control=True)) is not None
    assert adaptive.schedule(FitConfig(steps=3000, adaptive_control=False)) is None


def _four_gaussians() -> BoundGaussians:
    """Faces 0, 1, 2 (triangle size 1); face 2 has only one, transparent, Gaussian."""
    tensors = {
        "local_xyz": torch.zeros(4, 3),
        "local_quat": torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1),
        "log_scale": torch.log(torch.tensor([[0.001] * 3, [0.05] * 3, [0.001] * 3, [0.001] * 3])),
        "opacity_logit": torch.logit(torch.tensor([0.5, 0.5, 0.003, 0.001])),
        "sh_dc": torch.zeros(4, 3),
        "sh_rest": torch.zeros(4, 0, 3),
    }
    return BoundGaussians(torch.tensor([0, 1, 0, 2]), tensors, 0)


def test_small_gaussians_clone_large_ones_split_transparent_ones_go_but_no_face_empties():
    gaussians, face_size = _four_gaussians(), torch.ones(3)
    stats = adaptive.DensityStatistics(4)
    stats.grad_sum, stats.count = torch.tensor([3e-4, 3e-4, 1e-4, 0.0]), torch.ones(4)
    config, extent = FitConfig(), 1.0  # split above 0.01 world units
    grown = adaptive.grow(gaussians, stats, face_size, extent, config, torch.Generator().manual_seed(0))
    # kept 0, 2, 3; clone of 0; two children of 1 at scale 0.05 / 1.6
    assert grown.source.tolist() == [0, 2, 3, 0, 1, 1]
    assert grown.fresh.tolist() == [False, False, False, True, True, True]
    torch.testing.assert_close(torch.exp(grown.gaussians.log_scale[4:]), torch.full((2, 3), 0.05 / 1.6))
    remove = adaptive.prune_mask(grown.gaussians, torch.zeros(6), face_size, extent, config, large_too=False)
    assert remove.tolist() == [False, True, True, False, False, False]
    survivors = prune(grown.gaussians, remove)
    assert survivors.source.tolist() == [0, 2, 3, 4, 5]  # face 2's only Gaussian stays
    assert sorted(set(survivors.gaussians.face_index.tolist())) == [0, 1, 2]
    radii = torch.tensor([25.0, 0, 0, 0, 0, 0])  # large on screen
    large = adaptive.prune_mask(grown.gaussians, radii, face_size, extent, config, large_too=True)
    assert large.tolist() == [True, True, True, False, False, False]
    wide = adaptive.prune_mask(grown.gaussians, torch.zeros(6), face_size, 0.3, config, large_too=True)
    assert wide[4:].tolist() == [True, True]  # children 0.031 > 0.1 x 0.3 world units


def test_opacity_reset_clamps_to_one_percent_and_forgets_its_moments():
    frames, faces, views = make_problem()
    fitter = Fitter(_student(len(faces)), FixedVertices(frames), faces, views, FitConfig(steps=3))
    fitter.run(2)
    logits = fitter.gaussians.opacity_logit
    assert fitter.optimizer.state[logits]["exp_avg"].abs().sum() > 0
    adaptive.reset_opacity(fitter.gaussians, fitter.optimizer)
    assert float(fitter.gaussians.opacity.detach().max()) <= 0.01 + 1e-7
    assert fitter.optimizer.state[logits]["exp_avg"].abs().sum() == 0


def test_fitter_densifies_resets_and_keeps_every_face():
    frames, faces, views = make_problem()
    config = FitConfig(
        steps=20,
        adaptive_control=True,
        densify_from=2,
        densify_every=3,
        opacity_reset_every=9,
        densify_grad_threshold=1e-5,
    )
    fitter = Fitter(_student(len(faces)), FixedVertices(frames), faces, views, config)
    fitter.run(9)
    assert len(fitter.gaussians) > len(faces)
    assert float(fitter.gaussians.opacity.detach().max()) <= 0.01 + 1e-7  # reset at step 9
    fitter.run(20)
    assert sorted(set(fitter.gaussians.face_index.tolist())) == list(range(len(faces)))


def test_learning_rates_position_schedule_and_flame_groups(head_model):
    frames, faces, views = make_problem()
    fitter = Fitter(_student(len(faces)), FixedVertices(frames), faces, views, FitConfig(steps=100))
    assert abs(fitter.position_lr(0) - 5e-3 * fitter.extent) < 1e-12
    assert abs(fitter.position_lr(100) - 5e-5 * fitter.extent) < 1e-12
    assert abs(fitter.position_lr(50) - math.sqrt(5e-3 * 5e-5) * fitter.extent) < 1e-12
    fitter.run(1)
    rates = {g["name"]: g["lr"] for g in fitter.optimizer.param_groups}
    assert rates["local_xyz"] == fitter.position_lr(0)
    assert (rates["log_scale"], rates["sh_dc"], rates["sh_rest"], rates["opacity_logit"]) == (
        0.017,
        0.0025,
        0.000125,
        0.05,
    )
    from geodiff4d.datasets.flame import FlameParams

    params = FlameParams.zeros(2, head_model.n_shape, head_model.n_expr)
    deformer = HierarchicalDeformer(head_model, params, RefineConfig(attribute_mlp=True))
    groups = {name: len(ps) for name, ps in deformer.parameter_groups().items()}
    assert groups == {"flame_expression": 1, "flame_pose": 3, "flame_translation": 1, "deformer": 6}
    assert (
        LEARNING_RATES["flame_translation"]
        < LEARNING_RATES["flame_pose"]
        < LEARNING_RATES["flame_expression"]
    )


def test_unknown_learning_rate_group_is_named():
    import pytest

    with pytest.raises(ValueError, match="unknown parameter group.*'sh_rets'"):
        FitConfig(lr={"sh_rets": 1e-3})


def test_scale_regularizer_is_the_norm_over_axes_of_the_excess():
    log_scale = torch.log(torch.tensor([[1.0, 0.6, 0.2], [1.6, 1.6, 0.1]]))
    expected = (0.4 + math.sqrt(2.0)) / 2
    assert abs(float(scale_regularizer(log_scale)) - expected) < 1e-6


def test_sh_degrees_activate_one_at_a_time():
    frames, faces, views = make_problem()
    gaussians = BoundGaussians.on_faces(len(faces), 1, torch.Generator().manual_seed(4), sh_degree=3)
    fitter = Fitter(gaussians, FixedVertices(frames), faces, views, FitConfig(steps=8, sh_increase_every=2))
    degrees = []
    fitter.run(1, on_step=lambda step, loss: degrees.append(fitter.gaussians.active_sh_degree))
    assert fitter.gaussians.sh_rest.detach().abs().sum() == 0  # degree 0 alone: no view dependence yet
    fitter.run(8, on_step=lambda step, loss: degrees.append(fitter.gaussians.active_sh_degree))
    assert degrees == [0, 1, 1, 2, 2, 3, 3, 3]
    assert fitter.gaussians.sh_rest.detach()[:, 8:].abs().sum() > 0  # degree 3 trained from step 6 on

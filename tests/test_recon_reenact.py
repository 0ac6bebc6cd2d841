"""Reenactment keeps the avatar: a driver with another shape and scale moves the avatar's face, never its
identity; head motion transfers as the chosen mode says."""

from __future__ import annotations

import pytest
import torch

from geodiff4d.datasets.flame import FlameParams, rodrigues
from geodiff4d.recon.reenact import HEAD_POSES, reenact


def _random(model, frames: int, seed: int, scale: float) -> FlameParams:
    g = torch.Generator().manual_seed(seed)
    params = FlameParams.zeros(frames, model.n_shape, model.n_expr)
    params.shape = (torch.randn(1, model.n_shape, generator=g) * 1.5).expand(frames, -1).clone()
    params.expression = torch.randn(frames, model.n_expr, generator=g)
    params.rotation = torch.randn(frames, 3, generator=g) * 0.3
    params.neck = torch.randn(frames, 3, generator=g) * 0.05
    params.jaw[:, 0] = torch.rand(frames, generator=g) * 0.3
    params.eyes = torch.randn(frames, 6, generator=g) * 0.1
    params.translation = torch.randn(frames, 3, generator=g) * 0.05
    params.scale = torch.full((frames, 1), scale)
    return params


def _neutral(params: FlameParams) -> FlameParams:
    """Expression, jaw, eyes and neck at rest: what is left is identity and head placement."""
    neutral = params.with_zero_expression()
    neutral.neck = torch.zeros_like(neutral.neck)
    return neutral


@pytest.mark.parametrize("head_pose", HEAD_POSES)
def test_driver_of_another_shape_and_scale_moves_the_face_not_the_identity(head_model, head_pose):
    avatar, driver = _random(head_model, 3, seed=1, scale=1.0), _random(head_model, 5, seed=2, scale=1.3)
    driven = reenact(avatar, driver, head_pose)
    with torch.no_grad():
        # at the avatar's own placement, the neutral-expression mesh of every driven frame is the avatar's own
        at_own_pose = _neutral(driven)
        at_own_pose.rotation, at_own_pose.translation = (
            avatar.rotation[:1].expand(5, -1),
            avatar.translation[:1].expand(5, -1),
        )
        mesh = head_model(at_own_pose).vertices
        own = head_model(_neutral(avatar[[0] * 5])).vertices
        torch.testing.assert_close(mesh, own, rtol=0, atol=1e-6)
        # ... and not the driver's, which would have been used before (the test can fail)
        wrong = _neutral(driver)
        wrong.rotation, wrong.translation = at_own_pose.rotation, at_own_pose.translation
        assert float((head_model(wrong).vertices - own).abs().max()) > 1e-2
        # the expression follows the driver's, frame by frame
        for name in ("expression", "jaw", "eyes", "neck"):
            torch.testing.assert_close(getattr(driven, name), getattr(driver, name), rtol=0, atol=0)
        moved = head_model(driven).vertices - head_model(_neutral(driven)).vertices
        assert float(moved.abs().amax(dim=(1, 2)).min()) > 1e-3


def test_head_pose_modes(head_model):
    avatar, driver = _random(head_model, 2, seed=3, scale=0.9), _random(head_model, 4, seed=4, scale=1.2)
    absolute = reenact(avatar, driver, "driver")
    torch.testing.assert_close(absolute.rotation, driver.rotation)
    torch.testing.assert_close(absolute.translation, driver.translation)
    held = reenact(avatar, driver, "avatar")
    torch.testing.assert_close(held.rotation, avatar.rotation[:1].expand(4, -1))
    relative = reenact(avatar, driver, "relative")
    # frame 0 is the avatar's own pose; later frames turn the head as the driver's turned since its frame 0
    torch.testing.assert_close(relative.rotation[:1], avatar.rotation[:1], atol=1e-6, rtol=0)
    torch.testing.assert_close(relative.translation[:1], avatar.translation[:1], atol=1e-7, rtol=0)
    own_turn = rodrigues(relative.rotation[:1]).transpose(1, 2) @ rodrigues(relative.rotation)
    driver_turn = rodrigues(driver.rotation[:1]).transpose(1, 2) @ rodrigues(driver.rotation)
    torch.testing.assert_close(own_turn, driver_turn, atol=1e-5, rtol=0)

    # the root joint moves as the driver's did, in head units: same path in each head's frame, scaled
    def root_path(params):
        head_frame = rodrigues(params.rotation[:1])[0]
        return (params.translation - params.translation[:1]) @ head_frame / params.scale[:1]

    torch.testing.assert_close(root_path(relative), root_path(driver), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head pose"):
        reenact(avatar, driver, "sideways")

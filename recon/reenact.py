"""Reenactment: drive an avatar with another tracking while the avatar stays itself.

Only the driver's per-frame motion crosses over (expression, jaw, neck, eyes and, as chosen, head pose);
shape and scale are always the avatar's own, so a driver with another face or head size changes what the
avatar does, never who it is. (Our head model has no static offsets; the avatar's learned geometry, the
refinement networks, stays with the avatar as well.)
"""

from __future__ import annotations

import torch
from scipy.spatial.transform import Rotation

from geodiff4d.datasets.flame import FlameParams, rodrigues

HEAD_POSES = ("driver", "relative", "avatar")
"""driver: the driver's head pose and translation as tracked (self-reenactment, same rig and world);
relative: the driver's head motion relative to its first frame, applied to the avatar's own first pose;
avatar: the avatar's own first pose, held (expression only)."""


def reenact(avatar: FlameParams, driver: FlameParams, head_pose: str = "driver") -> FlameParams:
    """Per-frame parameters [T = driver frames] that drive the avatar (its first frame gives its identity and,
    for ``relative``/``avatar``, its pose) with the driver's motion."""
    if head_pose not in HEAD_POSES:
        raise ValueError(f"head pose must be one of {HEAD_POSES}, got {head_pose!r}")
    frames, own = driver.batch_size, avatar[:1]
    held = lambda value: value.expand(frames, -1).clone()  # noqa: E731
    if head_pose == "driver":
        rotation, translation = driver.rotation.clone(), driver.translation.clone()
    elif head_pose == "avatar":
        rotation, translation = held(own.rotation), held(own.translation)
    else:
        rotation, translation = _relative_motion(own, driver)
    return FlameParams(
        held(own.shape),
        driver.expression.clone(),
        rotation,
        driver.neck.clone(),
        driver.jaw.clone(),
        driver.eyes.clone(),
        translation,
        held(own.scale),
    )


def _relative_motion(own: FlameParams, driver: FlameParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The driver's head motion since its first frame, in its head's own frame, applied to the avatar's pose.

    The head turns about the root joint, which sits at ``scale * J + translation``; so the root's motion is
    ``translation_t - translation_0``, taken into head units (/ driver scale) and back out (x avatar scale).
    """
    to_avatar = rodrigues(own.rotation)[0] @ rodrigues(driver.rotation[:1])[0].T  # [3, 3] R_a0 R_d0^T
    rotations = to_avatar @ rodrigues(driver.rotation)  # [T, 3, 3] R_a0 R_d0^T R_dt
    rotation = torch.from_numpy(Rotation.from_matrix(rotations.double().numpy()).as_rotvec()).float()
    moved = (driver.translation - driver.translation[:1]) @ to_avatar.T  # [T, 3]
    translation = own.translation + moved * (own.scale / driver.scale[:1])
    return rotation, translation

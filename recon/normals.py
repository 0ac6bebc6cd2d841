"""Per-Gaussian normals: the shortest axis of the ellipsoid, flipped toward the camera.

The shortest axis of a Gaussian with rotation R and scales s is R's COLUMN for argmin(s) (R maps the
local axes to world; a column is the image of a local axis). Using the row instead is a classic bug that
only shows for non-symmetric rotations, which is why the test builds exactly such a case.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geodiff4d.recon.rotations import quat_to_rotmat


def shortest_axis(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space unit shortest axis [N, 3] of Gaussians with wxyz ``quats`` [N, 4], ``scales`` [N, 3]."""
    rotmats = quat_to_rotmat(quats)  # [N, 3, 3]
    smallest = scales.argmin(dim=-1)  # [N]
    return torch.gather(rotmats, 2, smallest[:, None, None].expand(-1, 3, 1)).squeeze(-1)  # column


def camera_normals(means: Tensor, quats: Tensor, scales: Tensor, world_to_cam: Tensor) -> Tensor:
    """Shortest axes flipped toward the camera, in the project convention (x right, y up, z toward camera).

    means [N, 3] world; world_to_cam [4, 4] OpenCV. Returns [N, 3] unit normals; a Gaussian facing the camera
    gets (0, 0, 1).
    """
    rotation, translation = world_to_cam[:3, :3], world_to_cam[:3, 3]
    axes_cam = shortest_axis(quats, scales) @ rotation.T  # [N, 3] OpenCV camera space
    means_cam = means @ rotation.T + translation  # [N, 3]
    # facing the camera: the normal points against the viewing ray (camera -> Gaussian = means_cam)
    flip = ((axes_cam * means_cam).sum(-1, keepdim=True) > 0).to(axes_cam.dtype)
    axes_cam = axes_cam * (1 - 2 * flip)
    return axes_cam * axes_cam.new_tensor([1.0, -1.0, -1.0])  # OpenCV -> ours

"""Quaternion <-> rotation-matrix conversions (wxyz, the convention of gsplat and the 3DGS PLY)."""

from __future__ import annotations

import torch
from torch import Tensor


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Unnormalized wxyz quaternions [..., 4] -> rotation matrices [..., 3, 3] (columns = rotated axes)."""
    w, x, y, z = torch.unbind(quats / quats.norm(dim=-1, keepdim=True), dim=-1)
    rows = [
        1 - 2 * (y * y + z * z),
        2 * (x * y - w * z),
        2 * (x * z + w * y),
        2 * (x * y + w * z),
        1 - 2 * (x * x + z * z),
        2 * (y * z - w * x),
        2 * (x * z - w * y),
        2 * (y * z + w * x),
        1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def rotmat_to_quat(rotmats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] -> unit wxyz quaternions [..., 4] with w >= 0.

    Shepperd's method: of the four algebraically equivalent formulas, each entry uses the one whose
    divisor is largest, so the result (and its gradient) stays finite for every rotation.
    """
    m = rotmats
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # 4 * component^2 for w, x, y, z; clamped so the square root has a finite gradient
    squares = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    )
    roots = torch.sqrt(squares.clamp_min(1e-8))  # [..., 4] = 2 * |component|
    candidates = torch.stack(
        [
            torch.stack([roots[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, roots[..., 1] ** 2, m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, roots[..., 2] ** 2, m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, roots[..., 3] ** 2], dim=-1),
        ],
        dim=-2,
    ) / (2 * roots[..., :, None])  # [..., 4 candidates, 4]
    best = squares.argmax(dim=-1)  # [...]
    quat = torch.gather(candidates, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    quat = quat / quat.norm(dim=-1, keepdim=True)
    return torch.where(quat[..., :1] < 0, -quat, quat)


def axis_angle_to_rotmat(axis_angle: Tensor) -> Tensor:
    """Rodrigues: axis-angle [..., 3] -> rotation matrices [..., 3, 3], smooth at zero."""
    theta2 = (axis_angle * axis_angle).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
    theta = torch.sqrt(theta2 + 1e-12)
    small = theta2 < 1e-8
    sin_over = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    one_minus_cos_over = torch.where(
        small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-12)
    )
    x, y, z = torch.unbind(axis_angle, dim=-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(
        axis_angle.shape[:-1] + (3, 3)
    )
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(skew)
    return eye + sin_over * skew + one_minus_cos_over * (skew @ skew)

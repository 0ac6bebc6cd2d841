"""Real spherical harmonics up to degree 3, evaluated the way 3DGS and gsplat do (colour = SH + 0.5)."""

from __future__ import annotations

import torch
from torch import Tensor

C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def n_coefficients(degree: int) -> int:
    return (degree + 1) ** 2


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Basis values [N, (degree+1)^2] for unit view directions ``dirs`` [N, 3]."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_degree must be in 0..3, got {degree}")
    x, y, z = torch.unbind(dirs, dim=-1)
    basis = [torch.full_like(x, C0)]
    if degree >= 1:
        basis += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        basis += [_C2[0] * xy, _C2[1] * yz, _C2[2] * (2 * zz - xx - yy), _C2[3] * xz, _C2[4] * (xx - yy)]
    if degree >= 3:
        basis += [
            _C3[0] * y * (3 * xx - yy),
            _C3[1] * xy * z,
            _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(basis, dim=-1)


def sh_to_rgb(coeffs: Tensor, degree: int, means: Tensor, camera_center: Tensor) -> Tensor:
    """SH coefficients [N, K>=(degree+1)^2, 3] -> view-dependent RGB [N, 3] seen from ``camera_center``."""
    dirs = means - camera_center
    dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = n_coefficients(degree)
    rgb = (sh_basis(degree, dirs)[:, :, None] * coeffs[:, :k]).sum(1)
    return torch.clamp_min(rgb + 0.5, 0.0)


def rgb_to_dc(rgb: Tensor) -> Tensor:
    """Degree-0 coefficient that renders as ``rgb``."""
    return (rgb - 0.5) / C0

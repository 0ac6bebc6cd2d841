"""Reconstruction losses: 0.8 L1 + 0.2 D-SSIM on RGB, the normal term, and the binding regularizers."""

from __future__ import annotations

import torch
from torch import Tensor


def _blur_matrix(n: int, size: int = 11, sigma: float = 1.5) -> Tensor:
    """[n, n] banded matrix applying a 1D Gaussian window with zero padding ('same' size)."""
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    offsets = torch.arange(n)[None, :] - torch.arange(n)[:, None] + (size - 1) // 2  # [n, n]
    inside = (offsets >= 0) & (offsets < size)
    return torch.where(inside, g[offsets.clamp(0, size - 1)], torch.zeros(()))


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of images [C, H, W] in [0, 1] (11x11 Gaussian window, sigma 1.5, zero 'same' padding as 3DGS).

    The separable window is applied as two banded matrix products: much faster on CPU than a depthwise conv.
    """
    rows, cols = _blur_matrix(a.shape[-2]).to(a), _blur_matrix(a.shape[-1]).to(a)

    def blur(t: Tensor) -> Tensor:
        return rows @ t @ cols.T

    mu_x, mu_y = blur(a), blur(b)
    var_x = blur(a * a) - mu_x**2
    var_y = blur(b * b) - mu_y**2
    cov = blur(a * b) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean()


def photometric_loss(pred: Tensor, target: Tensor) -> Tensor:
    """0.8 L1 + 0.2 (1 - SSIM), the 3DGS / GaussianAvatars image loss."""
    return 0.8 * (pred - target).abs().mean() + 0.2 * (1 - ssim(pred, target))


def normal_loss(rendered_normal: Tensor, alpha: Tensor, target_normal: Tensor, mask: Tensor) -> Tensor:
    """L1(n_hat, alpha * n) over the foreground ``mask`` [H, W]; n_hat is the alpha-weighted rendered normal."""
    diff = (rendered_normal - alpha[None] * target_normal).abs().sum(0)  # [H, W]
    return (diff * mask).sum() / mask.sum().clamp_min(1)


def position_regularizer(local_xyz: Tensor, threshold: float = 1.0) -> Tensor:
    """Penalize Gaussians drifting beyond ``threshold`` triangle sizes from their triangle (keeps the rig valid):
    GaussianAvatars' mean over Gaussians of relu(|local position| - threshold)."""
    return torch.relu(local_xyz.norm(dim=-1) - threshold).mean()


def scale_regularizer(log_scale: Tensor, threshold: float = 0.6) -> Tensor:
    """Penalize Gaussians larger than ``threshold`` triangle sizes (big ones smear under deformation):
    GaussianAvatars' mean over Gaussians of the norm over axes of relu(local scale - threshold)."""
    return torch.relu(torch.exp(log_scale) - threshold).norm(dim=-1).mean()


def psnr(pred: Tensor, target: Tensor) -> float:
    mse = float(((pred - target) ** 2).mean())
    return float("inf") if mse == 0 else -10.0 * float(torch.log10(torch.tensor(mse)))

"""PSNR and SSIM, batched in torch on CPU or GPU, with an optional foreground mask.

SSIM follows Wang et al. / scikit-image (``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``):
an 11x11 Gaussian window, statistics over the fully covered ("valid") region, channels averaged.
With a mask, PSNR averages the squared error over foreground pixels and SSIM averages its map over
foreground pixels of the valid region, so the background never rewards a method.
"""

from __future__ import annotations

import torch

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scipy's truncate=3.5 gives the 11x11 window
_C1, _C2 = 0.01**2, 0.03**2  # data range 1
PSNR_MSE_FLOOR = 1e-10  # identical images score 100 dB instead of inf, so means stay finite


def _check(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None) -> None:
    if pred.shape != gt.shape or pred.ndim < 3 or pred.shape[-3] != 3:
        raise ValueError(f"expected matching (..., 3, H, W) images, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    if mask is not None and mask.shape != pred.shape[:-3] + pred.shape[-2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match images {tuple(pred.shape)}")


def psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB of ``(..., 3, H, W)`` images in [0,1]; returns shape ``(...)``."""
    _check(pred, gt, mask)
    sq = (pred.float() - gt.float()) ** 2
    if mask is None:
        mse = sq.mean(dim=(-3, -2, -1))
    else:
        m = mask.float().unsqueeze(-3)  # [..., 1, H, W]
        mse = (sq * m).sum(dim=(-3, -2, -1)) / (3 * m.sum(dim=(-3, -2, -1))).clamp_min(1)
    return -10 * torch.log10(mse.clamp_min(PSNR_MSE_FLOOR))


def _gaussian_window() -> list[float]:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    w = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return (w / w.sum()).tolist()


def _blur_valid(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter without padding, as 11 shifted multiply-adds per axis (memory-bound,
    unlike a 1-channel conv2d, which CPU backends run slowly): [..., H, W] -> [..., H-10, W-10]."""
    n = 2 * SSIM_RADIUS + 1
    h, w = x.shape[-2] - n + 1, x.shape[-1] - n + 1
    weights = _gaussian_window()
    rows = sum(weights[k] * x[..., k:k + h, :] for k in range(n))
    return sum(weights[k] * rows[..., k:k + w] for k in range(n))


def ssim_map(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SSIM map over the valid region, channels averaged: (..., 3, H, W) -> (..., H-10, W-10)."""
    _check(pred, gt, None)
    lead, (h, w) = pred.shape[:-3], pred.shape[-2:]
    if min(h, w) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than 11x11, got {h}x{w}")
    x = pred.reshape(-1, h, w).float()  # [N*3, H, W]
    y = gt.reshape(-1, h, w).float()
    mu_x, mu_y, xx, yy, xy = _blur_valid(torch.stack([x, y, x * x, y * y, x * y]))  # 5 x [N*3, H-10, W-10]
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + _C1) * (2 * cov + _C2)) / ((mu_x**2 + mu_y**2 + _C1) * (var_x + var_y + _C2))
    s = s.reshape(*lead, 3, h - 2 * SSIM_RADIUS, w - 2 * SSIM_RADIUS).mean(dim=-3)
    return s.float()


def ssim(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM of ``(..., 3, H, W)`` images in [0,1]; returns shape ``(...)``."""
    _check(pred, gt, mask)
    s = ssim_map(pred, gt)
    if mask is None:
        return s.mean(dim=(-2, -1))
    r = SSIM_RADIUS
    m = mask[..., r:-r, r:-r].float()
    return (s * m).sum(dim=(-2, -1)) / m.sum(dim=(-2, -1)).clamp_min(1)

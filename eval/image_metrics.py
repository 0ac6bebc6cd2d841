"""PSNR and SSIM, batched in torch on CPU or GPU, with an optional foreground mask.

SSIM follows Wang et al. / scikit-image (``gaussian_weights=True, sigma=1.5, use_sample_covariance=False``):
an 11x11 Gaussian window, statistics over the fully covered ("valid") region, channels averaged.
With a mask, PSNR averages the squared error over foreground pixels and SSIM averages its map over
foreground pixels of the valid region, so the background never rewards a method; an empty mask gives NaN.
"""

from __future__ import annotations

import torch

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scipy's truncate=3.5 gives the 11x11 window
_C1, _C2 = 0.01**2, 0.03**2  # data range 1
PSNR_MSE_FLOOR = 1e-10  # identical images score 100 dB instead of inf, so means stay finite


def _check(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None) -> None:
    if pred.shape != gt.shape or pred.ndim < 3 or pred.shape[-3] != 3:
        raise ValueError(
            f"expected matching (..., 3, H, W) images, got {tuple(pred.shape)} and {tuple(gt.shape)}"
        )
    if mask is not None and mask.shape != pred.shape[:-3] + pred.shape[-2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match images {tuple(pred.shape)}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Mean of ``values`` weighted by ``mask`` (same shape) over ``dims``; NaN where the mask is empty: a frame
    with no foreground has nothing to score, and must not count as a perfect one."""
    total = mask.sum(dim=dims)
    return (values * mask).sum(dim=dims) / total.where(total > 0, torch.nan)


def psnr(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image PSNR in dB of ``(..., 3, H, W)`` images in [0,1]; returns shape ``(...)``."""
    _check(pred, gt, mask)
    sq = (pred.float() - gt.float()) ** 2
    if mask is None:
        mse = sq.mean(dim=(-3, -2, -1))
    else:
        m = mask.float().unsqueeze(-3).expand_as(sq)  # [..., 3, H, W]
        mse = masked_mean(sq, m, (-3, -2, -1))
    return -10 * torch.log10(mse.clamp_min(PSNR_MSE_FLOOR))


def _gaussian_window() -> list[float]:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    w = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return (w / w.sum()).tolist()


_WINDOW = _gaussian_window()


def _blur_valid(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter without padding: [P, H, W] -> [P, H-10, W-10].

    Eleven in-place multiply-adds of shifted views per axis: no temporaries, and on a CPU a 1-channel
    ``conv2d``/``conv1d`` runs about 10x slower than this (measured in bench/bench_eval.py's history).
    """
    n = 2 * SSIM_RADIUS + 1
    h, w = x.shape[-2] - n + 1, x.shape[-1] - n + 1
    rows = x[:, :h, :] * _WINDOW[0]
    for k in range(1, n):
        rows.add_(x[:, k : k + h, :], alpha=_WINDOW[k])
    out = rows[:, :, :w] * _WINDOW[0]
    for k in range(1, n):
        out.add_(rows[:, :, k : k + w], alpha=_WINDOW[k])
    return out


def _ssim_planes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM maps of single-channel planes: [P, H, W] x2 -> [P, H-10, W-10], float32."""
    mu_x, mu_y = _blur_valid(x), _blur_valid(y)
    xx, yy, xy = _blur_valid(x * x), _blur_valid(y * y), _blur_valid(x * y)
    mu_xy = mu_x * mu_y
    mu_xx, mu_yy = mu_x.square_(), mu_y.square_()
    numerator = (2 * mu_xy + _C1) * (2 * (xy - mu_xy) + _C2)
    denominator = (mu_xx + mu_yy + _C1) * (xx - mu_xx + yy - mu_yy + _C2)
    return numerator.div_(denominator)


def ssim_map(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SSIM map over the valid region, channels averaged: (..., 3, H, W) -> (..., H-10, W-10).

    On a CPU the planes go one at a time so the ~10 plane-sized intermediates stay in cache (5x the
    throughput of one batched pass at 512 px); a GPU takes the whole batch in one pass.
    """
    _check(pred, gt, None)
    lead, (h, w) = pred.shape[:-3], pred.shape[-2:]
    if min(h, w) <= 2 * SSIM_RADIUS:
        raise ValueError(f"SSIM needs images larger than 11x11, got {h}x{w}")
    x = pred.reshape(-1, h, w).float()  # [N*3, H, W]
    y = gt.reshape(-1, h, w).float()
    step = len(x) if x.is_cuda else 1
    s = torch.cat([_ssim_planes(x[i : i + step], y[i : i + step]) for i in range(0, len(x), step)])
    return s.reshape(*lead, 3, h - 2 * SSIM_RADIUS, w - 2 * SSIM_RADIUS).mean(dim=-3)


def ssim(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image SSIM of ``(..., 3, H, W)`` images in [0,1]; returns shape ``(...)``."""
    _check(pred, gt, mask)
    s = ssim_map(pred, gt)
    if mask is None:
        return s.mean(dim=(-2, -1))
    r = SSIM_RADIUS
    m = mask[..., r:-r, r:-r].float()
    return masked_mean(s, m, (-2, -1))

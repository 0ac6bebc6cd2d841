"""Front-to-back alpha blending of padded per-tile Gaussian lists, with a hand-written backward.

Autograd through the blending chain stores a dozen [tiles, depth, pixels] tensors and runs as many kernels
backward; this Function keeps two (alpha and the blending weight) and computes the gradient in closed form:
for pixel p and the k-th Gaussian of its list, with s_k = v_k . dL/dout(p) and weights w_j = alpha_j T_j,

    dL/dalpha_k = T_k s_k - (sum_{j>k} w_j s_j) / (1 - alpha_k)

(the suffix sum is a reversed cumulative sum), then chains through alpha = o exp(-sigma) to the means,
conics and opacities. Semantics match gsplat: alpha <= 0.999, skipped below 1/255, a pixel stops before its
transmittance would reach 1e-4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4


def _offsets(mean_x: Tensor, mean_y: Tensor, px: Tensor, py: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel offsets dx [T, K, 1, S] and dy [T, K, S, 1] of an S x S tile (rows y, columns x)."""
    return (mean_x[..., None] - px)[..., None, :], (mean_y[..., None] - py)[..., :, None]


def tile_alpha(mean_x, mean_y, conic, opacity, valid, px, py) -> tuple[Tensor, Tensor]:
    dx, dy = _offsets(mean_x, mean_y, px, py)
    a, b, c = (conic[..., i, None, None] for i in range(3))
    sigma = (0.5 * a * dx * dx + 0.5 * c * dy * dy + b * dx * dy).flatten(2)  # [T, K, S*S]
    alpha = torch.clamp_max(opacity[..., None] * torch.exp(-sigma), ALPHA_MAX)
    keep = (sigma >= 0) & (alpha >= ALPHA_MIN) & valid[..., None]
    return torch.where(keep, alpha, 0.0), sigma


def _blend_forward(mean_x, mean_y, conic, opacity, values, valid, px, py) -> tuple[Tensor, Tensor, Tensor]:
    """-> (blended [T, S*S, C], alpha and weight [T, K, S*S] for the backward)."""
    alpha, _ = tile_alpha(mean_x, mean_y, conic, opacity, valid, px, py)
    log_keep = torch.log1p(-alpha)
    inclusive = torch.cumsum(log_keep, 1)
    alive = inclusive > math.log(T_MIN)
    weight = torch.where(alive, alpha * torch.exp(inclusive - log_keep), 0.0)
    return torch.bmm(weight.transpose(1, 2), values), alpha, weight


def _blend_backward(grad_out, mean_x, mean_y, conic, opacity, values, px, py, alpha, weight):
    """Closed-form gradients (see the module docstring) w.r.t. mean_x, mean_y, conic, opacity, values."""
    grad_values = torch.bmm(weight, grad_out)  # [T, K, C]
    s = torch.bmm(values, grad_out.transpose(1, 2))  # [T, K, S*S]
    ws = weight * s
    later = ws.sum(1, keepdim=True) - torch.cumsum(ws, 1)  # sum over j > k
    safe_alpha = torch.where(alpha > 0, alpha, 1.0)
    transmittance = weight / safe_alpha  # T_k where alive, else 0
    grad_alpha = transmittance * s - later / (1 - alpha)
    # alpha = o exp(-sigma) where kept and not clamped: d/do = alpha / o, d/dsigma = -alpha
    smooth = (alpha > 0) & (alpha < ALPHA_MAX)
    grad_alpha = torch.where(smooth, grad_alpha, 0.0)
    grad_opacity = (grad_alpha * alpha).sum(-1) / opacity
    grad_sigma = -(grad_alpha * alpha)  # [T, K, S*S]
    size = px.shape[-1]
    grad_sigma = grad_sigma.unflatten(-1, (size, size))  # [T, K, S, S] rows, columns
    dx, dy = _offsets(mean_x, mean_y, px, py)
    a, b, c = (conic[..., i, None, None] for i in range(3))
    grad_x = (grad_sigma * (a * dx + b * dy)).sum((-1, -2))
    grad_y = (grad_sigma * (c * dy + b * dx)).sum((-1, -2))
    grad_conic = torch.stack(
        [
            (grad_sigma * (0.5 * dx * dx)).sum((-1, -2)),
            (grad_sigma * (dx * dy)).sum((-1, -2)),
            (grad_sigma * (0.5 * dy * dy)).sum((-1, -2)),
        ],
        dim=-1,
    )
    return grad_x, grad_y, grad_conic, grad_opacity, grad_values


class BlendTiles(torch.autograd.Function):
    """(mean_x, mean_y [T,K], conic [T,K,3] = inverse cov (xx, xy, yy), opacity [T,K], values [T,K,C],
    valid [T,K] bool, px [T,1,S], py [T,1,S]) -> blended values [T, S*S, C]."""

    @staticmethod
    def forward(ctx, mean_x, mean_y, conic, opacity, values, valid, px, py):
        out, alpha, weight = _blend_forward(mean_x, mean_y, conic, opacity, values, valid, px, py)
        ctx.save_for_backward(mean_x, mean_y, conic, opacity, values, px, py, alpha, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_blend_backward(grad_out, *ctx.saved_tensors), None, None, None)


def _gather(means2d, conic, opacity, values, g, valid):
    opacity_g = torch.where(valid, opacity[g], 1.0)  # padding slots: no division by 0
    return means2d[g, 0], means2d[g, 1], conic[g], opacity_g, values[g]


class BlendGathered(torch.autograd.Function):
    """:class:`BlendTiles` fed per-Gaussian tensors (means2d [N,2], conic [N,3], opacity [N], values [N,C])
    and each slot's Gaussian g [T,K]: it gathers them itself, so its backward scatters every gradient with
    one ``index_add_`` instead of autograd's sort-based backward of five separate gathers."""

    @staticmethod
    def forward(ctx, means2d, conic, opacity, values, g, valid, px, py):
        gathered = _gather(means2d, conic, opacity, values, g, valid)
        out, alpha, weight = _blend_forward(*gathered, valid, px, py)
        ctx.save_for_backward(means2d, conic, opacity, values, g, valid, px, py, alpha, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        means2d, conic, opacity, values, g, valid, px, py, alpha, weight = ctx.saved_tensors
        gx, gy, g_conic, g_opacity, g_values = _blend_backward(
            grad_out, *_gather(means2d, conic, opacity, values, g, valid), px, py, alpha, weight
        )
        per_slot = torch.cat([gx[..., None], gy[..., None], g_conic, g_opacity[..., None], g_values], -1)
        per_slot = torch.where(valid[..., None], per_slot, 0.0)  # [T, K, 6 + C]
        total = per_slot.new_zeros(means2d.shape[0], per_slot.shape[-1])
        total.index_add_(0, g.reshape(-1), per_slot.reshape(-1, per_slot.shape[-1]))
        return total[:, :2], total[:, 2:5], total[:, 5], total[:, 6:], None, None, None, None


def blend_tiles_reference(mean_x, mean_y, conic, opacity, values, valid, px, py) -> Tensor:
    """The same blending through plain autograd (for tests and as the readable definition)."""
    alpha, _ = tile_alpha(mean_x, mean_y, conic, opacity, valid, px, py)
    log_keep = torch.log1p(-alpha)
    inclusive = torch.cumsum(log_keep, 1)
    alive = inclusive.detach() > math.log(T_MIN)
    weight = torch.where(alive, alpha * torch.exp(inclusive - log_keep), 0.0)
    return torch.einsum("tkp,tkc->tpc", weight, values)

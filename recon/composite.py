"""Per-pixel front-to-back compositing of depth-sorted tile lists, compiled with numba (the CPU fast path).

The dense compositor (:mod:`geodiff4d.recon.blend`) pads every tile's list to the longest of its group and
evaluates every (tile, slot, pixel) triple, skipped or saturated ones included, through a dozen tensor
kernels. Here each pixel walks its tile's list as the CUDA rasterizers do: Gaussians below 1/255 cost a
few flops, and the walk stops where the transmittance would drop to 1e-4. The backward pass walks the same
list again (recomputing alpha and transmittance, no division by 1 - alpha) and then back to front with the
closed-form gradient of :mod:`geodiff4d.recon.blend`:

    dL/dalpha_k = T_k s_k - (sum_{j>k} w_j s_j) / (1 - alpha_k),   s_k = v_k . dL/dout,  w_k = alpha_k T_k.

Gradients are summed per (tile, Gaussian) pair, then added into their Gaussians (so a loop over tiles has no
write races). The kernels run on one thread; a fit's other cores go to torch's ops and to other Ray actors. Semantics are the dense compositor's and gsplat's (alpha <= 0.999, skipped
below 1/255, stop before the transmittance reaches 1e-4); tests hold the two to float64 precision.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from geodiff4d.recon.blend import ALPHA_MAX, ALPHA_MIN, T_MIN


@numba.njit(cache=True, inline="always")
def _alpha(mean_x, mean_y, a, b, c, opacity, px, py):
    """(alpha, dx, dy) of one Gaussian at one pixel; alpha 0 where it is skipped."""
    dx, dy = mean_x - px, mean_y - py
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    if sigma < 0:
        return 0.0, dx, dy
    alpha = min(opacity * math.exp(-sigma), ALPHA_MAX)
    return (alpha if alpha >= ALPHA_MIN else 0.0), dx, dy


@numba.njit(cache=True)
def _forward_kernel(
    tile_start, tile_count, gauss, means2d, conic, opacity, values, tiles_x, tile, out, n_used
):
    """out [H, W, C] (zeros on entry) and n_used [H, W]: list entries each pixel walked before stopping."""
    height, width, channels = out.shape
    for t in range(tile_start.shape[0]):
        start, count = tile_start[t], tile_count[t]
        x0, y0 = (t % tiles_x) * tile, (t // tiles_x) * tile
        for py in range(y0, min(y0 + tile, height)):
            for px in range(x0, min(x0 + tile, width)):
                transmittance, used = 1.0, 0
                for k in range(count):
                    g = gauss[start + k]
                    alpha, _, _ = _alpha(
                        means2d[g, 0],
                        means2d[g, 1],
                        conic[g, 0],
                        conic[g, 1],
                        conic[g, 2],
                        opacity[g],
                        px,
                        py,
                    )
                    if alpha == 0.0:
                        continue
                    after = transmittance * (1.0 - alpha)
                    if after <= T_MIN:
                        break
                    weight = alpha * transmittance
                    for ch in range(channels):
                        out[py, px, ch] += weight * values[g, ch]
                    transmittance = after
                    used = k + 1
                n_used[py, px] = used


@numba.njit(cache=True)
def _backward_kernel(
    tile_start, tile_count, gauss, means2d, conic, opacity, values, tiles_x, tile, n_used, grad_out, pair_grad
):
    """pair_grad [P, 6 + C] (zeros on entry) per list entry: d mean_x, d mean_y, d conic (xx, xy, yy),
    d opacity, d values."""
    height, width, channels = grad_out.shape
    for t in range(tile_start.shape[0]):
        start, count = tile_start[t], tile_count[t]
        x0, y0 = (t % tiles_x) * tile, (t // tiles_x) * tile
        alphas = np.empty(count)
        before = np.empty(count)  # transmittance in front of each entry
        for py in range(y0, min(y0 + tile, height)):
            for px in range(x0, min(x0 + tile, width)):
                used = n_used[py, px]
                transmittance = 1.0
                for k in range(used):
                    g = gauss[start + k]
                    alpha, _, _ = _alpha(
                        means2d[g, 0],
                        means2d[g, 1],
                        conic[g, 0],
                        conic[g, 1],
                        conic[g, 2],
                        opacity[g],
                        px,
                        py,
                    )
                    alphas[k], before[k] = alpha, transmittance
                    transmittance *= 1.0 - alpha
                later = 0.0  # sum over j > k of w_j s_j
                for k in range(used - 1, -1, -1):
                    alpha = alphas[k]
                    if alpha == 0.0:
                        continue
                    g, row = gauss[start + k], start + k
                    weight = alpha * before[k]
                    s = 0.0
                    for ch in range(channels):
                        s += values[g, ch] * grad_out[py, px, ch]
                        pair_grad[row, 6 + ch] += weight * grad_out[py, px, ch]
                    grad_alpha = before[k] * s - later / (1.0 - alpha)
                    later += weight * s
                    if alpha >= ALPHA_MAX:  # clamped: no gradient through the Gaussian's shape
                        continue
                    a, b, c = conic[g, 0], conic[g, 1], conic[g, 2]
                    dx, dy = means2d[g, 0] - px, means2d[g, 1] - py
                    grad_sigma = -grad_alpha * alpha  # alpha = o exp(-sigma)
                    pair_grad[row, 0] += grad_sigma * (a * dx + b * dy)
                    pair_grad[row, 1] += grad_sigma * (c * dy + b * dx)
                    pair_grad[row, 2] += grad_sigma * 0.5 * dx * dx
                    pair_grad[row, 3] += grad_sigma * dx * dy
                    pair_grad[row, 4] += grad_sigma * 0.5 * dy * dy
                    pair_grad[row, 5] += grad_alpha * alpha / opacity[g]


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class CompositeTiles(torch.autograd.Function):
    """(means2d [N, 2], conic [N, 3] (xx, xy, yy), opacity [N], values [N, C], tile lists) -> [H, W, C].

    Tile lists: ``gauss`` [P] Gaussian of each entry, grouped by tile and front to back within a tile;
    ``tile_start`` / ``tile_count`` [tiles] where each tile's entries sit; tiles row-major, ``tiles_x`` per row.
    """

    @staticmethod
    def forward(
        ctx, means2d, conic, opacity, values, tile_start, tile_count, gauss, tiles_x, tile, width, height
    ):
        lists = tuple(_numpy(t) for t in (tile_start, tile_count, gauss))
        attributes = tuple(_numpy(t) for t in (means2d, conic, opacity, values))
        out = np.zeros((height, width, values.shape[1]), dtype=attributes[3].dtype)
        n_used = np.zeros((height, width), dtype=np.int64)
        _forward_kernel(*lists, *attributes, tiles_x, tile, out, n_used)
        ctx.save_for_backward(means2d, conic, opacity, values, tile_start, tile_count, gauss)
        ctx.n_used, ctx.tiles_x, ctx.tile = n_used, tiles_x, tile
        return torch.from_numpy(out)

    @staticmethod
    def backward(ctx, grad_out):
        means2d, conic, opacity, values, tile_start, tile_count, gauss = ctx.saved_tensors
        attributes = tuple(_numpy(t) for t in (means2d, conic, opacity, values))
        pair_grad = np.zeros((gauss.shape[0], 6 + values.shape[1]), dtype=attributes[3].dtype)
        _backward_kernel(
            _numpy(tile_start),
            _numpy(tile_count),
            _numpy(gauss),
            *attributes,
            ctx.tiles_x,
            ctx.tile,
            ctx.n_used,
            _numpy(grad_out.to(values.dtype)),
            pair_grad,
        )
        total = values.new_zeros(means2d.shape[0], pair_grad.shape[1])
        total.index_add_(0, gauss, torch.from_numpy(pair_grad))  # [N, 6 + C]
        return (
            total[:, :2],
            total[:, 2:5],
            total[:, 5],
            total[:, 6:],
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def composite_tiles(
    means2d, conic, opacity, values, tile_start, tile_count, gauss, tiles_x, tile, width, height
):
    """Blend the tile lists into an image [H, W, C] (differentiable in the first four arguments)."""
    return CompositeTiles.apply(
        means2d, conic, opacity, values, tile_start, tile_count, gauss, tiles_x, tile, width, height
    )

"""CPU Gaussian renderer speed: our torch backend (compiled per-pixel compositing) and its pure-PyTorch
padded-tensor variant (``torch-dense``) against a naive tiled compositor, all in the same run.

The naive reference is the baseline the CPU renderer's speed is stated against: a Python loop over 16x16 tiles, each
gathering its depth-sorted Gaussians and blending them densely with a cumulative product, autograd for the
backward. It is a fair, if anything flattering, baseline: it blends 3 channels where ours blend 8 (RGB,
normal, depth, alpha), and its 3-sigma boxes are no larger than our opacity-aware ones; it lacks only the
early termination that every real rasterizer has. Prints forward and backward times, wall and process CPU
(the CPU time is what to compare on a shared machine: it does not count the time others hold the cores),
the ratios, and peak memory (RSS). On CUDA it adds gsplat's frames/s.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time

import torch

from geodiff4d.recon.blend import ALPHA_MAX, ALPHA_MIN
from geodiff4d.recon.rasterize import project_gaussians, render_gaussians
from geodiff4d.recon.rotations import axis_angle_to_rotmat


def head_like_scene(n: int, seed: int = 0, device: str = "cpu"):
    """N Gaussians on an ellipsoid shell (a head-sized blob) seen from 1 m."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, 3, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    means = dirs * torch.tensor([0.08, 0.11, 0.09])
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.randn(n, 3, generator=g) * 0.3) * 0.004 * math.sqrt(10000 / n)
    opacities = torch.rand(n, generator=g) * 0.8 + 0.1
    colors = torch.rand(n, 3, generator=g)
    w2c = torch.eye(4)
    w2c[:3, :3] = axis_angle_to_rotmat(torch.tensor([0.0, 0.3, 0.0]))
    w2c[2, 3] = 0.6
    tensors = [t.to(device) for t in (means, quats, scales, opacities, colors, w2c)]
    return tensors


def naive_tiled(means, quats, scales, opacities, colors, w2c, K, width, height, tile=16):
    """Reference: loop over tiles; per tile dense [G, pixels] alphas and a cumprod over depth."""
    means2d, cov2d, depth = project_gaussians(means, quats, scales, w2c, K, width, height)
    conic = torch.linalg.inv(cov2d)
    radius = 3 * torch.sqrt(torch.linalg.eigvalsh(cov2d.detach())[:, 1])
    order = torch.argsort(depth.detach())
    means2d, conic, radius, opacities, colors = (
        means2d[order],
        conic[order],
        radius[order],
        opacities[order],
        colors[order],
    )
    in_front = depth.detach()[order] > 0.01
    rows = []
    for ty in range(0, height, tile):
        row = []
        for tx in range(0, width, tile):
            m = means2d.detach()
            hit = (
                in_front
                & (m[:, 0] + radius >= tx)
                & (m[:, 0] - radius < tx + tile)
                & (m[:, 1] + radius >= ty)
                & (m[:, 1] - radius < ty + tile)
            )
            ys, xs = torch.meshgrid(torch.arange(ty, ty + tile), torch.arange(tx, tx + tile), indexing="ij")
            d = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)[None] - means2d[hit][:, None]  # [G, P, 2]
            c = conic[hit]
            sigma = 0.5 * torch.einsum("gpi,gij,gpj->gp", d, c, d)
            alpha = torch.clamp_max(opacities[hit][:, None] * torch.exp(-sigma), ALPHA_MAX)
            alpha = alpha * (alpha >= ALPHA_MIN)
            T = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1 - alpha[:-1]]), 0)
            row.append(torch.einsum("gp,gc->cp", alpha * T, colors[hit]).reshape(3, tile, tile))
        rows.append(torch.cat(row, -1))
    return torch.cat(rows, -2)


def timed(fn, repeats: int) -> dict[str, float]:
    """Best of ``repeats`` forward and backward times: wall clock and this process's CPU time."""
    times: dict[str, list[float]] = {"fwd": [], "bwd": [], "fwd_cpu": [], "bwd_cpu": []}
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = fn()
        w1, c1 = time.perf_counter(), time.process_time()
        loss.backward()
        times["fwd"].append(w1 - w0)
        times["bwd"].append(time.perf_counter() - w1)
        times["fwd_cpu"].append(c1 - c0)
        times["bwd_cpu"].append(time.process_time() - c1)
    return {key: min(values) for key, values in times.items()}


def report(name: str, t: dict[str, float], n: int, size: int) -> None:
    print(
        f"{name:<14} N={n} {size}px: forward {t['fwd']:.3f} s, backward {t['bwd']:.3f} s wall; "
        f"forward {t['fwd_cpu']:.3f} s, backward {t['bwd_cpu']:.3f} s CPU"
    )


def speedup(name: str, ours: dict[str, float], naive: dict[str, float]) -> None:
    for clock, suffix in (("wall", ""), ("CPU", "_cpu")):
        f, b = naive["fwd" + suffix] / ours["fwd" + suffix], naive["bwd" + suffix] / ours["bwd" + suffix]
        both = (naive["fwd" + suffix] + naive["bwd" + suffix]) / (ours["fwd" + suffix] + ours["bwd" + suffix])
        print(
            f"speed-up of {name} over naive ({clock}): forward x{f:.1f}, backward x{b:.1f}, fwd+bwd x{both:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--render-n", type=int, default=100000)
    parser.add_argument("--render-size", type=int, default=512)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch (and numba) threads for every variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at the start {os.getloadavg()}, {args.threads} thread(s)")
    means, quats, scales, opacities, colors, w2c = head_like_scene(args.n)
    f = 1.2 * args.size / (2 * 0.25)
    K = torch.tensor([[f, 0, (args.size - 1) / 2], [0, f, (args.size - 1) / 2], [0, 0, 1.0]])
    params = [t.requires_grad_() for t in (means, quats, scales, opacities, colors)]

    def ours(backend: str):
        return lambda: render_gaussians(*params, w2c, K, args.size, args.size, backend=backend).rgb.sum()

    def naive():
        return naive_tiled(*params, w2c, K, args.size, args.size).sum()

    ours(backend="torch")().backward()  # warm-up: loads (or, on first use, compiles) the numba kernels
    results = {backend: timed(ours(backend), args.repeats) for backend in ("torch", "torch-dense")}
    for backend, t in results.items():
        report(backend, t, args.n, args.size)
    if not args.skip_naive:
        naive_times = timed(naive, 1)
        report("naive tiled", naive_times, args.n, args.size)
        for backend, t in results.items():
            speedup(backend, t, naive_times)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    # render-only frames/s at the paper's size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scene = head_like_scene(args.render_n, seed=1, device=device)
    f = 1.2 * args.render_size / (2 * 0.25)
    Kr = torch.tensor(
        [[f, 0, (args.render_size - 1) / 2], [0, f, (args.render_size - 1) / 2], [0, 0, 1.0]], device=device
    )
    backends = ["torch"] + (["gsplat"] if device == "cuda" else [])
    for backend in backends:
        with torch.no_grad():
            render_gaussians(*scene[:5], scene[5], Kr, args.render_size, args.render_size, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
            t0, frames = time.perf_counter(), 0
            while time.perf_counter() - t0 < 3.0 or frames < 2:
                render_gaussians(
                    *scene[:5], scene[5], Kr, args.render_size, args.render_size, backend=backend
                )
                if device == "cuda":
                    torch.cuda.synchronize()
                frames += 1
            fps = frames / (time.perf_counter() - t0)
        print(f"render {backend} N={args.render_n} {args.render_size}px on {device}: {fps:.2f} frames/s")
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()

"""GaussianAvatars' adaptive density control for FLAME-bound Gaussians (from its paper, code and 3DGS's).

Statistics, per Gaussian over the views that saw it since the last densification: the mean norm of the
view-space positional gradient in normalized device coordinates (what the 3DGS rasterizer differentiates:
x_ndc = (2 x_px + 1) / W - 1, so dL/dx_ndc = W/2 dL/dx_px), and its largest screen radius.

Every ``densify_every`` steps after ``densify_from`` until ``densify_until`` (GaussianAvatars' schedule in
proportion to the run, at least 3DGS's intervals), Gaussians whose mean gradient
reaches the threshold (2e-4) grow: those larger than ``percent_dense`` of the camera extent (world scale: the
log-scale times the triangle's size) split into two smaller children, the others clone. Then transparent
ones (opacity < 0.005) are pruned and, from the first opacity reset on, large ones (screen radius > 20 px or
world scale > 0.1 extent); no face loses its last Gaussian (:func:`geodiff4d.recon.binding.prune`).
Every ``opacity_reset_every`` steps opacities are clamped to 0.01, so Gaussians that are not needed fade
out and get pruned.

One deliberate difference: 3DGS (and so GaussianAvatars) zeroes the screen radii while densifying, just
before it prunes on them, so its screen-size test never fires; here children inherit their parent's radius
and the test does what it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from geodiff4d.recon.binding import Regrowth, densify
from geodiff4d.recon.gaussians import BoundGaussians

if TYPE_CHECKING:
    from geodiff4d.recon.fit import FitConfig, View
    from geodiff4d.recon.rasterize import GaussianRender

PAPER_STEPS = 600_000  # GaussianAvatars' schedule below is for this many steps
PAPER_SCHEDULE = {
    "densify_from": 10_000,
    "densify_every": 2_000,
    "densify_until": 600_000,
    "opacity_reset_every": 60_000,
}
# Scaled down to a short run, that schedule would densify every few steps on statistics of a few views and
# reset opacities with too few steps left to recover: 3DGS's own schedule (30k steps) is the floor.
SHORT_RUN_FLOOR = {
    "densify_from": 500,
    "densify_every": 100,
    "densify_until": 0,
    "opacity_reset_every": 3_000,
}
RESET_OPACITY = 0.01


@dataclass
class Schedule:
    densify_from: int
    densify_every: int
    densify_until: int
    opacity_reset_every: int

    def densifies(self, step: int) -> bool:
        """GaussianAvatars densifies at steps strictly after ``densify_from`` and before ``densify_until``."""
        return self.densify_from < step < self.densify_until and step % self.densify_every == 0

    def resets_opacity(self, step: int) -> bool:
        return step < self.densify_until and step % self.opacity_reset_every == 0

    def prunes_large(self, step: int) -> bool:
        return step > self.opacity_reset_every


def schedule(config: FitConfig) -> Schedule | None:
    """The run's schedule, None when off. Fields left None scale GaussianAvatars' schedule with ``config.steps``,
    never below 3DGS's intervals (SHORT_RUN_FLOOR)."""
    enabled = config.adaptive_control
    if enabled is None:
        enabled = config.steps >= config.adaptive_min_steps
    if not enabled:
        return None
    values = {}
    for name, paper in PAPER_SCHEDULE.items():
        value = getattr(config, name)
        scaled = max(SHORT_RUN_FLOOR[name], round(config.steps * paper / PAPER_STEPS))
        values[name] = value if value is not None else scaled
    return Schedule(**values)


def camera_extent(views: list[View]) -> float:
    """3DGS's scene extent: 1.1 x the largest distance of a camera centre from their mean. With a single
    camera position (monocular) that is 0; the camera's distance from the origin (the head) stands in."""
    centers = torch.stack([-v.world_to_cam[:3, :3].T @ v.world_to_cam[:3, 3] for v in views])  # [V, 3]
    radius = float((centers - centers.mean(0)).norm(dim=-1).max())
    return 1.1 * (radius if radius > 1e-6 else float(centers[0].norm()))


class DensityStatistics:
    """Accumulated view-space gradients and screen radii of the current set (reset after each densification)."""

    def __init__(self, n: int):
        self.grad_sum = torch.zeros(n)
        self.count = torch.zeros(n)
        self.max_radii = torch.zeros(n)

    def add(self, render: GaussianRender, width: int, height: int) -> None:
        """Record one rendered view; ``render.means2d`` had ``retain_grad()`` and the loss has been backpropagated."""
        visible = render.visible.cpu()
        if render.means2d.grad is not None:
            to_ndc = torch.tensor([width / 2, height / 2])
            grad = render.means2d.grad.detach().cpu() * to_ndc  # [N, 2] dL/d(ndc)
            self.grad_sum += grad.norm(dim=-1) * visible
            self.count += visible.float()
        self.max_radii = torch.maximum(self.max_radii, render.radii.detach().cpu() * visible)

    def mean_grad(self) -> Tensor:
        return self.grad_sum / self.count.clamp_min(1)


def world_scale(gaussians: BoundGaussians, face_size: Tensor) -> Tensor:
    """Largest world-space axis [N] of each Gaussian on triangles of sizes ``face_size`` [F]."""
    return torch.exp(gaussians.log_scale.detach().amax(dim=-1)) * face_size[gaussians.face_index]


def grow(
    gaussians: BoundGaussians,
    statistics: DensityStatistics,
    face_size: Tensor,
    extent: float,
    config: FitConfig,
    generator: torch.Generator,
) -> Regrowth:
    """Clone the small and split the large among the Gaussians whose mean gradient reaches the threshold."""
    selected = statistics.mean_grad() >= config.densify_grad_threshold
    large = world_scale(gaussians, face_size) > config.percent_dense * extent
    return densify(gaussians, selected & ~large, selected & large, generator)


def prune_mask(
    gaussians: BoundGaussians,
    max_radii: Tensor,
    face_size: Tensor,
    extent: float,
    config: FitConfig,
    large_too: bool,
) -> Tensor:
    """[N] bool: transparent Gaussians and, with ``large_too``, the ones large on screen or in the world."""
    remove = gaussians.opacity.detach() < config.prune_opacity
    if large_too:
        remove |= max_radii > config.prune_screen_radius
        remove |= world_scale(gaussians, face_size) > config.prune_world_scale * extent
    return remove


def reset_opacity(gaussians: BoundGaussians, optimizer: torch.optim.Optimizer) -> None:
    """Clamp every opacity to at most 0.01 and forget its Adam moments (as 3DGS replaces the tensor)."""
    with torch.no_grad():
        gaussians.opacity_logit.clamp_max_(float(torch.logit(torch.tensor(RESET_OPACITY))))
    state = optimizer.state.get(gaussians.opacity_logit, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].zero_()

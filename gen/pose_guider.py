"""Pose guider: how the target pose map (FLAME normals with zero expression) enters the noisy input.

`add` is the paper's design (a small strided conv net, zero-initialized at its output so an SD-initialized
UNet starts undisturbed, its features added to the noisy latent); `concat` appends the pose map, pooled to
latent resolution, as extra input channels (cheap, for small pixel-space models).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PoseGuider(nn.Module):
    def __init__(
        self, mode: str, latent_channels: int, downscale: int, channels: tuple[int, ...] = (16, 32, 64, 128)
    ):
        super().__init__()
        if mode not in ("add", "concat"):
            raise ValueError(f"pose_injection must be 'add' or 'concat', got {mode!r}")
        if downscale < 1 or downscale & (downscale - 1):
            raise ValueError(f"latent downscale must be a power of two, got {downscale}")
        self.mode, self.downscale = mode, downscale
        self.net = None
        if mode == "add":
            n_down = int(math.log2(downscale))
            chans = [channels[min(i, len(channels) - 1)] for i in range(n_down + 1)]
            layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1), nn.SiLU()]
            for i in range(n_down):
                layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.SiLU()]
            out = nn.Conv2d(chans[n_down], latent_channels, 3, padding=1)
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
            self.net = nn.Sequential(*layers, out)

    def extra_channels(self) -> int:
        """Input channels the UNet needs beyond the latent's."""
        return 3 if self.mode == "concat" else 0

    def encode(self, posemap: torch.Tensor) -> torch.Tensor:
        """posemap [N, 3, H, W] in [0,1] -> pose features at latent resolution [N, C_pose, h, w]."""
        pose = posemap * 2 - 1
        if self.mode == "add":
            return self.net(pose)
        return F.avg_pool2d(pose, self.downscale) if self.downscale > 1 else pose

    def join(self, latent: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """latent [N, C, h, w] + pose features -> UNet input [N, C (+3), h, w]."""
        return latent + features if self.mode == "add" else torch.cat([latent, features], dim=1)

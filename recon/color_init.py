"""Initial Gaussian colours from the training views (what a 3DGS point cloud's colours do for it).

Each Gaussian takes the mean colour of the pixels its centre projects to, over the views that its triangle
faces and where that pixel is foreground; grey where no view sees it. Starting near the right colours saves
hundreds of CPU steps of the fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from geodiff4d.recon.binding import to_world, triangle_frames
from geodiff4d.recon.fit import View
from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.sh import rgb_to_dc


def colors_from_views(
    gaussians: BoundGaussians, frame_vertices, faces: Tensor, views: Sequence[View]
) -> Tensor:
    """Mean observed RGB [N, 3] per Gaussian; ``frame_vertices(frame)`` gives that frame's mesh [V, 3]."""
    total = torch.zeros(len(gaussians), 3)
    count = torch.zeros(len(gaussians))
    with torch.no_grad():
        for view in views:
            frames = triangle_frames(frame_vertices(view.frame), faces)
            means, _, _ = to_world(gaussians, frames)
            normals = frames.rotation[gaussians.face_index][:, :, 1]  # the triangle normal (frame axis a1)
            cam = means @ view.world_to_cam[:3, :3].T + view.world_to_cam[:3, 3]  # [N, 3]
            facing = (normals @ view.world_to_cam[:3, :3].T * cam).sum(-1) < 0  # normal against the ray
            pix = cam @ view.K.T
            x, y = (pix[:, 0] / pix[:, 2]).round().long(), (pix[:, 1] / pix[:, 2]).round().long()
            height, width = view.mask.shape
            inside = facing & (cam[:, 2] > 0) & (x >= 0) & (x < width) & (y >= 0) & (y < height)
            x, y = x.clamp(0, width - 1), y.clamp(0, height - 1)
            seen = inside & (view.mask[y, x] > 0.5)
            total += torch.where(seen[:, None], view.rgb[:, y, x].T, 0.0)
            count += seen.float()
    return torch.where(count[:, None] > 0, total / count.clamp_min(1)[:, None], 0.5)


def init_colors(gaussians: BoundGaussians, frame_vertices, faces: Tensor, views: Sequence[View]) -> None:
    """Set the SH DC term of every Gaussian to its observed colour (in place)."""
    with torch.no_grad():
        gaussians.sh_dc.copy_(rgb_to_dc(colors_from_views(gaussians, frame_vertices, faces, views)))

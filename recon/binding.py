"""Binding Gaussians to the head model's triangles (GaussianAvatars-style, implemented from the paper).

Each triangle defines a frame: origin at its centroid, axes a0 = (v1 - v0)/|.|, a1 = normalize(a0 x (v2 - v0))
(the face normal), a2 = a0 x a1 (the sign that makes [a0 a1 a2] a proper rotation; a1 x a0 would
mirror every Gaussian), and a size k (mean edge length). A Gaussian stores position, rotation and
log-scale in that frame, so when the mesh deforms (expression, pose) the Gaussian moves, turns and scales
with its triangle. Densification and pruning keep every Gaussian on its face and never leave a face empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from geodiff4d.recon.gaussians import BoundGaussians
from geodiff4d.recon.rotations import quat_to_rotmat, rotmat_to_quat


@dataclass
class TriangleFrames:
    origin: Tensor  # [..., F, 3]
    rotation: Tensor  # [..., F, 3, 3] columns a0, a1, a2
    size: Tensor  # [..., F]


def triangle_frames(vertices: Tensor, faces: Tensor) -> TriangleFrames:
    """Frames of every face of the mesh ``vertices`` [..., V, 3] with ``faces`` [F, 3]."""
    v0, v1, v2 = (vertices[..., faces[:, i], :] for i in range(3))  # each [..., F, 3]
    e1, e2, e3 = v1 - v0, v2 - v0, v2 - v1
    a0 = e1 / e1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a1 = torch.linalg.cross(a0, e2)
    a1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a2 = torch.linalg.cross(a0, a1)  # the spec's a1 x a0 'up to sign': this sign makes det = +1
    size = (e1.norm(dim=-1) + e2.norm(dim=-1) + e3.norm(dim=-1)) / 3
    return TriangleFrames((v0 + v1 + v2) / 3, torch.stack([a0, a1, a2], dim=-1), size)


def to_world(
    gaussians: BoundGaussians, frames: TriangleFrames, residuals: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """World means [N, 3], wxyz quats [N, 4] and scales [N, 3] for one frame's triangle frames ([F, ...]).

    ``residuals`` (per-frame refinement) are added to local_xyz, local_quat and log_scale first.
    """
    residuals = residuals or {}
    local = {
        n: getattr(gaussians, n) + residuals[n] if n in residuals else getattr(gaussians, n)
        for n in ("local_xyz", "local_quat", "log_scale")
    }
    f = gaussians.face_index
    rotation, size = frames.rotation[f], frames.size[f][:, None]  # [N, 3, 3], [N, 1]
    means = frames.origin[f] + size * (rotation @ local["local_xyz"][:, :, None]).squeeze(-1)
    quats = rotmat_to_quat(rotation @ quat_to_rotmat(local["local_quat"]))
    scales = size * torch.exp(local["log_scale"])
    return means, quats, scales


def to_local(
    means: Tensor, rotmats: Tensor, scales: Tensor, face_index: Tensor, frames: TriangleFrames
) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`to_world`: world attributes -> (local_xyz, local_quat, log_scale)."""
    rotation, size = frames.rotation[face_index], frames.size[face_index][:, None]
    local_xyz = (rotation.transpose(-1, -2) @ (means - frames.origin[face_index])[:, :, None]).squeeze(
        -1
    ) / size
    local_quat = rotmat_to_quat(rotation.transpose(-1, -2) @ rotmats)
    return local_xyz, local_quat, torch.log(scales / size)


@dataclass
class Regrowth:
    """Result of densify/prune: the new set and, per new Gaussian, its source index (for optimizer state)."""

    gaussians: BoundGaussians
    source: Tensor  # [N_new] long, index into the old set
    fresh: Tensor  # [N_new] bool: a new child (its optimizer moments start at zero)


def densify(
    gaussians: BoundGaussians, clone: Tensor, split: Tensor, generator: torch.Generator, n_children: int = 2
) -> Regrowth:
    """Clone Gaussians in ``clone`` [N] bool; replace those in ``split`` by ``n_children`` smaller ones.

    Children inherit their parent's face; split children are sampled from the parent's own distribution in
    the face frame and shrink by 1/(0.8 * n_children) as in 3DGS.
    """
    split = split & ~clone
    keep = torch.nonzero(~split).squeeze(1)
    cloned = torch.nonzero(clone).squeeze(1)
    parents = torch.nonzero(split).squeeze(1).repeat(n_children)
    tensors = gaussians.selected(parents)
    noise = torch.randn(parents.shape[0], 3, generator=generator) * torch.exp(tensors["log_scale"])
    rot = quat_to_rotmat(tensors["local_quat"])
    tensors["local_xyz"] = tensors["local_xyz"] + (rot @ noise[:, :, None]).squeeze(-1)
    tensors["log_scale"] = tensors["log_scale"] - torch.log(torch.tensor(0.8 * n_children))
    parts = [gaussians.selected(keep), gaussians.selected(cloned), tensors]
    merged = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    source = torch.cat([keep, cloned, parents])
    fresh = torch.cat(
        [torch.zeros(len(keep), dtype=torch.bool), torch.ones(len(cloned) + len(parents), dtype=torch.bool)]
    )
    return Regrowth(gaussians.subset(source, merged), source, fresh)


def prune(gaussians: BoundGaussians, remove: Tensor) -> Regrowth:
    """Drop Gaussians in ``remove`` [N] bool, except that every face keeps at least one Gaussian.

    Of a face whose Gaussians are all marked, the most opaque one survives.
    """
    face = gaussians.face_index
    n_faces = int(face.max()) + 1 if len(face) else 0
    opacity = gaussians.opacity_logit.detach()
    # the most opaque Gaussian of each face: sort by (face, opacity); each face group's last entry
    order = torch.argsort(opacity, stable=True)
    order = order[torch.argsort(face[order], stable=True)]
    sorted_face = face[order]
    is_last = torch.ones_like(sorted_face, dtype=torch.bool)
    is_last[:-1] = sorted_face[1:] != sorted_face[:-1]
    most_opaque = torch.full((n_faces,), -1, dtype=torch.long)
    most_opaque[sorted_face[is_last]] = order[is_last]
    kept_per_face = torch.zeros(n_faces, dtype=torch.long).index_add_(0, face, (~remove).long())
    rescue = torch.zeros_like(remove)
    orphaned = (kept_per_face == 0) & (torch.bincount(face, minlength=n_faces) > 0)
    rescue[most_opaque[orphaned]] = True
    source = torch.nonzero(~remove | rescue).squeeze(1)
    return Regrowth(gaussians.subset(source), source, torch.zeros(len(source), dtype=torch.bool))


def render_bound(
    gaussians: BoundGaussians,
    vertices: Tensor,
    faces: Tensor,
    world_to_cam: Tensor,
    K: Tensor,
    width: int,
    height: int,
    background: Tensor | None = None,
    backend: str = "auto",
    residuals: dict[str, Tensor] | None = None,
    dilation: float = 0.0,
):
    """Render the avatar on the mesh ``vertices`` [V, 3] (one frame's deformed head) into one camera.

    ``residuals``: per-Gaussian refinement of this frame (local_xyz, local_quat, log_scale, sh_dc).
    ``dilation``: world variance (m^2) added to every Gaussian (rasterize.resolution_dilation).
    """
    from geodiff4d.recon.rasterize import render_gaussians

    means, quats, scales = to_world(gaussians, triangle_frames(vertices, faces), residuals)
    if dilation > 0:
        scales = (scales**2 + dilation).sqrt()
    sh = gaussians.sh
    if residuals and "sh_dc" in residuals:
        sh = torch.cat([(gaussians.sh_dc + residuals["sh_dc"])[:, None], gaussians.sh_rest], dim=1)
    return render_gaussians(
        means,
        quats,
        scales,
        gaussians.opacity,
        sh,
        world_to_cam,
        K,
        width,
        height,
        sh_degree=gaussians.active_sh_degree,
        background=background,
        backend=backend,
    )

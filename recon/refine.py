"""Hierarchical refinement on top of the tracked head (each level switchable), as a Fitter deformer.

1. Per-frame FLAME residuals: learnable corrections to the tracked expression, pose and translation.
2. UV-space U-Net: per-vertex offsets of a midpoint-subdivided head (finer than FLAME where Gaussians need
   it), predicted from the frame's expression code on a UV grid and sampled at each vertex's UV. Offsets live
   in the head's own frame (rotated and scaled with the global pose) so they follow the head.
3. Attribute MLP: per-Gaussian residuals (position, rotation, log-scale, colour) from the frame's expression
   latent (or FLAME expression when there is none) and the Gaussian's face position on the first frame.
Every output layer starts at zero, so refinement begins exactly at the tracked head.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geodiff4d.core.config import StrictConfig
from geodiff4d.datasets.flame import FlameModel, FlameParams
from geodiff4d.recon.binding import triangle_frames
from geodiff4d.recon.gaussians import BoundGaussians

RESIDUAL_NAMES = ("expression", "rotation", "neck", "jaw", "translation")
# GaussianAvatars' optimizer groups for the FLAME parameters it fine-tunes (their rates: recon.fit.LEARNING_RATES)
RESIDUAL_GROUPS = {
    "expression": "flame_expression",
    "rotation": "flame_pose",
    "neck": "flame_pose",
    "jaw": "flame_pose",
    "translation": "flame_translation",
}
FLAME_FIELDS = tuple(f.name for f in fields(FlameParams))


class RefineConfig(StrictConfig):
    flame_residuals: bool = True
    uv_offsets: bool = False
    attribute_mlp: bool = False
    subdivisions: int = 1  # midpoint subdivisions of the head (used with uv_offsets)
    uv_size: int = 32
    hidden: int = 64
    offset_weight: float = 10.0  # L2 on offsets (metres) and FLAME residuals keeps refinement a correction
    residual_weight: float = 0.1


def subdivide(faces: Tensor, uv: Tensor, n_vertices: int) -> tuple[Tensor, Tensor, Tensor]:
    """Midpoint subdivision: (sparse [V', V] vertex map, faces [4F, 3], per-vertex uv [V', 2])."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values  # [3F, 2]
    unique, inverse = torch.unique(edges, dim=0, return_inverse=True)
    mid = n_vertices + inverse.reshape(3, -1).T  # [F, 3] new vertex on edges (01, 12, 20)
    a, b, c = faces.unbind(1)
    ab, bc, ca = mid.unbind(1)
    new_faces = torch.cat([torch.stack(t, 1) for t in ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
    n_new = n_vertices + len(unique)
    rows = torch.cat([torch.arange(n_vertices), torch.arange(n_vertices, n_new).repeat(2)])
    cols = torch.cat([torch.arange(n_vertices), unique[:, 0], unique[:, 1]])
    vals = torch.cat([torch.ones(n_vertices), torch.full((2 * len(unique),), 0.5)])
    mapping = torch.sparse_coo_tensor(
        torch.stack([rows, cols]), vals, (n_new, n_vertices), check_invariants=False
    )
    mapping = mapping.coalesce()
    return mapping, new_faces, torch.sparse.mm(mapping, uv)


def vertex_uv(model: FlameModel) -> Tensor:
    """One UV [V, 2] per vertex (a seam vertex takes one of its corners' UVs)."""
    uv = torch.zeros(model.n_vertices, 2)
    uv[model.faces.reshape(-1)] = model.uv_coords[model.uv_faces.reshape(-1)]
    return uv


class UVUNet(nn.Module):
    """Two-level U-Net on a [S, S] UV grid: (uv coordinates + code) -> 3-channel offset map."""

    def __init__(self, code_dim: int, size: int, width: int = 32):
        super().__init__()
        self.size = size

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1), nn.SiLU(), nn.Conv2d(o, o, 3, padding=1), nn.SiLU()
            )

        self.enc1, self.enc2 = block(2 + code_dim, width), block(width, 2 * width)
        self.mid = block(2 * width, 2 * width)
        self.dec2, self.dec1 = block(4 * width, width), block(2 * width, width)
        self.out = nn.Conv2d(width, 3, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        v, u = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        self.register_buffer("grid", torch.stack([u, v])[None])  # [1, 2, S, S]

    def forward(self, code: Tensor) -> Tensor:
        x = torch.cat([self.grid, code[None, :, None, None].expand(1, -1, self.size, self.size)], 1)
        e1 = self.enc1(x)  # [1, W, S, S]
        e2 = self.enc2(F.avg_pool2d(e1, 2))  # [1, 2W, S/2, S/2]
        m = self.mid(F.avg_pool2d(e2, 2))  # [1, 2W, S/4, S/4]
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.out(d1)[0]  # [3, S, S]


def sample_uv(image: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of ``image`` [C, S, S] (row 0 = v 0) at uv [N, 2] -> [N, C]."""
    grid = (uv * 2 - 1)[None, None]  # [1, 1, N, 2] x = u, y = v
    return F.grid_sample(image[None], grid, align_corners=True)[0, :, 0].T


class AttributeMLP(nn.Module):
    """(frame code, reference position of the Gaussian's face) -> residuals of local_xyz, local_quat, log_scale, sh_dc."""

    def __init__(self, code_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(code_dim + 3, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 13),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, code: Tensor, positions: Tensor) -> dict[str, Tensor]:
        out = self.net(torch.cat([code[None].expand(len(positions), -1), positions], -1))  # [N, 13]
        return {
            "local_xyz": out[:, :3],
            "local_quat": out[:, 3:7],
            "log_scale": out[:, 7:10],
            "sh_dc": out[:, 10:],
        }


class HierarchicalDeformer(nn.Module):
    """Fitter deformer: ``forward(frame)`` -> vertices of (the subdivided) head; ``attribute_residuals``."""

    def __init__(
        self, model: FlameModel, params: FlameParams, config: RefineConfig, latents: Tensor | None = None
    ):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: its buffers stay out of every checkpoint
        self.config = config
        frames = params.batch_size
        for name, value in vars(params).items():
            self.register_buffer(f"tracked_{name}", value.detach().float().clone())
        for name in RESIDUAL_NAMES:
            value = torch.zeros_like(getattr(params, name))
            self.register_parameter(
                f"residual_{name}", nn.Parameter(value, requires_grad=config.flame_residuals)
            )
        # frame code: the expression latent, else the tracked FLAME expression
        codes = latents.float() if latents is not None else params.expression.detach()
        if codes.shape[0] != frames:
            raise ValueError(f"refinement: {codes.shape[0]} latents for {frames} frames")
        self.register_buffer("codes", codes.clone())
        faces, uv = model.faces, vertex_uv(model)
        self.mappings: list[Tensor] = []
        if config.uv_offsets:
            n = model.n_vertices
            for _ in range(config.subdivisions):
                mapping, faces, uv = subdivide(faces, uv, n)
                self.mappings.append(mapping)
                n = mapping.shape[0]
            self.unet = UVUNet(codes.shape[1], config.uv_size)
        self.register_buffer("faces", faces)
        self.register_buffer("uv", uv)
        if config.attribute_mlp:
            self.mlp = AttributeMLP(codes.shape[1], config.hidden)
            with torch.no_grad():
                self.register_buffer("reference_origin", triangle_frames(self._vertices(0), faces).origin)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: FLAME residuals as GaussianAvatars groups them (pose
        and translation far slower than expression), everything else (U-Net, MLP) under "deformer"."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                residual = name.removeprefix("residual_")
                groups.setdefault(RESIDUAL_GROUPS.get(residual, "deformer"), []).append(parameter)
        return groups

    def params(self, frame: int) -> FlameParams:
        values = {k: getattr(self, f"tracked_{k}")[frame : frame + 1] for k in FLAME_FIELDS}
        for name in RESIDUAL_NAMES:
            values[name] = values[name] + getattr(self, f"residual_{name}")[frame : frame + 1]
        return FlameParams(**values)

    def subdivided(self, vertices: Tensor) -> Tensor:
        """Vertices [V, 3] of the head model -> vertices of the subdivided head [V', 3]."""
        for mapping in self.mappings:
            vertices = torch.sparse.mm(mapping.to(vertices.device), vertices)
        return vertices

    def _vertices(self, frame: int) -> Tensor:
        params = self.params(frame)
        vertices = self.subdivided(self.model(params).vertices[0])  # [V', 3]
        if self.config.uv_offsets and hasattr(self, "unet"):
            offsets = sample_uv(self.unet(self.codes[frame]), self.uv)  # [V', 3] head frame
            vertices = vertices + offsets @ params.model_to_world()[0, :3, :3].T
        return vertices

    def forward(self, frame: int) -> Tensor:
        return self._vertices(frame)

    def attribute_residuals(self, frame: int, gaussians: BoundGaussians) -> dict[str, Tensor] | None:
        if not self.config.attribute_mlp:
            return None
        return self.mlp(self.codes[frame], self.reference_origin[gaussians.face_index])

    def regularizer(self, frame: int) -> Tensor:
        """Keeps the refinement a correction of the tracked head (added to the Fitter's loss)."""
        residuals = sum((getattr(self, f"residual_{n}")[frame] ** 2).sum() for n in RESIDUAL_NAMES)
        loss = self.config.residual_weight * residuals
        if self.config.uv_offsets:
            offsets = sample_uv(self.unet(self.codes[frame]), self.uv)  # [V', 3]
            loss = loss + self.config.offset_weight * (offsets**2).sum(-1).mean()
        return loss

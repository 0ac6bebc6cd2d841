"""The parameter container of a FLAME-bound Gaussian avatar: local (triangle-frame) attributes + SH colour."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from geodiff4d.recon.sh import n_coefficients, rgb_to_dc

PARAMETER_NAMES = ("local_xyz", "local_quat", "log_scale", "opacity_logit", "sh_dc", "sh_rest")


class BoundGaussians(nn.Module):
    """N Gaussians, each bound to one face; positions, rotations and log-scales live in the face's frame.

    face_index [N] long; local_xyz [N, 3]; local_quat [N, 4] wxyz; log_scale [N, 3] (relative to the
    triangle's size); opacity_logit [N]; sh_dc [N, 3]; sh_rest [N, (degree+1)^2 - 1, 3].

    ``sh_degree`` sizes the coefficients; ``active_sh_degree`` (<= sh_degree) is what renders: fitting raises
    it step by step as 3DGS does, so colour settles before view dependence is learnt.
    """

    def __init__(
        self,
        face_index: Tensor,
        tensors: dict[str, Tensor],
        sh_degree: int,
        active_sh_degree: int | None = None,
    ):
        super().__init__()
        n = face_index.shape[0]
        expected = {
            "local_xyz": (n, 3),
            "local_quat": (n, 4),
            "log_scale": (n, 3),
            "opacity_logit": (n,),
            "sh_dc": (n, 3),
            "sh_rest": (n, n_coefficients(sh_degree) - 1, 3),
        }
        for name, shape in expected.items():
            if name not in tensors:
                raise ValueError(f"BoundGaussians: missing tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"BoundGaussians: {name!r} must have shape {shape}, got {tuple(tensors[name].shape)}"
                )
        self.sh_degree = sh_degree
        self.active_sh_degree = sh_degree if active_sh_degree is None else active_sh_degree
        if not 0 <= self.active_sh_degree <= sh_degree:
            raise ValueError(
                f"BoundGaussians: active_sh_degree {self.active_sh_degree} outside 0..{sh_degree}"
            )
        self.register_buffer("face_index", face_index.long().clone())
        for name in PARAMETER_NAMES:
            self.register_parameter(name, nn.Parameter(tensors[name].detach().float().clone()))

    def __len__(self) -> int:
        return int(self.face_index.shape[0])

    @property
    def opacity(self) -> Tensor:
        return torch.sigmoid(self.opacity_logit)

    @property
    def sh(self) -> Tensor:
        """All SH coefficients [N, (degree+1)^2, 3]."""
        return torch.cat([self.sh_dc[:, None], self.sh_rest], dim=1)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach() for name in PARAMETER_NAMES}

    def selected(self, index: Tensor) -> dict[str, Tensor]:
        """Detached copies of every parameter at ``index`` (for building a densified/pruned set)."""
        return {name: getattr(self, name).detach()[index] for name in PARAMETER_NAMES}

    def subset(self, index: Tensor, tensors: dict[str, Tensor] | None = None) -> BoundGaussians:
        """A new set of the Gaussians at ``index`` (their faces and SH degrees kept), with ``tensors`` when given."""
        tensors = self.selected(index) if tensors is None else tensors
        return BoundGaussians(self.face_index[index], tensors, self.sh_degree, self.active_sh_degree)

    @classmethod
    def on_faces(
        cls,
        n_faces: int,
        per_face: int,
        generator: torch.Generator,
        sh_degree: int = 0,
        rgb: float = 0.5,
        opacity: float = 0.5,
        log_scale: float = -1.0,
    ) -> BoundGaussians:
        """``per_face`` Gaussians on every face at random barycentric points, flat against the triangle.

        In the triangle frame (x along the first edge, y the face normal, z in-plane) the triangle lies in
        y = 0, so a small y-scale makes the Gaussian a disc on the surface.
        """
        n = n_faces * per_face
        face_index = torch.arange(n_faces).repeat_interleave(per_face)
        # positions near the centroid, spread in-plane; the frame origin is the centroid
        in_plane = (torch.rand(n, 2, generator=generator) - 0.5) * 0.5
        local_xyz = torch.stack([in_plane[:, 0], torch.zeros(n), in_plane[:, 1]], dim=-1)
        log_scales = torch.tensor([log_scale, log_scale - 2.0, log_scale]).expand(n, 3)
        tensors = {
            "local_xyz": local_xyz,
            "local_quat": torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4),
            "log_scale": log_scales,
            "opacity_logit": torch.full((n,), float(torch.logit(torch.tensor(opacity)))),
            "sh_dc": rgb_to_dc(torch.full((n, 3), rgb)),
            "sh_rest": torch.zeros(n, n_coefficients(sh_degree) - 1, 3),
        }
        return cls(face_index, tensors, sh_degree)

"""Fitting a bound-Gaussian avatar to multi-view frames: Adam with per-attribute learning rates, 3DGS-style
densification that keeps the binding, safetensors checkpoints and exact resume.

Exact resume: the checkpoint holds every parameter, the Adam moments, the densification statistics, the
view-sampling generator's state and the loss history, so a resumed run continues with the very same sequence
of views, updates and losses as one that was never interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from geodiff4d.cluster.atomic import atomic_output
from geodiff4d.recon.binding import Regrowth, densify, prune, render_bound
from geodiff4d.recon.gaussians import PARAMETER_NAMES, BoundGaussians
from geodiff4d.recon.losses import normal_loss, photometric_loss, position_regularizer, scale_regularizer


@dataclass
class View:
    """One training image: a frame of the sequence seen by one camera (target RGB already on black)."""

    frame: int
    world_to_cam: Tensor  # [4, 4]
    K: Tensor  # [3, 3]
    rgb: Tensor  # [3, H, W]
    mask: Tensor  # [H, W] float 0/1
    normal: Tensor | None = None  # [3, H, W] our convention


@dataclass
class FitConfig:
    steps: int = 3000
    seed: int = 0
    lr: dict[str, float] = field(default_factory=lambda: {
        "local_xyz": 2e-3, "local_quat": 1e-3, "log_scale": 5e-3, "opacity_logit": 5e-2,
        "sh_dc": 2.5e-2, "sh_rest": 1.25e-3, "deformer": 1e-3,
    })  # fmt: skip
    lambda_normal: float = 0.1  # 0 switches the normal term off (ablation)
    lambda_position: float = 0.01
    lambda_scale: float = 1.0
    densify_every: int = 0  # 0: no densification
    densify_until: int = 0
    densify_grad_threshold: float = 2e-3  # mean screen-space gradient norm (pixels) that triggers growth
    split_log_scale: float = -0.5  # larger Gaussians (relative to their triangle) are split, smaller cloned
    prune_opacity: float = 0.005
    checkpoint_every: int = 500


class FixedVertices(nn.Module):
    """The deformer without refinement: each frame's tracked mesh as given, [T, V, 3].

    The deformer interface (see :class:`geodiff4d.recon.refine.HierarchicalDeformer` for a learnable one):
    ``forward(frame)`` -> vertices, ``attribute_residuals(frame, gaussians)`` -> dict or None,
    ``regularizer(frame)`` -> scalar added to the loss.
    """

    def __init__(self, frame_vertices: Tensor):
        super().__init__()
        self.register_buffer("frame_vertices", frame_vertices.detach().float().clone())

    def forward(self, frame: int) -> Tensor:
        return self.frame_vertices[frame]

    def attribute_residuals(self, frame: int, gaussians: BoundGaussians) -> dict[str, Tensor] | None:
        return None

    def regularizer(self, frame: int) -> Tensor:
        return torch.zeros(())


class Fitter:
    def __init__(
        self, gaussians: BoundGaussians, deformer: nn.Module, faces: Tensor, views: Sequence[View], config: FitConfig
    ):  # views: a list, or a compact FrameStore that decodes the view a step draws
        if not views:
            raise ValueError("Fitter: no training views")
        self.gaussians, self.deformer, self.faces, self.views, self.config = gaussians, deformer, faces, views, config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_index = 0
        self.losses: list[float] = []
        self._reset_statistics()
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Adam:
        groups = [{"params": [getattr(self.gaussians, n)], "lr": self.config.lr[n], "name": n} for n in PARAMETER_NAMES]
        deformer_params = [p for p in self.deformer.parameters() if p.requires_grad]
        if deformer_params:
            groups.append({"params": deformer_params, "lr": self.config.lr["deformer"], "name": "deformer"})
        return torch.optim.Adam(groups, eps=1e-15)

    def _reset_statistics(self) -> None:
        self.grad_sum = torch.zeros(len(self.gaussians))
        self.grad_count = torch.zeros(len(self.gaussians))

    def step(self) -> float:
        view = self.views[int(torch.randint(len(self.views), (1,), generator=self.generator))]
        height, width = view.rgb.shape[-2:]
        render = self.render(view.frame, view.world_to_cam, view.K, width, height)
        render.means2d.retain_grad()
        loss = photometric_loss(render.rgb, view.rgb)
        if self.config.lambda_normal > 0 and view.normal is not None:
            loss = loss + self.config.lambda_normal * normal_loss(render.normal, render.alpha, view.normal, view.mask)
        loss = loss + self.config.lambda_position * position_regularizer(self.gaussians.local_xyz)
        loss = loss + self.config.lambda_scale * scale_regularizer(self.gaussians.log_scale)
        loss = loss + self.deformer.regularizer(view.frame)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if render.means2d.grad is not None:
            self.grad_sum += render.means2d.grad.norm(dim=-1) * render.visible
            self.grad_count += render.visible.float()
        self.step_index += 1
        self.losses.append(float(loss.detach()))
        c = self.config
        if c.densify_every and self.step_index % c.densify_every == 0 and self.step_index <= c.densify_until:
            self.densify_and_prune()
        return self.losses[-1]

    def render(self, frame: int, world_to_cam: Tensor, K: Tensor, width: int, height: int, **options):
        """Render the avatar as deformed (and refined) for ``frame`` into a camera."""
        residuals = self.deformer.attribute_residuals(frame, self.gaussians)
        return render_bound(self.gaussians, self.deformer(frame), self.faces, world_to_cam, K, width, height,
                            residuals=residuals, **options)  # fmt: skip

    def densify_and_prune(self) -> None:
        """Grow where the screen-space gradient is large (clone small, split large), prune transparent ones."""
        c = self.config
        mean_grad = self.grad_sum / self.grad_count.clamp_min(1)
        grow = mean_grad > c.densify_grad_threshold
        large = self.gaussians.log_scale.detach().max(dim=-1).values > c.split_log_scale
        grown = densify(self.gaussians, grow & ~large, grow & large, self.generator)
        self._adopt(grown)
        self._adopt(prune(self.gaussians, self.gaussians.opacity.detach() < c.prune_opacity))
        self._reset_statistics()

    def _adopt(self, regrowth: Regrowth) -> None:
        """Switch to the regrown set, carrying each survivor's Adam moments (fresh children start at zero)."""
        old_state = {g["name"]: self.optimizer.state.get(g["params"][0], {}) for g in self.optimizer.param_groups}
        deformer_state = {p: self.optimizer.state[p] for p in self.deformer.parameters() if p in self.optimizer.state}
        self.gaussians = regrowth.gaussians
        self.optimizer = self._make_optimizer()
        keep = (~regrowth.fresh).float()
        for group in self.optimizer.param_groups:
            if group["name"] == "deformer":
                for p in group["params"]:
                    if p in deformer_state:
                        self.optimizer.state[p] = deformer_state[p]
                continue
            state = old_state[group["name"]]
            if state:
                mask = keep.reshape((-1,) + (1,) * (state["exp_avg"].dim() - 1))
                self.optimizer.state[group["params"][0]] = {
                    "step": state["step"].clone(),
                    "exp_avg": state["exp_avg"][regrowth.source] * mask,
                    "exp_avg_sq": state["exp_avg_sq"][regrowth.source] * mask,
                }

    def run(self, until: int, checkpoint: Path | None = None, on_step: Callable[[int, float], None] | None = None) -> None:
        """Train to step ``until``, checkpointing every ``checkpoint_every`` steps and at the end."""
        while self.step_index < until:
            loss = self.step()
            if on_step is not None:
                on_step(self.step_index, loss)
            if checkpoint is not None and (self.step_index % self.config.checkpoint_every == 0 or self.step_index == until):
                self.save(checkpoint)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        tensors: dict[str, Tensor] = {"gaussians/face_index": self.gaussians.face_index}
        tensors |= {f"gaussians/{k}": v for k, v in self.gaussians.tensors().items()}
        tensors |= {f"deformer/{k}": v.detach() for k, v in self.deformer.state_dict().items()}
        for group in self.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                for key, value in self.optimizer.state.get(p, {}).items():
                    tensors[f"adam/{group['name']}/{i}/{key}"] = value.reshape(-1) if value.dim() == 0 else value
        tensors["fit/rng"] = self.generator.get_state()
        tensors["fit/grad_sum"], tensors["fit/grad_count"] = self.grad_sum, self.grad_count
        metadata = {
            "step": str(self.step_index),
            "losses": json.dumps(self.losses),
            "sh_degree": str(self.gaussians.sh_degree),
            "config": json.dumps(asdict(self.config)),
        }
        with atomic_output(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)

    @classmethod
    def resume(
        cls, path: str | Path, deformer: nn.Module, faces: Tensor, views: Sequence[View], config: FitConfig
    ) -> Fitter:
        """Rebuild a fitter from its checkpoint (the deformer's architecture is given, its weights are loaded)."""
        tensors, metadata = load_checkpoint(path)
        gaussians = load_gaussians(tensors, int(metadata["sh_degree"]))
        deformer.load_state_dict({k[len("deformer/"):]: v for k, v in tensors.items() if k.startswith("deformer/")})
        fitter = cls(gaussians, deformer, faces, views, config)
        for group in fitter.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                prefix = f"adam/{group['name']}/{i}/"
                state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                if state:
                    state["step"] = state["step"].reshape(())
                    fitter.optimizer.state[p] = state
        fitter.generator.set_state(tensors["fit/rng"])
        fitter.grad_sum, fitter.grad_count = tensors["fit/grad_sum"], tensors["fit/grad_count"]
        fitter.step_index = int(metadata["step"])
        fitter.losses = json.loads(metadata["losses"])
        return fitter


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def load_gaussians(tensors: dict[str, Tensor], sh_degree: int) -> BoundGaussians:
    return BoundGaussians(
        tensors["gaussians/face_index"], {n: tensors[f"gaussians/{n}"] for n in PARAMETER_NAMES}, sh_degree
    )

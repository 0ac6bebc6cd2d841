"""Fitting a bound-Gaussian avatar to multi-view frames: Adam with per-attribute learning rates, 3DGS-style
densification that keeps the binding, safetensors checkpoints and exact resume.

Exact resume: the checkpoint holds every parameter, the Adam moments, the densification statistics, the
view-sampling generator's state and the loss history, so a resumed run continues with the very same sequence
of views, updates and losses as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from geodiff4d.core.config import StrictConfig
from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.recon import adaptive
from geodiff4d.recon.binding import Regrowth, prune, render_bound, triangle_frames
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


# GaussianAvatars' learning rates (its arguments/__init__.py). Gaussian attributes live in their triangle's
# frame and units; the position rate is multiplied by the camera extent (its spatial_lr_scale) and decays
# exponentially from local_xyz to local_xyz_final over the run. The FLAME residuals it fine-tunes move far
# slower than the attributes; "deformer" is the refinement networks' rate (U-Net, attribute MLP).
LEARNING_RATES = {
    "local_xyz": 5e-3,
    "local_xyz_final": 5e-5,
    "local_quat": 1e-3,
    "log_scale": 1.7e-2,
    "opacity_logit": 5e-2,
    "sh_dc": 2.5e-3,
    "sh_rest": 2.5e-3 / 20,
    "flame_expression": 1e-3,
    "flame_pose": 1e-5,
    "flame_translation": 1e-6,
    "deformer": 1e-3,
}


class FitConfig(StrictConfig):
    steps: int = 3000
    seed: int = 0
    # overrides of LEARNING_RATES; a built config holds every rate
    lr: dict[str, float] = Field(default_factory=dict, validate_default=True)
    lambda_normal: float = 0.1  # 0 switches the normal term off (ablation)
    lambda_position: float = 0.01  # GaussianAvatars' lambda_xyz (threshold 1 triangle size)
    lambda_scale: float = 1.0  # GaussianAvatars' lambda_scale (threshold 0.6 triangle size)
    # GaussianAvatars' adaptive density control (:mod:`geodiff4d.recon.adaptive`). None: its schedule in
    # proportion to the run (at 600k steps: densify every 2k from 10k to the end, reset opacity every 60k),
    # never denser than 3DGS's (every 100 from 500, reset every 3000).
    adaptive_control: bool | None = None  # None: on for runs of at least adaptive_min_steps
    adaptive_min_steps: int = 1000  # the demo fits 300 steps
    densify_from: int | None = None
    densify_every: int | None = None
    densify_until: int | None = None
    opacity_reset_every: int | None = None
    densify_grad_threshold: float = 2e-4  # mean view-space positional gradient norm, NDC units as 3DGS
    percent_dense: float = 0.01  # of the camera extent: larger Gaussians split, smaller ones clone
    prune_opacity: float = 0.005
    prune_screen_radius: float = 20.0  # pixels; with prune_world_scale, from the first opacity reset on
    prune_world_scale: float = 0.1  # of the camera extent
    sh_increase_every: int = 1000  # one more active SH degree every this many steps (3DGS, GaussianAvatars)
    checkpoint_every: int = 500

    @field_validator("lr")
    @classmethod
    def _every_rate(cls, lr: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(lr) - set(LEARNING_RATES))
        if unknown:
            raise ValueError(f"unknown parameter group(s) {unknown} (known: {sorted(LEARNING_RATES)})")
        return {**LEARNING_RATES, **lr}


class FixedVertices(nn.Module):
    """The deformer without refinement: each frame's tracked mesh as given, [T, V, 3].

    The deformer interface (see :class:`geodiff4d.recon.refine.HierarchicalDeformer` for a learnable one):
    ``forward(frame)`` -> vertices, ``attribute_residuals(frame, gaussians)`` -> dict or None,
    ``regularizer(frame)`` -> scalar added to the loss, ``parameter_groups()`` -> learning-rate group name
    (a key of LEARNING_RATES) -> trainable parameters.
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

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {}


class Fitter:
    def __init__(
        self,
        gaussians: BoundGaussians,
        deformer: nn.Module,
        faces: Tensor,
        views: Sequence[View],
        config: FitConfig,
    ):  # views: a list, or a compact FrameStore that decodes the view a step draws
        if not views:
            raise ValueError("Fitter: no training views")
        self.gaussians, self.deformer, self.faces, self.views, self.config = (
            gaussians,
            deformer,
            faces,
            views,
            config,
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step_index = 0
        self.losses: list[float] = []
        self.extent = adaptive.camera_extent(views)
        self.schedule = adaptive.schedule(config)
        self.statistics = adaptive.DensityStatistics(len(gaussians))
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Adam:
        groups = [
            {"params": [getattr(self.gaussians, n)], "lr": self.config.lr[n], "name": n}
            for n in PARAMETER_NAMES
        ]
        for name, params in self.deformer.parameter_groups().items():
            groups.append({"params": params, "lr": self.config.lr[name], "name": name})
        return torch.optim.Adam(groups, eps=1e-15)

    def position_lr(self, step: int) -> float:
        """GaussianAvatars' position rate: exponential decay over the run, scaled by the camera extent."""
        t = min(max(step / self.config.steps, 0.0), 1.0)
        start, end = self.config.lr["local_xyz"], self.config.lr["local_xyz_final"]
        return self.extent * math.exp((1 - t) * math.log(start) + t * math.log(end))

    def step(self) -> float:
        self.optimizer.param_groups[PARAMETER_NAMES.index("local_xyz")]["lr"] = self.position_lr(
            self.step_index
        )
        every = self.config.sh_increase_every
        self.gaussians.active_sh_degree = min(self.gaussians.sh_degree, (self.step_index + 1) // every)
        view = self.views[int(torch.randint(len(self.views), (1,), generator=self.generator))]
        height, width = view.rgb.shape[-2:]
        render = self.render(view.frame, view.world_to_cam, view.K, width, height)
        render.means2d.retain_grad()
        loss = photometric_loss(render.rgb, view.rgb)
        if self.config.lambda_normal > 0 and view.normal is not None:
            loss = loss + self.config.lambda_normal * normal_loss(
                render.normal, render.alpha, view.normal, view.mask
            )
        if bool(render.visible.any()):  # GaussianAvatars regularizes the Gaussians this view sees
            seen = render.visible
            loss = loss + self.config.lambda_position * position_regularizer(self.gaussians.local_xyz[seen])
            loss = loss + self.config.lambda_scale * scale_regularizer(self.gaussians.log_scale[seen])
        loss = loss + self.deformer.regularizer(view.frame)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.statistics.add(render, width, height)
        self.step_index += 1
        self.losses.append(float(loss.detach()))
        if self.schedule is not None:
            if self.schedule.densifies(self.step_index):
                self.densify_and_prune()
            if self.schedule.resets_opacity(self.step_index):
                adaptive.reset_opacity(self.gaussians, self.optimizer)
        return self.losses[-1]

    def render(self, frame: int, world_to_cam: Tensor, K: Tensor, width: int, height: int, **options):
        """Render the avatar as deformed (and refined) for ``frame`` into a camera."""
        residuals = self.deformer.attribute_residuals(frame, self.gaussians)
        return render_bound(
            self.gaussians,
            self.deformer(frame),
            self.faces,
            world_to_cam,
            K,
            width,
            height,
            residuals=residuals,
            **options,
        )

    def densify_and_prune(self) -> None:
        """GaussianAvatars' densification step (see :mod:`geodiff4d.recon.adaptive`); world sizes on frame 0."""
        with torch.no_grad():
            face_size = triangle_frames(self.deformer(0), self.faces).size.cpu()
        grown = adaptive.grow(
            self.gaussians, self.statistics, face_size, self.extent, self.config, self.generator
        )
        self._adopt(grown)
        remove = adaptive.prune_mask(
            self.gaussians,
            self.statistics.max_radii[grown.source],
            face_size,
            self.extent,
            self.config,
            large_too=self.schedule.prunes_large(self.step_index),
        )
        self._adopt(prune(self.gaussians, remove))
        self.statistics = adaptive.DensityStatistics(len(self.gaussians))

    def _adopt(self, regrowth: Regrowth) -> None:
        """Switch to the regrown set, carrying each survivor's Adam moments (fresh children start at zero)."""
        old_state = {
            g["name"]: self.optimizer.state.get(g["params"][0], {}) for g in self.optimizer.param_groups
        }
        deformer_state = {
            p: self.optimizer.state[p] for p in self.deformer.parameters() if p in self.optimizer.state
        }
        self.gaussians = regrowth.gaussians
        self.optimizer = self._make_optimizer()
        keep = (~regrowth.fresh).float()
        for group in self.optimizer.param_groups:
            if group["name"] not in PARAMETER_NAMES:  # the deformer's parameters are the same objects
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

    def run(
        self, until: int, checkpoint: Path | None = None, on_step: Callable[[int, float], None] | None = None
    ) -> None:
        """Train to step ``until``, checkpointing every ``checkpoint_every`` steps and at the end."""
        while self.step_index < until:
            loss = self.step()
            if on_step is not None:
                on_step(self.step_index, loss)
            if checkpoint is not None and (
                self.step_index % self.config.checkpoint_every == 0 or self.step_index == until
            ):
                self.save(checkpoint)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        tensors: dict[str, Tensor] = {"gaussians/face_index": self.gaussians.face_index}
        tensors |= {f"gaussians/{k}": v for k, v in self.gaussians.tensors().items()}
        tensors |= {f"deformer/{k}": v.detach() for k, v in self.deformer.state_dict().items()}
        for group in self.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                for key, value in self.optimizer.state.get(p, {}).items():
                    tensors[f"adam/{group['name']}/{i}/{key}"] = (
                        value.reshape(-1) if value.dim() == 0 else value
                    )
        tensors["fit/rng"] = self.generator.get_state()
        statistics = self.statistics
        tensors["fit/grad_sum"], tensors["fit/grad_count"] = statistics.grad_sum, statistics.count
        tensors["fit/max_radii"] = statistics.max_radii
        metadata = {
            "step": str(self.step_index),
            "losses": json.dumps(self.losses),
            "sh_degree": str(self.gaussians.sh_degree),
            "active_sh_degree": str(self.gaussians.active_sh_degree),
            "config": json.dumps(self.config.model_dump()),
        }
        with atomic_output(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)

    @classmethod
    def resume(
        cls, path: str | Path, deformer: nn.Module, faces: Tensor, views: Sequence[View], config: FitConfig
    ) -> Fitter:
        """Rebuild a fitter from its checkpoint (the deformer's architecture is given, its weights are loaded)."""
        tensors, metadata = load_checkpoint(path)
        gaussians = load_gaussians(tensors, metadata)
        deformer.load_state_dict(
            {k[len("deformer/") :]: v for k, v in tensors.items() if k.startswith("deformer/")}
        )
        fitter = cls(gaussians, deformer, faces, views, config)
        for group in fitter.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                prefix = f"adam/{group['name']}/{i}/"
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                if state:
                    state["step"] = state["step"].reshape(())
                    fitter.optimizer.state[p] = state
        fitter.generator.set_state(tensors["fit/rng"])
        fitter.statistics.grad_sum, fitter.statistics.count = (
            tensors["fit/grad_sum"],
            tensors["fit/grad_count"],
        )
        if "fit/max_radii" in tensors:  # absent in checkpoints from before screen-size pruning
            fitter.statistics.max_radii = tensors["fit/max_radii"]
        fitter.step_index = int(metadata["step"])
        fitter.losses = json.loads(metadata["losses"])
        return fitter


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


def load_gaussians(tensors: dict[str, Tensor], metadata: dict[str, str]) -> BoundGaussians:
    """The Gaussians of a checkpoint, rendering the SH degree they trained to (all of it in older files)."""
    sh_degree = int(metadata["sh_degree"])
    active = int(metadata.get("active_sh_degree", sh_degree))
    parameters = {n: tensors[f"gaussians/{n}"] for n in PARAMETER_NAMES}
    return BoundGaussians(tensors["gaussians/face_index"], parameters, sh_degree, active)

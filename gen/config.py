"""Validated YAML config of the joint image-normal diffusion model, its training and sampling.

One file describes a whole run (model shape, data options, both training stages, sampler) so that a
run folder is reproducible from its config alone; pydantic rejects unknown or mistyped fields with
the file and field named, instead of failing deep inside a training step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from geodiff4d.core.config import StrictConfig, load_yaml_config


class UNetConfig(StrictConfig):
    """Fields passed to diffusers' UNet2DConditionModel (SD-1.5's shape in paper.yaml)."""

    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32

    @model_validator(mode="after")
    def _same_depth(self) -> UNetConfig:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types and up_block_types need {n} entries (one per block_out_channels)"
            )
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}"
            )
        return self


class ModelConfig(StrictConfig):
    unet: UNetConfig = UNetConfig()
    pretrained: str | None = None  # local SD-1.5 diffusers folder (unet/, vae/) used for initialization
    latents: Literal["vae", "pixel"] = "vae"
    vae: str | None = None  # diffusers folder holding vae/ (defaults to `pretrained`)
    pose_injection: Literal["add", "concat"] = "add"
    pose_guider_channels: tuple[int, ...] = (16, 32, 64, 128)
    expression_tokens: int = Field(4, ge=1)
    expression_dim: int = Field(16, ge=1)  # size of one 1D expression latent token (the low-dim bottleneck)
    expression_channels: tuple[int, ...] = (32, 64, 128, 256)
    driving_size: int = Field(64, ge=8)
    temporal_heads: int = Field(8, ge=1)
    # ablation switches, named as in the paper's table
    joint_normals: bool = True
    domain_attention: bool = True

    @model_validator(mode="after")
    def _vae_source(self) -> ModelConfig:
        if self.latents == "vae" and not (self.vae or self.pretrained):
            raise ValueError("latents: vae needs `vae` or `pretrained` (a local diffusers folder with vae/)")
        return self


class DataConfig(StrictConfig):
    resolution: int = Field(512, ge=8)
    # data-side ablation switches, passed through to the loader
    cross_view_pairs: bool = True
    synthetic_data: bool = True
    synthetic_weight: float = Field(0.1, ge=0)  # multi-view : synthetic = 10 : 1 per sample
    loader_workers: int = Field(0, ge=0)  # DataLoader processes per training worker (0: in-process)


class StageConfig(StrictConfig):
    batch_size: int = Field(ge=1)  # global: samples per optimizer step over all workers and accumulation
    steps: int = Field(ge=1)
    frames: int = Field(1, ge=1)  # 1 in stage 1 (no temporal layers), 16 in stage 2
    lr: float = Field(1e-5, gt=0)


class TrainConfig(StrictConfig):
    stage1: StageConfig = StageConfig(batch_size=32, steps=80_000)
    stage2: StageConfig = StageConfig(batch_size=8, steps=20_000, frames=16)
    weight_decay: float = 1e-2
    grad_accumulation: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    gradient_checkpointing: bool = False
    lr_scaling: Literal["none", "linear"] = "none"  # linear: the stage lr is per sample, times batch_size
    # condition dropout for classifier-free guidance: the sampler needs e(ref, exp), e(ref, -) and e(-, -)
    drop_both: float = Field(0.05, ge=0, le=1)  # reference and expression dropped together (unconditional)
    drop_reference: float = Field(0.05, ge=0, le=1)  # each alone, independently of the joint drop
    drop_expression: float = Field(0.05, ge=0, le=1)
    num_train_timesteps: int = Field(1000, ge=2)
    checkpoint_every: int = Field(1000, ge=1)
    # checkpoints Ray Train keeps in RUN/checkpoints, the latest always among them (None: every one; one of the
    # paper-size model is about 28 GB)
    keep_checkpoints: int | None = Field(None, ge=1)
    # deterministic GPU kernels (torch.use_deterministic_algorithms, cuBLAS workspace :4096:8): a resumed run
    # repeats the uninterrupted one exactly on a GPU too, at some speed; CPU training is exact without it
    deterministic: bool = False
    sample_every: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    count_flops: bool = True
    seed: int = 0

    def stage(self, stage: int) -> StageConfig:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        return self.stage1 if stage == 1 else self.stage2

    def worker_batch(self, stage: int, world_size: int) -> int:
        """Per-worker micro-batch of the stage's global batch, split over workers and accumulation steps."""
        global_batch, parts = self.stage(stage).batch_size, world_size * self.grad_accumulation
        if global_batch % parts:
            raise ValueError(
                f"train.stage{stage}.batch_size {global_batch} (global) is not divisible by "
                f"{world_size} worker(s) x grad_accumulation {self.grad_accumulation}"
            )
        return global_batch // parts

    def learning_rate(self, stage: int) -> float:
        """The optimizer's lr: the stage's lr as written, or times the global batch with lr_scaling: linear."""
        st = self.stage(stage)
        return st.lr * st.batch_size if self.lr_scaling == "linear" else st.lr


class SampleConfig(StrictConfig):
    scheduler: Literal["ddim", "dpmsolver++", "unipc", "ddpm"] = "ddim"
    steps: int = Field(25, ge=1)
    guidance_reference: float = Field(2.0, ge=0)
    guidance_expression: float = Field(2.0, ge=0)
    window: int = Field(16, ge=1)
    overlap: int = Field(4, ge=0)
    # (guidance branch x view) windows per denoiser call and images per VAE decode (default: every branch and
    # view of a window at once, a window's frames per decode); smaller fits smaller GPUs, at some speed
    max_batch: int | None = Field(None, ge=1)
    # speed options (gen.pipeline.speed_options): same frames up to float rounding
    compile: bool = False  # torch.compile the denoiser (eager, with a warning, where the backend fails)
    channels_last: bool = False  # channels-last memory format for the convolutions
    bf16_weights: bool = False  # bf16 weights on CUDA (half the weights' memory); ignored on the CPU
    # context frames a `generate` unit denoises on each side of the frames it writes, so neighbouring units agree
    # across the seam (None: `overlap`); fewer context frames, less denoising per written frame where the unit's
    # span then needs fewer windows (bench/results/samplers-cpu-2026-12-06.txt)
    context: int | None = Field(None, ge=0)

    @property
    def context_frames(self) -> int:
        return self.overlap if self.context is None else self.context

    @model_validator(mode="after")
    def _overlap_below_window(self) -> SampleConfig:
        if self.overlap >= self.window:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than window ({self.window})")
        return self


class GenConfig(StrictConfig):
    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()


def load_config(path: str | Path) -> GenConfig:
    return load_yaml_config(path, GenConfig)

"""Two-stage training of the joint denoiser: a plain loop (one process, or one DDP rank), and Ray Train around it.

`train_loop` is the whole algorithm (and what the unit tests run); `train` runs it in every worker of a
Ray `TorchTrainer`. Data comes from `make_batches(seed, position) -> Iterator[batch]` (the batch contract
of the loader), so a resumed run asks for the batches after the ones it already consumed; with every
worker's RNG states restored too, the resumed loss sequence of every rank equals the uninterrupted one.

Fault tolerance is Ray Train's: rank 0 writes each checkpoint into `RUN/checkpoints/` (the Ray run folder
under the storage path `RUN`, which every node must reach) and every rank reports it; after a worker dies
Ray restarts the group (`FailureConfig.max_failures` times) and `ray.train.get_checkpoint()` hands the
last reported checkpoint to the new workers; a rerun with `resume` finds Ray's snapshot the same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import EMAModel

from geodiff4d.core.config import ConfigError
from geodiff4d.core.io.images import write_png
from geodiff4d.core.io.tensors import tensor_to_image
from geodiff4d.datasets.locations import is_remote
from geodiff4d.gen.build import build_codec, build_model
from geodiff4d.gen.checkpoint import (
    CHECKPOINTS,
    RankState,
    checkpoint_name,
    latest_checkpoint,
    load_checkpoint,
    load_stage1_weights,
    save_checkpoint,
    saved_rank_states,
)
from geodiff4d.gen.config import GenConfig, load_config
from geodiff4d.gen.data import MakeBatches, check_shard_resolution, shard_batches
from geodiff4d.gen.denoiser import JointDenoiser
from geodiff4d.gen.latents import encode_domains
from geodiff4d.gen.model_run import export_pipeline, write_run_files
from geodiff4d.gen.pipeline import make_scheduler, sample_sequence

# (step, metrics, the checkpoint folder on rank 0 / None elsewhere): called by every rank at each checkpoint
Publish = Callable[[int, dict, Path | None], None]


def _frames(x: torch.Tensor, image_dims: int = 3) -> torch.Tensor:
    """[B, C, H, W] -> [B, 1, C, H, W]; clips [B, T, C, H, W] unchanged."""
    return x if x.dim() == image_dims + 2 else x[:, None]


def diffusion_loss(
    model,
    codec,
    batch: dict,
    noise_scheduler,
    generator: torch.Generator,
    cfg: GenConfig,
    device: torch.device,
) -> torch.Tensor:
    """Noise-prediction MSE over both domains; the normal domain only where the source has normals."""
    rgb = _frames(batch["rgb"]).to(device)  # [B, T, 3, R, R]
    joint = cfg.model.joint_normals
    targets = (
        torch.stack([rgb, _frames(batch["normal"]).to(device)], 1) if joint else rgb[:, None]
    )  # [B, D, T, 3, R, R]
    latents = encode_domains(codec, targets)  # [B, D, C, T, h, w]
    b, d = latents.shape[:2]
    noise = torch.randn((b, 1, *latents.shape[2:]), generator=generator).to(device).expand_as(latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(
        device
    )
    drop_ref, drop_exp = condition_dropout(b, generator, cfg)
    drop_ref, drop_exp = drop_ref.to(device), drop_exp.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    ref_latent = codec.encode(batch["ref_rgb"].to(device))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pred = model(
            noisy,
            timesteps,
            _frames(batch["posemap"]).to(device),
            ref_latent,
            batch["ref_posemap"].to(device),
            _frames(batch["driving"]).to(device),
            drop_ref,
            drop_exp,
        )
    err = (pred.float() - noise).pow(2).mean(dim=(2, 4, 5))  # [B, D, T]
    weight = torch.ones(b, d, device=device)
    if joint:
        weight[:, 1] = batch["has_normal"].to(device).float()
    return (err * weight[:, :, None]).sum() / (weight.sum() * err.shape[2])


def condition_dropout(
    batch: int, generator: torch.Generator, cfg: GenConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B] bool masks (drop reference, drop expression): both with drop_both, else each with its own rate.

    Guidance needs the unconditional prediction e(-, -); independent drops alone would train it on only
    drop_reference x drop_expression of the samples (0.25 % at 5 % each).
    """
    both = torch.rand(batch, generator=generator) < cfg.train.drop_both
    ref = both | (torch.rand(batch, generator=generator) < cfg.train.drop_reference)
    exp = both | (torch.rand(batch, generator=generator) < cfg.train.drop_expression)
    return ref, exp


def gather_rank_states(state: RankState, world_size: int) -> list[RankState]:
    """Every rank's state, in rank order, on every rank (a collective: all ranks call it together)."""
    if world_size == 1:
        return [state]
    states: list[RankState | None] = [None] * world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _preview(model: JointDenoiser, codec, batch: dict, cfg: GenConfig, seed: int) -> torch.Tensor:
    """Rows of [reference, target rgb, sampled rgb, target normal, sampled normal] -> grid image [3, H, W]."""
    from torchvision.utils import make_grid

    rows = []
    for i in range(min(2, batch["rgb"].shape[0])):
        pose, drv = _frames(batch["posemap"])[i], _frames(batch["driving"])[i]
        out = sample_sequence(
            model,
            codec,
            batch["ref_rgb"][i],
            batch["ref_posemap"][i],
            drv,
            pose,
            torch.Generator().manual_seed(seed),
            cfg.sample.scheduler,
            cfg.sample.steps,
            cfg.sample.guidance_reference,
            cfg.sample.guidance_expression,
            cfg.sample.window,
            cfg.sample.overlap,
            cfg.train.num_train_timesteps,
        )
        row = [batch["ref_rgb"][i], _frames(batch["rgb"])[i][0], out.rgb[0].cpu()]
        if out.normal is not None:
            row += [_frames(batch["normal"])[i][0], out.normal[0].cpu()]
        rows += row
    return make_grid(torch.stack(rows), nrow=len(row), padding=1)


@dataclass
class _Trainer:
    """What one rank trains with: model, optimizer, EMA, the per-step RNG and how far it got."""

    model: JointDenoiser
    codec: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMAModel
    generator: torch.Generator
    step: int = 0
    position: int = 0  # micro-batches consumed from make_batches


def _build_trainer(
    cfg: GenConfig,
    stage: int,
    device: torch.device,
    init: Path | None,
    restore: Path | None,
    rank: int,
    world_size: int,
) -> _Trainer:
    """Build the model (from `init`'s stage 1 weights or pretrained parts) and optimizer; restore a checkpoint."""
    torch.manual_seed(cfg.train.seed)  # parameter init only; everything per-step uses `generator`
    codec = build_codec(cfg).to(device)
    model = build_model(cfg, stage, codec, from_pretrained=init is None)
    if init is not None:
        load_stage1_weights(model, init)
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.train.learning_rate(stage), weight_decay=cfg.train.weight_decay
    )
    ema = EMAModel(model.parameters(), decay=cfg.train.ema_decay)
    trainer = _Trainer(
        model, codec, params, optimizer, ema, torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    )
    if restore is not None:
        trainer.step, mine = load_checkpoint(restore, model, ema, optimizer, rank, world_size)
        mine.restore(trainer.generator)
        trainer.position = mine.position
    ema.to(device)
    return trainer


def _open_logs(
    cfg: GenConfig,
    stage: int,
    out: Path,
    trainer: _Trainer,
    total: int,
    resumed: bool,
    make_batches: MakeBatches,
    device: torch.device,
) -> tuple[Any, Any]:
    """TensorBoard writer and progress bar of rank 0 (prints the FLOP counts of a fresh run when asked)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    # a restart repeats the steps after its checkpoint: drop what the lost attempt logged for them
    writer = SummaryWriter(str(out / "tensorboard"), purge_step=trainer.step + 1 if resumed else None)
    bar = tqdm(total=total, initial=trainer.step, desc=f"stage {stage}", unit="step")
    if cfg.train.count_flops and not resumed:
        _print_counts(trainer.model, trainer.codec, next(make_batches(cfg.train.seed, 0)), cfg, device)
    return writer, bar


def _optimizer_step(
    trainer: _Trainer,
    net: torch.nn.Module,
    batches: Iterator[dict],
    noise_scheduler,
    micro_batch: int,
    cfg: GenConfig,
    device: torch.device,
) -> float:
    """One optimizer step over `grad_accumulation` micro-batches; returns the step's mean loss."""
    step_loss = 0.0
    for _ in range(cfg.train.grad_accumulation):
        batch = next(batches)
        if len(batch["rgb"]) != micro_batch:
            raise ValueError(
                f"make_batches gave {len(batch['rgb'])} samples; the config's global batch "
                f"asks {micro_batch} per worker and accumulation step"
            )
        loss = diffusion_loss(net, trainer.codec, batch, noise_scheduler, trainer.generator, cfg, device)
        (loss / cfg.train.grad_accumulation).backward()
        step_loss += loss.item() / cfg.train.grad_accumulation
        trainer.position += 1
    torch.nn.utils.clip_grad_norm_(trainer.params, cfg.train.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.ema.step(trainer.model.parameters())
    trainer.step += 1
    return step_loss


def _log_step(bar: Any, writer: Any, step: int, step_loss: float, rate: float, cfg: GenConfig) -> None:
    """Progress bar every step, TensorBoard scalars every `log_every` steps (each only where it exists)."""
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", steps_per_s=f"{rate:.2f}")
    if writer is not None and step % cfg.train.log_every == 0:
        writer.add_scalar("train/loss", step_loss, step)
        writer.add_scalar("train/steps_per_s", rate, step)


def _checkpoint(
    trainer: _Trainer, out: Path, step_loss: float, rank: int, world_size: int, publish: Publish | None
) -> None:
    """Gather every rank's RNG state; rank 0 writes the checkpoint, then `publish` runs on every rank."""
    ranks = gather_rank_states(RankState.capture(trainer.generator, trainer.position), world_size)
    t = trainer
    folder = save_checkpoint(out, t.model, t.ema, t.optimizer, t.step, ranks) if rank == 0 else None
    if publish is not None:
        publish(t.step, {"loss": step_loss, "step": t.step}, folder)


def train_loop(
    cfg: GenConfig,
    stage: int,
    make_batches: MakeBatches,
    out: Path,
    max_steps: int | None = None,
    init: Path | None = None,
    restore: Path | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    publish: Publish | None = None,
    quiet: bool = False,
) -> list[float]:
    """Train stage 1 or 2 until the stage's step count (or max_steps); returns this rank's loss of every step run.

    restore: a checkpoint folder to continue from (rank `rank` of `world_size` takes its own RankState).
    Checkpoints are written by rank 0 into `out/checkpoints/`, then `publish` is called on every rank.
    """
    out, device = Path(out), device or torch.device("cpu")
    micro_batch = cfg.train.worker_batch(stage, world_size)
    if rank == 0:
        write_run_files(out, cfg)  # the run folder alone is enough to sample
    trainer = _build_trainer(cfg, stage, device, init, restore, rank, world_size)
    net = wrap(trainer.model) if wrap else trainer.model
    total = min(cfg.train.stage(stage).steps, max_steps) if max_steps else cfg.train.stage(stage).steps
    noise_scheduler = make_scheduler("ddpm", cfg.train.num_train_timesteps)
    batches = make_batches(cfg.train.seed + rank, trainer.position)
    writer = bar = None
    if rank == 0 and not quiet:
        writer, bar = _open_logs(cfg, stage, out, trainer, total, restore is not None, make_batches, device)
    preview = next(make_batches(cfg.train.seed + 10**6, 0)) if writer else None
    losses: list[float] = []
    started = time.perf_counter()
    while trainer.step < total:
        step_loss = _optimizer_step(trainer, net, batches, noise_scheduler, micro_batch, cfg, device)
        step = trainer.step
        losses.append(step_loss)
        _log_step(bar, writer, step, step_loss, len(losses) / (time.perf_counter() - started), cfg)
        done = step == total
        if step % cfg.train.checkpoint_every == 0 or done:
            _checkpoint(trainer, out, step_loss, rank, world_size, publish)
        if writer is not None and (step % cfg.train.sample_every == 0 or done):
            _write_preview(trainer.model, trainer.ema, trainer.codec, preview, cfg, writer, out, step)
    if writer is not None:
        writer.close()
        bar.close()
    if rank == 0 and losses:
        export_pipeline(out)  # RUN/pipeline: DiffusionPipeline.from_pretrained loads it
    return losses


def _print_counts(model, codec, batch: dict, cfg: GenConfig, device: torch.device) -> None:
    from geodiff4d.gen.flops import format_counts, module_counts

    one = {k: v[:1] for k, v in batch.items() if torch.is_tensor(v)}
    rgb = _frames(one["rgb"]).to(device)
    latent = encode_domains(codec, torch.stack([rgb] * model.num_domains, 1))
    inputs = (
        latent,
        torch.zeros(1, dtype=torch.long, device=device),
        _frames(one["posemap"]).to(device),
        codec.encode(one["ref_rgb"].to(device)),
        one["ref_posemap"].to(device),
        _frames(one["driving"]).to(device),
    )
    print(format_counts(module_counts(model, inputs)), flush=True)


def _write_preview(model, ema, codec, batch, cfg, writer, out: Path, step: int) -> None:
    params = list(model.parameters())
    ema.store(params)
    ema.copy_to(params)
    model.eval()
    try:
        grid = _preview(model, codec, batch, cfg, cfg.train.seed)
    finally:
        ema.restore(params)
        model.train()
    writer.add_image("samples", grid, step)
    write_png(out / "samples" / f"step_{step:07d}.png", tensor_to_image(grid), encoder="pillow")


def _report_to_ray(step: int, metrics: dict, folder: Path | None) -> None:
    """Every rank reports; rank 0's checkpoint is already in Ray's run folder, so Ray only registers it."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    ray.train.report(
        metrics,
        checkpoint=Checkpoint(str(folder)) if folder else None,
        checkpoint_dir_name=checkpoint_name(step),
        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
    )


def use_deterministic_kernels() -> None:
    """Kernels that give the same bits on every run: cuBLAS needs a fixed workspace (set before its first call
    in this process), and torch then refuses an op that has no deterministic kernel instead of running it."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)


def _worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from geodiff4d.core.jobs import use_cpus

    use_cpus(config["cpus"])
    cfg = GenConfig.model_validate(config["cfg"])
    if cfg.train.deterministic:
        use_deterministic_kernels()
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    make_batches = config["make_batches"] or shard_batches(
        config["shards"], cfg, config["stage"], cfg.data.loader_workers, world_size
    )
    # Ray's last reported checkpoint (a restart after a failure, or a rerun of a run with Ray's snapshot);
    # else the run's latest checkpoint when resuming one that Ray never registered (e.g. written by train_loop)
    reported = ray.train.get_checkpoint()
    restore = Path(reported.path) if reported else config["resume_from"]
    train_loop(
        cfg,
        config["stage"],
        make_batches,
        Path(config["out"]),
        config["max_steps"],
        config["init"],
        restore,
        ray.train.torch.get_device(),
        rank,
        world_size,
        wrap=lambda m: ray.train.torch.prepare_model(
            m, parallel_strategy_kwargs={"find_unused_parameters": True}
        ),
        publish=_report_to_ray,
        quiet=config["quiet"],
    )


def _checked_inputs(
    config_path: str | Path,
    cfg: GenConfig,
    stage: int,
    shards: str | Path | None,
    out: Path,
    init: str | Path | None,
    resume: bool,
    workers: int,
    make_batches: MakeBatches | None,
) -> Path | None:
    """Every user error before Ray starts, as a ConfigError naming the input; returns the checkpoint to resume."""
    if stage == 2 and init is None and not resume:
        raise ConfigError("stage 2 starts from a stage-1 run: pass init (the stage-1 run folder)")
    if shards is None and make_batches is None:
        raise ConfigError("give shards (a folder of WebDataset shards) or make_batches")
    try:
        cfg.train.worker_batch(stage, workers)
        if shards is not None:
            check_shard_resolution(shards, cfg)
    except ValueError as err:
        raise ConfigError(f"{config_path}: {err}") from err
    latest = latest_checkpoint(out)
    if latest is None:
        return None
    if not resume:
        raise ConfigError(
            f"{out} already holds a run (latest checkpoint {latest.name}): resume it, or train "
            f"into another folder"
        )
    try:
        saved_rank_states(latest, workers)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return latest


def _torch_trainer(
    loop_config: dict,
    out: Path,
    workers: int,
    cpus: float,
    gpus_per_worker: float,
    max_failures: int,
    keep_checkpoints: int | None,
) -> Any:
    """A Ray `TorchTrainer` running `_worker` on `workers` ranks, storing its checkpoints under `out`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus, "GPU": gpus_per_worker} if gpus_per_worker else {"CPU": cpus}
    return TorchTrainer(
        _worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            storage_path=str(out),
            name=CHECKPOINTS,
            failure_config=FailureConfig(max_failures),
            # Ray Train deletes all but the latest `keep_checkpoints` (it never deletes the latest: resume)
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )


def train(
    config_path: str | Path,
    stage: int,
    shards: str | Path | None,
    out: str | Path,
    max_steps: int | None = None,
    init: str | Path | None = None,
    resume: bool = False,
    workers: int = 1,
    gpus_per_worker: float | None = None,
    address: str | None = None,
    make_batches: MakeBatches | None = None,
    quiet: bool = False,
    max_failures: int = 3,
) -> Path:
    """Run one training stage on Ray Train (DDP over `workers`); returns the run's latest checkpoint folder.

    `out` is Ray Train's storage path, so on a multi-node cluster it must be a folder every node mounts.
    `gpus_per_worker` None: one GPU per worker when the cluster has GPUs, else the CPU.
    A worker that dies restarts the group from the last checkpoint, at most `max_failures` times.
    """
    import ray

    cfg = load_config(config_path)
    out = Path(out).resolve()  # Ray Train workers run in their own working directory
    shards = Path(shards).resolve() if shards is not None and not is_remote(shards) else shards
    resume_from = _checked_inputs(config_path, cfg, stage, shards, out, init, resume, workers, make_batches)
    if not ray.is_initialized():
        from geodiff4d.core.runtime import connect

        connect(address)
    from geodiff4d.core.jobs import check_workers_see_gpus, default_gpus_per_worker, worker_cpus

    gpus = default_gpus_per_worker(gpus_per_worker)
    cpus = worker_cpus(workers, None, gpus)
    check_workers_see_gpus(cpus, gpus)
    loop_config = {
        "cfg": cfg.model_dump(),
        "stage": stage,
        "shards": str(shards) if shards else None,
        "out": str(out),
        "max_steps": max_steps,
        "init": Path(init).resolve() if init else None,
        "resume_from": resume_from,
        "make_batches": make_batches,
        "quiet": quiet,
        "cpus": cpus,
    }
    trainer = _torch_trainer(loop_config, out, workers, cpus, gpus, max_failures, cfg.train.keep_checkpoints)
    result = trainer.fit()
    latest = Path(result.checkpoint.path) if result.checkpoint else latest_checkpoint(out)
    if latest is None:
        raise RuntimeError(f"{out}: training finished without writing a checkpoint")
    return latest

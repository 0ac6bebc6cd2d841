"""Sampler: reference image + driving frames + target pose maps -> RGB frames, normal maps, expression latents.

Classifier-free guidance is compositional over the two conditions (training drops both together, with
train.drop_both, and the expression alone): eps = e_none + g_ref (e_ref - e_none) + g_exp (e_full - e_ref). Sequences longer
than a window are denoised in overlapping temporal windows whose noise predictions are blended with
tent weights at every step, so neighbouring windows agree where they overlap.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from geodiff4d.core.io.images import write_png
from geodiff4d.core.io.tensors import tensor_to_image
from geodiff4d.gen.denoiser import Conditions, JointDenoiser
from geodiff4d.gen.latents import decode_domains

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
_SCHEDULERS = {
    "ddpm": lambda n: DDPMScheduler(num_train_timesteps=n, clip_sample=False, **_SD_BETAS),
    "ddim": lambda n: DDIMScheduler(
        num_train_timesteps=n, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **_SD_BETAS
    ),
    "dpmsolver++": lambda n: DPMSolverMultistepScheduler(
        num_train_timesteps=n, algorithm_type="dpmsolver++", **_SD_BETAS
    ),
    "unipc": lambda n: UniPCMultistepScheduler(num_train_timesteps=n, **_SD_BETAS),
}


def make_scheduler(name: str, num_train_timesteps: int = 1000):
    """The noise schedule is SD-1.5's for every scheduler, so a model trained with one samples with any."""
    if name not in _SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(_SCHEDULERS)}, got {name!r}")
    return _SCHEDULERS[name](num_train_timesteps)


def temporal_windows(frames: int, window: int, overlap: int) -> list[range]:
    """Windows of `window` frames advancing by window - overlap; the last is aligned to the end."""
    if overlap >= window:
        raise ValueError(f"overlap ({overlap}) must be smaller than window ({window})")
    if frames <= window:
        return [range(frames)]
    starts = list(range(0, frames - window, window - overlap)) + [frames - window]
    return [range(s, s + window) for s in starts]


@dataclass
class SampleOutput:
    rgb: torch.Tensor  # [T, 3, H, W] in [0, 1] ([N, T, 3, H, W] from denoise_views)
    normal: torch.Tensor | None  # like rgb, (n+1)/2 encoded; None without joint normals
    expression: torch.Tensor  # [T, K, d] expression latents


@dataclass(frozen=True)
class Guidance:
    """Sampler settings besides the scheduler (SampleConfig's fields)."""

    steps: int = 25
    reference: float = 2.0
    expression: float = 2.0
    window: int = 16
    overlap: int = 4
    # (guidance branch x view) windows per denoiser call and images per VAE decode call (None: every branch and
    # view of a window in one call, and a window's frames per decode): bounds peak memory whatever the views and
    # frames of a unit
    max_batch: int | None = None


def latent_shape(codec, views: int, frames: int, size: tuple[int, int]) -> tuple[int, ...]:
    """The noise shape [N, C, T, h, w] of N views of T frames at image size (H, W)."""
    return (views, codec.channels, frames, size[0] // codec.downscale, size[1] // codec.downscale)


def _repeat(conds: list[Conditions], views: int, frames: range) -> Conditions:
    """CFG branches x views, branch-major: [c0]*N + [c1]*N + ... (each condition has batch 1)."""

    def cat(tensors):
        return torch.cat([t.expand(views, *t.shape[1:]) for t in tensors])

    return Conditions(
        {k: cat([c.reference[k] for c in conds]) for k in conds[0].reference},
        cat([c.context[:, frames.start : frames.stop] for c in conds]),
        cat([c.expression for c in conds]),
    )


def _denoise_in_chunks(
    model: JointDenoiser,
    x_in: torch.Tensor,
    t: torch.Tensor,
    posemaps: torch.Tensor,
    conds: Conditions,
    max_batch: int | None,
) -> torch.Tensor:
    """model.denoise over x_in [B, D, C, T, h, w] (posemaps [B, T, 3, H, W], conds of batch B) at most
    ``max_batch`` samples per call; samples never attend to each other, so the chunks make the same prediction."""
    step = max_batch or len(x_in)

    def part(i: int) -> Conditions:
        return Conditions(
            {k: v[i : i + step] for k, v in conds.reference.items()},
            conds.context[i : i + step],
            conds.expression[i : i + step],
        )

    return torch.cat(
        [
            model.denoise(
                x_in[i : i + step], t.expand(len(x_in[i : i + step])), posemaps[i : i + step], part(i)
            )
            for i in range(0, len(x_in), step)
        ]
    )


def _tent(length: int, device: torch.device) -> torch.Tensor:
    return torch.minimum(torch.arange(1, length + 1), torch.arange(length, 0, -1)).float().to(device)


def initial_latents(scheduler, noise: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The latents the first denoising step starts from: noise [N, C, T, h, w] with its per-channel mean over
    the image replaced by each domain's expected mean means [D, C], at the first timestep's noise level
    -> [N, D, C, T, h, w] (the noise shared by the domains, as in training).

    SD's noise schedule keeps part of the image at its first sampling step (sqrt(alpha_bar) = 0.09 at t = 951
    for DDIM with 20 leading steps: non-zero terminal SNR, Lin et al., WACV 2024), and a model trained on it
    reads an image's mean colour from that part. Pure noise has a random mean per frame, which the model turned
    into a random colour cast per frame (pixel PSNR 13 dB against the targets); with the reference image's
    mean (RGB) and the reference pose map's (normals) it is 28 dB for the demo model.
    """
    start = scheduler.timesteps[:1].repeat(noise.shape[0])
    shared = noise - noise.mean(dim=(-2, -1), keepdim=True)
    mean_images = means[None, :, :, None, None, None].expand(noise.shape[0], -1, -1, *noise.shape[2:])
    return scheduler.add_noise(mean_images, shared[:, None].expand_as(mean_images), start)


def _cfg_conditions(
    model: JointDenoiser,
    ref_latent: torch.Tensor,
    ref_posemap: torch.Tensor,
    driving: torch.Tensor,
    device: torch.device,
) -> list[Conditions]:
    """The three classifier-free guidance branches: full, reference only (no expression), none."""
    yes, no = (torch.full((1,), v, dtype=torch.bool, device=device) for v in (True, False))
    return [
        model.encode_conditions(
            ref_latent,
            ref_posemap[None].to(device),
            driving[None].to(device),
            drop_reference=dr,
            drop_expression=de,
        )
        for dr, de in ((no, no), (no, yes), (yes, yes))
    ]


def _guided_noise(
    model: JointDenoiser,
    scheduler,
    x: torch.Tensor,
    t: torch.Tensor,
    conds: list[Conditions],
    posemaps: torch.Tensor,
    windows: list[range],
    g: Guidance,
    autocast: torch.autocast,
) -> torch.Tensor:
    """Guided noise for latents [N, D, C, T, h, w] at step t, tent-blended over windows."""
    views, frames = posemaps.shape[:2]
    eps = torch.zeros_like(x)
    weight = torch.zeros(frames, device=x.device)
    for win in windows:
        x_in = scheduler.scale_model_input(x[:, :, :, win.start : win.stop], t).repeat(
            3, 1, 1, 1, 1, 1
        )  # [3N, ...]
        with autocast:
            e_full, e_ref, e_none = (
                _denoise_in_chunks(
                    model,
                    x_in,
                    t,
                    posemaps[:, win.start : win.stop].repeat(3, 1, 1, 1, 1),
                    _repeat(conds, views, win),
                    g.max_batch,
                )
                .float()
                .chunk(3)
            )
        guided = e_none + g.reference * (e_ref - e_none) + g.expression * (e_full - e_ref)
        tent = _tent(len(win), x.device)
        eps[:, :, :, win.start : win.stop] += guided * tent.view(1, 1, 1, -1, 1, 1)
        weight[win.start : win.stop] += tent
    return eps / weight.view(1, 1, 1, -1, 1, 1)


def _compile_works(device: torch.device) -> str | None:
    """None when torch.compile's default backend builds and runs a one-line function on `device`, else why not
    (inductor needs a C++ compiler on the CPU, Triton on a GPU)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as error:  # noqa: BLE001 - any backend failure means: sample uncompiled
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def speed_options(
    model: JointDenoiser,
    device: torch.device,
    *,
    compile: bool = False,
    channels_last: bool = False,
    bf16_weights: bool = False,
) -> JointDenoiser:
    """The sampling model on `device` with the sample config's speed options; each changes speed, not what is
    sampled (tests/test_gen_pipeline.py compares them on the CPU). bf16 weights halve the weights' memory on a
    GPU, where sampling runs under bf16 autocast anyway; on the CPU (fp32 sampling) they are ignored with a
    warning. compile falls back to eager with a warning where the backend does not work."""
    model = model.to(device)
    if bf16_weights and device.type == "cuda":
        model = model.to(torch.bfloat16)
    elif bf16_weights:
        warnings.warn(
            f"sample.bf16_weights ignored on {device.type}: bf16 weights are for CUDA", stacklevel=2
        )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        problem = _compile_works(device)
        if problem is None:
            model.denoise = torch.compile(model.denoise)  # the per-step call; conditions are encoded once
        else:
            warnings.warn(
                f"sample.compile skipped: torch.compile does not work here ({problem})", stacklevel=2
            )
    return model


@contextlib.contextmanager
def thread_count_free_kernels(device: torch.device) -> Iterator[None]:
    """On the CPU, oneDNN's convolutions split their work by the thread count for some batch shapes (1 and 2
    threads differ in the last bit at 12 samples), and `generate`'s actors get a node's CPUs shared by the worker
    count; torch's own convolutions split over the batch only, so frames do not depend on how many workers run
    (about as fast at the demo's size). No effect on a GPU."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = device.type != "cpu"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@torch.no_grad()
def denoise_views(
    model: JointDenoiser,
    codec,
    scheduler,
    ref_rgb: torch.Tensor,
    ref_posemap: torch.Tensor,
    driving: torch.Tensor,
    posemaps: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator,
    guidance: Guidance = Guidance(),
) -> SampleOutput:
    """All N target views of one sequence denoised as one batch (they share reference and expression).

    ref_rgb/ref_posemap [3, H, W], driving [T, 3, r, r], posemaps [N, T, 3, H, W] (all [0,1]), noise
    [N, C, T, h, w] (shared by both domains) -> SampleOutput with rgb/normal [N, T, 3, H, W]. `scheduler` is
    a diffusers scheduler (its timesteps are set here). bf16 autocast on CUDA, fp32 elsewhere.
    """
    if driving.shape[0] != posemaps.shape[1]:
        raise ValueError(f"driving has {driving.shape[0]} frames but posemaps has {posemaps.shape[1]}")
    device, frames = next(model.parameters()).device, posemaps.shape[1]
    with thread_count_free_kernels(device):
        scheduler.set_timesteps(guidance.steps, device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            ref_latent = codec.encode(ref_rgb[None].to(device))
            conds = _cfg_conditions(model, ref_latent, ref_posemap, driving, device)
        d = model.num_domains
        with autocast:  # the normal domain's expected mean: the reference pose map's
            domains = [ref_latent, codec.encode(ref_posemap[None].to(device))] if d == 2 else [ref_latent]
            means = torch.cat(domains).float().mean(dim=(2, 3))  # [D, C]
        x = initial_latents(scheduler, noise.to(device).float(), means)  # [N, D, C, T, h, w]
        windows = temporal_windows(frames, guidance.window, guidance.overlap)
        posemaps = posemaps.to(device)
        # stochastic steps (DDPM) draw from the generator; UniPC's step takes none
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        for t in scheduler.timesteps:
            eps = _guided_noise(model, scheduler, x, t, conds, posemaps, windows, guidance, autocast)
            x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
        with autocast:
            decode_batch = guidance.max_batch or guidance.window
            images = decode_domains(codec, x, decode_batch).float()  # [N, D, T, 3, H, W]
        return SampleOutput(images[:, 0], images[:, 1] if d == 2 else None, conds[0].expression[0].float())


def sample_sequence(
    model: JointDenoiser,
    codec,
    ref_rgb: torch.Tensor,
    ref_posemap: torch.Tensor,
    driving: torch.Tensor,
    posemaps: torch.Tensor,
    generator: torch.Generator,
    scheduler: str = "ddim",
    steps: int = 25,
    guidance_reference: float = 2.0,
    guidance_expression: float = 2.0,
    window: int = 16,
    overlap: int = 4,
    num_train_timesteps: int = 1000,
) -> SampleOutput:
    """One target view: ref_rgb/ref_posemap [3, H, W], driving [T, 3, r, r], posemaps [T, 3, H, W] -> SampleOutput."""
    if driving.shape[0] != posemaps.shape[0]:
        raise ValueError(f"driving has {driving.shape[0]} frames but posemaps has {posemaps.shape[0]}")
    noise = torch.randn(
        latent_shape(codec, 1, driving.shape[0], ref_rgb.shape[-2:]),
        generator=generator,
        device=generator.device,
    )
    out = denoise_views(
        model,
        codec,
        make_scheduler(scheduler, num_train_timesteps),
        ref_rgb,
        ref_posemap,
        driving,
        posemaps[None],
        noise,
        generator,
        Guidance(steps, guidance_reference, guidance_expression, window, overlap),
    )
    return SampleOutput(out.rgb[0], None if out.normal is None else out.normal[0], out.expression)


def write_grid(path: Path, rows: list[torch.Tensor]) -> None:
    from torchvision.utils import make_grid

    grid = make_grid(torch.cat([r.cpu() for r in rows]), nrow=rows[0].shape[0], padding=1)  # [3, H', W']
    write_png(path, tensor_to_image(grid), encoder="pillow")

"""Sampler: reference image + driving frames + target pose maps -> RGB frames, normal maps, expression latents.

Classifier-free guidance is compositional over the two conditions (training drops both together, with
train.drop_both, and the expression alone): eps = e_none + g_ref (e_ref - e_none) + g_exp (e_full - e_ref). Sequences longer
than a window are denoised in overlapping temporal windows whose noise predictions are blended with
tent weights at every step, so neighbouring windows agree where they overlap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from geodiff4d.cluster.atomic import atomic_output
from geodiff4d.gen.denoiser import Conditions, JointDenoiser
from geodiff4d.gen.latents import decode_domains

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
_SCHEDULERS = {
    "ddpm": lambda n: DDPMScheduler(num_train_timesteps=n, clip_sample=False, **_SD_BETAS),
    "ddim": lambda n: DDIMScheduler(num_train_timesteps=n, clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, **_SD_BETAS),
    "dpmsolver++": lambda n: DPMSolverMultistepScheduler(num_train_timesteps=n, algorithm_type="dpmsolver++",
                                                         **_SD_BETAS),
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
    rgb: torch.Tensor            # [T, 3, H, W] in [0, 1]
    normal: torch.Tensor | None  # [T, 3, H, W] in [0, 1], (n+1)/2 encoded; None without joint normals
    expression: torch.Tensor     # [T, K, d] expression latents


def _stack(conds: list[Conditions], frames: range) -> Conditions:
    return Conditions({k: torch.cat([c.reference[k] for c in conds]) for k in conds[0].reference},
                      torch.cat([c.context[:, frames.start:frames.stop] for c in conds]),
                      torch.cat([c.expression for c in conds]))


@torch.no_grad()
def sample_sequence(model: JointDenoiser, codec, ref_rgb: torch.Tensor, ref_posemap: torch.Tensor,
                    driving: torch.Tensor, posemaps: torch.Tensor, generator: torch.Generator,
                    scheduler: str = "ddim", steps: int = 25, guidance_reference: float = 2.0,
                    guidance_expression: float = 2.0, window: int = 16, overlap: int = 4,
                    num_train_timesteps: int = 1000) -> SampleOutput:
    """ref_rgb/ref_posemap [3, H, W], driving [T, 3, r, r], posemaps [T, 3, H, W] (all [0,1]) -> SampleOutput."""
    if driving.shape[0] != posemaps.shape[0]:
        raise ValueError(f"driving has {driving.shape[0]} frames but posemaps has {posemaps.shape[0]}")
    device = next(model.parameters()).device
    sched = make_scheduler(scheduler, num_train_timesteps)
    sched.set_timesteps(steps, device=device)
    frames = driving.shape[0]
    ref_latent = codec.encode(ref_rgb[None].to(device))
    yes, no = torch.ones(1, dtype=torch.bool, device=device), torch.zeros(1, dtype=torch.bool, device=device)
    full, ref_only, none = (model.encode_conditions(ref_latent, ref_posemap[None].to(device), driving[None].to(device),
                                                    drop_reference=dr, drop_expression=de)
                            for dr, de in ((no, no), (no, yes), (yes, yes)))
    d, c, (h, w) = model.num_domains, ref_latent.shape[1], ref_latent.shape[2:]
    noise = torch.randn((1, 1, c, frames, h, w), generator=generator, device=generator.device).to(device)
    x = noise.expand(1, d, c, frames, h, w) * sched.init_noise_sigma  # both domains share the noise
    windows = temporal_windows(frames, window, overlap)
    posemaps = posemaps.to(device)
    for t in sched.timesteps:
        eps = torch.zeros_like(x)
        weight = torch.zeros(frames, device=device)
        for win in windows:
            x_in = sched.scale_model_input(x[:, :, :, win.start:win.stop], t).expand(3, -1, -1, -1, -1, -1)
            e_full, e_ref, e_none = model.denoise(x_in, t.expand(3), posemaps[None, win.start:win.stop].expand(3, -1, -1, -1, -1),
                                                  _stack([full, ref_only, none], win)).chunk(3)
            guided = e_none + guidance_reference * (e_ref - e_none) + guidance_expression * (e_full - e_ref)
            tent = torch.minimum(torch.arange(1, len(win) + 1), torch.arange(len(win), 0, -1)).float().to(device)
            eps[:, :, :, win.start:win.stop] += guided * tent.view(1, 1, 1, -1, 1, 1)
            weight[win.start:win.stop] += tent
        eps = eps / weight.view(1, 1, 1, -1, 1, 1)
        x = sched.step(eps, t, x, generator=generator).prev_sample
    images = decode_domains(codec, x)[0]  # [D, T, 3, H, W]
    return SampleOutput(images[0], images[1] if d == 2 else None, full.expression[0])


def sample(config_path: str | Path, run: str | Path, ref_rgb: torch.Tensor, ref_posemap: torch.Tensor,
           driving: torch.Tensor, posemaps: torch.Tensor, seed: int = 0, out: str | Path | None = None) -> SampleOutput:
    """Sample with a run's EMA weights (run folder or save_pretrained folder) and the config's sampler settings.

    With `out`, writes a grid image (rows: RGB frames, normal frames) there atomically.
    """
    from geodiff4d.gen.build import build_codec
    from geodiff4d.gen.checkpoint import resolve_init
    from geodiff4d.gen.config import load_config
    cfg = load_config(config_path)
    model = JointDenoiser.from_pretrained(str(resolve_init(Path(run)))).eval()
    s = cfg.sample
    result = sample_sequence(model, build_codec(cfg), ref_rgb, ref_posemap, driving, posemaps,
                             torch.Generator().manual_seed(seed), s.scheduler, s.steps, s.guidance_reference,
                             s.guidance_expression, s.window, s.overlap, cfg.train.num_train_timesteps)
    if out is not None:
        write_grid(Path(out), [result.rgb] + ([result.normal] if result.normal is not None else []))
    return result


def save_image(path: Path, image: torch.Tensor) -> None:
    """[3, H, W] in [0,1] -> an 8-bit PNG at ``path``, written atomically."""
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray((image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")).save(tmp, format="PNG")


def write_grid(path: Path, rows: list[torch.Tensor]) -> None:
    from torchvision.utils import make_grid

    save_image(path, make_grid(torch.cat([r.cpu() for r in rows]), nrow=rows[0].shape[0], padding=1))

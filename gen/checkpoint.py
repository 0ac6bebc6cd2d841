"""Training checkpoints: diffusers save_pretrained folders plus what an exact resume needs.

Layout of `RUN/checkpoints/step_{step:07d}/`: `model/` and `ema/` (save_pretrained, safetensors; `ema/` is
what sampling and stage 2 load), `training_state.pt` (optimizer, EMA counters, step, data position, RNG
states). A checkpoint is written under a temporary name and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from geodiff4d.gen.denoiser import JointDenoiser

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class TrainingState:
    step: int
    position: int               # batches consumed from make_batches(seed, 0)
    generator_state: torch.Tensor


def _ema_weights_saved(model: JointDenoiser, ema: EMAModel, folder: Path) -> None:
    params = list(model.parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        ema.restore(params)


def save_checkpoint(run: Path, model: JointDenoiser, ema: EMAModel, optimizer: torch.optim.Optimizer,
                    state: TrainingState) -> Path:
    final = Path(run) / "checkpoints" / f"step_{state.step:07d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    model.save_pretrained(tmp / "model", safe_serialization=True)
    _ema_weights_saved(model, ema, tmp / "ema")
    ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    torch.save({"optimizer": optimizer.state_dict(), "ema": ema_meta, "step": state.step,
                "position": state.position, "generator_state": state.generator_state}, tmp / "training_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((Path(run) / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model weights (expected a save_pretrained folder)")
    return load_file(str(path))


def load_checkpoint(folder: Path, model: JointDenoiser, ema: EMAModel,
                    optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore model, EMA and optimizer in place from a checkpoint folder; returns step, data position, RNG."""
    folder = Path(folder)
    model.load_state_dict(_weights_of(folder / "model"))
    shadow = _weights_of(folder / "ema")
    saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    device = next(model.parameters()).device
    ema.load_state_dict({**saved["ema"], "shadow_params": [shadow[n].to(device) for n, _ in model.named_parameters()]})
    optimizer.load_state_dict(saved["optimizer"])
    return TrainingState(saved["step"], saved["position"], saved["generator_state"])


def resolve_init(init: Path) -> Path:
    """A save_pretrained folder as given, or a run folder -> the EMA weights of its latest checkpoint."""
    init = Path(init)
    if (init / WEIGHTS).is_file():
        return init
    latest = latest_checkpoint(init)
    if latest is None:
        raise FileNotFoundError(f"{init}: neither a save_pretrained folder nor a run with checkpoints/step_*")
    return latest / "ema"


def load_stage1_weights(model: JointDenoiser, init: Path) -> None:
    """Stage 2 starts from stage 1: every weight but the new temporal layers must be present."""
    folder = resolve_init(init)
    missing, unexpected = model.load_state_dict(_weights_of(folder), strict=False)
    bad = [k for k in missing if ".processor.temporal." not in k]
    if bad or unexpected:
        raise ValueError(f"{folder}: weights do not fit this model; missing {bad[:5]}, unexpected {unexpected[:5]}")

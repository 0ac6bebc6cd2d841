"""Training checkpoints: diffusers save_pretrained folders plus what an exact resume needs on every worker.

Layout of `RUN/checkpoints/step_{step:07d}/`: `model/` and `ema/` (save_pretrained, safetensors; `ema/` is
what sampling and stage 2 load), `training_state.pt` (optimizer, EMA counters, step) and `ranks.pt` (one
RankState per DDP worker: its RNG streams and data position). `RUN/checkpoints/` is also the Ray Train run
folder (its snapshot of reported checkpoints sits beside them). A checkpoint is written under a temporary
name and renamed, so a crash never leaves half of one under a final name.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from geodiff4d.gen.denoiser import JointDenoiser

WEIGHTS = "diffusion_pytorch_model.safetensors"
CHECKPOINTS = "checkpoints"
RANKS = "ranks.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


@dataclass
class RankState:
    """One worker's state besides the shared weights: every RNG it may draw from and its data position."""

    position: int  # batches consumed from make_batches(seed + rank, 0)
    generator: torch.Tensor  # the training noise / timestep / dropout generator
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor]  # one per visible device; empty without CUDA
    numpy: dict  # np.random legacy global state, its key as a tensor (weights_only loads)
    python: tuple

    @classmethod
    def capture(cls, generator: torch.Generator, position: int) -> RankState:
        state = np.random.get_state(legacy=False)
        numpy = {
            **state,
            "state": {
                "key": torch.from_numpy(state["state"]["key"].astype(np.int64)),
                "pos": state["state"]["pos"],
            },
        }
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return cls(position, generator.get_state(), torch.get_rng_state(), cuda, numpy, random.getstate())

    def restore(self, generator: torch.Generator) -> None:
        generator.set_state(self.generator)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        key = self.numpy["state"]["key"].numpy().astype(np.uint32)
        np.random.set_state({**self.numpy, "state": {"key": key, "pos": self.numpy["state"]["pos"]}})
        random.setstate(self.python)


def _ema_weights_saved(model: JointDenoiser, ema: EMAModel, folder: Path) -> None:
    params = list(model.parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        ema.restore(params)


def save_checkpoint(
    run: Path,
    model: JointDenoiser,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    ranks: list[RankState],
) -> Path:
    """Write `RUN/checkpoints/step_*` (ranks: every worker's RankState, in rank order); returns its folder."""
    final = Path(run) / CHECKPOINTS / checkpoint_name(step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    model.save_pretrained(tmp / "model", safe_serialization=True)
    _ema_weights_saved(model, ema, tmp / "ema")
    ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    torch.save(
        {"optimizer": optimizer.state_dict(), "ema": ema_meta, "step": step}, tmp / "training_state.pt"
    )
    torch.save([asdict(r) for r in ranks], tmp / RANKS)
    os.chmod(
        tmp, 0o755
    )  # mkdtemp makes 0700; checkpoints are shared data (core.io.atomic does the same for files)
    if final.exists():  # written before a crash that came ahead of Ray registering it: this one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted((Path(run) / CHECKPOINTS).glob("step_*"))
    return found[-1] if found else None


def _weights_of(folder: Path) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model weights (expected a save_pretrained folder)")
    return load_file(str(path))


def saved_rank_states(folder: Path, world_size: int) -> list[dict]:
    """The checkpoint's per-worker states; an error unless it was written by `world_size` workers."""
    ranks = torch.load(Path(folder) / RANKS, map_location="cpu", weights_only=True)
    if len(ranks) != world_size:
        raise ValueError(
            f"{folder} was written by {len(ranks)} worker(s); resume it with {len(ranks)}, "
            f"not {world_size} (each worker's RNG streams and data position are its own)"
        )
    return ranks


def load_checkpoint(
    folder: Path,
    model: JointDenoiser,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[int, RankState]:
    """Restore model, EMA and optimizer in place from a checkpoint folder; returns its step and `rank`'s state."""
    folder = Path(folder)
    ranks = saved_rank_states(folder, world_size)
    model.load_state_dict(_weights_of(folder / "model"))
    shadow = _weights_of(folder / "ema")
    saved = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    device = next(model.parameters()).device
    ema.load_state_dict(
        {**saved["ema"], "shadow_params": [shadow[n].to(device) for n, _ in model.named_parameters()]}
    )
    optimizer.load_state_dict(saved["optimizer"])
    return saved["step"], RankState(**ranks[rank])


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
        raise ValueError(
            f"{folder}: weights do not fit this model; missing {bad[:5]}, unexpected {unexpected[:5]}"
        )

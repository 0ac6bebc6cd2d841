"""Training batches of a stage from packed shards, addressable by position for exact resume.

The loader is an endless seeded stream, so "the batches after the first p" would mean replaying p batches
(hours at paper scale). Instead the stream is cut into segments of `checkpoint_every` optimizer steps, each
a fresh loader seeded by (seed, segment): a run resumed from a checkpoint starts a segment without replaying
anything, and one resumed elsewhere replays less than a segment. Both give the uninterrupted run's batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from geodiff4d.datasets.loader import LoaderConfig, augment_driving, make_loader
from geodiff4d.datasets.packing import read_pack_settings
from geodiff4d.datasets.shards import PACK_SETTINGS
from geodiff4d.gen.config import GenConfig

MakeBatches = Callable[[int, int], Iterator[dict]]
MULTI_VIEW, SYNTHETIC = "nersemble", "synthhuman"


def loader_config(cfg: GenConfig, stage: int, seed: int, world_size: int = 1) -> LoaderConfig:
    """The stage's LoaderConfig for one of `world_size` workers, with the data-side ablation switches applied.

    Stage 2 draws multi-view data only: SynthHuman holds single images, never a 16-frame clip.
    """
    st = cfg.train.stage(stage)
    kind = "clip" if st.frames > 1 else ("pair" if cfg.data.cross_view_pairs else "frame")
    weights = {MULTI_VIEW: 1.0}
    if cfg.data.synthetic_data and kind != "clip":
        weights[SYNTHETIC] = cfg.data.synthetic_weight
    return LoaderConfig(
        kind=kind,
        batch_size=cfg.train.worker_batch(stage, world_size),
        clip_len=st.frames,
        driving_size=cfg.model.driving_size,
        weights=weights,
        seed=seed,
    )


def check_shard_resolution(shards: str | Path, cfg: GenConfig) -> None:
    """The loader does not resize: shards packed at another resolution would silently train another model."""
    packed = read_pack_settings(shards).resolution  # a PackError (a ValueError) names the file and field
    if packed != cfg.data.resolution:
        raise ValueError(
            f"{shards} holds {packed} px samples ({PACK_SETTINGS}) but the config's data.resolution is "
            f"{cfg.data.resolution}: pack at {cfg.data.resolution} or change the config"
        )


def segment_seed(seed: int, segment: int) -> int:
    return int(np.random.SeedSequence([seed, segment]).generate_state(1)[0])


def same_view_drivings(batch: dict, config: LoaderConfig, rng: np.random.Generator) -> dict:
    """Clips without cross-view pairs: each frame drives itself (the loader's clips always take another camera)."""
    rgb, mask = batch["rgb"], batch["mask"]  # [B, T, 3, R, R], [B, T, 1, R, R]
    crops = [
        augment_driving(rgb[b, t], mask[b, t], config, rng)
        for b in range(rgb.shape[0])
        for t in range(rgb.shape[1])
    ]
    driving = torch.stack(crops).view(*rgb.shape[:2], *crops[0].shape)  # [B, T, 3, r, r]
    return {
        **batch,
        "driving": driving,
        "driving_key": batch["key"],
        "cross_view": torch.zeros(rgb.shape[0], dtype=torch.bool),
    }


def shard_batches(
    shards: str | Path, cfg: GenConfig, stage: int, num_workers: int = 0, world_size: int = 1
) -> MakeBatches:
    """make_batches(seed, position) of one of `world_size` workers over the shard folder `shards`."""
    segment = cfg.train.checkpoint_every * cfg.train.grad_accumulation  # batches per segment

    def make_batches(seed: int, position: int) -> Iterator[dict]:
        index, skip = divmod(position, segment)
        while True:
            config = loader_config(cfg, stage, segment_seed(seed, index), world_size)
            batches = iter(make_loader(shards, config, num_workers))
            for i in range(segment):
                batch = next(batches)
                if i < skip:
                    continue
                if config.kind == "clip" and not cfg.data.cross_view_pairs:
                    batch = same_view_drivings(batch, config, np.random.default_rng([config.seed, i]))
                yield batch
            index, skip = index + 1, 0

    return make_batches

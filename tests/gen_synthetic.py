"""A small synthetic batch source following the loader's batch contract (docs/formats.md, "Training batches"),
for gen tests.

Each sample is a disc whose colour is the identity (shared with the reference image) and whose normals
are a hemisphere; the pose map is the same hemisphere, so pose -> normals is learnable.
"""

from __future__ import annotations

import pytest
import torch

from geodiff4d.datasets.loader import single_torch_thread


def _disc(res: int, cx: torch.Tensor, cy: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] centres -> mask [N, 1, R, R] and unit normals (y up, z to camera) encoded (n+1)/2 [N, 3, R, R]."""
    grid = (torch.arange(res) + 0.5) / res
    x = (grid[None, None, :] - cx[:, None, None]) / radius
    y = -(grid[None, :, None] - cy[:, None, None]) / radius
    x, y = x.expand(-1, res, res), y.expand(-1, res, res)
    r2 = x * x + y * y
    mask = (r2 < 1).float()
    z = (1 - r2).clamp(min=0).sqrt()
    normal = (torch.stack([x, y, z], 1) + 1) / 2 * mask[:, None]
    return mask[:, None], normal


def synthetic_batch(g: torch.Generator, batch: int, res: int, frames: int = 1, crop: int = 32) -> dict:
    colour = torch.rand(batch, 3, 1, 1, generator=g)
    t = max(frames, 1)
    cx = (0.35 + 0.3 * torch.rand(batch, t, generator=g)).flatten()
    cy = (0.35 + 0.3 * torch.rand(batch, t, generator=g)).flatten()
    mask, normal = _disc(res, cx, cy, 0.3)
    shade = normal[:, 2:3]
    rgb = mask * colour.repeat_interleave(t, 0) * (0.5 + 0.5 * shade)
    ref_mask, ref_normal = _disc(res, torch.full((batch,), 0.5), torch.full((batch,), 0.5), 0.3)
    ref_rgb = ref_mask * colour * (0.5 + 0.5 * ref_normal[:, 2:3])
    driving = torch.nn.functional.interpolate(rgb, size=(crop, crop), mode="bilinear", align_corners=False)

    def shaped(x):
        return x.view(batch, t, *x.shape[1:]) if frames > 1 else x

    return {
        "rgb": shaped(rgb),
        "normal": shaped(normal),
        "mask": shaped(mask),
        "posemap": shaped(normal),
        "ref_rgb": ref_rgb,
        "ref_posemap": ref_normal,
        "driving": shaped(driving),
        "has_normal": torch.ones(batch, dtype=torch.bool),
        "source": ["procedural"] * batch,
        "key": [f"s{i}" for i in range(batch)],
    }


def make_batches_factory(batch: int, res: int, frames: int = 1, crop: int = 32):
    """make_batches(seed, position): the batch stream of `seed`, starting after `position` batches."""

    def make_batches(seed: int, position: int):
        g = torch.Generator().manual_seed(seed)
        for _ in range(position):
            synthetic_batch(g, batch, res, frames, crop)
        while True:
            yield synthetic_batch(g, batch, res, frames, crop)

    return make_batches


# Tiny models gain nothing from threads, and on a shared 2-core machine two threads thrash: use one.
one_thread = single_torch_thread


@pytest.fixture(autouse=True)
def one_torch_thread():
    with one_thread():
        yield


def recording_batches(folder, batch: int, res: int, delay_s: float = 0.0, crop: int = 32):
    """make_batches_factory's stream that also records each call as `{seed}-{position}-{pid}` in `folder` (which
    worker process started reading where) and sleeps `delay_s` per batch, so a test can kill a worker mid-run."""
    import os
    import time
    from pathlib import Path

    stream = make_batches_factory(batch, res, crop=crop)

    def make_batches(seed: int, position: int):
        (Path(folder) / f"{seed}-{position}-{os.getpid()}").touch()
        for item in stream(seed, position):
            time.sleep(delay_s)
            yield item

    return make_batches

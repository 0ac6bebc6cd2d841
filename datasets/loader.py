"""Training batches from the shards: weighted source mixing, single frames, cross-view pairs and clips.

Per source, small pipeline stages: the source's shards are split by node and worker, resampled forever
with the instance's own generator, and each drawn shard is streamed by webdataset's tar reader into a buffer
of raw bytes (memory = one shard per source per worker, bounded by the packer's byte limit) from which units
are drawn: a frame, a cross-view pair (same subject, sequence and frame, another camera) or a clip of consecutive
frames of one camera. Sources are mixed per unit by weight. Only the drawn samples are decoded. Every draw
comes from ``numpy.random.Generator`` instances seeded by (seed, source, rank, worker): one seed, one order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from torch import Tensor

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.images import decode_image, to_float
from geodiff4d.core.io.json_yaml import parse_json
from geodiff4d.datasets.locations import join, open_stream
from geodiff4d.datasets.manifest import read_manifest

KINDS = ("frame", "pair", "clip")


class LoaderError(UserError, ValueError):
    """Shards that cannot produce the requested batches; the message names the source or shard."""


@dataclass(frozen=True)
class LoaderConfig:
    kind: str = "frame"
    batch_size: int = 8
    clip_len: int = 16
    driving_size: int = 224
    weights: dict[str, float] = field(default_factory=lambda: {"nersemble": 10.0, "synthhuman": 1.0})
    seed: int = 0
    units_per_shard: int = 64  # units drawn from one shard visit before the next shard is streamed
    normal_sources: tuple[str, ...] = ("gt", "onnx", "flame")  # normal_source values that count as targets
    crop_scale: tuple[float, float] = (0.85, 1.15)  # driving crop side relative to the head box
    crop_shift: float = 0.08  # max shift of the driving crop centre, relative to its side
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LoaderError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not self.weights or min(self.weights.values()) < 0 or sum(self.weights.values()) <= 0:
            raise LoaderError(f"weights must be non-negative with a positive sum, got {self.weights}")


@dataclass
class Unit:
    """What one batch element is made of: target samples (1, or clip_len), a driving sample per target, a ref."""

    source: str
    targets: list[dict[str, Any]]
    drivings: list[dict[str, Any]]
    ref: dict[str, Any]

    @property
    def cross_view(self) -> bool:
        return self.drivings[0]["meta"]["camera"] != self.targets[0]["meta"]["camera"]


def worker_rng(seed: int, *salt: int) -> np.random.Generator:
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return np.random.default_rng(np.random.SeedSequence([seed, *salt, rank, worker]))


def split_shards(urls: Sequence[str]) -> list[str]:
    """This node's and worker's share of ``urls``; every caller gets all of them when there are too few."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    slot, slots = rank * workers + worker, world * workers
    return list(urls[slot::slots]) if len(urls) >= slots else list(urls)


def resampled(urls: Sequence[str], rng: np.random.Generator) -> Iterator[dict[str, str]]:
    """Endless shard draws with replacement (the webdataset ``ResampledShards`` idea, seeded per instance)."""
    while True:
        yield {"url": urls[int(rng.integers(len(urls)))]}


def read_shard(url: str) -> list[dict[str, Any]]:
    """One shard's samples, streamed through webdataset's tar reader from a path, URL or ``pipe:`` command
    (``datasets.locations``: fsspec for URLs, so object stores work as well as http)."""
    with open_stream(url) as stream:
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        return list(wds.tariterators.group_by_keys(files))


def shard_buffers(shards: Iterator[dict[str, str]]) -> Iterator[list[dict[str, Any]]]:
    """Read each drawn shard into one buffer; samples get their json as ``meta``."""
    for shard in shards:
        buffer = read_shard(shard["url"])
        for sample in buffer:
            sample["meta"] = parse_json(sample["json"], f"sample {sample['__key__']}")
        yield buffer


class ShardIndex:
    """Lookups over one shard's samples: by (subject, sequence, frame) and by (subject, sequence, camera)."""

    def __init__(self, samples: list[dict[str, Any]], clip_len: int):
        self.samples = samples
        self.by_frame: dict[tuple, list[dict]] = {}
        self.by_subject: dict[str, list[dict]] = {}
        track: dict[tuple, dict[int, dict]] = {}
        for s in samples:
            m = s["meta"]
            self.by_frame.setdefault((m["subject"], m["sequence"], m["frame"]), []).append(s)
            self.by_subject.setdefault(m["subject"], []).append(s)
            track.setdefault((m["subject"], m["sequence"], m["camera"]), {})[m["frame"]] = s
        self.tracks = track
        self.clip_starts = [
            (k, f)
            for k, frames in sorted(track.items())
            for f in sorted(frames)
            if all(f + i in frames for i in range(clip_len))
        ]
        self.pair_targets = [s for s in samples if len(self.by_frame[_frame_id(s)]) > 1]


def _frame_id(sample: dict[str, Any]) -> tuple:
    m = sample["meta"]
    return m["subject"], m["sequence"], m["frame"]


def _pick(items: Sequence[Any], rng: np.random.Generator) -> Any:
    return items[int(rng.integers(len(items)))]


def draw_units(
    buffers: Iterator[list[dict[str, Any]]], config: LoaderConfig, source: str, rng: np.random.Generator
) -> Iterator[Unit]:
    """Draw ``units_per_shard`` units of ``config.kind`` from each shard buffer (shards that have none are skipped)."""
    barren = 0
    for buffer in buffers:
        index = ShardIndex(buffer, config.clip_len)
        if config.kind == "clip" and not index.clip_starts:
            barren += 1
            if barren > 100:
                raise LoaderError(
                    f"source {source}: no shard holds {config.clip_len} consecutive frames of a camera"
                )
            continue
        barren = 0
        for _ in range(config.units_per_shard):
            yield _draw_unit(index, config, source, rng)


def _other_view(index: ShardIndex, target: dict, rng: np.random.Generator) -> dict:
    others = [s for s in index.by_frame[_frame_id(target)] if s is not target]
    return _pick(others, rng) if others else target


def _reference(index: ShardIndex, targets: list[dict], rng: np.random.Generator) -> dict:
    """A sample of the same subject from another frame when the shard has one (identity, not expression)."""
    subject, frames = targets[0]["meta"]["subject"], {_frame_id(t) for t in targets}
    candidates = [s for s in index.by_subject[subject] if _frame_id(s) not in frames]
    return _pick(candidates or index.by_subject[subject], rng)


def _draw_unit(index: ShardIndex, config: LoaderConfig, source: str, rng: np.random.Generator) -> Unit:
    if config.kind == "clip":
        track_id, start = _pick(index.clip_starts, rng)
        frames = index.tracks[track_id]
        targets = [frames[start + i] for i in range(config.clip_len)]
        drivings = _clip_drivings(index, targets, rng)
    else:
        pool = index.pair_targets if config.kind == "pair" and index.pair_targets else index.samples
        targets = [_pick(pool, rng)]
        drivings = [_other_view(index, targets[0], rng) if config.kind == "pair" else targets[0]]
    return Unit(source, targets, drivings, _reference(index, targets, rng))


def _clip_drivings(index: ShardIndex, targets: list[dict], rng: np.random.Generator) -> list[dict]:
    """Driving frames of a clip from one other camera that covers all its frames, else the clip itself."""
    subject, sequence, camera = (targets[0]["meta"][k] for k in ("subject", "sequence", "camera"))
    wanted = [t["meta"]["frame"] for t in targets]
    cameras = sorted(
        cam
        for (sub, seq, cam), frames in index.tracks.items()
        if (sub, seq) == (subject, sequence) and cam != camera and all(f in frames for f in wanted)
    )
    if not cameras:
        return list(targets)
    frames = index.tracks[(subject, sequence, _pick(cameras, rng))]
    return [frames[f] for f in wanted]


def source_shards(shard_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Committed shards per source, from the manifest (uncommitted tars are never read); ``shard_dir`` may be a
    URL or ``pipe:`` location (``datasets.locations``)."""
    table = read_manifest(shard_dir)
    pairs = set(zip(table.column("source").to_pylist(), table.column("shard").to_pylist(), strict=True))
    shards: dict[str, list[str]] = {}
    for source, shard in sorted(pairs):
        shards.setdefault(source, []).append(join(shard_dir, shard))
    return shards


def unit_stream(shard_dir: str | os.PathLike, config: LoaderConfig) -> Iterator[Unit]:
    """Endless units, sources mixed per unit by ``config.weights``."""
    available = source_shards(shard_dir)
    sources = sorted(s for s, w in config.weights.items() if w > 0)
    absent = [s for s in sources if s not in available]
    if absent:
        raise LoaderError(f"{shard_dir}: no shards for weighted sources {absent} (have {sorted(available)})")
    streams = []
    for i, source in enumerate(sources):
        shard_rng, unit_rng = worker_rng(config.seed, i, 0), worker_rng(config.seed, i, 1)
        shards = resampled(split_shards(available[source]), shard_rng)
        streams.append(draw_units(shard_buffers(shards), config, source, unit_rng))
    weights = np.array([config.weights[s] for s in sources], dtype=np.float64)
    mix_rng = worker_rng(config.seed, len(sources), 2)
    while True:
        yield next(streams[int(mix_rng.choice(len(sources), p=weights / weights.sum()))])


def _decode_png(data: bytes, key: str) -> np.ndarray:
    image = decode_image(data, f"sample {key}")
    if image.ndim == 2:
        return to_float(image)[None]  # [1, H, W]
    return to_float(np.ascontiguousarray(image[..., :3].transpose(2, 0, 1)))  # RGB [H, W, 3] -> [3, H, W]


class BatchImages:
    """Member PNGs of one batch as float32 [C, H, W] in [0, 1], each decoded once.

    A frame-mode target is also its own driving frame, and a reference can be another unit's target, so
    without this the same PNG would be decoded several times per batch.
    """

    def __init__(self) -> None:
        self._decoded: dict[tuple[str, str, str], np.ndarray] = {}

    def __call__(self, sample: dict[str, Any], member: str, channels: int) -> np.ndarray:
        slot = (sample.get("__url__", ""), sample["__key__"], member)
        if slot not in self._decoded:
            data = sample.get(member)
            if data is None:
                raise LoaderError(
                    f"sample {sample['__key__']} in {sample.get('__url__')} lacks member {member}"
                )
            self._decoded[slot] = _decode_png(data, sample["__key__"])
        image = self._decoded[slot]
        return image[:channels] if image.shape[0] >= channels else np.repeat(image, channels, axis=0)


def _normal(sample: dict[str, Any], images: BatchImages, config: LoaderConfig) -> tuple[np.ndarray, bool]:
    if "normal.png" in sample and sample["meta"].get("normal_source") in config.normal_sources:
        return images(sample, "normal.png", 3), True
    height, width = images(sample, "mask.png", 1).shape[-2:]
    return np.zeros((3, height, width), np.float32), False


def _posemap(sample: dict[str, Any], images: BatchImages) -> np.ndarray:
    """The pose map [3, R, R]; zeros where the sample has none (SynthHuman: no FLAME fit, so packing writes no
    posemap.png; zeros are what the pose map encodes off the head)."""
    if "posemap.png" in sample:
        return images(sample, "posemap.png", 3)
    height, width = images(sample, "mask.png", 1).shape[-2:]
    return np.zeros((3, height, width), np.float32)


def augment_driving(
    rgb: Tensor | np.ndarray, mask: Tensor | np.ndarray, config: LoaderConfig, rng: np.random.Generator
) -> Tensor:
    """Face crops of driving frames with spatial (scale, shift) and pixel (colour, noise) augmentation.

    rgb [N, 3, H, W], mask [N, 1, H, W] -> [N, 3, r, r] in one batched resampling (or one frame [3, H, W],
    [1, H, W] -> [3, r, r]). The crop hides the frame's framing and the colour changes its appearance, so the
    expression encoder must read the expression itself.
    """
    rgb, mask = torch.as_tensor(rgb), torch.as_tensor(mask)
    single = rgb.ndim == 3
    rgb, mask = (rgb[None], mask[None]) if single else (rgb, mask)
    n, _, height, width = rgb.shape
    boxes = np.array([_head_extent(m[0].numpy(), height, width) for m in mask])  # [N, 4] y0, y1, x0, x1
    side = np.maximum(boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]) * rng.uniform(
        *config.crop_scale, n
    )
    shift = rng.uniform(-1, 1, (n, 2)) * config.crop_shift * side[:, None]
    cy, cx = (boxes[:, 0] + boxes[:, 1]) / 2 + shift[:, 0], (boxes[:, 2] + boxes[:, 3]) / 2 + shift[:, 1]
    r = config.driving_size
    # Affine grids in normalized coordinates: each samples its square crop, zero outside the image.
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2] = side / width, 2 * cx / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = side / height, 2 * cy / height - 1
    grid = F.affine_grid(
        torch.as_tensor(theta, dtype=torch.float32), [n, 3, r, r], align_corners=False
    )  # [N, r, r, 2]
    crop = F.grid_sample(
        rgb.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [N, 3, r, r]
    jitter = torch.as_tensor(
        rng.uniform(-1, 1, (3, n, 1, 1, 1)), dtype=torch.float32
    )  # saturation, contrast, brightness
    gray = crop.mean(dim=1, keepdim=True)
    crop = gray + (crop - gray) * (1 + jitter[0] * config.saturation)
    mean = crop.mean(dim=(1, 2, 3), keepdim=True)
    crop = mean + (crop - mean) * (1 + jitter[1] * config.contrast)
    crop = crop + jitter[2] * config.brightness
    noise = torch.from_numpy(rng.standard_normal(crop.shape).astype(np.float32)) * config.noise_std
    crop = (crop + noise).clamp(0, 1)
    return crop[0] if single else crop


def _head_extent(mask: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a mask [H, W], the whole frame when it is empty."""
    ys, xs = np.nonzero(mask > 0.5)
    return (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) if len(ys) else (0, height, 0, width)


def _frame_tensors(sample: dict[str, Any], images: BatchImages, config: LoaderConfig) -> dict[str, Any]:
    normal, has_normal = _normal(sample, images, config)
    return {
        "rgb": images(sample, "rgb.png", 3),
        "normal": normal,
        "mask": images(sample, "mask.png", 1),
        "posemap": _posemap(sample, images),
        "has_normal": has_normal,
        "has_posemap": "posemap.png" in sample,
    }


@contextmanager
def single_torch_thread() -> Iterator[None]:
    """Torch ops on one batch's small crops with one thread, the caller's thread count restored after.

    DataLoader workers already run single-threaded; in the main process (``num_workers=0``) torch's intra-op
    pool split the driving-crop resampling over the trainer's threads and thrashed (0.54-0.90 s per batch of
    8 at 128 px vs 0.24-0.29 s with one thread on this 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def collate(units: list[Unit], config: LoaderConfig, rng: np.random.Generator) -> dict[str, Any]:
    """Units -> the batch contract of docs/formats.md, "Training batches" (clips add a T axis after B)."""
    images = BatchImages()
    frames = [[_frame_tensors(t, images, config) for t in u.targets] for u in units]
    drivings = [d for u in units for d in u.drivings]
    with single_torch_thread():
        driving = augment_driving(
            torch.from_numpy(np.stack([images(d, "rgb.png", 3) for d in drivings])),
            torch.from_numpy(np.stack([images(d, "mask.png", 1) for d in drivings])),
            config,
            rng,
        ).unflatten(0, (len(units), -1))  # [B, T, 3, r, r]

    # numpy stacking: single-threaded, so a loader in the main process does not fight the trainer's threads
    def stack(name: str) -> Tensor:
        flat = torch.from_numpy(np.stack([f[name] for fs in frames for f in fs]))  # [B*T, C, R, R], one copy
        batch = flat.unflatten(0, (len(frames), -1))  # [B, T, C, R, R]
        return batch if config.kind == "clip" else batch[:, 0]

    batch: dict[str, Any] = {name: stack(name) for name in ("rgb", "normal", "mask", "posemap")}
    batch["driving"] = driving if config.kind == "clip" else driving[:, 0]
    batch["ref_rgb"] = torch.from_numpy(np.stack([images(u.ref, "rgb.png", 3) for u in units]))
    batch["ref_posemap"] = torch.from_numpy(np.stack([_posemap(u.ref, images) for u in units]))
    batch["has_normal"] = torch.tensor([all(f["has_normal"] for f in fs) for fs in frames])
    batch["has_posemap"] = torch.tensor([all(f["has_posemap"] for f in fs) for fs in frames])
    batch["cross_view"] = torch.tensor([u.cross_view for u in units])
    batch["source"] = [u.source for u in units]
    keys = [[t["__key__"] for t in u.targets] for u in units]
    driving_keys = [[d["__key__"] for d in u.drivings] for u in units]
    batch["key"] = keys if config.kind == "clip" else [k[0] for k in keys]
    batch["driving_key"] = driving_keys if config.kind == "clip" else [k[0] for k in driving_keys]
    batch["ref_key"] = [u.ref["__key__"] for u in units]
    return batch


class TrainingStream(torch.utils.data.IterableDataset):
    """Endless training batches; use with ``DataLoader(stream, batch_size=None, num_workers=N)``."""

    def __init__(self, shard_dir: str | os.PathLike, config: LoaderConfig = LoaderConfig()):
        super().__init__()
        self.shard_dir, self.config = shard_dir, config

    def units(self) -> Iterator[Unit]:
        return unit_stream(self.shard_dir, self.config)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        units = self.units()
        rng = worker_rng(self.config.seed, 1_000_003)
        while True:
            yield collate([next(units) for _ in range(self.config.batch_size)], self.config, rng)


def make_loader(
    shard_dir: str | os.PathLike, config: LoaderConfig = LoaderConfig(), num_workers: int = 0
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        TrainingStream(shard_dir, config),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )

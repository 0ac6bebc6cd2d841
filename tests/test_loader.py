"""Training loader: source mixing, seeding, cross-view pairs, clips, node/worker splits, the batch contract."""

from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest
import torch
from test_shards import synthetic_samples, write_dataset

from geodiff4d.datasets import loader
from geodiff4d.datasets.loader import (
    LoaderConfig,
    LoaderError,
    TrainingStream,
    augment_driving,
    split_shards,
    unit_stream,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = synthetic_samples(subjects=2, frames=20, cameras=3, synthetic=8)
    write_dataset(out, samples, per_shard=60)  # one shard per subject: 20 frames x 3 cameras
    return out, {s["__key__"]: s for s in samples}


def _meta(sample: dict) -> dict:
    return sample["meta"] if "meta" in sample else json.loads(sample["json"])


@pytest.mark.parametrize(
    "weights", [{"nersemble": 10.0, "synthhuman": 1.0}, {"nersemble": 3.0, "synthhuman": 1.0}]
)
def test_source_ratio_over_20k_draws_matches_weights(shards, weights):
    out, _ = shards
    units = unit_stream(out, LoaderConfig(weights=weights, seed=3))
    sources = [u.source for u in itertools.islice(units, 20_000)]
    ratio = sources.count("nersemble") / sources.count("synthhuman")
    assert abs(ratio / weights["nersemble"] - 1) < 0.05


def test_same_seed_same_order_other_seed_other_order(shards):
    out, _ = shards

    def keys(seed: int) -> list[str]:
        units = unit_stream(out, LoaderConfig(kind="pair", seed=seed))
        return [
            (u.targets[0]["__key__"], u.drivings[0]["__key__"], u.ref["__key__"])
            for u in itertools.islice(units, 300)
        ]

    assert keys(5) == keys(5)
    assert keys(5) != keys(6)


def test_cross_view_pairs_share_frame_and_differ_in_camera(shards):
    out, _ = shards
    units = list(itertools.islice(unit_stream(out, LoaderConfig(kind="pair", seed=1)), 2000))
    multi = [u for u in units if u.source == "nersemble"]
    assert len(multi) > 1500
    for u in multi:
        target, driving = _meta(u.targets[0]), _meta(u.drivings[0])
        assert u.cross_view
        assert [target[k] for k in ("subject", "sequence", "frame")] == [
            driving[k] for k in ("subject", "sequence", "frame")
        ]
        assert target["camera"] != driving["camera"]
        ref = _meta(u.ref)
        assert ref["subject"] == target["subject"] and ref["frame"] != target["frame"]
    cameras = {(_meta(u.targets[0])["camera"], _meta(u.drivings[0])["camera"]) for u in multi}
    assert len(cameras) == 6  # every ordered pair of the 3 cameras occurs
    single = [u for u in units if u.source == "synthhuman"]
    assert single and all(not u.cross_view and u.drivings[0] is u.targets[0] for u in single)


def test_clips_are_16_consecutive_frames_of_one_camera(shards):
    out, _ = shards
    config = LoaderConfig(kind="clip", weights={"nersemble": 1.0}, seed=2)
    units = list(itertools.islice(unit_stream(out, config), 300))
    starts = set()
    for u in units:
        metas = [_meta(t) for t in u.targets]
        assert len(metas) == 16
        assert len({(m["subject"], m["sequence"], m["camera"]) for m in metas}) == 1
        assert [m["frame"] for m in metas] == list(range(metas[0]["frame"], metas[0]["frame"] + 16))
        drivers = [_meta(d) for d in u.drivings]
        assert [d["frame"] for d in drivers] == [m["frame"] for m in metas]
        assert len({d["camera"] for d in drivers}) == 1 and drivers[0]["camera"] != metas[0]["camera"]
        starts.add(metas[0]["frame"])
    assert starts == set(range(5))  # 20 frames hold clips starting at 0..4


def test_clip_kind_without_clips_fails_clearly(shards):
    out, _ = shards
    units = unit_stream(out, LoaderConfig(kind="clip", weights={"synthhuman": 1.0}))
    with pytest.raises(LoaderError, match="synthhuman: no shard holds 16 consecutive frames"):
        next(units)


def test_unknown_source_weight_fails_clearly(shards):
    out, _ = shards
    with pytest.raises(LoaderError, match=r"no shards for weighted sources \['multiface'\]"):
        next(unit_stream(out, LoaderConfig(weights={"multiface": 1.0})))


def test_split_by_node_and_worker_is_a_partition(monkeypatch):
    urls = [f"s{i}" for i in range(10)]
    parts = []
    for rank, worker in itertools.product(range(2), range(2)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", "2")
        parts.append(split_shards(urls))
    assert sorted(sum(parts, [])) == sorted(urls) and all(parts)
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert split_shards(urls[:3]) == urls[:3]  # fewer shards than slots: every slot resamples all


def _decode(data: bytes) -> torch.Tensor:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    image = torch.from_numpy(image.astype(np.float32) / scale)
    return image[None] if image.ndim == 2 else image.flip(-1).permute(2, 0, 1)


def test_pair_batch_follows_the_contract(shards):
    out, samples = shards
    config = LoaderConfig(kind="pair", batch_size=6, driving_size=8, seed=4)
    batch = next(iter(TrainingStream(out, config)))
    assert batch["rgb"].shape == (6, 3, 16, 16) and batch["normal"].shape == (6, 3, 16, 16)
    assert batch["mask"].shape == (6, 1, 16, 16) and batch["posemap"].shape == (6, 3, 16, 16)
    assert batch["driving"].shape == (6, 3, 8, 8) and batch["ref_rgb"].shape == (6, 3, 16, 16)
    assert batch["has_normal"].dtype == torch.bool and batch["has_normal"].all()
    for i, key in enumerate(batch["key"]):
        sample = samples[key]
        assert torch.equal(batch["rgb"][i], _decode(sample["rgb.png"]))
        assert torch.equal(batch["normal"][i], _decode(sample["normal.png"]))
        assert torch.equal(batch["mask"][i], _decode(sample["mask.png"]))
        assert torch.equal(batch["posemap"][i], _decode(sample["posemap.png"]))
        assert torch.equal(batch["ref_rgb"][i], _decode(samples[batch["ref_key"][i]]["rgb.png"]))
        assert batch["source"][i] == key.split("_")[0]
        assert bool(batch["cross_view"][i]) == (batch["driving_key"][i] != key)
    assert 0 <= batch["driving"].min() and batch["driving"].max() <= 1


def test_clip_batch_shapes(shards):
    out, samples = shards
    config = LoaderConfig(kind="clip", batch_size=2, driving_size=8, weights={"nersemble": 1.0})
    batch = next(iter(TrainingStream(out, config)))
    assert batch["rgb"].shape == (2, 16, 3, 16, 16) and batch["mask"].shape == (2, 16, 1, 16, 16)
    assert batch["driving"].shape == (2, 16, 3, 8, 8) and batch["ref_posemap"].shape == (2, 3, 16, 16)
    assert torch.equal(batch["rgb"][1, 7], _decode(samples[batch["key"][1][7]]["rgb.png"]))


def test_driving_crop_without_augmentation_is_the_head_box():
    rgb = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 4:20] = 1  # a 16 x 16 head box
    still = LoaderConfig(
        driving_size=16, crop_scale=(1, 1), crop_shift=0, brightness=0, contrast=0, saturation=0, noise_std=0
    )
    crop = augment_driving(rgb, mask, still, np.random.default_rng(0))
    assert torch.allclose(crop, rgb[:, 8:24, 4:20], atol=1e-6)
    jittered = [
        augment_driving(rgb, mask, LoaderConfig(driving_size=16), np.random.default_rng(s)) for s in (1, 1, 2)
    ]
    assert torch.equal(jittered[0], jittered[1]) and not torch.equal(jittered[0], jittered[2])
    assert not torch.allclose(jittered[0], crop, atol=0.05)
    assert jittered[0].min() >= 0 and jittered[0].max() <= 1


@pytest.mark.parametrize("kind", ["frame", "pair"])
def test_each_member_png_is_decoded_once_per_batch(shards, kind, monkeypatch):
    out, _ = shards
    decoded = []
    original = loader._decode_png
    monkeypatch.setattr(loader, "_decode_png", lambda data, key: decoded.append(key) or original(data, key))
    batch = next(iter(TrainingStream(out, LoaderConfig(kind=kind, batch_size=8, driving_size=8, seed=5))))
    used = {(k, m) for k in batch["key"] for m in ("rgb", "normal", "mask", "posemap")}
    used |= {(k, m) for k in batch["driving_key"] for m in ("rgb", "mask")}
    used |= {(k, m) for k in batch["ref_key"] for m in ("rgb", "posemap")}
    assert len(decoded) == len(used)  # a frame-mode target is its own driving frame: its rgb and mask once
    if kind == "frame":
        assert batch["driving_key"] == batch["key"]

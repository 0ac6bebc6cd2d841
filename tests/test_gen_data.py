"""Training and sampling on real packed shards: resumable batch positions, ablation switches, frame folders."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from geodiff4d.datasets.manifest import read_manifest
from geodiff4d.datasets.normal_maps import decode_normal_png
from geodiff4d.datasets.packing import pack
from geodiff4d.datasets.procedural import SynthSpec, synthesize
from geodiff4d.gen.config import GenConfig, load_config
from geodiff4d.gen.data import loader_config, shard_batches
from geodiff4d.gen.sample_frames import SampleFramesError, read_sequence, sample_to_frame_folder
from geodiff4d.gen.train import train_loop

sys.path.insert(0, str(Path(__file__).parent))
from gen_synthetic import one_thread, one_torch_thread  # noqa: E402, F401
from test_gen_train import tiny_config  # noqa: E402

SPEC = SynthSpec(subjects=1, sequences=1, frames=4, cameras=2, resolution=64, synthetic=2, seed=0)
SEQUENCE = "EXP-1-head"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, local_ray):
    root = tmp_path_factory.mktemp("gen_data")
    assert synthesize(root / "raw", SPEC, workers=2, progress=False).ok
    sources = [("nersemble", root / "raw/nersemble"), ("synthhuman", root / "raw/synthhuman")]
    assert pack(root / "shards", sources, resolution=16, workers=2, progress=False).ok
    return root / "shards"


def config(**data) -> GenConfig:
    cfg = tiny_config(checkpoint_every=2).model_dump()
    cfg["model"]["driving_size"] = 16
    cfg["train"]["stage2"]["frames"] = 3
    cfg["data"].update(data)
    return GenConfig.model_validate(cfg)


def _keys(batches, n: int) -> list:
    return [(b["key"], b["driving_key"], b["ref_key"], b["driving"]) for b in itertools.islice(batches, n)]


def test_batch_position_addresses_the_same_stream_across_segments(shards):
    make = shard_batches(shards, config(), 1)  # segments of 2 batches (checkpoint_every=2)
    full = _keys(make(3, 0), 7)
    for position in (2, 3):
        resumed = _keys(make(3, position), 7 - position)
        for (k, dk, rk, drv), (k2, dk2, rk2, drv2) in zip(full[position:], resumed, strict=True):
            assert (k, dk, rk) == (k2, dk2, rk2)
            torch.testing.assert_close(drv, drv2, rtol=0, atol=0)
    assert [k[:3] for k in _keys(make(4, 0), 7)] != [k[:3] for k in full]  # another seed, another stream


def test_ablation_switches_reach_the_loader():
    demo = load_config("configs/demo.yaml")
    assert loader_config(demo, 1, 0).kind == "pair" and loader_config(demo, 1, 0).weights == {
        "nersemble": 1.0,
        "synthhuman": demo.data.synthetic_weight,
    }
    clip = loader_config(demo, 2, 0)
    assert (clip.kind, clip.clip_len, clip.weights, clip.driving_size) == ("clip", 16, {"nersemble": 1.0}, 32)
    assert loader_config(config(cross_view_pairs=False), 1, 0).kind == "frame"
    assert loader_config(config(synthetic_data=False), 1, 0).weights == {"nersemble": 1.0}


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """Stage 1 (2 steps) then stage 2 (1 step on 3-frame clips) on the packed shards."""
    cfg, out = config(), tmp_path_factory.mktemp("gen_runs")
    with one_thread():
        s1 = train_loop(cfg, 1, shard_batches(shards, cfg, 1), out / "s1", max_steps=2, quiet=True)
        s2 = train_loop(
            cfg, 2, shard_batches(shards, cfg, 2), out / "s2", max_steps=1, init=out / "s1", quiet=True
        )
    return s1, s2, out / "s2"


def test_trains_both_stages_on_packed_shards(shards, runs):
    s1, s2, run = runs
    assert len(s1) == 2 and len(s2) == 1 and np.isfinite(s1 + s2).all()
    assert (run / "checkpoints/step_0000001/ema/diffusion_pytorch_model.safetensors").is_file()
    cfg = config()
    batch = next(shard_batches(shards, cfg, 1)(0, 0))
    assert batch["rgb"].shape == (2, 3, 16, 16) and batch["driving"].shape == (2, 3, 16, 16)
    nersemble = [i for i, s in enumerate(batch["source"]) if s == "nersemble"]
    assert all(batch["cross_view"][i] for i in nersemble)  # 2 cameras: every multi-view target is a pair
    same_view = config(cross_view_pairs=False)
    clip = next(shard_batches(shards, same_view, 2)(0, 0))
    assert clip["driving"].shape == (1, 3, 3, 16, 16)
    assert clip["driving_key"] == clip["key"] and not clip["cross_view"].any()


def test_train_refuses_bad_inputs_with_a_message(shards, runs, tmp_path):
    """Each user error ends `geodiff4d train` with one message naming the input, before Ray starts a worker."""
    from typer.testing import CliRunner

    from geodiff4d.cluster.cli import app

    stage1_run = runs[2].parent / "s1"  # one worker, 2 steps

    def train(cfg: GenConfig, out: Path, *options: str):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        result = CliRunner().invoke(
            app,
            [
                "train",
                "--config",
                str(path),
                "--stage",
                "1",
                "--shards",
                str(shards),
                "--out",
                str(out),
                *options,
            ],
        )
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        return result.output

    message = train(config(resolution=32), tmp_path / "a")
    assert f"{shards} holds 16 px samples" in message and "data.resolution is 32" in message
    assert "batch_size 2 (global) is not divisible by 3 worker(s)" in train(
        config(), tmp_path / "b", "--workers", "3"
    )
    assert f"{stage1_run} already holds a run (latest checkpoint step_0000002)" in train(config(), stage1_run)
    assert "was written by 1 worker(s); resume it with 1, not 2" in train(
        config(), stage1_run, "--resume", "--workers", "2"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sample_to_frame_folder_writes_the_layout(shards, runs, tmp_path):
    run = runs[2]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config().model_dump(mode="json")))
    cameras = sorted({c for c, _ in read_sequence(shards, "001", SEQUENCE)})
    grid = sample_to_frame_folder(path, run, shards, "001", SEQUENCE, None, [1, 2], tmp_path / "out", seed=0)
    root = tmp_path / "out"
    assert grid.is_file()
    for camera in cameras:
        for frame in (1, 2):
            rel = f"001/{SEQUENCE}/{camera}/{frame:05d}.png"
            normal, mask = decode_normal_png(root / "normal" / rel)
            assert (
                (root / "rgb" / rel).is_file()
                and (root / "mask" / rel).is_file()
                and normal.shape == (16, 16, 3)
            )
            assert np.allclose(np.linalg.norm(normal[mask], axis=-1), 1, atol=1e-3)
    latents = np.load(root / f"latents/001/{SEQUENCE}.npz")
    assert latents["frames"].tolist() == [1, 2] and latents["expression"].shape == (2, 2, 4)
    written = json.loads((root / f"cameras/001/{SEQUENCE}.json").read_text())
    table = read_manifest(shards).to_pandas()
    assert sorted(written) == cameras == sorted(set(table[table.source == "nersemble"].camera))
    truth = read_sequence(shards, "001", SEQUENCE)[(cameras[0], 1)]["meta"]["camera_params"]
    assert (
        written[cameras[0]]["world_to_cam"] == truth["world_to_cam"]
        and written[cameras[0]]["K"] == truth["K"]
    )
    with pytest.raises(SampleFramesError, match="missing"):
        sample_to_frame_folder(path, run, shards, "001", SEQUENCE, None, [1, 99], tmp_path / "bad")


def test_read_sequence_decodes_only_the_cameras_frames_and_parts_asked_for(shards):
    """generate's actors read a reference sample or the driving camera's RGB and masks, not every camera's four PNGs
    of the sequence."""
    everything = read_sequence(shards, "001", SEQUENCE)
    camera = sorted({c for c, _ in everything})[0]
    some = read_sequence(shards, "001", SEQUENCE, cameras=[camera], frames=[1, 2], parts=("rgb", "mask"))
    assert sorted(some) == [(camera, 1), (camera, 2)] and len(everything) > len(some)
    for key, sample in some.items():
        assert set(sample) == {"rgb", "mask", "meta"} and sample["meta"] == everything[key]["meta"]
        assert torch.equal(sample["rgb"], everything[key]["rgb"]) and torch.equal(
            sample["mask"], everything[key]["mask"]
        )

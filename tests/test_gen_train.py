"""Training of the joint denoiser: exact resume, stage 2 from stage 1, and the Ray Train wrapper."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from geodiff4d.gen.checkpoint import latest_checkpoint
from geodiff4d.gen.config import GenConfig
from geodiff4d.gen.train import train_loop

sys.path.insert(0, str(Path(__file__).parent))
from gen_synthetic import make_batches_factory, one_torch_thread  # noqa: E402, F401


def tiny_config(**train) -> GenConfig:
    return GenConfig.model_validate({
        "model": {"latents": "pixel", "pose_injection": "concat",
                  "unet": {"block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                           "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1,
                           "attention_head_dim": 8, "cross_attention_dim": 32, "norm_num_groups": 8},
                  "expression_tokens": 2, "expression_dim": 4, "expression_channels": [8, 16], "temporal_heads": 2},
        "data": {"resolution": 16},
        "train": {"stage1": {"batch_size": 2, "steps": 100, "lr": 1e-3},
                  "stage2": {"batch_size": 1, "steps": 100, "frames": 3, "lr": 1e-3},
                  "checkpoint_every": 2, "drop_reference": 0.3, "drop_expression": 0.3, "count_flops": False,
                  **train},
        "sample": {"steps": 2, "window": 2, "overlap": 1}})


def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path):
    cfg = tiny_config(grad_accumulation=2, stage1={"batch_size": 4, "steps": 100, "lr": 1e-3})
    batches = make_batches_factory(2, 16, crop=16)
    full = train_loop(cfg, 1, batches, tmp_path / "full", max_steps=4, quiet=True)
    first = train_loop(cfg, 1, batches, tmp_path / "cut", max_steps=2, quiet=True)
    rest = train_loop(cfg, 1, batches, tmp_path / "cut", max_steps=4, restore=latest_checkpoint(tmp_path / "cut"),
                      quiet=True)
    assert first == full[:2]
    assert rest == full[2:]  # exact on CPU: weights, optimizer, EMA, data position and noise RNG restored
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000004"
    a = (tmp_path / "full/checkpoints/step_0000004/ema/diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "cut/checkpoints/step_0000004/ema/diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b


def test_stage2_starts_from_stage1_and_trains_on_clips(tmp_path):
    cfg = tiny_config()
    train_loop(cfg, 1, make_batches_factory(2, 16, crop=16), tmp_path / "s1", max_steps=2, quiet=True)
    losses = train_loop(cfg, 2, make_batches_factory(1, 16, frames=3, crop=16), tmp_path / "s2", max_steps=2,
                        init=tmp_path / "s1", quiet=True)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
def test_loss_falls_and_outputs_are_written(tmp_path):
    cfg = tiny_config(checkpoint_every=50, sample_every=30, log_every=5)
    losses = train_loop(cfg, 1, make_batches_factory(2, 16, crop=16), tmp_path / "run", max_steps=30)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert (tmp_path / "run/samples/step_0000030.png").is_file()
    assert list((tmp_path / "run/tensorboard").glob("events.*"))


@pytest.mark.slow
def test_ray_torch_trainer_runs_two_steps(tmp_path):
    import gen_synthetic
    import ray.cloudpickle
    import yaml

    from geodiff4d.gen.train import train
    ray.cloudpickle.register_pickle_by_value(gen_synthetic)  # a test helper, not importable in workers
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    latest = train(path, 1, None, tmp_path / "run", max_steps=2, make_batches=make_batches_factory(2, 16, crop=16),
                   quiet=True)
    assert latest.name == "step_0000002" and (latest / "model/config.json").is_file()

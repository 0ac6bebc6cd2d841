"""Training of the joint denoiser: exact resume, stage 2 from stage 1, and the Ray Train wrapper."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from geodiff4d.gen.checkpoint import latest_checkpoint
from geodiff4d.gen.config import GenConfig
from geodiff4d.gen.train import condition_dropout, train_loop

sys.path.insert(0, str(Path(__file__).parent))
from gen_synthetic import make_batches_factory, one_torch_thread, recording_batches  # noqa: E402, F401


def tiny_config(**train) -> GenConfig:
    return GenConfig.model_validate(
        {
            "model": {
                "latents": "pixel",
                "pose_injection": "concat",
                "unet": {
                    "block_out_channels": [16, 32],
                    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                    "layers_per_block": 1,
                    "attention_head_dim": 8,
                    "cross_attention_dim": 32,
                    "norm_num_groups": 8,
                },
                "expression_tokens": 2,
                "expression_dim": 4,
                "expression_channels": [8, 16],
                "temporal_heads": 2,
            },
            "data": {"resolution": 16},
            "train": {
                "stage1": {"batch_size": 2, "steps": 100, "lr": 1e-3},
                "stage2": {"batch_size": 1, "steps": 100, "frames": 3, "lr": 1e-3},
                "checkpoint_every": 2,
                "drop_reference": 0.3,
                "drop_expression": 0.3,
                "count_flops": False,
                **train,
            },
            "sample": {"steps": 2, "window": 2, "overlap": 1},
        }
    )


def test_global_batch_is_split_over_workers_and_lr_scaling_is_explicit():
    stage1 = {"batch_size": 8, "steps": 10, "lr": 1e-4}
    cfg = tiny_config(stage1=stage1, grad_accumulation=2).train
    assert [cfg.worker_batch(1, workers) for workers in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(
        ValueError, match=r"train.stage1.batch_size 8 \(global\) is not divisible by 3 worker"
    ):
        cfg.worker_batch(1, 3)
    assert cfg.learning_rate(1) == 1e-4
    assert tiny_config(stage1=stage1, lr_scaling="linear").train.learning_rate(1) == pytest.approx(8e-4)


def test_condition_dropout_trains_the_unconditional_branch_jointly():
    n, g = 20_000, torch.Generator().manual_seed(0)
    joint = tiny_config(drop_both=0.2, drop_reference=0.0, drop_expression=0.0)
    ref, exp = condition_dropout(n, g, joint)
    assert torch.equal(ref, exp) and abs(ref.float().mean().item() - 0.2) < 0.01  # dropped together, at p
    alone = tiny_config(drop_both=0.0, drop_reference=0.2, drop_expression=0.3)
    ref, exp = condition_dropout(n, g, alone)
    both = (ref & exp).float().mean().item()
    assert abs(ref.float().mean().item() - 0.2) < 0.01 and abs(exp.float().mean().item() - 0.3) < 0.01
    assert abs(both - 0.06) < 0.006  # independent: unconditional only p_ref x p_exp of the time


def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path):
    cfg = tiny_config(grad_accumulation=2, stage1={"batch_size": 4, "steps": 100, "lr": 1e-3})
    batches = make_batches_factory(2, 16, crop=16)
    full = train_loop(cfg, 1, batches, tmp_path / "full", max_steps=4, quiet=True)
    first = train_loop(cfg, 1, batches, tmp_path / "cut", max_steps=2, quiet=True)
    rest = train_loop(
        cfg,
        1,
        batches,
        tmp_path / "cut",
        max_steps=4,
        restore=latest_checkpoint(tmp_path / "cut"),
        quiet=True,
    )
    assert first == full[:2]
    assert rest == full[2:]  # exact on CPU: weights, optimizer, EMA, data position and noise RNG restored
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000004"
    a = (tmp_path / "full/checkpoints/step_0000004/ema/diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "cut/checkpoints/step_0000004/ema/diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b


def _ddp_rank(rank: int, world_size: int, port: int, config: str, runs: list[tuple[str, int, bool]]) -> None:
    """One DDP rank (gloo, CPU) running train_loop for each (run folder, max_steps, restore); losses to a file."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = GenConfig.model_validate_json(config)
        for out, max_steps, restore in runs:
            losses = train_loop(
                cfg,
                1,
                make_batches_factory(1, 16, crop=16),
                Path(out),
                max_steps,
                restore=latest_checkpoint(Path(out)) if restore else None,
                rank=rank,
                world_size=world_size,
                wrap=lambda m: DistributedDataParallel(m, find_unused_parameters=True),
                quiet=True,
            )
            (Path(out) / f"losses_rank{rank}_to_{max_steps}.json").write_text(json.dumps(losses))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_worker_ddp_resume_reproduces_every_ranks_loss_sequence(tmp_path):
    """Interrupted at step 2 and resumed in fresh processes: each rank continues with its own RNG and data."""
    cfg = tiny_config().model_dump_json()  # global batch 2: one sample per worker
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    for runs in ([(full, 4, False), (cut, 2, False)], [(cut, 4, True)]):  # fresh processes for the resume
        # fork: the children inherit the imported modules instead of importing torch and diffusers again
        torch.multiprocessing.start_processes(
            _ddp_rank, (2, _free_port(), cfg, runs), nprocs=2, start_method="fork"
        )

    def losses(out: str, rank: int, steps: int) -> list[float]:
        return json.loads((Path(out) / f"losses_rank{rank}_to_{steps}.json").read_text())

    for rank in (0, 1):
        assert len(losses(full, rank, 4)) == 4
        assert losses(cut, rank, 2) + losses(cut, rank, 4) == losses(full, rank, 4)  # exact, per rank
    assert losses(full, 0, 4) != losses(full, 1, 4)  # the ranks do see different batches and noise
    ema = "checkpoints/step_0000004/ema/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "full" / ema).read_bytes() == (tmp_path / "cut" / ema).read_bytes()


def test_stage2_starts_from_stage1_and_trains_on_clips(tmp_path):
    cfg = tiny_config()
    train_loop(cfg, 1, make_batches_factory(2, 16, crop=16), tmp_path / "s1", max_steps=2, quiet=True)
    losses = train_loop(
        cfg,
        2,
        make_batches_factory(1, 16, frames=3, crop=16),
        tmp_path / "s2",
        max_steps=2,
        init=tmp_path / "s1",
        quiet=True,
    )
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
    latest = train(
        path,
        1,
        None,
        tmp_path / "run",
        max_steps=2,
        make_batches=make_batches_factory(2, 16, crop=16),
        quiet=True,
    )
    assert latest.name == "step_0000002" and (latest / "model/config.json").is_file()


def _kill_when_reported(run: Path, pids: Path, rank_seed: int, killed: list[int]) -> None:
    """Once Ray has registered a checkpoint, SIGKILL the worker process that reads rank `rank_seed`'s stream."""
    import signal
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if (run / "checkpoints/checkpoint_manager_snapshot.json").is_file():
            pid = int(next(pids.glob(f"{rank_seed}-0-*")).name.split("-")[2])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_ray_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path, local_ray):
    """A real kill of rank 1 mid-run: Ray restarts the group from the last reported checkpoint and the run
    ends at the requested step with the weights of an uninterrupted 2-worker run."""
    import threading

    import gen_synthetic
    import ray.cloudpickle
    import yaml

    from geodiff4d.gen.train import train

    ray.cloudpickle.register_pickle_by_value(gen_synthetic)  # a test helper, not importable in workers
    cfg = tiny_config()
    path, pids, run = tmp_path / "tiny.yaml", tmp_path / "pids", tmp_path / "run"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    pids.mkdir()
    killed: list[int] = []
    killer = threading.Thread(target=_kill_when_reported, args=(run, pids, cfg.train.seed + 1, killed))
    killer.start()
    latest = train(
        path,
        1,
        None,
        run,
        max_steps=8,
        workers=2,
        quiet=True,
        make_batches=recording_batches(pids, 1, 16, delay_s=0.3, crop=16),
    )
    killer.join()
    assert killed and latest.name == "step_0000008"
    calls = [name.split("-") for name in sorted(p.name for p in pids.iterdir())]
    restarted = [
        (seed, int(position)) for seed, position, pid in calls if int(pid) not in killed and int(position)
    ]
    assert {seed for seed, _ in restarted} == {"0", "1"}  # both ranks restarted from a checkpoint, not from 0
    reference = tmp_path / "uninterrupted"
    torch.multiprocessing.start_processes(
        _ddp_rank,
        (2, _free_port(), cfg.model_dump_json(), [(str(reference), 8, False)]),
        nprocs=2,
        start_method="fork",
    )
    ema = "ema/diffusion_pytorch_model.safetensors"
    assert (latest / ema).read_bytes() == (reference / "checkpoints/step_0000008" / ema).read_bytes()


@pytest.mark.timeout(60)  # Ray Train alone waits for a GPU node forever
def test_training_on_more_gpus_than_a_node_has_stops_at_once(tmp_path, local_ray):
    import yaml

    from geodiff4d.core.jobs import UnmeetableRequest
    from geodiff4d.gen.train import train

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
    batches = make_batches_factory(2, 16, crop=16)
    with pytest.raises(
        UnmeetableRequest, match=r"^--gpus-per-worker 1: .* it has 1 node with 2 CPUs and 0 GPUs"
    ):
        train(
            path, 1, None, tmp_path / "run", max_steps=1, gpus_per_worker=1, make_batches=batches, quiet=True
        )


def _noting_kernels(folder: Path, stream):
    """``stream`` that notes, per call, where it starts and whether the worker runs deterministic kernels."""

    def make_batches(seed: int, position: int):
        note = {
            "position": position,
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        }
        (folder / f"{os.getpid()}-{position}.json").write_text(json.dumps(note))
        yield from stream(seed, position)

    return make_batches


@pytest.mark.slow
def test_ray_keeps_the_last_checkpoints_and_resumes_from_the_latest(tmp_path, local_ray):
    """keep_checkpoints 2: Ray Train deletes all but the two latest; a rerun resumes from the latest and ends
    with the weights of an uninterrupted run (the same threads per worker). deterministic: the workers run
    deterministic kernels."""
    import gen_synthetic
    import ray.cloudpickle
    import yaml

    from geodiff4d.gen.train import train

    ray.cloudpickle.register_pickle_by_value(gen_synthetic)  # test helpers, not importable in workers
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    path, run, notes = tmp_path / "tiny.yaml", tmp_path / "run", tmp_path / "notes"
    path.write_text(
        yaml.safe_dump(tiny_config(keep_checkpoints=2, deterministic=True).model_dump(mode="json"))
    )
    notes.mkdir()
    batches = _noting_kernels(notes, make_batches_factory(2, 16, crop=16))

    def kept() -> list[str]:
        return sorted(p.name for p in (run / "checkpoints").glob("step_*"))

    train(path, 1, None, run, max_steps=6, make_batches=batches, quiet=True)
    assert kept() == ["step_0000004", "step_0000006"]  # written every 2 steps: step 2 deleted
    latest = train(path, 1, None, run, max_steps=8, resume=True, make_batches=batches, quiet=True)
    assert latest.name == "step_0000008" and kept() == ["step_0000006", "step_0000008"]
    seen = [json.loads(p.read_text()) for p in notes.iterdir()]
    assert sorted(n["position"] for n in seen) == [0, 6]  # the rerun started after step 6's batches
    assert all(n["deterministic"] and n["cublas"] == ":4096:8" for n in seen)
    whole = train(path, 1, None, tmp_path / "whole", max_steps=8, make_batches=batches, quiet=True)
    ema = "ema/diffusion_pytorch_model.safetensors"
    assert (latest / ema).read_bytes() == (whole / ema).read_bytes()  # as if never interrupted

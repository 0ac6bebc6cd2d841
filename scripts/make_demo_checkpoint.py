"""Make the demo's diffusion checkpoint: configs/benchmark-demo.yaml's model, trained long enough to show heads.

`make demo` samples from this run (`generation.run` in configs/benchmark-demo.yaml) instead of training the
32 px model for 800 + 200 steps on CPU, which leaves its RGB speckled. The data is the demo's own procedural
data (3 subjects, seed 0: the demo's 2 and the third that the end-to-end benchmark adds, plus 16 SynthHuman
samples), packed at the model's resolution (`--resolution`, 32 px for the shipped one) by the benchmark's own
stages; the model is configs/demo.yaml with bigger batches and more steps. Training is `gen.train.train_loop` in
this process (no Ray Train), so a GPU machine without Ray can run it on shards packed elsewhere (`--shards`).
Rerun with the same arguments, it continues the runs in `--work` from their latest checkpoints (a GPU call cut
short by its time limit loses only the steps since the last one).

    python scripts/make_demo_checkpoint.py --work /tmp/demockpt                 # synth + pack + train
    python scripts/make_demo_checkpoint.py --work W --shards SHARDS --device cuda --steps1 N --steps2 M

The output folder is a training run folder (config.yaml, scheduler/, checkpoints/step_*/ema) holding only the
EMA weights, plus MADE.json: the command, the time per stage, the device, the git commit and
the weights' sha256. A rerun gives an equivalent model, not the same bytes (GPU kernels are not deterministic).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from geodiff4d.core.io.json_yaml import read_json, write_json
from geodiff4d.gen.checkpoint import CHECKPOINTS, WEIGHTS, latest_checkpoint
from geodiff4d.gen.config import GenConfig, load_config
from geodiff4d.gen.data import shard_batches
from geodiff4d.gen.model_run import CONFIG_FILE, SCHEDULER_FILE
from geodiff4d.gen.train import train_loop

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = 3


def pack_demo_data(work: Path, resolution: int) -> Path:
    """Synthesize and pack the demo's procedural data (with SUBJECTS subjects) through the benchmark's stages, at
    the model's resolution."""
    from geodiff4d.cluster.benchmark import Benchmark
    from geodiff4d.cluster.benchmark_config import BenchmarkConfig
    from geodiff4d.core.runtime import connect

    raw = yaml.safe_load((REPO / "configs" / "benchmark-demo.yaml").read_text())
    raw["data"]["procedural"]["subjects"] = SUBJECTS
    raw["generation"].pop("run", None)  # pack as a benchmark that trains its own model would
    raw["generation"]["model_overrides"] = {"data": {"resolution": resolution}}
    config = BenchmarkConfig.model_validate(raw)
    bench = Benchmark(config, work)
    connect(None)
    bench.synthesize()
    method = next(m for m in config.methods if m.kind == "geodiff4d")
    bench.pack(method, "train")
    return bench.shards(method, "train")


def training_config(args: argparse.Namespace) -> GenConfig:
    """configs/demo.yaml with this run's resolution, batches, steps and loader processes."""
    cfg = load_config("demo")
    train = cfg.train.model_copy(
        update={
            "stage1": cfg.train.stage1.model_copy(update={"batch_size": args.batch1, "steps": args.steps1}),
            "stage2": cfg.train.stage2.model_copy(update={"batch_size": args.batch2, "steps": args.steps2}),
            "checkpoint_every": args.checkpoint_every,
            "sample_every": max(args.steps1, args.steps2),
            "log_every": 10,
            "count_flops": False,
        }
    )
    data = cfg.data.model_copy(update={"loader_workers": args.loader_workers, "resolution": args.resolution})
    return cfg.model_copy(update={"train": train, "data": data})


def train_stage(cfg: GenConfig, stage: int, shards: Path, run: Path, device: torch.device) -> float:
    """One stage into `run` (stage 2 starts from the stage-1 run beside it), continuing from the run's latest
    checkpoint: a call cut short (a device machine's time limit per command) is finished by the next one, and a
    finished stage trains no further. Returns this call's seconds."""
    started = time.perf_counter()
    batches = shard_batches(shards, cfg, stage, cfg.data.loader_workers)
    train_loop(
        cfg,
        stage,
        batches,
        run,
        init=run.parent / "stage1" if stage == 2 else None,
        restore=latest_checkpoint(run),
        device=device,
    )
    return time.perf_counter() - started


def check_resumable(runs: Path, cfg: GenConfig) -> None:
    """Refuse to continue runs that were trained with other settings (they would mix two models)."""
    for written in sorted(runs.glob(f"stage*/{CONFIG_FILE}")):
        if yaml.safe_load(written.read_text()) != cfg.model_dump(mode="json"):
            sys.exit(
                f"{written.parent}: trained with other settings than these; give a new --work or delete {runs}"
            )


def add_seconds(runs: Path, seconds: dict[str, float]) -> dict[str, float]:
    """Each stage's seconds over the calls that trained these runs to their end (runs/seconds.json; a call killed
    by a time limit records nothing, so a resumed run's time is a lower bound)."""
    path = runs / "seconds.json"
    total = read_json(path) if path.is_file() else {}
    total = {k: round(total.get(k, 0.0) + seconds.get(k, 0.0), 1) for k in sorted({*total, *seconds})}
    write_json(path, total, indent=None, sort_keys=False)
    return total


def export(run: Path, out: Path, made: dict) -> None:
    """The run's config, scheduler and latest EMA weights into `out` (replaced whole), with MADE.json."""
    latest = latest_checkpoint(run)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / SCHEDULER_FILE).parent.mkdir(parents=True)
    shutil.copy2(run / CONFIG_FILE, tmp / CONFIG_FILE)
    shutil.copy2(run / SCHEDULER_FILE, tmp / SCHEDULER_FILE)
    shutil.copytree(latest / "ema", tmp / CHECKPOINTS / latest.name / "ema")
    made["sha256"] = hashlib.sha256((latest / "ema" / WEIGHTS).read_bytes()).hexdigest()
    write_json(tmp / "MADE.json", made, indent=2, sort_keys=False, newline=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _git_commit() -> str:
    try:
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # no git on the machine (a copied working tree)
        return "unknown"
    return found.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--work", type=Path, required=True, help="scratch folder: data, shards, training runs"
    )
    parser.add_argument("--out", type=Path, help="default: configs/checkpoints/demo-{resolution}px")
    parser.add_argument(
        "--resolution", type=int, default=32, help="the model's (and the packed data's) pixels"
    )
    parser.add_argument("--shards", type=Path, help="already packed demo shards (skips synth and pack)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps1", type=int, default=6000)
    parser.add_argument("--steps2", type=int, default=1000)
    parser.add_argument("--batch1", type=int, default=32)
    parser.add_argument("--batch2", type=int, default=2)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument(
        "--source-commit", default=None, help="the code's commit (default: git rev-parse HEAD)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    work, device = args.work.resolve(), torch.device(args.device)
    shards = args.shards.resolve() if args.shards else pack_demo_data(work, args.resolution)
    pack_seconds = time.perf_counter() - started
    cfg = training_config(args)
    runs = work / "runs"
    check_resumable(runs, cfg)
    seconds = {f"stage{s}": train_stage(cfg, s, shards, runs / f"stage{s}", device) for s in (1, 2)}
    seconds = add_seconds(runs, {"pack": pack_seconds, **seconds})
    made = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "git_commit": args.source_commit or _git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "data": {
            "benchmark_config": "configs/benchmark-demo.yaml",
            "subjects": SUBJECTS,
            "resolution": args.resolution,
        },
        "seconds": seconds,
        "train": cfg.train.model_dump(mode="json"),
    }
    out = args.out or REPO / "configs" / "checkpoints" / f"demo-{args.resolution}px"
    export(runs / "stage2", out.resolve(), made)
    print(json.dumps(made, indent=2))


if __name__ == "__main__":
    main()

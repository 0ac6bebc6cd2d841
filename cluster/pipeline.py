"""The end-to-end demo: every stage that exists, on procedural data, CPU and an embedded Ray.

Each stage is committed with a marker in ``OUT/.stages``; a rerun skips finished stages (and the
stages themselves resume unit by unit), so ``make demo`` twice does the work once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from geodiff4d.cluster.config_files import resolve_config
from geodiff4d.cluster.jobs import CommitLog
from geodiff4d.cluster.runtime import connect, shutdown


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: str  # relative to the demo folder, printed at the end
    run: Callable[[Path, str | None], dict]


def _synth(out: Path, address: str | None) -> dict:
    from geodiff4d.datasets.procedural import SynthSpec, synthesize

    spec = SynthSpec(subjects=2, sequences=1, frames=20, cameras=8, resolution=128, synthetic=16, seed=0)
    report = synthesize(out / "data", spec, workers=2, address=address)
    if not report.ok:
        raise RuntimeError(f"synth failed:\n{report.summary()}")
    return {"summary": report.summary()}


def _pack(out: Path, address: str | None) -> dict:
    from geodiff4d.datasets.packing import pack
    from geodiff4d.datasets.verify import verify
    from geodiff4d.gen.config import load_config

    data = out / "data"
    sources = [("nersemble", data / "nersemble"), ("synthhuman", data / "synthhuman")]
    # 160 = 20 frames x 8 cameras: each subject's sequence in one shard, so stage 2 finds 16-frame clips
    resolution = load_config(DEMO_CONFIG).data.resolution  # training refuses shards of another resolution
    report = pack(out / "shards", sources, resolution=resolution, workers=2, address=address, samples_per_shard=160)
    if not report.ok:
        raise RuntimeError(f"pack failed:\n{report.summary()}")
    verified = verify(out / "shards")
    typer.echo(verified.summary())
    if not verified.ok:
        raise RuntimeError("verify found damaged shards")
    return {"pack": report.summary(), "verify": verified.summary()}


RECON_STEPS = 300
# A few minutes of training: enough to see heads and normals emerge. configs/demo.yaml's full schedule
# (800 + 200 steps, ~10 min on an idle 2-core machine) is what bench/bench_gen.py --quality measures.
DEMO_TRAIN_STEPS = {1: 240, 2: 40}
DEMO_CONFIG = resolve_config("demo")
SUBJECT, SEQUENCE, HELD_OUT = "001", "EXP-1-head", "222200037"  # the frontal camera is held out of recon
REFERENCE_CAMERA = "222200040"  # a training camera: the reference-copy baseline's reference image


def _train_stage(out: Path, address: str | None, stage: int) -> dict:
    from geodiff4d.gen.checkpoint import latest_checkpoint
    from geodiff4d.gen.train import train

    run = out / f"gen_stage{stage}"
    init = out / "gen_stage1" if stage == 2 else None
    resume = latest_checkpoint(run) is not None  # an interrupted demo continues its run
    checkpoint = train(DEMO_CONFIG, stage, out / "shards", run, max_steps=DEMO_TRAIN_STEPS[stage], init=init,
                       resume=resume, address=address)
    return {"checkpoint": str(checkpoint)}


def _sample(out: Path, address: str | None) -> dict:
    from geodiff4d.gen.sample_frames import sample_to_frame_folder

    # a short sequence (one temporal window) from two views keeps CPU sampling to a few minutes
    grid = sample_to_frame_folder(DEMO_CONFIG, out / "gen_stage2", out / "shards", SUBJECT, SEQUENCE,
                                  cameras=[HELD_OUT, "222200040"], frames=range(16), out=out / "samples", seed=0)
    typer.echo(f"sample grid: {grid}")
    return {"grid": str(grid)}


def _recon(out: Path, address: str | None) -> dict:
    from geodiff4d.datasets.frame_folder import export_frame_folder, read_cameras, write_cameras
    from geodiff4d.recon.run import ReconConfig, reconstruct, render_avatar

    frames = out / "frames"
    export_frame_folder(out / "data" / "nersemble", frames, subjects=[SUBJECT])
    cameras = read_cameras(frames / "cameras" / SUBJECT / f"{SEQUENCE}.json")
    config = ReconConfig(steps=RECON_STEPS, train_cameras=sorted(set(cameras) - {HELD_OUT}))
    report = reconstruct(frames, out / "avatars", [SUBJECT], workers=1, address=address, config=config)
    if not report.ok:
        raise RuntimeError(f"recon failed:\n{report.summary()}")
    held_out = out / "avatars" / f"{SUBJECT}-held-out-camera.json"
    write_cameras(held_out, {HELD_OUT: cameras[HELD_OUT]})
    fps = render_avatar(out / "avatars" / SUBJECT, held_out, None, out / "renders")
    typer.echo(f"rendered the held-out camera {HELD_OUT} at {fps:.1f} frames/s into {out / 'renders'}")
    return {"render_fps": fps}


def _copy_camera(src_rgb_root: Path, dst_root: Path) -> Path:
    """One camera's frames of the demo subject as a method (or ground-truth) tree for evaluation."""
    src = src_rgb_root / SUBJECT / SEQUENCE / HELD_OUT
    dst = dst_root / SUBJECT / SEQUENCE / HELD_OUT
    dst.mkdir(parents=True, exist_ok=True)
    for png in sorted(src.glob("*.png")):
        shutil.copyfile(png, dst / png.name)
    return dst_root


def _evaluate(out: Path, address: str | None) -> dict:
    from geodiff4d.eval.baselines import gt_noise, reference_copy, reference_images
    from geodiff4d.eval.inputs import open_ground_truth
    from geodiff4d.eval.leaderboard import build_leaderboard
    from geodiff4d.eval.run import evaluate

    root = out / "eval"
    gt_tree = _copy_camera(out / "frames" / "rgb", root / "gt")
    gt = open_ground_truth(gt_tree)
    # the reference image comes from a camera the avatar trained on, never from the scored held-out camera
    references = reference_images(open_ground_truth(out / "frames" / "rgb"), camera=REFERENCE_CAMERA)
    reference_copy(gt, root / "pred" / "reference_copy", references)
    gt_noise(gt, root / "pred" / "gt_noise", seed=0)
    _copy_camera(out / "renders" / "rgb", root / "pred" / "geodiff4d_recon")
    # pixel metrics over the head: the avatar renders no studio backdrop (NeRSemble's benchmark masks too)
    gt_mask = _copy_camera(out / "frames" / "mask", root / "gt_mask")
    # ... and every metric sees the same pixels: both composited on one grey with the GT alpha first
    report = evaluate(root / "pred", gt_tree, "self", root / "run", address, workers=2, gt_mask=gt_mask, masked=True,
                      background=0.5)
    files = build_leaderboard(root / "run")
    typer.echo(f"leaderboard: {files['html']}")
    return {"eval": report.summary(), "html": str(files["html"])}


STAGES: tuple[Stage, ...] = (
    Stage("synth", "data", _synth),
    Stage("pack", "shards", _pack),
    Stage("train_stage1", "gen_stage1", lambda out, address: _train_stage(out, address, 1)),
    Stage("train_stage2", "gen_stage2", lambda out, address: _train_stage(out, address, 2)),
    Stage("sample", "samples", _sample),
    Stage("recon", "renders", _recon),
    Stage("eval", "eval/run/leaderboard", _evaluate),
)


def run_demo(out: Path, address: str | None = None) -> bool:
    """Run the stages in order; returns False (after saying why) when one fails."""
    out = Path(out).resolve()
    done = CommitLog(out / ".stages")
    connect(address)
    try:
        for stage in STAGES:
            if done.is_committed(stage.name):
                typer.echo(f"[{stage.name}] already done, skipping (delete {done.marker(stage.name)} to redo)")
                continue
            typer.echo(f"[{stage.name}] running")
            start = time.perf_counter()
            try:
                stats = stage.run(out, address)
            except Exception as error:  # noqa: BLE001 - report the failing stage and stop
                typer.secho(f"[{stage.name}] FAILED: {error}", fg=typer.colors.RED, err=True)
                return False
            stats["seconds"] = round(time.perf_counter() - start, 1)
            done.commit(stage.name, stats)
            typer.echo(f"[{stage.name}] done in {stats['seconds']} s")
    finally:
        shutdown()
    typer.echo("\nDemo outputs:")
    for stage in STAGES:
        typer.echo(f"  {stage.name:<12} {(out / stage.outputs).resolve()}")
    return True

"""Speed levers of sampling, measured for quality on the CPU with the shipped demo model (32 px, trained weights).

Every variant runs `geodiff4d generate`'s own unit code (gen.generate.GenerateJob, in this process, no Ray) on
the same inputs and the same noise (scikit-image's astronaut as the reference, identity fitted by our tracker,
random expressions as driving, one orbit view), and is compared with a reference variant frame by frame:
PSNR and LPIPS (AlexNet) between the two outputs' RGB frames, and seconds per written frame (the units'
own timing: pose maps, denoising, decoding and PNG writing).

  1. schedulers: DDIM 10, DPM-Solver++ 10/15 and UniPC 10/15 against DDIM 25 (the default) on one unit of all
     `--frames` frames (one temporal window);
  2. context frames per unit (`sample.context`): 2 and 0 against the default (`overlap`, 4) with half the frames
     per unit (two units meeting in the middle), DDIM 10; also on the two frames either side of the seam, where
     too little context would show.
The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import make_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "checkpoints" / "demo-32px"
SCHEDULERS = [("ddim", 10), ("dpmsolver++", 10), ("dpmsolver++", 15), ("unipc", 10), ("unipc", 15)]


def variant_run(work: Path, name: str, **sample) -> Path:
    """A run folder of the demo model (its checkpoints linked) sampling with `sample` over its sample config."""
    from geodiff4d.gen.config import GenConfig, load_config
    from geodiff4d.gen.model_run import write_run_files

    raw = load_config(DEMO / "config.yaml").model_dump()
    raw["sample"].update(sample)
    run = work / "runs" / name
    write_run_files(run, GenConfig.model_validate(raw))
    (run / "checkpoints").symlink_to(DEMO / "checkpoints", target_is_directory=True)
    return run


def sample_variant(run: Path, inputs: Path, out: Path, frames_per_unit: int) -> tuple[torch.Tensor, float]:
    """RGB frames [T, 3, H, W] of the one view that generate's units write with `run`, and seconds per frame."""
    from geodiff4d.core.io.images import decode_image
    from geodiff4d.core.io.tensors import image_to_tensor
    from geodiff4d.gen.generate import GenerateJob, load_inputs, plan_units

    shutil.copytree(inputs / "_generate" / "inputs", out / "_generate" / "inputs")
    job = GenerateJob(run, out, seed=0, head_model="procedural:0", use_gpu=False)
    job.setup()
    subject = load_inputs(out, "astronaut")
    stats = [job.run(unit) for unit in plan_units(subject, frames_per_unit, 1)]
    seconds = sum(s["seconds"] for s in stats) / sum(s["frames"] for s in stats)
    paths = sorted((out / "rgb").rglob("*.png"))
    return torch.stack([image_to_tensor(decode_image(p.read_bytes())) for p in paths]), seconds


def compare(lpips, frames: torch.Tensor, reference: torch.Tensor) -> str:
    """Mean PSNR and LPIPS of `frames` against `reference` (both [T, 3, H, W])."""
    from geodiff4d.eval.image_metrics import psnr

    return f"PSNR {psnr(frames, reference).mean():5.1f} dB, LPIPS {lpips(frames, reference).mean():.3f}"


def scheduler_figures(work: Path, inputs: Path, lpips, frames: int) -> None:
    reference, ref_seconds = sample_variant(variant_run(work, "ddim25"), inputs, work / "out-ddim25", frames)
    print(f"DDIM 25 (reference): {ref_seconds:.2f} s per frame", flush=True)
    for scheduler, steps in SCHEDULERS:
        name = f"{scheduler}{steps}"
        run = variant_run(work, name, scheduler=scheduler, steps=steps)
        rgb, seconds = sample_variant(run, inputs, work / f"out-{name}", frames)
        print(
            f"{scheduler} {steps}: {seconds:.2f} s per frame ({ref_seconds / seconds:.2f}x faster), against DDIM 25: "
            f"{compare(lpips, rgb, reference)}",
            flush=True,
        )


def context_figures(work: Path, inputs: Path, lpips, frames_per_unit: int) -> None:
    reference, ref_seconds = None, None
    seam = slice(frames_per_unit - 2, frames_per_unit + 2)
    for context in (None, 2, 0):
        name = f"context{context}"
        run = variant_run(work, name, steps=10, context=context)
        rgb, seconds = sample_variant(run, inputs, work / f"out-{name}", frames_per_unit)
        if reference is None:
            reference, ref_seconds = rgb, seconds
            print(f"context 4 (default, = overlap): {seconds:.2f} s per written frame", flush=True)
            continue
        print(
            f"context {context}: {seconds:.2f} s per written frame ({ref_seconds / seconds:.2f}x faster); against "
            f"context 4: all frames {compare(lpips, rgb, reference)}; seam frames "
            f"{compare(lpips, rgb[seam], reference[seam])}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from geodiff4d.eval.lpips_metric import load_lpips
    from geodiff4d.gen.generate import prepare

    torch.set_num_threads(args.threads)
    lpips = load_lpips()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(DEMO, work / "run", symlinks=True)
        spec = make_spec(work, args.frames, 1, 1, args.frames)
        prepare(spec, work / "inputs")  # dlib + tracking of the reference, once: not part of the timing
        print(
            f"demo model {DEMO.relative_to(ROOT)} at 32 px, {args.frames} frames x 1 view, {args.threads} torch "
            f"threads; {os.cpu_count()} cores, load average {os.getloadavg()}",
            flush=True,
        )
        scheduler_figures(work, work / "inputs", lpips, args.frames)
        context_figures(work, work / "inputs", lpips, args.frames // 2)
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

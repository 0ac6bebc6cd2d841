"""Mass sampling (`geodiff4d generate`) on the CPU: frames/s with 1 and 2 Ray actors, and all views of a
window denoised as one batch vs one view at a time, measured in one run on the same inputs.

The model is configs/demo.yaml's (32 px, pixel latents), randomly initialised: sampling cost does not depend on
the weights. Inputs: scikit-image's astronaut as the reference (identity fitted by our tracker), a tracking
file of random expressions as driving, an orbit of views. A "frame" is one (camera, time) RGB + normal pair.
Each configuration writes its own frame folder; frames/s are timed from the first unit's start to the last unit's
end (the units' wall-clock windows in their commit markers), and over the whole `generate` call after the inputs are
resolved (actor start-up and model loading included). The machine is shared: the load average is printed with the
figures.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from geodiff4d.core.io.images import write_png
from geodiff4d.core.io.json_yaml import read_json

ROOT = Path(__file__).resolve().parents[1]


def make_run(run: Path, resolution: int, steps: int) -> None:
    """A run folder (config.yaml, scheduler, EMA weights) of the demo model at `resolution`, random weights,
    sampling with `steps` DDIM steps."""
    from geodiff4d.gen.build import build_codec, build_model
    from geodiff4d.gen.config import GenConfig, load_config
    from geodiff4d.gen.model_run import write_run_files

    raw = load_config(ROOT / "configs/demo.yaml").model_dump()
    raw["data"]["resolution"] = resolution
    raw["sample"]["steps"] = steps
    cfg = GenConfig.model_validate(raw)
    torch.manual_seed(0)
    build_model(cfg, 2, build_codec(cfg)).save_pretrained(run / "checkpoints/step_0000000/ema")
    write_run_files(run, cfg)


def make_spec(work: Path, frames: int, views: int, cameras_per_unit: int, frames_per_unit: int) -> Path:
    from skimage import data

    from geodiff4d.datasets.flame import FlameParams
    from geodiff4d.datasets.frame_folder import write_tracking
    from geodiff4d.datasets.procedural_head import procedural_head_model

    write_png(work / "reference.png", data.astronaut()[:384, 64:448], encoder="pillow")
    head = procedural_head_model(0)
    driving = FlameParams.zeros(frames, head.n_shape, head.n_expr)
    driving.expression[:] = torch.from_numpy(np.random.default_rng(0).normal(0, 0.5, (frames, head.n_expr)))
    write_tracking(work / "driving.npz", driving)
    spec = work / f"spec-{cameras_per_unit}.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "run": str(work / "run"),
                "seed": 0,
                "frames_per_unit": frames_per_unit,
                "cameras_per_unit": cameras_per_unit,
                "subjects": [
                    {
                        "name": "astronaut",
                        "reference": {"image": str(work / "reference.png")},
                        "identity": {"fit": True},
                        "cameras": {"orbit": views},
                        "driving": {"tracking": str(work / "driving.npz")},
                        "frames": frames,
                    }
                ],
            }
        )
    )
    return spec


def frames_per_second(spec: Path, out: Path, workers: int) -> tuple[float, float]:
    """Frames/s of `generate` into `out` (whose inputs `prepare` resolved before): over the whole call, and from
    the first unit's start to the last unit's end (actor start-up and model loading excluded)."""
    from geodiff4d.gen.generate import STATE, generate, prepare

    _, subjects = prepare(spec, out)
    total = sum(s.tracking.batch_size * len(s.cameras) for s in subjects)
    start = time.perf_counter()
    report = generate(spec, out, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    assert report.ok and len(report.completed) > 0, report.summary()
    windows = [read_json(f)["unit_window"] for f in (out / STATE / "commits").glob("*.stats.json")]
    return total / seconds, total / (max(w[1] for w in windows) - min(w[0] for w in windows))


def connect_with_retries(attempts: int = 5) -> None:
    """An embedded Ray; on a heavily shared machine its start can time out (Ray waits 30 s), so try again."""
    import ray

    from geodiff4d.core.runtime import connect

    for attempt in range(attempts):
        try:
            connect(num_cpus=2)
            return
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
            ray.shutdown()
            if attempt == attempts - 1:
                raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--frames-per-unit", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    from geodiff4d.gen.generate import prepare

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_run(work / "run", args.resolution, args.steps)
        batched = make_spec(work, args.frames, args.views, args.views, args.frames_per_unit)
        single = make_spec(work, args.frames, args.views, 1, args.frames_per_unit)
        for spec, out in ((batched, "one"), (batched, "two"), (single, "single")):
            prepare(spec, work / out)  # dlib + tracking of the reference: not part of the timing
        connect_with_retries()
        print(
            f"demo model at {args.resolution} px, DDIM {args.steps} steps, {args.frames} frames x {args.views} views, "
            f"{args.frames_per_unit} frames per unit; {os.cpu_count()} cores, load average {os.getloadavg()}"
        )
        (one_all, one), (two_all, two) = (
            frames_per_second(batched, work / "one", 1),
            frames_per_second(batched, work / "two", 2),
        )
        alone_all, alone = frames_per_second(single, work / "single", 1)
        print(
            "frames/s from the first unit's start to the last unit's end (in brackets: the whole call, actor start"
        )
        print("and model loading included)")
        print(f"1 actor, views batched:        {one:.2f} ({one_all:.2f}) frames/s")
        print(
            f"2 actors, views batched:       {two:.2f} ({two_all:.2f}) frames/s  -> ratio 2/1 actors {two / one:.2f}x "
            f"({two_all / one_all:.2f}x)"
        )
        print(
            f"1 actor, one view at a time:   {alone:.2f} ({alone_all:.2f}) frames/s  -> ratio batched/one view "
            f"{one / alone:.2f}x ({one_all / alone_all:.2f}x)"
        )
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

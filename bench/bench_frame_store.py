"""Peak RSS of a subject's training frames at 200 frames x 12 views x 256 px: the compact frame store
(uint8 RGB and mask, int8 normals) against float32 views (what recon held before), each in a fresh process.

Each process loads the subject's frames (the store through ``recon.run.load_subject``, the reference by
decoding the same PNGs into float32 views, one image at a time), then runs a few fit steps, and reports its
peak RSS, its RSS before loading and the bytes of pixel data it holds. Target: store <= 0.3x float32.
The frame folder is written once (rgb, mask, 16-bit normal PNGs; 8 distinct frames per camera, hard-linked
to fill 200, which changes nothing for memory: every file is decoded).

    python bench/bench_frame_store.py [--frames 200] [--cameras 12] [--size 256] [--steps 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def write_folder(root: Path, frames: int, cameras: int, size: int) -> None:
    import torch

    from geodiff4d.datasets.cameras import nersemble_rig
    from geodiff4d.datasets.flame import FlameParams
    from geodiff4d.datasets.frame_folder import frame_relpath, write_cameras, write_frame, write_tracking
    from geodiff4d.datasets.procedural_head import procedural_head_model

    if (root / "done").is_file():
        return
    model = procedural_head_model(0)
    rig = nersemble_rig(width=size, height=size)
    serials = sorted(rig)[:cameras]
    write_cameras(root / "cameras" / "s0" / "EXP-1.json", {s: rig[s] for s in serials})
    write_tracking(
        root / "tracking" / "s0" / "EXP-1.npz", FlameParams.zeros(frames, model.n_shape, model.n_expr)
    )
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    inside = (xs**2 + ys**2) < 0.8
    normal = torch.nn.functional.normalize(
        torch.stack([xs, -ys, (1.2 - xs**2 - ys**2).clamp_min(0.05)]), dim=0
    )
    g = torch.Generator().manual_seed(0)
    for serial in serials:
        for frame in range(frames):
            if frame < 8:
                rgb = (0.5 + 0.3 * torch.sin(6 * xs + frame) * torch.cos(5 * ys))[None].expand(3, -1, -1)
                rgb = (rgb + 0.05 * torch.rand(3, size, size, generator=g)).clamp(0, 1)
                write_frame(root, "s0", "EXP-1", serial, frame, rgb, inside.float(), normal)
                continue
            rel = frame_relpath("s0", "EXP-1", serial, frame)
            for kind in ("rgb", "mask", "normal"):
                (root / kind / rel).parent.mkdir(parents=True, exist_ok=True)
                os.link(root / kind / frame_relpath("s0", "EXP-1", serial, frame % 8), root / kind / rel)
    (root / "done").write_text("complete\n")


def measure(root: Path, mode: str, steps: int) -> dict:
    import torch

    from geodiff4d.datasets import frame_folder as frame_io
    from geodiff4d.recon.fit import View
    from geodiff4d.recon.run import ReconConfig, load_head_model, load_subject, new_fitter

    torch.set_num_threads(1)  # memory is the figure; one thread keeps a loaded machine from crawling
    config = ReconConfig(steps=steps, init_colors=False)
    model = load_head_model(config.head_model)
    before = _rss_mb()
    started = time.perf_counter()
    data = load_subject(root, "s0", model, config)
    if (
        mode == "float32"
    ):  # the reference: every view decoded to float32 tensors and kept, as recon did before
        cameras = frame_io.read_cameras(root / "cameras" / "s0" / "EXP-1.json")
        views = []
        data.views = None  # drop the store (a quarter of the views' size) before reading the frames again
        for image in frame_io.iter_frames(root, "s0", "EXP-1"):
            mask = torch.from_numpy(image.mask)
            cam = cameras[image.camera]
            views.append(
                View(
                    image.frame,
                    torch.tensor(cam.world_to_cam, dtype=torch.float32),
                    torch.tensor(cam.K, dtype=torch.float32),
                    torch.from_numpy(image.rgb).permute(2, 0, 1) * mask,
                    mask,
                    torch.from_numpy(image.normal).permute(2, 0, 1) * mask,
                )
            )
        data.views = views
        held = sum(t.numel() * t.element_size() for v in views for t in (v.rgb, v.mask, v.normal))
    else:
        held = data.views.nbytes
    loaded = time.perf_counter() - started
    fitter = new_fitter(data, model, config)
    fitter.run(steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": mode,
        "views": len(data.views),
        "pixel_mb": held / 2**20,
        "before_mb": before,
        "peak_mb": peak,
        "load_s": loaded,
        "fit_steps": steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--cameras", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_frame_store")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.steps)))
        return
    print(
        f"# {' '.join(sys.argv)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()}"
    )
    root = args.work / f"{args.frames}x{args.cameras}x{args.size}"
    write_folder(root, args.frames, args.cameras, args.size)
    runs = {}
    for mode in ("uint8", "float32"):
        out = subprocess.run(
            [sys.executable, __file__, "--measure", str(root), mode, "--steps", str(args.steps)],
            check=True,
            capture_output=True,
            text=True,
        )
        runs[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{mode:>8}: {r['views']} views, pixel data {r['pixel_mb']:7.0f} MB, peak RSS {r['peak_mb']:7.0f} MB "
            f"(before loading {r['before_mb']:5.0f} MB), load {r['load_s']:.0f} s + {r['fit_steps']} fit steps"
        )
    small, big = runs["uint8"], runs["float32"]
    print(f"pixel data ratio uint8 / float32: {small['pixel_mb'] / big['pixel_mb']:.3f}  (target <= 0.3)")
    print(
        f"peak RSS growth ratio uint8 / float32: "
        f"{(small['peak_mb'] - small['before_mb']) / (big['peak_mb'] - big['before_mb']):.3f}"
    )
    print(f"peak RSS ratio uint8 / float32: {small['peak_mb'] / big['peak_mb']:.3f}")


if __name__ == "__main__":
    main()

"""Peak memory of chunked tracking against the sequence length (issue 12: bounded by the chunk).

Tracks the procedural head over 8 and over 64 frames (the same cameras, the same chunk size, the default
96 px render terms), each in a fresh process so that its peak RSS is its own, and prints both peaks and the
ratio (target: 64 frames <= 1.3x 8 frames). For reference it also tracks two chunks' worth of frames as one
unchunked window (what every sequence was before) and reports its growth over one chunk's. The targets are exact renders of 8 poses that the longer
sequence cycles through; the optimisation and its renders are the real ones.

    python bench/bench_tracking_memory.py [--frames 8 64] [--chunk 8] [--cameras 2] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure(frames: int, chunk: int, cameras: int, steps: int) -> dict:
    """In this process: build the targets, then track; peak RSS and the RSS just before tracking (MB)."""
    import numpy as np
    import torch

    from geodiff4d.datasets.cameras import nersemble_rig
    from geodiff4d.datasets.flame import FlameParams
    from geodiff4d.datasets.procedural_head import procedural_head_model
    from geodiff4d.datasets.render import render_head
    from geodiff4d.recon.tracking import TrackingConfig, build_targets, project, track_sequence

    torch.set_num_threads(1)  # memory is the figure; one thread keeps a loaded machine from crawling
    model = procedural_head_model(0)
    config = TrackingConfig(
        rigid_steps=steps,
        landmark_steps=steps,
        steps=steps,
        chunk_frames=chunk,
        identity_frames=min(chunk, 8),
    )
    rig = nersemble_rig(width=config.render_size, height=config.render_size)
    serials = ["222200037", "220700191", "222200046", "222200039"][:cameras]
    poses = FlameParams.zeros(8, model.n_shape, model.n_expr)
    g = torch.Generator().manual_seed(0)
    poses.expression = torch.randn(8, model.n_expr, generator=g) * 0.8
    poses.rotation[:, 1] = torch.linspace(-0.3, 0.3, 8)
    poses.jaw[:, 0] = torch.linspace(0.0, 0.25, 8)
    renders = [[render_head(model, poses[t], rig[s]) for s in serials] for t in range(8)]
    masks = np.stack([[r.mask.numpy() for r in row] for row in renders])
    normals = np.stack([[r.normal.permute(1, 2, 0).numpy() for r in row] for row in renders])
    cams = [rig[s] for s in serials]
    base = build_targets(
        cams, np.zeros(masks.shape + (3,), np.uint8), masks, normals, None, config.render_size
    )
    w2c = torch.tensor(np.stack([c.world_to_cam for c in cams]), dtype=torch.float32)
    K = torch.tensor(np.stack([c.K for c in cams]), dtype=torch.float32)
    with torch.no_grad():
        base.landmarks = project(model(poses).landmarks, w2c, K)
    base.has_landmarks[:] = True
    before = _rss_mb()
    start = time.perf_counter()
    track_sequence(model, frames, lambda picked: base.select([f % 8 for f in picked]), config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "frames": frames,
        "chunk": chunk,
        "peak_mb": peak,
        "before_mb": before,
        "seconds": time.perf_counter() - start,
    }


def _in_subprocess(frames: int, chunk: int, cameras: int, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(frames), str(chunk), str(cameras), str(steps)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, nargs=2, default=[8, 64])
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps of each tracking phase")
    parser.add_argument("--measure", type=int, nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    print(
        f"# {' '.join(sys.argv)}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()}"
    )
    short, long = args.frames
    runs = []
    for frames, chunk in (
        (short, args.chunk),
        (long, args.chunk),
        (2 * args.chunk, 2 * args.chunk),
    ):  # last: unchunked
        runs.append(r := _in_subprocess(frames, chunk, args.cameras, args.steps))
        label = (
            "one window"
            if r["chunk"] >= r["frames"] and r["frames"] > args.chunk
            else f"chunks of {r['chunk']}"
        )
        print(
            f"{r['frames']:4d} frames, {label:>12}: peak RSS {r['peak_mb']:7.0f} MB "
            f"(RSS before tracking {r['before_mb']:6.0f} MB, growth {r['peak_mb'] - r['before_mb']:6.0f} MB), "
            f"{r['seconds']:.0f} s",
            flush=True,
        )
    a, b, ref = runs
    print(
        f"peak RSS ratio {long} / {short} frames (chunked): {b['peak_mb'] / a['peak_mb']:.3f}  (target <= 1.3)"
    )
    print(
        f"growth ratio {long} / {short} frames (chunked): "
        f"{(b['peak_mb'] - b['before_mb']) / (a['peak_mb'] - a['before_mb']):.3f}"
    )
    print(
        f"reference: {ref['frames']} frames in one window grow "
        f"{(ref['peak_mb'] - ref['before_mb']) / (a['peak_mb'] - a['before_mb']):.2f}x the growth of chunks of "
        f"{args.chunk}"
    )


if __name__ == "__main__":
    main()

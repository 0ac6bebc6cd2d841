"""Packing at real capture sizes: throughput against a decode + encode floor, where a sample's time goes, 1 vs
2 workers.

The captures are procedural heads (16 cameras per frame, tracking, alpha maps) rendered at 512 px and brought
to a real release's frame size (``--capture-size``: the NVS benchmark's 1100x1604 by default, the raw release's
2200x3208), videos re-encoded with a fixed GOP (``--keyframe-interval``: seeking costs up to one GOP of decoding
per shard and camera) and the calibration scaled to match; the procedural ground-truth normals are removed, as a
real release has none, so normals are the rendered tracking (``normal_source`` flame).

The floor is what packing cannot avoid, measured in the same run right after each pack, without Ray and with
one thread, with the same libraries: decoding the packed video frames (PyAV/FFmpeg, colour and alpha videos,
each once from frame 0 to its last packed frame, to the decoder's YUV frames: no colour conversion, which
packing does only inside the crop), reading the packed SynthHuman samples, and PNG-encoding the packed members
with the packer's encoders (``core.io.images.encode_png``, OpenCV). Throughput per worker is floor seconds /
(pack seconds x workers) (1.0 = packing costs nothing beyond decode + encode; each pack worker has one CPU), with
the mean of the floors measured right before and right after the pack (the first pack: after it), so a drift of
the machine's speed during a pack moves both sides of the ratio alike;
pack seconds run from the first unit's start to the last unit's end (from the shard stats), so Ray and actor
start are excluded. Per stage: decode (video frames), colour (YUV -> RGB of the crop window, colour
correction), crop, flame (posing), normal and posemap (rendering), encode (PNG + json), write (tar).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from run_info import print_run_header, uptime  # a sibling script

from geodiff4d.core.io.images import decode_image, encode_png
from geodiff4d.core.io.json_yaml import read_json
from geodiff4d.core.io.video import read_video, write_video
from geodiff4d.core.jobs import WorkUnit
from geodiff4d.core.runtime import connect, shutdown
from geodiff4d.datasets.manifest import STATS_SUFFIX, read_manifest
from geodiff4d.datasets.nersemble import NersembleDataset, write_camera_params
from geodiff4d.datasets.packing import (
    DEFAULT_MAX_SHARD_BYTES,
    PackJob,
    PackSettings,
    list_inputs,
    pack,
    plan_shards,
    sample_bytes_bound,
)
from geodiff4d.datasets.procedural import SynthSpec, synthesize
from geodiff4d.datasets.shards import iter_shard
from geodiff4d.datasets.synthhuman import MEMBERS, SynthHumanDataset, member_path

PNG_MEMBERS = ("rgb.png", "mask.png", "normal.png", "posemap.png")


def to_capture_size(nersemble: Path, width: int, height: int, keyframe_interval: int) -> None:
    """Every capture resized to ``width`` x ``height`` and re-encoded with a fixed GOP, cameras scaled to match,
    the procedural ground-truth normals removed (a real release has none)."""
    dataset = NersembleDataset(nersemble)
    for subject in dataset.subjects():
        cameras = {serial: cam.resized(width, height) for serial, cam in dataset.cameras(subject).items()}
        write_camera_params(dataset.camera_params_path(subject), cameras)
    for path in sorted(nersemble.glob("*/sequences/*/*/cam_*.mp4")):
        gray = path.parent.name == "alpha_maps"
        frames = [
            cv2.resize(f, (width, height), interpolation=cv2.INTER_LINEAR) for f in read_video(path, gray)
        ]
        write_video(path, np.stack(frames), keyframe_interval=keyframe_interval)
    for path in nersemble.glob("*/sequences/*/gt"):
        shutil.rmtree(path)


def _decode_yuv(path: Path, stop: int) -> None:
    """Decode frames 0 .. stop - 1 of a video to the decoder's frames (no conversion), one thread."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1
        for index, _ in enumerate(container.decode(stream)):
            if index + 1 == stop:
                return


def floor_seconds(shards: Path, sources: dict[str, Path]) -> tuple[float, float]:
    """(decode seconds, encode seconds) of the packed samples, single-threaded, no Ray (the module's floor)."""
    cv2.setNumThreads(1)
    rows = read_manifest(shards).to_pylist()
    last: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in rows:
        if r["source"] == "nersemble":
            video = (r["subject"], r["sequence"], r["camera"])
            last[video] = max(last[video], r["frame"])
    dataset = NersembleDataset(sources["nersemble"])
    start = time.perf_counter()
    for (subject, sequence, serial), frame in sorted(last.items()):
        for path in (
            dataset.video_path(subject, sequence, serial),
            dataset.alpha_path(subject, sequence, serial),
        ):
            _decode_yuv(path, frame + 1)
    synthhuman_rows = [r for r in rows if r["source"] == "synthhuman"]
    synthhuman = SynthHumanDataset(sources["synthhuman"]) if synthhuman_rows else None
    for r in synthhuman_rows:
        synthhuman[int(r["subject"])]
    decode = time.perf_counter() - start
    images = [
        decode_image(sample[member], member)
        for tar in sorted(shards.glob("*.tar"))
        for sample in iter_shard(tar)
        for member in PNG_MEMBERS
        if member in sample
    ]
    start = time.perf_counter()
    for image in images:
        encode_png(image)
    return decode, time.perf_counter() - start


def in_process(
    tmp: Path, sources: dict[str, Path], shards: Path, resolution: int, samples_per_shard: int, repeats: int
) -> None:
    """Every shard packed by one PackJob in this process (no Ray, one thread) and the floor, best of ``repeats``.

    On a shared machine other jobs' load inflates single timings; the best of a few is the least disturbed,
    and it is taken for both sides of the ratio.
    """
    torch.set_num_threads(1)
    job = PackJob(tmp / "inprocess", PackSettings(resolution=resolution))
    job.out.mkdir()
    job.setup()
    blocks = list_inputs(list(sources.items()), job.settings, (job.model.n_shape, job.model.n_expr))
    plans = plan_shards(blocks, samples_per_shard, DEFAULT_MAX_SHARD_BYTES, sample_bytes_bound(resolution))
    packs, floors = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for plan in plans:
            job.run(WorkUnit(plan.name, {"plan": plan}))
        packs.append(time.perf_counter() - start)
        floors.append(sum(floor_seconds(shards, sources)))
    print(
        f"in this process (no Ray, one thread), best of {repeats}: pack {min(packs):.2f} s "
        f"(all {', '.join(f'{t:.2f}' for t in packs)}), floor {min(floors):.2f} s "
        f"(all {', '.join(f'{t:.2f}' for t in floors)}): {min(floors) / min(packs):.3f}x the floor"
    )


def shard_stats(shards: Path) -> list[dict]:
    return [read_json(p) for p in sorted(shards.glob(f"*{STATS_SUFFIX}"))]


def print_stages(stats: list[dict], samples: int, wall: float, workers: int) -> None:
    """Per-stage milliseconds per sample, summed over shards; 'other' is worker time in units no stage saw."""
    seconds: dict[str, float] = defaultdict(float)
    for s in stats:
        for stage, value in s["stage_seconds"].items():
            seconds[stage] += value
    seconds["other (tar assembly, json, idle workers, scheduling)"] = wall * workers - sum(seconds.values())
    for stage, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(
            f"    {stage:<70s} {1000 * value / samples:7.1f} ms/sample  {100 * value / (wall * workers):5.1f} %"
        )


def synthhuman_scaling(tmp: Path, sizes: tuple[int, ...], resolution: int) -> None:
    """Pack SynthHuman folders of each size (hard links of a few rendered samples) with 2 workers."""
    synthesize(
        tmp / "few",
        SynthSpec(subjects=1, frames=1, cameras=1, resolution=resolution, synthetic=8),
        workers=2,
        progress=False,
    )
    seconds = {}
    for size in sizes:
        folder = tmp / f"synthhuman{size}"
        folder.mkdir()
        for index in range(size):
            for member in MEMBERS:
                os.link(
                    member_path(tmp / "few" / "synthhuman", index % 8, member),
                    member_path(folder, index, member),
                )
        start = time.perf_counter()
        report = pack(
            tmp / f"pack{size}",
            [("synthhuman", folder)],
            resolution=resolution,
            workers=2,
            samples_per_shard=512,
            progress=False,
        )
        seconds[size] = time.perf_counter() - start
        assert report.ok and report.samples == size, report.summary()
        print(
            f"  synthhuman {size:5d} samples at {resolution} px, 2 workers: {seconds[size]:6.2f} s = "
            f"{1000 * seconds[size] / size:5.2f} ms/sample"
        )
    small, large = min(sizes), max(sizes)
    print(
        f"  time ratio {large}/{small} = {seconds[large] / seconds[small]:.2f} for a size ratio of "
        f"{large / small:.2f}: per-sample cost ratio {seconds[large] / large / (seconds[small] / small):.2f} "
        f"(1.0 = linear)"
    )


def print_rounds(walls: dict[int, list[float]], ratios: dict[int, list[float]]) -> None:
    """Each figure's median over the rounds and every round's value: the machine's speed drifts between runs
    by more than a few per cent, and one round's pack and floor may fall on different sides of a drift."""

    def figure(values: list[float]) -> str:
        return f"median {np.median(values):.3f}x (rounds: {', '.join(f'{v:.3f}' for v in values)})"

    print(f"over {len(walls[1])} rounds:")
    for workers in (1, 2):
        print(f"  throughput per worker, workers={workers}: {figure(ratios[workers])} the floor")
    print(f"  2 workers vs 1: {figure([one / two for one, two in zip(walls[1], walls[2], strict=True)])}")


def capture_size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def parse_args() -> argparse.Namespace:
    """The command line: data size, packing settings and repeats."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--subjects", type=int, default=2, help="captures of --frames frames x --cameras each"
    )
    parser.add_argument(
        "--frames", type=int, default=32, help="per capture: 2 x 32 x 16 = 1024 samples, 4 shards"
    )
    parser.add_argument("--cameras", type=int, default=16)
    parser.add_argument(
        "--capture-size",
        type=capture_size,
        default=(1100, 1604),
        help="WIDTHxHEIGHT of the captures: 1100x1604 (the NVS benchmark's frames) or 2200x3208 (the raw release)",
    )
    parser.add_argument("--resolution", type=int, default=512, help="packed resolution")
    parser.add_argument("--synthetic", type=int, default=8)
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=256,
        help="16 frames of 16 cameras (the toolkit's default is 512): 2 shards per capture, 2 per worker, and "
        "each capture's second shard seeks to frame 16",
    )
    parser.add_argument(
        "--keyframe-interval",
        type=int,
        default=12,
        help="GOP of the re-encoded videos: 12 does not divide 16, so a seek to frame 16 decodes 4 frames more",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="Ray packs with 1 and 2 workers, each followed by its floor; the summary gives each figure's median",
    )
    parser.add_argument("--repeats", type=int, default=0, help="in-process pack and floor runs (0: none)")
    parser.add_argument("--synthhuman-sizes", type=int, nargs="*", default=[], help="SynthHuman scaling runs")
    parser.add_argument("--synthhuman-resolution", type=int, default=32)
    return parser.parse_args()


def pack_on_ray(
    out: Path, sources: dict[str, Path], workers: int, args: argparse.Namespace, floor_before: float | None
) -> tuple[float, float, float]:
    """Pack into ``out`` with `workers` Ray workers, print stages and the 1-thread floor measured next; returns
    the units' wall time, that floor, and the throughput per worker against the mean of ``floor_before`` (the
    floor measured right before this pack, None for the first) and that floor."""
    start = time.perf_counter()
    report = pack(
        out,
        list(sources.items()),
        resolution=args.resolution,
        workers=workers,
        samples_per_shard=args.samples_per_shard,
        progress=False,
    )
    assert report.ok, report.summary()
    stats = shard_stats(out)
    wall = max(s["unit_window"][1] for s in stats) - min(s["unit_window"][0] for s in stats)
    print(
        f"pack workers={workers}: {time.perf_counter() - start:.2f} s with actor start and manifest, "
        f"{wall:.2f} s from the first unit's start to the last unit's end:"
    )
    decoded = sum(s["decoded_video_frames"] for s in stats)
    packed = sum(s["packed_video_frames"] for s in stats)
    print(
        f"  {report.samples} samples in {report.shards} shards, {wall:.2f} s "
        f"= {report.samples / wall:.2f} samples/s; decoded {decoded} video frames for {packed} "
        f"packed ({decoded / packed:.3f}x)"
    )
    print_stages(stats, report.samples, wall, workers)
    decode, encode = floor_seconds(out, sources)
    floor = decode + encode
    print(
        f"  floor (no Ray, 1 thread, measured next; see the definition above): decode {decode:.2f} s + PNG encode "
        f"{encode:.2f} s = {floor:.2f} s = {report.samples / floor:.2f} samples/s"
    )
    bracket = floor if floor_before is None else (floor_before + floor) / 2
    which = (
        "the floor after it"
        if floor_before is None
        else f"the floors before and after it: {bracket:.2f} s; the floor after it alone: {floor / (wall * workers):.3f}x"
    )
    print(
        f"  throughput per worker, workers={workers}: {bracket / (wall * workers):.3f}x the floor ({which})"
    )
    return wall, floor, bracket / (wall * workers)


def main() -> None:
    args = parse_args()
    print_run_header()
    print("floor:", " ".join(__doc__.split("The floor is ")[1].split("\n\n")[0].split()))
    spec = SynthSpec(
        subjects=args.subjects,
        frames=args.frames,
        cameras=args.cameras,
        resolution=512,
        synthetic=args.synthetic,
    )
    width, height = args.capture_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        connect(num_cpus=2)
        started = time.perf_counter()
        synthesize(tmp / "data", spec, workers=2, progress=False)
        to_capture_size(tmp / "data" / "nersemble", width, height, args.keyframe_interval)
        sources = {"nersemble": tmp / "data" / "nersemble", "synthhuman": tmp / "data" / "synthhuman"}
        print(
            f"data: {spec} brought to {width}x{height} captures ({args.cameras} cameras per frame), videos "
            f"re-encoded with a {args.keyframe_interval}-frame GOP, in {time.perf_counter() - started:.0f} s; "
            f"{args.samples_per_shard} samples per shard, packed at {args.resolution} px"
        )
        walls, ratios = defaultdict(list), defaultdict(list)
        floor = None  # the last floor measured: the next pack's floor before it
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}:")
            for workers in (1, 2):
                out = tmp / f"pack{workers}"
                shutil.rmtree(out, ignore_errors=True)  # ~0.5 GB a pack at 1100x1604
                wall, floor, ratio = pack_on_ray(out, sources, workers, args, floor)
                walls[workers].append(wall)
                ratios[workers].append(ratio)
            print(f"2 workers vs 1: {walls[1][-1] / walls[2][-1]:.2f}x")
        print_rounds(walls, ratios)
        if args.repeats:
            in_process(tmp, sources, tmp / "pack1", args.resolution, args.samples_per_shard, args.repeats)
        if args.synthhuman_sizes:
            synthhuman_scaling(tmp, tuple(args.synthhuman_sizes), args.synthhuman_resolution)
        shutdown()
    print("load after:", uptime())


if __name__ == "__main__":
    main()

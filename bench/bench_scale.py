"""Driver-side bookkeeping at NeRSemble size, without pixels: the pack plan (listing -> shards), the manifest
build (shard stats markers -> manifest.parquet) and verify's bookkeeping (manifest keys -> duplicates, shard
list; one unit's shard rows by filter).

The full listing is 400 subjects x 20 sequences x 16 cameras x 300 frames = 38.4M samples; ``--subjects SMALL
LARGE`` measures two slices of it, and the full-size figures extrapolate from the larger one along the slope
between them (so fixed costs are not multiplied; ``--subjects 200 400`` measures the full size outright on a
machine with the memory for it). The listing is what list_nersemble returns: a block per sequence. Each stage
runs in its own process so that its peak memory is its own; each time is also a ratio to a reference measured
in the same run on the same number of samples (making the sample keys; parsing the stats markers with json;
reading the manifest's key column).

``--parts generate`` measures `geodiff4d generate`'s driver at NeRSemble scale instead (425 subjects x 16 cameras x
300 frames, one spec entry per subject as the benchmark writes them, with synthetic metadata: a cameras JSON per
subject and placeholder shards, tracking and weights files that the driver only stats): the time to validate the
spec, list every subject's cameras and plan the units (gen.generate.plan and plan_units), the resume check over
every unit's commit marker, and the driver's peak memory (Python allocations by tracemalloc, and peak RSS).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import queue
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from geodiff4d.core.jobs import CommitLog
from geodiff4d.datasets.manifest import build_manifest, read_manifest, stats_files
from geodiff4d.datasets.packing import SampleBlock, listing_digest, plan_shards, sample_bytes_bound
from geodiff4d.datasets.verify import ManifestIndex

FULL_SUBJECTS, SEQUENCES, CAMERAS, FRAMES = 400, 20, 16, 300
GENERATE_SUBJECTS = 425  # NeRSemble's subjects, each generated at CAMERAS x FRAMES
MEMBERS = ("json", "mask.png", "normal.png", "posemap.png", "rgb.png")


def _memory_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def listing(subjects: int) -> list[SampleBlock]:
    """What list_nersemble returns for a NeRSemble v2 download of this size: a block per sequence."""
    serials = tuple(f"{220700191 + i}" for i in range(CAMERAS))
    return [
        SampleBlock("nersemble", f"{s:03d}", f"EXP-{q}", tuple(range(FRAMES)), serials, "/data/nersemble")
        for s in range(subjects)
        for q in range(SEQUENCES)
    ]


def stage_plan(subjects: int, _: Path) -> dict[str, Any]:
    """Listing, plan and the listing digest (every key hashed once) against making every sample's key string."""
    start = time.perf_counter()
    blocks = listing(subjects)
    listed = time.perf_counter()
    plans = plan_shards(blocks, 512, 2 << 30, sample_bytes_bound(512))
    planned = time.perf_counter()
    listing_digest(blocks)
    digested = time.perf_counter()
    peak = _memory_mb("VmHWM")  # before the reference's key list
    assert sum(len(plan) for plan in plans) == subjects * SEQUENCES * CAMERAS * FRAMES
    del plans
    reference = time.perf_counter()
    keys = [key for block in blocks for key in block.keys()]
    made = time.perf_counter()
    del keys
    return {
        "list_s": listed - start,
        "plan_s": planned - listed,
        "digest_s": digested - planned,
        "reference_s": made - reference,
        "reference": "make the sample keys",
        "peak_at_mb": peak,
    }


def stage_write_stats(subjects: int, out: Path) -> dict[str, Any]:
    """The commit markers pack would leave (ids and member records of every sample; no tars)."""
    commits = CommitLog(out)
    plans = plan_shards(listing(subjects), 512, 2 << 30, sample_bytes_bound(512))
    for plan in plans:
        samples, offset = [], 0
        for ref in plan.samples:
            members = []
            for ext in MEMBERS:
                members.append(
                    {
                        "name": f"{ref.key}.{ext}",
                        "offset": offset,
                        "data_offset": offset + 512,
                        "size": 100_000,
                        "sha256": f"{hash((ref.key, ext)) & (2**256 - 1):064x}",
                    }
                )
                offset += 512 + 100_352
            samples.append({**ref.ids(), "key": ref.key, "normal_source": "estimated", "members": members})
        commits.commit(
            plan.name,
            {
                "tar": f"{plan.name}.tar",
                "samples": samples,
                "tar_bytes": offset + 1024,
                "member_bytes": 100_000 * len(members) * len(samples),
            },
        )
    return {"shards": len(plans)}


def stage_manifest(_: int, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    rows = build_manifest(out)
    built = time.perf_counter()
    parsed = sum(len(json.loads(p.read_text())["samples"]) for p in stats_files(out))
    reference = time.perf_counter() - built
    assert parsed == rows
    return {
        "rows": rows,
        "build_s": built - start,
        "reference_s": reference,
        "reference": "json.loads of the markers",
        "manifest_mb": (out / "manifest.parquet").stat().st_size / 2**20,
    }


def stage_verify(_: int, out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    index = ManifestIndex.read(out)
    indexed = time.perf_counter()
    one = read_manifest(out, filters=[("shard", "==", index.shards[len(index.shards) // 2])])
    unit_rows = time.perf_counter()
    pq.read_table(out / "manifest.parquet", columns=["key"])
    reference = time.perf_counter() - unit_rows
    assert (
        not index.duplicated
        and one.num_rows > 0
        and set(one["shard"].to_pylist()) == {index.shards[len(index.shards) // 2]}
    )
    return {
        "index_s": indexed - start,
        "unit_rows_s": unit_rows - indexed,
        "reference_s": reference,
        "reference": "read the key column",
        "shards": len(index.shards),
    }


def generate_listing(root: Path, subjects: int) -> Path:
    """A generate spec of ``subjects`` entries as the benchmark writes them, over synthetic metadata: per subject a
    cameras JSON of CAMERAS views; the shards, tracking files and weights are placeholders the driver only stats."""
    import yaml

    from geodiff4d.datasets.cameras import intrinsics, look_at_camera
    from geodiff4d.datasets.frame_folder import write_cameras
    from geodiff4d.gen.checkpoint import WEIGHTS
    from geodiff4d.gen.model_run import CONFIG_FILE

    (root / "run").mkdir(parents=True)
    (root / "run" / CONFIG_FILE).write_text(
        (Path(__file__).parents[1] / "configs" / "paper.yaml").read_text()
    )
    (root / "run" / WEIGHTS).write_bytes(b"placeholder")
    (root / "shards").mkdir()
    (root / "shards" / "manifest.parquet").write_bytes(b"placeholder")
    K = intrinsics(2000.0, 2200, 3208)
    rig = {
        f"{220700191 + i}": look_at_camera(
            np.array([np.sin(a), 0.0, np.cos(a)]), np.zeros(3), np.array([0.0, 1.0, 0.0]), K, 2200, 3208
        )
        for i, a in enumerate(np.linspace(-1.2, 1.2, CAMERAS))
    }
    entries = []
    for s in range(subjects):
        name = f"{s:03d}"
        write_cameras(root / "cameras" / f"{name}.json", rig)
        (root / "tracking" / f"{name}.npz").parent.mkdir(exist_ok=True)
        (root / "tracking" / f"{name}.npz").write_bytes(b"placeholder")
        packed = {"shards": str(root / "shards"), "subject": name, "sequence": "EXP-1", "camera": "220700191"}
        entries.append(
            {
                "name": name,
                "sequence": "EXP-1",
                "reference": {**packed, "frame": 0},
                "identity": {"tracking": str(root / "tracking" / f"{name}.npz")},
                "cameras": {"cameras_json": str(root / "cameras" / f"{name}.json")},
                "driving": packed,
                "frames": FRAMES,
            }
        )
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({"run": str(root / "run"), "frames_per_unit": 32, "subjects": entries}))
    return spec


def _plan_generate(root: Path) -> tuple[list, float, float]:
    """The generate driver's plan of the listing's spec, then its resume check: (units, plan s, resume s)."""
    from geodiff4d.gen.generate import STATE, plan, plan_units

    start = time.perf_counter()
    spec, planned = plan(root / "spec.yaml", root / "out")
    units = [u for s in planned for u in plan_units(s, spec.frames_per_unit, spec.cameras_per_unit)]
    planned_s = time.perf_counter() - start
    commits = CommitLog(root / "out" / STATE / "commits")
    pending = [u for u in units if not commits.is_committed(u.id)]
    assert len(pending) == len(units) == len({u.id for u in units})
    return units, planned_s, time.perf_counter() - start - planned_s


def stage_generate_plan(subjects: int, root: Path) -> dict[str, Any]:
    """Times and peak RSS of the plan (nothing is decoded); every frame is in exactly one unit."""
    units, plan_s, resume_s = _plan_generate(root)
    frames = sum((u.payload["stop"] - u.payload["start"]) * len(u.payload["cameras"]) for u in units)
    assert frames == subjects * CAMERAS * FRAMES
    return {"plan_s": plan_s, "resume_s": resume_s, "units": len(units)}


def stage_generate_plan_allocations(_: int, root: Path) -> dict[str, Any]:
    """The plan's peak Python allocations (tracemalloc, which slows it: timed in another process)."""
    import tracemalloc

    tracemalloc.start()
    _plan_generate(root)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"python_peak_mb": peak / 2**20}


def _child(stage: Callable, subjects: int, out: Path, results: multiprocessing.Queue) -> None:
    baseline = _memory_mb("VmRSS")
    figures = stage(subjects, out)
    results.put(figures | {"peak_mb": figures.pop("peak_at_mb", _memory_mb("VmHWM")) - baseline})


def run_stage(stage: Callable, subjects: int, out: Path) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_child, args=(stage, subjects, out, results))
    child.start()
    while True:
        try:
            figures = results.get(timeout=5)
            break
        except queue.Empty:
            if not child.is_alive():
                raise RuntimeError(f"{stage.__name__} died (exit code {child.exitcode})") from None
    child.join()
    return figures


def measure(subjects: int) -> dict[str, dict[str, Any]]:
    """Every stage at one size, each in its own process, on a fresh folder."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        out = Path(tmp)
        figures = {
            "plan": run_stage(stage_plan, subjects, out),
            "written": run_stage(stage_write_stats, subjects, out),
        }
        figures["manifest"] = run_stage(stage_manifest, subjects, out)
        figures["verify"] = run_stage(stage_verify, subjects, out)
    return figures


def at_full_size(small: float, large: float, sizes: tuple[int, int]) -> float:
    """A figure at 400 subjects from two sizes: the larger one plus the per-subject slope between them, so fixed
    overhead (imports, Arrow pools) is not multiplied."""
    slope = max(large - small, 0.0) / (sizes[1] - sizes[0])
    return large + slope * (FULL_SUBJECTS - sizes[1])


def generate_plan_figures(subjects: int) -> None:
    """`geodiff4d generate`'s driver over ``subjects`` subjects, in its own process (peak memory its own)."""
    import geodiff4d.gen.generate  # noqa: F401 - imported before the fork, so the child's RSS growth is the plan's

    with tempfile.TemporaryDirectory(prefix="bench-scale-generate-") as tmp:
        listed = time.perf_counter()
        generate_listing(Path(tmp), subjects)
        listed = time.perf_counter() - listed
        f = run_stage(stage_generate_plan, subjects, Path(tmp))
        f["python_peak_mb"] = run_stage(stage_generate_plan_allocations, subjects, Path(tmp))[
            "python_peak_mb"
        ]
    print(
        f"generate plan: {subjects} subjects x {CAMERAS} cameras x {FRAMES} frames = "
        f"{subjects * CAMERAS * FRAMES:,} frames in {f['units']:,} units (synthetic listing written in {listed:.1f} s)"
    )
    print(
        f"  spec validated, cameras listed, units planned in {f['plan_s']:.2f} s; resume check over every unit's "
        f"commit marker {f['resume_s']:.2f} s"
    )
    print(
        f"  driver peak: RSS +{f['peak_mb']:.0f} MB over the process's start (modules imported before); Python allocations "
        f"{f['python_peak_mb']:.1f} MB (tracemalloc, in a second run, which it slows)"
    )


def pack_figures(sizes: tuple[int, int]) -> None:
    runs = {}
    for subjects in sizes:
        samples = subjects * SEQUENCES * CAMERAS * FRAMES
        print(
            f"{subjects} subjects x {SEQUENCES} sequences x {CAMERAS} cameras x {FRAMES} frames = {samples:,} samples"
        )
        runs[subjects] = f = measure(subjects)
        plan, manifest, verify = f["plan"], f["manifest"], f["verify"]
        plan["total_s"] = plan["list_s"] + plan["plan_s"] + plan["digest_s"]
        print(
            f"  pack plan: listing {plan['list_s']:.2f} s + plan {plan['plan_s']:.2f} s + listing digest "
            f"{plan['digest_s']:.2f} s, peak {plan['peak_mb']:.0f} MB; ratio to '{plan['reference']}' "
            f"{plan['total_s'] / plan['reference_s']:.2f}x"
        )
        print(
            f"  manifest build: {manifest['rows']:,} rows from {f['written']['shards']} markers in "
            f"{manifest['build_s']:.1f} s, peak {manifest['peak_mb']:.0f} MB, {manifest['manifest_mb']:.0f} MB file; "
            f"ratio to '{manifest['reference']}' {manifest['build_s'] / manifest['reference_s']:.2f}x"
        )
        print(
            f"  verify bookkeeping: index of {verify['shards']} shards in {verify['index_s']:.2f} s, peak "
            f"{verify['peak_mb']:.0f} MB; one unit's rows by filter {verify['unit_rows_s'] * 1000:.0f} ms; ratio to "
            f"'{verify['reference']}' {verify['index_s'] / verify['reference_s']:.1f}x"
        )
    full = FULL_SUBJECTS * SEQUENCES * CAMERAS * FRAMES
    print(
        f"at full size ({full / 1e6:.1f}M samples; the larger run plus the per-subject slope between the two):"
    )
    for label, stage, seconds in (
        ("pack plan", "plan", "total_s"),
        ("manifest build", "manifest", "build_s"),
        ("verify bookkeeping", "verify", "index_s"),
    ):
        small, large = runs[sizes[0]][stage], runs[sizes[1]][stage]
        print(
            f"  {label}: ~{at_full_size(small[seconds], large[seconds], sizes) / 60:.1f} min, "
            f"peak ~{at_full_size(small['peak_mb'], large['peak_mb'], sizes) / 1024:.2f} GB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--subjects",
        type=int,
        nargs=2,
        default=(1, 4),
        metavar=("SMALL", "LARGE"),
        help=f"two slices of the {FULL_SUBJECTS} subjects (default 1 4)",
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=("pack", "generate"),
        default=("pack", "generate"),
        help="pack: the pack/manifest/verify figures; generate: generate's driver at NeRSemble scale",
    )
    parser.add_argument("--generate-subjects", type=int, default=GENERATE_SUBJECTS, help="subjects to plan")
    args = parser.parse_args()
    sizes = tuple(args.subjects)
    if not 0 < sizes[0] < sizes[1]:
        parser.error("--subjects SMALL LARGE needs 0 < SMALL < LARGE")
    if "pack" in args.parts:
        pack_figures(sizes)
    if "generate" in args.parts:
        generate_plan_figures(args.generate_subjects)


if __name__ == "__main__":
    main()

"""Packing throughput (samples/s, MB/s) for 1 and 2 Ray workers, each as a ratio to `tar -cf` of the same
encoded members written in the same run (the cost of decoding, cropping, rendering and encoding over I/O)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from geodiff4d.cluster.runtime import connect, shutdown
from geodiff4d.datasets.packing import pack
from geodiff4d.datasets.procedural import SynthSpec, synthesize
from geodiff4d.datasets.shards import iter_shard


def tar_reference(shards: Path, scratch: Path) -> float:
    """Seconds for `tar -cf` over the packed members laid out as plain files."""
    members = scratch / "members"
    for tar in sorted(shards.glob("*.tar")):
        for sample in iter_shard(tar):
            for ext, data in sample.items():
                if not ext.startswith("__"):
                    (members / f"{sample['__key__']}.{ext}").parent.mkdir(parents=True, exist_ok=True)
                    (members / f"{sample['__key__']}.{ext}").write_bytes(data)
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(scratch / "reference.tar"), "-C", str(members), "."], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--synthetic", type=int, default=8)
    args = parser.parse_args()
    spec = SynthSpec(subjects=args.subjects, frames=args.frames, cameras=args.cameras,
                     resolution=args.resolution, synthetic=args.synthetic)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        connect(num_cpus=2)
        synthesize(tmp / "data", spec, workers=2, progress=False)
        sources = [("nersemble", tmp / "data" / "nersemble"), ("synthhuman", tmp / "data" / "synthhuman")]
        for workers in (1, 2):
            out = tmp / f"pack{workers}"
            start = time.perf_counter()
            report = pack(out, sources, resolution=args.resolution, workers=workers, samples_per_shard=32,
                          progress=False)
            seconds = time.perf_counter() - start
            assert report.ok, report.summary()
            megabytes = sum(p.stat().st_size for p in out.glob("*.tar")) / 1e6
            reference = tar_reference(out, tmp / f"ref{workers}")
            print(f"pack workers={workers}: {report.samples} samples, {megabytes:.1f} MB in {seconds:.2f} s = "
                  f"{report.samples / seconds:.1f} samples/s, {megabytes / seconds:.2f} MB/s; "
                  f"tar -cf of the same members {reference:.3f} s ({megabytes / reference:.0f} MB/s); "
                  f"ratio pack/tar throughput = {reference / seconds:.4f}")
            shutil.rmtree(tmp / f"ref{workers}")
        shutdown()


if __name__ == "__main__":
    main()

"""Loader throughput (samples/s) as a ratio to reading and decoding the same PNGs from a plain folder.

The reference reads, from plain files, every PNG a batch uses where it is used (a target's four members,
its driving frame's rgb and mask, its reference's rgb and posemap) into float tensors, in one process. The
loader streams the same batches from the shards (decoding each member once per batch, augmenting the driving
crops per batch), in the main process (``num_workers=0``) and with DataLoader workers.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from geodiff4d.cluster.runtime import connect, shutdown
from geodiff4d.datasets.loader import LoaderConfig, make_loader
from geodiff4d.datasets.packing import pack
from geodiff4d.datasets.procedural import SynthSpec, synthesize
from geodiff4d.datasets.shards import iter_shard

MEMBERS = ("rgb.png", "normal.png", "mask.png", "posemap.png")


def read_folder(folder: Path, files: list[tuple[str, tuple[str, ...]]]) -> None:
    """The reference: the same member PNGs the loader decoded, read from plain files into float tensors."""
    for key, members in files:
        for member in members:
            image = cv2.imread(str(folder / f"{key}.{member}"), cv2.IMREAD_UNCHANGED)
            scale = 65535.0 if image.dtype == np.uint16 else 255.0
            torch.from_numpy(image.astype(np.float32) / scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    print("load average before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    spec = SynthSpec(subjects=2, frames=8, cameras=4, resolution=args.resolution, synthetic=8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        connect(num_cpus=2)
        synthesize(tmp / "data", spec, workers=2, progress=False)
        sources = [("nersemble", tmp / "data" / "nersemble"), ("synthhuman", tmp / "data" / "synthhuman")]
        assert pack(tmp / "shards", sources, resolution=args.resolution, samples_per_shard=32, progress=False).ok
        shutdown()
        folder = tmp / "plain"
        folder.mkdir()
        for tar in (tmp / "shards").glob("*.tar"):
            for sample in iter_shard(tar):
                for member in MEMBERS:
                    (folder / f"{sample['__key__']}.{member}").write_bytes(sample[member])
        for kind, workers in itertools.product(("frame", "pair"), (0, 2)):
            config = LoaderConfig(kind=kind, batch_size=args.batch_size, driving_size=args.resolution // 2)
            stream = iter(make_loader(tmp / "shards", config, num_workers=workers))
            next(stream)  # warm up (starts the workers)
            files: list[tuple[str, tuple[str, ...]]] = []
            start = time.perf_counter()
            for _ in range(args.batches):
                batch = next(stream)
                files += [(key, MEMBERS) for key in batch["key"]]
                files += [(key, ("rgb.png", "posemap.png")) for key in batch["ref_key"]]
                files += [(key, ("rgb.png", "mask.png")) for key in batch["driving_key"]]
            seconds = time.perf_counter() - start
            del stream
            start = time.perf_counter()
            read_folder(folder, files)
            reference = time.perf_counter() - start
            samples = args.batches * args.batch_size
            print(f"loader kind={kind} num_workers={workers}: {samples / seconds:.1f} samples/s ({seconds:.2f} s for "
                  f"{samples}); plain-folder reads of the same {sum(len(m) for _, m in files)} PNGs {reference:.2f} s "
                  f"in one process; ratio loader/plain throughput = {reference / seconds:.3f}")
    print("load average after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

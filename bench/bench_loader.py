"""Loader throughput (samples/s) against the same batches built from a plain folder of PNG files.

The reference does the loader's work except reading: it replays the batches the loader produced (same targets,
driving frames and references), reads each member a batch uses from its own file (``{key}.{member}``, the json
beside it), and builds the batch with the loader's ``collate`` (each PNG decoded once, the same augmentation),
through a ``DataLoader`` with the same number of workers. So the ratio isolates what the shard format changes:
streaming tars (and indexing and drawing from them) instead of opening one file per member.

It also prints a bound: the share of the reference's single-process time spent opening and reading files. A
loader that read for free could be at most 1 / (1 - share) times faster than the reference.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from geodiff4d.core.io.json_yaml import read_json
from geodiff4d.core.runtime import connect, shutdown
from geodiff4d.datasets.loader import LoaderConfig, Unit, collate, make_loader, worker_rng
from geodiff4d.datasets.packing import pack
from geodiff4d.datasets.procedural import SynthSpec, synthesize
from geodiff4d.datasets.shards import iter_shard

MEMBERS = ("rgb.png", "normal.png", "mask.png", "posemap.png")
ROLE_MEMBERS = {"target": MEMBERS, "driving": ("rgb.png", "mask.png"), "ref": ("rgb.png", "posemap.png")}

Recorded = list[dict[str, list[str]]]  # per batch: key, driving_key, ref_key, source


def record(batch: dict[str, Any]) -> dict[str, list[str]]:
    return {name: list(batch[name]) for name in ("key", "driving_key", "ref_key", "source")}


def batch_files(recorded: dict[str, list[str]]) -> dict[str, set[str]]:
    """key -> the members the batch decodes for it."""
    files: dict[str, set[str]] = {}
    for role, name in (("target", "key"), ("driving", "driving_key"), ("ref", "ref_key")):
        for key in recorded[name]:
            files.setdefault(key, set()).update(ROLE_MEMBERS[role])
    return files


def read_units(folder: Path, recorded: dict[str, list[str]]) -> list[Unit]:
    """The batch's units with every member it uses read from its own file."""
    samples = {
        key: {
            "__key__": key,
            "meta": read_json(folder / f"{key}.json"),
            **{member: (folder / f"{key}.{member}").read_bytes() for member in members},
        }
        for key, members in batch_files(recorded).items()
    }
    return [
        Unit(source, [samples[key]], [samples[driving]], samples[ref])
        for key, driving, ref, source in zip(
            recorded["key"], recorded["driving_key"], recorded["ref_key"], recorded["source"], strict=True
        )
    ]


class PlainFolderBatches(torch.utils.data.IterableDataset):
    """The recorded batches rebuilt from plain files; worker w of n replays batches w, w + n, ..."""

    def __init__(self, folder: Path, batches: Recorded, config: LoaderConfig):
        super().__init__()
        self.folder, self.batches, self.config = folder, batches, config

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = worker_rng(self.config.seed, 1_000_003)
        for recorded in self.batches[worker::workers]:
            yield collate(read_units(self.folder, recorded), self.config, rng)


def timed_batches(stream: Iterator[dict[str, Any]], batches: int) -> tuple[float, Recorded]:
    """Seconds for ``batches`` batches after a first one that starts the workers, and what they held."""
    next(stream)
    recorded: Recorded = []
    start = time.perf_counter()
    for _ in range(batches):
        recorded.append(record(next(stream)))
    return time.perf_counter() - start, recorded


def reading_share(folder: Path, batches: Recorded, config: LoaderConfig) -> float:
    """Share of the reference's single-process time spent opening and reading its files."""
    start = time.perf_counter()
    for recorded in batches:
        read_units(folder, recorded)
    reading = time.perf_counter() - start
    rng = worker_rng(config.seed, 1_000_003)
    start = time.perf_counter()
    for recorded in batches:
        collate(read_units(folder, recorded), config, rng)
    return reading / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        assert pack(
            tmp / "shards", sources, resolution=args.resolution, samples_per_shard=32, progress=False
        ).ok
        shutdown()
        folder = tmp / "plain"
        folder.mkdir()
        for tar in (tmp / "shards").glob("*.tar"):
            for sample in iter_shard(tar):
                for member in (*MEMBERS, "json"):
                    (folder / f"{sample['__key__']}.{member}").write_bytes(sample[member])
        print(
            f"data: {spec}, packed at {args.resolution} px; {args.batches} batches of {args.batch_size} per run "
            f"after one warm-up batch; torch threads in this process: {torch.get_num_threads()}"
        )
        for kind, workers in itertools.product(("frame", "pair"), (0, 2)):
            config = LoaderConfig(kind=kind, batch_size=args.batch_size, driving_size=args.resolution // 2)
            ours, batches = timed_batches(
                iter(make_loader(tmp / "shards", config, num_workers=workers)), args.batches
            )
            plain = PlainFolderBatches(folder, batches, config)
            loader = torch.utils.data.DataLoader(plain, batch_size=None, num_workers=workers)
            replayed = args.batches - 1  # the reference's warm-up batch is one of the recorded ones
            reference, _ = timed_batches(iter(loader), replayed)
            samples = args.batch_size
            print(
                f"kind={kind} num_workers={workers}: loader {args.batches * samples / ours:6.1f} samples/s, "
                f"plain folder {replayed * samples / reference:6.1f} samples/s; ratio loader/plain = "
                f"{(args.batches / ours) / (replayed / reference):.3f}"
            )
            if workers == 0:
                share = reading_share(folder, batches, config)
                print(
                    f"  reference single-process time reading files: {100 * share:.1f} %: a loader that read for "
                    f"free would be at most {1 / (1 - share):.2f}x the reference"
                )
    print("load average after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

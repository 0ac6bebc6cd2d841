"""Loader throughput where the shard format matters: the same samples as WebDataset tars and as one file per
member, served over HTTP from 127.0.0.1 with an injected per-request latency (and an optional bandwidth cap), and
read cold from a local disk.

On a local, page-cached disk opening a file costs almost nothing, so tars cannot win there (reading was 7.5-9 %
of a sample's time: bench/results/loader-cpu-2026-11-27.txt). Clusters read data from object storage, where
every file is a request with a round trip: that is what the tar layout is for, and what this bench measures.

Both layouts hold the same samples (a small procedural pack replicated under new subject ids to thousands of
samples). The tar side is the training loader (``make_loader``'s ``TrainingStream``) on the shard folder's URL; the per-file side
replays exactly the batches the loader produced (same targets, driving frames and references), fetching every
member a batch uses from its own file (``{key}.{member}``, its json beside it) over a kept-alive HTTP connection
per worker, and builds them with the loader's ``collate`` through a ``DataLoader`` with the same worker count.
The server (another process) sleeps ``latency`` before answering each request and counts requests and bytes.

Per case and layout: samples/s from the first batch to the last (the steady state; each DataLoader worker
prefetches 2 batches, so a run of few batches overstates it), time to the first batch from a fresh loader
(workers starting, manifest, first shard), requests and bytes served; median and [min, max] over the repeats; and the tar / per-file ratio.
The cold local case reads the local folders after ``os.posix_fadvise(POSIX_FADV_DONTNEED)`` on every file.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import itertools
import json
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from run_info import print_run_header, uptime  # a sibling script

from geodiff4d.core.io.json_yaml import json_bytes, parse_json
from geodiff4d.core.jobs import CommitLog
from geodiff4d.core.runtime import connect, shutdown
from geodiff4d.datasets.loader import LoaderConfig, TrainingStream, Unit, collate, worker_rng
from geodiff4d.datasets.manifest import build_manifest, read_manifest, shard_stats
from geodiff4d.datasets.packing import pack
from geodiff4d.datasets.procedural import SynthSpec, synthesize
from geodiff4d.datasets.shards import iter_shard, shard_name, write_shard

MEMBERS = ("rgb.png", "normal.png", "mask.png", "posemap.png")
ROLE_MEMBERS = {"target": MEMBERS, "driving": ("rgb.png", "mask.png"), "ref": ("rgb.png", "posemap.png")}
Recorded = list[dict[str, list[str]]]  # per batch: key, driving_key, ref_key, source


# ------------------------------------------------------------------------------------------- the server


class _Counters:
    """Requests and bytes served, shared with the server process."""

    def __init__(self) -> None:
        self.requests = multiprocessing.Value("q", 0)
        self.bytes = multiprocessing.Value("q", 0)

    def read(self) -> tuple[int, int]:
        return self.requests.value, self.bytes.value


class _SlowHandler(SimpleHTTPRequestHandler):
    """Files of ``directory``, each answer after ``latency`` s, at most ``bandwidth`` bytes/s per connection."""

    protocol_version = "HTTP/1.1"  # keep-alive: a latency per request, not per connection
    disable_nagle_algorithm = True  # else headers and body in two writes wait for a delayed ACK (~40 ms)

    def __init__(self, *args: Any, latency: float, bandwidth: float, counters: _Counters, **kw: Any):
        self.latency, self.bandwidth, self.counters = latency, bandwidth, counters
        super().__init__(*args, **kw)

    def send_head(self):  # noqa: ANN201 (the base class's signature)
        with self.counters.requests.get_lock():
            self.counters.requests.value += 1
        time.sleep(self.latency)
        return super().send_head()

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001
        chunk = 64 << 10
        while data := source.read(chunk):
            start = time.perf_counter()
            outputfile.write(data)
            with self.counters.bytes.get_lock():
                self.counters.bytes.value += len(data)
            if self.bandwidth:
                time.sleep(max(0.0, len(data) / self.bandwidth - (time.perf_counter() - start)))

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(root: str, port: Any, latency: float, bandwidth: float, counters: _Counters, ready: Any) -> None:
    handler = functools.partial(
        _SlowHandler, directory=root, latency=latency, bandwidth=bandwidth, counters=counters
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    port.value = server.server_address[1]
    ready.set()
    server.serve_forever()


@dataclass
class Server:
    """A server process for one latency; ``url`` serves ``root``."""

    root: Path
    latency: float
    bandwidth: float

    def __enter__(self) -> Server:
        self.counters, port, ready = _Counters(), multiprocessing.Value("i", 0), multiprocessing.Event()
        args = (str(self.root), port, self.latency, self.bandwidth, self.counters, ready)
        self.process = multiprocessing.get_context("fork").Process(target=_serve, args=args, daemon=True)
        self.process.start()
        ready.wait(30)
        self.url = f"http://127.0.0.1:{port.value}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join(10)


# ----------------------------------------------------------------------------------- the per-file loader


class LocalFiles:
    def __init__(self, folder: Path):
        self.folder = folder

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()


class HttpFiles:
    """One GET per file over a kept-alive connection per process (made after a DataLoader worker forks)."""

    def __init__(self, url: str):
        self.url, self._connection, self._pid = url, None, -1

    def read(self, name: str) -> bytes:
        if self._pid != os.getpid():
            host, port = self.url.removeprefix("http://").split("/", 1)[0].split(":")
            self._connection, self._pid = http.client.HTTPConnection(host, int(port), timeout=60), os.getpid()
            self._connection.connect()
            self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        path = "/" + self.url.removeprefix("http://").split("/", 1)[1] + "/" + name
        self._connection.request("GET", path)
        response = self._connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise OSError(f"{self.url}/{name}: HTTP {response.status}")
        return data


Index = dict[str, set[str]]  # key -> its members (the manifest's; SynthHuman samples have no pose map)


def batch_files(recorded: dict[str, list[str]], index: Index) -> dict[str, set[str]]:
    """key -> the members the batch decodes for it (those it has)."""
    files: dict[str, set[str]] = {}
    for role, name in (("target", "key"), ("driving", "driving_key"), ("ref", "ref_key")):
        for key in recorded[name]:
            files.setdefault(key, set()).update(set(ROLE_MEMBERS[role]) & index[key])
    return files


def read_units(files: LocalFiles | HttpFiles, recorded: dict[str, list[str]], index: Index) -> list[Unit]:
    """The batch's units with every member it uses read from its own file."""
    samples = {
        key: {
            "__key__": key,
            "meta": parse_json(files.read(f"{key}.json"), key),
            **{member: files.read(f"{key}.{member}") for member in members},
        }
        for key, members in batch_files(recorded, index).items()
    }
    return [
        Unit(source, [samples[key]], [samples[driving]], samples[ref])
        for key, driving, ref, source in zip(
            recorded["key"], recorded["driving_key"], recorded["ref_key"], recorded["source"], strict=True
        )
    ]


class PerFileBatches(torch.utils.data.IterableDataset):
    """The recorded batches rebuilt from one file per member; worker w of n replays batches w, w + n, ..."""

    def __init__(self, files: LocalFiles | HttpFiles, batches: Recorded, config: LoaderConfig, index: Index):
        super().__init__()
        self.files, self.batches, self.config, self.index = files, batches, config, index

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = worker_rng(self.config.seed, 1_000_003)
        for recorded in self.batches[worker::workers]:
            yield collate(read_units(self.files, recorded, self.index), self.config, rng)


# -------------------------------------------------------------------------------------------- the data


def replicate(pack_dir: Path, out: Path, copies: int, per_shard: int) -> int:
    """The packed samples ``copies`` times under new subject ids, as tars + manifest in ``out/tars`` and one
    file per member in ``out/files``; returns the sample count."""
    originals = [s for tar in sorted(pack_dir.glob("*.tar")) for s in iter_shard(tar)]
    samples = []
    for copy, sample in itertools.product(range(copies), originals):
        meta = json.loads(sample["json"])
        meta["subject"] = f"{meta['subject']}c{copy:03d}"
        meta["key"] = "_".join(
            [meta["source"], meta["subject"], meta["sequence"], f"{meta['frame']:05d}", meta["camera"]]
        )
        samples.append({**sample, "__key__": meta["key"], "json": json_bytes(meta, indent=None)})
    (out / "files").mkdir(parents=True)
    for sample in samples:
        for member in (*MEMBERS, "json"):
            if member in sample:
                (out / "files" / f"{sample['__key__']}.{member}").write_bytes(sample[member])
    commits = CommitLog(out / "tars")
    for source in sorted({json.loads(s["json"])["source"] for s in samples}):
        mine = sorted(
            (s for s in samples if json.loads(s["json"])["source"] == source), key=lambda s: s["__key__"]
        )
        for index, start in enumerate(range(0, len(mine), per_shard)):
            chunk, name = mine[start : start + per_shard], shard_name(source, index)
            ids = {s["__key__"]: json.loads(s["json"]) for s in chunk}
            commits.commit(
                name, shard_stats(f"{name}.tar", ids, write_shard(out / "tars" / f"{name}.tar", chunk))
            )
    build_manifest(out / "tars")
    return len(samples)


def packed_samples(tmp: Path, resolution: int) -> Path:
    """A small procedural pack (1 subject x 8 frames x 16 cameras + 16 SynthHuman) at ``resolution``."""
    spec = SynthSpec(subjects=1, frames=8, cameras=16, resolution=max(64, resolution), synthetic=16)
    connect(num_cpus=2)
    try:
        synthesize(tmp / "data", spec, workers=2, progress=False)
        sources = [("nersemble", tmp / "data" / "nersemble"), ("synthhuman", tmp / "data" / "synthhuman")]
        assert pack(tmp / "pack", sources, resolution=resolution, samples_per_shard=64, progress=False).ok
    finally:
        shutdown()
    return tmp / "pack"


# ----------------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    samples_per_s: float
    first_batch_s: float
    requests: int = 0
    bytes: int = 0


def timed(
    make: Callable[[], Iterator[dict[str, Any]]], batches: int, batch_size: int
) -> tuple[Run, Recorded]:
    """Time to the first batch from a fresh loader, then samples/s over ``batches`` more, and what they held."""
    start = time.perf_counter()
    stream = make()
    recorded = [record(next(stream))]
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        recorded.append(record(next(stream)))
    return Run(batches * batch_size / (time.perf_counter() - start), first), recorded


def record(batch: dict[str, Any]) -> dict[str, list[str]]:
    return {name: list(batch[name]) for name in ("key", "driving_key", "ref_key", "source")}


def drop_cache(folder: Path) -> None:
    """Evict every file of ``folder`` from the page cache (clean pages only, so sync first)."""
    os.sync()
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def summary(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


@dataclass
class Case:
    name: str
    tar_location: str
    files: LocalFiles | HttpFiles
    index: Index
    server: Server | None = None
    cold: Path | None = None  # the data folder whose files are evicted before each run


def measure(
    case: Case, layout: str, loader: Callable[[], Iterator], args: argparse.Namespace
) -> tuple[Run, Recorded]:
    if case.cold is not None:
        drop_cache(case.cold / layout)
    before = case.server.counters.read() if case.server else (0, 0)
    run, recorded = timed(loader, args.batches, args.batch_size)
    if case.server:
        after = case.server.counters.read()
        run.requests, run.bytes = after[0] - before[0], after[1] - before[1]
    return run, recorded


def _iterate(dataset: torch.utils.data.IterableDataset, workers: int) -> Iterator[dict[str, Any]]:
    """A fresh DataLoader over ``dataset`` (as ``make_loader`` builds the training one)."""
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))


def run_case(
    case: Case, workers: int, args: argparse.Namespace, config: LoaderConfig
) -> dict[str, list[Run]]:
    """``args.repeats`` runs of each layout, alternating; the per-file side replays the tar side's batches."""
    runs: dict[str, list[Run]] = {"tar": [], "per-file": []}
    for _ in range(args.repeats):
        tars = functools.partial(_iterate, TrainingStream(case.tar_location, config), workers)
        tar_run, recorded = measure(case, "tars", tars, args)
        per_file = PerFileBatches(case.files, recorded, config, case.index)
        replay = functools.partial(_iterate, per_file, workers)
        file_run, replayed = measure(case, "files", replay, args)
        assert replayed == recorded, "the per-file side must rebuild exactly the tar side's batches"
        runs["tar"].append(tar_run)
        runs["per-file"].append(file_run)
    return runs


def report(case: str, workers: int, runs: dict[str, list[Run]]) -> None:
    for layout, measured in runs.items():
        print(
            f"{case:>12} {layout:>8} workers={workers}: {summary([r.samples_per_s for r in measured])} samples/s, "
            f"first batch {summary([r.first_batch_s for r in measured], 2)} s, "
            f"{statistics.median(r.requests for r in measured):.0f} requests, "
            f"{statistics.median(r.bytes for r in measured) / 2**20:.1f} MiB"
        )
    ratios = [t.samples_per_s / f.samples_per_s for t, f in zip(runs["tar"], runs["per-file"], strict=True)]
    print(f"{case:>12} tar / per-file workers={workers}: {summary(ratios, 2)}")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", type=int, default=64, help="packed sample side, px")
    parser.add_argument("--copies", type=int, default=16, help="copies of the 144 packed samples")
    parser.add_argument("--batches", type=int, default=20, help="measured batches per run, after the first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--latencies-ms", type=float, nargs="+", default=[0, 2, 10, 30])
    parser.add_argument("--bandwidth-mbps", type=float, default=0, help="cap per connection, MB/s (0: none)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold local case")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    print_run_header()
    config = LoaderConfig(kind="pair", batch_size=args.batch_size, driving_size=args.resolution // 2)
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        count = replicate(packed_samples(tmp, args.resolution), tmp / "served", args.copies, per_shard=256)
        print(
            f"data: {count} samples at {args.resolution} px ({args.copies} copies of a procedural pack), tars of "
            f"256 samples; prepared in {time.perf_counter() - started:.0f} s; kind=pair, {args.batches} batches of "
            f"{args.batch_size} measured after the first; {args.repeats} repeats: median [min, max]; bandwidth cap "
            f"{args.bandwidth_mbps or 'none'} MB/s; torch threads in this process: {torch.get_num_threads()}"
        )
        served = tmp / "served"
        index = {
            row["key"]: {m["name"].split(".", 1)[1] for m in row["members"]}
            for row in read_manifest(served / "tars", columns=["key", "members"]).to_pylist()
        }
        for latency, workers in itertools.product(args.latencies_ms, args.workers):
            with Server(served, latency / 1000, args.bandwidth_mbps * 1e6) as server:
                files = HttpFiles(f"{server.url}/files")
                case = Case(f"http {latency:g} ms", f"{server.url}/tars", files, index, server)
                report(case.name, workers, run_case(case, workers, args, config))
        if not args.no_cold:
            for workers in args.workers:
                case = Case(
                    "cold local", str(served / "tars"), LocalFiles(served / "files"), index, cold=served
                )
                report(case.name, workers, run_case(case, workers, args, config))
    print("load after:", uptime())


if __name__ == "__main__":
    main()

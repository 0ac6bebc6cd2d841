"""Re-read every shard and compare it with the manifest, so silent damage is found before training.

Reports by sample key: missing (in the manifest, absent from an intact tar), extra (in a tar, not in the
manifest), duplicated (a key more than once) and corrupt (checksum or offset mismatch, truncation, a broken
header). A tar that stops without its end-of-archive marker makes every sample it did not deliver corrupt.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from geodiff4d.core.jobs import CommitLog, WorkUnit, run_units
from geodiff4d.core.runtime import connect
from geodiff4d.datasets.locations import Location, is_remote, join, local_copy
from geodiff4d.datasets.manifest import read_manifest

_END_MARKER = 2 * tarfile.BLOCKSIZE


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    verified: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.duplicated or self.corrupt)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def summary(self) -> str:
        status = "OK" if self.ok else "FAILED"
        lines = [
            f"verify {status}: {self.shards} shards, {self.verified}/{self.samples} samples intact, "
            f"{len(self.missing)} missing, {len(self.extra)} extra, {len(self.duplicated)} duplicated, "
            f"{len(self.corrupt)} corrupt"
        ]
        lines += [f"  missing {key}" for key in self.missing]
        lines += [f"  extra {key}" for key in self.extra]
        lines += [f"  duplicated {key}" for key in self.duplicated]
        lines += [f"  corrupt {key}: {why}" for key, why in sorted(self.corrupt.items())]
        return "\n".join(lines)


@dataclass
class _ShardScan:
    members: dict[str, list[tarfile.TarInfo]] = field(default_factory=dict)  # key -> members seen
    digests: dict[str, str] = field(default_factory=dict)  # member name -> sha256
    failed: dict[str, str] = field(default_factory=dict)  # key -> read error
    broken: str | None = None  # why the tar stopped early, if it did


def _ended_cleanly(path: Path, offset: int) -> bool:
    with path.open("rb") as f:
        f.seek(offset)
        tail = f.read(_END_MARKER)
    return len(tail) == _END_MARKER and not any(tail)


def _scan(path: Path) -> _ShardScan:
    scan = _ShardScan()
    key = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                key = info.name.split(".", 1)[0]
                scan.members.setdefault(key, []).append(info)
                data = tar.extractfile(info).read() if info.isfile() else b""
                scan.digests[info.name] = hashlib.sha256(data).hexdigest()
            stop = tar.offset
        if not _ended_cleanly(path, stop):
            scan.broken = (
                f"tar stops at byte {stop} without an end-of-archive marker (truncated or bad header)"
            )
    except (tarfile.TarError, OSError) as exc:
        scan.broken = f"unreadable tar: {exc}"
        if key is not None:
            scan.failed[key] = scan.broken
    return scan


def _check_sample(row: dict[str, Any], seen: list[tarfile.TarInfo], scan: _ShardScan) -> str | None:
    """Why one manifest row does not match the tar, or None when it does."""
    by_name = {info.name: info for info in seen}
    for member in row["members"]:
        info = by_name.get(member["name"])
        if info is None:
            return f"member {member['name']} absent from {row['shard']}"
        if scan.digests.get(member["name"]) != member["sha256"]:
            return f"member {member['name']} sha256 differs from the manifest"
        if (info.offset, info.offset_data, info.size) != (
            member["offset"],
            member["data_offset"],
            member["size"],
        ):
            return f"member {member['name']} offset/size differ from the manifest"
    expected = {m["name"] for m in row["members"]}
    surplus = sorted(set(by_name) - expected)
    return f"unexpected members {surplus}" if surplus else None


@dataclass
class ManifestIndex:
    """The driver's bookkeeping, kept in Arrow (~38M keys at NeRSemble size: bench/bench_scale.py)."""

    keys: pa.Table  # key, shard: one row per manifest row
    duplicated: set[str]  # keys listed more than once
    shards: list[str]  # tar names in the manifest or in the folder

    @classmethod
    def read(cls, out: Location) -> ManifestIndex:
        """A remote location cannot be listed: there only the manifest's shards are checked."""
        keys = read_manifest(out, columns=["key", "shard"])
        counts = keys.group_by("key").aggregate([("key", "count")])
        duplicated = set(counts.filter(pc.greater(counts["key_count"], 1))["key"].to_pylist())
        tar_names = set() if is_remote(out) else {p.name for p in Path(out).glob("*.tar")}
        return cls(keys, duplicated, sorted(tar_names | set(pc.unique(keys["shard"]).to_pylist())))


class VerifyJob:
    """Ray job: one unit = one shard, checked against its own manifest rows (read with a shard filter)."""

    def __init__(self, out: Location):
        self.out = out

    def setup(self) -> None:
        pass

    def run(self, unit: WorkUnit) -> dict[str, Any]:
        shard = unit.id
        rows = read_manifest(self.out, filters=[("shard", "==", shard)]).to_pylist()
        return check_shard(join(self.out, shard), {row["key"]: row for row in rows})


def _scan_location(location: Location) -> _ShardScan | None:
    """The scan of a local tar, or of a remote one streamed to a temporary copy; None when it does not exist."""
    try:
        with local_copy(location) as path:
            return _scan(path) if path.is_file() else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # a pipe: command that failed, a server error
        return _ShardScan(broken=f"cannot fetch {location}: {exc}")


def check_shard(location: Location, expected: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One shard's findings: ``expected`` maps key -> manifest row; keys found in the tar but not expected are
    returned as ``extra`` (the driver also counts them against the other shards' keys)."""
    found: dict[str, Any] = {"verified": 0, "missing": [], "extra": [], "duplicated": [], "corrupt": {}}
    scan = _scan_location(location)
    if scan is None:
        found["missing"] = sorted(expected)
        return found
    for key, seen in scan.members.items():
        if len({info.name for info in seen}) != len(seen):
            found["duplicated"].append(key)
        if key not in expected:
            found["extra"].append(key)
    for key, row in expected.items():
        seen = scan.members.get(key)
        if key in scan.failed:
            found["corrupt"][key] = scan.failed[key]
        elif seen is None:
            if scan.broken:
                found["corrupt"][key] = scan.broken
            else:
                found["missing"].append(key)
        elif (problem := _check_sample(row, seen, scan)) is not None:
            found["corrupt"][key] = problem
        else:
            found["verified"] += 1
    return found


def verify(
    out: Location, workers: int = 2, address: str | None = None, progress: bool = True
) -> VerifyReport:
    """Check every tar in ``out`` against ``out/manifest.parquet``, one Ray unit per shard; ``out`` may be a URL
    or ``pipe:`` location (``datasets.locations``), whose tars are streamed to a temporary copy each.

    Findings are kept in a fresh commit folder per run: a verification describes the files as they are now,
    so it never reuses an earlier run's results.
    """
    index = ManifestIndex.read(out)
    keys, duplicated, shard_names = index.keys, index.duplicated, index.shards
    report = VerifyReport(shards=len(shard_names), samples=keys.num_rows)
    connect(address)
    with tempfile.TemporaryDirectory(prefix="geodiff4d-verify-") as folder:
        commits = CommitLog(folder)
        job = run_units(
            VerifyJob(out),
            [WorkUnit(name) for name in shard_names],
            commits,
            workers=workers,
            desc="verify",
            progress=progress,
        )
        if not job.ok:
            raise RuntimeError(f"verify could not check every shard:\n{job.summary()}")
        for name in shard_names:
            found = commits.stats(name)
            report.verified += found["verified"]
            report.missing += found["missing"]
            report.extra += found["extra"]
            report.duplicated += found["duplicated"]
            report.corrupt.update(found["corrupt"])
    extra = pa.array(
        report.extra, pa.string()
    )  # a key outside its shard's rows: twice if it is anywhere else
    duplicated |= set(extra.filter(pc.is_in(extra, value_set=keys["key"])).to_pylist())
    duplicated |= {key for key, n in Counter(report.extra).items() if n > 1}
    report.duplicated = sorted(duplicated | set(report.duplicated))
    report.missing.sort()
    report.extra.sort()
    return report

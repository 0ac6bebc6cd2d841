"""Re-read every shard and compare it with the manifest, so silent damage is found before training.

Reports by sample key: missing (in the manifest, absent from an intact tar), extra (in a tar, not in the
manifest), duplicated (a key more than once) and corrupt (checksum or offset mismatch, truncation, a broken
header). A tar that stops without its end-of-archive marker makes every sample it did not deliver corrupt.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            scan.broken = f"tar stops at byte {stop} without an end-of-archive marker (truncated or bad header)"
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
        if (info.offset, info.offset_data, info.size) != (member["offset"], member["data_offset"], member["size"]):
            return f"member {member['name']} offset/size differ from the manifest"
    expected = {m["name"] for m in row["members"]}
    surplus = sorted(set(by_name) - expected)
    return f"unexpected members {surplus}" if surplus else None


def verify(out: str | os.PathLike) -> VerifyReport:
    """Check every tar in ``out`` against ``out/manifest.parquet``."""
    out = Path(out)
    rows = read_manifest(out).to_pylist()
    report = VerifyReport(samples=len(rows))
    key_counts = Counter(row["key"] for row in rows)
    by_shard: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], {})[row["key"]] = row
    tar_names = {p.name for p in out.glob("*.tar")}
    shard_names = sorted(tar_names | set(by_shard))
    report.shards = len(shard_names)
    for shard in shard_names:
        expected = by_shard.get(shard, {})
        if shard not in tar_names:
            report.missing += sorted(expected)
            continue
        scan = _scan(out / shard)
        key_counts.update(k for k in scan.members if k not in expected)
        for key, seen in scan.members.items():
            if len({info.name for info in seen}) != len(seen):
                report.duplicated.append(key)
            if key not in expected:
                report.extra.append(key)
        for key, row in expected.items():
            seen = scan.members.get(key)
            if key in scan.failed:
                report.corrupt[key] = scan.failed[key]
            elif seen is None:
                if scan.broken:
                    report.corrupt[key] = scan.broken
                else:
                    report.missing.append(key)
            elif (problem := _check_sample(row, seen, scan)) is not None:
                report.corrupt[key] = problem
            else:
                report.verified += 1
    report.duplicated = sorted(set(report.duplicated) | {k for k, n in key_counts.items() if n > 1})
    report.missing.sort()
    report.extra.sort()
    return report

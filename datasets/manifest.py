"""One Parquet manifest over all shards: the loader's index and the integrity check.

Each shard's commit marker ``{shard}.stats.json`` (written by the packing job beside ``{shard}.tar``) holds
its samples' ids and member records; the manifest is rebuilt from those markers, so it always describes
exactly the committed shards, and it is published only once complete (``datasets.destinations``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.json_yaml import parse_json
from geodiff4d.datasets.destinations import Destination, destination
from geodiff4d.datasets.locations import Location, is_remote, join, parquet_source
from geodiff4d.datasets.shards import MemberRecord, group_members, tar_size

MANIFEST_NAME = "manifest.parquet"
STATS_SUFFIX = ".stats.json"
ID_FIELDS = ("source", "subject", "sequence", "frame", "camera")

MEMBER_TYPE = pa.struct(
    [
        ("name", pa.string()),
        ("offset", pa.int64()),
        ("data_offset", pa.int64()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
    ]
)
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("subject", pa.string()),
        ("sequence", pa.string()),
        ("frame", pa.int32()),
        ("camera", pa.string()),
        ("normal_source", pa.string()),
        ("shard", pa.string()),
        ("members", pa.list_(MEMBER_TYPE)),
    ]
)


class ManifestError(UserError, ValueError):
    """A stats file or manifest that does not match the schema; the message names the file."""


def shard_stats(
    tar_name: str, ids: dict[str, dict[str, Any]], records: Sequence[MemberRecord]
) -> dict[str, Any]:
    """The commit marker of a shard written by ``shards.write_tar``: ``ids`` maps key -> {source, subject,
    sequence, frame, camera, ...}."""
    grouped = group_members(records)
    if set(grouped) != set(ids):
        raise ManifestError(
            f"{tar_name}: member keys and sample ids differ: {sorted(set(grouped) ^ set(ids))[:5]}"
        )
    samples = []
    for key in sorted(grouped):
        meta = ids[key]
        row = {field: meta[field] for field in ID_FIELDS}
        row.update(key=key, normal_source=meta.get("normal_source", ""))
        row["members"] = [r.to_json() for r in grouped[key]]
        samples.append(row)
    return {
        "tar": tar_name,
        "samples": samples,
        "tar_bytes": tar_size(records),
        "member_bytes": sum(r.size for r in records),
    }


def _rows(out: Destination, name: str) -> list[dict[str, Any]]:
    label = out.path(name)
    try:
        stats = parse_json(out.read_bytes(name), label, ManifestError)
        tar_name = stats["tar"]
        rows = [dict(sample, shard=tar_name) for sample in stats["samples"]]
        for row in rows:
            row["frame"] = int(row["frame"])
        return rows
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{label}: malformed shard stats: {exc}") from exc


ROW_GROUP_ROWS = 1 << 16  # rows per Parquet row group: small footer, and a shard filter reads one group


def build_manifest(out: Location | Destination) -> int:
    """Collect every committed shard's stats into ``out/manifest.parquet``, published once complete (a folder,
    an fsspec URL or a ``pipe:`` command: ``datasets.destinations``); returns the row count.

    Streams shard by shard in (shard, key) order, so memory stays at one row group whatever the data set's
    size (a NeRSemble-sized listing has ~38M rows: bench/bench_scale.py).
    """
    out = destination(out)
    names = sorted(
        out.names(STATS_SUFFIX), key=lambda n: n.removesuffix(STATS_SUFFIX) + ".tar"
    )  # shard order
    rows: list[dict[str, Any]] = []
    count = 0
    with out.open_write(MANIFEST_NAME) as stream, pq.ParquetWriter(stream, SCHEMA) as writer:
        for name in names:
            rows += sorted(_rows(out, name), key=lambda r: r["key"])
            if len(rows) >= ROW_GROUP_ROWS or name == names[-1]:
                writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), row_group_size=ROW_GROUP_ROWS)
                count += len(rows)
                rows = []
        if not names:
            writer.write_table(SCHEMA.empty_table())
    return count


def read_manifest(
    out: str | os.PathLike, columns: list[str] | None = None, filters: list | None = None
) -> pa.Table:
    """The manifest, or some ``columns`` / the rows matching ``filters`` (pyarrow's), checked against SCHEMA.

    ``out`` is a shard folder or a URL / ``pipe:`` location of one (``datasets.locations``)."""
    path = join(out, MANIFEST_NAME)
    if not is_remote(out) and not Path(path).is_file():
        raise ManifestError(f"{path}: no manifest (pack first)")
    try:
        source, filesystem = parquet_source(path)
        table = pq.read_table(source, columns=columns, filters=filters, filesystem=filesystem)
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest (pack first, or check the location): {exc}") from exc
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ManifestError(f"{path}: unreadable manifest: {exc}") from exc
    missing = set(columns or SCHEMA.names) - set(table.column_names)
    if missing:
        raise ManifestError(f"{path}: manifest lacks columns {sorted(missing)}")
    return table

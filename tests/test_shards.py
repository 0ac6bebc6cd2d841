"""Deterministic shards, the Parquet manifest and verify, on tiny synthesized samples."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds

from geodiff4d.core.jobs import CommitLog
from geodiff4d.datasets.manifest import MANIFEST_NAME, build_manifest, read_manifest, shard_stats
from geodiff4d.datasets.shards import ShardError, iter_shard, shard_name, tar_size, write_shard
from geodiff4d.datasets.verify import verify

MEMBERS = ("json", "mask.png", "normal.png", "posemap.png", "rgb.png")


def _png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def make_sample(source: str, subject: str, sequence: str, frame: int, camera: str, res: int = 16) -> dict:
    """A tiny sample whose pixels encode its ids (so tests can tell samples apart after decoding)."""
    ids = {"source": source, "subject": subject, "sequence": sequence, "frame": frame, "camera": camera}
    key = f"{source}_{subject}_{sequence}_{frame:05d}_{camera}"
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    mask = np.zeros((res, res), np.uint8)
    cv2.circle(mask, (res // 2, res // 2), res // 3, 255, -1)
    normal = np.where(mask[..., None] > 0, rng.integers(1, 65535, (res, res, 3)), 0).astype(np.uint16)
    return {
        "__key__": key,
        "rgb.png": _png(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)),
        "mask.png": _png(mask),
        "normal.png": _png(normal),
        "posemap.png": _png(normal[::-1].copy()),
        "json": json.dumps({**ids, "key": key, "normal_source": "gt"}, sort_keys=True).encode(),
    }


def synthetic_samples(subjects=2, frames=20, cameras=3, synthetic=6, res=16) -> list[dict]:
    samples = [
        make_sample("nersemble", f"{s:03d}", "EXP-1", f, f"2222000{c:02d}", res)
        for s in range(subjects)
        for f in range(frames)
        for c in range(cameras)
    ]
    samples += [make_sample("synthhuman", f"{i:07d}", "still", 0, "0", res) for i in range(synthetic)]
    return samples


def write_dataset(out: Path, samples: list[dict], per_shard: int) -> dict[str, int]:
    """Commit samples as shards per source (sorted by key, ``per_shard`` each) + manifest -> shard counts."""
    commits = CommitLog(out)
    counts: dict[str, int] = {}
    for source in sorted({json.loads(s["json"])["source"] for s in samples}):
        mine = sorted(
            (s for s in samples if json.loads(s["json"])["source"] == source), key=lambda s: s["__key__"]
        )
        for index, start in enumerate(range(0, len(mine), per_shard)):
            chunk = mine[start : start + per_shard]
            path = out / f"{shard_name(source, index)}.tar"
            ids = {s["__key__"]: json.loads(s["json"]) for s in chunk}
            commits.commit(shard_name(source, index), shard_stats(path.name, ids, write_shard(path, chunk)))
            counts[source] = index + 1
    build_manifest(out)
    return counts


@pytest.fixture()
def dataset(tmp_path):
    samples = synthetic_samples(subjects=1, frames=4, cameras=3, synthetic=3)
    write_dataset(tmp_path, samples, per_shard=6)
    return tmp_path, samples


def test_shard_is_deterministic_and_offsets_point_at_the_data(tmp_path):
    samples = synthetic_samples(subjects=1, frames=3, cameras=2, synthetic=0)
    a_records = write_shard(tmp_path / "a.tar", samples)
    write_shard(tmp_path / "b.tar", list(reversed(samples)))
    data = (tmp_path / "a.tar").read_bytes()
    assert data == (tmp_path / "b.tar").read_bytes()
    by_name = {f"{s['__key__']}.{ext}": s[ext] for s in samples for ext in MEMBERS}
    assert [r.name for r in a_records] == sorted(by_name)
    for record in a_records:
        member = data[record.data_offset : record.data_offset + record.size]
        assert member == by_name[record.name]
        assert record.sha256 == hashlib.sha256(member).hexdigest()
        header = tarfile.TarInfo.frombuf(data[record.offset : record.offset + 512], "utf-8", "strict")
        assert header.name == record.name
    assert tar_size(a_records) == len(data)  # the size a stats marker records without reading the file back
    assert not list(tmp_path.glob(".*tmp"))


def _tarfile_reference(samples: list[dict]) -> bytes:
    """The same members written by the standard library's own tar writer (stream mode, GNU format)."""
    members = sorted(
        (f"{s['__key__']}.{ext}", data) for s in samples for ext, data in s.items() if ext != "__key__"
    )
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                946684800,
                0o444,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize("count", [0, 1, 12])
def test_shard_bytes_are_what_tarfile_writes(tmp_path, count):
    """Headers, padding and the end blocks as ``tarfile`` writes them, long (GNU LongLink) names included."""
    samples = synthetic_samples(subjects=1, frames=3, cameras=2, synthetic=0)[:count]
    if count:
        samples[0] = {
            **samples[0],
            "__key__": "k" * 120,
            "json": b"x" * 513,
        }  # a LongLink header, odd padding
    write_shard(tmp_path / "s.tar", samples)
    assert (tmp_path / "s.tar").read_bytes() == _tarfile_reference(samples)


def test_tar_lists_with_stdlib_and_iterates_with_plain_webdataset(tmp_path):
    samples = synthetic_samples(subjects=1, frames=3, cameras=2, synthetic=0)
    write_shard(tmp_path / "s.tar", samples)
    with tarfile.open(tmp_path / "s.tar") as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos] == sorted(f"{s['__key__']}.{e}" for s in samples for e in MEMBERS)
    assert {(i.mtime, i.mode, i.uid, i.gid, i.uname, i.gname) for i in infos} == {
        (946684800, 0o444, 0, 0, "", "")
    }
    read = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    expected = {s["__key__"]: s for s in samples}
    assert sorted(r["__key__"] for r in read) == sorted(expected)
    for r in read:
        assert "." not in r["__key__"]
        assert {e: r[e] for e in MEMBERS} == {e: expected[r["__key__"]][e] for e in MEMBERS}
    assert [s["__key__"] for s in iter_shard(tmp_path / "s.tar")] == sorted(expected)


@pytest.mark.parametrize("key", ["a.b", "a/b", ""])
def test_keys_with_dots_or_slashes_are_refused(tmp_path, key):
    with pytest.raises(ShardError, match="invalid sample key"):
        write_shard(tmp_path / "x.tar", [{"__key__": key, "json": b"{}"}])
    assert not list(tmp_path.iterdir())


def test_duplicate_keys_and_non_bytes_members_are_refused(tmp_path):
    with pytest.raises(ShardError, match="duplicated"):
        write_shard(tmp_path / "x.tar", [{"__key__": "k", "json": b"1"}, {"__key__": "k", "json": b"2"}])
    with pytest.raises(ShardError, match="must be bytes"):
        write_shard(tmp_path / "x.tar", [{"__key__": "k", "json": "text"}])


def test_manifest_rows_match_samples(dataset):
    out, samples = dataset
    table = read_manifest(out)
    assert table.num_rows == len(samples)
    rows = {r["key"]: r for r in table.to_pylist()}
    for s in samples:
        meta, row = json.loads(s["json"]), rows[s["__key__"]]
        assert {k: row[k] for k in ("source", "subject", "sequence", "frame", "camera")} == {
            k: meta[k] for k in ("source", "subject", "sequence", "frame", "camera")
        }
        assert {m["name"]: m["sha256"] for m in row["members"]} == {
            f"{s['__key__']}.{e}": hashlib.sha256(s[e]).hexdigest() for e in MEMBERS
        }
    assert sorted({r["shard"] for r in rows.values()}) == [
        "nersemble-000000.tar",
        "nersemble-000001.tar",
        "synthhuman-000000.tar",
    ]
    assert (out / MANIFEST_NAME).is_file() and not list(out.glob(".*tmp"))


def test_verify_passes_on_intact_shards(dataset):
    out, samples = dataset
    report = verify(out)
    assert report.ok and report.exit_code == 0
    assert (report.shards, report.samples, report.verified) == (3, len(samples), len(samples))
    assert "verify OK" in report.summary()


def _records(out: Path, shard: str) -> list[dict]:
    return [
        m | {"key": r["key"]}
        for r in read_manifest(out).to_pylist()
        if r["shard"] == shard
        for m in r["members"]
    ]


def test_verify_reports_truncated_tar_by_key(dataset):
    out, _ = dataset
    path = out / "nersemble-000000.tar"
    members = _records(out, path.name)
    cut = members[len(members) // 2]["data_offset"] + 10  # inside a member's data
    path.write_bytes(path.read_bytes()[:cut])
    report = verify(out)
    damaged = {m["key"] for m in members if m["data_offset"] + m["size"] > cut}
    assert not report.ok and report.exit_code == 1
    assert set(report.corrupt) == damaged and len(damaged) >= 3
    assert not report.missing and not report.extra
    assert all(f"corrupt {k}" in report.summary() for k in damaged)


def test_verify_reports_tar_truncated_at_a_member_boundary(dataset):
    out, _ = dataset
    path = out / "nersemble-000001.tar"
    members = _records(out, path.name)
    cut = members[5]["offset"]  # tarfile stops silently at a missing header
    path.write_bytes(path.read_bytes()[:cut])
    report = verify(out)
    assert set(report.corrupt) == {m["key"] for m in members[5:]}
    assert "end-of-archive" in next(iter(report.corrupt.values()))


def test_verify_reports_bit_flips_in_data_and_header(dataset):
    out, _ = dataset
    path = out / "nersemble-000000.tar"
    members = _records(out, path.name)
    data = bytearray(path.read_bytes())
    data[members[3]["data_offset"] + 7] ^= 0x10
    path.write_bytes(bytes(data))
    report = verify(out)
    assert report.corrupt == {
        members[3]["key"]: f"member {members[3]['name']} sha256 differs from the manifest"
    }
    data[members[3]["data_offset"] + 7] ^= 0x10
    data[members[12]["offset"] + 3] ^= 0x01  # a header: its checksum no longer matches
    path.write_bytes(bytes(data))
    report = verify(out)
    assert set(report.corrupt) == {m["key"] for m in members[12:]}


def test_verify_reports_missing_extra_and_duplicated(dataset):
    out, samples = dataset
    shard = out / "synthhuman-000000.tar"
    synth = [s for s in samples if s["__key__"].startswith("synthhuman")]
    stranger = make_sample("synthhuman", "9999999", "still", 0, "0")
    write_shard(shard, synth[:-1] + [stranger])  # drop the last, add one, without updating the manifest
    twin = out / "nersemble-000009.tar"
    write_shard(twin, [samples[0]])  # an uncommitted tar repeating a key
    report = verify(out)
    assert report.missing == [synth[-1]["__key__"]]
    assert report.extra == sorted([stranger["__key__"], samples[0]["__key__"]])
    assert report.duplicated == [samples[0]["__key__"]]
    assert not report.corrupt and report.exit_code == 1


def test_verify_reports_a_deleted_shard_as_missing(dataset):
    out, samples = dataset
    (out / "synthhuman-000000.tar").unlink()
    report = verify(out)
    assert report.missing == sorted(s["__key__"] for s in samples if s["__key__"].startswith("synthhuman"))

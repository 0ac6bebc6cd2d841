"""``geodiff4d pack --out URL``: shards and manifest written to an fsspec URL (``file://``, ``memory://``) or
through ``pipe:`` commands, byte-identical to a local pack, published only when complete, and read back by
``verify``."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import fsspec
import pytest
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app
from geodiff4d.datasets.destinations import DestinationCommitLog, destination
from geodiff4d.datasets.locations import LocationError
from geodiff4d.datasets.manifest import MANIFEST_NAME, read_manifest

sys.path.insert(0, str(Path(__file__).parent))
from test_packing import _pack, data  # noqa: E402, F401 (the module's synthesized data fixture)

runner = CliRunner()


class _Interrupted(Exception):
    pass


def _locations(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "piped").mkdir()
    return {
        "folder": str(tmp_path / "folder"),
        "file": f"file://{tmp_path / 'url'}",
        "memory": f"memory://geodiff4d-test-{uuid.uuid4().hex}/shards",
        "pipe": f"pipe:cat > {tmp_path / 'piped'}/{{name}}",
    }


@pytest.mark.parametrize("kind", ["folder", "file", "memory", "pipe"])
def test_a_destination_publishes_only_complete_files(tmp_path, kind):
    out = destination(_locations(tmp_path)[kind])
    out.prepare()
    out.write_bytes("a.stats.json", b'{"tar": "a.tar"}')
    with pytest.raises(_Interrupted), out.open_write("b.stats.json") as stream:
        stream.write(b'{"half": ')
        raise _Interrupted
    assert out.names(".stats.json") == ["a.stats.json"] and not out.exists("b.stats.json")
    assert out.read_bytes("a.stats.json") == b'{"tar": "a.tar"}'
    commits = DestinationCommitLog(out)
    commits.commit("c", {"n": 1})
    assert commits.is_committed("c") and commits.stats("c") == {"n": 1} and not commits.is_committed("b")
    if kind == "pipe":  # the command received the complete files, and nothing of the interrupted one
        assert sorted(p.name for p in (tmp_path / "piped").iterdir()) == ["a.stats.json", "c.stats.json"]
    elif kind == "memory":
        assert fsspec.filesystem("memory").cat_file(out.path("c.stats.json").split("://", 1)[1]) == (
            b'{\n "n": 1\n}'
        )


def test_a_failing_pipe_command_is_an_error_naming_it(tmp_path):
    out = destination("pipe:cat > /nonexistent-folder/{name}")
    with pytest.raises(LocationError, match="pipe:cat > /nonexistent-folder/x.tar: writing x.tar failed"):
        out.write_bytes("x.tar", b"data")


def test_pack_to_a_file_url_and_through_a_pipe_matches_a_local_pack_and_verifies(data, tmp_path, local_ray):  # noqa: F811 (the fixture)
    where = _locations(tmp_path)
    assert _pack(Path(where["folder"]), data).ok
    for kind in ("file", "pipe"):
        report = _pack(where[kind], data)
        assert report.ok and report.out == where[kind], report.summary()
    local, url, piped = Path(where["folder"]), tmp_path / "url", tmp_path / "piped"
    tars = sorted(p.name for p in local.glob("*.tar"))
    for copy in (url, piped):
        assert sorted(p.name for p in copy.glob("*.tar")) == tars
        assert all((copy / t).read_bytes() == (local / t).read_bytes() for t in tars)
        assert (copy / MANIFEST_NAME).read_bytes() == (local / MANIFEST_NAME).read_bytes()
    assert read_manifest(where["file"]).equals(read_manifest(local))
    assert not list(url.glob(".*tmp"))
    check = runner.invoke(app, ["verify", where["file"], "--workers", "1"])
    assert check.exit_code == 0 and "verify OK" in check.output, check.output
    again = _pack(where["file"], data)  # an fsspec URL resumes like a folder
    assert again.job.completed == [] and len(again.job.skipped) == len(tars)
    repiped = _pack(where["pipe"], data)  # a pipe cannot be read back: every shard is written again
    assert len(repiped.job.completed) == len(tars) and repiped.job.skipped == []

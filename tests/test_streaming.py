"""Shards read from where clusters keep them: the manifest, the loader, ``verify`` and a training run over HTTP
(a server on 127.0.0.1 in a thread, stopped by the fixture) and through ``pipe:`` commands."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_shards import synthetic_samples, write_dataset
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app
from geodiff4d.datasets.loader import LoaderConfig, unit_stream
from geodiff4d.datasets.manifest import ManifestError, read_manifest
from geodiff4d.datasets.shards import PACK_SETTINGS
from geodiff4d.gen.checkpoint import latest_checkpoint
from geodiff4d.gen.data import check_shard_resolution, shard_batches
from geodiff4d.gen.train import train_loop

sys.path.insert(0, str(Path(__file__).parent))
from gen_synthetic import one_torch_thread  # noqa: E402, F401
from test_gen_data import config  # noqa: E402

runner = CliRunner()


class _Handler(SimpleHTTPRequestHandler):
    requested: list[str] = []  # paths served, so a test can tell the bytes came over HTTP

    def do_GET(self) -> None:
        _Handler.requested.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """ROOT/good: shards + manifest + pack_settings.json (16 px samples), served at http://127.0.0.1:PORT/."""
    root = tmp_path_factory.mktemp("served")
    write_dataset(root / "good", synthetic_samples(subjects=2, frames=4, cameras=2, synthetic=4), per_shard=8)
    (root / "good" / PACK_SETTINGS).write_text(json.dumps({"resolution": 16}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _locations(served) -> dict[str, str]:
    root, url = served
    return {"http": f"{url}/good", "pipe": f"pipe:cat {root / 'good'}/{{name}}"}


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_the_manifest_reads_the_same_remotely(served, kind):
    root, _ = served
    location = _locations(served)[kind]
    assert read_manifest(location).equals(read_manifest(root / "good"))
    shard = [("shard", "==", "nersemble-000000.tar")]
    assert read_manifest(location, filters=shard).equals(read_manifest(root / "good", filters=shard))


def test_a_missing_remote_manifest_names_the_location(served):
    _, url = served
    with pytest.raises(ManifestError, match=f"{url}/nope/manifest.parquet"):
        read_manifest(f"{url}/nope")
    with pytest.raises(ManifestError, match="pipe:cat /nonexistent/manifest.parquet"):
        read_manifest("pipe:cat /nonexistent/{name}")


def _unit_keys(location, n: int = 60) -> list[tuple]:
    units = unit_stream(location, LoaderConfig(kind="pair", seed=4))
    return [
        (u.targets[0]["__key__"], u.drivings[0]["__key__"], u.ref["__key__"])
        for u in itertools.islice(units, n)
    ]


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_the_loader_streams_the_same_units_remotely(served, kind):
    root, _ = served
    _Handler.requested.clear()
    assert _unit_keys(_locations(served)[kind]) == _unit_keys(root / "good")
    if kind == "http":
        assert any(path.endswith(".tar") for path in _Handler.requested)


def test_verify_over_http(served, local_ray, tmp_path):
    root, url = served
    good = runner.invoke(app, ["verify", f"{url}/good", "--workers", "1"])
    assert good.exit_code == 0 and "verify OK" in good.output, good.output
    bad = root / "bad"
    shutil.copytree(root / "good", bad)
    (bad / "synthhuman-000000.tar").unlink()
    tar = bad / "nersemble-000000.tar"
    data = bytearray(tar.read_bytes())
    data[512 + 5] ^= 0xFF  # inside the first member's data (after its 512-byte header)
    tar.write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", f"{url}/bad", "--workers", "1"])
    assert result.exit_code == 1 and "verify FAILED" in result.output, result.output
    assert "4 missing" in result.output and "sha256 differs" in result.output


def test_training_reads_shards_over_http(served, tmp_path):
    """A short training run whose batches stream from the HTTP server (the config's 16 px samples checked
    against the remote pack_settings.json first)."""
    _, url = served
    cfg = config()
    check_shard_resolution(f"{url}/good", cfg)
    _Handler.requested.clear()
    train_loop(cfg, 1, shard_batches(f"{url}/good", cfg, 1), tmp_path / "run", max_steps=2, quiet=True)
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"
    assert any(path.startswith("/good/") and path.endswith(".tar") for path in _Handler.requested)

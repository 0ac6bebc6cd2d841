"""Where ``geodiff4d pack`` writes: a local folder, an fsspec URL (object stores, ``file://``) or ``pipe:`` commands.

A reader must never see half a file or a manifest naming a shard that is not there yet, so every destination
publishes a file only once it is complete, and pack writes each tar before its commit marker and the manifest
last:

- a local folder: temp name beside the target, renamed over it (``core.io.atomic``);
- an fsspec URL: the file is spooled to a local temp file and uploaded in one put; an object store creates the
  object only when its upload completes (S3, GCS), and on a file system (``file://``) it is put under a temp
  name and moved over the target;
- a ``pipe:`` command with ``{name}`` where the file name goes (``pipe:aws s3 cp - s3://bucket/shards/{name}``,
  as webdataset's TarWriter takes them): the complete file is spooled, then piped to the command's stdin, and a
  non-zero exit is an error naming the command. A pipe cannot be read back, so such a destination keeps this
  run's small files (commit markers, settings) in a local spool to build the manifest, and resumes nothing:
  every run writes every shard (deterministic bytes, so a rerun writes the same files).

http(s) is read-only (a server has no standard upload), so it is refused as a destination.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem

from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.core.io.json_yaml import json_bytes, parse_json
from geodiff4d.core.jobs import CommitLog
from geodiff4d.datasets.locations import PIPE, Location, LocationError, is_remote, join

_READ_ONLY = {"http", "https"}
_SPOOL = "geodiff4d-spool-"


class Destination(ABC):
    """A shard folder being written; files are named relative to it."""

    resumable = True  # whether a rerun can read back what an earlier run wrote

    def __init__(self, location: Location):
        self.location = os.fspath(location)

    def path(self, name: str) -> str:
        return join(self.location, name)

    @abstractmethod
    def prepare(self) -> None:
        """Create the folder (or check the target can be written) before anything is written."""

    @abstractmethod
    @contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        """A binary stream whose bytes become file ``name`` only when the block ends without an error."""

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.open_write(name) as stream:
            stream.write(data)

    @abstractmethod
    def read_bytes(self, name: str) -> bytes: ...

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def names(self, suffix: str) -> list[str]:
        """Sorted names of the files ending with ``suffix``."""

    @abstractmethod
    def remove(self, name: str) -> None:
        """Delete file ``name`` when it exists."""


class LocalDestination(Destination):
    """A local or shared folder: temp name + rename."""

    def prepare(self) -> None:
        folder = Path(self.location)
        if folder.exists() and not folder.is_dir():
            raise LocationError(f"--out {folder}: exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        with atomic_output(self.path(name)) as tmp, open(tmp, "wb") as stream:
            yield stream

    def read_bytes(self, name: str) -> bytes:
        return Path(self.path(name)).read_bytes()

    def exists(self, name: str) -> bool:
        return Path(self.path(name)).is_file()

    def names(self, suffix: str) -> list[str]:
        return sorted(path.name for path in Path(self.location).glob(f"*{suffix}"))

    def remove(self, name: str) -> None:
        Path(self.path(name)).unlink(missing_ok=True)


@contextmanager
def _spooled() -> Iterator[tuple[Path, BinaryIO]]:
    """A local temp file open for writing, removed afterwards: a file is complete before it is published."""
    with tempfile.TemporaryDirectory(prefix=_SPOOL) as folder:
        path = Path(folder) / "file"
        with path.open("wb") as stream:
            yield path, stream


class FsspecDestination(Destination):
    """An fsspec URL: ``s3://``, ``gs://`` (with their fsspec package), ``file://``, ``memory://``."""

    def __init__(self, location: Location):
        super().__init__(location)
        protocol = self.location.split("://", 1)[0]
        if protocol in _READ_ONLY:
            raise LocationError(
                f"--out {self.location}: {protocol} is read-only; write to the folder or object store the server "
                "serves (a path, s3://, gs://, file://) or through a pipe: command"
            )
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as exc:
            raise LocationError(f"--out {self.location}: cannot write there: {exc}") from exc
        self.root = self.root.rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def prepare(self) -> None:
        self.fs.makedirs(self.root, exist_ok=True)

    @contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        with _spooled() as (path, stream):
            yield stream
            stream.close()
            if isinstance(self.fs, LocalFileSystem):  # a file system: put beside, then rename
                temp = self._key(f".{name}.{uuid.uuid4().hex}.tmp")
                self.fs.put_file(str(path), temp)
                self.fs.mv(temp, self._key(name))
            else:  # an object store: the object exists once its upload completes
                self.fs.put_file(str(path), self._key(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._key(name))

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.root)
        return self.fs.isfile(self._key(name))

    def names(self, suffix: str) -> list[str]:
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(
            name for name in (str(p).rstrip("/").rsplit("/", 1)[-1] for p in found) if name.endswith(suffix)
        )

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm_file(self._key(name))


class PipeDestination(Destination):
    """``pipe:`` commands reading each file on stdin; this run's small files are kept in a local spool."""

    resumable = False
    _KEPT_LOCALLY = (
        ".json",
        ".parquet",
    )  # markers, settings, report: read back while this run builds the manifest

    def __init__(self, location: Location):
        super().__init__(location)
        self.path("x")  # refuses a command without {name}
        self._spool: Path | None = None

    def _kept(self) -> Path:
        if self._spool is None:
            self._spool = Path(tempfile.mkdtemp(prefix=_SPOOL))
            weakref.finalize(self, shutil.rmtree, self._spool, True)
        return self._spool

    def prepare(self) -> None:
        """Nothing to create: the command decides where files go."""

    @contextmanager
    def open_write(self, name: str) -> Iterator[BinaryIO]:
        with _spooled() as (path, stream):
            yield stream
            stream.close()
            command = self.path(name)
            try:
                with path.open("rb") as data, wds.gopen(command, "wb") as pipe:
                    shutil.copyfileobj(data, pipe, 1 << 20)
            except OSError as exc:
                raise LocationError(f"{command}: writing {name} failed: {exc}") from exc
            if name.endswith(self._KEPT_LOCALLY):
                shutil.copyfile(path, self._kept() / name)

    def read_bytes(self, name: str) -> bytes:
        return (self._kept() / name).read_bytes()

    def exists(self, name: str) -> bool:
        return (self._kept() / name).is_file()

    def names(self, suffix: str) -> list[str]:
        return sorted(path.name for path in self._kept().glob(f"*{suffix}"))

    def remove(self, name: str) -> None:
        (self._kept() / name).unlink(missing_ok=True)


def destination(location: Location | Destination) -> Destination:
    """The destination writing ``location``: a folder, an fsspec URL or a ``pipe:`` command."""
    if isinstance(location, Destination):
        return location
    text = os.fspath(location)
    if not is_remote(text):
        return LocalDestination(text)
    if text.startswith(PIPE):
        return PipeDestination(text)
    return FsspecDestination(text)


class DestinationCommitLog(CommitLog):
    """Commit markers ``{unit_id}.stats.json`` kept in a destination, written after the unit's outputs."""

    def __init__(self, out: Destination):
        super().__init__(out.location)
        self.out = out
        self.folder = out.location  # messages name the URL as given (a Path would fold s3:// to s3:/)

    def is_committed(self, unit_id: str) -> bool:
        return self.out.exists(self.marker_name(unit_id))

    def commit(self, unit_id: str, stats: dict[str, Any]) -> None:
        self.out.write_bytes(self.marker_name(unit_id), json_bytes(stats))

    def stats(self, unit_id: str) -> dict[str, Any]:
        name = self.marker_name(unit_id)
        return parse_json(self.out.read_bytes(name), self.out.path(name))

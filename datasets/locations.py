"""Where a shard folder lives: a local folder, an ``http(s)://`` or object-store URL, or a ``pipe:`` command.

Clusters keep data sets on object storage, and streaming tars from it is what WebDataset is for, so every
reader of shards (manifest, ``verify``, the training loader) names files through this module:

- a local folder: ``/data/shards`` (files are ``/data/shards/{name}``);
- a URL: ``https://host/shards``, ``s3://bucket/shards``, ``gs://...`` (files are ``URL/{name}``); http(s) and
  every fsspec protocol (object stores need their fsspec package, e.g. s3fs or gcsfs) stream through fsspec, and
  Parquet on object stores is read through pyarrow's filesystems (only the row groups a query needs);
- a ``pipe:`` command with ``{name}`` where the file name goes: ``pipe:aws s3 cp s3://bucket/shards/{name} -``;
  its stdout is the file, and webdataset checks its exit status.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.fs
import webdataset as wds

from geodiff4d.core.errors import UserError

PIPE = "pipe:"
NAME = "{name}"
_STREAMING = {"http", "https"}  # read front to back: servers need not answer range requests


class LocationError(UserError, ValueError):
    """A shard location that cannot be used; the message names it."""


Location = str | os.PathLike


def is_remote(location: Location) -> bool:
    """True for URLs and ``pipe:`` commands, False for local paths."""
    text = os.fspath(location)
    return text.startswith(PIPE) or "://" in text


def join(location: Location, name: str) -> str:
    """The location of file ``name`` inside the shard folder ``location``."""
    text = os.fspath(location)
    if text.startswith(PIPE):
        if NAME not in text:
            raise LocationError(f"{text}: a pipe: location needs {NAME} where the file name goes")
        return text.replace(NAME, name)
    if "://" in text:
        return f"{text.rstrip('/')}/{name}"
    return str(Path(text) / name)


@contextmanager
def open_stream(location: Location) -> Iterator[BinaryIO]:
    """A file read front to back, from a path, a URL (fsspec) or a ``pipe:`` command (webdataset's ``gopen``,
    which raises when the command exits non-zero). A file that does not exist raises ``FileNotFoundError``."""
    text = os.fspath(location)
    if text.startswith(PIPE):
        stream = wds.gopen(text, "rb")
    elif "://" in text:
        protocol = text.split("://", 1)[0]
        options = {"block_size": 0} if protocol in _STREAMING else {}
        stream = fsspec.open(text, "rb", **options).open()
    else:
        stream = open(text, "rb")  # noqa: SIM115 (closed below)
    try:
        yield stream
    finally:
        stream.close()


def read_bytes(location: Location) -> bytes:
    with open_stream(location) as stream:
        return stream.read()


@contextmanager
def local_copy(location: Location) -> Iterator[Path]:
    """A local path holding the file: the file itself when local, else a temporary copy streamed from it."""
    if not is_remote(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="geodiff4d-fetch-") as folder:
        path = Path(folder) / "file"
        with open_stream(location) as stream, path.open("wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        yield path


def parquet_source(location: Location) -> tuple[object, pyarrow.fs.FileSystem | None]:
    """(source, filesystem) for ``pyarrow.parquet.read_table``: object stores through pyarrow's filesystems
    (random access: a filter reads only its row groups), http(s) and ``pipe:`` read whole into memory."""
    text = os.fspath(location)
    if not is_remote(text):
        return text, None
    if text.startswith(PIPE) or text.split("://", 1)[0] in _STREAMING:
        return pa.BufferReader(read_bytes(text)), None
    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        fs, path = fsspec.core.url_to_fs(text)
        filesystem = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return path, filesystem

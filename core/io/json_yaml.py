"""JSON and YAML files: read with one clear error naming the file, written atomically.

Each writer keeps the layout its files have always had (``indent``, ``sort_keys``, a trailing newline) as
parameters, so routing a caller through here never changes the bytes it writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_write_bytes


class DataFileError(UserError, ValueError):
    """A JSON or YAML file that is missing or cannot be parsed; the message names the file."""


def json_bytes(data: Any, indent: int | None = 1, sort_keys: bool = True, newline: bool = False) -> bytes:
    """``data`` as UTF-8 JSON text; ``newline`` ends it with one (files meant for people and diff tools)."""
    return (json.dumps(data, indent=indent, sort_keys=sort_keys) + ("\n" if newline else "")).encode()


def write_json(
    path: str | os.PathLike, data: Any, indent: int | None = 1, sort_keys: bool = True, newline: bool = False
) -> None:
    """:func:`json_bytes` written to a temp name and renamed (the default layout: ``indent=1``, sorted keys)."""
    atomic_write_bytes(path, json_bytes(data, indent, sort_keys, newline))


def parse_json(text: str | bytes, name: str, error: type[UserError] = DataFileError) -> Any:
    """JSON text (a file's, or a shard member's) parsed; ``name`` says where it came from in the error."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{name}: malformed JSON: {exc}") from exc


def read_json(path: str | os.PathLike, error: type[UserError] = DataFileError) -> Any:
    """A JSON file's content; a missing, unreadable or unparsable file raises ``error`` (a stage passes its
    own, which its callers catch) naming the file."""
    return parse_json(_read_text(path, "JSON", error), str(path), error)


def yaml_text(data: Any, sort_keys: bool = False) -> str:
    """``data`` as YAML (keys in insertion order unless ``sort_keys``: a config reads in its schema's order)."""
    return yaml.safe_dump(data, sort_keys=sort_keys)


def write_yaml(path: str | os.PathLike, data: Any, sort_keys: bool = False) -> None:
    """:func:`yaml_text` written to a temp name and renamed."""
    atomic_write_bytes(path, yaml_text(data, sort_keys).encode())


def read_yaml(path: str | os.PathLike, error: type[UserError] = DataFileError) -> Any:
    """A YAML file's content; a missing, unreadable or unparsable file raises ``error`` naming the file."""
    text = _read_text(path, "YAML", error)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: malformed YAML: {exc}") from exc


def _read_text(path: str | os.PathLike, kind: str, error: type[UserError]) -> str:
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {kind} file not found")
    try:
        return path.read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read {kind} file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: malformed {kind}: {exc}") from exc

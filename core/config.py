"""YAML configs validated with messages that name the file and the field (gen's model configs, recon's fits).

A config is given by path or by the name of one that ships inside the package (``demo``, ``paper``,
``recon``: the files of ``configs/``), so an installed wheel works outside the checkout.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.json_yaml import read_yaml

Schema = TypeVar("Schema")


class ConfigError(UserError, ValueError):
    """A config file that cannot be read or validated; the message names the file and the fields."""


def packaged_configs() -> dict[str, Path]:
    """The configs that ship with the package, by name (file stem)."""
    folder = importlib.resources.files("geodiff4d.configs")
    return {
        Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")
    }


def resolve_config(name_or_path: str | Path) -> Path:
    """An existing file as given, else the packaged config of that name (``demo`` or ``demo.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = packaged_configs()
    name = path.stem if path.suffix == ".yaml" and path.parent == Path(".") else str(name_or_path)
    if name in packaged:
        return packaged[name]
    raise ConfigError(
        f"{name_or_path}: no such config file, and no packaged config of that name "
        f"(packaged: {', '.join(sorted(packaged))})"
    )


def read_mapping(path: str | Path) -> dict[str, Any]:
    path = resolve_config(path)
    raw = read_yaml(path, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def validate(path: str | Path, raw: dict[str, Any], schema: type[Schema], prefix: str = "") -> Schema:
    """``raw`` as ``schema``: a pydantic model, or a dataclass (whose unknown keys are refused here, since
    pydantic would drop them silently). ``prefix`` names where ``raw`` sits inside the file."""
    where = f"{prefix}." if prefix else ""
    if dataclasses.is_dataclass(schema):
        known = sorted(f.name for f in dataclasses.fields(schema))
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(
                f"{path}: unknown field {', '.join(where + k for k in unknown)} (known: {', '.join(known)})"
            )
    try:
        return TypeAdapter(schema).validate_python(raw)
    except ValidationError as err:
        lines = [
            f"{where}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"]
            for e in err.errors()
        ]  # an empty loc: a check of the whole object (__post_init__, validators)
        raise ConfigError(f"{path}: invalid config:\n  " + "\n  ".join(lines)) from err


def load_yaml_config(path: str | Path, schema: type[Schema]) -> Schema:
    return validate(path, read_mapping(path), schema)

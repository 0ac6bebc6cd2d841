"""The one config style: pydantic models on :class:`StrictConfig`, validated with messages naming the source.

Every config (gen's model and training config, the generate spec, the benchmark config, recon's fits, eval
settings, pack settings, the synth spec) is a :class:`StrictConfig`: unknown fields and wrong types are
refused, built in code (the error names the class) or read from a file (:func:`validate`,
:func:`load_yaml_config`: the error names the file and the field). A file config is given by path or by the
name of one that ships inside the package (``demo``, ``paper``, ``recon``: the files of ``configs/``), so an
installed wheel works outside the checkout.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.json_yaml import read_yaml


class ConfigError(UserError, ValueError):
    """A config file that cannot be read or validated; the message names the file and the fields."""


def _known_fields(schema: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The field names of the (nested) model that holds ``loc``'s last part, or [] when it is not a model."""
    model = schema
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(model.model_fields) if model is not None else []


def describe_errors(
    where: str | Path, err: ValidationError, prefix: str = "", schema: type[BaseModel] | None = None
) -> str:
    """One line per failed field, ``prefix.field: message``, under ``where`` (a file, or the config's name).
    A check raised by a validator reads as written, without pydantic's "Value error, " prefix; an unknown
    field is named with the fields its section knows (from ``schema``), so a typo is found at a glance."""
    lead = f"{prefix}." if prefix else ""
    lines = []
    for error in err.errors():
        cause = error.get("ctx", {}).get("error")
        message = str(cause) if error["type"] == "value_error" and cause is not None else error["msg"]
        field = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            known = _known_fields(schema, error["loc"])
            lines.append(f"unknown field {lead}{field}" + (f" (known: {', '.join(known)})" if known else ""))
        elif field:
            lines.append(f"{lead}{field}: {message}")
        else:  # a check of the whole object (a model validator)
            lines.append(f"{prefix}: {message}" if prefix else message)
    return f"{where}: invalid config:\n  " + "\n  ".join(lines)


class _BuiltInCode(type(BaseModel)):
    """Building a config in code, ``Config(...)``, raises the class's ``config_error`` naming the class and
    the field. Only the explicit call is wrapped: nested models and ``model_validate`` (files, through
    :func:`validate`) keep pydantic's errors, so a file's message names the whole field path."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise cls.config_error(describe_errors(cls.__name__, err, schema=cls)) from err


class StrictConfig(BaseModel, metaclass=_BuiltInCode):
    """The base of every config: unknown fields refused, values immutable (configs are compared, hashed into
    fingerprints and shipped to Ray workers). An invalid value raises ``config_error``, a
    :class:`~geodiff4d.core.errors.UserError` (so a CLI prints it without a traceback), naming the class and
    the field when built in code, the file and the field when read through :func:`validate`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    config_error: ClassVar[type[UserError]] = ConfigError


Schema = TypeVar("Schema", bound=StrictConfig)


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


def validate(path: str | Path, raw: Any, schema: type[Schema], prefix: str = "") -> Schema:
    """``raw`` (a mapping read from ``path``) as ``schema``; ``prefix`` names where ``raw`` sits inside the
    file. Raises the schema's ``config_error`` naming the file and every failed field."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise schema.config_error(describe_errors(path, err, prefix, schema)) from err


def load_yaml_config(path: str | Path, schema: type[Schema]) -> Schema:
    """A YAML file (or packaged config name) validated as ``schema``."""
    return validate(path, read_mapping(path), schema)

"""The check a resumable stage makes before it writes into an existing output: same settings as last time.

A rerun into a folder written with other settings would mix outputs of two runs under one name, so each
resumable stage stores its settings (a JSON file) on the first run and compares them on every later one. The
comparison takes plain dicts (what the caller serialises), so it does not depend on how settings are modelled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.json_yaml import read_json, write_json

_ABSENT = "<absent>"


class SettingsChangedError(UserError, ValueError):
    """A rerun into an existing output with other settings; the message lists each differing field."""


def settings_differences(stored: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every field whose value differs, as ``field: stored -> now`` (nested mappings as ``outer.inner``; a field
    on one side only shows ``<absent>`` on the other), in sorted field order."""
    lines = []
    for key in sorted(set(stored) | set(now), key=str):
        before, after = stored.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            lines += settings_differences(before, after, f"{prefix}{key}.")
        elif before != after:
            lines.append(f"{prefix}{key}: {before} -> {after}")
    return lines


def refuse_differences(
    where: str | os.PathLike,
    differences: list[str],
    error: type[UserError] = SettingsChangedError,
    advice: str = "use another output folder",
) -> None:
    """Raise ``error`` naming ``where`` and listing ``differences`` (one per line); nothing when there are none."""
    if differences:
        raise error(f"{where} was written with other settings ({advice}):\n  " + "\n  ".join(differences))


def require_same_settings(
    path: str | os.PathLike,
    now: Mapping[str, Any],
    error: type[UserError] = SettingsChangedError,
    advice: str = "use another output folder",
) -> None:
    """Compare ``now`` with the settings stored at ``path`` (JSON) and refuse any difference; store ``now``
    there (``indent=1``, sorted keys) when the output has none yet."""
    path = Path(path)
    if path.exists():
        refuse_differences(path, settings_differences(read_json(path, error), now), error, advice)
        return
    write_json(path, dict(now))

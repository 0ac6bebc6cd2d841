"""`geodiff4d generate`'s cache of each subject's resolved inputs, without pickle.

The cache sits under ``--out``, on a cluster's shared storage, and every actor reads it: a pickle there would run
whatever code a planted file holds. So the tensors go into a safetensors file (a JSON header and raw arrays, no
code) and the rest (the key, names, cameras) into that header as JSON; reading checks every shape against the
others. A file that is missing, unreadable, of another format or made for another key is no cache: `prepare`
resolves the subject again.

Subjects are prepared lazily, by the first actor that needs one (:func:`prepare_once`: a lock file beside the
cache lets one actor prepare while the others wait for its file), and each actor keeps the subjects it prepared or
read in an :class:`InputsLRU` bounded in bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.datasets.cameras import Camera, CameraError
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.gen.generate_inputs import SubjectInputs

FORMAT = "geodiff4d.generate-inputs/1"
TRACKING = tuple(f.name for f in dataclasses.fields(FlameParams))


LOCK_STALE_S = 3600.0  # a lock of another host older than this is taken to be left by a dead actor
DEFAULT_ACTOR_CACHE_MB = 2048.0  # prepared subjects an actor keeps (a 300-frame subject at 512 px: ~0.3 GB)


def _tensors(inputs: SubjectInputs) -> dict[str, torch.Tensor]:
    return {
        "ref_rgb": inputs.ref_rgb,
        "ref_posemap": inputs.ref_posemap,
        "driving": inputs.driving,
        **{f"tracking.{name}": getattr(inputs.tracking, name) for name in TRACKING},
    }


def inputs_nbytes(inputs: SubjectInputs) -> int:
    """Bytes of the tensors a prepared subject holds."""
    return sum(t.nbytes for t in _tensors(inputs).values())


def write_cached(path: Path, key: str, inputs: SubjectInputs) -> None:
    """``inputs`` (made for ``key``) into ``path``, atomically."""
    tensors = _tensors(inputs)
    header = {
        "format": FORMAT,
        "key": key,
        "name": inputs.name,
        "sequence": inputs.sequence,
        "cameras": {serial: camera.to_json() for serial, camera in inputs.cameras.items()},
    }
    with atomic_output(path) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={"geodiff4d": json.dumps(header)},
        )


def cached_key(path: Path) -> str | None:
    """The key the cache at ``path`` was made for (its header alone is read), None without a readable cache."""
    try:
        with safe_open(str(path), framework="pt") as file:
            header = json.loads((file.metadata() or {})["geodiff4d"])
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError):
        return None
    return header.get("key") if isinstance(header, dict) and header.get("format") == FORMAT else None


def read_cached(path: Path, key: str | None = None) -> SubjectInputs | None:
    """The inputs cached at ``path`` (made for ``key``, when given); None when there is no valid cache."""
    try:
        with safe_open(str(path), framework="pt") as file:
            header = json.loads((file.metadata() or {})["geodiff4d"])
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 - not a dict
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None
    if key is not None and header.get("key") != key:
        return None
    return _validated(header, tensors)


def _validated(header: dict, tensors: dict[str, torch.Tensor]) -> SubjectInputs | None:
    """SubjectInputs from a cache's parts, or None when a part is missing or the shapes disagree."""
    names = {"ref_rgb", "ref_posemap", "driving", *(f"tracking.{name}" for name in TRACKING)}
    if set(tensors) != names or not all(isinstance(header.get(k), str) for k in ("name", "sequence")):
        return None
    ref, driving = tensors["ref_rgb"], tensors["driving"]
    tracking = FlameParams(**{name: tensors[f"tracking.{name}"] for name in TRACKING})
    frames = driving.shape[0] if driving.dim() == 4 else -1
    shapes_agree = (
        ref.dim() == 3
        and ref.shape[0] == 3
        and tensors["ref_posemap"].shape == ref.shape
        and driving.dim() == 4
        and driving.shape[1] == 3
        and all(getattr(tracking, n).dim() == 2 and getattr(tracking, n).shape[0] == frames for n in TRACKING)
    )
    cameras = header.get("cameras")
    if not shapes_agree or not isinstance(cameras, dict) or not cameras:
        return None
    try:
        rig = {str(serial): Camera.from_json(camera) for serial, camera in cameras.items()}
    except (CameraError, ValueError, TypeError):
        return None
    return SubjectInputs(
        header["name"], header["sequence"], ref, tensors["ref_posemap"], driving, tracking, rig
    )


def prepare_once(
    path: Path,
    key: str,
    make: Callable[[], SubjectInputs],
    poll_s: float = 0.2,
    stale_s: float = LOCK_STALE_S,
) -> SubjectInputs:
    """The inputs cached at ``path`` for ``key``; else ``make()``'s, cached there and read back. Actors sharing ``path`` take
    turns through ``{path}.lock`` (created exclusively), so one prepares a subject while the others wait for its
    cache. A lock whose holder died is broken: on this host when its process is gone, on another after
    ``stale_s``; two actors then rarely both prepare, which costs time only (the cache is written atomically)."""
    lock = path.with_name(f"{path.name}.lock")
    while True:
        cached = read_cached(path, key)
        if cached is not None:
            return cached
        if _take(lock):
            try:
                cached = read_cached(path, key)  # made by the holder we waited for
                if cached is not None:
                    return cached
                inputs = make()
                write_cached(path, key, inputs)
                cached = read_cached(
                    path, key
                )  # what the other actors read: every unit samples from the same
                return inputs if cached is None else cached  # values (a JSON round trip may round a camera)
            finally:
                lock.unlink(missing_ok=True)
        _break_if_stale(lock, stale_s)
        time.sleep(poll_s)


def _take(lock: Path) -> bool:
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as file:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, file)
    return True


def _break_if_stale(lock: Path, stale_s: float) -> None:
    try:
        holder, age = json.loads(lock.read_text()), time.time() - lock.stat().st_mtime
    except (OSError, json.JSONDecodeError):  # gone, or being written: look again at the next poll
        return
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
            return
        except ProcessLookupError:
            pass
        except (PermissionError, KeyError, TypeError, ValueError):
            return
    elif age < stale_s:
        return
    lock.unlink(missing_ok=True)


class InputsLRU:
    """The prepared subjects an actor keeps, at most ``max_bytes`` of tensors (the most recently used one is
    always kept); the least recently used go first, so an actor's memory stays bounded across any number of
    subjects."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.items = max_bytes, OrderedDict[str, tuple[SubjectInputs, int]]()

    def get(self, name: str, load: Callable[[], SubjectInputs]) -> SubjectInputs:
        if name in self.items:
            self.items.move_to_end(name)
            return self.items[name][0]
        inputs = load()
        self.items[name] = (inputs, inputs_nbytes(inputs))
        while len(self.items) > 1 and self.nbytes > self.max_bytes:
            self.items.popitem(last=False)
        return inputs

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self.items.values())

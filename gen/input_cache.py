"""`geodiff4d generate`'s cache of each subject's resolved inputs, without pickle.

The cache sits under ``--out``, on a cluster's shared storage, and every actor reads it: a pickle there would run
whatever code a planted file holds. So the tensors go into a safetensors file (a JSON header and raw arrays, no
code) and the rest (the key, names, cameras) into that header as JSON; reading checks every shape against the
others. A file that is missing, unreadable, of another format or made for another key is no cache: `prepare`
resolves the subject again.
"""

from __future__ import annotations

import dataclasses
import json
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


def write_cached(path: Path, key: str, inputs: SubjectInputs) -> None:
    """``inputs`` (made for ``key``) into ``path``, atomically."""
    tensors = {
        "ref_rgb": inputs.ref_rgb,
        "ref_posemap": inputs.ref_posemap,
        "driving": inputs.driving,
        **{f"tracking.{name}": getattr(inputs.tracking, name) for name in TRACKING},
    }
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

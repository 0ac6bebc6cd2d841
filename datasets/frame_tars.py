"""Frame folders whose images live in WebDataset tars, one tar per `geodiff4d generate` unit (docs/formats.md).

A real run writes millions of small PNGs; shared cluster storage handles few large files far better. So
``generate --format tar`` writes ROOT/tars/{subject}/{sequence}/{unit}.tar with members
``{camera}/{frame:05d}.{part}.png`` (part: rgb, normal, mask; WebDataset's key is ``{camera}/{frame:05d}``), the
same PNG bytes the folder layout would hold, and beside it ``{unit}.index.json``: member -> [offset, size] of its
bytes in the tar. Both are written atomically, the index last, so an index always names a complete tar.
cameras/, tracking/ and latents/ stay plain files. Readers (:class:`TarFrames`, used by datasets.frame_folder)
seek to a member through the indexes: nothing is unpacked.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.atomic import atomic_output
from geodiff4d.core.io.json_yaml import read_json, write_json

TARS = "tars"
INDEX_SUFFIX = ".index.json"
PARTS = ("rgb", "normal", "mask")


class FrameTarError(UserError, ValueError):
    """A tar frame folder whose index does not describe its tar; the message names the file."""


def member_name(camera: str, frame: int, part: str) -> str:
    return f"{camera}/{frame:05d}.{part}.png"


def sequence_tars(root: str | os.PathLike, subject: str, sequence: str) -> Path:
    return Path(root) / TARS / subject / sequence


def write_unit_tar(
    root: str | os.PathLike, subject: str, sequence: str, unit: str, members: dict[str, bytes]
) -> Path:
    """``members`` (name -> bytes) as ``{unit}.tar`` with its index; the same members give the same bytes
    (sorted, no times or owners), so outputs stay identical across worker counts."""
    tar_path = sequence_tars(root, subject, sequence) / f"{unit}.tar"
    with atomic_output(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(members):
                info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0, mode 0644
                info.size = len(members[name])
                tar.addfile(info, io.BytesIO(members[name]))
        with tarfile.open(tmp) as tar:
            index = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
    write_json(tar_path.with_name(f"{unit}{INDEX_SUFFIX}"), index)
    return tar_path


class TarFrames:
    """The (camera, frame) images of one subject/sequence of a tar frame folder, found through the indexes."""

    def __init__(self, root: str | os.PathLike, subject: str, sequence: str):
        self.members: dict[tuple[str, int, str], tuple[Path, int, int]] = {}
        for index in sorted(sequence_tars(root, subject, sequence).glob(f"*{INDEX_SUFFIX}")):
            tar = index.with_name(index.name.removesuffix(INDEX_SUFFIX) + ".tar")
            for name, (offset, size) in read_json(index, FrameTarError).items():
                camera, _, rest = name.rpartition("/")
                frame, part, ext = rest.split(".")
                if not camera or part not in PARTS or ext != "png" or not frame.isdigit():
                    raise FrameTarError(f"{index}: member {name!r} is not {{camera}}/{{frame}}.{{part}}.png")
                self.members[(camera, int(frame), part)] = (tar, int(offset), int(size))

    def cameras(self) -> list[str]:
        return sorted({camera for camera, _, _ in self.members})

    def frames(self, camera: str) -> list[int]:
        return sorted(f for c, f, part in self.members if c == camera and part == "rgb")

    def read(self, camera: str, frame: int, part: str) -> bytes | None:
        """The member's bytes, None when the unit wrote no such image (e.g. no normals)."""
        found = self.members.get((camera, frame, part))
        if found is None:
            return None
        tar, offset, size = found
        with open(tar, "rb") as file:
            file.seek(offset)
            data = file.read(size)
        if len(data) != size:
            raise FrameTarError(f"{tar}: {member_name(camera, frame, part)} is cut short")
        return data


def is_tar_folder(root: str | os.PathLike) -> bool:
    """A frame folder written with ``--format tar``: tars/ and no rgb/ tree."""
    return not (Path(root) / "rgb").is_dir() and (Path(root) / TARS).is_dir()

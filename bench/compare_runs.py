"""Compare two run folders (e.g. ``geodiff4d demo`` before and after a refactor) file by file.

Files are compared by sha256, following symlinks (the benchmark's gt/ folders are links); a differing
``.safetensors`` file is compared tensor by tensor and metadata key by key, so a changed header says what
changed; a differing image (``.png``) by its PSNR, so a change that moves pixels by rounding (float order, a
sampler's step count) reads apart from one that changes the picture. Timing records (``*.stats.json``) and
TensorBoard event files are listed apart: they differ on every run. Folders named by a config digest
(``avatars/KEY``) can be paired with ``--pair A_SUB B_SUB``.

    python bench/compare_runs.py RUN_A RUN_B [--pair avatars/KEY_A avatars/KEY_B ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from geodiff4d.core.io.images import read_image


def file_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (symlinked folders followed)."""
    hashes = {}
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            path = Path(folder) / name
            hashes[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def safetensors_difference(a: Path, b: Path) -> str:
    """What differs between two safetensors files: tensors (names, values) and metadata keys."""
    with safe_open(a, "pt") as x, safe_open(b, "pt") as y:
        names = sorted(x.keys())
        tensors_equal = names == sorted(y.keys()) and all(
            torch.equal(x.get_tensor(k), y.get_tensor(k)) for k in names
        )
        meta_a, meta_b = x.metadata() or {}, y.metadata() or {}
    keys = sorted(k for k in set(meta_a) | set(meta_b) if meta_a.get(k) != meta_b.get(k))
    return f"tensors {'identical' if tensors_equal else 'DIFFER'}; metadata keys differing: {keys or 'none'}"


def image_psnr(a: Path, b: Path) -> float:
    """PSNR in dB of two images of one shape, peak the dtype's maximum (255, or 65535 for 16-bit normal maps);
    inf when equal, nan when the shapes or dtypes differ."""
    x, y = read_image(a), read_image(b)
    if x.shape != y.shape or x.dtype != y.dtype:
        return float("nan")
    mse = float(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(np.iinfo(x.dtype).max ** 2 / mse)


def _difference(a: Path, b: Path) -> tuple[str, float | None]:
    """A differing file's detail and, for an image, its PSNR."""
    if a.suffix == ".safetensors":
        return safetensors_difference(a, b), None
    if a.suffix == ".png":
        psnr = image_psnr(a, b)
        return f"PSNR {psnr:.1f} dB", psnr
    return "bytes differ", None


def is_run_record(path: str) -> bool:
    return path.endswith(".stats.json") or "events.out.tfevents" in path


def compare(a: Path, b: Path, label: str, skip: tuple[str, ...] = ()) -> None:
    """Print the identical count, then every differing or one-sided file of ``a`` against ``b`` (files under
    the ``skip`` folders left out: they are compared as pairs)."""
    ha, hb = ({p: h for p, h in file_hashes(r).items() if not p.startswith(skip)} for r in (a, b))
    common = sorted(set(ha) & set(hb))
    differing = [p for p in common if ha[p] != hb[p]]
    records = [p for p in differing + sorted(set(ha) ^ set(hb)) if is_run_record(p)]
    print(
        f"== {label}: {len(common) - len(differing)} identical, {len(differing)} differing, "
        f"{len(set(ha) - set(hb))} only in A, {len(set(hb) - set(ha))} only in B; "
        f"{len(records)} of those are timing/TensorBoard records"
    )
    psnrs = []
    for path in differing:
        if is_run_record(path):
            continue
        detail, psnr = _difference(a / path, b / path)
        if psnr is not None:
            psnrs.append(psnr)
        print(f"  differ: {path} ({detail})")
    if psnrs:
        print(
            f"  {len(psnrs)} differing images: PSNR median {np.median(psnrs):.1f} dB, lowest {min(psnrs):.1f} dB"
        )
    for side, only in (("A", set(ha) - set(hb)), ("B", set(hb) - set(ha))):
        for path in sorted(p for p in only if not is_run_record(p)):
            print(f"  only in {side}: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A_SUB", "B_SUB"))
    args = parser.parse_args()
    paired = tuple(f"{sub}/" for pair in args.pair for sub in pair)
    compare(args.run_a, args.run_b, "whole runs, paired folders aside", paired)
    for sub_a, sub_b in args.pair:
        compare(args.run_a / sub_a, args.run_b / sub_b, f"{sub_a} ~ {sub_b}")


if __name__ == "__main__":
    main()

"""Where numba keeps the compiled kernels: one folder per version of the kernels' sources.

numba's on-disk cache (``cache=True``) checks only the file that defines a function, so a kernel that inlines
one from another file (render's normal codes inline the rasterizer's barycentrics) keeps running the old code
after only that other file changed (an editable install after a ``git pull``). Keying the whole cache folder on
the sources of every module that defines kernels makes any such change compile afresh.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

ROOT_VARIABLE = "GEODIFF4D_NUMBA_CACHE_ROOT"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# every module that defines numba kernels (tests/test_kernel_cache.py checks that none is missing)
KERNEL_MODULES = (
    "datasets/cameras.py",
    "datasets/normal_maps.py",
    "datasets/rasterizer.py",
    "datasets/render.py",
    "datasets/resample.py",
    "recon/composite.py",
)


def sources_digest(root: Path = PACKAGE_ROOT, modules: tuple[str, ...] = KERNEL_MODULES) -> str:
    """sha256 (16 hex digits) over the kernel modules' paths (relative to ``root``) and bytes."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(module.encode() + b"\0" + (root / module).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    """Where the folders go: the root a parent process chose, else the user's NUMBA_CACHE_DIR (its geodiff4d
    part), else $XDG_CACHE_HOME (~/.cache)/geodiff4d/numba."""
    if given := os.environ.get(ROOT_VARIABLE):
        return Path(given)
    if given := os.environ.get("NUMBA_CACHE_DIR"):
        return Path(given) / "geodiff4d"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geodiff4d" / "numba"


def use_source_keyed_cache() -> Path:
    """Point numba's cache at ``cache_root() / sources_digest()`` before any kernel module is imported, also in
    processes this one starts (Ray workers inherit the environment); -> the folder."""
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError):  # no home, or a read-only one (some containers): numba would refuse to
        root = Path(tempfile.gettempdir()) / f"geodiff4d-numba-{os.getuid()}"  # import the kernels at all
    folder = root / sources_digest()
    os.environ[ROOT_VARIABLE] = str(root)  # the root, not the folder: a child keys its own sources
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    if "numba" in sys.modules:  # imported before us: numba read its environment already
        sys.modules["numba"].config.CACHE_DIR = str(folder)
    return folder

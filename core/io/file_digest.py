"""What a rerun compares to tell that input files changed: their paths, sizes and modification times.

Keys and paths alone miss a re-download, a touched or rewritten file, a new file beside the old ones or another
root with the same names; hashing contents would read terabytes of captures on every rerun. Size and mtime
catch each of those at the cost of a stat per file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def files_under(folder: Path) -> list[Path]:
    """Every file below ``folder`` (symlinked folders followed; none when it does not exist)."""
    return [Path(dirpath, name) for dirpath, _, names in os.walk(folder, followlinks=True) for name in names]


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 over the files by absolute path, size and mtime (-1 for a path that does not exist), in sorted
    order, so the same files give the same digest however they were listed."""
    digest = hashlib.sha256()
    for path in sorted({Path(p).absolute() for p in paths}):
        info = path.stat() if path.exists() else None
        size, mtime = (info.st_size, info.st_mtime_ns) if info else (-1, -1)
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()

"""Restricted loading of FLAME model pickles (and FLAME's pickled landmark ``.npy``), with no ``chumpy``.

The official FLAME ``.pkl`` files are Python-2 pickles that reference ``chumpy`` arrays and scipy sparse
matrices. A plain ``pickle.load`` would run any callable the file names, so this loader resolves only an
allow-list of classes (numpy array reconstruction, scipy csc/csr matrices, builtins containers) and maps
``chumpy.ch.Ch`` to a stand-in that keeps the array held under its state key ``'x'``. Anything else raises
:class:`UnsafePickleError` naming ``module.class`` and the file.
"""

from __future__ import annotations

import codecs
import copyreg
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
from numpy.lib import format as npy_format

from geodiff4d.core.errors import UserError


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickle referenced a class or function outside the allow-list."""


class ChumpyArray:
    """Stand-in for ``chumpy.ch.Ch``: keeps only the wrapped array (``__setstate__`` key ``'x'``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.x: np.ndarray | None = None

    def __setstate__(self, state: dict) -> None:
        self.x = None if state.get("x") is None else np.asarray(state["x"])


def _numpy_global(module: str, name: str) -> Any:
    return getattr(__import__(module, fromlist=[name]), name)


_NUMPY_GLOBALS = {
    (module, name)
    for core in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{core}.multiarray", "_reconstruct"),
        (f"{core}.multiarray", "scalar"),
        (f"{core}.numeric", "_frombuffer"),
    )
} | {("numpy", "ndarray"), ("numpy", "dtype")}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 store bytes
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("chumpy.ch", "Ch"): ChumpyArray,
}
for _module in ("scipy.sparse.csc", "scipy.sparse._csc", "scipy.sparse.csr", "scipy.sparse._csr"):
    for _name in ("csc_matrix", "csr_matrix", "csc_array", "csr_array"):
        if _name[:3] == _module[-3:]:
            _ALLOWED[(_module, _name)] = getattr(scipy.sparse, _name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file, encoding="latin1")  # FLAME pickles are Python-2 era
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in _NUMPY_GLOBALS:
            return _numpy_global(module, name)
        raise UnsafePickleError(f"{self.source}: refusing to load {module}.{name} (not in the allow-list)")


def _unwrap(value: Any, source: str, key: str) -> Any:
    if isinstance(value, ChumpyArray):
        if value.x is None:
            raise ValueError(f"{source}: field {key!r} is a chumpy expression without a stored array 'x'")
        return value.x
    return value


def restricted_loads(data: bytes, source: str) -> Any:
    """Unpickle ``data`` with the allow-list; ``source`` names the file in errors."""
    return _RestrictedUnpickler(io.BytesIO(data), source).load()


def load_flame_pickle(path: str | Path) -> dict[str, Any]:
    """Load a FLAME-structured ``.pkl`` into a dict of numpy arrays / scipy sparse matrices / plain values."""
    path = Path(path)
    loaded = restricted_loads(path.read_bytes(), str(path))
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a pickled dict of model arrays, got {type(loaded).__name__}")
    return {str(key): _unwrap(value, str(path), str(key)) for key, value in loaded.items()}


def load_pickled_npy(path: str | Path) -> Any:
    """Load an object ``.npy`` (e.g. FLAME's ``landmark_embedding.npy``) through the restricted unpickler."""
    path = Path(path)
    with path.open("rb") as file:
        version = npy_format.read_magic(file)
        read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"{path}: unsupported .npy format version {version}")
        shape, _, dtype = read_header[version](file)
        if dtype != np.dtype(object):
            raise ValueError(f"{path}: expected an object .npy holding a pickled dict, got dtype {dtype}")
        array = restricted_loads(file.read(), str(path))
    if isinstance(array, np.ndarray) and array.shape == () and shape == ():
        return array.item()
    return array

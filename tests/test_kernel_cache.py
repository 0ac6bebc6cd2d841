"""numba's cache checks only a kernel's own file; the cache folder is keyed on every kernel module's sources, so
an edit to a module another one inlines never leaves stale compiled code running."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from geodiff4d.core.kernel_cache import KERNEL_MODULES, PACKAGE_ROOT, sources_digest

_INLINED = "import numba\n\n@numba.njit(cache=True, inline='always')\ndef value():\n    return {}\n"
_CALLER = (
    "import numba\nfrom inlined import value\n\n@numba.njit(cache=True)\ndef caller():\n    return value()\n"
)
# prints caller(): the cache folder is argv[2], or (argv[3] == "keyed") argv[2] / the modules' digest
_RUN = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from geodiff4d.core.kernel_cache import sources_digest
    folder = Path(sys.argv[2])
    if sys.argv[3] == "keyed":
        folder = folder / sources_digest(Path(sys.argv[1]), ("inlined.py", "caller.py"))
    os.environ["NUMBA_CACHE_DIR"] = str(folder)  # before numba is imported
    sys.path.insert(0, sys.argv[1])
    from caller import caller
    print(caller())
    """
)


def test_every_module_with_compiled_kernels_keys_the_cache():
    packages = [p for p in PACKAGE_ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"]
    compiled = {
        str(path.relative_to(PACKAGE_ROOT))
        for package in packages
        for path in package.rglob("*.py")
        if "numba.njit" in path.read_text()
    }
    assert compiled == set(KERNEL_MODULES)


def test_the_package_uses_the_keyed_folder():
    import numba

    assert Path(numba.config.CACHE_DIR).name == sources_digest()


@pytest.mark.parametrize("cache, expected", [("unkeyed", "1"), ("keyed", "2")])
def test_an_edit_to_an_inlined_kernel_reaches_its_callers(tmp_path, cache, expected):
    """The hazard is numba's own: unkeyed, a caller keeps the inlined kernel's old code after its file changed."""
    source, folder = tmp_path / "src", tmp_path / "cache"
    source.mkdir()
    (source / "inlined.py").write_text(_INLINED.format(1))
    (source / "caller.py").write_text(_CALLER)

    def run() -> str:
        args = [sys.executable, "-c", _RUN, str(source), str(folder), cache]
        result = subprocess.run(args, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert run() == "1"
    (source / "inlined.py").write_text(_INLINED.format(2) + "# edited\n")
    assert run() == expected

"""Every dependency that requirements.txt names imports on this machine: a wheel whose shared library needs a
system library the machine lacks (open3d needs libusb-1.0, which ``make setup`` installs) fails here by name,
instead of as a collection error in an unrelated test module."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Modules that are not meant to be imported on their own (build helpers, plugin namespaces, test packages)
NOT_IMPORTABLE = {"_distutils_hack", "pkg_resources", "setuptools", "tests", "benchmarks", "examples", "docs"}
# Distributions whose module name the metadata does not list (a compiled module installed beside it)
IMPORT_NAMES = {"dlib-bin": ["dlib"]}
# Packages whose top-level import pulls in the system libraries we install, checked deeper than the top level
DEEP_IMPORTS = ("nersemble_benchmark.data.benchmark_data", "nersemble_data.data.nersemble_data", "open3d")


def _required_distributions() -> list[str]:
    names = []
    for line in (
        (ROOT / "requirements.txt").read_text().splitlines()
    ):  # not requirements-nodeps: weight carriers
        line = line.split("#")[0].strip()
        if line:
            names.append(re.split(r"[=<>\[ ]", line)[0].lower().replace("_", "-"))
    return names


def _modules_of(distribution: str) -> list[str]:
    if distribution in IMPORT_NAMES:
        return IMPORT_NAMES[distribution]
    by_module = packages_distributions()
    return sorted(
        m
        for m, dists in by_module.items()
        if distribution in {d.lower().replace("_", "-") for d in dists}
        and m.isidentifier()
        and not m.startswith("_")
        and m not in NOT_IMPORTABLE
    )


IMPORT_EACH = """
import importlib, json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=3)[-1500:]
print(json.dumps(failures))
"""


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    """Every required module imported in one fresh interpreter (a broken extension module must not poison the
    test process): module -> its traceback, for the ones that failed."""
    modules = sorted({m for d in _required_distributions() for m in _modules_of(d)})
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, *modules], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("distribution", _required_distributions())
def test_required_distribution_imports(distribution, import_failures):
    modules = _modules_of(distribution)
    assert modules, f"{distribution} is required but not installed: run make setup"
    failed = {m: import_failures[m] for m in modules if m in import_failures}
    assert not failed, f"{distribution} does not import:\n" + "\n".join(
        f"{m}: {tb}" for m, tb in failed.items()
    )


@pytest.mark.parametrize("module", DEEP_IMPORTS)
def test_system_library_users_import(module):
    importlib.import_module(module)

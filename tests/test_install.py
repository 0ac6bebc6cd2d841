"""``pip install .`` (not editable) into a clean virtualenv, then the CLI from another directory.

Installing torch and the rest from the registry takes minutes and gigabytes, so the new environment sees this
environment's installed dependencies through a ``.pth`` line; it does not see the editable ``geodiff4d``
(the editable finder is a ``.pth`` hook, and only site directories run ``.pth`` files). The test checks that
``import geodiff4d`` resolves to the new install, so packaged configs and data come from the wheel's files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
LEFT_OUT = (
    ".venv",
    ".git",
    "__pycache__",
    "*.egg-info",
    "build",
    "runs",
    "demo_out",
    ".pytest_cache",
    ".ruff_cache",
)


def _run(args: list, cwd: Path, timeout: int = 600) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_pip_install_then_synth_and_train_from_another_directory(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(CHECKOUT, source, ignore=shutil.ignore_patterns(*LEFT_OUT))
    venv = tmp_path / "venv"
    _run(
        [sys.executable, "-m", "venv", "--without-pip", venv], tmp_path
    )  # pip and setuptools come from the .pth
    site = Path(
        _run(
            [venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path
        ).strip()
    )
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [venv / "bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", source],
        tmp_path,
    )
    shutil.rmtree(source)  # nothing may come from the copy either

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([venv / "bin/python", "-c", "import geodiff4d.configs as c; print(c.__file__)"], elsewhere)
    assert Path(where.strip()).is_relative_to(site), where
    cli = venv / "bin/geodiff4d"
    assert "geodiff4d 0." in _run([cli, "--version"], elsewhere)
    _run(
        [
            cli,
            "synth",
            "--out",
            "data",
            "--subjects",
            "1",
            "--frames",
            "2",
            "--cameras",
            "2",
            "--resolution",
            "32",
            "--synthetic",
            "2",
            "--workers",
            "1",
        ],
        elsewhere,
    )
    _run(
        [
            cli,
            "pack",
            "--out",
            "shards",
            "--source",
            "nersemble:data/nersemble",
            "--source",
            "synthhuman:data/synthhuman",
            "--resolution",
            "32",
            "--workers",
            "1",
        ],
        elsewhere,
    )
    out = _run(
        [
            cli,
            "train",
            "--config",
            "demo",
            "--stage",
            "1",
            "--shards",
            "shards",
            "--out",
            "run",
            "--max-steps",
            "2",
        ],
        elsewhere,
    )
    assert "latest checkpoint" in out and (elsewhere / "run" / "config.yaml").is_file()

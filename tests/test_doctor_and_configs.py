"""Packaged configs by name, --version and doctor: what a newcomer meets first."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app
from geodiff4d.core.config import ConfigError, packaged_configs, resolve_config
from geodiff4d.gen.config import load_config

runner = CliRunner()


def test_configs_are_addressed_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert {"demo", "paper", "recon"} <= set(packaged_configs())
    assert resolve_config("demo") == resolve_config("demo.yaml") == packaged_configs()["demo"]
    assert load_config("demo").data.resolution == 32
    own = tmp_path / "demo.yaml"  # a file the user has beats the packaged one of the same name
    own.write_text("x: 1\n")
    assert resolve_config("demo.yaml").resolve() == own


def test_unknown_config_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"nope: no such config file.*packaged: ablations, benchmark-demo, demo, generate, paper, recon",
    ):
        resolve_config("nope")


def test_version_option():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"geodiff4d {version('geodiff4d')}"


def test_doctor_reports_every_metric_and_what_is_missing(tmp_path):
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for name in (
        "GPUs",
        "Ray",
        "lpips (alex)",
        "csim facenet",
        "csim arcface",
        "akd dlib",
        "aed mediapipe",
        "jod",
    ):
        assert name in result.output
    arcface = next(line for line in result.output.splitlines() if "csim arcface" in line)
    assert arcface.startswith("--") and "--arcface-model" in arcface
    onnx = tmp_path / "w600k_r50.onnx"
    onnx.write_bytes(b"onnx")
    result = runner.invoke(app, ["doctor", "--arcface-model", str(tmp_path)])
    arcface = next(line for line in result.output.splitlines() if "csim arcface" in line)
    assert arcface.startswith("ok") and str(onnx) in arcface


def test_doctor_says_whether_fan_weights_were_found(tmp_path, monkeypatch):
    monkeypatch.delenv("GEODIFF4D_FAN_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    result = runner.invoke(app, ["doctor", "--fan-weights", str(tmp_path / "nowhere")])
    fan = next(line for line in result.output.splitlines() if "akd fan" in line)
    assert fan.startswith("--") and "2DFAN4-11f355bf06.pth.tar" in fan and str(tmp_path / "nowhere") in fan
    checkpoint = tmp_path / "2DFAN4-11f355bf06.pth.tar"
    checkpoint.write_bytes(b"weights")
    result = runner.invoke(app, ["doctor", "--fan-weights", str(checkpoint)])
    fan = next(line for line in result.output.splitlines() if "akd fan" in line)
    assert fan.startswith("ok") and str(checkpoint) in fan

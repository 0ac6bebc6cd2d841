"""The CLI: every command answers --help; recon configs are validated (bad inputs of every command: test_cli_errors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app

runner = CliRunner()
COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


def test_top_level_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output
    assert "--install-completion" in result.output and "--version" in result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_sample_out_help_names_every_folder_sampling_writes():
    """`sample --out`'s help lists the frame folder's top-level folders as the sampler's source writes them
    (``root / "mask"``...), so a folder added to the sampler cannot go unmentioned (mask/ once did)."""
    source = (Path(__file__).resolve().parents[1] / "gen" / "sample_frames.py").read_text()
    written = set(re.findall(r'root / "(\w+)"', source))
    assert {"rgb", "normal", "mask", "latents", "cameras", "grids"} <= written
    result = runner.invoke(app, ["sample", "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    help_text = " ".join(result.output.split())
    assert [name for name in sorted(written) if f"{name}/" not in help_text] == []


def test_recon_config_is_validated_before_any_work(tmp_path):
    from geodiff4d.recon.run import load_recon_config

    example = load_recon_config("configs/recon.yaml")
    assert (
        example.tracker == "ours"
        and example.refine["uv_offsets"]
        and example.tracking_options["render_size"] == 96
    )
    cases = {
        "steps: many\n": "steps: Input should be a valid integer",
        "tracking_options: {render_sise: 96}\n": "unknown field tracking_options.render_sise",
        "fit: {lambda_normal: strong}\n": "fit.lambda_normal: Input should be a valid number",
        "tracker: pixel3dmm\n": "tracker must be 'file' or 'ours'",
        "step: 10\n": "unknown field step",
        "tracker: ours\ntracking_options: {chunk_frames: 0}\n": "chunk_frames must be at least 1",
        "tracking_init: other.npz\n": "set tracker: ours",
    }
    for number, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{number}.yaml"
        bad.write_text(text)
        result = runner.invoke(
            app, ["recon", str(tmp_path), "--out", str(tmp_path / "out"), "--config", str(bad)]
        )
        assert result.exit_code == 2 and str(bad) in result.output and message in result.output, result.output
    assert not (tmp_path / "out").exists()

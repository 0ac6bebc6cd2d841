"""The CLI: every command answers --help, and bad arguments fail with a message, not a traceback."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help(name):
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_synth_rejects_odd_resolution(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "out"), "--resolution", "127"])
    assert result.exit_code == 1
    assert "resolution must be even" in result.output

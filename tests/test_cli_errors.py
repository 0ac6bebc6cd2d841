"""Every command refuses bad input with one message naming the input, exit code 2, no traceback, before Ray starts.

The table covers each command of ``geodiff4d --help``: nonexistent paths, a file where a folder is expected, a folder
without the expected contents, out-of-range numbers, malformed and schema-invalid YAML, unknown choices, and an
output folder written with other settings. Ray is replaced by a tripwire, so a case that reaches Ray fails loudly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray
from typer.testing import CliRunner

from geodiff4d.cluster.cli import app
from geodiff4d.datasets.procedural import SynthJob, SynthSpec

runner = CliRunner()
COMMANDS = sorted(command.name or command.callback.__name__ for command in app.registered_commands)


class RayStarted(BaseException):
    """Raised by the tripwire: a BaseException so that no handler in the toolkit swallows it."""


def _tripwire(*args, **kwargs):
    raise RayStarted("Ray was started before the inputs were validated")


@pytest.fixture(scope="module")
def stages() -> None:
    """The stage modules imported once, so that each case's time is its own validation, not torch's import."""
    import geodiff4d.cluster.benchmark
    import geodiff4d.datasets.packing
    import geodiff4d.eval.run
    import geodiff4d.gen.train
    import geodiff4d.recon.run  # noqa: F401


@pytest.fixture(scope="module")
def synthhuman_data(tmp_path_factory) -> Path:
    """One SynthHuman sample, written without Ray."""
    out = tmp_path_factory.mktemp("data")
    job = SynthJob(out, SynthSpec(subjects=1, frames=1, cameras=1, resolution=32, synthetic=1))
    job.setup()
    job.write_synthetic(0, 1)
    return out


@pytest.fixture
def inputs(stages, synthhuman_data, tmp_path: Path, monkeypatch) -> Path:
    """A folder of bad inputs, and Ray replaced by the tripwire."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", _tripwire)
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "malformed.yaml").write_text("steps: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "gen-invalid.yaml").write_text("model: {latents: sideways}\n")
    (tmp_path / "recon-invalid.yaml").write_text("steps: many\n")
    (tmp_path / "spec-invalid.yaml").write_text("seed: x\n")
    (tmp_path / "bench-invalid.yaml").write_text("methods: [{name: x, kind: magic}]\n")
    (tmp_path / "synth-other").mkdir()
    (tmp_path / "synth-other" / "synth_spec.json").write_text(json.dumps({"subjects": 9}))
    (tmp_path / "pack-other").mkdir()
    (tmp_path / "pack-other" / "pack_settings.json").write_text(json.dumps({"resolution": 9}))
    (tmp_path / "data").symlink_to(synthhuman_data)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{")
    return tmp_path


# (command line with {t} for the inputs folder, fragment of the message that names the input)
CASES: list[tuple[str, str]] = [
    # synth
    ("synth --out {t}/out --resolution 127", "resolution"),
    ("synth --out {t}/out --subjects -1", "--subjects"),
    ("synth --out {t}/out --workers 0", "--workers"),
    ("synth --out {t}/afile", "{t}/afile"),
    ("synth --out {t}/synth-other", "{t}/synth-other/synth_spec.json"),
    # pack
    ("pack --out {t}/out --source synthhuman:{t}/nope", "{t}/nope"),
    ("pack --out {t}/out --source synthhuman:{t}/afile", "{t}/afile"),
    ("pack --out {t}/out --source synthhuman:{t}/empty", "{t}/empty"),
    ("pack --out {t}/out --source magic:{t}/empty", "--source"),
    ("pack --out {t}/out --source synthhuman:{t}/data/synthhuman --resolution -64", "--resolution"),
    (
        "pack --out {t}/out --source synthhuman:{t}/data/synthhuman --synthhuman-subset legs",
        "--synthhuman-subset",
    ),
    (
        "pack --out {t}/out --source synthhuman:{t}/data/synthhuman --normal-estimator {t}/nope.onnx",
        "{t}/nope.onnx",
    ),
    (
        "pack --out {t}/pack-other --source synthhuman:{t}/data/synthhuman",
        "{t}/pack-other/pack_settings.json",
    ),
    # verify
    ("verify {t}/nope", "{t}/nope"),
    ("verify {t}/afile", "{t}/afile"),
    ("verify {t}/empty", "{t}/empty"),
    ("verify {t}/empty --workers 0", "--workers"),
    # train
    ("train --config {t}/nope.yaml --stage 1 --shards {t}/empty --out {t}/out", "{t}/nope.yaml"),
    ("train --config {t}/malformed.yaml --stage 1 --shards {t}/empty --out {t}/out", "{t}/malformed.yaml"),
    ("train --config {t}/list.yaml --stage 1 --shards {t}/empty --out {t}/out", "{t}/list.yaml"),
    ("train --config {t}/gen-invalid.yaml --stage 1 --shards {t}/empty --out {t}/out", "model.latents"),
    ("train --config demo --stage 3 --shards {t}/empty --out {t}/out", "--stage"),
    ("train --config demo --stage 1 --shards {t}/nope --out {t}/out", "{t}/nope"),
    ("train --config demo --stage 1 --shards {t}/empty --out {t}/out", "{t}/empty"),
    ("train --config demo --stage 1 --shards {t}/afile --out {t}/out", "{t}/afile"),
    ("train --config demo --stage 1 --shards {t}/empty --out {t}/out --max-steps -1", "--max-steps"),
    ("train --config demo --stage 1 --shards {t}/empty --out {t}/out --workers 0", "--workers"),
    ("train --config demo --stage 2 --shards {t}/empty --out {t}/out --init {t}/nope", "{t}/nope"),
    # sample
    (
        "sample --run {t}/nope --shards {t}/empty --subject 000 --sequence EXP-1-head --out {t}/out",
        "{t}/nope",
    ),
    (
        "sample --run {t}/empty --shards {t}/empty --subject 000 --sequence EXP-1-head --out {t}/out",
        "{t}/empty",
    ),
    (
        "sample --run {t}/empty --shards {t}/empty --subject 000 --sequence EXP-1-head --out {t}/out "
        "--config {t}/malformed.yaml",
        "{t}/malformed.yaml",
    ),
    # generate
    ("generate {t}/nope.yaml --out {t}/out", "{t}/nope.yaml"),
    ("generate {t}/malformed.yaml --out {t}/out", "{t}/malformed.yaml"),
    ("generate {t}/spec-invalid.yaml --out {t}/out", "{t}/spec-invalid.yaml"),
    ("generate {t}/spec-invalid.yaml --out {t}/out --workers 0", "--workers"),
    # recon
    ("recon {t}/nope --out {t}/out", "{t}/nope"),
    ("recon {t}/afile --out {t}/out", "{t}/afile"),
    ("recon {t}/empty --out {t}/out", "{t}/empty"),
    ("recon {t}/empty --out {t}/out --config {t}/malformed.yaml", "{t}/malformed.yaml"),
    ("recon {t}/empty --out {t}/out --config {t}/recon-invalid.yaml", "steps"),
    ("recon {t}/empty --out {t}/out --workers 0", "--workers"),
    # render
    ("render {t}/nope --cameras {t}/afile --out {t}/out", "{t}/nope"),
    ("render {t}/empty --cameras {t}/afile --out {t}/out", "{t}/empty"),
    ("render {t}/empty --cameras {t}/nope.json --out {t}/out", "{t}/nope.json"),
    ("render {t}/empty --cameras {t}/afile --out {t}/out --head-pose sideways", "--head-pose"),
    # eval
    ("eval --out {t}/out --gt {t}/nope --pred {t}/empty", "{t}/nope"),
    ("eval --out {t}/out --gt {t}/empty --pred {t}/nope", "{t}/nope"),
    ("eval --out {t}/out --gt {t}/empty --pred {t}/empty", "{t}/empty"),
    ("eval --out {t}/out --gt {t}/empty --pred {t}/empty --protocol sideways", "--protocol"),
    ("eval --out {t}/out --gt {t}/empty --pred {t}/empty --metrics psnr --metrics beauty", "beauty"),
    ("eval --out {t}/out --gt {t}/empty --pred {t}/empty --csim-backend magic", "--csim-backend"),
    ("eval --out {t}/out --gt {t}/empty --method nopath", "nopath"),
    ("eval --out {t}/out --gt {t}/empty --pred {t}/empty --workers 0", "--workers"),
    ("eval --out {t}/out --gt {t}/empty --pred {t}/empty --background 2", "--background"),
    # leaderboard
    ("leaderboard {t}/nope", "{t}/nope"),
    ("leaderboard {t}/empty", "{t}/empty"),
    ("leaderboard {t}/run", "{t}/run"),
    # submission
    ("submission {t}/nope --out {t}/out.zip", "{t}/nope"),
    ("submission {t}/empty --out {t}/out.zip", "{t}/empty"),
    # benchmark and demo
    ("benchmark {t}/nope.yaml --out {t}/out", "{t}/nope.yaml"),
    ("benchmark {t}/malformed.yaml --out {t}/out", "{t}/malformed.yaml"),
    ("benchmark {t}/bench-invalid.yaml --out {t}/out", "methods.0.kind"),
    ("benchmark benchmark-demo --out {t}/out --parallel 0", "--parallel"),
    ("benchmark benchmark-demo --out {t}/afile", "{t}/afile"),
    ("demo --out {t}/afile", "{t}/afile"),
    # doctor: reports missing weights rather than refusing them (test_doctor_and_configs); usage errors only
    ("doctor --fan-weight {t}/nope.pth", "--fan-weight"),
]


def test_every_command_is_in_the_table():
    covered = {line.split()[0] for line, _ in CASES}
    assert covered == set(COMMANDS)


@pytest.mark.parametrize(("line", "fragment"), CASES, ids=[line.split(" {t}")[0][:40] for line, _ in CASES])
def test_bad_input_is_one_message(inputs, line, fragment):
    args = line.format(t=inputs).split()
    start = time.perf_counter()
    result = runner.invoke(app, args)
    seconds = time.perf_counter() - start
    assert not isinstance(result.exception, RayStarted), f"{line}: Ray started before validation"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{line}: {type(result.exception).__name__}: {result.exception}"
    )
    assert result.exit_code == 2, f"{line}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output
    assert fragment.format(t=inputs) in result.stderr, f"{line}: {fragment!r} not in\n{result.stderr}"
    assert seconds < 10, f"{line}: {seconds:.1f} s"

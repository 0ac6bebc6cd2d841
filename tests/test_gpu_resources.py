"""Resources per stage: GPU requests reach every stage's workers, and a GPU that Ray gives but torch cannot see
stops the stage with one message. The GPU node is a Ray node that declares GPUs on this CPU machine
(``num_gpus=2``), started in a subprocess so that the session-wide embedded Ray of other tests stays CPU-only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from geodiff4d.cluster.benchmark import Benchmark, Subject
from geodiff4d.cluster.benchmark_config import load_benchmark_config
from geodiff4d.core.config import ConfigError
from geodiff4d.core.jobs import JobReport

TESTS = Path(__file__).resolve().parent

# Runs in a fresh process: a Ray node with 2 declared GPUs, then each stage asked for GPUs the default way
DECLARED_GPUS = """
import json, sys
from pathlib import Path

import ray
import ray.cloudpickle
import yaml
from typer.testing import CliRunner

sys.path.insert(0, {tests!r})
import gen_synthetic
from test_gen_train import tiny_config

from geodiff4d.cluster.cli import app
from geodiff4d.core.jobs import CommitLog, GpuNotVisible, WorkUnit, default_gpus_per_worker, run_units
from geodiff4d.gen.train import train


class Job:
    def setup(self):
        pass

    def run(self, unit):
        return {{}}


ray.cloudpickle.register_pickle_by_value(gen_synthetic)
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
tmp, result = Path({tmp!r}), {{"default_gpus": default_gpus_per_worker(None)}}
units = [WorkUnit(f"u{{i}}") for i in range(2)]
report = run_units(Job(), units, CommitLog(tmp / "commits"), workers=2, gpus_per_worker=result["default_gpus"])
result["units"] = report.failed
(tmp / "frames/rgb/s0").mkdir(parents=True)
recon = ["recon", str(tmp / "frames"), "--out", str(tmp / "avatars"), "--gpus-per-worker", "1"]
result["recon"] = CliRunner().invoke(app, recon).output
(tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_config().model_dump(mode="json")))
batches = gen_synthetic.make_batches_factory(2, 16, crop=16)
try:
    train(tmp / "tiny.yaml", 1, None, tmp / "run", max_steps=1, make_batches=batches, quiet=True)
except GpuNotVisible as error:
    result["train"] = str(error)
print("RESULT " + json.dumps(result))
"""


@pytest.mark.timeout(300)
def test_stages_ask_a_node_s_declared_gpus_and_stop_when_torch_cannot_see_them(tmp_path):
    script = DECLARED_GPUS.format(tests=str(TESTS), tmp=str(tmp_path))
    env = {**os.environ, "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=280, env=env, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["default_gpus"] == 1.0  # the cluster has GPUs: one per worker unless told otherwise
    seen = "but torch there sees 0 CUDA device(s)"
    # every unit actor got a GPU from Ray (its id is named) and stopped before its job's setup
    assert sorted(result["units"]) == ["u0", "u1"]
    for message in result["units"].values():
        assert (
            message.startswith("worker setup failed: GpuNotVisible: Ray gave a worker GPU ")
            and seen in message
        )
    assert "FAILED s0: worker setup failed: GpuNotVisible: Ray gave a worker GPU" in result["recon"]
    assert "Traceback" not in result["recon"]
    assert result["train"].startswith("Ray gave a worker GPU ") and seen in result["train"]


METHODS = [{"name": "geodiff4d", "kind": "geodiff4d"}, {"name": "copy", "kind": "reference_copy"}]
PROCEDURAL = {"procedural": {"subjects": 2, "sequences": 2, "frames": 16, "resolution": 64, "synthetic": 0}}


def _config(tmp_path: Path, generation: dict) -> Path:
    path = tmp_path / "bench.yaml"
    views = {"views": ["222200037"], "frames": 2}
    path.write_text(
        yaml.safe_dump({"data": PROCEDURAL, "methods": METHODS, "generation": {**views, **generation}})
    )
    return path


@pytest.mark.parametrize(
    ("generation", "train", "generate"),
    [
        ({}, (1, None), (1, None)),  # None: each stage asks for the cluster's GPUs (0 on a CPU cluster)
        (
            {
                "train_workers": 2,
                "train_gpus_per_worker": 1,
                "workers": 3,
                "gpus_per_worker": 0.5,
                "model_overrides": {"train": {"stage2": {"batch_size": 2}}},  # global: one clip per worker
            },
            (2, 1),
            (3, 0.5),
        ),
    ],
)
def test_the_benchmark_s_training_and_generate_stages_pass_their_resources(
    tmp_path, monkeypatch, generation, train, generate
):
    import geodiff4d.gen.generate
    import geodiff4d.gen.train

    calls: list[tuple[str, int, float | None]] = []
    monkeypatch.setattr(
        geodiff4d.gen.train,
        "train",
        lambda *args, workers, gpus_per_worker, **kw: calls.append(("train", workers, gpus_per_worker)),
    )
    monkeypatch.setattr(
        geodiff4d.gen.generate,
        "generate",
        lambda *args, workers, gpus_per_worker, **kw: (
            calls.append(("generate", workers, gpus_per_worker)) or JobReport()
        ),
    )
    config = load_benchmark_config(_config(tmp_path, generation))
    bench, method = Benchmark(config, tmp_path / "run"), config.methods[0]
    bench.train_model(method)
    bench.generate(method, [Subject("000", "SEQ", ())])
    assert calls == [
        ("train", *train),
        ("train", *train),
        ("generate", *generate),
    ]  # stages 1 and 2, generate


def test_the_benchmark_generates_every_subject_of_a_model_in_one_run(tmp_path, monkeypatch):
    """Each subject's generate stage runs one generate over all subjects whose frames are exported (so its actors
    load the model once for all of them: tests/test_generate.py counts the loads), after every export; before,
    each subject's stage ran a generate of its own subject, with new actors and a new model load."""
    import threading

    import geodiff4d.gen.generate
    from geodiff4d.core.io.json_yaml import read_yaml

    specs: list[list[str]] = []
    monkeypatch.setattr(
        geodiff4d.gen.generate,
        "generate",
        lambda spec, *args, **kw: (
            specs.append([e["name"] for e in read_yaml(spec)["subjects"]])
            or JobReport(failed={"001.f00000-00002.c000": "RuntimeError: boom"})
        ),
    )
    config = load_benchmark_config(_config(tmp_path, {}))
    bench, method = Benchmark(config, tmp_path / "run"), config.methods[0]
    subjects = [Subject(f"00{i}", "SEQ", ("TEST",)) for i in range(3)]
    for subject in subjects[:2]:  # the third subject's export has not been committed (it failed)
        bench.commits.commit(f"frames:{subject.id}", {})
    outcomes: dict[str, object] = {}

    def stage(subject: Subject) -> None:
        try:
            outcomes[subject.id] = bench.generate_stage(method, subject, subjects)
        except RuntimeError as error:
            outcomes[subject.id] = str(error)

    threads = [threading.Thread(target=stage, args=(s,)) for s in subjects[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert specs == [["000", "001"], ["000", "001"]]  # the second finds the first's units committed
    assert outcomes["000"] == {"frames": 2, "views": 1}  # 001's failed unit fails 001's stage only
    assert "001.f00000-00002.c000: RuntimeError: boom" in outcomes["001"]
    graph = bench.graph(subjects)
    stage = graph.stages[f"generate:{bench.generation_key(method)}:000"]
    assert set(stage.needs) >= {"frames:000"} and set(stage.waits_for) == {"frames:001", "frames:002"}


def test_training_workers_that_do_not_split_the_batch_are_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match=r"methods\[geodiff4d\]: generation.train_workers: .* by 3 worker"):
        load_benchmark_config(_config(tmp_path, {"train_workers": 3}))

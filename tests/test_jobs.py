"""Work-unit jobs: commit, resume, retry, failure reporting and a real worker kill."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from geodiff4d.core.io.json_yaml import write_json
from geodiff4d.core.jobs import (
    WAIT_FOR_AUTOSCALER,
    CommitLog,
    JobReport,
    UnitQueue,
    UnmeetableRequest,
    WorkUnit,
    run_units,
    worker_cpus,
)


class _WriteFiles:
    """Writes one file per unit; fails units listed in ``bad``; kills its own process on ``kill_once``."""

    def __init__(self, out: Path, bad: set[str] = frozenset(), kill_once: str | None = None):
        self.out, self.bad, self.kill_once = out, set(bad), kill_once

    def setup(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)

    def run(self, unit: WorkUnit) -> dict:
        if unit.id in self.bad:
            raise FileNotFoundError(f"input for {unit.id} is missing")
        flag = self.out / f".killed-{unit.id}"
        if unit.id == self.kill_once and not flag.exists():
            flag.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        write_json(self.out / f"{unit.id}.json", unit.payload)
        return {"value": unit.payload["value"]}


# Test-local job classes travel by value: Ray workers cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _units(n: int) -> list[WorkUnit]:
    return [WorkUnit(f"u{i:03d}", {"value": i}) for i in range(n)]


def test_runs_commits_and_resumes(local_ray, tmp_path):
    commits = CommitLog(tmp_path / "commits")
    report = run_units(_WriteFiles(tmp_path / "out"), _units(6), commits, workers=2, progress=False)
    assert sorted(report.completed) == [f"u{i:03d}" for i in range(6)] and report.ok
    assert commits.stats("u004") == {"value": 4}
    again = run_units(_WriteFiles(tmp_path / "out"), _units(6), commits, workers=2, progress=False)
    assert again.completed == [] and len(again.skipped) == 6


def test_failed_unit_is_reported_and_others_complete(local_ray, tmp_path):
    commits = CommitLog(tmp_path / "commits")
    job = _WriteFiles(tmp_path / "out", bad={"u002"})
    report = run_units(job, _units(4), commits, workers=2, max_retries=1, progress=False)
    assert not report.ok and list(report.failed) == ["u002"]
    assert "input for u002 is missing" in report.failed["u002"]
    assert sorted(report.completed) == ["u000", "u001", "u003"]
    assert not commits.is_committed("u002")
    assert "FAILED u002" in report.summary()


def test_killed_worker_is_replaced_and_unit_retried(local_ray, tmp_path):
    commits = CommitLog(tmp_path / "commits")
    job = _WriteFiles(tmp_path / "out", kill_once="u001")
    report = run_units(job, _units(3), commits, workers=1, max_retries=2, progress=False)
    assert report.ok and sorted(report.completed) == ["u000", "u001", "u002"]
    assert (tmp_path / "out" / ".killed-u001").exists()
    assert json.loads((tmp_path / "out" / "u001.json").read_text()) == {"value": 1}


@ray.remote(num_cpus=1)
class _Capacity:
    """Holds a CPU: the share of the cluster that went away with a dead node."""

    def ready(self) -> bool:
        return True


class _DieWithItsNode(_WriteFiles):
    """On ``kill_once``, takes a CPU away from the cluster (a detached actor claims it) as its process dies,
    as when a whole node is lost: its replacement finds no free CPU until another worker gives its back."""

    def run(self, unit: WorkUnit) -> dict:
        flag = self.out / f".killed-{unit.id}"
        if unit.id == self.kill_once and not flag.exists():
            flag.touch()
            _Capacity.options(name="lost-node", lifetime="detached").remote()  # waits for this worker's CPU
            time.sleep(1)  # the claim reaches the raylet before this worker's CPU comes free
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(unit)


@pytest.mark.timeout(180)
def test_worker_lost_with_its_node_is_replaced_once_others_are_done(local_ray, tmp_path):
    """Two workers take both CPUs; one dies and its CPU is gone: the replacement runs once the other worker,
    with nothing left to do, gives its CPU back (an idle worker that kept it would hang the job)."""
    commits = CommitLog(tmp_path / "commits")
    try:
        report = run_units(
            _DieWithItsNode(tmp_path / "out", kill_once="u001"),
            _units(4),
            commits,
            workers=2,
            cpus_per_worker=1,
            progress=False,
        )
        assert ray.get(ray.get_actor("lost-node").ready.remote(), timeout=10)  # the CPU really was taken
    finally:
        ray.kill(ray.get_actor("lost-node"))
    assert report.ok and sorted(report.completed) == [u.id for u in _units(4)]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == [f"{u.id}.json" for u in _units(4)]


def _hand_out(units: list[WorkUnit], actors: int, seed: int, fail: str | None = None) -> dict[int, list[str]]:
    """Drive a UnitQueue as run_units does, finishing a random in-flight unit each step: actor -> unit ids run."""
    rng = np.random.default_rng(seed)
    queue, idle, in_flight, last = UnitQueue(units), list(range(actors)), {}, {}
    ran: dict[int, list[str]] = {actor: [] for actor in range(actors)}
    while queue or in_flight:
        while queue and idle:
            actor = idle.pop()
            last[actor] = in_flight[actor] = queue.take(last.get(actor), list(in_flight.values()))
            ran[actor].append(last[actor].id)
        actor = list(in_flight)[rng.integers(len(in_flight))]
        unit = in_flight.pop(actor)
        if unit.id == fail:
            fail = None
            queue.put_back(unit)
        idle.append(actor)
    return ran


def test_the_unit_queue_hands_each_actor_a_contiguous_run():
    """Neighbouring units share an actor's state (a decoder at the next frame), so actors walk runs; every
    unit runs exactly once, a failed one once more; one actor runs them in order."""
    units = [WorkUnit(f"u{i:02d}") for i in range(40)]
    assert _hand_out(units, 1, 0)[0] == [u.id for u in units]
    for seed in range(20):
        ran = _hand_out(units, 3, seed, fail="u07")
        ids = sorted(sum(ran.values(), []))
        assert ids == sorted([u.id for u in units] + ["u07"])
        breaks = sum(
            int(b[1:]) != int(a[1:]) + 1
            for order in ran.values()
            for a, b in zip(order, order[1:], strict=False)
        )
        assert breaks <= 8, ran  # each actor starts a run a few times (halving), not once per unit
    firsts = sorted(order[0] for order in _hand_out(units[:10], 2, 0).values())
    assert firsts == ["u00", "u05"]  # the second actor starts halfway, not at the first actor's next unit


def test_duplicate_unit_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_units(_WriteFiles(tmp_path), [WorkUnit("a"), WorkUnit("a")], CommitLog(tmp_path))


def test_report_ok_flag():
    assert JobReport().ok and not JobReport(failed={"x": "boom"}).ok


class _ReportThreads:
    """Returns the torch threads its actor runs with."""

    def setup(self) -> None:
        pass

    def run(self, unit: WorkUnit) -> dict:
        import torch

        return {"threads": torch.get_num_threads()}


@pytest.mark.parametrize(("workers", "cpus", "threads"), [(1, None, 2), (2, None, 1), (1, 1, 1)])
def test_actor_threads_equal_the_cpus_ray_gives_it(local_ray, tmp_path, workers, cpus, threads):
    """Local Ray has 2 CPUs: one worker gets both (and 2 torch threads), two share them, or as requested."""
    commits = CommitLog(tmp_path / "commits")
    report = run_units(
        _ReportThreads(), _units(2), commits, workers=workers, cpus_per_worker=cpus, progress=False
    )
    assert report.ok
    assert [commits.stats(u.id)["threads"] for u in _units(2)] == [threads, threads]


def test_more_cpus_per_worker_than_a_node_has_is_refused(local_ray, tmp_path):
    with pytest.raises(ValueError, match="--cpus-per-worker 3"):
        run_units(_ReportThreads(), _units(1), CommitLog(tmp_path / "c"), cpus_per_worker=3, progress=False)


@pytest.mark.timeout(60)  # Ray itself waits forever for a node with a GPU
def test_a_gpu_request_no_node_can_meet_stops_at_once_naming_it(local_ray, tmp_path):
    started = time.monotonic()
    with pytest.raises(UnmeetableRequest) as error:
        run_units(_ReportThreads(), _units(1), CommitLog(tmp_path / "c"), gpus_per_worker=1, progress=False)
    assert time.monotonic() - started < 30
    assert str(error.value).startswith("--gpus-per-worker 1: no node of the Ray cluster has that many")
    assert "it has 1 node with 2 CPUs and 0 GPUs" in str(error.value) and "--wait-for-autoscaler" in str(
        error.value
    )


@pytest.mark.timeout(60)
def test_the_cli_stops_an_unmeetable_request_with_one_message(local_ray, tmp_path):
    from typer.testing import CliRunner

    from geodiff4d.cluster.cli import app

    (tmp_path / "frames/rgb/s0").mkdir(parents=True)
    args = ["recon", str(tmp_path / "frames"), "--out", str(tmp_path / "avatars"), "--gpus-per-worker", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        "geodiff4d recon: --gpus-per-worker 1: no node of the Ray cluster has that many per worker; it has 1 "
        "node with 2 CPUs and 0 GPUs (run `geodiff4d --wait-for-autoscaler ...` if an autoscaler adds such nodes)"
    ]


def test_wait_for_autoscaler_lets_a_request_no_node_has_wait(local_ray, monkeypatch):
    from typer.testing import CliRunner

    from geodiff4d.cluster.cli import app

    monkeypatch.setenv(WAIT_FOR_AUTOSCALER, "0")  # restored (unset) after the test
    with pytest.raises(UnmeetableRequest, match="--cpus-per-worker 4 with --gpus-per-worker 1"):
        worker_cpus(1, 4, 1)
    CliRunner().invoke(app, ["--wait-for-autoscaler", "leaderboard", "/nonexistent"])
    assert worker_cpus(1, 4, 1) == 4  # the option holds the request for a node an autoscaler adds
    assert worker_cpus(2, None, 1) == 1  # sized by today's nodes (2 CPUs) meanwhile


class _NoWeights(_WriteFiles):
    """A job whose setup fails (as with missing weights); each setup call leaves a file behind."""

    def setup(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"setup-{os.getpid()}").touch()
        raise FileNotFoundError(f"no weights at {self.out / 'model.onnx'}")


def test_a_job_whose_setup_fails_names_the_error_per_unit_without_retries(local_ray, tmp_path):
    job = _NoWeights(tmp_path / "out")
    report = run_units(
        job, _units(3), CommitLog(tmp_path / "commits"), workers=1, max_retries=2, progress=False
    )
    assert sorted(report.failed) == ["u000", "u001", "u002"] and not report.completed
    expected = f"worker setup failed: FileNotFoundError: no weights at {tmp_path / 'out' / 'model.onnx'}"
    assert set(report.failed.values()) == {expected}
    assert "creation task" not in report.summary() and "died" not in report.summary()
    assert len(list((tmp_path / "out").glob("setup-*"))) == 1  # one actor, set up once: no unit was retried

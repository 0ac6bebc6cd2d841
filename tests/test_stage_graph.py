"""The benchmark's stage graph: order, commits, resume, and what a failure blocks."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from geodiff4d.core.jobs import CommitLog
from geodiff4d.core.stage_graph import StageGraph


def _graph(tmp_path, calls, fail=()):
    lock = threading.Lock()

    def stage(name):
        def run():
            with lock:
                calls.append(name)
            if name in fail:
                raise ValueError(f"{name} broke")
            return {"name": name}

        return run

    graph = StageGraph(CommitLog(tmp_path / "state"), echo=lambda _: None)
    graph.add("data", stage("data"))
    for subject in ("a", "b"):
        graph.add(f"avatar:{subject}", stage(f"avatar:{subject}"), needs=["data"])
        graph.add(f"render:{subject}", stage(f"render:{subject}"), needs=[f"avatar:{subject}"])
    graph.add("eval", stage("eval"), needs=["data"], after=["render:a", "render:b"])
    return graph


def _recorder(
    calls: list[str], outputs: dict[str, Path] | None = None
) -> Callable[[str], Callable[[], dict]]:
    """Stage functions that append their stage's name to ``calls`` and create its folder in ``outputs``, if any."""

    def stage(name: str) -> Callable[[], dict]:
        def run() -> dict:
            calls.append(name)
            if outputs and name in outputs:
                outputs[name].mkdir(parents=True, exist_ok=True)
            return {}

        return run

    return stage


def test_stages_run_after_their_needs_and_once(tmp_path):
    calls = []
    report = _graph(tmp_path, calls).run(parallel=2)
    assert report.ok and sorted(report.done) == sorted(calls) and len(calls) == 6
    assert calls[0] == "data" and calls[-1] == "eval"
    assert calls.index("avatar:a") < calls.index("render:a")
    calls.clear()
    again = _graph(tmp_path, calls).run(parallel=2)
    assert calls == [] and len(again.skipped) == 6


def test_a_failure_blocks_only_its_chain_and_evaluation_stays_uncommitted(tmp_path):
    calls = []
    report = _graph(tmp_path, calls, fail={"avatar:b"}).run(parallel=2)
    assert set(report.failed) == {"avatar:b"} and report.blocked == {"render:b": "avatar:b"}
    assert "render:a" in report.done and "eval" in calls  # eval scores what exists ...
    assert report.partial == ["eval"] and not report.ok  # ... but is not committed
    calls.clear()
    fixed = _graph(tmp_path, calls).run(parallel=2)  # the rerun does only what was not committed
    assert sorted(calls) == ["avatar:b", "eval", "render:b"] and fixed.ok


def test_a_deleted_output_reruns_its_stage_and_what_reads_it_only(tmp_path):
    outputs = {name: tmp_path / "out" / name.replace(":", "_") for name in ("avatar:a", "avatar:b")}
    cleaned, calls = [], []

    def build():
        graph = StageGraph(CommitLog(tmp_path / "state"), echo=lambda _: None)
        stage = _recorder(calls, outputs)
        graph.add("data", stage("data"))
        for subject in ("a", "b"):
            name = f"avatar:{subject}"
            graph.add(
                name,
                stage(name),
                needs=["data"],
                outputs=[outputs[name]],
                clean=lambda n=name: cleaned.append(n),
            )
            graph.add(f"render:{subject}", stage(f"render:{subject}"), needs=[name])
        graph.add("eval", stage("eval"), after=["render:a", "render:b"])
        return graph

    assert build().run(parallel=1).ok and len(calls) == 6
    calls.clear()
    outputs["avatar:b"].rmdir()  # one variant's outputs deleted by hand
    report = build().run(parallel=1)
    assert sorted(calls) == ["avatar:b", "eval", "render:b"] and cleaned == ["avatar:b"], calls
    assert report.ok and sorted(report.skipped) == ["avatar:a", "data", "render:a"]
    calls.clear()
    assert build().run(parallel=1).ok and calls == []


def test_waits_for_orders_without_reading(tmp_path):
    """An oracle reconstruction waits for training (it would queue behind its CPUs) but does not read it: it
    starts after the training finished however it ended, and neither reruns with it nor fails with it."""
    calls, marker = [], tmp_path / "model"

    def build(fail=()):
        graph = StageGraph(CommitLog(tmp_path / "state"), echo=lambda _: None)

        def stage(name):
            def run():
                calls.append(name)
                if name in fail:
                    raise ValueError(f"{name} broke")
                if name == "model":
                    marker.mkdir(exist_ok=True)
                return {}

            return run

        graph.add("model", stage("model"), outputs=[marker])
        graph.add("oracle", stage("oracle"), waits_for=["model"])
        return graph

    failed = build(fail={"model"}).run(parallel=2)
    assert calls == ["model", "oracle"] and set(failed.failed) == {"model"} and "oracle" in failed.done
    calls.clear()
    assert build().run(parallel=2).ok and calls == ["model"]
    calls.clear()
    marker.rmdir()  # the model is recomputed; the oracle is not
    assert build().run(parallel=2).ok and calls == ["model"]


def test_changed_input_files_rerun_their_stage_and_what_reads_it(tmp_path):
    """A stage reading a capture root records the files' digest: re-downloaded, touched or added files make it
    run again (its old outputs cleaned first) with everything downstream; unchanged files resume."""
    import os

    from geodiff4d.core.io.file_digest import files_digest, files_under

    root = tmp_path / "captures" / "a"
    root.mkdir(parents=True)
    (root / "cam_1.mp4").write_bytes(b"video")
    cleaned, calls = [], []

    def build():
        graph = StageGraph(CommitLog(tmp_path / "state"), echo=lambda _: None)
        stage = _recorder(calls)
        graph.add(
            "frames:a",
            stage("frames:a"),
            clean=lambda: cleaned.append("frames:a"),
            inputs=lambda: files_digest(files_under(root)),
        )
        graph.add("frames:b", stage("frames:b"))
        graph.add("avatar:a", stage("avatar:a"), needs=["frames:a"])
        graph.add("eval", stage("eval"), after=["avatar:a", "frames:b"])
        return graph

    assert build().run(parallel=1).ok and len(calls) == 4
    calls.clear()
    assert build().run(parallel=1).ok and calls == []  # the same files: nothing runs
    video = root / "cam_1.mp4"
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))  # re-downloaded
    assert build().run(parallel=1).ok
    assert calls == ["frames:a", "avatar:a", "eval"] and cleaned == ["frames:a"], calls
    calls.clear()
    (root / "cam_2.mp4").write_bytes(b"another camera")  # a file added
    assert build().run(parallel=1).ok and calls == ["frames:a", "avatar:a", "eval"]
    calls.clear()
    assert build().run(parallel=1).ok and calls == []


def test_a_file_digest_sees_size_time_and_presence_not_the_listing_order(tmp_path):
    from geodiff4d.core.io.file_digest import files_digest

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    first = files_digest([a, b])
    assert files_digest([b, a, a]) == first
    a.write_bytes(b"11")  # another size
    assert files_digest([a, b]) != first
    b.unlink()  # a file gone
    assert files_digest([a, b]) != files_digest([a])

"""A graph of committed stages: each starts as soon as the stages it needs are committed.

The benchmark is many small chains (one per method and subject) that meet at evaluation. Running them as a
graph keeps a cluster busy (subject B's reconstruction does not wait for subject A's generation), and a stage's
commit marker makes a rerun skip it, so a killed run resumes where it stopped. A committed stage whose outputs
are gone (deleted by hand to recompute them) runs again, and so does everything downstream of a stage that runs:
deleting one variant's folders recomputes that variant and what reads it, nothing else. The heavy work inside a stage
runs on Ray (actors, Ray Train); the graph itself only orders and commits, from driver threads. A stage that
reads files from outside the run (a capture root) keeps their digest in its marker and runs again, with everything
downstream, when they changed.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geodiff4d.core.jobs import CommitLog

INPUTS_KEY = "inputs_sha256"  # a marker's digest of the stage's input files


@dataclass(frozen=True)
class Stage:
    name: str  # unique; also its commit marker's name
    run: Callable[[], dict[str, Any]]  # does the work (idempotent, resumable inside), returns stats to commit
    needs: tuple[str, ...] = ()  # must be committed first; a failure there blocks this stage
    after: tuple[str, ...] = ()  # must have finished first, successfully or not (evaluation of what exists)
    waits_for: tuple[str, ...] = ()  # only ordering: starts after these finished; never reruns with them
    outputs: tuple[Path, ...] = ()  # what it writes: a committed stage with one of them missing runs again
    clean: Callable[[], None] | None = None  # drops its stale outputs before a committed stage runs again
    # digest of the files it reads from outside the run (core.io.file_digest), kept in its marker: a committed
    # stage whose inputs changed since it ran runs again
    inputs: Callable[[], str] | None = None


@dataclass
class GraphReport:
    done: list[str] = field(default_factory=list)  # committed by this run
    skipped: list[str] = field(default_factory=list)  # committed before
    failed: dict[str, str] = field(default_factory=dict)  # stage -> error
    blocked: dict[str, str] = field(default_factory=dict)  # stage -> the failed stage it needed
    partial: list[str] = field(
        default_factory=list
    )  # ran over incomplete inputs: not committed, rerun next time

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked and not self.partial

    def summary(self) -> str:
        lines = [
            f"{len(self.done)} stages run, {len(self.skipped)} already committed, "
            f"{len(self.failed)} failed, {len(self.blocked)} not run, {len(self.partial)} partial"
        ]
        lines += [f"  FAILED {name}: {error}" for name, error in self.failed.items()]
        lines += [
            f"  partial {name}: ran without some of its inputs; a rerun completes it" for name in self.partial
        ]
        lines += [f"  not run {name}: needs {cause}" for name, cause in self.blocked.items()]
        return "\n".join(lines)


class StageGraph:
    def __init__(self, commits: CommitLog, echo: Callable[[str], None] = print):
        self.commits, self.echo, self.stages = commits, echo, {}

    def add(
        self,
        name: str,
        run: Callable[[], dict[str, Any]],
        needs: tuple[str, ...] | list[str] = (),
        after: tuple[str, ...] | list[str] = (),
        outputs: tuple[Path, ...] | list[Path] = (),
        clean: Callable[[], None] | None = None,
        waits_for: tuple[str, ...] | list[str] = (),
        inputs: Callable[[], str] | None = None,
    ) -> str:
        if name in self.stages:
            raise ValueError(f"stage {name!r} added twice")
        missing = [n for n in (*needs, *after, *waits_for) if n not in self.stages]
        if missing:
            raise ValueError(f"stage {name!r} needs stages not added before it: {missing}")
        self.stages[name] = Stage(
            name, run, tuple(needs), tuple(after), tuple(waits_for), tuple(outputs), clean, inputs
        )
        return name

    def stale(self) -> dict[str, str]:
        """Committed stages that must run again -> why: an output is missing, the files they read from outside
        the run changed, or a stage they read runs again (stages are added in dependency order, so one pass sees
        every cause first)."""
        reruns: dict[str, str] = {}
        for stage in self.stages.values():
            if not self.commits.is_committed(stage.name):
                continue
            missing = next((path for path in stage.outputs if not path.exists()), None)
            upstream = next(
                (n for n in (*stage.needs, *stage.after) if n in reruns or not self.commits.is_committed(n)),
                None,
            )
            if missing is not None:
                reruns[stage.name] = f"output {missing} is missing"
            elif self._inputs_changed(stage):
                reruns[stage.name] = "the files it read changed since it ran"
            elif upstream is not None:
                reruns[stage.name] = f"{upstream} runs again"
        return reruns

    def _inputs_changed(self, stage: Stage) -> bool:
        """Whether a committed stage's input files differ from those its marker recorded (none recorded: they
        may)."""
        return stage.inputs is not None and stage.inputs() != self.commits.stats(stage.name).get(INPUTS_KEY)

    def run(self, parallel: int = 2) -> GraphReport:
        """Run every uncommitted stage once its needs are committed; a failure blocks only its dependents."""
        report = GraphReport()
        for (
            name,
            why,
        ) in self.stale().items():  # uncommitted first: a killed rerun must not leave them skippable
            self.echo(f"[{name}] committed, but {why}: running it again")
            self.commits.marker(name).unlink()
            if self.stages[name].clean is not None:
                self.stages[name].clean()
        pending = dict(self.stages)
        for name in list(pending):
            if self.commits.is_committed(name):
                del pending[name]
                report.skipped.append(name)
        committed = set(report.skipped)
        finished_names = set(committed)  # committed, failed or blocked
        running: dict[Future, Stage] = {}
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="stage") as pool:
            while pending or running:
                for stage in list(pending.values()):
                    cause = next((n for n in stage.needs if n in report.failed or n in report.blocked), None)
                    if cause is not None:
                        report.blocked[stage.name] = report.blocked.get(cause, cause)
                        finished_names.add(stage.name)
                        del pending[stage.name]
                    elif (
                        all(n in committed for n in stage.needs)
                        and all(n in finished_names for n in (*stage.after, *stage.waits_for))
                        and len(running) < max(1, parallel)
                    ):
                        self.echo(f"[{stage.name}] running")
                        running[pool.submit(self._timed, stage)] = stage
                        del pending[stage.name]
                if not running:
                    continue
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    stage = running.pop(future)
                    try:
                        stats = future.result()
                    except Exception as error:  # noqa: BLE001 - reported per stage; dependents are blocked
                        report.failed[stage.name] = _describe(error)
                        finished_names.add(stage.name)
                        self.echo(f"[{stage.name}] FAILED: {report.failed[stage.name]}")
                        continue
                    finished_names.add(stage.name)
                    if not all(n in committed for n in stage.after):
                        report.partial.append(stage.name)
                        self.echo(f"[{stage.name}] ran over incomplete inputs; not committed")
                        continue
                    self.commits.commit(stage.name, stats)
                    committed.add(stage.name)
                    report.done.append(stage.name)
                    self.echo(f"[{stage.name}] done in {stats['seconds']} s")
        return report

    @staticmethod
    def _timed(stage: Stage) -> dict[str, Any]:
        """Run the stage -> its stats, with its seconds and the digest of its inputs as they were before it ran
        (a file changed while it ran then counts as changed on the next run)."""
        inputs = stage.inputs() if stage.inputs is not None else None
        start = time.perf_counter()
        stats = dict(stage.run() or {})
        stats["seconds"] = round(time.perf_counter() - start, 1)
        if inputs is not None:
            stats[INPUTS_KEY] = inputs
        return stats


def _describe(error: Exception) -> str:
    """The error's own message for errors raised on purpose; the last frames too for bugs."""
    if isinstance(error, (ValueError, FileNotFoundError, RuntimeError)):
        return f"{type(error).__name__}: {error}"
    return "".join(traceback.format_exception(error, limit=-3)).strip()

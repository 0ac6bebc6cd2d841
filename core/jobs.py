"""Work-unit jobs on Ray actors: a queue of units, retries, atomic commit markers and resume.

A job is any picklable object with ``setup()`` (once per actor: load models, open files) and
``run(unit) -> stats``. ``run`` writes its outputs atomically (temp name + rename); the driver then
writes the unit's commit marker. A rerun skips committed units, so an interrupted job resumes and a
finished job does no work. A unit whose worker raises or dies is retried on a fresh actor up to
``max_retries`` times and then reported, never silently dropped. Once no unit is left to hand out, idle
actors are released: a replacement for an actor lost with its node may need their resources. A job whose
``setup`` raises (missing weights, a bad setting) fails each unit once with that message: it would fail the
same way on any actor.

Every actor of every stage gets its CPUs by one rule (:func:`worker_cpus`) and runs exactly that many
torch threads (:func:`use_cpus`), so one worker on a laptop uses every core and several never oversubscribe.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm.auto import tqdm

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.json_yaml import read_json, write_json


@dataclass(frozen=True)
class WorkUnit:
    """One independently committable piece of work (a shard, a subject, a sequence)."""

    id: str
    payload: dict[str, Any] = field(default_factory=dict)


class UnitJob(Protocol):
    def setup(self) -> None: ...

    def run(self, unit: WorkUnit) -> dict[str, Any]: ...


@dataclass
class JobReport:
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    nodes: Counter[str] = field(default_factory=Counter)  # Ray node id -> units it completed in this run

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"{len(self.completed)} done, {len(self.skipped)} already committed, {len(self.failed)} failed"
        ]
        if self.nodes:
            lines.append(
                "units per node: " + ", ".join(f"{node}={n}" for node, n in sorted(self.nodes.items()))
            )
        lines += [f"  FAILED {unit_id}: {error}" for unit_id, error in sorted(self.failed.items())]
        return "\n".join(lines)


class CommitLog:
    """Commit markers ``{unit_id}.stats.json`` in one folder; a marker means the unit's outputs are final."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @staticmethod
    def marker_name(unit_id: str) -> str:
        return f"{unit_id}.stats.json"

    def marker(self, unit_id: str) -> Path:
        return self.folder / self.marker_name(unit_id)

    def is_committed(self, unit_id: str) -> bool:
        return self.marker(unit_id).is_file()

    def commit(self, unit_id: str, stats: dict[str, Any]) -> None:
        write_json(self.marker(unit_id), stats)

    def stats(self, unit_id: str) -> dict[str, Any]:
        return read_json(self.marker(unit_id))


WAIT_FOR_AUTOSCALER = "GEODIFF4D_WAIT_FOR_AUTOSCALER"  # "1": requests no node has may wait for new nodes


class UnmeetableRequest(UserError, ValueError):
    """Resources per worker that no node of the cluster has: Ray would wait forever for such a node."""


def waits_for_autoscaler() -> bool:
    """Whether requests no node has wait for an autoscaler (``geodiff4d --wait-for-autoscaler``) instead of
    failing at once."""
    return os.environ.get(WAIT_FOR_AUTOSCALER, "") not in ("", "0")


def _alive_nodes() -> list[dict[str, float]]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _offer(nodes: list[dict[str, float]]) -> str:
    """What the cluster's nodes offer, e.g. "1 node with 2 CPUs and 0 GPUs"."""
    kinds = Counter((node.get("CPU", 0.0), node.get("GPU", 0.0)) for node in nodes)
    return ", ".join(
        f"{n} node{'s' * (n > 1)} with {cpus:g} CPUs and {gpus:g} GPUs"
        for (cpus, gpus), n in sorted(kinds.items())
    )


def worker_cpus(workers: int, requested: float | None = None, gpus: float = 0) -> float:
    """CPUs each of ``workers`` actors asks Ray for: ``requested``, else the CPUs of the nodes with ``gpus``
    GPUs divided by the workers (at most one such node's CPUs, at least one). Needs a connected Ray.

    A request that no node can meet (more CPUs or GPUs per worker than any node has) raises
    :class:`UnmeetableRequest` naming it and what the cluster offers, unless :func:`waits_for_autoscaler`:
    Ray itself would wait for such a node forever."""
    if requested is not None and requested <= 0:
        raise UnmeetableRequest(f"--cpus-per-worker {requested}: must be positive")
    nodes = _alive_nodes()
    fitting = [n.get("CPU", 0.0) for n in nodes if n.get("GPU", 0.0) >= gpus]
    fitting = [cpus for cpus in fitting if requested is None or cpus >= requested]
    if not fitting and not waits_for_autoscaler():
        asked = [f"--cpus-per-worker {requested:g}"] if requested is not None else []
        asked += [f"--gpus-per-worker {gpus:g}"] if gpus else []
        raise UnmeetableRequest(
            f"{' with '.join(asked) or 'a worker (1 CPU)'}: no node of the Ray cluster has that many per worker; "
            f"it has {_offer(nodes) or 'no live node'} (run `geodiff4d --wait-for-autoscaler ...` if an "
            f"autoscaler adds such nodes)"
        )
    if requested is not None:
        return float(requested)
    fitting = fitting or [n.get("CPU", 0.0) for n in nodes]  # waiting for new nodes: size by today's
    total = sum(fitting) or float(os.cpu_count() or 1)
    largest = max(fitting, default=total)
    return float(max(1, min(int(total // max(1, workers)), int(largest))))


def default_gpus_per_worker(requested: float | None) -> float:
    """GPUs per worker of a stage that uses them: ``requested``, else one when a live node has a GPU, else 0
    (the CPU). Needs a connected Ray."""
    if requested is not None:
        return float(requested)
    return 1.0 if any(node.get("GPU", 0.0) >= 1 for node in _alive_nodes()) else 0.0


class GpuNotVisible(UserError):
    """Ray gave a worker GPUs that torch cannot see: the node declares GPUs it lacks, or torch has no CUDA."""


def check_gpus_visible() -> None:
    """In a worker: one message when torch cannot see the GPUs Ray gave it, instead of a CUDA traceback at the
    first tensor moved there (or a stage quietly running on the CPU)."""
    given = ray.get_gpu_ids()
    if not given:
        return
    import torch

    seen = torch.cuda.device_count()
    if seen < len(given):
        raise GpuNotVisible(
            f"Ray gave a worker GPU {', '.join(map(str, given))} on node {ray.util.get_node_ip_address()}, "
            f"but torch there sees {seen} CUDA device(s) (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda or 'none'}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
            f"the node declares GPUs it does not have (ray start --num-gpus), or torch was built without CUDA"
        )


def check_workers_see_gpus(cpus: float, gpus: float) -> None:
    """From the driver, before workers that are not unit actors (Ray Train's) start: one task with a worker's
    resources runs :func:`check_gpus_visible` and raises its :class:`GpuNotVisible` here."""
    if not gpus:
        return
    probe = ray.remote(check_gpus_visible).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    try:
        ray.get(probe.remote())
    except RayTaskError as error:
        if isinstance(error.cause, GpuNotVisible):
            raise GpuNotVisible(str(error.cause)) from None
        raise


def use_cpus(cpus: float) -> int:
    """Run torch (and OpenCV, where loaded) with as many threads as the CPUs Ray granted; returns the count."""
    import sys

    import torch

    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(threads)
    return threads


class SetupFailed(Exception):
    """The job's ``setup`` raised on an actor; the text is the original error. Not retried."""


@ray.remote
class _UnitWorker:
    def __init__(self, job: UnitJob, cpus: float):
        # a constructor that raises leaves Ray's "actor died ... creation task" for every call, retried as a
        # dead worker: keep the error and answer each unit with it instead
        self.setup_error: str | None = None
        try:
            check_gpus_visible()
            use_cpus(cpus)
            self.job = job
            self.job.setup()
        except Exception as error:  # noqa: BLE001 - reported per unit by run()
            self.setup_error = f"{type(error).__name__}: {error}"

    def pid(self) -> int:
        return os.getpid()

    def run(self, unit: WorkUnit) -> tuple[dict[str, Any], str]:
        """The unit's stats and the id of the node that produced them."""
        if self.setup_error is not None:
            raise SetupFailed(self.setup_error)
        return self.job.run(unit), ray.get_runtime_context().get_node_id()


def _setup_failed(error: Exception) -> bool:
    return isinstance(error, RayTaskError) and isinstance(error.cause, SetupFailed)


def _error_text(error: Exception) -> str:
    if _setup_failed(error):
        return f"worker setup failed: {error.cause}"
    if isinstance(error, RayTaskError):
        cause = error.cause if error.cause is not None else error
        return f"{type(cause).__name__}: {cause}"
    if isinstance(error, RayActorError):
        return f"worker died: {error}".splitlines()[0]
    return f"{type(error).__name__}: {error}"


class UnitQueue:
    """Units waiting to run, handed out so that each actor walks a contiguous run of the job's order.

    Neighbouring units share what an actor keeps between them (a video decoder already at the next frame, a
    loaded model), so a run costs less than the same units scattered over actors. An actor takes the unit
    after its last one while that waits; otherwise the first unit of the longest waiting run, or the middle
    of that run when an actor with a unit in flight is about to walk into it. One actor gets plain job order.
    """

    def __init__(self, units: Sequence[WorkUnit]) -> None:
        self.index = {unit.id: i for i, unit in enumerate(units)}
        self.waiting: dict[int, WorkUnit] = dict(enumerate(units))

    def __len__(self) -> int:
        return len(self.waiting)

    def put_back(self, unit: WorkUnit) -> None:
        """A unit to run again (a failed attempt)."""
        self.waiting[self.index[unit.id]] = unit

    def take(self, after: WorkUnit | None, in_flight: Sequence[WorkUnit]) -> WorkUnit:
        """The next unit for an actor whose last unit was ``after`` (None: a fresh actor)."""
        if after is not None and self.index[after.id] + 1 in self.waiting:
            return self.waiting.pop(self.index[after.id] + 1)
        start, length = self._longest_run()
        walking = {self.index[unit.id] for unit in in_flight}
        chosen = start + length // 2 if start - 1 in walking else start
        return self.waiting.pop(chosen)

    def _longest_run(self) -> tuple[int, int]:
        """(first index, length) of the longest run of consecutive waiting units; the earliest on ties."""
        best, start, previous = (0, 0), None, None
        for i in sorted(self.waiting):
            if previous is None or i != previous + 1:
                start = i
            previous = i
            if i - start + 1 > best[1]:
                best = (start, i - start + 1)
        return best


class _WorkerPool:
    """Ray actors running one job: idle ones, and those with a unit in flight."""

    def __init__(self, job: UnitJob, workers: int, cpus: float, gpus: float) -> None:
        self.job, self.cpus = job, cpus
        # SPREAD: one node's loss takes the fewest workers with it, and every node's disks and NICs get used
        self.options = {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "max_restarts": 0,
            "scheduling_strategy": "SPREAD",
        }
        self.idle = [self.new_worker() for _ in range(workers)]
        self.in_flight: dict[Any, tuple[Any, WorkUnit]] = {}
        self.last: dict[Any, WorkUnit] = {}  # actor -> the unit it ran last

    def new_worker(self) -> Any:
        """Start one actor."""
        return _UnitWorker.options(**self.options).remote(self.job, self.cpus)

    def dispatch(self, queue: UnitQueue) -> None:
        """Hand queued units to idle actors; release the idle ones once none is left."""
        while queue and self.idle:
            worker = self.idle.pop()
            unit = queue.take(self.last.get(worker), [unit for _, unit in self.in_flight.values()])
            self.last[worker] = unit
            self.in_flight[worker.run.remote(unit)] = (worker, unit)
        if not queue:  # nothing left to hand out: idle workers give their CPUs back, which a replacement
            for worker in self.idle:  # for a worker lost with its node may be waiting for (else: a deadlock)
                ray.kill(worker, no_restart=True)
            self.idle.clear()

    def next_done(self) -> tuple[Any, Any, WorkUnit]:
        """Wait for the next finished unit: its result reference, actor and unit."""
        done, _ = ray.wait(list(self.in_flight), num_returns=1)
        worker, unit = self.in_flight.pop(done[0])
        return done[0], worker, unit

    def close(self) -> None:
        """Kill every actor, idle or busy."""
        for worker in self.idle + [w for w, _ in self.in_flight.values()]:
            ray.kill(worker, no_restart=True)


def _pending_units(units: Sequence[WorkUnit], commits: CommitLog, report: JobReport) -> list[WorkUnit]:
    """Units not committed yet; the committed ones go to ``report.skipped``."""
    ids = [u.id for u in units]
    if len(set(ids)) != len(ids):
        raise ValueError("work unit ids must be unique")
    report.skipped = [u.id for u in units if commits.is_committed(u.id)]
    return [u for u in units if not commits.is_committed(u.id)]


def run_units(
    job: UnitJob,
    units: Sequence[WorkUnit],
    commits: CommitLog,
    *,
    workers: int = 1,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 0,
    max_retries: int = 2,
    desc: str = "units",
    progress: bool = True,
    sizes: Mapping[str, int] | None = None,
    size_name: str = "unit",
) -> JobReport:
    """Run every uncommitted unit on a pool of ``workers`` Ray actors; commit each as it finishes.

    ``sizes`` (unit id -> items, e.g. frames) makes the progress bar count items, so it shows items/s.
    Each actor gets ``cpus_per_worker`` CPUs (default: :func:`worker_cpus`'s rule) and as many torch threads.
    Needs a connected Ray (:func:`geodiff4d.core.runtime.connect`).
    """
    report = JobReport()
    pending = _pending_units(units, commits, report)
    if not pending:
        return report
    attempts: dict[str, int] = {}
    queue = UnitQueue(pending)
    n_workers = min(workers, len(pending))
    pool = _WorkerPool(
        job, n_workers, worker_cpus(n_workers, cpus_per_worker, gpus_per_worker), gpus_per_worker
    )
    size = (lambda unit: sizes[unit.id]) if sizes is not None else (lambda unit: 1)
    bar = tqdm(total=sum(size(u) for u in pending), desc=desc, unit=size_name, disable=not progress)
    try:
        while queue or pool.in_flight:
            pool.dispatch(queue)
            done, worker, unit = pool.next_done()
            try:
                stats, node = ray.get(done)
            except (RayTaskError, RayActorError) as error:
                if isinstance(error, RayActorError) or _worker_dead(worker):
                    worker = pool.new_worker()
                pool.idle.append(worker)
                attempts[unit.id] = attempts.get(unit.id, 0) + 1
                if attempts[unit.id] > max_retries or _setup_failed(error):
                    report.failed[unit.id] = _error_text(error)
                    bar.update(size(unit))
                else:
                    queue.put_back(unit)
                continue
            commits.commit(unit.id, stats)
            report.completed.append(unit.id)
            report.nodes[node] += 1
            pool.idle.append(worker)
            bar.update(size(unit))
    finally:
        bar.close()
        pool.close()
    return report


def _worker_dead(worker: Any) -> bool:
    try:
        ray.get(worker.pid.remote(), timeout=30)
        return False
    except Exception:  # noqa: BLE001 - any failure to answer means we replace the worker
        return True

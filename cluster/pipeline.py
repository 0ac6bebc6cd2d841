"""The end-to-end demo: every stage that exists, on procedural data, CPU and an embedded Ray.

Each stage is committed with a marker in ``OUT/.stages``; a rerun skips finished stages (and the
stages themselves resume unit by unit), so ``make demo`` twice does the work once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from geodiff4d.cluster.jobs import CommitLog
from geodiff4d.cluster.runtime import connect, shutdown


@dataclass(frozen=True)
class Stage:
    name: str
    outputs: str  # relative to the demo folder, printed at the end
    run: Callable[[Path, str | None], dict]


def _synth(out: Path, address: str | None) -> dict:
    from geodiff4d.datasets.procedural import SynthSpec, synthesize

    spec = SynthSpec(subjects=2, sequences=1, frames=20, cameras=8, resolution=128, synthetic=16, seed=0)
    report = synthesize(out / "data", spec, workers=2, address=address)
    if not report.ok:
        raise RuntimeError(f"synth failed:\n{report.summary()}")
    return {"summary": report.summary()}


def _pack(out: Path, address: str | None) -> dict:
    from geodiff4d.datasets.packing import pack
    from geodiff4d.datasets.verify import verify

    data = out / "data"
    sources = [("nersemble", data / "nersemble"), ("synthhuman", data / "synthhuman")]
    report = pack(out / "shards", sources, resolution=64, workers=2, address=address, samples_per_shard=64)
    if not report.ok:
        raise RuntimeError(f"pack failed:\n{report.summary()}")
    verified = verify(out / "shards")
    typer.echo(verified.summary())
    if not verified.ok:
        raise RuntimeError("verify found damaged shards")
    return {"pack": report.summary(), "verify": verified.summary()}


STAGES: tuple[Stage, ...] = (
    Stage("synth", "data", _synth),
    Stage("pack", "shards", _pack),
)


def run_demo(out: Path, address: str | None = None) -> bool:
    """Run the stages in order; returns False (after saying why) when one fails."""
    out = Path(out)
    done = CommitLog(out / ".stages")
    connect(address)
    try:
        for stage in STAGES:
            if done.is_committed(stage.name):
                typer.echo(f"[{stage.name}] already done, skipping (delete {done.marker(stage.name)} to redo)")
                continue
            typer.echo(f"[{stage.name}] running")
            start = time.perf_counter()
            try:
                stats = stage.run(out, address)
            except Exception as error:  # noqa: BLE001 - report the failing stage and stop
                typer.secho(f"[{stage.name}] FAILED: {error}", fg=typer.colors.RED, err=True)
                return False
            stats["seconds"] = round(time.perf_counter() - start, 1)
            done.commit(stage.name, stats)
            typer.echo(f"[{stage.name}] done in {stats['seconds']} s")
    finally:
        shutdown()
    typer.echo("\nDemo outputs:")
    for stage in STAGES:
        typer.echo(f"  {stage.name:<12} {(out / stage.outputs).resolve()}")
    return True

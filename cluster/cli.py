"""The ``geodiff4d`` command line: one Typer app, one command per stage.

Stage modules are imported inside each command so that ``--help`` stays fast and a broken optional
dependency of one stage never takes the others down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="GeoDiff4D toolkit: procedural/real head data, packing, diffusion, Gaussian avatars, evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)."),
]


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder; nersemble/ and synthhuman/ are written inside.")],
    subjects: Annotated[int, typer.Option(help="Number of identities.")] = 2,
    sequences: Annotated[int, typer.Option(help="Sequences per subject.")] = 1,
    frames: Annotated[int, typer.Option(help="Frames per sequence.")] = 8,
    cameras: Annotated[int, typer.Option(help="Cameras of the 16-camera rig to use.")] = 16,
    resolution: Annotated[int, typer.Option(help="Square image size in pixels (even).")] = 256,
    synthetic: Annotated[int, typer.Option(help="SynthHuman-layout samples to write.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical outputs.")] = 0,
    workers: Annotated[int, typer.Option(help="Ray workers.")] = 2,
    address: AddressOption = None,
) -> None:
    """Write a procedural data set in the NeRSemble v2 and SynthHuman layouts, with exact ground truth."""
    from geodiff4d.datasets.procedural import SynthSpec, synthesize

    spec = SynthSpec(subjects, sequences, frames, cameras, resolution, synthetic, seed)
    report = synthesize(out, spec, workers=workers, address=address)
    typer.echo(report.summary())
    typer.echo(f"NeRSemble layout:  {out / 'nersemble'}")
    typer.echo(f"SynthHuman layout: {out / 'synthhuman'}")
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every stage's outputs.")] = Path("demo_out"),
    address: AddressOption = None,
) -> None:
    """Run every stage that exists end to end on procedural data (CPU, embedded Ray); reruns resume."""
    from geodiff4d.cluster.pipeline import run_demo

    if not run_demo(out, address=address):
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()

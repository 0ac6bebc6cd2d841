"""The ``geodiff4d`` command line: one Typer app, one command per stage.

Stage modules are imported inside each command so that ``--help`` stays fast and a broken optional
dependency of one stage never takes the others down.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import click
import typer
from typer.core import TyperGroup

from geodiff4d.core.errors import UserError


class _Commands(TyperGroup):
    """The one handler for user errors: a :class:`UserError` raised by any command (bad input found by the
    toolkit, before or after Ray starts) is printed as its message on stderr and ends with its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as error:
            typer.secho(f"geodiff4d {ctx.invoked_subcommand}: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=error.exit_code) from None


# One shape for every command: what a command writes is --out; its one main input (a folder, a spec, a config)
# is positional; commands that read several inputs name each one (train --config --shards, eval --gt --pred).
app = typer.Typer(
    cls=_Commands,
    help="GeoDiff4D toolkit: procedural/real head data, packing, diffusion, Gaussian avatars, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"geodiff4d {version('geodiff4d')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    wait_for_autoscaler: Annotated[
        bool,
        typer.Option(
            "--wait-for-autoscaler",
            help="Let workers that ask for more CPUs/GPUs than any node has wait for an autoscaler to add such "
            "a node (default: stop at once, naming the request and what the cluster has). Same as "
            "GEODIFF4D_WAIT_FOR_AUTOSCALER=1.",
        ),
    ] = False,
) -> None:
    """GeoDiff4D toolkit: procedural/real head data, packing, diffusion, Gaussian avatars, evaluation."""
    if wait_for_autoscaler:  # read where the workers are sized (core.jobs.worker_cpus)
        from geodiff4d.core.jobs import WAIT_FOR_AUTOSCALER

        os.environ[WAIT_FOR_AUTOSCALER] = "1"


AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)."),
]

# Typer checks these before the command runs (exit 2, the option named): existing inputs, outputs that are folders
Folder = {"exists": True, "file_okay": False}
File = {"exists": True, "dir_okay": False}
Exists = {"exists": True}
OutFolder = {"file_okay": False}
Metric = Enum(
    "Metric",
    {name: name for name in ("psnr", "ssim", "lpips", "csim", "akd", "aed", "jod", "normal_deg")},
    type=str,
)
"""eval.settings.ALL_METRICS, restated so that ``--help`` does not import the metric backends."""


@app.command()
def synth(
    out: Annotated[
        Path, typer.Option(**OutFolder, help="Output folder; nersemble/ and synthhuman/ are written inside.")
    ],
    subjects: Annotated[int, typer.Option(min=1, help="Number of identities.")] = 2,
    sequences: Annotated[int, typer.Option(min=1, help="Sequences per subject.")] = 1,
    frames: Annotated[int, typer.Option(min=1, help="Frames per sequence.")] = 8,
    cameras: Annotated[int, typer.Option(min=1, max=16, help="Cameras of the 16-camera rig to use.")] = 16,
    resolution: Annotated[int, typer.Option(min=2, help="Square image size in pixels (even).")] = 256,
    synthetic: Annotated[int, typer.Option(min=0, help="SynthHuman-layout samples to write.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical outputs.")] = 0,
    workers: Annotated[int, typer.Option(min=1, help="Ray workers.")] = 2,
    address: AddressOption = None,
) -> None:
    """Write a procedural data set in the NeRSemble v2 and SynthHuman layouts, with exact ground truth."""
    from geodiff4d.datasets.procedural import SynthSpec, synthesize

    spec = SynthSpec(
        subjects=subjects,
        sequences=sequences,
        frames=frames,
        cameras=cameras,
        resolution=resolution,
        synthetic=synthetic,
        seed=seed,
    )
    report = synthesize(out, spec, workers=workers, address=address)
    typer.echo(report.summary())
    typer.echo(f"NeRSemble layout:  {out / 'nersemble'}")
    typer.echo(f"SynthHuman layout: {out / 'synthhuman'}")
    if not report.ok:
        raise typer.Exit(code=1)


def _pack_sources(items: list[str]) -> list[tuple[str, Path]]:
    """``--source KIND:DIR`` values as (kind, folder) pairs; a UserError naming a malformed one."""
    sources = []
    for item in items:
        kind, _, folder = item.partition(":")
        if kind not in ("nersemble", "synthhuman") or not folder:
            raise UserError(f"--source {item!r}: expected nersemble:DIR or synthhuman:DIR")
        sources.append((kind, Path(folder)))
    return sources


NormalEstimatorOption = Annotated[
    Path | None,
    typer.Option(
        **File,
        help="Local ONNX surface-normal model for real captures, fed as DAViD's normal model expects: BGR float32 "
        "in [0, 1], NCHW, the crop padded to a square by border replication and resized to the model's input "
        "size (512 for DAViD); output [1, 3, S, S] normals in SynthHuman's axes (converted to ours). Default: "
        "FLAME tracking rendered as coarse normals.",
    ),
]
FlameOption = Annotated[
    Path | None,
    typer.Option(
        **File,
        help="FLAME .pkl the tracking was made with (FLAME 2023 for NeRSemble's 300/100 coefficients; default: "
        "the procedural head, for procedural data).",
    ),
]


@app.command()
def pack(
    out: Annotated[
        str,
        typer.Option(
            help="Shard folder: {source}-{shard:06d}.tar, stats files, manifest.parquet; or an fsspec URL "
            "(s3://bucket/shards, gs://..., file://...) or a pipe: command with {name} where the file name goes "
            "('pipe:aws s3 cp - s3://bucket/shards/{name}'; a pipe cannot be read back, so it resumes nothing)."
        ),
    ],
    source: Annotated[
        list[str], typer.Option("--source", help="KIND:DIR with KIND nersemble or synthhuman.")
    ],
    resolution: Annotated[int, typer.Option(help="Square crop size around the head, pixels.")] = 512,
    workers: Annotated[int, typer.Option(min=1, help="Ray actors packing shards.")] = 2,
    samples_per_shard: Annotated[int, typer.Option(min=1, help="Upper bound on samples per shard.")] = 512,
    max_shard_mb: Annotated[float, typer.Option(help="Upper bound on a shard's size in MB.")] = 2048.0,
    normal_estimator: NormalEstimatorOption = None,
    flame: FlameOption = None,
    synthhuman_subset: Annotated[
        Literal["all", "face"],
        typer.Option(help="all, or face: only SynthHuman's face crops (the release's first 98,040 samples)."),
    ] = "all",
    strict: Annotated[
        bool,
        typer.Option(
            help="Refuse to pack when the listing leaves anything out (participant or sequence folders, cameras, "
            "untracked frames: see pack_report.json)."
        ),
    ] = False,
    address: AddressOption = None,
) -> None:
    """Shard NeRSemble / SynthHuman folders into WebDataset tars with a Parquet manifest; reruns resume."""
    from geodiff4d.datasets.packing import pack as run_pack

    sources = _pack_sources(source)
    if max_shard_mb <= 0:
        raise UserError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    report = run_pack(
        out,
        sources,
        resolution,
        workers,
        address,
        samples_per_shard,
        int(max_shard_mb * 2**20),
        normal_estimator,
        flame,
        synthhuman_subset=synthhuman_subset,
        strict=strict,
    )
    typer.echo(report.summary())
    raise typer.Exit(code=report.exit_code)


@app.command()
def verify(
    shards: Annotated[
        str,
        typer.Argument(
            help="Shard folder written by geodiff4d pack, or its URL (https://, s3://, ...) or a pipe: command "
            "with {name} for the file name (docs/formats.md, Streaming)."
        ),
    ],
    workers: Annotated[int, typer.Option(min=1, help="Ray actors checking shards (one shard per unit).")] = 2,
    address: AddressOption = None,
) -> None:
    """Re-read every shard against the manifest; report missing, extra, duplicated or corrupt samples."""
    from geodiff4d.datasets.verify import verify as run_verify

    report = run_verify(shards, workers=workers, address=address)
    typer.echo(report.summary())
    raise typer.Exit(code=report.exit_code)


@app.command()
def train(
    config: Annotated[
        Path, typer.Option(help="YAML config: a path, or a packaged config by name (demo, paper).")
    ],
    stage: Annotated[
        int, typer.Option(min=1, max=2, help="1: single frames; 2: adds temporal layers, 16-frame clips.")
    ],
    shards: Annotated[
        str,
        typer.Option(
            help="Folder of WebDataset shards with its manifest (geodiff4d pack), or its URL or pipe: command "
            "(docs/formats.md, Streaming)."
        ),
    ],
    out: Annotated[
        Path, typer.Option(**OutFolder, help="Run folder: checkpoints, TensorBoard logs, sample grids.")
    ],
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many steps (default: the config's).")
    ] = None,
    init: Annotated[Path | None, typer.Option(**Folder, help="Stage-1 run to start stage 2 from.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in OUT exactly where it stopped (same --workers).")
    ] = False,
    workers: Annotated[
        int, typer.Option(min=1, help="Ray Train workers (DDP); the config's batch sizes are global.")
    ] = 1,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(min=0, help="GPUs per worker (0: CPU; default: 1 when the cluster has GPUs, else 0)."),
    ] = None,
    max_failures: Annotated[
        int, typer.Option(min=0, help="Restarts from the last checkpoint after a worker dies.")
    ] = 3,
    address: AddressOption = None,
) -> None:
    """Train the joint image-normal diffusion model (stage 1 or 2) on Ray Train; OUT must be on storage every node reaches."""
    from geodiff4d.gen.train import train as run_training

    checkpoint = run_training(
        config,
        stage,
        shards,
        out,
        max_steps,
        init,
        resume,
        workers,
        gpus_per_worker,
        address,
        max_failures=max_failures,
    )
    typer.echo(f"latest checkpoint: {checkpoint}")


@app.command()
def sample(
    run: Annotated[
        Path,
        typer.Option(**Folder, help="Training run (its latest EMA weights) or a save_pretrained folder."),
    ],
    shards: Annotated[
        str,
        typer.Option(
            help="Packed shards holding the subject's pose maps and frames: a folder, URL or pipe: command "
            "(docs/formats.md, Streaming)."
        ),
    ],
    subject: Annotated[str, typer.Option(help="Subject id in the shards.")],
    sequence: Annotated[str, typer.Option(help="Sequence name in the shards.")],
    out: Annotated[
        Path,
        typer.Option(
            **OutFolder, help="Frame folder to write: rgb/, normal/, mask/, latents/, cameras/, grids/."
        ),
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML config (default: the run's own config.yaml).")
    ] = None,
    camera: Annotated[
        list[str] | None, typer.Option(help="Target cameras (default: all of the sequence).")
    ] = None,
    frames: Annotated[
        list[int] | None, typer.Option(min=0, help="Frames (default: all of the sequence).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Generate RGB frames, normal maps and expression latents for a subject's cameras into a frame folder."""
    from geodiff4d.gen.sample_frames import sample_to_frame_folder

    grid = sample_to_frame_folder(config, run, shards, subject, sequence, camera, frames, out, seed)
    typer.echo(f"frames in {out}, grid {grid}")


@app.command()
def generate(
    spec: Annotated[
        Path,
        typer.Argument(
            help="YAML spec: run, seed, subjects (reference, identity, cameras, driving, frames); see README."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(**OutFolder, help="Frame folder to write (what geodiff4d recon reads); reruns resume."),
    ],
    workers: Annotated[int, typer.Option(min=1, help="Ray actors, each holding the pipeline.")] = 1,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="GPUs per actor (fractions share a GPU; 0: CPU; default: 1 when the cluster has GPUs, else 0).",
        ),
    ] = None,
    address: AddressOption = None,
    output_format: Annotated[
        Literal["png", "tar"] | None,
        typer.Option(
            "--format",
            help="png: a PNG file per image (small runs); tar: one WebDataset tar per unit with an index, which "
            "recon reads as well (default: the spec's format, png).",
        ),
    ] = None,
    inputs_cache_mb: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="Prepared subjects each actor keeps in memory, in MB; the least recently used go first "
            "(default: 2048, gen.input_cache.DEFAULT_ACTOR_CACHE_MB).",
        ),
    ] = None,
) -> None:
    """Mass sampling: RGB, normals, masks, cameras, tracking and expression latents per subject, on Ray."""
    from geodiff4d.gen.generate import generate as run_generate
    from geodiff4d.gen.generate import input_failures

    report = run_generate(
        spec, out, workers, gpus_per_worker, address, output_format=output_format, cache_mb=inputs_cache_mb
    )
    bad_inputs = input_failures(report)
    if bad_inputs is not None:  # found by the actor that prepared the subject: one message, as before Ray
        raise bad_inputs
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def recon(
    frames: Annotated[
        Path,
        typer.Argument(
            **Folder,
            help="Frame folder (rgb/, normal/, mask/, cameras/, tracking/), as geodiff4d generate writes it.",
        ),
    ],
    out: Annotated[Path, typer.Option(**OutFolder, help="Avatars folder: one sub-folder per subject.")],
    subjects: Annotated[
        list[str] | None, typer.Option(help="Subjects to reconstruct (default: all).")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Ray actors (one subject each at a time).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per actor (0: CPU backend).")] = 0,
    cpus_per_worker: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            help="CPUs (= torch threads) per actor (default: all of Ray's CPUs divided by the workers).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML ReconConfig: steps, tracker (file | ours), tracking_options, refine, fit, ... "
            "(example: configs/recon.yaml; default: built-in values, tracking read from the frame folder)."
        ),
    ] = None,
    address: AddressOption = None,
) -> None:
    """Fit a FLAME-bound Gaussian avatar per subject; resumes from each subject's last checkpoint."""
    from geodiff4d.recon.run import load_recon_config, reconstruct

    settings = load_recon_config(config) if config else None
    report = reconstruct(
        frames, out, subjects, workers, gpus_per_worker, address, settings, cpus_per_worker=cpus_per_worker
    )
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def render(
    avatar: Annotated[Path, typer.Argument(**Folder, help="One avatar folder written by geodiff4d recon.")],
    cameras: Annotated[
        Path, typer.Option(**File, help="Cameras JSON (serial -> world_to_cam, K, width, height).")
    ],
    out: Annotated[Path, typer.Option(**OutFolder, help="Frame folder to write (scored by geodiff4d eval).")],
    expressions: Annotated[
        Path | None, typer.Option(**File, help="FLAME tracking npz to drive the avatar.")
    ] = None,
    head_pose: Annotated[
        Literal["driver", "relative", "avatar"],
        typer.Option(
            help="With --expressions: the driver's head pose as tracked (driver), its motion since its first frame "
            "applied to the avatar's pose (relative), or the avatar's own pose (avatar). Shape and scale stay "
            "the avatar's."
        ),
    ] = "driver",
) -> None:
    """Render novel views and expressions of an avatar into a frame folder; prints frames/s."""
    from geodiff4d.recon.run import render_avatar

    fps = render_avatar(avatar, cameras, expressions, out, head_pose=head_pose)
    typer.echo(f"rendered into {out} at {fps:.2f} frames/s")


@app.command("eval")
def evaluate(
    out: Annotated[
        Path, typer.Option(**OutFolder, help="Run folder: per-frame Parquet rows, run.json; resumes.")
    ],
    gt: Annotated[Path, typer.Option(**Folder, help="Ground truth: a frame tree or a NeRSemble v2 folder.")],
    pred: Annotated[
        Path | None, typer.Option(**Folder, help="ROOT/<method>/<subject>/<sequence>/<camera>/<frame>.png")
    ] = None,
    method: Annotated[
        list[str] | None, typer.Option("--method", help="NAME=PATH, one method at a time.")
    ] = None,
    protocol: Annotated[
        Literal["self", "cross"], typer.Option(help="self (vs ground truth) or cross (vs driving/identity).")
    ] = "self",
    metrics: Annotated[
        list[Metric] | None, typer.Option(help="Metrics to score (default: all of the protocol's).")
    ] = None,
    identity: Annotated[
        Path | None, typer.Option(**Folder, help="cross protocol: folder of <subject>.png identity images.")
    ] = None,
    fps: Annotated[float, typer.Option(min=0.001, help="Frames per second of the sequences (JOD).")] = 25.0,
    csim_backend: Annotated[
        Literal["facenet", "dlib", "arcface"],
        typer.Option(help="facenet (packaged), dlib (packaged) or arcface."),
    ] = "facenet",
    arcface_model: Annotated[
        Path | None, typer.Option(**Exists, help="insightface model folder/ONNX for arcface.")
    ] = None,
    aed_backend: Annotated[
        Literal["mediapipe", "landmark_fit"], typer.Option(help="mediapipe (52 blendshapes) or landmark_fit.")
    ] = "mediapipe",
    aed_head_model: Annotated[
        Path | None, typer.Option(**File, help="FLAME .pkl for landmark_fit AED.")
    ] = None,
    lpips_net: Annotated[Literal["alex", "vgg"], typer.Option(help="LPIPS backbone.")] = "alex",
    jod_display: Annotated[
        str, typer.Option(help="ColorVideoVDP display model (changes the score).")
    ] = "standard_4k",
    resolution: Annotated[
        int | None, typer.Option(min=1, help="Evaluate at this height (default: as predicted).")
    ] = None,
    masked: Annotated[
        bool, typer.Option(help="Pixel metrics over the ground-truth foreground only.")
    ] = False,
    gt_mask: Annotated[
        Path | None,
        typer.Option(**Folder, help="Ground-truth masks mirroring --gt (frame-tree ground truth)."),
    ] = None,
    gt_normal: Annotated[
        Path | None,
        typer.Option(
            **Folder,
            help="Ground-truth normal maps mirroring --gt: adds normal_deg (a method's normals: the normal/ beside its rgb/).",
        ),
    ] = None,
    background: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=1,
            help="Composite prediction and ground truth on this grey level in [0,1] with the GT alpha before any metric "
            "(for methods that render no backdrop).",
        ),
    ] = None,
    akd_backend: Annotated[
        Literal["dlib", "fan"],
        typer.Option(help="dlib (packaged, whole-pixel points) or fan (face-alignment)."),
    ] = "dlib",
    fan_weights: Annotated[
        Path | None,
        typer.Option(
            help="fan AKD: 2DFAN4-11f355bf06.pth.tar, or a folder holding it (checkpoints/, a torch hub dir); "
            "default $GEODIFF4D_FAN_WEIGHTS, else the torch hub cache. Never downloaded."
        ),
    ] = None,
    fan_detector: Annotated[
        Literal["dlib", "sfd"], typer.Option(help="fan AKD faces: dlib (ours) or sfd (weights beside FAN's).")
    ] = "dlib",
    lpips_checkpoint: Annotated[
        Path | None, typer.Option(**File, help="Local torchvision backbone for LPIPS.")
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device for the metric networks (cpu, cuda).")] = "cpu",
    workers: Annotated[int, typer.Option(min=1, help="Ray actors.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(min=0, help="GPUs per actor.")] = 0,
    address: AddressOption = None,
) -> None:
    """Score methods' frames per frame with PSNR/SSIM/LPIPS/CSIM/AKD/AED/JOD on Ray; resumable.\f

    Long because: its signature declares the command's 26 options (Typer reads them from it); the body is
    under 40 lines. (Click shows no help text after the form feed, \\f.)
    """
    from geodiff4d.eval.inputs import parse_named_paths
    from geodiff4d.eval.run import evaluate as run_evaluation

    def _text(path: Path | None) -> str | None:
        return str(path) if path else None

    if (pred is None) == (not method):
        raise UserError("give either --pred ROOT or one or more --method NAME=PATH")
    predictions = parse_named_paths(method) if method else pred
    report = run_evaluation(
        predictions,
        gt,
        protocol,
        out,
        address,
        [m.value for m in metrics or ()] or None,
        workers,
        gpus_per_worker,
        gt_mask=gt_mask,
        identity=identity,
        fps=fps,
        csim_backend=csim_backend,
        arcface_model=_text(arcface_model),
        aed_backend=aed_backend,
        aed_head_model=_text(aed_head_model),
        lpips_net=lpips_net,
        lpips_checkpoint=_text(lpips_checkpoint),
        jod_display=jod_display,
        resolution=resolution,
        masked=masked,
        background=background,
        gt_normal=gt_normal,
        akd_backend=akd_backend,
        fan_weights=_text(fan_weights),
        fan_detector=fan_detector,
        device=device,
    )
    typer.echo(report.summary())


@app.command()
def leaderboard(
    runs: Annotated[
        list[Path], typer.Argument(**Folder, help="Evaluation run folders (e.g. a self and a cross run).")
    ],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/leaderboard).")] = None,
) -> None:
    """Aggregate evaluation runs into Parquet, Markdown and HTML (with plots) leaderboards."""
    from geodiff4d.eval.leaderboard import build_leaderboard

    for kind, path in build_leaderboard(runs, out).items():
        typer.echo(f"{kind:<14} {path}")


@app.command()
def submission(
    method: Annotated[
        Path,
        typer.Argument(**Folder, help="Method folder: <pid>/<SEQ>/<camera>/<frame>.png or <camera>.mp4."),
    ],
    out: Annotated[
        Path, typer.Option(help="Zip to write, for upload to the NeRSemble mono FLAME-avatar benchmark.")
    ],
    allow_incomplete: Annotated[
        bool,
        typer.Option(help="Write the zip even without every expected video (the benchmark scores none)."),
    ] = False,
    benchmark_data: Annotated[
        Path | None,
        typer.Option(
            **Folder, help="The local benchmark release, to check frame counts against its tracking."
        ),
    ] = None,
) -> None:
    """Write the official mono FLAME-avatar submission zip (nersemble-benchmark's writer: 512x512, 24.3 fps);
    refuses an incomplete one, naming the missing videos, unless --allow-incomplete."""
    from geodiff4d.eval.submission import write_mono_flame_avatar_submission

    zip_path = write_mono_flame_avatar_submission(method, out, allow_incomplete, benchmark_data)
    typer.echo(f"submission: {zip_path}")


def _run_benchmark(config: Path | str, out: Path, parallel: int, address: str | None) -> None:
    from geodiff4d.cluster.benchmark import Benchmark
    from geodiff4d.cluster.benchmark_config import load_benchmark_config

    report = Benchmark(load_benchmark_config(config), out, address, echo=typer.echo).run(parallel)
    typer.echo(report.summary())
    for what, path in (
        ("generated frames", "generated"),
        ("avatars", "avatars"),
        ("evaluation runs", "eval"),
        ("leaderboard", "leaderboard/report.html"),
    ):
        typer.echo(f"{what:<17} {(out / path).resolve()}")
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def benchmark(
    config: Annotated[
        Path, typer.Argument(help="Benchmark YAML (a path, or a packaged one by name: benchmark-demo).")
    ],
    out: Annotated[
        Path,
        typer.Option(**OutFolder, help="Run folder: config, per-stage state, every output, leaderboard/."),
    ],
    parallel: Annotated[int, typer.Option(min=1, help="Stages (subject chains) in flight at once.")] = 2,
    address: AddressOption = None,
) -> None:
    """Run a benchmark end to end: data, the diffusion model, per-subject avatars, every protocol, leaderboard."""
    _run_benchmark(config, out, parallel, address)


@app.command()
def doctor(
    address: AddressOption = None,
    arcface_model: Annotated[
        Path | None, typer.Option(help="insightface model folder/ONNX to check.")
    ] = None,
    fan_weights: Annotated[
        Path | None, typer.Option(help="face-alignment 2DFAN-4 checkpoint (or folder) to check.")
    ] = None,
) -> None:
    """Which backends, packaged weights, GPUs and Ray address are available, and what is missing for each
    (paths are reported as found or not, never refused: finding out is the point)."""
    from geodiff4d.cluster.doctor import render, run_checks

    typer.echo(render(run_checks(address, arcface_model, fan_weights)))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(**OutFolder, help="Folder for every stage's outputs.")] = Path(
        "demo_out"
    ),
    address: AddressOption = None,
) -> None:
    """The packaged benchmark-demo: the paper's method end to end on procedural data (CPU, embedded Ray);
    the same as ``geodiff4d benchmark benchmark-demo --out OUT``; reruns resume."""
    _run_benchmark("benchmark-demo", out, 2, address)


if __name__ == "__main__":
    app()

"""The ``geodiff4d`` command line: one Typer app, one command per stage.

Stage modules are imported inside each command so that ``--help`` stays fast and a broken optional
dependency of one stage never takes the others down.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from geodiff4d.cluster.config_files import ConfigError

app = typer.Typer(
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
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """GeoDiff4D toolkit: procedural/real head data, packing, diffusion, Gaussian avatars, evaluation."""

AddressOption = Annotated[
    str | None,
    typer.Option("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)."),
]


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@contextmanager
def _config_errors_exit() -> Iterator[None]:
    """A bad YAML config ends the command with its message (file and field), not a traceback."""
    try:
        yield
    except ConfigError as error:
        _fail(str(error))


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

    try:
        spec = SynthSpec(subjects, sequences, frames, cameras, resolution, synthetic, seed)
    except ValueError as error:
        _fail(f"synth: {error}")
    report = synthesize(out, spec, workers=workers, address=address)
    typer.echo(report.summary())
    typer.echo(f"NeRSemble layout:  {out / 'nersemble'}")
    typer.echo(f"SynthHuman layout: {out / 'synthhuman'}")
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def pack(
    out: Annotated[Path, typer.Argument(help="Shard folder: {source}-{shard:06d}.tar, stats files, manifest.parquet.")],
    source: Annotated[list[str], typer.Option("--source", help="KIND:DIR with KIND nersemble or synthhuman.")],
    resolution: Annotated[int, typer.Option(help="Square crop size around the head, pixels.")] = 512,
    workers: Annotated[int, typer.Option(help="Ray actors packing shards.")] = 2,
    samples_per_shard: Annotated[int, typer.Option(help="Upper bound on samples per shard.")] = 512,
    max_shard_mb: Annotated[float, typer.Option(help="Upper bound on a shard's size in MB.")] = 2048.0,
    normal_estimator: Annotated[Path | None, typer.Option(
        help="Local ONNX surface-normal model for real captures, fed as DAViD's normal model expects: BGR float32 "
             "in [0, 1], NCHW, the crop padded to a square by border replication and resized to the model's input "
             "size (512 for DAViD); output [1, 3, S, S] normals in SynthHuman's axes (converted to ours). Default: "
             "FLAME tracking rendered as coarse normals.")] = None,
    flame: Annotated[Path | None, typer.Option(
        help="FLAME .pkl the tracking was made with (FLAME 2023 for NeRSemble's 300/100 coefficients; default: "
             "the procedural head, for procedural data).")] = None,
    synthhuman_subset: Annotated[str, typer.Option(
        help="all, or face: only SynthHuman's face crops (the release's first 98,040 samples).")] = "all",
    address: AddressOption = None,
) -> None:
    """Shard NeRSemble / SynthHuman folders into WebDataset tars with a Parquet manifest; reruns resume."""
    from geodiff4d.datasets.packing import PACK_INPUT_ERRORS
    from geodiff4d.datasets.packing import pack as run_pack

    sources = []
    for item in source:
        kind, _, folder = item.partition(":")
        if kind not in ("nersemble", "synthhuman") or not folder:
            _fail(f"--source {item!r}: expected nersemble:DIR or synthhuman:DIR")
        sources.append((kind, Path(folder)))
    if max_shard_mb <= 0:
        _fail(f"--max-shard-mb must be positive, got {max_shard_mb}")
    try:
        report = run_pack(out, sources, resolution, workers, address, samples_per_shard, int(max_shard_mb * 2**20),
                          normal_estimator, flame, synthhuman_subset=synthhuman_subset)
    except PACK_INPUT_ERRORS as error:
        _fail(f"pack: {error}")
    typer.echo(report.summary())
    raise typer.Exit(code=report.exit_code)


@app.command()
def verify(
    out: Annotated[Path, typer.Argument(help="Shard folder written by geodiff4d pack.")],
    workers: Annotated[int, typer.Option(help="Ray actors checking shards (one shard per unit).")] = 2,
    address: AddressOption = None,
) -> None:
    """Re-read every shard against the manifest; report missing, extra, duplicated or corrupt samples."""
    from geodiff4d.datasets.manifest import ManifestError
    from geodiff4d.datasets.verify import verify as run_verify

    try:
        report = run_verify(out, workers=workers, address=address)
    except ManifestError as error:
        _fail(f"verify: {error}")
    typer.echo(report.summary())
    raise typer.Exit(code=report.exit_code)


@app.command()
def train(
    config: Annotated[Path, typer.Option(help="YAML config: a path, or a packaged config by name (demo, paper).")],
    stage: Annotated[int, typer.Option(help="1: single frames; 2: adds temporal layers, 16-frame clips.")],
    shards: Annotated[Path, typer.Option(help="Folder of WebDataset shards with its manifest (geodiff4d pack).")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, TensorBoard logs, sample grids.")],
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps (default: the config's).")] = None,
    init: Annotated[Path | None, typer.Option(help="Stage-1 run to start stage 2 from.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in OUT exactly where it stopped (same --workers).")] = False,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP); the config's batch sizes are global.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per worker (0: CPU).")] = 0,
    max_failures: Annotated[int, typer.Option(help="Restarts from the last checkpoint after a worker dies.")] = 3,
    address: AddressOption = None,
) -> None:
    """Train the joint image-normal diffusion model (stage 1 or 2) on Ray Train; OUT must be on storage every node reaches."""
    from geodiff4d.gen.train import train as run_training

    with _config_errors_exit():
        checkpoint = run_training(config, stage, shards, out, max_steps, init, resume, workers, gpus_per_worker,
                                  address, max_failures=max_failures)  # fmt: skip
    typer.echo(f"latest checkpoint: {checkpoint}")


@app.command()
def sample(
    run: Annotated[Path, typer.Option(help="Training run (its latest EMA weights) or a save_pretrained folder.")],
    shards: Annotated[Path, typer.Option(help="Packed shards holding the subject's pose maps and frames.")],
    subject: Annotated[str, typer.Option(help="Subject id in the shards.")],
    sequence: Annotated[str, typer.Option(help="Sequence name in the shards.")],
    out: Annotated[Path, typer.Option(help="Frame folder to write: rgb/, normal/, latents/, cameras/, grids/.")],
    config: Annotated[Path | None, typer.Option(help="YAML config (default: the run's own config.yaml).")] = None,
    camera: Annotated[list[str] | None, typer.Option(help="Target cameras (default: all of the sequence).")] = None,
    frames: Annotated[list[int] | None, typer.Option(help="Frames (default: all of the sequence).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Generate RGB frames, normal maps and expression latents for a subject's cameras into a frame folder."""
    from geodiff4d.gen.sample_frames import sample_to_frame_folder

    with _config_errors_exit():
        grid = sample_to_frame_folder(config, run, shards, subject, sequence, camera, frames, out, seed)
    typer.echo(f"frames in {out}, grid {grid}")


@app.command()
def generate(
    spec: Annotated[Path, typer.Argument(help="YAML spec: run, seed, subjects (reference, identity, cameras, "
                                              "driving, frames); see README.")],
    out: Annotated[Path, typer.Option(help="Frame folder to write (what geodiff4d recon reads); reruns resume.")],
    workers: Annotated[int, typer.Option(help="Ray actors, each holding the pipeline.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per actor (fractions share a GPU; 0: CPU).")] = 0,
    address: AddressOption = None,
) -> None:
    """Mass sampling: RGB, normals, masks, cameras, tracking and expression latents per subject, on Ray."""
    from geodiff4d.cluster.generate import generate as run_generate

    with _config_errors_exit():
        report = run_generate(spec, out, workers, gpus_per_worker, address)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def recon(
    input: Annotated[Path, typer.Option("--input", help="Frame folder (rgb/, normal/, mask/, cameras/, tracking/).")],
    out: Annotated[Path, typer.Option(help="Avatars folder: one sub-folder per subject.")],
    subjects: Annotated[list[str] | None, typer.Option(help="Subjects to reconstruct (default: all).")] = None,
    workers: Annotated[int, typer.Option(help="Ray actors (one subject each at a time).")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per actor (0: CPU backend).")] = 0,
    cpus_per_worker: Annotated[float | None, typer.Option(
        help="CPUs (= torch threads) per actor (default: all of Ray's CPUs divided by the workers).")] = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML ReconConfig: steps, tracker (file | ours), tracking_options, refine, fit, ... "
             "(example: configs/recon.yaml; default: built-in values, tracking read from the frame folder).")] = None,
    address: AddressOption = None,
) -> None:
    """Fit a FLAME-bound Gaussian avatar per subject; resumes from each subject's last checkpoint."""
    from geodiff4d.recon.run import load_recon_config, reconstruct

    with _config_errors_exit():
        settings = load_recon_config(config) if config else None
        report = reconstruct(input, out, subjects, workers, gpus_per_worker, address, settings,
                             cpus_per_worker=cpus_per_worker)  # fmt: skip
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def render(
    avatar: Annotated[Path, typer.Argument(help="One avatar folder written by geodiff4d recon.")],
    cameras: Annotated[Path, typer.Option(help="Cameras JSON (serial -> world_to_cam, K, width, height).")],
    out: Annotated[Path, typer.Option(help="Frame folder to write (scored by geodiff4d eval).")],
    expressions: Annotated[Path | None, typer.Option(help="FLAME tracking npz to drive the avatar.")] = None,
    head_pose: Annotated[str, typer.Option(
        help="With --expressions: the driver's head pose as tracked (driver), its motion since its first frame "
             "applied to the avatar's pose (relative), or the avatar's own pose (avatar). Shape and scale stay "
             "the avatar's.")] = "driver",
) -> None:
    """Render novel views and expressions of an avatar into a frame folder; prints frames/s."""
    from geodiff4d.recon.reenact import HEAD_POSES
    from geodiff4d.recon.run import render_avatar

    if head_pose not in HEAD_POSES:
        _fail(f"--head-pose {head_pose!r}: expected one of {', '.join(HEAD_POSES)}")
    fps = render_avatar(avatar, cameras, expressions, out, head_pose=head_pose)
    typer.echo(f"rendered into {out} at {fps:.2f} frames/s")


@app.command("eval")
def evaluate(
    out: Annotated[Path, typer.Option(help="Run folder: per-frame Parquet rows, run.json; resumes.")],
    gt: Annotated[Path, typer.Option(help="Ground truth: a frame tree or a NeRSemble v2 folder.")],
    pred: Annotated[Path | None, typer.Option(help="ROOT/<method>/<subject>/<sequence>/<camera>/<frame>.png")] = None,
    method: Annotated[list[str] | None, typer.Option("--method", help="NAME=PATH, one method at a time.")] = None,
    protocol: Annotated[str, typer.Option(help="self (vs ground truth) or cross (vs driving/identity).")] = "self",
    metrics: Annotated[list[str] | None, typer.Option(help="Subset of psnr ssim lpips csim akd aed jod normal_deg.")] = None,
    identity: Annotated[Path | None, typer.Option(help="cross protocol: folder of <subject>.png identity images.")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second of the sequences (JOD).")] = 25.0,
    csim_backend: Annotated[str, typer.Option(help="facenet (packaged), dlib (packaged) or arcface.")] = "facenet",
    arcface_model: Annotated[Path | None, typer.Option(help="insightface model folder/ONNX for arcface.")] = None,
    aed_backend: Annotated[str, typer.Option(help="mediapipe (52 blendshapes) or landmark_fit.")] = "mediapipe",
    aed_head_model: Annotated[Path | None, typer.Option(help="FLAME .pkl for landmark_fit AED.")] = None,
    lpips_net: Annotated[str, typer.Option(help="alex or vgg.")] = "alex",
    jod_display: Annotated[str, typer.Option(help="ColorVideoVDP display model (changes the score).")] = "standard_4k",
    resolution: Annotated[int | None, typer.Option(help="Evaluate at this height (default: as predicted).")] = None,
    masked: Annotated[bool, typer.Option(help="Pixel metrics over the ground-truth foreground only.")] = False,
    gt_mask: Annotated[Path | None, typer.Option(help="Ground-truth masks mirroring --gt (frame-tree ground truth).")] = None,
    gt_normal: Annotated[Path | None, typer.Option(
        help="Ground-truth normal maps mirroring --gt: adds normal_deg (a method's normals: the normal/ beside its rgb/).")] = None,
    background: Annotated[float | None, typer.Option(
        help="Composite prediction and ground truth on this grey level in [0,1] with the GT alpha before any metric "
             "(for methods that render no backdrop).")] = None,
    akd_backend: Annotated[str, typer.Option(help="dlib (packaged, whole-pixel points) or fan (face-alignment).")] = "dlib",
    fan_weights: Annotated[Path | None, typer.Option(
        help="fan AKD: 2DFAN4-11f355bf06.pth.tar, or a folder holding it (checkpoints/, a torch hub dir); "
             "default $GEODIFF4D_FAN_WEIGHTS, else the torch hub cache. Never downloaded.")] = None,
    fan_detector: Annotated[str, typer.Option(help="fan AKD faces: dlib (ours) or sfd (weights beside FAN's).")] = "dlib",
    lpips_checkpoint: Annotated[Path | None, typer.Option(help="Local torchvision backbone for LPIPS.")] = None,
    device: Annotated[str, typer.Option(help="Torch device for the metric networks (cpu, cuda).")] = "cpu",
    workers: Annotated[int, typer.Option(help="Ray actors.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per actor.")] = 0,
    address: AddressOption = None,
) -> None:
    """Score methods' frames per frame with PSNR/SSIM/LPIPS/CSIM/AKD/AED/JOD on Ray; resumable."""
    from geodiff4d.datasets.packaged import ModelFileNotFound
    from geodiff4d.eval.inputs import parse_named_paths
    from geodiff4d.eval.run import EvalError
    from geodiff4d.eval.run import evaluate as run_evaluation

    def _text(path: Path | None) -> str | None:
        return str(path) if path else None

    if (pred is None) == (not method):
        _fail("give either --pred ROOT or one or more --method NAME=PATH")
    try:  # bad inputs, settings or missing weights: their message, before any work; failed units: the summary
        predictions = parse_named_paths(method) if method else pred
        report = run_evaluation(
            predictions, gt, protocol, out, address, metrics, workers, gpus_per_worker, gt_mask=gt_mask,
            identity=identity, fps=fps, csim_backend=csim_backend, arcface_model=_text(arcface_model),
            aed_backend=aed_backend, aed_head_model=_text(aed_head_model), lpips_net=lpips_net,
            lpips_checkpoint=_text(lpips_checkpoint), jod_display=jod_display, resolution=resolution, masked=masked,
            background=background, gt_normal=gt_normal, akd_backend=akd_backend, fan_weights=_text(fan_weights),
            fan_detector=fan_detector, device=device,
        )
    except (ValueError, ModelFileNotFound, EvalError) as error:
        _fail(f"eval: {error}")
    typer.echo(report.summary())


@app.command()
def leaderboard(
    runs: Annotated[list[Path], typer.Argument(help="Evaluation run folders (e.g. a self and a cross run).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/leaderboard).")] = None,
) -> None:
    """Aggregate evaluation runs into Parquet, Markdown and HTML (with plots) leaderboards."""
    from geodiff4d.eval.leaderboard import build_leaderboard

    for kind, path in build_leaderboard(runs, out).items():
        typer.echo(f"{kind:<14} {path}")


@app.command()
def submission(
    method: Annotated[Path, typer.Argument(help="Method folder: <pid>/<SEQ>/<camera>/<frame>.png or <camera>.mp4.")],
    out: Annotated[Path, typer.Option(help="Zip to write, for upload to the NeRSemble mono FLAME-avatar benchmark.")],
) -> None:
    """Write the official mono FLAME-avatar submission zip (nersemble-benchmark's writer: 512x512, 24.3 fps)."""
    from geodiff4d.eval.inputs import InputError
    from geodiff4d.eval.submission import write_mono_flame_avatar_submission

    try:
        typer.echo(f"submission: {write_mono_flame_avatar_submission(method, out)}")
    except InputError as error:
        _fail(f"submission: {error}")


def _run_benchmark(config: Path | str, out: Path, parallel: int, address: str | None) -> None:
    from geodiff4d.cluster.benchmark import Benchmark, BenchmarkError
    from geodiff4d.cluster.benchmark_config import load_benchmark_config

    with _config_errors_exit():
        settings = load_benchmark_config(config)
    try:
        report = Benchmark(settings, out, address, echo=typer.echo).run(parallel)
    except BenchmarkError as error:
        _fail(str(error))
    typer.echo(report.summary())
    for what, path in (("generated frames", "generated"), ("avatars", "avatars"), ("evaluation runs", "eval"),
                       ("leaderboard", "leaderboard/report.html")):  # fmt: skip
        typer.echo(f"{what:<17} {(out / path).resolve()}")
    if not report.ok:
        raise typer.Exit(code=1)


@app.command()
def benchmark(
    config: Annotated[Path, typer.Argument(help="Benchmark YAML (a path, or a packaged one by name: benchmark-demo).")],
    out: Annotated[Path, typer.Option(help="Run folder: config, per-stage state, every output, leaderboard/.")],
    parallel: Annotated[int, typer.Option(min=1, help="Stages (subject chains) in flight at once.")] = 2,
    address: AddressOption = None,
) -> None:
    """Run a benchmark end to end: data, the diffusion model, per-subject avatars, every protocol, leaderboard."""
    _run_benchmark(config, out, parallel, address)


@app.command()
def doctor(
    address: AddressOption = None,
    arcface_model: Annotated[Path | None, typer.Option(help="insightface model folder/ONNX to check.")] = None,
    fan_weights: Annotated[Path | None, typer.Option(help="face-alignment 2DFAN-4 checkpoint (or folder) to check.")] = None,
) -> None:
    """Which backends, packaged weights, GPUs and Ray address are available, and what is missing for each."""
    from geodiff4d.cluster.doctor import render, run_checks

    typer.echo(render(run_checks(address, arcface_model, fan_weights)))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for every stage's outputs.")] = Path("demo_out"),
    address: AddressOption = None,
) -> None:
    """The packaged benchmark-demo: the paper's method end to end on procedural data (CPU, embedded Ray);
    the same as ``geodiff4d benchmark benchmark-demo --out OUT``; reruns resume."""
    _run_benchmark("benchmark-demo", out, 2, address)


if __name__ == "__main__":
    app()

"""The ``geodiff4d benchmark`` config: data, subjects, protocols and methods, validated before any work.

Everything a run does follows from this file (it is copied into the run folder), so two runs with the same
config and seed give the same leaderboard, and a rerun with a changed config is refused instead of mixing.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from geodiff4d.core.config import ConfigError, StrictConfig, read_mapping, resolve_config, validate
from geodiff4d.datasets.cameras import MONO_HOLDOUT_SERIALS, MONO_TRAIN_SERIAL, NVS_HOLDOUT_SERIALS
from geodiff4d.eval.settings import PAPER_METRICS

# NeRSemble's mono FLAME-avatar benchmark: the avatar sees one camera; three others score it.
MONO_TRAIN_CAMERA = MONO_TRAIN_SERIAL
MONO_HOLDOUT_CAMERAS = MONO_HOLDOUT_SERIALS
# NeRSemble's NVS benchmark: 13 cameras train, 3 others score the same sequence. Its hold-outs include the mono
# train camera, so novel_views gets avatars of its own, built from the NVS train cameras: the oracle from all 13,
# GeoDiff4D from one of them (the centre camera, a mono hold-out, so never seen by the mono protocols' avatars).
NVS_TRAIN_CAMERA = "220700191"
NVS_HOLDOUT_CAMERAS = NVS_HOLDOUT_SERIALS
PROTOCOLS = ("self", "cross", "novel_views")
METHOD_KINDS = ("geodiff4d", "vgm", "oracle", "reference_copy", "gt_noise", "external")
MODEL_KINDS = ("geodiff4d", "vgm")  # sample the diffusion model: methods with one model key share it
# The metrics a protocol scores when eval.metrics does not name them: the paper's tables. The paper has no
# novel-view table; those are scored with its self-reenactment columns.
DEFAULT_METRICS = {
    "self": PAPER_METRICS["self"],
    "novel_views": PAPER_METRICS["self"],
    "cross": PAPER_METRICS["cross"],
}
# The protocols the diffusion model's own samples ("VGM" in the paper) are scored in; the others list a vgm
# method as "{name} {VGM_NOT_COVERED}: not covered, no scores".
VGM_PROTOCOLS = ("self", "cross")
VGM_NOT_COVERED = (
    "has no frames here by design (the paper reports the video model's own frames, VGM, for self- and "
    "cross-reenactment only; novel views of the training sequence are the avatar's task)"
)


class ProceduralData(StrictConfig):
    """Synthesized first with ``geodiff4d synth``'s generator (NeRSemble v2 layout, exact ground truth)."""

    subjects: int = Field(3, ge=2)  # cross-reenactment needs a second subject
    sequences: int = Field(2, ge=2)  # one to build the avatar from, at least one held out
    frames: int = Field(16, ge=2)
    resolution: int = Field(128, ge=32)
    synthetic: int = Field(16, ge=0)
    seed: int = 0


class DataConfig(StrictConfig):
    nersemble: Path | None = None  # a NeRSemble v2 root in the official benchmark layout
    procedural: ProceduralData | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> DataConfig:
        if (self.nersemble is None) == (self.procedural is None):
            raise ValueError("give exactly one of data.nersemble (a folder) or data.procedural (a spec)")
        return self


class GenerationConfig(StrictConfig):
    """The diffusion model: trained here on the benchmark's packed data, or an existing run folder."""

    model: str = "demo"  # gen config: packaged name or path
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # merged into that config (ablations)
    run: Path | None = None  # a trained run folder (stage 2); skips training
    train_steps: dict[int, int] = Field(default_factory=lambda: {1: 800, 2: 200})
    views: list[str] | None = None  # cameras to generate (default: every camera but the hold-outs)
    frames: int | None = Field(None, ge=1)  # frames of the training sequence to generate (default: all)
    workers: int = Field(1, ge=1)  # generate's Ray actors per subject
    # generate's GPUs per actor (default: 1 when the cluster has GPUs, else 0: the CPU)
    gpus_per_worker: float | None = Field(None, ge=0)
    train_workers: int = Field(
        1, ge=1
    )  # training's Ray Train workers (DDP); the gen config's batches are global
    train_gpus_per_worker: float | None = Field(None, ge=0)  # training's GPUs per worker (default: as above)
    seed: int = 0
    # the subjects the model trains on, held out of evaluation (default: it trains on every subject, evaluated
    # ones included); the evaluated subjects then default to every other subject of the data
    train_subjects: list[str] | None = None

    @field_validator("train_steps")
    @classmethod
    def _stages(cls, steps: dict[int, int]) -> dict[int, int]:
        if set(steps) != {1, 2} or min(steps.values()) < 1:
            raise ValueError("needs positive step counts for stages 1 and 2, e.g. {1: 800, 2: 200}")
        return steps


class EvalConfig(StrictConfig):
    # protocol -> metrics (default: DEFAULT_METRICS, the paper's columns)
    metrics: dict[str, list[str]] = Field(default_factory=dict)
    masked: bool = True  # pixel metrics over the ground-truth foreground (stated in the report)
    # prediction and ground truth composited on this grey with the ground-truth alpha before every metric:
    # avatars render no studio backdrop, so every metric sees the same pixels (None: as they are)
    background: float | None = Field(0.5, ge=0, le=1)
    workers: int = Field(2, ge=1)
    gpus_per_worker: float = Field(0, ge=0)  # with GPUs the metric networks run on CUDA
    resolution: int | None = Field(None, ge=16)

    def metrics_of(self, protocol: str) -> list[str]:
        """The metrics ``protocol`` scores: as named here, else the paper's (DEFAULT_METRICS)."""
        return list(self.metrics.get(protocol, DEFAULT_METRICS[protocol]))


class MethodConfig(StrictConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    # vgm: the diffusion model's own frames at the hold-out cameras, scored without reconstruction
    kind: Literal["geodiff4d", "vgm", "oracle", "reference_copy", "gt_noise", "external"]
    # a variant: dotted fields of this config changed for this method only, e.g. {"recon.fit.normal_weight": 0}
    overrides: dict[str, Any] = Field(default_factory=dict)
    path: Path | None = None  # external: PATH/{protocol}/{subject}/{sequence}/{camera}/{frame:05d}.png

    @model_validator(mode="after")
    def _path_iff_external(self) -> MethodConfig:
        if (self.kind == "external") != (self.path is not None):
            raise ValueError("path is required for kind 'external' and only for it")
        if self.overrides and self.kind not in ("geodiff4d", "vgm", "oracle"):
            raise ValueError(f"overrides apply to geodiff4d/vgm/oracle methods, not to kind {self.kind!r}")
        return self


class AblationConfig(StrictConfig):
    """An ablation study: each row a variant method against the full one, with the paper's row it repeats; the
    benchmark then writes ``RUN/ablations/`` (eval/ablation.py) after the leaderboard."""

    full: str  # the full method's name
    rows: dict[
        str, Literal["joint_normals", "domain_attention", "cross_view_pairs", "synthetic_data", "normal_loss"]
    ]
    # the full method again with another training seed (overrides of seeds only): the seed variance the rows'
    # differences are read against
    seed_replicates: list[str] = Field(default_factory=list)


class BenchmarkConfig(StrictConfig):
    data: DataConfig
    subjects: list[str] | None = None  # default: every subject of the data
    protocols: list[Literal["self", "cross", "novel_views"]] = Field(default_factory=lambda: list(PROTOCOLS))
    train_sequence: str | None = None  # default: each subject's first sequence
    train_camera: str = MONO_TRAIN_CAMERA
    holdout_cameras: list[str] = Field(default_factory=lambda: list(MONO_HOLDOUT_CAMERAS))
    nvs_train_camera: str = NVS_TRAIN_CAMERA  # novel_views: GeoDiff4D's input view, an NVS train camera
    nvs_holdout_cameras: list[str] = Field(default_factory=lambda: list(NVS_HOLDOUT_CAMERAS))
    generation: GenerationConfig = GenerationConfig()
    recon: dict[str, Any] = Field(default_factory=dict)  # ReconConfig fields, validated like recon --config
    methods: list[MethodConfig]
    eval: EvalConfig = EvalConfig()
    ablation: AblationConfig | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> BenchmarkConfig:
        names = [m.name for m in self.methods]
        if not names:
            raise ValueError("methods: name at least one method")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"methods: duplicated names {duplicated}")
        if self.train_camera in self.holdout_cameras:
            raise ValueError(f"train_camera {self.train_camera} is also a hold-out camera")
        if self.nvs_train_camera in self.nvs_holdout_cameras:
            raise ValueError(f"nvs_train_camera {self.nvs_train_camera} is also an NVS hold-out camera")
        if self.ablation is not None:
            named = {self.ablation.full, *self.ablation.rows, *self.ablation.seed_replicates}
            unknown = sorted(named - set(names))
            if unknown:
                raise ValueError(f"ablation names methods that are not in methods: {unknown}")
        seen = sorted(set(self.subjects or []) & set(self.generation.train_subjects or []))
        if seen:
            raise ValueError(
                f"subjects {seen} are also generation.train_subjects: evaluated subjects must be held out "
                f"of training"
            )
        unknown = sorted(set(self.eval.metrics) - set(self.protocols))
        if unknown:
            raise ValueError(f"eval.metrics names protocols not run: {unknown}")
        return self


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, section by section (a copy; neither input changes)."""
    merged = dict(base)
    for key, value in changes.items():
        both_sections = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge(merged[key], value) if both_sections else value
    return merged


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"recon.fit.steps": 5}`` -> ``{"recon": {"fit": {"steps": 5}}}``."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *path, leaf = dotted.split(".")
        nested = merge(
            nested, functools.reduce(lambda inner, key: {key: inner}, reversed(path), {leaf: value})
        )
    return nested


def method_config(config: BenchmarkConfig, method: MethodConfig, where: str = "") -> BenchmarkConfig:
    """The benchmark as ``method`` sees it: its variant's dotted overrides applied, validated again."""
    raw = merge(config.model_dump(mode="json"), dotted_to_nested(method.overrides))
    return validate(where or f"methods[{method.name}].overrides", raw, BenchmarkConfig)


def gen_config_mapping(config: BenchmarkConfig) -> dict[str, Any]:
    """The diffusion config this benchmark trains: the named config with ``generation.model_overrides``."""
    return merge(read_mapping(config.generation.model), config.generation.model_overrides)


def load_benchmark_config(path: str | Path) -> BenchmarkConfig:
    """The config, with every method's variant (its gen and recon configs too) checked, so that a typo fails
    here, naming the field, before any work starts."""
    from geodiff4d.gen.config import GenConfig
    from geodiff4d.recon.run import recon_config_from_mapping

    path = resolve_config(path)
    config = validate(path, anchor_runs(read_mapping(path), path.parent), BenchmarkConfig)
    for method in config.methods:
        where = f"methods[{method.name}]"
        variant = method_config(config, method, f"{path}: {where}.overrides")
        recon_config_from_mapping(variant.recon, path, prefix=f"{where}: recon")
        if method.kind not in MODEL_KINDS:
            continue
        if variant.generation.run is not None:
            _check_run(variant.generation.run, f"{path}: {where}: generation.run")
        else:
            gen = validate(path, gen_config_mapping(variant), GenConfig, prefix=f"{where}: generation.model")
            _check_train_workers(gen, variant.generation.train_workers, f"{path}: {where}")
            clip, procedural = gen.train.stage2.frames, variant.data.procedural
            if procedural is not None and procedural.frames < clip:
                raise ConfigError(
                    f"{path}: data.procedural.frames ({procedural.frames}) is shorter than the "
                    f"{clip}-frame clips that training stage 2 of {where} needs"
                )
    return config


def anchor_runs(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``generation.run`` (top level and in method overrides) relative to the config file's folder, so a config
    that ships a run beside it (configs/benchmark-demo.yaml) works from any working directory."""

    def anchored(run: Any) -> Any:
        return str((folder / run).resolve()) if isinstance(run, str) and not Path(run).is_absolute() else run

    raw = dict(raw)
    if isinstance(raw.get("generation"), dict) and "run" in raw["generation"]:
        raw["generation"] = {**raw["generation"], "run": anchored(raw["generation"]["run"])}
    if isinstance(raw.get("methods"), list):
        raw["methods"] = methods = list(raw["methods"])
        for i, method in enumerate(methods):
            overrides = method.get("overrides") if isinstance(method, dict) else None
            if isinstance(overrides, dict) and "generation.run" in overrides:
                run = anchored(overrides["generation.run"])
                methods[i] = {**method, "overrides": {**overrides, "generation.run": run}}
    return raw


def _check_run(run: Path, where: str) -> None:
    """A trained run folder that sampling can load: its config and a weights folder."""
    from geodiff4d.gen.checkpoint import resolve_init
    from geodiff4d.gen.model_run import run_config

    try:
        run_config(run)
        resolve_init(run)
    except (ConfigError, FileNotFoundError) as err:
        raise ConfigError(f"{where}: not a trained run folder: {err}") from err


def _check_train_workers(gen: Any, workers: int, where: str) -> None:
    """Both training stages' global batches split over ``generation.train_workers`` (before any work)."""
    for stage in (1, 2):
        try:
            gen.train.worker_batch(stage, workers)
        except ValueError as err:
            raise ConfigError(f"{where}: generation.train_workers: {err}") from err

"""A training run folder is self-contained: everything sampling needs lives beside the checkpoints.

RUN/config.yaml is the resolved GenConfig (model shape, codec: `pixel` or the VAE folder it names, sampler
settings), RUN/scheduler/scheduler_config.json the sampler's diffusers scheduler, RUN/checkpoints/step_*/ema
the weights. So `geodiff4d sample` and `geodiff4d generate` take the run folder alone, and
:func:`export_pipeline` turns a run into a diffusers pipeline folder that needs neither our CLI nor YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geodiff4d.core.config import ConfigError
from geodiff4d.core.io.atomic import atomic_write_bytes
from geodiff4d.core.io.json_yaml import write_yaml
from geodiff4d.gen.build import build_codec
from geodiff4d.gen.checkpoint import resolve_init
from geodiff4d.gen.config import GenConfig, load_config
from geodiff4d.gen.denoiser import JointDenoiser
from geodiff4d.gen.pipeline import Guidance, make_scheduler, speed_options

CONFIG_FILE = "config.yaml"
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"


def sampler_scheduler(cfg: GenConfig):
    """The diffusers scheduler the config samples with."""
    return make_scheduler(cfg.sample.scheduler, cfg.train.num_train_timesteps)


def guidance(cfg: GenConfig) -> Guidance:
    s = cfg.sample
    return Guidance(s.steps, s.guidance_reference, s.guidance_expression, s.window, s.overlap, s.max_batch)


def write_run_files(run: str | Path, cfg: GenConfig) -> None:
    """RUN/config.yaml and RUN/scheduler/scheduler_config.json, written atomically (training calls this)."""
    run = Path(run)
    write_yaml(run / CONFIG_FILE, cfg.model_dump(mode="json"))
    atomic_write_bytes(run / SCHEDULER_FILE, sampler_scheduler(cfg).to_json_string().encode())


@dataclass
class LoadedRun:
    cfg: GenConfig
    model: JointDenoiser  # EMA weights of the latest checkpoint, eval mode
    codec: object  # PixelLatents | VaeLatents

    @property
    def guidance(self) -> Guidance:
        return guidance(self.cfg)

    def scheduler(self):
        return sampler_scheduler(self.cfg)

    def to(self, device) -> LoadedRun:
        """Model and codec on `device`, the model with the sample config's speed options."""
        s = self.cfg.sample
        self.model = speed_options(
            self.model, device, compile=s.compile, channels_last=s.channels_last, bf16_weights=s.bf16_weights
        )
        self.codec.to(device)
        return self


def run_config(run: str | Path, config: str | Path | None = None) -> GenConfig:
    """The run's own config.yaml, or `config` for runs trained before runs saved it."""
    path = Path(config) if config is not None else Path(run) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path}: no config; a training run folder holds config.yaml "
            "(runs from older versions need --config)"
        )
    return load_config(path)


def load_run(run: str | Path, config: str | Path | None = None) -> LoadedRun:
    """Config, EMA model and codec of a training run folder."""
    cfg = run_config(run, config)
    # low_cpu_mem_usage=False: accelerate is no dependency, and diffusers warns in every actor unless told
    model = JointDenoiser.from_pretrained(str(resolve_init(Path(run))), low_cpu_mem_usage=False).eval()
    return LoadedRun(cfg, model, build_codec(cfg))


def export_pipeline(run: str | Path, out: str | Path | None = None) -> Path:
    """Save the run as a GeoDiff4DPipeline folder (default RUN/pipeline) that DiffusionPipeline.from_pretrained loads."""
    from geodiff4d.gen.diffusion_pipeline import GeoDiff4DPipeline

    loaded = load_run(run)
    out = Path(out) if out is not None else Path(run) / "pipeline"
    GeoDiff4DPipeline.from_run(loaded).save_folder(out)
    return out

"""One config style: every config refuses unknown fields and wrong types, naming the source and the field,
whether it is built in code or read from a file, and configs written by a run are validated when read back."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest
import yaml

from geodiff4d.cluster.benchmark import _remember_config
from geodiff4d.cluster.benchmark_config import BenchmarkConfig, load_benchmark_config
from geodiff4d.core.config import ConfigError, StrictConfig, load_yaml_config, read_mapping, validate
from geodiff4d.datasets.packing import PackError, PackSettings, read_pack_settings
from geodiff4d.datasets.procedural import SynthSpec, SynthSpecError
from geodiff4d.eval.settings import EvalSettings, SettingsError
from geodiff4d.gen.config import GenConfig
from geodiff4d.gen.data import check_shard_resolution
from geodiff4d.gen.generate_spec import GenerateSpec
from geodiff4d.recon.fit import FitConfig
from geodiff4d.recon.refine import RefineConfig
from geodiff4d.recon.run import ReconConfig, load_recon_config, render_avatar
from geodiff4d.recon.tracking import TrackingConfig

# (config, a valid mapping, an int field to give a wrong type, the error the config raises)
CONFIGS: list[tuple[type[StrictConfig], Any, str, type[Exception]]] = [
    (GenConfig, lambda: read_mapping("demo"), "model.unet.layers_per_block", ConfigError),
    (GenerateSpec, lambda: read_mapping("generate"), "frames_per_unit", ConfigError),
    (BenchmarkConfig, lambda: read_mapping("benchmark-demo"), "seed", ConfigError),
    (ReconConfig, lambda: read_mapping("recon"), "steps", ConfigError),
    (FitConfig, dict, "checkpoint_every", ConfigError),
    (TrackingConfig, dict, "chunk_frames", ConfigError),
    (RefineConfig, dict, "uv_size", ConfigError),
    (EvalSettings, lambda: {"metrics": ["psnr"]}, "resolution", SettingsError),
    (PackSettings, lambda: {"resolution": 64}, "resolution", PackError),
    (SynthSpec, lambda: {"subjects": 1, "resolution": 64}, "frames", SynthSpecError),
]
IDS = [config.__name__ for config, *_ in CONFIGS]


def _set(mapping: dict, dotted: str, value: Any) -> dict:
    """``mapping`` with the field at ``dotted`` (``a.b.c``) set to ``value``; nested mappings are created."""
    head, _, rest = dotted.partition(".")
    inner = mapping.get(head) or {}
    return {**mapping, head: _set(inner, rest, value) if rest else value}


@pytest.mark.parametrize(("config", "valid", "field", "error"), CONFIGS, ids=IDS)
def test_a_file_with_an_unknown_field_or_a_wrong_type_is_refused_naming_file_and_field(
    tmp_path, config, valid, field, error
):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(valid()))
    assert isinstance(load_yaml_config(path, config), config)  # the valid mapping loads
    for bad, named in (
        (_set(valid(), "speling_mistake", 1), "unknown field speling_mistake"),
        (_set(valid(), field, "many"), f"{field}: Input should be a valid integer"),
    ):
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(error) as refused:
            load_yaml_config(path, config)
        assert str(refused.value).startswith(f"{path}: invalid config:") and named in str(refused.value)


@pytest.mark.parametrize(("config", "valid", "field", "error"), CONFIGS, ids=IDS)
def test_a_config_built_in_code_refuses_an_unknown_field_or_a_wrong_type_naming_class_and_field(
    config, valid, field, error
):
    built = config(**valid())
    assert config(**valid()) == built and pickle.loads(pickle.dumps(built)) == built  # a value Ray can ship
    with pytest.raises(error, match=rf"^{config.__name__}: invalid config:\n  unknown field speling_mistake"):
        config(**valid(), speling_mistake=1)
    with pytest.raises(error, match=rf"^{config.__name__}: invalid config:\n  {field}: Input should be"):
        config(**_set(valid(), field, "many"))
    with pytest.raises(ValueError, match="frozen"):  # configs are values: changed by model_copy(update=...)
        setattr(built, next(iter(config.model_fields)), None)


@pytest.mark.parametrize(
    ("config", "mapping", "message"),
    [
        (SynthSpec, {"resolution": 7}, "resolution must be even for H.264 video, got 7"),
        (PackSettings, {"resolution": -64}, "resolution: --resolution must be a positive even number"),
        (
            PackSettings,
            {"synthhuman_subset": "legs"},
            "synthhuman_subset: --synthhuman-subset must be one of",
        ),
        (EvalSettings, {"protocol": "sideways"}, "protocol must be 'self' or 'cross', got 'sideways'"),
        (EvalSettings, {"background": 2.0}, r"background must be a grey level in \[0,1\], got 2.0"),
        (ReconConfig, {"tracker": "magic"}, "ReconConfig.tracker must be 'file' or 'ours'"),
        (TrackingConfig, {"chunk_frames": 0}, "TrackingConfig.chunk_frames must be at least 1, got 0"),
        (FitConfig, {"lr": {"sh_rets": 1e-3}}, r"lr: unknown parameter group\(s\) \['sh_rets'\]"),
    ],
)
def test_hand_written_checks_keep_their_messages_and_name_the_source(tmp_path, config, mapping, message):
    with pytest.raises(config.config_error, match=rf"^{config.__name__}: invalid config:\n  {message}"):
        config(**mapping)
    with pytest.raises(config.config_error, match=rf"^{tmp_path}/c.yaml: invalid config:\n  {message}"):
        validate(tmp_path / "c.yaml", mapping, config)


def test_recon_sections_are_validated_with_the_file_and_section_named(tmp_path):
    path = tmp_path / "recon.yaml"
    path.write_text(yaml.safe_dump({"steps": 10, "tracking_options": {"steps": "many"}}))
    with pytest.raises(
        ConfigError, match=rf"^{path}: invalid config:\n  tracking_options.steps: Input should be"
    ):
        load_recon_config(path)


def test_a_reloaded_recon_config_is_validated(tmp_path):
    """render_avatar reads the avatar's saved config back: a hand-edited bad value is refused naming the file
    and the field, before any checkpoint is loaded (it used to be passed to ReconConfig(**...) unchecked)."""
    avatar = tmp_path / "avatar"
    avatar.mkdir()
    saved = {"config": ReconConfig(steps=5).model_dump(), "sequences": {"EXP-1": 2}, "pixel_m": 0.001}
    for edit, named in (
        ({"steps": "five"}, "config.steps: Input should be a valid integer"),
        ({"stepz": 5}, "unknown field config.stepz"),
        ({"fit": {"lambda_normal": "strong"}}, "config.fit.lambda_normal: Input should be a valid number"),
    ):
        (avatar / "avatar.json").write_text(json.dumps({**saved, "config": {**saved["config"], **edit}}))
        with pytest.raises(ConfigError) as refused:
            render_avatar(avatar, tmp_path / "cameras.json", None, tmp_path / "out")
        assert str(refused.value).startswith(f"{avatar / 'avatar.json'}: invalid config:")
        assert named in str(refused.value)


def test_a_written_benchmark_config_is_validated_when_read_back(tmp_path):
    """The run folder's benchmark.yaml is read back through the loader: a hand-edited bad value is refused
    naming the file and the field (it used to escape as a raw pydantic error naming neither)."""
    config = load_benchmark_config("benchmark-demo")
    path = tmp_path / "benchmark.yaml"
    _remember_config(path, config)
    _remember_config(path, config)  # the same config again: accepted
    assert "\nseed: 0\n" in path.read_text()
    path.write_text(path.read_text().replace("\nseed: 0\n", "\nseed: zero\n"))
    with pytest.raises(
        ConfigError, match=rf"^{path}: invalid config:\n  seed: Input should be a valid integer"
    ):
        _remember_config(path, config)


def test_a_written_pack_settings_file_is_validated_when_read_back(tmp_path):
    """Training reads the shards' pack_settings.json through PackSettings: a hand-edited bad value is refused
    naming the file and the field (it used to be compared raw, "holds big px samples")."""
    settings = PackSettings(resolution=32)
    path = tmp_path / "pack_settings.json"
    record = {
        **settings.model_dump(),
        "samples_per_shard": 4,
        "max_shard_bytes": 1 << 20,
        "listing_sha256": "0",
    }
    path.write_text(json.dumps(record))
    assert read_pack_settings(tmp_path) == settings
    cfg = GenConfig.model_validate(_set(read_mapping("demo"), "data.resolution", 32))
    check_shard_resolution(tmp_path, cfg)
    for edit, named in (
        ({"resolution": "big"}, "resolution: Input should be a valid integer"),
        ({"resolutoin": 32}, "unknown field resolutoin"),
    ):
        path.write_text(json.dumps({**record, **edit}))
        with pytest.raises(PackError) as refused:
            check_shard_resolution(tmp_path, cfg)
        assert str(refused.value).startswith(f"{path}: invalid config:") and named in str(refused.value)

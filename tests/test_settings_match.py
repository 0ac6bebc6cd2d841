"""The one check a resumable stage makes before writing into an existing output: the stored settings match."""

import json

import pytest

from geodiff4d.core.errors import UserError
from geodiff4d.core.settings_match import (
    SettingsChangedError,
    refuse_differences,
    require_same_settings,
    settings_differences,
)


def test_first_run_stores_the_settings_and_a_same_rerun_passes(tmp_path):
    path = tmp_path / "out" / "settings.json"
    settings = {"resolution": 32, "seed": 3, "nested": {"b": [1, 2], "a": None}}
    require_same_settings(path, settings)
    assert path.read_text() == json.dumps(settings, indent=1, sort_keys=True)  # the stages' layout
    require_same_settings(path, json.loads(json.dumps(settings)))  # equal after a JSON round trip
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]  # no temp file left


def test_a_changed_rerun_names_the_file_and_lists_each_differing_field(tmp_path):
    path = tmp_path / "settings.json"
    require_same_settings(path, {"resolution": 32, "seed": 3, "crop": {"margin": 0.1, "mode": "box"}})
    with pytest.raises(SettingsChangedError) as caught:
        require_same_settings(
            path, {"resolution": 64, "seed": 3, "crop": {"margin": 0.2, "mode": "box"}, "new": 1}
        )
    assert str(caught.value) == (
        f"{path} was written with other settings (use another output folder):\n"
        "  crop.margin: 0.1 -> 0.2\n"
        "  new: <absent> -> 1\n"
        "  resolution: 32 -> 64"
    )
    assert isinstance(caught.value, UserError)
    assert json.loads(path.read_text())["resolution"] == 32  # the stored settings are kept


def test_a_stage_keeps_its_own_error_type_and_advice(tmp_path):
    class StageError(UserError):
        pass

    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"subjects": 9}))
    with pytest.raises(
        StageError, match=r"spec\.json was written with other settings \(use a new --out\):\n"
    ):
        require_same_settings(path, {"subjects": 2}, error=StageError, advice="use a new --out")


def test_differences_compare_values_not_types_of_mapping_and_list_removed_fields():
    assert settings_differences({"a": 1, "b": {"c": [1]}}, {"b": {"c": [1]}, "a": 1.0}) == []
    assert settings_differences({"a": {"x": 1}, "gone": True}, {"a": 3}) == [
        "a: {'x': 1} -> 3",
        "gone: True -> <absent>",
    ]
    refuse_differences("anywhere", [])  # nothing differs: nothing raised


def test_a_corrupt_settings_file_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"settings\.json: malformed JSON"):
        require_same_settings(path, {"a": 1})

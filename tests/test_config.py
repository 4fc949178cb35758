import tomllib
from pathlib import Path

import pytest

from crosssim.boundary import RUN_KEYS
from crosssim.config import (FIELD_INDEX, ConfigError, CrossSimConfig, apply_overrides, dumps_toml, load_config,
                             preprocessing_hash, to_flat, to_run_config)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_defaults_file_matches_dataclass_defaults_and_sets_no_classes():
    assert to_flat(load_config()) == to_flat(CrossSimConfig())
    assert load_config().data.classes == ()  # never a preset's classes: a consortium's own labels decide


def test_every_config_key_is_declared_for_flower_run_config():
    """Flower's SuperLink refuses `flwr run --run-config` keys that [tool.flwr.app.config] does not declare."""
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(declared) == set(FIELD_INDEX) | set(RUN_KEYS)
    assert all(declared[key] == "" for key in FIELD_INDEX)  # empty = unset: config-file and defaults decide


def test_run_config_values_are_scalars_that_load_back():
    cfg = apply_overrides(CrossSimConfig(), {"classes": "normal,abnormal", "lr": 0.005, "augment": False})
    values = to_run_config(cfg)
    assert values["classes"] == "normal,abnormal"
    assert all(isinstance(v, (str, int, float, bool)) for v in values.values())
    assert apply_overrides(CrossSimConfig(), values) == cfg


@pytest.mark.parametrize("classes", ["a,a", "a, ,b"])
def test_class_names_must_be_unique_and_non_empty(classes):
    with pytest.raises(ConfigError, match="classes"):
        apply_overrides(CrossSimConfig(), {"classes": classes.split(",")})


def test_overrides_coerce_types_and_reject_unknown_keys():
    cfg = apply_overrides(CrossSimConfig(), {"lr": "0.01", "amp": "false", "classes": "a,b", "rounds": 3})
    assert cfg.train.lr == 0.01 and cfg.train.amp is False
    assert cfg.data.classes == ("a", "b") and cfg.federation.rounds == 3
    with pytest.raises(ConfigError, match="unknown config key 'learning-rate'"):
        apply_overrides(cfg, {"learning-rate": 1})
    with pytest.raises(ConfigError, match="strategy"):
        apply_overrides(cfg, {"strategy": "fedmagic"})


def test_saved_config_round_trips(tmp_path):
    cfg = apply_overrides(CrossSimConfig(), {"seed": 7, "backbone": "resnet18", "lambda-sim": 0.25})
    path = tmp_path / "run.toml"
    path.write_text(dumps_toml(cfg))
    assert load_config(path) == apply_overrides(load_config(), to_flat(cfg))


def test_bad_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nepochs = 'many'\n")
    with pytest.raises(ConfigError, match="bad.toml.*epochs"):
        load_config(path)


def test_preprocessing_hash_tracks_only_preprocessing_fields():
    base = CrossSimConfig().data
    assert preprocessing_hash(base) == preprocessing_hash(apply_overrides(CrossSimConfig(), {"val-fraction": 0.3}).data)
    assert preprocessing_hash(base) != preprocessing_hash(apply_overrides(CrossSimConfig(), {"image-size": 32}).data)

import pytest

from crosssim.config import (ConfigError, CrossSimConfig, apply_overrides, dumps_toml, load_config,
                             preprocessing_hash, to_flat)


def test_defaults_file_matches_dataclass_defaults_except_classes():
    from_file = to_flat(load_config())
    from_code = to_flat(CrossSimConfig())
    differing = {k for k in from_file if from_file[k] != from_code[k]}
    assert differing == {"classes"}


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

"""One typed configuration for every CrossSim command, loaded from TOML.

Sections mirror ``configs/default.toml``. Keys are kebab-case in TOML, in Flower's run-config and on the
command line; every key is unique across sections, so a flat ``{"lr": 0.01}`` override finds its field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG_PATH = CONFIGS_DIR / "default.toml"


@dataclass(frozen=True)
class DataConfig:
    """Data contract and the one preprocessing function's settings."""

    classes: tuple[str, ...] = ()  # empty: sorted union of the labels seen
    image_size: int = 64  # pixels a side after resizing
    normalize: str = "minmax"  # minmax (percentile clip, scale to [0,1]) | zscore
    clip_low_percentile: float = 0.5
    clip_high_percentile: float = 99.5
    frame: str = "middle"  # multi-frame rule: middle | first | last | max | mean
    voi_lut: bool = False  # apply the file's VOI LUT / window when present
    val_fraction: float = 0.2  # of each labeled site, held out for validation
    cache_dir: str = ""  # empty: ~/.cache/crosssim


AUGMENT_MODES = ("none", "basic", "scanner")
# one-message: each round's train message also carries the evaluation of the incoming global model (the previous
# round's aggregate) and one evaluate message follows the last round; two-messages: train, then evaluate, each round.
ROUND_STYLES = ("one-message", "two-messages")
# Values of keys whose type changed, as old configs and checkpoints (``to_flat``) still hold them.
LEGACY_VALUES = {"augment": {"true": "basic", "false": "none"}}


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation of training batches only (crosssim/augment.py); ``scanner-*`` ranges: crosssim/scanner.py."""

    augment: str = "basic"  # none | basic | scanner (crosssim/scanner.py); true/false = basic/none
    rotate_deg: float = 5.0
    zoom_fraction: float = 0.05
    flip_probability: float = 0.5
    contrast_gamma: float = 0.2  # basic: gamma in [1-g, 1+g]
    intensity_shift: float = 0.05  # basic
    noise_std: float = 0.01  # basic
    scanner_strength: float = 1.0  # multiplies every scanner-* range below; 0: geometry only
    scanner_probability: float = 0.5  # chance that each scanner op acts on a sample
    scanner_log_gamma: float = 0.4  # gamma = e^u, u uniform in [-g, g]
    scanner_bias_coefficient: float = 0.1  # each Legendre coefficient of the log bias field in [-c, c]
    scanner_blur_sigma_px: float = 1.0  # blur sigma in [0, s] pixels at image-size
    scanner_sharpen_alpha: float = 1.0  # unsharp-mask weight in [0, a]
    scanner_noise_std: float = 0.03  # Gaussian / Rician sigma in [0, s] x the image's intensity range
    scanner_low_resolution: float = 0.5  # detector down to a fraction in [1-r, 1] of image-size, then back
    scanner_remap: float = 1.0  # fraction of RandHistogramShift's control-point shift (capped at 1)
    scanner_gin_alpha: float = 1.0  # GIN mixing weight in [0, a] (capped at 1)
    anchor_view: str = "auto"  # pair loss: the first view's augmentation (auto = augment's | none | basic | scanner)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "seed-cnn"  # seed-cnn | resnet18 | densenet121
    embedding_dim: int = 128


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # pooled/local training epochs
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | plateau | constant
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # mixed precision on CUDA only
    num_threads: int = 0  # torch CPU threads; 0 leaves torch's default


@dataclass(frozen=True)
class MethodConfig:
    """The similarity term and the federated strategy."""

    strategy: str = "crosssim"  # crosssim | fedavg | fedprox | fedbn
    similarity: str = "infonce"  # infonce | contrastive
    lambda_sim: float = 0.5
    temperature: float = 0.1  # infonce
    margin: float = 1.0  # contrastive, in embedding distance
    lambda_warmup: int = 1  # rounds (or epochs when pooled) over which lambda ramps up once prototypes exist
    min_count: int = 5  # a class with fewer samples at a site sends no prototype
    prototype_noise_std: float = 0.0  # Gaussian noise added to each sent prototype
    proximal_mu: float = 0.01  # fedprox only
    pair_loss: bool = True  # crosssim: two scanner views per image and the pair term between them
    consistency_weight: float = 0.0  # crosssim with pair-loss: weight of the symmetric KL between the views
    style_mix_probability: float = 0.0  # crosssim: per-sample chance of mixing toward another site's style; 0: off
    style_layers: int = 2  # crosssim: first BatchNorm2d layers whose feature statistics form the style bank
    style_alpha: float = 0.1  # Beta(α, α) weight of a sample's own statistics in a mix (MixStyle's 0.1)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 10
    local_epochs: int = 2
    min_sites: int = 3
    fraction_train: float = 1.0
    update_dtype: str = "float32"  # float32 | float16 on the wire
    round_timeout_s: float = 3600.0
    round_retries: int = 2  # a round with fewer than min-sites train replies is sent again this many times
    max_update_norm_ratio: float = 10.0  # reject an update whose norm exceeds this × the round's median; 0: off
    aggregation: str = "mean"  # mean (FedAvg) | median (FedMedian) | trimmed-mean (FedTrimmedAvg)
    trimmed_mean_beta: float = 0.2  # trimmed-mean: fraction cut from each end per value, in [0, 0.5)
    round_style: str = "one-message"  # one-message | two-messages per site and round (server/strategy.py)
    reply_poll_s: float = 0.25  # the ServerApp's wait between pulls for replies (server/grid.py); Flower's is 3 s


@dataclass(frozen=True)
class AdaptConfig:
    """Adaptation at the target (crosssim/adapt.py): from the checkpoint, ``evaluate --set`` overrides."""

    tent_steps: int = 10  # TENT gradient steps, one target mini-batch each
    tent_lr: float = 1e-3  # TENT Adam learning rate on BatchNorm affine parameters
    shot_epochs: int = 3  # crosssim adaptation: passes over the target's images
    shot_lr: float = 3e-5  # crosssim adaptation: Adam learning rate of the feature layers
    shot_diversity_weight: float = 1.0  # weight of KL(mean prediction || sources' class prevalence)
    shot_pseudo_weight: float = 0.3  # weight of cross-entropy to nearest-centroid pseudo-labels (SHOT's 0.3)
    few_shot_steps: int = 50  # few-shot: gradient steps on BatchNorm affine parameters and the head
    few_shot_lr: float = 1e-3  # few-shot: Adam learning rate


@dataclass(frozen=True)
class CrossSimConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


SECTIONS = ("data", "augment", "model", "train", "method", "federation", "adapt")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _field_index() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Map each kebab-case key to (section or None for top level, field)."""
    index: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for top in fields(CrossSimConfig):
        if top.name in SECTIONS:
            for f in fields(top.default_factory()):  # type: ignore[misc]
                key = _kebab(f.name)
                assert key not in index, f"config key {key} is not unique"
                index[key] = (top.name, f)
        else:
            index[_kebab(top.name)] = (None, top)
    return index


FIELD_INDEX = _field_index()


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a TOML/run-config/CLI value to the type of the field's default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, str) and key in LEGACY_VALUES:
            return LEGACY_VALUES[key].get(str(value).lower(), str(value))
        if isinstance(default, tuple):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(str(v) for v in value)
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key '{key}': cannot use {value!r} as {type(default).__name__}") from exc


def apply_overrides(cfg: CrossSimConfig, overrides: Mapping[str, Any]) -> CrossSimConfig:
    """Return a copy of ``cfg`` with flat kebab-case (or snake_case) keys replaced."""
    per_section: dict[str | None, dict[str, Any]] = {}
    for raw_key, value in overrides.items():
        key = _kebab(raw_key.split(".")[-1])
        if key not in FIELD_INDEX:
            raise ConfigError(f"unknown config key '{raw_key}' (known: {', '.join(sorted(FIELD_INDEX))})")
        section, f = FIELD_INDEX[key]
        current = getattr(cfg, f.name) if section is None else getattr(getattr(cfg, section), f.name)
        per_section.setdefault(section, {})[f.name] = _coerce(key, value, current)
    top_changes = dict(per_section.pop(None, {}))
    for section, changes in per_section.items():
        top_changes[section] = dataclasses.replace(getattr(cfg, section), **changes)
    cfg = dataclasses.replace(cfg, **top_changes)
    validate(cfg)
    return cfg


def _flatten_toml(doc: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping):
            if key not in SECTIONS:
                raise ConfigError(f"unknown config section [{key}] (known: {', '.join(SECTIONS)})")
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> CrossSimConfig:
    """Defaults from ``configs/default.toml``, then ``path`` (if given), then flat ``overrides``."""
    cfg = CrossSimConfig()
    for source in (DEFAULT_CONFIG_PATH, path):
        if source is None:
            continue
        source = Path(source)
        if not source.is_file() and source == DEFAULT_CONFIG_PATH:
            continue  # installed without the configs folder: dataclass defaults stand
        try:
            doc = tomllib.loads(source.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML ({exc})") from None
        try:
            cfg = apply_overrides(cfg, _flatten_toml(doc))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return apply_overrides(cfg, overrides or {})


def validate(cfg: CrossSimConfig) -> None:
    choices = {
        "normalize": (cfg.data.normalize, ("minmax", "zscore")),
        "augment": (cfg.augment.augment, AUGMENT_MODES),
        "anchor-view": (cfg.augment.anchor_view, ("auto", "none", "basic", "scanner")),
        "frame": (cfg.data.frame, ("middle", "first", "last", "max", "mean")),
        "backbone": (cfg.model.backbone, ("seed-cnn", "resnet18", "densenet121")),
        "schedule": (cfg.train.schedule, ("cosine", "plateau", "constant")),
        "strategy": (cfg.method.strategy, ("crosssim", "fedavg", "fedprox", "fedbn")),
        "similarity": (cfg.method.similarity, ("infonce", "contrastive")),
        "update-dtype": (cfg.federation.update_dtype, ("float32", "float16")),
        "aggregation": (cfg.federation.aggregation, ("mean", "median", "trimmed-mean")),
        "round-style": (cfg.federation.round_style, ROUND_STYLES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
    if cfg.data.image_size < 8:
        raise ConfigError("config key 'image-size': must be at least 8 pixels")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("config key 'val-fraction': must be in [0, 1)")
    bad_classes = [c for c in cfg.data.classes if not c or "," in c or c != c.strip()]
    if bad_classes or len(set(cfg.data.classes)) != len(cfg.data.classes):
        raise ConfigError(f"config key 'classes': names must be unique, non-empty, without commas or surrounding "
                          f"spaces (got {list(cfg.data.classes)})")
    if not 0.0 <= cfg.method.style_mix_probability <= 1.0:
        raise ConfigError("config key 'style-mix-probability': must be in [0, 1]")
    if cfg.method.style_layers < 0 or cfg.method.style_alpha < 0 or cfg.method.consistency_weight < 0:
        raise ConfigError("config keys 'style-layers', 'style-alpha', 'consistency-weight': must be non-negative")
    if min(cfg.adapt.tent_steps, cfg.adapt.shot_epochs, cfg.adapt.few_shot_steps) < 0:
        raise ConfigError("config keys 'tent-steps', 'shot-epochs', 'few-shot-steps': must be at least 0")
    if not 0.0 <= cfg.federation.trimmed_mean_beta < 0.5:
        raise ConfigError("config key 'trimmed-mean-beta': must be in [0, 0.5)")
    if cfg.federation.round_retries < 0 or cfg.federation.min_sites < 1:
        raise ConfigError("config keys 'round-retries' (≥ 0) and 'min-sites' (≥ 1): out of range")
    if cfg.method.min_count < 1:
        raise ConfigError("config key 'min-count': must be at least 1")
    if cfg.federation.reply_poll_s <= 0:
        raise ConfigError("config key 'reply-poll-s': must be more than 0 seconds")
    _validate_augment(cfg.augment)


def _validate_augment(augment: AugmentConfig) -> None:
    for f in fields(augment):
        if f.name.startswith("scanner_") and getattr(augment, f.name) < 0:
            raise ConfigError(f"config key '{_kebab(f.name)}': must be at least 0")
    for name in ("flip_probability", "scanner_probability"):
        if not 0 <= getattr(augment, name) <= 1:
            raise ConfigError(f"config key '{_kebab(name)}': must be in [0, 1]")
    if augment.scanner_low_resolution >= 1:
        raise ConfigError("config key 'scanner-low-resolution': must be in [0, 1)")


def to_nested(cfg: CrossSimConfig) -> dict[str, Any]:
    """Config as nested kebab-case dict, the shape of ``configs/default.toml``."""
    out: dict[str, Any] = {}
    for top in fields(cfg):
        value = getattr(cfg, top.name)
        if top.name in SECTIONS:
            out[top.name] = {_kebab(f.name): _plain(getattr(value, f.name)) for f in fields(value)}
        else:
            out[_kebab(top.name)] = value
    return out


def to_flat(cfg: CrossSimConfig) -> dict[str, Any]:
    """Config as one flat kebab-case dict (Flower run-config shape)."""
    flat: dict[str, Any] = {}
    for key, value in to_nested(cfg).items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def to_run_config(cfg: CrossSimConfig) -> dict[str, str | int | float | bool]:
    """Config as Flower run-config values (scalars only: lists become comma-separated strings)."""
    return {k: ",".join(v) if isinstance(v, list) else v for k, v in to_flat(cfg).items()}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps_toml(cfg: CrossSimConfig) -> str:
    lines: list[str] = []
    nested = to_nested(cfg)
    for key, value in nested.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in nested.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


def save_config(cfg: CrossSimConfig, path: str | Path) -> Path:
    """Write the effective config next to a run's outputs (the run's record of what it did)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_toml(cfg))
    return path


def preprocessing_hash(data: DataConfig) -> str:
    """Stable hash of the fields that change a preprocessed tensor (the cache key)."""
    relevant = {k: _plain(v) for k, v in dataclasses.asdict(data).items()
                if k not in ("classes", "val_fraction", "cache_dir")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

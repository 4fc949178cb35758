"""The cross-site style bank: domain-level feature statistics per site, and training that mixes toward them.

A site's *style entry* describes, for each of the model's first ``style-layers`` BatchNorm2d layers (selected
by type), how its images' feature maps look where they enter that layer (before normalization, where a
scanner's shift shows as moments): per channel, the mean and standard deviation over its images of the
instance means, and of the instance standard deviations (4·C floats per layer, plus the image count). That
is the same order of information as the BatchNorm running statistics FedAvg already ships, and nothing per
image. Every site (and an unlabeled target in the loop) measures its entry with the global model it has
just received, in eval mode, so all entries share one frame of reference.

During local training a forward pre-hook on each of those layers replaces, with probability
``style-mix-probability`` per sample, the sample's instance statistics by a mix (weight ~ Beta(α, α), as
MixStyle, Zhou et al. ICLR 2021) of its own and statistics drawn from another site's entry (a Gaussian
around that site's domain-level statistics, as DSU, Li et al. ICLR 2022). The instance statistics are
detached, as in MixStyle, so the gradient flows through the normalized features only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crosssim.model import INFERENCE_BATCH_SIZE

STYLE_STATS = ("mean-mean", "mean-std", "std-mean", "std-std")  # per channel, each (C,)
STYLE_COUNT = "count"  # (1,) int64: images behind the entry
INSTANCE_EPS = 1e-6  # added to instance variances before the square root


def style_layers(model: nn.Module, count: int) -> list[tuple[str, nn.Module]]:
    """The first ``count`` BatchNorm2d layers of ``model`` (by type), with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)][:count]


@dataclass(frozen=True)
class StyleEntry:
    """One site's domain-level statistics: {layer name: {stat: (C,) tensor}} and its image count."""

    layers: dict[str, dict[str, torch.Tensor]]
    count: int

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """Flat ``layer/stat`` arrays plus ``count``: the style record's content."""
        arrays = {f"{layer}/{stat}": value.float() for layer, stats in self.layers.items()
                  for stat, value in stats.items()}
        return {**arrays, STYLE_COUNT: torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, torch.Tensor], shapes: Mapping[str, int]) -> "StyleEntry":
        """Check and read a style record: exactly every ``layer/stat`` of ``shapes`` ({layer: channels})."""
        expected = {f"{layer}/{stat}" for layer in shapes for stat in STYLE_STATS} | {STYLE_COUNT}
        if set(arrays) != expected:
            raise ValueError(f"style record holds {sorted(set(arrays) ^ expected)[:3]}… beyond or short of the "
                             f"declared {len(expected)} arrays")
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for layer, channels in shapes.items():
            layers[layer] = {}
            for stat in STYLE_STATS:
                value = arrays[f"{layer}/{stat}"].float()
                if tuple(value.shape) != (channels,) or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"style statistic {layer}/{stat}: shape {tuple(value.shape)} (expected "
                                     f"({channels},)) or not finite")
                layers[layer][stat] = value
        count = arrays[STYLE_COUNT]
        if tuple(count.shape) != (1,) or int(count[0]) < 0:
            raise ValueError("style record count must be one non-negative integer")
        return cls(layers, int(count[0]))


def layer_channels(model: nn.Module, count: int) -> dict[str, int]:
    """{layer name: channels} of the style layers: the declared shapes of every style record."""
    return {name: m.num_features for name, m in style_layers(model, count)}


def _instance_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and standard deviation over the spatial axes of (N, C, H, W)."""
    mean = x.mean(dim=(2, 3))
    std = (x.var(dim=(2, 3), unbiased=False) + INSTANCE_EPS).sqrt()
    return mean, std


@torch.no_grad()
def compute_style(model: nn.Module, images: torch.Tensor, layer_count: int, device: torch.device,
                  min_count: int) -> StyleEntry:
    """The style entry of ``images`` (N, 1, H, W) under ``model`` in eval mode; count 0 (all zeros) under min_count."""
    layers = style_layers(model, layer_count)
    if len(images) < max(min_count, 2):
        return StyleEntry({name: {stat: torch.zeros(m.num_features) for stat in STYLE_STATS} for name, m in layers}, 0)
    means: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    stds: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            mean, std = _instance_stats(inputs[0].float())
            means[name].append(mean.cpu())
            stds[name].append(std.cpu())
        return hook

    model.to(device).eval()
    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in layers]
    try:
        for start in range(0, len(images), INFERENCE_BATCH_SIZE):
            model(images[start:start + INFERENCE_BATCH_SIZE].to(device))
    finally:
        for handle in handles:
            handle.remove()
    entry = {}
    for name, _ in layers:
        mean, std = torch.cat(means[name]), torch.cat(stds[name])
        entry[name] = {"mean-mean": mean.mean(0), "mean-std": mean.std(0), "std-mean": std.mean(0),
                       "std-std": std.std(0)}
    return StyleEntry(entry, len(images))


class StyleMixer:
    """Forward hooks that mix each sample's instance statistics toward styles drawn from bank entries.

    Every random draw comes from one numpy generator seeded by the caller: the same seed mixes the same way.
    """

    def __init__(self, entries: Sequence[StyleEntry], probability: float, alpha: float, seed: int) -> None:
        self.entries = [e for e in entries if e.count > 0]
        self.probability, self.alpha = probability, alpha
        self.rng = np.random.default_rng(seed)

    def hook(self, name: str):
        """A forward pre-hook for the style layer ``name``: mixes its input in training mode."""
        def mix(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            return (self.mix(name, inputs[0]), *inputs[1:]) if module.training and self.entries else None
        return mix

    def mix(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, H, W) with the chosen samples' statistics mixed toward a drawn site style."""
        n, channels = x.shape[:2]
        chosen = self.rng.random(n) < self.probability
        if not chosen.any():
            return x
        pick = self.rng.integers(len(self.entries), size=n)
        stats = {stat: torch.stack([self.entries[i].layers[name][stat] for i in pick]).to(x.device)
                 for stat in STYLE_STATS}
        noise = torch.from_numpy(self.rng.standard_normal((2, n, channels))).float().to(x.device)
        drawn_mean = stats["mean-mean"] + noise[0] * stats["mean-std"]
        drawn_std = (stats["std-mean"] + noise[1] * stats["std-std"]).clamp(min=INSTANCE_EPS)
        keep = self.rng.beta(self.alpha, self.alpha, size=n) if self.alpha > 0 else np.zeros(n)
        weight = torch.from_numpy(np.where(chosen, keep, 1.0)).float().to(x.device).unsqueeze(1)
        mean, std = (s.detach() for s in _instance_stats(x.float()))
        mixed_mean = weight * mean + (1 - weight) * drawn_mean
        mixed_std = weight * std + (1 - weight) * drawn_std
        normalized = (x.float() - mean[:, :, None, None]) / std[:, :, None, None]
        return (normalized * mixed_std[:, :, None, None] + mixed_mean[:, :, None, None]).to(x.dtype)


@contextmanager
def mixing_styles(model: nn.Module, mixer: StyleMixer | None, layer_count: int) -> Iterator[None]:
    """Within the block, the style layers of ``model`` mix styles in training mode (nothing when ``mixer`` is None)."""
    if mixer is None or not mixer.entries:
        yield
        return
    handles = [m.register_forward_pre_hook(mixer.hook(name)) for name, m in style_layers(model, layer_count)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def aggregate_bank(bank: Mapping[str, StyleEntry], replies: Mapping[str, StyleEntry]) -> dict[str, StyleEntry]:
    """The server's bank after a round: each replying site's entry refreshed, the others kept."""
    return {**bank, **{site: entry for site, entry in replies.items() if entry.count > 0}}


def bank_to_arrays(bank: Mapping[str, StyleEntry]) -> dict[str, torch.Tensor]:
    """The bank as one flat dict of arrays, ``<site>/<layer>/<stat>`` and ``<site>/count``."""
    return {f"{site}/{key}": value for site, entry in bank.items() for key, value in entry.to_arrays().items()}


def bank_from_arrays(arrays: Mapping[str, torch.Tensor], shapes: Mapping[str, int]) -> dict[str, StyleEntry]:
    """Inverse of ``bank_to_arrays``, checking every entry against the declared ``shapes``."""
    per_site: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        site, sep, rest = key.partition("/")
        if not sep:
            raise ValueError(f"style bank array {key!r} is not '<site>/<layer>/<stat>'")
        per_site.setdefault(site, {})[rest] = value
    return {site: StyleEntry.from_arrays(entry, shapes) for site, entry in per_site.items()}

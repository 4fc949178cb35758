"""Which pieces of the CrossSim method a config turns on: one rule each, read by training, sites and server.

``strategy = crosssim`` is the whole method; every piece can be turned off by one config value, so each row
of an ablation is one flag. The baselines (fedavg, fedprox, fedbn) use none of them.
"""

from __future__ import annotations

from crosssim.config import CrossSimConfig

STRATEGIES_WITH_SIMILARITY = ("crosssim",)


def uses_similarity(cfg: CrossSimConfig) -> bool:
    """The prototype term λ·L_sim (and the prototypes it needs)."""
    return cfg.method.strategy in STRATEGIES_WITH_SIMILARITY


def uses_pair_loss(cfg: CrossSimConfig) -> bool:
    """Two views per image, rendered by two random scanners, and the pair term between them."""
    return uses_similarity(cfg) and cfg.method.pair_loss


def uses_style_bank(cfg: CrossSimConfig) -> bool:
    """Sites send style entries and mix toward the other sites' styles while training."""
    return uses_similarity(cfg) and cfg.method.style_mix_probability > 0 and cfg.method.style_layers > 0

"""The federated method without Flower: one site's round, the wire format and the server's merges.

``client/`` and ``server/`` wrap these functions in Flower records; nothing here imports flwr. What a
site sends is exactly: model tensors (minus BatchNorm layers under FedBN), per-class prototypes with
counts, and scalar metrics (plus, on evaluation, a fixed-length confidence histogram and class counts with
small cells suppressed; with round-style one-message that evaluation travels in the train reply).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crosssim.adapt import adabn
from crosssim.boundary import (COMPUTE_SECONDS, CONFIDENCE_HISTOGRAM, LOAD_SECONDS, NUM_EXAMPLES, PROTOTYPE_COUNTS,
                               PROTOTYPE_VECTORS, SHIFT_PREFIX, SITE_CLASS_COUNTS, TRAIN_CLASS_COUNTS)
from crosssim.checkpoint import SHIFT_REFERENCE_KEY, SourceStats
from crosssim.config import FIELD_INDEX, ConfigError, CrossSimConfig, load_config, to_flat
from crosssim.data.sites import SiteData
from crosssim.method import uses_similarity
from crosssim.metrics import confidence_histogram
from crosssim.model import CrossSimNet, batchnorm_state_keys
from crosssim.prototypes import Prototypes, compute_prototypes, privatize
from crosssim.shift import aggregate_figures, forward_with_figures
from crosssim.style import StyleEntry, compute_style
from crosssim.train import TrainResult, infer, lambda_for_step, round_lr, train_local

SITE_SEED_SPAN = 2**16  # per-site offset added to the seed, from a hash of the site name
ROUND_SEED_STRIDE = 1_000_003  # seed offset between rounds (prime, larger than any site offset)


@dataclass
class LocalSite:
    """One site's labeled data split into train and validation (stratified, deterministic)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    load_seconds: float

    @classmethod
    def from_site(cls, site: SiteData, cfg: CrossSimConfig) -> "LocalSite":
        """Split with the config's seed: a site does not know its position among the others."""
        train_idx, val_idx = site.split(cfg.data.val_fraction, cfg.seed)
        return cls(site.name, site.images[train_idx], site.labels[train_idx], site.images[val_idx],
                   site.labels[val_idx], site.report.load_seconds)

    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation split, or the training split when the site is too small to hold any out."""
        return (self.val_x, self.val_y) if len(self.val_y) else (self.train_x, self.train_y)


def site_dirs(value: Any) -> list[str]:
    """The ``site-dirs`` run-config value as a list of folders."""
    return [d.strip() for d in str(value or "").split(",") if d.strip()]


def federated_classes(cfg: CrossSimConfig) -> tuple[str, ...]:
    """Every site must agree on the classes before round 1: they come from the config."""
    if not cfg.data.classes:
        raise ConfigError("federated training needs 'classes' in the config (sites never share labels "
                          "beforehand, so the server cannot take their union)")
    return tuple(cfg.data.classes)


def wire_config(cfg: CrossSimConfig) -> dict[str, Any]:
    """The effective config as flat kebab-case values the server sends with every message."""
    return to_flat(cfg)


def config_from_wire(values: Mapping[str, Any], cache_dir: str | None = None) -> CrossSimConfig:
    """The server's config at a site; ``cache_dir`` (the hospital's own disk) replaces the server's."""
    overrides = {k: v for k, v in values.items() if k in FIELD_INDEX}
    if cache_dir is not None:
        overrides["cache-dir"] = cache_dir
    return load_config(None, overrides)


def round_schedule(cfg: CrossSimConfig, server_round: int) -> tuple[float, float]:
    """(learning rate, λ) for a 1-based round; prototypes first exist after round 1, λ = 0 for baselines."""
    lr = round_lr(cfg.train.lr, cfg.train.schedule, server_round, cfg.federation.rounds)
    if not uses_similarity(cfg):
        return lr, 0.0
    return lr, lambda_for_step(cfg.method.lambda_sim, server_round - 1, cfg.method.lambda_warmup)


def site_seed(seed: int, site_name: str, server_round: int) -> int:
    """A distinct, reproducible seed per (site, round)."""
    return seed + server_round * ROUND_SEED_STRIDE + zlib.crc32(site_name.encode()) % SITE_SEED_SPAN


def prototypes_to_arrays(protos: Prototypes) -> dict[str, torch.Tensor]:
    return {PROTOTYPE_VECTORS: protos.vectors.float(), PROTOTYPE_COUNTS: protos.counts.to(torch.int64)}


def prototypes_from_arrays(arrays: Mapping[str, torch.Tensor], num_classes: int, dim: int) -> Prototypes:
    """Check shapes of a received prototypes record: (C, d) vectors and (C,) non-negative counts."""
    vectors, counts = arrays.get(PROTOTYPE_VECTORS), arrays.get(PROTOTYPE_COUNTS)
    if vectors is None or counts is None or set(arrays) != {PROTOTYPE_VECTORS, PROTOTYPE_COUNTS}:
        raise ValueError(f"prototypes record must hold exactly '{PROTOTYPE_VECTORS}' and '{PROTOTYPE_COUNTS}'")
    if tuple(vectors.shape) != (num_classes, dim) or tuple(counts.shape) != (num_classes,):
        raise ValueError(f"prototypes of shape {tuple(vectors.shape)} / counts {tuple(counts.shape)}, "
                         f"expected ({num_classes}, {dim}) / ({num_classes},)")
    if bool((counts < 0).any()):
        raise ValueError("prototype counts must be non-negative")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError("prototypes hold non-finite values")
    return Prototypes(vectors.float(), counts.to(torch.int64))


def local_state_keys(model: nn.Module, strategy: str) -> set[str]:
    """state_dict keys that never leave a site: its BatchNorm layers under FedBN, nothing otherwise."""
    return batchnorm_state_keys(model) if strategy == "fedbn" else set()


def split_state(state: Mapping[str, torch.Tensor], local_keys: set[str]) -> tuple[dict, dict]:
    """(shared tensors, site-local tensors) of a state_dict."""
    shared = {k: v for k, v in state.items() if k not in local_keys}
    local = {k: v for k, v in state.items() if k in local_keys}
    return shared, local


def merge_state(base: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base`` with ``update``'s tensors laid over it, each cast to ``base``'s dtype (e.g. BN counters)."""
    unknown = set(update) - set(base)
    if unknown:
        raise ValueError(f"unexpected tensors {sorted(unknown)[:3]} not in the model")
    return {k: (update[k].to(v.dtype) if k in update else v).clone() for k, v in base.items()}


def sendable_state(model: nn.Module, local_keys: set[str]) -> dict[str, torch.Tensor]:
    """What a site sends of its model: every state_dict tensor except its local (FedBN) layers."""
    shared, _ = split_state(model.state_dict(), local_keys)
    return {k: v.detach().cpu() for k, v in shared.items()}


def reportable_counts(labels: torch.Tensor, num_classes: int, min_count: int) -> torch.Tensor:
    """Class counts with small cells (under ``min_count``) reported as 0, like prototypes."""
    counts = torch.bincount(labels, minlength=num_classes)
    return torch.where(counts >= min_count, counts, torch.zeros_like(counts))


def train_round(model: nn.Module, site: LocalSite, cfg: CrossSimConfig, *, server_round: int, lr: float,
                lambda_sim: float, prototypes: Prototypes | None, device: torch.device,
                styles: Sequence[StyleEntry] = ()) -> tuple[TrainResult, Prototypes, float]:
    """Local epochs of ``CE + λ·L_sim`` (+ FedProx), BatchNorm statistics re-estimated, then prototypes.

    The running statistics that training leaves lag behind the weights (momentum over a few dozen augmented
    batches); re-estimating them on the site's un-augmented training images makes what the server averages
    match the weights it averages.

    Returns (training result, prototypes to send, compute seconds including the prototype pass).
    """
    started = time.perf_counter()
    seed = site_seed(cfg.seed, site.name, server_round)
    global_params = None
    if cfg.method.strategy == "fedprox":
        global_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = train_local(model, site.train_x, site.train_y, cfg, epochs=cfg.federation.local_epochs, lr=lr,
                         seed=seed, device=device, prototypes=prototypes, lambda_sim=lambda_sim,
                         global_params=global_params, styles=styles)
    adabn(model, site.train_x, device)
    _, embeddings = infer(model, site.train_x, device)
    num_classes = len(federated_classes(cfg))
    protos = compute_prototypes(embeddings, site.train_y, num_classes, cfg.method.min_count)
    protos = privatize(protos, cfg.method.prototype_noise_std, torch.Generator().manual_seed(seed))
    return result, protos, time.perf_counter() - started


def style_of(model: nn.Module, images: torch.Tensor, cfg: CrossSimConfig, device: torch.device) -> StyleEntry:
    """A site's style entry under the global model it has just received (eval mode; count 0 under min-count)."""
    return compute_style(model, images, cfg.method.style_layers, device, cfg.method.min_count)


def train_metrics(result: TrainResult, site: LocalSite, cfg: CrossSimConfig,
                  compute_seconds: float) -> dict[str, float | int | list[int]]:
    """Scalars of a local round, plus the site's class counts (small cells sent as 0, like prototypes)."""
    num_classes = len(federated_classes(cfg))
    counts = reportable_counts(torch.cat([site.train_y, site.val_y]), num_classes, cfg.method.min_count)
    return {NUM_EXAMPLES: result.num_examples, "loss": result.loss, "ce-loss": result.ce_loss,
            "sim-loss": result.sim_loss, "train-accuracy": result.train_accuracy,
            COMPUTE_SECONDS: compute_seconds, LOAD_SECONDS: site.load_seconds,
            SITE_CLASS_COUNTS: [int(c) for c in counts]}


def evaluate_round(model: CrossSimNet, site: LocalSite, cfg: CrossSimConfig, prototypes: Prototypes | None,
                   device: torch.device) -> dict[str, float | int | list[float] | list[int]]:
    """Validation summaries of the global model at a site: scalars, a confidence histogram, class counts."""
    started = time.perf_counter()
    val_x, val_y = site.validation()
    if prototypes is None:
        prototypes = Prototypes.empty(model.num_classes, model.embedding_dim)
    probs, _, figures = forward_with_figures(model, val_x, prototypes, device)
    confidence = probs.max(1).values
    nll = F.nll_loss(torch.log(probs.clamp_min(1e-12)), val_y)
    num_classes = probs.shape[1]
    return {
        NUM_EXAMPLES: len(val_y),
        "val-loss": float(nll),
        "val-accuracy": float((probs.argmax(1) == val_y).float().mean()),
        "mean-confidence": float(confidence.mean()),
        CONFIDENCE_HISTOGRAM: [float(v) for v in confidence_histogram(confidence.numpy())],
        TRAIN_CLASS_COUNTS: [int(c) for c in reportable_counts(site.train_y, num_classes, cfg.method.min_count)],
        **{f"{SHIFT_PREFIX}{name}": value for name, value in figures.items()},
        COMPUTE_SECONDS: time.perf_counter() - started,
        LOAD_SECONDS: site.load_seconds,
    }


def source_stats(site_reports: Sequence[Mapping[str, Any]]) -> SourceStats:
    """Pool the sites' validation summaries (weighted by validation size) into the checkpoint's reference."""
    weights = np.array([float(r[NUM_EXAMPLES]) for r in site_reports])
    if weights.sum() <= 0:
        raise ValueError("no validation examples reported")
    weights = weights / weights.sum()

    def pooled(key: str) -> Any:
        return sum(w * np.asarray(r[key], dtype=np.float64) for w, r in zip(weights, site_reports))

    class_counts = np.sum([np.asarray(r[TRAIN_CLASS_COUNTS], dtype=np.float64) for r in site_reports], axis=0)
    prevalence = class_counts / max(class_counts.sum(), 1.0)
    per_site = [({k.removeprefix(SHIFT_PREFIX): float(v) for k, v in r.items() if k.startswith(SHIFT_PREFIX)},
                 int(r[NUM_EXAMPLES])) for r in site_reports]
    return SourceStats(confidence_histogram=pooled(CONFIDENCE_HISTOGRAM), accuracy=float(pooled("val-accuracy")),
                       mean_confidence=float(pooled("mean-confidence")),
                       count=int(sum(int(r[NUM_EXAMPLES]) for r in site_reports)), prevalence=prevalence,
                       extra={SHIFT_REFERENCE_KEY: aggregate_figures(per_site)})

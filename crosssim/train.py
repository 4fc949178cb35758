"""The one local training loop (pooled, local-only and every federated strategy) and inference helpers."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from crosssim.augment import augment_batch
from crosssim.config import CrossSimConfig, TrainConfig
from crosssim.losses import consistency_loss, pair_loss, proximal_term, similarity_loss
from crosssim.method import uses_pair_loss, uses_style_bank
from crosssim.model import INFERENCE_BATCH_SIZE
from crosssim.prototypes import Prototypes
from crosssim.style import StyleEntry, StyleMixer, mixing_styles

Progress = Callable[[str], None] | None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable CUDA request is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(cfg: TrainConfig) -> None:
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)


@dataclass
class TrainResult:
    num_examples: int
    loss: float
    ce_loss: float
    sim_loss: float
    train_accuracy: float
    seconds: float
    examples_per_second: float


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                device: torch.device) -> DataLoader:
    """Shuffled in-memory batches; the last partial batch is dropped when there is more than one batch."""
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), drop_last=len(labels) > batch_size,
                      pin_memory=device.type == "cuda")


def train_local(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: CrossSimConfig, *,
                epochs: int, lr: float, seed: int, device: torch.device,
                prototypes: Prototypes | None = None, lambda_sim: float = 0.0,
                global_params: dict[str, torch.Tensor] | None = None,
                styles: Sequence[StyleEntry] = (),
                epoch_end: Callable[[int], tuple[Prototypes, float] | None] | None = None,
                progress: Progress = None) -> TrainResult:
    """Train ``model`` in place with ``CE + λ·(L_sim + L_pair)`` (+ FedProx term when ``global_params``).

    With the pair loss (``crosssim.method.uses_pair_loss``) every batch is rendered twice, the anchor view
    (``anchor-view``) and a random scanner's view (``augment``), and both views train: CE on both, the
    prototype term on both, the pair term between them. With ``styles``
    (other sites' style entries) the first style layers mix toward them (``crosssim.style``).
    ``epoch_end(epoch)`` may return refreshed (prototypes, λ) for the next epoch (pooled training
    recomputes them each epoch).
    The LR follows ``cfg.train.schedule`` over these ``epochs``.
    """
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.train.weight_decay)
    scheduler = _make_scheduler(optimizer, cfg.train.schedule, epochs)
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loader = make_loader(images, labels, cfg.train.batch_size, seed, device)
    augment, augment_generator = cfg.augment, torch.Generator().manual_seed(seed + 1)
    anchor = augment if augment.anchor_view == "auto" else dataclasses.replace(augment, augment=augment.anchor_view)
    anchors = None if global_params is None else {k: v.to(device) for k, v in global_params.items()}
    two_views = uses_pair_loss(cfg)
    mixer = StyleMixer(styles, cfg.method.style_mix_probability, cfg.method.style_alpha, seed + 2) \
        if uses_style_bank(cfg) else None
    totals = {"loss": 0.0, "ce": 0.0, "sim": 0.0, "correct": 0, "n": 0}
    started = time.perf_counter()
    for epoch in range(epochs):
        proto_vectors = proto_present = None
        if prototypes is not None and lambda_sim > 0 and bool(prototypes.present.any()):
            proto_vectors, proto_present = prototypes.vectors.to(device), prototypes.present.to(device)
        epoch_loss = 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if two_views:  # the anchor view and a random scanner's view of each image
                x, y = torch.cat([augment_batch(x, anchor, augment_generator),
                                  augment_batch(x, augment, augment_generator)]), torch.cat([y, y])
            else:
                x = augment_batch(x, augment, augment_generator)
            with mixing_styles(model, mixer, cfg.method.style_layers), \
                    torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits, z = model(x)
                ce = F.cross_entropy(logits, y)
            sim = torch.zeros((), device=device)
            if proto_vectors is not None:
                sim = similarity_loss(cfg.method.similarity, z.float(), y, proto_vectors, proto_present,
                                      cfg.method.temperature, cfg.method.margin)
            if two_views and lambda_sim > 0:
                sim = sim + pair_loss(cfg.method.similarity, z.float(), y, proto_vectors, proto_present,
                                      cfg.method.temperature, cfg.method.margin)
            loss = ce.float() + lambda_sim * sim
            if two_views and cfg.method.consistency_weight > 0:
                loss = loss + cfg.method.consistency_weight * consistency_loss(logits)
            if anchors is not None:
                loss = loss + proximal_term(model, anchors, cfg.method.proximal_mu)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            batch = len(y)
            epoch_loss += loss.item() * batch
            totals["loss"] += loss.item() * batch
            totals["ce"] += ce.item() * batch
            totals["sim"] += sim.item() * batch
            totals["correct"] += int((logits.argmax(1) == y).sum())
            totals["n"] += batch
        _step_scheduler(scheduler, epoch_loss / max(len(loader.dataset), 1))
        if progress:
            progress(f"epoch {epoch + 1}/{epochs}: loss {epoch_loss / max(len(loader.dataset), 1):.4f}")
        if epoch_end is not None:
            refreshed = epoch_end(epoch)
            if refreshed is not None:
                prototypes, lambda_sim = refreshed
                model.train()
    seconds = time.perf_counter() - started
    n = max(totals["n"], 1)
    return TrainResult(num_examples=len(labels), loss=totals["loss"] / n, ce_loss=totals["ce"] / n,
                       sim_loss=totals["sim"] / n, train_accuracy=totals["correct"] / n, seconds=seconds,
                       examples_per_second=totals["n"] / max(seconds, 1e-9))


def _make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    return None


def _step_scheduler(scheduler, epoch_loss: float) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(epoch_loss)
    elif scheduler is not None:
        scheduler.step()


def round_lr(base_lr: float, schedule: str, round_index: int, num_rounds: int) -> float:
    """LR for federated round ``round_index`` (1-based): cosine decays over rounds, else constant."""
    if schedule != "cosine" or num_rounds <= 1:
        return base_lr
    return 0.5 * base_lr * (1 + math.cos(math.pi * (round_index - 1) / num_rounds))


def lambda_for_step(lambda_sim: float, steps_with_prototypes: int, warmup: int) -> float:
    """λ is 0 until prototypes exist, then ramps linearly to ``lambda_sim`` over ``warmup`` steps."""
    if steps_with_prototypes <= 0:
        return 0.0
    return lambda_sim * min(1.0, steps_with_prototypes / max(warmup, 1))


@torch.no_grad()
def infer(model: nn.Module, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode (probabilities (N, C), embeddings (N, d)) on CPU, batched."""
    model.to(device).eval()
    probs, embeddings = [], []
    for start in range(0, len(images), INFERENCE_BATCH_SIZE):
        x = images[start:start + INFERENCE_BATCH_SIZE].to(device)
        logits, z = model(x)
        probs.append(torch.softmax(logits.float(), 1).cpu())
        embeddings.append(z.float().cpu())
    return torch.cat(probs), torch.cat(embeddings)

"""Test-time adaptation of a copy of the model on unlabeled target images: AdaBN and TENT.

AdaBN (Li et al., 2016): re-estimate every BatchNorm layer's running statistics on the target images;
all other tensors stay bit-identical.
TENT (Wang et al., ICLR 2021): a few entropy-minimization steps on the BatchNorm affine parameters only,
BatchNorm normalizing with target batch statistics; then AdaBN, so the saved model's running statistics
are the target's (eval mode then reproduces TENT's normalization by target statistics).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from crosssim.adapt_options import ADAPT_METHODS, TENT_BATCH_SIZE, TENT_LR, TENT_STEPS
from crosssim.model import batchnorm_modules
from crosssim.train import INFERENCE_BATCH_SIZE


@torch.no_grad()
def adabn(model: nn.Module, images: torch.Tensor, device: torch.device) -> nn.Module:
    """Replace BN running statistics by the statistics of ``images`` (N, 1, H, W); in place, returns ``model``."""
    model.to(device).eval()
    layers = [m for _, m in batchnorm_modules(model) if m.track_running_stats]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    try:
        for start in range(0, len(images), INFERENCE_BATCH_SIZE):
            model(images[start:start + INFERENCE_BATCH_SIZE].to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return model


def _entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), 1)
    return -(log_probs.exp() * log_probs).sum(1).mean()


def tent(model: nn.Module, images: torch.Tensor, device: torch.device, *, steps: int = TENT_STEPS,
         lr: float = TENT_LR, seed: int = 0) -> nn.Module:
    """Minimize prediction entropy over BN affine parameters for ``steps`` mini-batches; in place."""
    model.to(device).eval()
    layers = [m for _, m in batchnorm_modules(model)]
    affine = [p for m in layers for p in (m.weight, m.bias) if p is not None]
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in affine:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(affine, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batch = min(TENT_BATCH_SIZE, len(images))
    order, cursor = torch.randperm(len(images), generator=generator), 0
    try:
        for m in layers:
            m.train()
        for _ in range(steps):
            if cursor + batch > len(images):  # next pass over the target: reshuffle
                order, cursor = torch.randperm(len(images), generator=generator), 0
            logits, _ = model(images[order[cursor:cursor + batch]].to(device))
            cursor += batch
            loss = _entropy_loss(logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.eval()
    return adabn(model, images, device)


def adapt_copy(model: nn.Module, images: torch.Tensor, method: str, device: torch.device, *,
               tent_steps: int = TENT_STEPS, tent_lr: float = TENT_LR, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` adapted to ``images`` with ``method``; ``model`` itself is untouched."""
    if method not in ADAPT_METHODS:
        raise ValueError(f"unknown adaptation {method!r} (known: {', '.join(ADAPT_METHODS)})")
    adapted = copy.deepcopy(model)
    if method == "adabn":
        return adabn(adapted, images, device)
    if method == "tent":
        return tent(adapted, images, device, steps=tent_steps, lr=tent_lr, seed=seed)
    return adapted

"""Classification and cross-site similarity losses against global class prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_loss(z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """``-log softmax(z·P/τ)[y]`` over the classes that have a prototype.

    Args:
        z: (N, d) L2-normalized embeddings.
        y: (N,) class indices.
        prototypes: (C, d) global prototypes (normalized here).
        present: (C,) bool, classes that have a prototype; samples of absent classes are ignored.
    """
    keep = present[y]
    if not bool(keep.any()):
        return z.sum() * 0.0
    logits = z[keep] @ F.normalize(prototypes, dim=1).t() / temperature
    logits = logits.masked_fill(~present.unsqueeze(0), float("-inf"))
    return F.cross_entropy(logits, y[keep])


def contrastive_loss(z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """The seed's pair loss: ``t·d² + (1−t)·max(m − d, 0)²`` for every (z, P_c), t = [c == y], d = ‖z − P_c‖."""
    distances = torch.cdist(z, F.normalize(prototypes, dim=1))  # (N, C)
    target = F.one_hot(y, prototypes.shape[0]).to(z.dtype)
    pair_loss = target * distances.pow(2) + (1 - target) * F.relu(margin - distances).pow(2)
    mask = present.unsqueeze(0).to(z.dtype).expand_as(pair_loss)
    return (pair_loss * mask).sum() / mask.sum().clamp(min=1.0)


def similarity_loss(kind: str, z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor,
                    present: torch.Tensor, temperature: float, margin: float) -> torch.Tensor:
    if kind == "infonce":
        return infonce_loss(z, y, prototypes, present, temperature)
    if kind == "contrastive":
        return contrastive_loss(z, y, prototypes, present, margin)
    raise ValueError(f"unknown similarity loss {kind!r}")


def proximal_term(model: torch.nn.Module, global_params: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: ``μ/2 · ‖w − w_global‖²`` over trainable parameters."""
    squared = [(p - global_params[name]).pow(2).sum() for name, p in model.named_parameters() if p.requires_grad]
    return 0.5 * mu * torch.stack(squared).sum()

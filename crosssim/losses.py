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


def _pair_masks(y: torch.Tensor, proto_present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For 2N embeddings (view 1 then view 2 of N images): (partner index, dissimilar-embedding mask,
    dissimilar-prototype mask). Dissimilar: another class; same-class others are neither similar nor dissimilar."""
    n = len(y) // 2
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(y.device)
    other_class = y.unsqueeze(1) != y.unsqueeze(0)  # (2N, 2N), False on the diagonal and on partners
    other_prototype = (y.unsqueeze(1) != torch.arange(len(proto_present), device=y.device).unsqueeze(0)) & \
        proto_present.unsqueeze(0)
    return partner, other_class, other_prototype


def pair_loss(kind: str, z: torch.Tensor, y: torch.Tensor, prototypes: torch.Tensor | None,
              present: torch.Tensor | None, temperature: float, margin: float) -> torch.Tensor:
    """The seed's pairs across simulated scanners: the two views of an image are similar (label 1); an embedding
    and another class's embedding in the batch or another class's prototype are dissimilar (label 0).

    Args:
        z: (2N, d) L2-normalized embeddings, view 1 of N images then view 2 of the same images.
        y: (2N,) class indices (``y[:N] == y[N:]``).
        prototypes, present: (C, d) global prototypes and (C,) bool, or None before they exist.

    ``infonce``: ``-log`` of the partner's share among partner and dissimilar candidates (SupCon-style, τ).
    ``contrastive``: mean ``d²`` over similar pairs + mean ``max(m − d, 0)²`` over dissimilar pairs.
    """
    if present is None:
        present = torch.zeros(0, dtype=torch.bool, device=z.device)
        prototypes = z.new_zeros(0, z.shape[1])
    partner, other_class, other_prototype = _pair_masks(y, present)
    protos = F.normalize(prototypes, dim=1) if len(prototypes) else prototypes
    rows = torch.arange(len(z), device=z.device)
    if kind == "infonce":
        logits = torch.cat([z @ z.t(), z @ protos.t()], dim=1) / temperature
        allowed = torch.cat([other_class, other_prototype], dim=1)
        allowed[rows, partner] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
        return F.cross_entropy(logits, partner)
    if kind == "contrastive":
        similar = (z - z[partner]).pow(2).sum(1).mean()
        distances = torch.cat([torch.cdist(z, z), torch.cdist(z, protos) if len(protos) else z.new_zeros(len(z), 0)],
                              dim=1)
        dissimilar_mask = torch.cat([other_class, other_prototype], dim=1)
        hinge = F.relu(margin - distances).pow(2)
        dissimilar = (hinge * dissimilar_mask).sum() / dissimilar_mask.sum().clamp(min=1)
        return similar + dissimilar
    raise ValueError(f"unknown similarity loss {kind!r}")


def consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between the predictions of the two views; ``logits`` (2N, C), view 1 then view 2."""
    first, second = torch.log_softmax(logits.float(), 1).chunk(2)
    return 0.5 * (F.kl_div(first, second, log_target=True, reduction="batchmean")
                  + F.kl_div(second, first, log_target=True, reduction="batchmean"))

"""Per-class feature prototypes: compute at a site, privatize, aggregate at the server."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Prototypes:
    """Class means of embeddings: ``vectors`` (C, d) float32 and ``counts`` (C,) int64; count 0 = absent."""

    vectors: torch.Tensor
    counts: torch.Tensor

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    @classmethod
    def empty(cls, num_classes: int, dim: int) -> "Prototypes":
        return cls(torch.zeros(num_classes, dim), torch.zeros(num_classes, dtype=torch.int64))


def compute_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       min_count: int) -> Prototypes:
    """Mean embedding per class; classes with fewer than ``min_count`` samples are zeroed and count 0."""
    embeddings = embeddings.detach().float().cpu()
    labels = labels.cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, embeddings.shape[1]).index_add_(0, labels, embeddings)
    keep = counts >= min_count
    vectors = torch.where(keep.unsqueeze(1), sums / counts.clamp(min=1).unsqueeze(1), torch.zeros_like(sums))
    return Prototypes(vectors, torch.where(keep, counts, torch.zeros_like(counts)))


def privatize(protos: Prototypes, noise_std: float, generator: torch.Generator | None = None) -> Prototypes:
    """Add Gaussian noise of ``noise_std`` to each sent prototype (absent classes stay zero)."""
    if noise_std <= 0:
        return protos
    noise = torch.randn(protos.vectors.shape, generator=generator) * noise_std
    return Prototypes(protos.vectors + noise * protos.present.unsqueeze(1), protos.counts)


def aggregate_prototypes(site_protos: list[Prototypes], previous: Prototypes | None = None) -> Prototypes:
    """Count-weighted mean over sites; a class nobody sent keeps its ``previous`` prototype."""
    counts = torch.stack([p.counts for p in site_protos]).sum(0)
    weighted = torch.stack([p.vectors * p.counts.unsqueeze(1).float() for p in site_protos]).sum(0)
    vectors = weighted / counts.clamp(min=1).unsqueeze(1).float()
    if previous is not None:
        missing = counts == 0
        vectors = torch.where(missing.unsqueeze(1), previous.vectors, vectors)
        counts = torch.where(missing, previous.counts, counts)
    return Prototypes(vectors, counts)

"""Test-time adaptation of a copy of the model on unlabeled target images: AdaBN, TENT, CrossSim, few-shot.

AdaBN (Li et al., 2016): re-estimate every BatchNorm layer's running statistics on the target images;
all other tensors stay bit-identical.
TENT (Wang et al., ICLR 2021): a few entropy-minimization steps on the BatchNorm affine parameters only,
BatchNorm normalizing with target batch statistics; then AdaBN, so the saved model's running statistics
are the target's (eval mode then reproduces TENT's normalization by target statistics).
CrossSim (in the manner of SHOT, Liang et al., ICML 2020): AdaBN, then the feature layers (backbone) train
on the target's images with the classifier head and the projection frozen. Loss: mean per-image entropy
+ w_div · KL(mean prediction ‖ the sources' class prevalence) + w_pseudo · cross-entropy to pseudo-labels
by nearest class centroid in embedding space (cosine), kept only where the classifier agrees (the guard
against a classifier that beats its own centroids); the centroids start from the federation's global
prototypes and are re-estimated on the target each epoch. Then AdaBN again.
Few-shot: AdaBN, then BatchNorm affine parameters and the classifier head train on the k labeled shots
plus the other target images pseudo-labeled by centroids that combine the shots with the prototypes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from crosssim.adapt_options import ADAPT_BATCH_SIZE
from crosssim.config import AdaptConfig
from crosssim.model import INFERENCE_BATCH_SIZE, CrossSimNet, batchnorm_modules
from crosssim.prototypes import Prototypes
from crosssim.train import infer

CENTROID_ITERATIONS = 2  # nearest-centroid assignments (k-means steps) per pseudo-labelling
PRIOR_FLOOR = 1e-3  # smallest class prevalence the diversity term compares against
IGNORE_LABEL = -1  # a pseudo-label dropped because centroid and classifier disagree


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


def _batches(count: int, batch: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches of size ``min(batch, count)``, reshuffling at the end of each pass."""
    batch = min(batch, count)
    order, cursor = torch.randperm(count, generator=generator), 0
    for _ in range(steps):
        if cursor + batch > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        yield order[cursor:cursor + batch]
        cursor += batch


class _Trainable:
    """Context: only ``params`` require grad inside; every flag is restored and the model left in eval mode."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        self.model, self.params = model, params
        self.flags = {p: p.requires_grad for p in model.parameters()}

    def __enter__(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags.items():
            p.requires_grad_(flag)
        self.model.eval()


def _bn_affine(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, m in batchnorm_modules(model) for p in (m.weight, m.bias) if p is not None]


def tent(model: nn.Module, images: torch.Tensor, device: torch.device, *, steps: int, lr: float,
         seed: int = 0) -> nn.Module:
    """Minimize prediction entropy over BN affine parameters for ``steps`` mini-batches; in place."""
    model.to(device).eval()
    affine = _bn_affine(model)
    optimizer = torch.optim.Adam(affine, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with _Trainable(model, affine):
        for _, m in batchnorm_modules(model):
            m.train()
        for index in _batches(len(images), ADAPT_BATCH_SIZE, steps, generator):
            logits, _ = model(images[index].to(device))
            loss = _entropy_loss(logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return adabn(model, images, device)


@torch.no_grad()
def _forward_all(model: nn.Module, images: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode (logits, embeddings) of every image, on ``device``."""
    model.eval()
    outputs = [model(images[start:start + INFERENCE_BATCH_SIZE].to(device))
               for start in range(0, len(images), INFERENCE_BATCH_SIZE)]
    return torch.cat([o[0].float() for o in outputs]), torch.cat([o[1].float() for o in outputs])


def _embeddings(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return _forward_all(model, images, device)[1]


def nearest_centroid_labels(embeddings: torch.Tensor, centroids: torch.Tensor,
                            present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine nearest-centroid labels and the re-estimated centroids after ``CENTROID_ITERATIONS`` steps.

    Classes not ``present`` are never assigned; a class that receives no image keeps its centroid.
    """
    z = F.normalize(embeddings.float(), dim=1)
    centroids = F.normalize(centroids.float().to(z.device), dim=1)
    present = present.to(z.device)
    labels = torch.zeros(len(z), dtype=torch.int64, device=z.device)
    for _ in range(CENTROID_ITERATIONS):
        labels = (z @ centroids.T).masked_fill(~present, float("-inf")).argmax(1)
        centroids = _class_means(z, labels, centroids)
    return labels, centroids


def _class_means(embeddings: torch.Tensor, labels: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Unit mean embedding per class; a class without images keeps its ``fallback`` row (normalized)."""
    z = F.normalize(embeddings.float(), dim=1)
    fallback = F.normalize(fallback.float().to(z.device), dim=1)
    sums = torch.zeros_like(fallback).index_add_(0, labels.to(z.device), z)
    assigned = torch.bincount(labels, minlength=len(fallback)).to(z.device) > 0
    return torch.where(assigned.unsqueeze(1), F.normalize(sums, dim=1), fallback)


def class_prior(prevalence: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The sources' class prevalence (uniform when unknown), floored at ``PRIOR_FLOOR`` and renormalized."""
    if prevalence is None:
        return torch.full((num_classes,), 1.0 / num_classes)
    prior = torch.as_tensor(prevalence, dtype=torch.float32).clamp(min=PRIOR_FLOOR)
    return prior / prior.sum()


def crosssim_adapt(model: CrossSimNet, images: torch.Tensor, device: torch.device, *, prototypes: Prototypes,
                   prior: torch.Tensor, settings: AdaptConfig, seed: int = 0) -> nn.Module:
    """SHOT-style information maximization + prototype-anchored pseudo-labels on the backbone; in place.

    The prototypes live in the sources' normalization, so the first assignment is made with the unadapted
    model; the centroids are then the class means of those images in the adapted model's embedding space.
    """
    present = prototypes.present if bool(prototypes.present.any()) else torch.ones(len(prior), dtype=torch.bool)
    first, _ = nearest_centroid_labels(_embeddings(model, images, device), prototypes.vectors, present)
    adabn(model, images, device)
    centroids = _class_means(_embeddings(model, images, device), first, prototypes.vectors.to(device))
    backbone = list(model.backbone.parameters())
    optimizer = torch.optim.Adam(backbone, lr=settings.shot_lr)
    generator = torch.Generator().manual_seed(seed)
    log_prior = prior.to(device).log()
    steps_per_epoch = max(1, -(-len(images) // ADAPT_BATCH_SIZE))
    with _Trainable(model, backbone):
        for _ in range(settings.shot_epochs):
            logits_all, embeddings = _forward_all(model, images, device)
            pseudo, centroids = nearest_centroid_labels(embeddings, centroids, present)
            pseudo[pseudo != logits_all.argmax(1)] = IGNORE_LABEL  # only where centroid and classifier agree
            model.train()
            for index in _batches(len(images), ADAPT_BATCH_SIZE, steps_per_epoch, generator):
                logits, _ = model(images[index].to(device))
                log_probs = torch.log_softmax(logits.float(), 1)
                mean_probs = log_probs.exp().mean(0)
                diversity = (mean_probs * (mean_probs.clamp(min=1e-8).log() - log_prior)).sum()
                loss = (_entropy_loss(logits) + settings.shot_diversity_weight * diversity
                        + settings.shot_pseudo_weight * _pseudo_loss(log_probs, pseudo[index.to(device)]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return adabn(model, images, device)


def _pseudo_loss(log_probs: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the pseudo-labels that are kept; zero when a batch keeps none."""
    kept = pseudo != IGNORE_LABEL
    return F.nll_loss(log_probs[kept], pseudo[kept]) if bool(kept.any()) else log_probs.sum() * 0.0


def few_shot_centroids(shot_embeddings: torch.Tensor, shot_labels: torch.Tensor,
                       prototypes: Prototypes) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: unit mean of the k shot embeddings and the unit global prototype, weighted k : 1.

    Returns (centroids (C, d), present (C,)): a class with neither shots nor a prototype is absent.
    """
    num_classes = len(prototypes.counts)
    z = F.normalize(shot_embeddings.float().cpu(), dim=1)
    shots = torch.bincount(shot_labels.cpu(), minlength=num_classes).float()
    sums = torch.zeros(num_classes, z.shape[1]).index_add_(0, shot_labels.cpu(), z)
    anchor = F.normalize(prototypes.vectors.float(), dim=1) * prototypes.present.unsqueeze(1)
    return F.normalize(sums + anchor, dim=1), (shots > 0) | prototypes.present


def few_shot_adapt(model: CrossSimNet, images: torch.Tensor, shot_index: torch.Tensor, shot_labels: torch.Tensor,
                   device: torch.device, *, prototypes: Prototypes, settings: AdaptConfig,
                   seed: int = 0) -> nn.Module:
    """AdaBN on every target image, then BN affine + head on the shots and centroid pseudo-labels; in place."""
    adabn(model, images, device)
    centroids, present = few_shot_centroids(_embeddings(model, images[shot_index], device), shot_labels, prototypes)
    pseudo, _ = nearest_centroid_labels(_embeddings(model, images, device), centroids, present)
    params = _bn_affine(model) + list(model.classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=settings.few_shot_lr)
    generator = torch.Generator().manual_seed(seed)
    shot_x, shot_y = images[shot_index].to(device), shot_labels.to(device)
    with _Trainable(model, params):  # BatchNorm stays in eval mode: AdaBN's target statistics
        for index in _batches(len(images), ADAPT_BATCH_SIZE, settings.few_shot_steps, generator):
            loss = F.cross_entropy(model(shot_x)[0].float(), shot_y)
            loss = loss + settings.shot_pseudo_weight * F.cross_entropy(
                model(images[index].to(device))[0].float(), pseudo[index.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


def adapt_copy(model: CrossSimNet, images: torch.Tensor, method: str, device: torch.device, *,
               settings: AdaptConfig | None = None, prototypes: Prototypes | None = None,
               prevalence: torch.Tensor | None = None, seed: int = 0) -> CrossSimNet:
    """A deep copy of ``model`` adapted to ``images`` with ``method``; ``model`` itself is untouched.

    ``auto`` is decided by ``crosssim.adapt_choice``; ``crosssim`` needs the checkpoint's ``prototypes``
    (and uses the sources' class ``prevalence``, uniform when None).
    """
    settings = settings or AdaptConfig()
    adapted = copy.deepcopy(model)
    if method == "none":
        return adapted
    if method == "adabn":
        return adabn(adapted, images, device)
    if method == "tent":
        return tent(adapted, images, device, steps=settings.tent_steps, lr=settings.tent_lr, seed=seed)
    if method == "crosssim":
        if prototypes is None:
            raise ValueError("--adapt crosssim needs the checkpoint's global prototypes")
        return crosssim_adapt(adapted, images, device, prototypes=prototypes,
                              prior=class_prior(prevalence, model.num_classes), settings=settings, seed=seed)
    raise ValueError(f"unknown adaptation {method!r} (known: none, adabn, tent, crosssim; auto: adapt_choice)")


class AdaptedCopies:
    """``adapt_copy`` of one model to one site's images, made once per method, with its predictions.

    ``--adapt auto`` and the AdaBN reference of tent and crosssim reuse what an earlier adaptation of the same
    evaluation made. Callers only predict with the copies; they never train them further.
    """

    def __init__(self, model: CrossSimNet, images: torch.Tensor, device: torch.device, *,
                 settings: AdaptConfig | None = None, prototypes: Prototypes | None = None,
                 prevalence: torch.Tensor | None = None, seed: int = 0) -> None:
        self.model, self.images, self.device = model, images, device
        self.settings = settings or AdaptConfig()
        self._kwargs = {"settings": self.settings, "prototypes": prototypes, "prevalence": prevalence, "seed": seed}
        self._models: dict[str, CrossSimNet] = {}
        self._predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def model_for(self, method: str) -> CrossSimNet:
        """The copy adapted with ``method`` (none, adabn, tent or crosssim)."""
        if method not in self._models:
            self._models[method] = adapt_copy(self.model, self.images, method, self.device, **self._kwargs)
        return self._models[method]

    def predictions(self, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``infer`` of that copy on the site's images: (probabilities, embeddings)."""
        if method not in self._predictions:
            self._predictions[method] = infer(self.model_for(method), self.images, self.device)
        return self._predictions[method]

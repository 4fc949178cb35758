"""Few-shot or label-free: which model to deploy, decided on the labeled shots themselves.

A few-shot fine-tune on a handful of images can land below the label-free model (benchmarks/RESULTS.md: on
elpv mono→poly 5 shots per class gave 0.631 against 0.659 label-free). The shots are the only labels a
hospital has, so they also judge: in stratified folds (as many as the rarest class has shots, at most
``MAX_SHOT_FOLDS``), a few-shot model trained on the other folds' shots predicts the held-out shots, and the
label-free model (which saw them only as unlabeled images) predicts the same shots. Few-shot is deployed unless
it gets fewer of them right. With fewer than ``MIN_SHOTS_PER_CLASS`` shots of some class the folds cannot hold
that class out and train on it too, so few-shot is deployed unchecked.

More folds train each held-out model on more of the shots, closer to the deployed one: with 2 folds and 5
shots a class, benchmarks/few_shot.py kept the label-free model once where few-shot was 17 points better.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MAX_SHOT_FOLDS = 5  # each held-out model trains on 4/5 of the shots or more; each fold costs one fine-tune
MIN_SHOTS_PER_CLASS = 2  # a class needs a shot to train on and one to hold out
FEW_SHOT, LABEL_FREE = "few-shot", "label-free"
# train positions (into the shots) → the predicted class of every shot, by a few-shot model fit on those
FitAndPredict = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ShotCheck:
    """Which model is deployed and the held-out shot counts that decided it (None: not checked)."""

    deployed: str  # FEW_SHOT or LABEL_FREE
    reason: str
    few_shot_correct: int | None = None
    label_free_correct: int | None = None
    n_held_out: int = 0
    folds: int = 0

    def record(self) -> dict[str, Any]:
        return {"deployed": self.deployed, "reason": self.reason, "folds": self.folds,
                "few_shot_correct": self.few_shot_correct, "label_free_correct": self.label_free_correct,
                "n_held_out": self.n_held_out}


def shot_folds(labels: torch.Tensor, seed: int, folds: int) -> torch.Tensor:
    """Fold number (0..folds-1) of each shot: per class, a seeded shuffle dealt round-robin."""
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def check_few_shot(fit_and_predict: FitAndPredict, shot_labels: torch.Tensor,
                   label_free_predictions: torch.Tensor, seed: int) -> ShotCheck:
    """Cross-validate few-shot against the label-free ``label_free_predictions`` (one class per shot)."""
    counts = torch.bincount(shot_labels)
    fewest = int(counts[counts > 0].min())
    if fewest < MIN_SHOTS_PER_CLASS:
        return ShotCheck(FEW_SHOT, f"not checked: a class has {fewest} shot(s), fewer than {MIN_SHOTS_PER_CLASS}")
    folds = min(fewest, MAX_SHOT_FOLDS)
    fold = shot_folds(shot_labels, seed, folds)
    few_correct = label_free_correct = 0
    for held_out in range(folds):
        test = fold == held_out
        predicted = fit_and_predict(torch.nonzero(~test).flatten())
        few_correct += int((predicted[test] == shot_labels[test]).sum())
        label_free_correct += int((label_free_predictions[test] == shot_labels[test]).sum())
    n = len(shot_labels)
    deployed = LABEL_FREE if few_correct < label_free_correct else FEW_SHOT
    reason = (f"on {n} held-out shots ({folds} folds) few-shot got {few_correct} right, "
              f"the label-free model {label_free_correct}")
    return ShotCheck(deployed, reason, few_correct, label_free_correct, n, folds)

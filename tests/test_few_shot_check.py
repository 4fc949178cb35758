"""Few-shot or label-free, decided by cross-validation on the shots: folds, counts and the choice."""

from __future__ import annotations

import torch

from crosssim.few_shot_check import FEW_SHOT, LABEL_FREE, MAX_SHOT_FOLDS, check_few_shot, shot_folds

LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])


def test_folds_split_every_class_evenly_and_follow_the_seed() -> None:
    fold = shot_folds(LABELS, seed=3, folds=2)
    for label in LABELS.unique():
        assert torch.bincount(fold[LABELS == label], minlength=2).tolist() == [int((LABELS == label).sum()) // 2] * 2
    assert torch.equal(fold, shot_folds(LABELS, seed=3, folds=2))
    assert any(not torch.equal(shot_folds(LABELS, seed=s, folds=2), fold) for s in range(4, 10))


def test_check_counts_held_out_shots_and_keeps_the_better_model() -> None:
    trained_on: list[list[int]] = []

    def always_class_zero(positions: torch.Tensor) -> torch.Tensor:
        trained_on.append(positions.tolist())
        return torch.zeros(len(LABELS), dtype=torch.long)

    perfect_label_free = LABELS.clone()
    check = check_few_shot(always_class_zero, LABELS, perfect_label_free, seed=0)
    # few-shot is right on the 4 class-0 shots only, each held out once; the label-free model on all 10
    counts = (check.few_shot_correct, check.label_free_correct, check.n_held_out)
    assert check.deployed == LABEL_FREE and counts == (4, 10, 10)
    held_out = [set(range(len(LABELS))) - set(train) for train in trained_on]
    assert len(trained_on) == check.folds == 2  # the rarest class has 2 shots
    assert set().union(*held_out) == set(range(len(LABELS))) and not held_out[0] & held_out[1]
    tie = check_few_shot(lambda positions: LABELS.clone(), LABELS, perfect_label_free, seed=0)
    assert tie.deployed == FEW_SHOT and tie.few_shot_correct == tie.label_free_correct == 10


def test_a_class_with_one_shot_deploys_few_shot_unchecked() -> None:
    def never_called(positions: torch.Tensor) -> torch.Tensor:
        raise AssertionError("no fold can hold out a class's only shot and train on it")

    check = check_few_shot(never_called, torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), seed=0)
    assert check.deployed == FEW_SHOT and check.few_shot_correct is None and "not checked" in check.reason


def test_folds_grow_with_the_rarest_class_up_to_the_maximum() -> None:
    many = torch.arange(4).repeat_interleave(MAX_SHOT_FOLDS + 3)  # 4 classes, 8 shots each
    calls: list[torch.Tensor] = []

    def count(positions: torch.Tensor) -> torch.Tensor:
        calls.append(positions)
        return many.clone()

    check = check_few_shot(count, many, many.clone(), seed=1)
    assert check.folds == len(calls) == MAX_SHOT_FOLDS and check.n_held_out == len(many)
    three = torch.arange(2).repeat_interleave(3)
    assert check_few_shot(lambda positions: three.clone(), three, three.clone(), seed=1).folds == 3

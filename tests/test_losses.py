import math

import pytest
import torch
import torch.nn.functional as F

from crosssim.losses import (consistency_loss, contrastive_loss, infonce_loss, pair_loss, proximal_term,
                             similarity_loss)

# 2-class example: z = (0.6, 0.8), prototypes e0 and e1, label 0.
Z = torch.tensor([[0.6, 0.8]])
Y = torch.tensor([0])
P = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
BOTH = torch.tensor([True, True])

HAND_COMPUTED = [
    # (loss, kwargs, expected)
    ("infonce", {"temperature": 0.5, "margin": 1.0}, math.log(1 + math.exp(1.6 - 1.2))),
    ("infonce", {"temperature": 1.0, "margin": 1.0}, math.log(1 + math.exp(0.8 - 0.6))),
    # d0² = 0.8; d1 = sqrt(0.4) < m=1 → (1 - sqrt(0.4))²; mean over the 2 pairs
    ("contrastive", {"temperature": 0.5, "margin": 1.0}, (0.8 + (1 - math.sqrt(0.4)) ** 2) / 2),
    # margin 0.5 < d1: the negative pair costs nothing
    ("contrastive", {"temperature": 0.5, "margin": 0.5}, 0.8 / 2),
]


@pytest.mark.parametrize("kind,kwargs,expected", HAND_COMPUTED)
def test_similarity_losses_match_hand_computed_values(kind, kwargs, expected):
    value = similarity_loss(kind, Z, Y, P, BOTH, **kwargs)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_infonce_ignores_absent_prototypes():
    present = torch.tensor([True, False])
    # only the own class is present: softmax over one logit → zero loss
    assert infonce_loss(Z, Y, P, present, 0.5).item() == pytest.approx(0.0, abs=1e-7)
    # samples whose own class has no prototype contribute nothing
    assert infonce_loss(Z, torch.tensor([1]), P, present, 0.5).item() == 0.0


def test_contrastive_pulls_toward_own_prototype():
    z = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_()
    y = torch.zeros(8, dtype=torch.long)
    protos = torch.eye(4)[:2]
    contrastive_loss(z, y, protos, torch.tensor([True, True]), 1.0).backward()
    step = z - 0.1 * z.grad
    after = contrastive_loss(step, y, protos, torch.tensor([True, True]), 1.0)
    before = contrastive_loss(z, y, protos, torch.tensor([True, True]), 1.0)
    assert after < before


def test_proximal_term_is_zero_at_anchor_and_grows_with_distance():
    model = torch.nn.Linear(3, 2)
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert proximal_term(model, anchor, 0.1).item() == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
    assert proximal_term(model, anchor, 0.1).item() == pytest.approx(0.5 * 0.1 * 6.0)


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of class 0 and one of class 1, two views each (view 1 rows first): unit vectors in 2-D."""
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    z = torch.stack([e0, e0, e1, e0, F.normalize(e0 + 0.1 * e1, dim=0), e1])
    return z, torch.tensor([0, 0, 1, 0, 0, 1])


def test_pair_loss_infonce_counts_the_partner_against_other_class_embeddings_only():
    z, y = _views()
    tau = 0.5
    loss = pair_loss("infonce", z, y, None, None, tau, 1.0)
    sims = z @ z.t() / tau
    partner = [3, 4, 5, 0, 1, 2]
    expected = []
    for i in range(6):
        negatives = [j for j in range(6) if y[j] != y[i]]  # same-class other images are neither
        logits = torch.stack([sims[i, partner[i]], *sims[i, negatives]])
        expected.append(-torch.log_softmax(logits, 0)[0])
    assert torch.isclose(loss, torch.stack(expected).mean(), atol=1e-6)


def test_pair_loss_infonce_adds_other_class_prototypes_as_negatives():
    z, y = _views()
    prototypes, present = torch.eye(2), torch.tensor([True, True])
    with_prototypes = pair_loss("infonce", z, y, prototypes, present, 0.5, 1.0)
    without = pair_loss("infonce", z, y, None, None, 0.5, 1.0)
    assert with_prototypes > without  # one more dissimilar candidate per row, each at similarity 0 or 1


def test_pair_loss_contrastive_is_the_seeds_margin_loss_on_pairs():
    z, y = _views()
    loss = pair_loss("contrastive", z, y, None, None, 0.1, 1.5)
    partner = [3, 4, 5, 0, 1, 2]
    similar = torch.stack([(z[i] - z[partner[i]]).pow(2).sum() for i in range(6)]).mean()
    dissimilar = [torch.relu(1.5 - (z[i] - z[j]).norm()).pow(2) for i in range(6) for j in range(6) if y[i] != y[j]]
    assert torch.isclose(loss, similar + torch.stack(dissimilar).mean(), atol=1e-6)


def test_consistency_is_zero_for_identical_views_and_positive_otherwise():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert consistency_loss(torch.cat([logits, logits])) == 0
    assert consistency_loss(torch.cat([logits, logits.flip(1)])) > 0

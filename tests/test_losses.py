import math

import pytest
import torch

from crosssim.losses import contrastive_loss, infonce_loss, proximal_term, similarity_loss

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

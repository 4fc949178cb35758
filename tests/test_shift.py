import math

import pytest
import torch
import torch.nn.functional as F

from crosssim.adapt import adabn
from crosssim.checkpoint import load_checkpoint
from crosssim.model import CrossSimNet
from crosssim.prototypes import Prototypes
from crosssim.shift import ALARM_FACTORS, aggregate_figures, prototype_distance, shift_alarms, shift_figures

CPU = torch.device("cpu")


def _prototypes() -> Prototypes:
    vectors = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    return Prototypes(vectors, torch.tensor([10, 10, 0]))


def test_prototype_distance_is_zero_on_prototypes_and_ignores_absent_classes():
    protos = _prototypes()
    assert prototype_distance(F.normalize(protos.vectors[:2], dim=1), protos) == pytest.approx(0.0, abs=1e-6)
    # the third axis belongs to an absent class: its nearest present prototype is orthogonal
    assert prototype_distance(torch.tensor([[0.0, 0.0, 1.0]]), protos) == pytest.approx(1.0)
    assert math.isnan(prototype_distance(torch.ones(2, 3), Prototypes.empty(3, 3)))


def test_bn_drift_vanishes_on_the_statistics_the_model_normalizes_with():
    torch.manual_seed(0)
    model = CrossSimNet(num_classes=3, embedding_dim=8)
    images = torch.rand(64, 1, 16, 16)
    adabn(model, images, CPU)  # running statistics := these images' statistics (one batch)
    protos = Prototypes(torch.randn(3, 8), torch.tensor([5, 5, 5]))
    same = shift_figures(model, images, protos, CPU)["bn_drift"]
    shifted = shift_figures(model, images * 3 + 1, protos, CPU)["bn_drift"]
    assert same < 0.01
    assert shifted > 0.5


def test_aggregate_figures_weights_by_count_and_skips_nan():
    per_site = [({"bn_drift": 1.0, "prototype_distance": float("nan")}, 1),
                ({"bn_drift": 3.0, "prototype_distance": 0.2}, 3)]
    assert aggregate_figures(per_site) == pytest.approx({"bn_drift": 2.5, "prototype_distance": 0.2})


ALARM_CASES = [  # (target as a multiple of factor × source, source, flagged)
    (1.01, 0.4, True),
    (0.99, 0.4, False),
    (1.01, float("nan"), None),
]


@pytest.mark.parametrize("multiple,source,flagged", ALARM_CASES)
def test_shift_alarms_flag_above_the_documented_factor(multiple, source, flagged):
    figures = {name: multiple * factor * 0.4 for name, factor in ALARM_FACTORS.items()}
    alarms = shift_alarms(figures, {name: source for name in ALARM_FACTORS})
    assert set(alarms) == set(ALARM_FACTORS)
    assert all(alarm["flagged"] is flagged for alarm in alarms.values())
    assert all(alarm["flagged"] is None for alarm in shift_alarms(figures, {}).values())


def test_pooled_checkpoint_carries_the_source_references(eval_tiny_run):
    reference = load_checkpoint(eval_tiny_run.checkpoint).source.shift_reference
    assert set(reference) == set(ALARM_FACTORS)
    assert all(math.isfinite(v) and v >= 0 for v in reference.values())

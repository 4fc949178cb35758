import torch

from crosssim.prototypes import Prototypes, aggregate_prototypes, compute_prototypes, privatize


def test_compute_prototypes_means_and_min_count():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    y = torch.tensor([0, 0, 1, 2])
    protos = compute_prototypes(z, y, num_classes=4, min_count=2)
    assert protos.counts.tolist() == [2, 0, 0, 0]  # classes 1, 2 under min-count, class 3 absent
    assert torch.allclose(protos.vectors[0], torch.tensor([2.0, 0.0]))
    assert torch.count_nonzero(protos.vectors[1:]) == 0  # nothing of a dropped class is sent


def test_aggregate_is_count_weighted_and_keeps_previous_for_missing_classes():
    a = Prototypes(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([3, 0]))
    b = Prototypes(torch.tensor([[0.0, 1.0], [0.0, 0.0]]), torch.tensor([1, 0]))
    previous = Prototypes(torch.tensor([[9.0, 9.0], [0.5, 0.5]]), torch.tensor([4, 7]))
    merged = aggregate_prototypes([a, b], previous)
    assert torch.allclose(merged.vectors[0], torch.tensor([0.75, 0.25]))
    assert merged.counts.tolist() == [4, 7]
    assert torch.allclose(merged.vectors[1], previous.vectors[1])


def test_privatize_adds_noise_only_to_sent_classes():
    protos = Prototypes(torch.ones(3, 4), torch.tensor([5, 0, 2]))
    noisy = privatize(protos, 0.1, torch.Generator().manual_seed(0))
    assert not torch.equal(noisy.vectors[0], protos.vectors[0])
    assert torch.equal(noisy.vectors[1], protos.vectors[1])
    assert privatize(protos, 0.0) is protos

"""The style bank: domain-level statistics on known tensors, mixing, the bank's records and aggregation."""

import pytest
import torch
from torch import nn

from crosssim.style import (StyleEntry, StyleMixer, aggregate_bank, bank_from_arrays, bank_to_arrays,
                            compute_style, layer_channels, mixing_styles, style_layers)


class TwoBlocks(nn.Module):
    """Identity convs in front of two BatchNorm2d layers: the first style layer sees the images themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.conv.weight.data = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(2), nn.BatchNorm2d(2), nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.bn2(self.bn1(self.conv(x))))


def _images() -> torch.Tensor:
    """Image i is constant i plus a ±1 checkerboard: instance mean i, instance std 1."""
    board = torch.tensor([[(-1.0) ** (row + col) for col in range(4)] for row in range(4)])
    return torch.stack([(i + board).unsqueeze(0) for i in range(4)])


def test_style_entry_holds_the_spread_of_instance_statistics_at_each_layer_input():
    model = TwoBlocks()
    entry = compute_style(model, _images(), 2, torch.device("cpu"), min_count=2)
    assert list(entry.layers) == ["bn1", "bn2"] and entry.count == 4
    first = entry.layers["bn1"]  # the conv doubles channel 1: means 0..3 (×2), std 1 (×2)
    assert torch.allclose(first["mean-mean"], torch.tensor([1.5, 3.0]))
    assert torch.allclose(first["mean-std"], torch.tensor([1.0, 2.0]) * torch.arange(4.0).std())
    assert torch.allclose(first["std-mean"], torch.tensor([1.0, 2.0]), atol=1e-5)
    assert torch.allclose(first["std-std"], torch.zeros(2), atol=1e-5)


def test_a_site_under_min_count_sends_an_empty_entry():
    entry = compute_style(TwoBlocks(), _images(), 2, torch.device("cpu"), min_count=5)
    assert entry.count == 0 and all(torch.count_nonzero(v) == 0 for s in entry.layers.values() for v in s.values())


def test_style_record_round_trips_and_refuses_undeclared_arrays():
    model = TwoBlocks()
    entry = compute_style(model, _images(), 2, torch.device("cpu"), min_count=2)
    shapes = layer_channels(model, 2)
    arrays = entry.to_arrays()
    assert len(arrays) == 4 * len(shapes) + 1
    back = StyleEntry.from_arrays(arrays, shapes)
    assert back.count == 4 and torch.equal(back.layers["bn2"]["std-mean"], entry.layers["bn2"]["std-mean"])
    with pytest.raises(ValueError, match="style record"):
        StyleEntry.from_arrays({**arrays, "pixels": torch.zeros(4, 4)}, shapes)
    with pytest.raises(ValueError, match="shape"):
        StyleEntry.from_arrays({**arrays, "bn1/mean-mean": torch.zeros(3)}, shapes)
    with pytest.raises(ValueError, match="finite"):
        StyleEntry.from_arrays({**arrays, "bn1/mean-mean": torch.tensor([float("nan"), 0.0])}, shapes)


def test_bank_keeps_each_sites_latest_entry_and_round_trips_as_arrays():
    model = TwoBlocks()
    shapes = layer_channels(model, 2)
    a = compute_style(model, _images(), 2, torch.device("cpu"), 2)
    b = compute_style(model, _images() * 3, 2, torch.device("cpu"), 2)
    empty = compute_style(model, _images(), 2, torch.device("cpu"), 10)
    bank = aggregate_bank({"1": a}, {"2": b})
    bank = aggregate_bank(bank, {"1": b, "3": empty})  # refreshed; an empty entry never replaces or joins
    assert set(bank) == {"1", "2"} and torch.equal(bank["1"].layers["bn1"]["mean-mean"], b.layers["bn1"]["mean-mean"])
    restored = bank_from_arrays(bank_to_arrays(bank), shapes)
    assert set(restored) == {"1", "2"} and restored["2"].count == 4


def _style_entry(mean: float, std: float, channels: int = 2) -> StyleEntry:
    stats = {"mean-mean": torch.full((channels,), mean), "mean-std": torch.zeros(channels),
             "std-mean": torch.full((channels,), std), "std-std": torch.zeros(channels)}
    return StyleEntry({"bn1": stats}, 10)


def test_mixing_with_probability_one_and_alpha_zero_takes_the_drawn_style_exactly():
    x = torch.randn(8, 2, 6, 6)
    mixed = StyleMixer([_style_entry(5.0, 0.5)], probability=1.0, alpha=0.0, seed=0).mix("bn1", x)
    assert torch.allclose(mixed.mean(dim=(2, 3)), torch.full((8, 2), 5.0), atol=1e-4)
    assert torch.allclose(mixed.std(dim=(2, 3), unbiased=False), torch.full((8, 2), 0.5), atol=1e-3)


def test_mixing_is_seeded_and_off_at_probability_zero():
    x = torch.randn(8, 2, 6, 6)
    entries = [_style_entry(5.0, 0.5), _style_entry(-2.0, 2.0)]
    first = StyleMixer(entries, 0.5, 0.1, seed=3).mix("bn1", x)
    assert torch.equal(first, StyleMixer(entries, 0.5, 0.1, seed=3).mix("bn1", x))
    assert not torch.equal(first, StyleMixer(entries, 0.5, 0.1, seed=4).mix("bn1", x))
    assert torch.equal(StyleMixer(entries, 0.0, 0.1, seed=3).mix("bn1", x), x)


def test_hooks_mix_only_in_training_mode_and_are_removed_afterwards():
    model = TwoBlocks()
    mixer = StyleMixer([_style_entry(5.0, 0.5)], probability=1.0, alpha=0.0, seed=0)
    x = torch.randn(4, 1, 6, 6)
    seen = []
    model.bn1.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].mean().item()))  # after mixing
    with mixing_styles(model, mixer, 1):
        model.eval()(x)
        model.train()(x)
    model(x)
    assert seen[0] == pytest.approx(seen[2], abs=1e-6) and seen[1] != pytest.approx(seen[0], abs=1e-3)
    assert [name for name, _ in style_layers(model, 1)] == ["bn1"]

"""crosssim.wire: a state dict travels as two flat arrays and comes back as the receiver's model's tensors."""

import pytest
import torch

from crosssim.config import load_config
from crosssim.model import build_model
from crosssim.wire import FLOATS_ARRAY, INTEGERS_ARRAY, from_wire, to_wire


@pytest.fixture
def state():
    torch.manual_seed(0)
    model = build_model(load_config(None, {"image-size": 32}).model, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model.state_dict()


def test_float32_round_trip_is_exact_and_in_two_arrays(state):
    packed = to_wire(state, "float32")
    assert set(packed) == {FLOATS_ARRAY, INTEGERS_ARRAY}
    assert packed[FLOATS_ARRAY].numel() == sum(v.numel() for v in state.values() if v.is_floating_point())
    back = from_wire(packed, state)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


def test_float16_travels_half_and_comes_back_float32(state):
    packed = to_wire(state, "float16")
    assert packed[FLOATS_ARRAY].dtype == torch.float16 and packed[INTEGERS_ARRAY].dtype == torch.int64
    back = from_wire(packed, state)
    for key, value in state.items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(back[key], expected) and back[key].dtype == value.dtype


def test_key_order_of_the_sender_does_not_matter(state):
    shuffled = dict(reversed(list(state.items())))
    assert torch.equal(to_wire(shuffled, "float32")[FLOATS_ARRAY], to_wire(state, "float32")[FLOATS_ARRAY])


@pytest.mark.parametrize("spoil, message", [
    (lambda p: {**p, FLOATS_ARRAY: p[FLOATS_ARRAY][:-1]}, "'floats' holds"),
    (lambda p: {FLOATS_ARRAY: p[FLOATS_ARRAY]}, "'integers' holds 0 values"),
    (lambda p: {**p, "pixels": torch.zeros(4)}, "unexpected arrays ['pixels']"),
    (lambda p: {**p, FLOATS_ARRAY: p[FLOATS_ARRAY].long()}, "'floats' is torch.int64"),
])
def test_arrays_that_do_not_fit_the_model_are_refused(state, spoil, message):
    with pytest.raises(ValueError, match="weights do not match the model") as raised:
        from_wire(spoil(to_wire(state, "float32")), state)
    assert message in str(raised.value)


def test_a_model_without_integer_buffers_sends_one_array():
    floats = {"b": torch.ones(2), "a": torch.zeros(3, 1)}
    packed = to_wire(floats, "float32")
    assert set(packed) == {FLOATS_ARRAY} and packed[FLOATS_ARRAY].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unexpected arrays \\['integers'\\]"):
        from_wire({**packed, INTEGERS_ARRAY: torch.zeros(1, dtype=torch.int64)}, floats)

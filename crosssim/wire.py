"""Model weights as they travel between server and sites: two flat vectors, not one array per tensor.

Flower moves a message as a tree of objects (the message, each record, each array and its chunks), and every
object costs a round trip on every hop: ClientApp → SuperNode → SuperLink → ServerApp and back. A state dict
sent tensor by tensor is dozens of objects; packed it is two arrays (floating-point values in ``update-dtype``,
integer buffers such as BatchNorm's counters as int64), in sorted key order. The receiver unpacks against the
model it already holds (its ``template``), so a reply that does not fit that model is refused by size.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# Floating-point dtype of model weights on the wire (config key update-dtype); math is float32 everywhere.
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FLOATS_ARRAY = "floats"  # every floating-point tensor, flattened and concatenated in sorted key order
INTEGERS_ARRAY = "integers"  # every integer buffer (BatchNorm's num_batches_tracked), likewise, as int64


def _groups(template: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """{array name: the keys it holds, sorted}; an array with no keys is not sent."""
    keys = sorted(template)
    return {FLOATS_ARRAY: [k for k in keys if template[k].is_floating_point()],
            INTEGERS_ARRAY: [k for k in keys if not template[k].is_floating_point()]}


def to_wire(state: Mapping[str, torch.Tensor], update_dtype: str) -> dict[str, torch.Tensor]:
    """``state`` packed into at most two flat arrays: floats in ``update-dtype`` (float16 halves the bytes), integers
    as int64."""
    dtypes = {FLOATS_ARRAY: WIRE_DTYPES[update_dtype], INTEGERS_ARRAY: torch.int64}
    return {name: torch.cat([state[k].detach().flatten().to(dtypes[name]) for k in keys])
            for name, keys in _groups(state).items() if keys}


def from_wire(arrays: Mapping[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``to_wire`` packed, as tensors of ``template``'s keys and shapes (floats in float32, never summed in
    float16); ValueError when the arrays do not fit ``template``."""
    groups = _groups(template)
    unexpected = sorted(set(arrays) - {name for name, keys in groups.items() if keys})
    if unexpected:
        raise ValueError(f"weights do not match the model (unexpected arrays {unexpected[:3]})")
    state: dict[str, torch.Tensor] = {}
    for name, keys in groups.items():
        sizes = [template[k].numel() for k in keys]
        flat = arrays.get(name, torch.empty(0)).flatten()
        if flat.numel() != sum(sizes):
            raise ValueError(f"weights do not match the model ('{name}' holds {flat.numel()} values, the model "
                             f"has {sum(sizes)})")
        if keys and flat.is_floating_point() != template[keys[0]].is_floating_point():
            raise ValueError(f"weights do not match the model ('{name}' is {flat.dtype})")
        dtype = torch.float32 if name == FLOATS_ARRAY else torch.int64
        for key, part in zip(keys, flat.to(dtype).split(sizes)):
            state[key] = part.reshape(template[key].shape).clone()
    return state

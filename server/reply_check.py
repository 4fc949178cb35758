"""Each site's train reply is checked before aggregation: a bad update is rejected with a reason, never averaged.

A reply is rejected when its packed weights do not fit the global model's shared tensors
(``crosssim.wire.from_wire`` refuses them by name, size and kind) or hold any non-finite value, when its
prototypes or style entry do not parse (their readers, ``prototypes_from_arrays`` and ``StyleEntry.from_arrays``,
check shapes and finiteness), or when its update norm ‖w_site − w_global‖ exceeds ``max-update-norm-ratio`` × the
median over the round's replies (only with at least ``MIN_REPLIES_FOR_NORM_CHECK`` replies: a median of one or two
says nothing).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

MIN_REPLIES_FOR_NORM_CHECK = 3


def state_problem(state: Mapping[str, torch.Tensor]) -> str | None:
    """Why unpacked weights (``from_wire`` checked keys, shapes and kinds) cannot be averaged; None when they can."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"{key} holds non-finite values"
    return None


def update_norm(state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> float:
    """‖w_site − w_global‖ over the floating-point tensors, in float64."""
    total = sum(float(((state[k].double() - global_state[k].double()) ** 2).sum())
                for k in state if state[k].is_floating_point())
    return math.sqrt(total)


def norm_outliers(norms: Mapping[str, float], max_ratio: float) -> dict[str, str]:
    """{node: reason} for updates above ``max_ratio`` × the median norm; none when off or too few replies."""
    if max_ratio <= 0 or len(norms) < MIN_REPLIES_FOR_NORM_CHECK:
        return {}
    median = statistics.median(norms.values())
    if median <= 0:
        return {}
    return {node: f"update norm {norm:.3g} is {norm / median:.1f}x the round's median {median:.3g} "
                  f"(max-update-norm-ratio {max_ratio:g})"
            for node, norm in norms.items() if norm > max_ratio * median}

"""`--adapt auto`: a label-free rule that picks none / adabn / tent / crosssim, with AdaBN as the fallback.

The rule, in order:
1. Fewer than ``AUTO_MIN_IMAGES`` target images: **none** (BatchNorm statistics of so few images are noise).
2. Otherwise AdaBN is the reference. Try **crosssim**, then **tent**; take the first whose predictions are
   not degenerate against the AdaBN model's:
   - top-1 agreement with the AdaBN model at least ``AUTO_MIN_AGREEMENT`` (it did not drift away), and
   - effective number of predicted classes (exp of the entropy of the predicted prevalence) at least
     ``AUTO_MIN_CLASS_RATIO`` of the AdaBN model's (the prevalence did not collapse onto few classes).
3. Neither passes: **adabn**.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crosssim.adapt import AdaptedCopies
from crosssim.metrics import top1_agreement
from crosssim.model import CrossSimNet

AUTO_MIN_IMAGES = 32  # target images needed before BatchNorm statistics are re-estimated
AUTO_MIN_AGREEMENT = 0.6  # top-1 agreement with the AdaBN model below this: the adaptation drifted
AUTO_MIN_CLASS_RATIO = 0.5  # effective predicted classes vs the AdaBN model's below this: collapse
AUTO_CANDIDATES = ("crosssim", "tent")  # tried in this order against the AdaBN reference


def effective_classes(probs: np.ndarray) -> float:
    """exp(entropy) of the predicted-class prevalence: 1 when every image gets one class, C when balanced."""
    prevalence = np.bincount(probs.argmax(1), minlength=probs.shape[1]) / max(len(probs), 1)
    nonzero = prevalence[prevalence > 0]
    return float(np.exp(-(nonzero * np.log(nonzero)).sum()))


def degeneracy_checks(probs: np.ndarray, reference_probs: np.ndarray) -> dict[str, Any]:
    """Agreement and prevalence-collapse figures of ``probs`` against the AdaBN ``reference_probs``."""
    agreement = top1_agreement(probs, reference_probs)
    class_ratio = effective_classes(probs) / effective_classes(reference_probs)
    return {"agreement_with_adabn": agreement, "effective_class_ratio": class_ratio,
            "degenerate": bool(agreement < AUTO_MIN_AGREEMENT or class_ratio < AUTO_MIN_CLASS_RATIO)}


@dataclass
class AdaptationChoice:
    """The model ``auto`` deploys, its name, the reason, and every candidate's checks."""

    model: CrossSimNet
    method: str
    reason: str
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference_probs: torch.Tensor | None = None  # the AdaBN model's predictions, when computed

    def record(self) -> dict[str, Any]:
        return {"chosen": self.method, "reason": self.reason, "checks": self.checks}


def choose_adaptation(copies: AdaptedCopies) -> AdaptationChoice:
    """Apply the rule of this module's docstring to the site's ``copies`` of the model."""
    images = copies.images
    if len(images) < AUTO_MIN_IMAGES:
        return AdaptationChoice(copies.model_for("none"), "none",
                                f"{len(images)} images < {AUTO_MIN_IMAGES}: too few to re-estimate BatchNorm")
    reference_probs = copies.predictions("adabn")[0]
    checks: dict[str, dict[str, Any]] = {}
    for method in AUTO_CANDIDATES:
        checks[method] = degeneracy_checks(copies.predictions(method)[0].numpy(), reference_probs.numpy())
        if not checks[method]["degenerate"]:
            figures = checks[method]
            return AdaptationChoice(copies.model_for(method), method,
                                    f"{method}: agreement with AdaBN {figures['agreement_with_adabn']:.2f} "
                                    f">= {AUTO_MIN_AGREEMENT}, effective classes "
                                    f"{figures['effective_class_ratio']:.2f} "
                                    f"x AdaBN's >= {AUTO_MIN_CLASS_RATIO}", checks, reference_probs)
    return AdaptationChoice(copies.model_for("adabn"), "adabn", "fallback: " + "; ".join(
        f"{m} degenerate (agreement {c['agreement_with_adabn']:.2f}, classes x{c['effective_class_ratio']:.2f})"
        for m, c in checks.items()), checks, reference_probs)

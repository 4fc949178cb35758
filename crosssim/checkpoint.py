"""The one checkpoint format shared by pooled training, federated rounds and evaluation.

A checkpoint is a single file holding only tensors, numbers, strings and lists, loaded with
``weights_only=True``: opening a checkpoint never runs code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosssim.config import CrossSimConfig, apply_overrides, to_flat
from crosssim.fileio import atomic_torch_save, load_tensors
from crosssim.metrics import confidence_histogram
from crosssim.model import CrossSimNet, build_model
from crosssim.prototypes import Prototypes

CHECKPOINT_FORMAT = "crosssim-checkpoint"
CHECKPOINT_VERSION = 1
SHIFT_REFERENCE_KEY = "shift_reference"  # SourceStats.extra entry: {figure name: source value} (crosssim.shift)


@dataclass
class SourceStats:
    """What the sources' validation data looked like: the reference for label-free estimates."""

    confidence_histogram: np.ndarray  # fraction per bin of max-softmax confidence on [0, 1]
    accuracy: float
    mean_confidence: float
    count: int
    prevalence: np.ndarray  # (C,) class fractions of the sources' training labels
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. alarm references (embedding distances, BN stats)

    @classmethod
    def from_predictions(cls, probs: torch.Tensor, labels: torch.Tensor, train_labels: torch.Tensor,
                         num_classes: int, shift_reference: dict[str, float] | None = None) -> "SourceStats":
        """Stats of source validation predictions; ``shift_reference`` from ``crosssim.shift.shift_figures``."""
        confidence = probs.max(1).values.numpy()
        correct = (probs.argmax(1) == labels).numpy()
        prevalence = np.bincount(train_labels.numpy(), minlength=num_classes) / max(len(train_labels), 1)
        extra = {} if shift_reference is None else {SHIFT_REFERENCE_KEY: dict(shift_reference)}
        return cls(confidence_histogram(confidence), float(correct.mean()), float(confidence.mean()),
                   len(confidence), prevalence, extra)

    @property
    def shift_reference(self) -> dict[str, float]:
        """Source values of the shift-alarm figures; empty when the checkpoint predates them."""
        return dict(self.extra.get(SHIFT_REFERENCE_KEY, {}))

    def to_blob(self) -> dict[str, Any]:
        return {"confidence_histogram": torch.tensor(self.confidence_histogram, dtype=torch.float64),
                "accuracy": self.accuracy, "mean_confidence": self.mean_confidence, "count": self.count,
                "prevalence": torch.tensor(self.prevalence, dtype=torch.float64), "extra": self.extra}

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> "SourceStats":
        return cls(blob["confidence_histogram"].numpy(), float(blob["accuracy"]),
                   float(blob["mean_confidence"]), int(blob["count"]), blob["prevalence"].numpy(),
                   dict(blob.get("extra", {})))


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: CrossSimConfig
    classes: list[str]
    prototypes: Prototypes
    source: SourceStats | None
    round: int = 0
    kind: str = "pooled"  # pooled | federated
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self) -> CrossSimNet:
        model = build_model(self.config.model, len(self.classes))
        model.load_state_dict(self.state_dict)
        return model


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written checkpoint."""
    blob = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "config": to_flat(ckpt.config), "classes": list(ckpt.classes),
        "prototypes": ckpt.prototypes.vectors.cpu(), "prototype_counts": ckpt.prototypes.counts.cpu(),
        "source": None if ckpt.source is None else ckpt.source.to_blob(),
        "round": ckpt.round, "kind": ckpt.kind, "extra": ckpt.extra,
    }
    return atomic_torch_save(blob, path)


class CheckpointError(ValueError):
    pass


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        blob = load_tensors(path)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"{path}: not a readable CrossSim checkpoint ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a CrossSim checkpoint")
    if blob.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {blob.get('version')} (this CrossSim reads "
                              f"{CHECKPOINT_VERSION})")
    return Checkpoint(
        state_dict=blob["state_dict"], config=apply_overrides(CrossSimConfig(), blob["config"]),
        classes=list(blob["classes"]), prototypes=Prototypes(blob["prototypes"], blob["prototype_counts"]),
        source=None if blob["source"] is None else SourceStats.from_blob(blob["source"]),
        round=int(blob["round"]), kind=str(blob["kind"]), extra=dict(blob.get("extra", {})))

"""The exported model under ONNX Runtime: DICOM bytes → class, confidence, probabilities and per-image alarms.

Preprocessing is ``crosssim.data.dicom.read_image`` with the manifest's DataConfig, the function training
and evaluation use. Per-image alarms:

- ``low_confidence``: the top probability is below the ATC threshold of the sources (the confidence above
  which the sources' validation images were as often as the model was accurate: crosssim.metrics).
- ``far_from_prototypes``: the embedding's ``1 − cos`` to the nearest present global prototype exceeds
  ``factor × reference``, the reference being the sources' mean of that distance and the factor the one
  ``crosssim.shift`` raises the site-level alarm with. None when the checkpoint carries no reference.
  For an adapted export the embedding is the adapted model's while prototypes and reference are the
  federation's, as the site-level alarm of ``crosssim evaluate`` would not be (it uses the unadapted model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosssim.data.dicom import read_image
from crosssim.export import INPUT_NAME, OUTPUT_NAMES, ManifestError, load_manifest, sha256_of
from crosssim.prototypes import Prototypes
from crosssim.shift import prototype_distances


@dataclass(frozen=True)
class Prediction:
    """One image's prediction and alarms, as ``POST /v1/predict`` returns it."""

    label: str
    confidence: float
    probabilities: dict[str, float]
    low_confidence: bool | None
    far_from_prototypes: bool | None

    def to_json(self) -> dict[str, Any]:
        return {"class": self.label, "confidence": self.confidence, "probabilities": self.probabilities,
                "alarms": {"low_confidence": self.low_confidence, "far_from_prototypes": self.far_from_prototypes}}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (N, C) → (N, C)."""
    shifted = logits.astype(np.float64) - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)


class ServedModel:
    """A serving folder's manifest and one ONNX Runtime session (``int8``: the quantized model)."""

    def __init__(self, model_dir: str | Path, *, int8: bool = False, threads: int = 0) -> None:
        import onnxruntime

        self.manifest, self.model_hash = load_manifest(model_dir)
        self.variant = "int8" if int8 else "float32"
        entry = self.manifest.models.get(self.variant)
        if entry is None:
            raise ManifestError(f"{model_dir}: no {self.variant} model in the manifest (export it with "
                                "`crosssim export --quantize int8 --data DIR`)")
        path = Path(model_dir) / entry["file"]
        if not path.is_file():
            raise ManifestError(f"{path}: model file listed in the manifest is missing")
        if sha256_of(path) != entry["sha256"]:
            raise ManifestError(f"{path}: sha256 differs from the manifest's (file replaced or damaged; export again)")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                                        disabled_optimizers=entry.get("disabled_optimizers", []))
        except Exception as exc:  # onnxruntime raises its own pybind types for a bad model file
            raise ManifestError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__})") from None
        self.data_config = self.manifest.data_config()
        self.prototypes = Prototypes(torch.tensor(self.manifest.prototype_vectors, dtype=torch.float32),
                                     torch.tensor(self.manifest.prototype_counts, dtype=torch.int64))

    def preprocess(self, data: bytes, name: str) -> np.ndarray:
        """DICOM bytes → float32 (1, S, S) by training's ``read_image``; ``SkippedFile`` for bad input."""
        return read_image(data, self.data_config, name=name)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C), embeddings (N, d)) of preprocessed images (N, 1, S, S)."""
        logits, embeddings = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.astype(np.float32)})
        return logits, embeddings

    def predict(self, images: np.ndarray) -> list[Prediction]:
        """Class, confidence, probabilities and both alarms for each preprocessed image (N, 1, S, S)."""
        logits, embeddings = self.run(images)
        probs = softmax(logits)
        distances = prototype_distances(torch.from_numpy(embeddings), self.prototypes).numpy()
        threshold = self.manifest.atc_threshold
        reference = self.manifest.prototype_distance_reference
        classes = self.manifest.classes
        out = []
        for row, distance in zip(probs, distances):
            confidence = float(row.max())
            far = None
            if reference is not None and not math.isnan(float(distance)):
                far = bool(distance > self.manifest.prototype_distance_factor * reference)
            out.append(Prediction(classes[int(row.argmax())], confidence,
                                  {c: float(p) for c, p in zip(classes, row)},
                                  None if threshold is None else confidence < threshold, far))
        return out

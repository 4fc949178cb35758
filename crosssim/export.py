"""`crosssim export`: a checkpoint (optionally adapted to a site) → ONNX model + manifest for `crosssim serve`.

A serving folder holds ``model.onnx`` (CrossSimNet's forward: ``image`` (N, 1, S, S) → ``logits`` (N, C),
``embedding`` (N, d), dynamic batch axis), optionally ``model-int8.onnx`` (static post-training
quantization calibrated on a site's preprocessed images, never its labels) and ``manifest.json``: what the
server needs to preprocess exactly as training did and to raise the per-image alarms. The manifest is
written last, so a folder with a manifest is complete. The checkpoint file is only read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosssim.config import DataConfig
from crosssim.fileio import atomic_write_bytes, atomic_write_text
from crosssim.metrics import top1_agreement

MANIFEST_FORMAT = "crosssim-serving"
MANIFEST_VERSION = 1
MANIFEST_FILENAME = "manifest.json"
FLOAT_MODEL_FILENAME = "model.onnx"
INT8_MODEL_FILENAME = "model-int8.onnx"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "embedding")
ONNX_OPSET = 17  # supported by every onnxruntime since 1.11 and by torch's TorchScript exporter
QUANTIZE_MODES = ("int8",)
CALIBRATION_BATCH_SIZE = 32  # images per calibration forward pass
MAX_CALIBRATION_IMAGES = 512  # more adds minutes, not accuracy: min/max calibration saturates quickly
INT8_MIN_AGREEMENT = 0.98  # top-1 agreement with float on the calibration images for the head to go int8
# ONNX Runtime graph optimizers the int8 session runs without: QDQ propagation would move the quantization after
# a float layer back over MaxPool (``_quantized``). The manifest records them for every session of the model.
INT8_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)
# The DataConfig fields crosssim.data.dicom.read_image reads: everything a server needs to see training's pixels.
PREPROCESSING_FIELDS = ("image_size", "normalize", "clip_low_percentile", "clip_high_percentile", "frame",
                        "voi_lut")
Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class ServingManifest:
    """``manifest.json`` of a serving folder: the model files, preprocessing, classes and alarm references."""

    checkpoint_sha256: str
    classes: list[str]
    preprocessing: dict[str, Any]  # PREPROCESSING_FIELDS of the checkpoint's DataConfig
    atc_threshold: float | None  # confidence below it: low_confidence (None: checkpoint without SourceStats)
    prototype_vectors: list[list[float]]  # (C, d) global prototypes
    prototype_counts: list[int]  # (C,), 0 = class absent
    prototype_distance_reference: float | None  # sources' mean 1 − cos to the nearest prototype (crosssim.shift)
    prototype_distance_factor: float  # far_from_prototypes: distance > factor × reference (shift.ALARM_FACTORS)
    adaptation: dict[str, Any]  # how the exported model came about (method, site, images, settings)
    models: dict[str, dict[str, Any]]  # variant ("float32", "int8") → {"file", "sha256", ...}
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])

    def data_config(self) -> DataConfig:
        """The preprocessing settings as the DataConfig ``read_image`` takes."""
        return DataConfig(**self.preprocessing)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False)


class ManifestError(ValueError):
    """A serving folder that cannot be served; the message names the file and the problem."""


def load_manifest(model_dir: str | Path) -> tuple[ServingManifest, str]:
    """Read ``DIR/manifest.json`` → (manifest, sha256 of its bytes: the served model's identity)."""
    path = Path(model_dir) / MANIFEST_FILENAME
    if not path.is_file():
        raise ManifestError(f"{path}: no serving manifest (write one with `crosssim export`)")
    data = path.read_bytes()
    try:
        blob = json.loads(data)
        manifest = ServingManifest(**blob)
    except (ValueError, TypeError) as exc:
        raise ManifestError(f"{path}: not a CrossSim serving manifest ({type(exc).__name__})") from None
    if (manifest.format, manifest.version) != (MANIFEST_FORMAT, MANIFEST_VERSION):
        raise ManifestError(f"{path}: manifest {manifest.format} v{manifest.version} (this CrossSim serves "
                            f"{MANIFEST_FORMAT} v{MANIFEST_VERSION})")
    return manifest, hashlib.sha256(data).hexdigest()


def sha256_of(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_bytes(model: torch.nn.Module, image_size: int) -> bytes:
    """CrossSimNet (eval mode, CPU) as ONNX: ``image`` → (``logits``, ``embedding``), dynamic batch axis."""
    model = model.cpu().eval()
    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        # The TorchScript exporter: the torch.export-based default needs onnxscript, which CrossSim does not
        # depend on; this one covers every CrossSim backbone (Conv, BatchNorm, pooling, Linear).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 1, image_size, image_size),), buffer, dynamo=False,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
                          opset_version=ONNX_OPSET)
    return buffer.getvalue()


def fragile_nodes(model: bytes) -> tuple[list[str], list[str]]:
    """(The first convolution, the node producing ``logits``): the layers int8 hurts most (``quantize_int8``).

    Evidence (benchmarks/serve.py's model, seed-cnn, 64 px, one thread, an AVX2 CPU without VNNI): the first
    convolution (one input channel, so 9 multiply-adds an output) runs 4x slower in int8 than in float (311 vs
    73 us) where the second runs 1.6x faster (325 vs 512 us), and alone in int8 it moves logits by up to 0.13
    and flips 5 % of the target's predictions; every other layer alone flips 0-2 %.
    """
    import onnx

    nodes = onnx.load_model_from_string(model).graph.node
    first_conv = [n.name for n in nodes if n.op_type == "Conv"][:1]
    head = [n.name for n in nodes if OUTPUT_NAMES[0] in n.output]
    return first_conv, head


def _batches(images: np.ndarray) -> Iterator[np.ndarray]:
    """``images`` in batches of ``CALIBRATION_BATCH_SIZE``."""
    return (images[start:start + CALIBRATION_BATCH_SIZE] for start in range(0, len(images), CALIBRATION_BATCH_SIZE))


def _quantized(float_path: Path, target: Path, images: np.ndarray, float_nodes: list[str]) -> bytes:
    """Static post-training int8 (QDQ; uint8 activations and per-channel int8 weights, ONNX Runtime's choice for
    x86 CPUs), calibrated on ``images`` (N, 1, S, S), with ``float_nodes`` left in float.

    MaxPool is left unquantized: after a float layer, ONNX Runtime would run it on uint8 in NCHW layout, 9x slower
    than in float (666 vs 73 us after the first convolution); with ``INT8_DISABLED_OPTIMIZERS`` in the session it
    stays float and the quantization point moves past it, where the tensor is 4x smaller.

    Weights use 7 bits (``reduce_range``): on x86 CPUs without VNNI (AVX2 only) ONNX Runtime multiplies uint8 by
    int8 in pairs summed into int16, which saturates with full-range weights. On such a CPU, 8-bit weights made the
    first convolution (one input channel, images filling [0, 1]) move logits by up to 1.9 and predict one class for
    every image; 7 bits: 0.13. A model exported on one machine is served on others, so 7 bits everywhere."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.registry import QDQRegistry

    class SiteImages(CalibrationDataReader):
        """The calibration site's preprocessed images in batches; labels never enter."""

        def __init__(self) -> None:
            self.batches = _batches(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    quantize_static(str(float_path), str(target), SiteImages(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True,
                    nodes_to_exclude=float_nodes, op_types_to_quantize=sorted(set(QDQRegistry) - {"MaxPool"}))
    return target.read_bytes()


def _logits(model: bytes, images: np.ndarray, disabled_optimizers: Sequence[str] = ()) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=list(disabled_optimizers))
    return np.concatenate([session.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})[0] for batch in _batches(images)])


@dataclass(frozen=True)
class Int8Model:
    model: bytes
    float_nodes: list[str]  # left in float
    calibration_agreement: float  # top-1 agreement with the float model on the calibration images


def quantize_int8(float_model: bytes, images: np.ndarray) -> Int8Model:
    """Every layer but the first convolution in int8 when that agrees with the float model on at least
    ``INT8_MIN_AGREEMENT`` of the calibration ``images`` (N, 1, S, S; their labels are never read), else the head
    kept in float too (``fragile_nodes``)."""
    images = images.astype(np.float32)
    reference = _logits(float_model, images)
    with tempfile.TemporaryDirectory(prefix="crosssim-quantize-") as tmp:
        source, target = Path(tmp) / FLOAT_MODEL_FILENAME, Path(tmp) / INT8_MODEL_FILENAME
        source.write_bytes(float_model)

        def attempt(float_nodes: list[str]) -> Int8Model:
            model = _quantized(source, target, images, float_nodes)
            agreement = top1_agreement(_logits(model, images, INT8_DISABLED_OPTIMIZERS), reference)
            return Int8Model(model, float_nodes, agreement)

        first_conv, head = fragile_nodes(float_model)
        preferred = attempt(first_conv)
        if preferred.calibration_agreement >= INT8_MIN_AGREEMENT:
            return preferred
        return attempt(first_conv + head)


def export_model(checkpoint_path: str | Path, out_dir: str | Path, *, adapt: str = "none",
                 data_dir: str | Path | None = None, quantize: str | None = None,
                 cache_dir: str | Path | None = None, device_name: str | None = None,
                 progress: Progress = print) -> ServingManifest:
    """Write ``out_dir``'s serving files for ``checkpoint_path`` (adapted to / calibrated on ``data_dir``)."""
    from crosssim.checkpoint import load_checkpoint
    from crosssim.data.sites import load_site
    from crosssim.evaluate import adapt_for_site, adapt_settings, json_safe, site_copies
    from crosssim.metrics import atc_threshold
    from crosssim.shift import ALARM_FACTORS
    from crosssim.train import resolve_device, seed_everything

    if (adapt != "none" or quantize) and data_dir is None:
        raise ValueError("--adapt and --quantize need --data: the site folder whose images adapt / calibrate")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"--quantize {quantize!r}: known modes are {', '.join(QUANTIZE_MODES)}")
    ckpt = load_checkpoint(checkpoint_path)
    checkpoint_sha256 = sha256_of(checkpoint_path)
    model = ckpt.build_model()
    site = None
    if data_dir is not None:
        site = load_site(data_dir, ckpt.config.data, labeled=False, classes=ckpt.classes, cache_dir=cache_dir)
        if progress:
            progress(site.report.summary())
    adaptation: dict[str, Any] = {"method": "none"}
    if adapt != "none":
        if progress:
            progress(f"adapting a copy of the model to {len(site)} images ({adapt}) ...")
        seed_everything(ckpt.config.seed)
        device = resolve_device(device_name or ckpt.config.train.device)
        deployed = adapt_for_site(site_copies(ckpt, model, site.images, adapt_settings(ckpt, None), device), adapt)
        model = deployed.model
        adaptation = {**deployed.record, "site": site.name, "n_images": len(site)}
    out_dir = Path(out_dir)
    float_model = onnx_bytes(model, ckpt.config.data.image_size)
    atomic_write_bytes(out_dir / FLOAT_MODEL_FILENAME, float_model)
    models: dict[str, dict[str, Any]] = {
        "float32": {"file": FLOAT_MODEL_FILENAME, "sha256": hashlib.sha256(float_model).hexdigest()}}
    if quantize == "int8":
        calibration = site.images[:MAX_CALIBRATION_IMAGES].numpy()
        if progress:
            progress(f"quantizing to int8, calibrated on {len(calibration)} images of {site.name} ...")
        int8 = quantize_int8(float_model, calibration)
        atomic_write_bytes(out_dir / INT8_MODEL_FILENAME, int8.model)
        models["int8"] = {"file": INT8_MODEL_FILENAME, "sha256": hashlib.sha256(int8.model).hexdigest(),
                          "calibration_site": site.name, "calibration_images": len(calibration),
                          "float_nodes": int8.float_nodes, "calibration_agreement": int8.calibration_agreement,
                          "disabled_optimizers": list(INT8_DISABLED_OPTIMIZERS)}
        if progress:
            progress(f"int8: {', '.join(int8.float_nodes)} kept in float; agrees with float on "
                     f"{int8.calibration_agreement:.1%} of the calibration images")
    source = ckpt.source
    reference = float("nan") if source is None else source.shift_reference.get("prototype_distance", float("nan"))
    manifest = ServingManifest(
        checkpoint_sha256=checkpoint_sha256, classes=list(ckpt.classes),
        preprocessing={k: getattr(ckpt.config.data, k) for k in PREPROCESSING_FIELDS},
        atc_threshold=None if source is None else atc_threshold(source.confidence_histogram, source.accuracy),
        prototype_vectors=ckpt.prototypes.vectors.float().tolist(),
        prototype_counts=[int(c) for c in ckpt.prototypes.counts],
        prototype_distance_reference=json_safe(float(reference)),
        prototype_distance_factor=ALARM_FACTORS["prototype_distance"],
        adaptation=json_safe(adaptation), models=models)
    atomic_write_text(out_dir / MANIFEST_FILENAME, manifest.to_json())
    if progress:
        progress(f"wrote {', '.join(m['file'] for m in models.values())} and {MANIFEST_FILENAME} to {out_dir}")
    return manifest

"""`crosssim evaluate`: predictions, label-free estimates, shift alarms and (with ground truth) real metrics.

Writes ``predictions.csv``, ``metrics.json`` and ``report.html`` to the output folder. The checkpoint
file is only read: adaptation works on a copy, saved elsewhere on request.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crosssim.adapt import AdaptedCopies, few_shot_adapt
from crosssim.adapt_choice import choose_adaptation
from crosssim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from crosssim.config import FIELD_INDEX, AdaptConfig, ConfigError, apply_overrides
from crosssim.data.shots import Shots, load_shots
from crosssim.data.sites import SiteData, load_labels_for, load_site
from crosssim.few_shot_check import FEW_SHOT, check_few_shot
from crosssim.fileio import atomic_write_text
from crosssim.metrics import (ATC_INTERVAL_LEVEL, accuracy, atc_estimate, atc_interval, atc_threshold,
                              balanced_accuracy, confusion_matrix, doc_estimate, entropy,
                              expected_calibration_error, macro_auc, per_class_sensitivity_specificity,
                              top1_agreement)
from crosssim.report import ReportData, write_report
from crosssim.shift import forward_with_figures, shift_alarms
from crosssim.train import infer, resolve_device, seed_everything

Progress = Callable[[str], None] | None
# Label-free accuracy estimates metrics.json may hold, as ``<name>_estimated_accuracy``: ATC and DoC of the
# deployed model against the sources' reference; for an adapted model also ATC of the AdaBN model and the
# top-1 agreement between the deployed and the AdaBN model (GDE, Jiang et al., ICLR 2022).
LABEL_FREE_ESTIMATORS = ("atc", "doc", "adabn_atc", "agreement")
# The estimate metrics.json reports as the deployed model's accuracy (``estimated_accuracy``), by how that
# model came about. TENT, crosssim and few-shot all start from AdaBN and stay close to it (auto checks the
# agreement), while their entropy terms inflate confidence; ATC of the AdaBN model is the one whose
# confidences keep the sources' calibration. Evidence: benchmarks/loso_sweep.py (held-out sources).
DEPLOYED_ESTIMATOR = {"none": "atc", "adabn": "atc", "tent": "adabn_atc", "crosssim": "adabn_atc",
                      FEW_SHOT: "adabn_atc"}


def label_free_metrics(probs: np.ndarray, ckpt: Checkpoint, target_figures: dict[str, float]) -> dict[str, Any]:
    """What can be said without labels: prevalence, confidence, entropy, ATC/DoC estimates and shift alarms.

    ``target_figures`` are ``crosssim.shift.shift_figures`` of the checkpoint's (unadapted) model on the
    target; the alarms compare them with the checkpoint's source reference.
    """
    confidence = probs.max(1)
    predicted = probs.argmax(1)
    block: dict[str, Any] = {
        "n_images": int(len(probs)),
        "predicted_prevalence": _per_class(np.bincount(predicted, minlength=len(ckpt.classes)) / len(probs),
                                           ckpt.classes),
        "mean_confidence": float(confidence.mean()),
        "mean_entropy": float(entropy(probs).mean()),
    }
    source = ckpt.source
    if source is not None:
        threshold = atc_threshold(source.confidence_histogram, source.accuracy)
        block.update({
            "source_prevalence": _per_class(source.prevalence, ckpt.classes),
            "source_val_accuracy": source.accuracy,
            "source_val_mean_confidence": source.mean_confidence,
            "atc_threshold": threshold,
            "atc_estimated_accuracy": atc_estimate(confidence, threshold),
            "atc_interval": list(atc_interval(confidence, source.confidence_histogram, source.accuracy,
                                              source.count, seed=ckpt.config.seed)),
            "atc_interval_level": ATC_INTERVAL_LEVEL,
            "doc_estimated_accuracy": doc_estimate(confidence, source.mean_confidence, source.accuracy),
        })
    alarms = shift_alarms(target_figures, {} if source is None else source.shift_reference)
    block["shift_alarms"] = alarms
    block["alarms_flagged"] = [name for name, alarm in alarms.items() if alarm["flagged"]]
    return block


def labeled_metrics(probs: np.ndarray, y_true: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Metrics against ground truth: accuracy, balanced accuracy, macro AUC, ECE, per class, confusion."""
    predicted = probs.argmax(1)
    confidence = probs.max(1)
    return {
        "accuracy": accuracy(y_true, predicted),
        "balanced_accuracy": balanced_accuracy(y_true, predicted, len(classes)),
        "macro_auc": macro_auc(y_true, probs),
        "ece": expected_calibration_error(confidence, predicted == y_true),
        "per_class": per_class_sensitivity_specificity(y_true, predicted, classes),
        "confusion_matrix": {"classes": classes,
                             "rows_true_cols_pred": confusion_matrix(y_true, predicted, len(classes)).tolist()},
    }


def estimate_errors(label_free: dict[str, Any], labeled: dict[str, Any]) -> dict[str, float]:
    """Signed error (estimate − true accuracy) of each label-free accuracy estimate."""
    errors: dict[str, Any] = {
        f"{name}_estimate_error": float(label_free[f"{name}_estimated_accuracy"] - labeled["accuracy"])
        for name in LABEL_FREE_ESTIMATORS if f"{name}_estimated_accuracy" in label_free}
    if "estimated_accuracy" in label_free:
        low, high = label_free["estimated_interval"]
        errors["deployed_estimate_error"] = float(label_free["estimated_accuracy"] - labeled["accuracy"])
        errors["deployed_interval_covers"] = bool(low <= labeled["accuracy"] <= high)
    return errors


def _per_class(values: np.ndarray, classes: list[str]) -> dict[str, float]:
    return {c: float(v) for c, v in zip(classes, values)}


def predictions_csv(site: SiteData, probs: np.ndarray, classes: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "pred", "confidence", *[f"p_{c}" for c in classes]])
    for rel, row in zip(site.paths, probs):
        writer.writerow([rel, classes[int(row.argmax())], f"{row.max():.6f}", *[f"{p:.6f}" for p in row]])
    return buffer.getvalue()


def json_safe(value: Any) -> Any:
    """Replace NaN/inf floats by None (JSON has no NaN) throughout nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def save_adapted_checkpoint(ckpt: Checkpoint, model: torch.nn.Module, path: str | Path,
                            adaptation: dict[str, Any]) -> Path:
    """Write the adapted model in the checkpoint format, atomically, recording how it was adapted."""
    adapted = Checkpoint({k: v.detach().cpu() for k, v in model.state_dict().items()}, ckpt.config,
                         ckpt.classes, ckpt.prototypes, ckpt.source, round=ckpt.round, kind=ckpt.kind,
                         extra={**ckpt.extra, "adapted": adaptation})
    return save_checkpoint(adapted, path)


def adapt_settings(ckpt: Checkpoint, overrides: Mapping[str, Any] | None) -> AdaptConfig:
    """The checkpoint's ``[adapt]`` settings with ``evaluate --set`` overrides (adapt keys only)."""
    overrides = dict(overrides or {})
    foreign = sorted(k for k in overrides if FIELD_INDEX.get(k.replace("_", "-"), ("",))[0] != "adapt")
    if foreign:
        raise ConfigError(f"evaluate --set takes [adapt] keys only (got {', '.join(foreign)}); the model's "
                          "other settings are fixed by its checkpoint")
    return apply_overrides(ckpt.config, overrides).adapt


@dataclass
class Deployed:
    """The model whose predictions are written, how it came about, and the AdaBN reference predictions."""

    model: torch.nn.Module
    record: dict[str, Any]
    reference_probs: torch.Tensor | None = None


def site_copies(ckpt: Checkpoint, model: torch.nn.Module, images: torch.Tensor, settings: AdaptConfig,
                device: torch.device) -> AdaptedCopies:
    """The adapted copies of ``model`` for one site, with the checkpoint's prototypes, prevalence and seed."""
    return AdaptedCopies(model, images, device, settings=settings, prototypes=ckpt.prototypes, seed=ckpt.config.seed,
                         prevalence=None if ckpt.source is None else torch.as_tensor(ckpt.source.prevalence))


def adapt_for_site(copies: AdaptedCopies, adapt: str) -> Deployed:
    """The copy adapted with ``adapt`` (``auto`` by ``crosssim.adapt_choice``); the source stays intact."""
    record: dict[str, Any] = {"method": adapt}
    if adapt in ("tent", "crosssim", "auto"):
        record["settings"] = {k.replace("_", "-"): v for k, v in dataclasses.asdict(copies.settings).items()}
    if adapt == "auto":
        choice = choose_adaptation(copies)
        record.update({"method": choice.method, "requested": "auto", "auto": choice.record()})
        return Deployed(choice.model, record, choice.reference_probs)
    reference = copies.predictions("adabn")[0] if adapt in ("tent", "crosssim") else None
    return Deployed(copies.model_for(adapt), record, reference)


def reference_estimates(probs: np.ndarray, reference_probs: np.ndarray, ckpt: Checkpoint) -> dict[str, float]:
    """Label-free figures of an adapted model against the AdaBN model: agreement and the AdaBN model's ATC."""
    block: dict[str, Any] = {
        "agreement_estimated_accuracy": top1_agreement(probs, reference_probs)}
    source = ckpt.source
    if source is not None:
        confidence = reference_probs.max(1)
        block["adabn_atc_estimated_accuracy"] = atc_estimate(
            confidence, atc_threshold(source.confidence_histogram, source.accuracy))
        block["adabn_atc_interval"] = list(atc_interval(confidence, source.confidence_histogram, source.accuracy,
                                                        source.count, seed=ckpt.config.seed))
    return block


def deployed_estimate(label_free: dict[str, Any], deployed_as: str) -> dict[str, Any]:
    """``estimated_accuracy``, its ``estimator`` (``DEPLOYED_ESTIMATOR``) and interval for the deployed model."""
    estimator = DEPLOYED_ESTIMATOR[deployed_as]
    if f"{estimator}_estimated_accuracy" not in label_free:
        estimator = "atc"  # no AdaBN reference was computed
    if "atc_estimated_accuracy" not in label_free:
        return {}
    return {"estimator": estimator, "estimated_accuracy": label_free[f"{estimator}_estimated_accuracy"],
            "estimated_interval": label_free[f"{estimator}_interval"]}


@dataclass
class SiteInputs:
    """What every adaptation of one evaluation shares: the checkpoint, the site, its labels and shots."""

    checkpoint_path: str | Path
    ckpt: Checkpoint
    site: SiteData
    device: torch.device
    copies: AdaptedCopies
    target_figures: dict[str, float]
    y_true_all: np.ndarray | None
    shots: Shots | None
    shots_csv: str | Path | None
    scored: np.ndarray  # bool per image: False for a shot image


def evaluate_site(checkpoint_path: str | Path, data_dir: str | Path, out_dir: str | Path, *, adapt: str = "none",
                  **kwargs: Any) -> dict[str, Any]:
    """Predict every image of ``data_dir`` (after optional adaptation); write predictions, metrics, report.

    With ``shots_csv`` the few-shot model is the one deployed (predictions.csv); the label-free ``adapt``
    result is reported beside it, and shot images are never scored. Keywords: those of ``evaluate_adaptations``.
    """
    return evaluate_adaptations(checkpoint_path, data_dir, {adapt: Path(out_dir)}, **kwargs)[adapt]


def evaluate_adaptations(checkpoint_path: str | Path, data_dir: str | Path, out_dirs: Mapping[str, Path], *,
                         labels_csv: str | Path | None = None, cache_dir: str | Path | None = None,
                         device_name: str | None = None, adapt_overrides: Mapping[str, Any] | None = None,
                         shots_csv: str | Path | None = None, save_adapted: str | Path | None = None,
                         progress: Progress = print) -> dict[str, dict[str, Any]]:
    """``evaluate_site`` for each adaptation of ``out_dirs`` (adaptation → its output folder), loading the model
    and the site once and adapting each copy once (``auto`` reuses crosssim, tent and AdaBN). The metrics of each
    adaptation equal those of its own ``evaluate_site``."""
    if (save_adapted is not None or shots_csv is not None) and len(out_dirs) != 1:
        raise ValueError("--save-adapted and --shots take a single --adapt")
    if save_adapted is not None and "none" in out_dirs and shots_csv is None:
        raise ValueError("--save-adapted needs --adapt (adabn, tent, crosssim or auto) or --shots")
    if save_adapted is not None and Path(save_adapted).resolve() == Path(checkpoint_path).resolve():
        raise ValueError(f"{save_adapted}: --save-adapted must not overwrite the source checkpoint")
    ckpt = load_checkpoint(checkpoint_path)
    settings = adapt_settings(ckpt, adapt_overrides)
    device = resolve_device(device_name or ckpt.config.train.device)
    site = load_site(data_dir, ckpt.config.data, labeled=False, classes=ckpt.classes, cache_dir=cache_dir)
    if progress:
        progress(site.report.summary())
        for line in site.report.skipped_lines():
            progress(line)
    y_true_all = None if labels_csv is None else load_labels_for(site, labels_csv).numpy()
    shots = None if shots_csv is None else load_shots(site, shots_csv)
    scored = np.ones(len(site), dtype=bool)
    if shots is not None:
        scored[shots.index.numpy()] = False
    seed_everything(ckpt.config.seed)
    source_model = ckpt.build_model()
    _, _, target_figures = forward_with_figures(source_model, site.images, ckpt.prototypes, device)
    inputs = SiteInputs(checkpoint_path, ckpt, site, device, site_copies(ckpt, source_model, site.images, settings,
                                                                           device),
                        target_figures, y_true_all, shots, shots_csv, scored)
    return {adapt: evaluate_adaptation(inputs, adapt, Path(out_dir), save_adapted=save_adapted, progress=progress)
            for adapt, out_dir in out_dirs.items()}


def evaluate_adaptation(inputs: SiteInputs, adapt: str, out_dir: Path, *, save_adapted: str | Path | None = None,
                        progress: Progress = print) -> dict[str, Any]:
    """One adaptation of ``evaluate_adaptations``: adapt, predict, estimate, score; write its three files."""
    ckpt, site, device, copies, shots, scored = (inputs.ckpt, inputs.site, inputs.device, inputs.copies,
                                                 inputs.shots, inputs.scored)
    source_model = copies.model
    if progress and adapt != "none":
        progress(f"adapting a copy of the model to {len(site)} images ({adapt}) ...")
    deployed = adapt_for_site(copies, adapt)
    adaptation = {**deployed.record, "site": site.name, "source_checkpoint": str(inputs.checkpoint_path)}
    label_free_probs_t, embeddings_t = copies.predictions(adaptation["method"])
    label_free_probs = label_free_probs_t.numpy()
    few_shot: dict[str, Any] | None = None
    if shots is not None:
        if progress:
            progress(f"few-shot adaptation on {len(shots.index)} labeled shots {shots.per_class} ...")

        def few_shot_model(positions: torch.Tensor) -> torch.nn.Module:
            """The few-shot model trained on the shots at ``positions``."""
            return few_shot_adapt(copy.deepcopy(source_model), site.images, shots.index[positions],
                                  shots.labels[positions], device, prototypes=ckpt.prototypes,
                                  settings=copies.settings, seed=ckpt.config.seed)

        shot_images = site.images[shots.index]
        check = check_few_shot(lambda positions: infer(few_shot_model(positions), shot_images, device)[0].argmax(1),
                               shots.labels, label_free_probs_t[shots.index].argmax(1), ckpt.config.seed)
        few_model = few_shot_model(torch.arange(len(shots.index)))
        few_probs_t, few_embeddings_t = infer(few_model, site.images, device)
        few_shot = {"shots_csv": str(inputs.shots_csv), "shots_per_class": shots.per_class,
                    "n_shots": int(len(shots.index)), "n_scored": int(scored.sum()),
                    "label_free_method": adaptation["method"], "deployed": check.deployed, "check": check.record()}
        adaptation["few_shot"] = {k: few_shot[k] for k in ("shots_csv", "shots_per_class", "deployed")}
        if progress:
            progress(f"deployed: {check.deployed} ({check.reason})")
    few_shot_deployed = few_shot is not None and few_shot["deployed"] == FEW_SHOT
    if few_shot_deployed:
        deployed = Deployed(few_model, deployed.record, deployed.reference_probs)
    if save_adapted is not None:
        adaptation["saved_to"] = str(save_adapted_checkpoint(ckpt, deployed.model, save_adapted, dict(adaptation)))
    probs = label_free_probs
    reference_probs = deployed.reference_probs
    if few_shot_deployed:
        probs, embeddings_t = few_probs_t.numpy(), few_embeddings_t
        if reference_probs is None:  # label-free none or adabn: the AdaBN model is that one, or is made now
            reference_probs = copies.predictions("adabn")[0]
    label_free = label_free_metrics(probs[scored], ckpt, inputs.target_figures)
    if reference_probs is not None:
        label_free.update(reference_estimates(probs[scored], reference_probs.numpy()[scored], ckpt))
    label_free.update(deployed_estimate(label_free, FEW_SHOT if few_shot_deployed else adaptation["method"]))
    metrics: dict[str, Any] = {"checkpoint": str(inputs.checkpoint_path), "site": site.name,
                               "adaptation": adaptation, "label_free": label_free,
                               "data_report": site.report.to_dict()}
    y_true = None if inputs.y_true_all is None else inputs.y_true_all[scored]
    if y_true is not None:
        labeled = labeled_metrics(probs[scored], y_true, ckpt.classes)
        labeled.update(estimate_errors(metrics["label_free"], labeled))
        metrics["labeled"] = labeled
    if few_shot is not None:
        if y_true is not None:
            few_shot["label_free_accuracy"] = accuracy(y_true, label_free_probs[scored].argmax(1))
            few_shot["few_shot_accuracy"] = accuracy(y_true, few_probs_t.numpy()[scored].argmax(1))
            few_shot["deployed_accuracy"] = metrics["labeled"]["accuracy"]
        metrics["few_shot"] = few_shot
    metrics = json_safe(metrics)
    atomic_write_text(out_dir / "predictions.csv", predictions_csv(site, probs, ckpt.classes))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    write_report(out_dir / "report.html", ReportData(metrics, ckpt.classes, list(np.array(site.paths)[scored]),
                                                     site.images[torch.from_numpy(scored)], probs[scored],
                                                     embeddings_t.numpy()[scored], ckpt.prototypes, ckpt.source,
                                                     y_true))
    if progress:
        progress(summary_line(metrics))
        progress(f"wrote predictions.csv, metrics.json and report.html to {out_dir}")
    return metrics


def summary_line(metrics: dict[str, Any]) -> str:
    """One line for the console: size, adaptation, ATC estimate with interval, alarms, true metrics."""
    free = metrics["label_free"]
    line = f"{metrics['site']}: {free['n_images']} images, mean confidence {free['mean_confidence']:.3f}"
    if metrics["adaptation"]["method"] != "none":
        line += f" (adapted: {metrics['adaptation']['method']})"
    if free.get("estimated_accuracy") is not None:
        low, high = free["estimated_interval"]
        line += f", estimated accuracy ({free['estimator']}) {free['estimated_accuracy']:.3f}"
        if low is not None:
            line += f" [{low:.3f}, {high:.3f}]"
    if free["alarms_flagged"]:
        line += f", SHIFT ALARM: {', '.join(free['alarms_flagged'])}"
    if "labeled" in metrics:
        lab = metrics["labeled"]
        line += (f" | accuracy {lab['accuracy']:.3f}, balanced {lab['balanced_accuracy']:.3f}, "
                 f"macro AUC {lab['macro_auc'] or float('nan'):.3f}")
    return line

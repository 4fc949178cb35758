"""`report.html`: one self-contained page (figures inlined as base64 PNG) beside ``metrics.json``.

Sections carry stable ids: summary, alarms, prevalence, confidence, embedding, examples, data, and with
ground truth also confusion, reliability and per-class.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from crosssim.checkpoint import SourceStats
from crosssim.few_shot_check import FEW_SHOT, LABEL_FREE
from crosssim.fileio import atomic_write_text
from crosssim.metrics import reliability_bins
from crosssim.prototypes import Prototypes

FIGURE_SIZE_IN = (6.0, 3.6)
FIGURE_DPI = 110
HISTOGRAM_BINS = 20
EXAMPLES_PER_CLASS = 4
THUMBNAIL_PX = 96
TARGET_COLOR = "#1f77b4"
SOURCE_COLOR = "#d62728"
TRUTH_COLOR = "#2ca02c"
STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:960px;color:#222;padding:0 1rem}
section{margin:1.5rem 0;padding:1rem;border:1px solid #ddd;border-radius:8px}
h1{font-size:1.5rem} h2{font-size:1.15rem;margin-top:0}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f4f4f4} .flag{color:#b00020;font-weight:bold} .ok{color:#1b7a1b}
.note{color:#666;font-size:.9rem} .big{font-size:1.6rem;font-weight:bold}
figure{display:inline-block;margin:.3rem;text-align:center;font-size:.75rem;max-width:120px;overflow-wrap:anywhere}
"""


@dataclass
class ReportData:
    """What the report draws: metrics.json's content plus the per-image arrays behind it."""

    metrics: dict[str, Any]
    classes: list[str]
    paths: list[str]
    images: torch.Tensor  # (N, 1, H, W) preprocessed
    probs: np.ndarray  # (N, C)
    embeddings: np.ndarray  # (N, d) of the model that predicted
    prototypes: Prototypes
    source: SourceStats | None
    y_true: np.ndarray | None


def _png(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_img(fig: Figure, alt: str) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return f'<img alt="{html.escape(alt)}" src="{_png(buffer.getvalue())}">'


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _section(section_id: str, title: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _summary(data: ReportData) -> str:
    m, free = data.metrics, data.metrics["label_free"]
    rows = [("site", html.escape(m["site"])), ("images", str(free["n_images"])),
            ("checkpoint", html.escape(m["checkpoint"])), ("adaptation", _adaptation(m["adaptation"]))]
    if free.get("estimated_accuracy") is not None:
        low, high = free["estimated_interval"]
        rows.append((f"estimated accuracy of the deployed model ({html.escape(free['estimator'])})",
                     f'<span class="big">{_fmt(free["estimated_accuracy"])}</span> '
                     f'({free["atc_interval_level"]:.0%} bootstrap interval {_fmt(low)}–{_fmt(high)}; '
                     "sampling error only)"))
        rows.append(("estimated accuracy (ATC of the deployed model's own confidences)",
                     _fmt(free["atc_estimated_accuracy"])))
        rows.append(("estimated accuracy (DoC)", _fmt(free["doc_estimated_accuracy"])))
        if "agreement_estimated_accuracy" in free:
            rows.append(("agreement with the AdaBN model / its ATC estimate",
                         f'{_fmt(free["agreement_estimated_accuracy"])} / '
                         f'{_fmt(free.get("adabn_atc_estimated_accuracy"))}'))
        rows.append(("source validation accuracy", _fmt(free["source_val_accuracy"])))
    else:
        rows.append(("estimated accuracy", "n/a: the checkpoint carries no source statistics"))
    rows += [("mean confidence", _fmt(free["mean_confidence"])), ("mean entropy (nats)", _fmt(free["mean_entropy"]))]
    flagged = free["alarms_flagged"]
    rows.append(("shift alarms", f'<span class="flag">{html.escape(", ".join(flagged))}</span>' if flagged
                 else '<span class="ok">none raised</span>'))
    if "labeled" in m:
        lab = m["labeled"]
        rows.append(("true accuracy (ground truth given)", f'<span class="big">{_fmt(lab["accuracy"])}</span>'))
        rows.append(("deployed estimate / ATC / DoC − true accuracy",
                     f'{_fmt(lab.get("deployed_estimate_error"))} / {_fmt(lab.get("atc_estimate_error"))} / '
                     f'{_fmt(lab.get("doc_estimate_error"))}'))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    note = ('<p class="note">Label-free estimates assume the shift preserves how confidence relates to '
            'correctness; under a strong shift they can be far off. Alarms say the images look unlike the '
            'sources; they are not accuracy estimates.')
    if m["adaptation"]["method"] != "none":
        note += (" The ATC and DoC references were measured with the unadapted model on source data. After "
                 "TENT, crosssim or few-shot adaptation, whose entropy terms inflate confidence, the deployed "
                 "model's estimate is ATC of the AdaBN-adapted model (the same BatchNorm statistics, the "
                 "sources' calibration); see crosssim/evaluate.py DEPLOYED_ESTIMATOR.")
    note += "</p>"
    return _section("summary", "Summary", f"<table>{table}</table>{note}")


def _adaptation(adaptation: dict[str, Any]) -> str:
    """The adaptation used; for ``auto`` also why it was chosen."""
    text = html.escape(adaptation["method"])
    if "auto" in adaptation:
        text += f" (chosen by auto: {html.escape(adaptation['auto']['reason'])})"
    if "few_shot" in adaptation:
        few = adaptation["few_shot"]
        text += f"; {html.escape(str(few['shots_per_class']))} shots given, deployed: {html.escape(few['deployed'])}"
    return text


def _few_shot(data: ReportData) -> str:
    few = data.metrics["few_shot"]
    rows = [("shots per class", html.escape(str(few["shots_per_class"]))),
            ("images scored (shots excluded)", str(few["n_scored"])),
            ("deployed", f"{html.escape(few['deployed'])} ({html.escape(few['check']['reason'])})")]
    if "few_shot_accuracy" in few:
        deployed = {few["deployed"]: ' <span class="big">(deployed)</span>'}
        rows += [(f"accuracy, label-free ({html.escape(few['label_free_method'])})",
                  _fmt(few["label_free_accuracy"]) + deployed.get(LABEL_FREE, "")),
                 ("accuracy, few-shot", _fmt(few["few_shot_accuracy"]) + deployed.get(FEW_SHOT, ""))]
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    note = ('<p class="note">The few-shot model: AdaBN on every target image, then BatchNorm affine parameters '
            'and the classifier head trained on the labeled shots plus the other images pseudo-labeled by '
            'centroids that combine the shots with the global prototypes. It is deployed unless, in '
            'cross-validation on the shots, it gets fewer held-out shots right than the label-free model. Every '
            'figure on this page excludes the shot images.</p>')
    return _section("few-shot", "Few-shot adaptation", f"<table>{table}</table>{note}")


def _alarms(data: ReportData) -> str:
    rows = []
    for name, alarm in data.metrics["label_free"]["shift_alarms"].items():
        state = {True: '<span class="flag">FLAGGED</span>', False: '<span class="ok">ok</span>',
                 None: "no source reference"}[alarm["flagged"]]
        rows.append(f"<tr><th>{html.escape(name)}</th><td>{_fmt(alarm['target'])}</td><td>{_fmt(alarm['source'])}</td>"
                    f"<td>{_fmt(alarm['ratio'], 2)}</td><td>{alarm['factor']}</td><td>{state}</td></tr>")
    head = "<tr><th>alarm</th><th>target</th><th>source validation</th><th>ratio</th><th>factor</th><th>state</th></tr>"
    note = ('<p class="note">prototype_distance: mean 1 − cos from each target embedding to its nearest global '
            'prototype. bn_drift: per BatchNorm channel, distance between the target input statistics and the '
            'running statistics in running standard deviations, averaged. Both use the checkpoint\'s model '
            'before any adaptation; an alarm is flagged when target &gt; factor × source.</p>')
    return _section("alarms", "Shift alarms", f"<table>{head}{''.join(rows)}</table>{note}")


def _confusion(data: ReportData) -> str:
    matrix = np.asarray(data.metrics["labeled"]["confusion_matrix"]["rows_true_cols_pred"])
    peak = max(int(matrix.max()), 1)
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in data.classes) + "</tr>"
    body = "".join(
        f"<tr><th>{html.escape(c)}</th>" + "".join(
            f'<td style="background:rgba(31,119,180,{v / peak:.2f})">{v}</td>' for v in row) + "</tr>"
        for c, row in zip(data.classes, matrix))
    return _section("confusion", "Confusion matrix", f"<table>{head}{body}</table>")


def _per_class(data: ReportData) -> str:
    lab = data.metrics["labeled"]
    rows = "".join(f"<tr><th>{html.escape(c)}</th><td>{_fmt(v['sensitivity'])}</td><td>{_fmt(v['specificity'])}</td>"
                   f"<td>{v['support']}</td></tr>" for c, v in lab["per_class"].items())
    summary = (f"<p>accuracy {_fmt(lab['accuracy'])}, balanced accuracy {_fmt(lab['balanced_accuracy'])}, "
               f"macro AUC {_fmt(lab['macro_auc'])}, ECE {_fmt(lab['ece'])}</p>")
    head = "<tr><th>class</th><th>sensitivity</th><th>specificity</th><th>support</th></tr>"
    return _section("per-class", "Per-class metrics", f"{summary}<table>{head}{rows}</table>")


def _reliability(data: ReportData) -> str:
    confidence = data.probs.max(1)
    mean_conf, bin_acc, counts = reliability_bins(confidence, data.probs.argmax(1) == data.y_true, HISTOGRAM_BINS)
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    centers = (np.arange(HISTOGRAM_BINS) + 0.5) / HISTOGRAM_BINS
    filled = counts > 0
    ax.bar(centers[filled], bin_acc[filled], width=1 / HISTOGRAM_BINS, color=TARGET_COLOR, edgecolor="white",
           label="accuracy per confidence bin")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=f"Reliability (ECE {_fmt(data.metrics['labeled']['ece'])})")
    ax.legend(loc="upper left", fontsize=8)
    return _section("reliability", "Reliability diagram", _figure_img(fig, "reliability diagram"))


def _prevalence(data: ReportData) -> str:
    free = data.metrics["label_free"]
    series = [("target (predicted)", free["predicted_prevalence"], TARGET_COLOR)]
    if "source_prevalence" in free:
        series.append(("sources (training labels)", free["source_prevalence"], SOURCE_COLOR))
    if data.y_true is not None:
        truth = np.bincount(data.y_true, minlength=len(data.classes)) / len(data.y_true)
        series.append(("target (ground truth)", dict(zip(data.classes, truth)), TRUTH_COLOR))
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(data.classes))
    for i, (label, values, color) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [values[c] for c in data.classes], width, label=label,
               color=color)
    ax.set_xticks(x, data.classes)
    ax.set(ylabel="fraction of images", title="Class prevalence")
    ax.legend(fontsize=8)
    return _section("prevalence", "Predicted prevalence vs sources", _figure_img(fig, "class prevalence bars"))


def _confidence(data: ReportData) -> str:
    free = data.metrics["label_free"]
    fig = Figure(figsize=FIGURE_SIZE_IN)
    ax = fig.add_subplot()
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    ax.hist(data.probs.max(1), bins=edges, density=True, alpha=0.7, color=TARGET_COLOR, label="target")
    if data.source is not None:
        stored = np.asarray(data.source.confidence_histogram, dtype=np.float64)
        starts = np.unique(np.linspace(0, len(stored), HISTOGRAM_BINS + 1).astype(int)[:-1])
        source_edges = np.append(starts / len(stored), 1.0)
        ax.stairs(np.add.reduceat(stored, starts) / np.diff(source_edges), source_edges, color=SOURCE_COLOR,
                  lw=2, label="source validation")
        ax.axvline(free["atc_threshold"], color="k", ls="--", lw=1, label="ATC threshold")
    ax.set(xlim=(0, 1), xlabel="max softmax confidence", ylabel="density", title="Confidence")
    ax.legend(fontsize=8)
    return _section("confidence", "Confidence histogram", _figure_img(fig, "confidence histogram"))


def pca_2d(points: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project ``points`` (N, d) on their first two principal axes; ``others`` (M, d) with the same map."""
    center = points.mean(0)
    _, _, axes = np.linalg.svd(points - center, full_matrices=False)
    basis = axes[:2].T
    if basis.shape[1] < 2:
        basis = np.pad(basis, ((0, 0), (0, 2 - basis.shape[1])))
    return (points - center) @ basis, (others - center) @ basis


def _embedding(data: ReportData) -> str:
    present = data.prototypes.present.numpy()
    vectors = data.prototypes.vectors.numpy()[present]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    target_2d, protos_2d = pca_2d(data.embeddings, vectors / np.maximum(norms, 1e-12))
    fig = Figure(figsize=(6.0, 4.8))
    ax = fig.add_subplot()
    ax.scatter(target_2d[:, 0], target_2d[:, 1], s=8, alpha=0.5, color=TARGET_COLOR, label="target images")
    ax.scatter(protos_2d[:, 0], protos_2d[:, 1], s=220, marker="*", color=SOURCE_COLOR, edgecolor="black",
               label="source prototypes")
    for (px, py), name in zip(protos_2d, np.asarray(data.classes)[present]):
        ax.annotate(name, (px, py), xytext=(6, 6), textcoords="offset points", fontsize=9)
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Target embeddings (PCA) and global prototypes")
    ax.legend(fontsize=8)
    note = '<p class="note">Prototypes are L2-normalized onto the embedding sphere before projection.</p>'
    return _section("embedding", "Embeddings vs source prototypes", _figure_img(fig, "PCA of embeddings") + note)


def _thumbnail(image: torch.Tensor) -> str:
    """One preprocessed (1, H, W) image as a PNG data URI, rescaled to its own range for display."""
    pixels = image[0].float().numpy()
    pixels = ((pixels - pixels.min()) / max(float(np.ptp(pixels)), 1e-12) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.BILINEAR).save(buffer, format="PNG")
    return _png(buffer.getvalue())


def _examples(data: ReportData) -> str:
    predicted, confidence = data.probs.argmax(1), data.probs.max(1)
    blocks = []
    for c, name in enumerate(data.classes):
        members = np.flatnonzero(predicted == c)
        chosen = members[np.argsort(-confidence[members], kind="stable")][:EXAMPLES_PER_CLASS]
        figures = []
        for i in chosen:
            truth = "" if data.y_true is None else f"<br>true: {html.escape(data.classes[int(data.y_true[i])])}"
            figures.append(f'<figure><img alt="{html.escape(data.paths[i])}" src="{_thumbnail(data.images[i])}">'
                           f"<figcaption>{html.escape(data.paths[i])}<br>conf {confidence[i]:.2f}{truth}"
                           "</figcaption></figure>")
        blocks.append(f"<h3>{html.escape(name)} ({len(members)} predicted)</h3>"
                      + ("".join(figures) or '<p class="note">none</p>'))
    note = (f'<p class="note">Up to {EXAMPLES_PER_CLASS} most confident images per predicted class, as the model '
            "saw them.</p>")
    return _section("examples", "Examples per predicted class", note + "".join(blocks))


def _data(data: ReportData) -> str:
    report = data.metrics["data_report"]
    skipped = "".join(f"<tr><td>{html.escape(s['path'])}</td><td>{html.escape(s['reason'])}</td></tr>"
                      for s in report["skipped"])
    body = (f"<p>{report['images_loaded']} images from {report['files_seen']} files "
            f"({report['from_cache']} from cache); {len(report['skipped'])} skipped.</p>")
    if skipped:
        body += f"<table><tr><th>file</th><th>reason</th></tr>{skipped}</table>"
    return _section("data", "Data read", body)


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string."""
    sections = [_summary(data)] + ([_few_shot(data)] if "few_shot" in data.metrics else []) + [_alarms(data)]
    if data.y_true is not None:
        sections += [_confusion(data), _per_class(data), _reliability(data)]
    sections += [_prevalence(data), _confidence(data), _embedding(data), _examples(data), _data(data)]
    title = f"CrossSim evaluation: {html.escape(data.metrics['site'])}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_report(path: str | Path, data: ReportData) -> Path:
    """Render and write ``report.html`` atomically."""
    return atomic_write_text(path, render_report(data))

"""The PNG figures of RESULTS.md, drawn with matplotlib's Agg canvas from the loaded results documents.

- ``accuracy.png``: target accuracy per suite and method, plain and with AdaBN, mean ± std over seeds;
- ``few-shot.png``: few-shot accuracy against k labeled target images per class, per suite, beside the best
  label-free (``auto``) result;
- ``estimate-vs-truth.png``: the label-free ATC accuracy estimate against the true target accuracy.

Each figure whose data is absent is not written. The PNGs carry no software or date metadata, so the same
results give the same bytes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from benchmarks.accuracy import ADAPT_LABELS, METHODS, mean_std, suite_label, summarize
from benchmarks.few_shot import LABEL_FREE_ADAPT, few_shot_methods, few_shot_values

FIGURES_FOLDER = "figures"  # beside RESULTS.md; the plot names below are relative to RESULTS.md's folder
ACCURACY_PLOT = f"{FIGURES_FOLDER}/accuracy.png"
FEW_SHOT_PLOT = f"{FIGURES_FOLDER}/few-shot.png"
ESTIMATE_PLOT = f"{FIGURES_FOLDER}/estimate-vs-truth.png"

DPI = 110
FIGURE_SIZE_IN = (9.0, 4.5)
ACCURACY_FIGURE_SIZE_IN = (9.0, 6.5)  # two panels of up to 13 bars per suite, and the legend below
ACCURACY_ADAPTS = ("none", "adabn")  # one panel each
BAR_GROUP_WIDTH = 0.85  # of the unit between two suites
ESTIMATE_BAND = 0.05  # accuracy (fraction) either side of y = x, shaded
ACCURACY_MARGIN = 0.02  # accuracy axes run from -margin to 1 + margin, so points at 0 or 1 stay whole
FEW_SHOT_DODGE_K = 0.1  # shots per class between two methods' points at the same k, so error bars do not overlap
PNG_METADATA = {"Software": None}  # matplotlib's version string left out: the bytes depend on the data only


def _method_colour(method: str) -> Any:
    """One colour per method, the same in every figure: tab20's ten dark hues first, then the light ones."""
    if method not in METHODS:
        return "grey"
    i = METHODS.index(method)
    return colormaps["tab20"]((2 * i) % 20 + (2 * i) // 20)


def _save(fig: Figure, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, metadata=PNG_METADATA)


def plot_accuracy(docs: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Target accuracy per suite (groups) and method (bars), mean ± std over seeds, one panel per adaptation.

    Returns whether the figure was written (not when no document holds a finished run).
    """
    summaries = [(suite_label(d), s) for d in docs if (s := summarize(d))]
    methods = [m for m in METHODS if any(m in s for _, s in summaries)]
    adapts = [a for a in ACCURACY_ADAPTS if any(a in by_adapt for _, s in summaries for by_adapt in s.values())]
    if not adapts:
        return False
    fig = Figure(figsize=ACCURACY_FIGURE_SIZE_IN, layout="constrained")
    axes = fig.subplots(len(adapts), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    width = BAR_GROUP_WIDTH / len(methods)
    for ax, adapt in zip(axes, adapts):
        for i, method in enumerate(methods):
            offset = (i - (len(methods) - 1) / 2) * width
            bars = [(g + offset, stat) for g, (_, s) in enumerate(summaries)
                    if (stat := s.get(method, {}).get(adapt, {}).get("accuracy")) is not None and stat.mean is not None]
            if bars:
                ax.bar([x for x, _ in bars], [s.mean for _, s in bars], width, color=_method_colour(method),
                       yerr=[s.std or 0.0 for _, s in bars], capsize=1.5, error_kw={"elinewidth": 0.7})
        ax.set_title(f"target accuracy, {ADAPT_LABELS[adapt]} (mean ± std over seeds)", fontsize=10)
        ax.set_ylabel("target accuracy")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[-1].set_xticks(range(len(summaries)), [name for name, _ in summaries])
    axes[-1].set_xlabel("suite")
    fig.legend(handles=[Patch(color=_method_colour(m), label=m) for m in methods], loc="outside lower center",
               ncols=min(len(methods), 6), fontsize=8, title="method", title_fontsize=8)
    _save(fig, path)
    return True


def plot_few_shot(few_shot_docs: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Few-shot accuracy against k per class, mean ± std over seeds, one panel per suite; dashed: the label-free
    ``auto`` accuracy, on the same images, of the method whose label-free result is best on that suite."""
    docs = [d for d in few_shot_docs if few_shot_methods(d)]
    if not docs:
        return False
    fig = Figure(figsize=FIGURE_SIZE_IN, layout="constrained")
    axes = fig.subplots(1, len(docs), sharey=True, squeeze=False)[0]
    for ax, doc in zip(axes, docs):
        shots = list(doc["shots"])
        label_free: dict[str, list[float]] = {}
        methods = few_shot_methods(doc)
        for i, method in enumerate(methods):
            values = [few_shot_values(doc, method, k) for k in shots]
            stats = [mean_std(few) for few, _ in values]
            dodge = (i - (len(methods) - 1) / 2) * FEW_SHOT_DODGE_K
            ax.errorbar([k + dodge for k in shots], [s.mean for s in stats], yerr=[s.std or 0.0 for s in stats],
                        marker="o", capsize=3, color=_method_colour(method), label=f"{method}, few-shot")
            label_free[method] = [statistics.fmean(free) for _, free in values]
        best = max(label_free, key=lambda m: statistics.fmean(label_free[m]))
        ax.plot(shots, label_free[best], "--", color="black", label=f"best label-free ({LABEL_FREE_ADAPT}): {best}")
        ax.set_title(suite_label(doc), fontsize=10)
        ax.set_xticks(shots)
        ax.set_xlabel("labeled target images per class (k)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("accuracy on the other target images")
    fig.suptitle("Few-shot adaptation at the target (mean ± std over seeds)", fontsize=11)
    _save(fig, path)
    return True


def estimate_points(doc: Mapping[str, Any]) -> list[tuple[float, float]]:
    """(true accuracy, label-free ATC estimate) of every (method, adaptation, seed) of an accuracy document that
    has both."""
    return [(float(f["accuracy"]), float(f["atc_estimated_accuracy"]))
            for by_method in doc.get("runs", {}).values() for record in by_method.values()
            for f in record.get("figures", {}).values()
            if f.get("accuracy") is not None and f.get("atc_estimated_accuracy") is not None]


def plot_estimate_vs_truth(docs: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """The label-free ATC estimate against the true target accuracy, one point per (suite, method, adaptation,
    seed), coloured by suite, with y = x and a ±ESTIMATE_BAND band."""
    points = [(suite_label(d), p) for d in docs if (p := estimate_points(d))]
    if not points:
        return False
    errors = [abs(estimate - truth) for _, p in points for truth, estimate in p]
    within = sum(e <= ESTIMATE_BAND for e in errors) / len(errors)
    fig = Figure(figsize=FIGURE_SIZE_IN, layout="constrained")
    ax = fig.subplots()
    low, high = -ACCURACY_MARGIN, 1 + ACCURACY_MARGIN
    ax.fill_between([low, high], [low - ESTIMATE_BAND, high - ESTIMATE_BAND],
                    [low + ESTIMATE_BAND, high + ESTIMATE_BAND], color="grey", alpha=0.2, linewidth=0,
                    label=f"±{ESTIMATE_BAND:g}")
    ax.plot([low, high], [low, high], color="black", linewidth=0.8, label="estimate = truth")
    palette = colormaps["tab10"]
    for i, (name, p) in enumerate(points):
        ax.scatter([t for t, _ in p], [e for _, e in p], s=12, alpha=0.6, color=palette(i % 10),
                   label=f"{name} ({len(p)})", linewidths=0)
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_aspect("equal")
    ax.set_xlabel("true target accuracy")
    ax.set_ylabel("label-free ATC estimate")
    fig.suptitle("Label-free ATC accuracy estimate vs true target accuracy", fontsize=11)
    ax.set_title(f"{len(errors)} (method, adaptation, seed) runs: mean |estimate − truth| "
                 f"{statistics.fmean(errors):.3f}, {within:.0%} within ±{ESTIMATE_BAND:g}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, title="suite (points)", title_fontsize=8)
    _save(fig, path)
    return True


def write_plots(docs: Sequence[Mapping[str, Any]], few_shot_docs: Sequence[Mapping[str, Any]],
                beside: Path) -> list[str]:
    """Every figure into ``beside``/figures/; returns the names written, relative to ``beside`` (a figure without
    data is not written, and an old file of it is removed)."""
    figures: list[tuple[str, Callable[[Any, Path], bool], Sequence[Mapping[str, Any]]]] = [
        (ACCURACY_PLOT, plot_accuracy, docs), (FEW_SHOT_PLOT, plot_few_shot, few_shot_docs),
        (ESTIMATE_PLOT, plot_estimate_vs_truth, docs)]
    written = []
    for name, plot, data in figures:
        path = Path(beside) / name
        if plot(data, path):
            written.append(name)
        else:
            path.unlink(missing_ok=True)
    return written

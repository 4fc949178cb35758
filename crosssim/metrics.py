"""Classification metrics (with labels) and confidence summaries (without), in plain numpy."""

from __future__ import annotations

import numpy as np

ATC_BOOTSTRAP_REPLICATES = 1000
ATC_INTERVAL_LEVEL = 0.95
CONFIDENCE_BINS = 1000  # histogram resolution of source validation confidences (ATC threshold precision)
ECE_BINS = 15


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def top1_agreement(probs: np.ndarray, other_probs: np.ndarray) -> float:
    """Fraction of images on which two models predict the same class."""
    return float((probs.argmax(1) == other_probs.argmax(1)).mean())


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in ``y_true``."""
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    support = matrix.sum(1)
    present = support > 0
    return float(np.mean(np.diag(matrix)[present] / support[present])) if present.any() else float("nan")


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the Mann–Whitney rank statistic (ties get average ranks); NaN with one class only."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest AUC averaged over classes that have both positives and negatives."""
    aucs = [binary_auc(probs[:, c], y_true == c) for c in range(probs.shape[1])]
    valid = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(valid)) if valid else float("nan")


def per_class_sensitivity_specificity(y_true: np.ndarray, y_pred: np.ndarray,
                                      classes: list[str]) -> dict[str, dict[str, float]]:
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    total = matrix.sum()
    out: dict[str, dict[str, float]] = {}
    for c, name in enumerate(classes):
        tp = matrix[c, c]
        fn = matrix[c].sum() - tp
        fp = matrix[:, c].sum() - tp
        tn = total - tp - fn - fp
        out[name] = {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
                     "support": int(tp + fn)}
    return out


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    mean_confidence, bin_accuracy, counts = reliability_bins(confidence, correct, bins)
    filled = counts > 0
    weights = counts[filled] / max(counts.sum(), 1)
    return float(np.sum(weights * np.abs(bin_accuracy[filled] - mean_confidence[filled])))


def entropy(probs: np.ndarray) -> np.ndarray:
    """Per-sample predictive entropy in nats."""
    return -np.sum(probs * np.log(np.clip(probs, 1e-12, 1.0)), axis=1)


def confidence_histogram(confidence: np.ndarray, bins: int = CONFIDENCE_BINS) -> np.ndarray:
    """Fraction of samples per confidence bin on [0, 1] (sums to 1)."""
    counts, _ = np.histogram(confidence, bins=bins, range=(0.0, 1.0))
    return counts / max(len(confidence), 1)


def atc_threshold(histogram: np.ndarray, accuracy_value: float) -> float:
    """ATC (Garg et al., ICLR 2022): the confidence t with P_source(conf > t) = source accuracy.

    Works on a confidence histogram so federated sites can share it without per-image data.
    """
    histogram = np.asarray(histogram, dtype=np.float64)
    histogram = histogram / max(histogram.sum(), 1e-12)
    edges = np.linspace(0.0, 1.0, len(histogram) + 1)
    above = 1.0 - np.concatenate([[0.0], np.cumsum(histogram)])  # P(conf > edges[i])
    i = int(np.searchsorted(-above, -accuracy_value, side="left"))  # first edge with above <= accuracy
    if i == 0:
        return 0.0
    if i >= len(edges):
        return 1.0
    span = above[i - 1] - above[i]
    fraction = 0.0 if span <= 0 else (above[i - 1] - accuracy_value) / span
    return float(edges[i - 1] + fraction * (edges[i] - edges[i - 1]))


def atc_estimate(confidence: np.ndarray, threshold: float) -> float:
    """Estimated accuracy: fraction of target samples whose confidence exceeds the source threshold."""
    return float(np.mean(confidence > threshold)) if len(confidence) else float("nan")


def reliability_bins(confidence: np.ndarray, correct: np.ndarray,
                     bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width confidence bins: (mean confidence, accuracy, count) per bin; empty bins hold NaN."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
        bin_accuracy = np.bincount(index, weights=correct.astype(np.float64), minlength=bins) / counts
    return mean_confidence, bin_accuracy, counts


def doc_estimate(confidence: np.ndarray, source_mean_confidence: float, source_accuracy: float) -> float:
    """DoC (Guillory et al., ICCV 2021): target mean confidence minus the source's overconfidence."""
    return float(confidence.mean() - (source_mean_confidence - source_accuracy)) if len(confidence) else float("nan")


def atc_interval(confidence: np.ndarray, histogram: np.ndarray, source_accuracy: float, source_count: int, *,
                 seed: int, replicates: int = ATC_BOOTSTRAP_REPLICATES,
                 level: float = ATC_INTERVAL_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the ATC estimate: sampling error only, not the bias under shift.

    Each replicate resamples the target images and the source validation set (multinomial over its stored
    confidence histogram, binomial over its accuracy) and relearns the threshold.
    """
    if len(confidence) == 0 or source_count < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    histogram = np.asarray(histogram, dtype=np.float64)
    histogram = histogram / histogram.sum()
    estimates = np.empty(replicates)
    for r in range(replicates):
        source_hist = rng.multinomial(source_count, histogram)
        threshold = atc_threshold(source_hist, rng.binomial(source_count, source_accuracy) / source_count)
        estimates[r] = atc_estimate(rng.choice(confidence, len(confidence)), threshold)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)

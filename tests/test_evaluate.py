import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from crosssim.checkpoint import SourceStats, load_checkpoint
from crosssim.cli import main
from crosssim.data.sites import load_site
from crosssim.data.synth import generate_hospitals
from crosssim.evaluate import label_free_metrics
from crosssim.metrics import (accuracy, atc_estimate, atc_interval, atc_threshold, confidence_histogram,
                              doc_estimate, expected_calibration_error, reliability_bins)
from crosssim.train import infer

ATC_POOL_IMAGES_PER_SITE = 300  # held-out source images per site, independent of the training data (seed 1)
ATC_SPLITS = 20  # random halvings: threshold learned on one half, accuracy estimated on the other
ATC_TOLERANCE = 0.05  # mean absolute error of the estimate, accuracy points
ATC_BIAS_TOLERANCE = 0.02  # mean signed error

LABEL_FREE_KEYS = {"n_images", "predicted_prevalence", "source_prevalence", "mean_confidence", "mean_entropy",
                   "atc_threshold", "atc_estimated_accuracy", "atc_interval", "doc_estimated_accuracy",
                   "shift_alarms", "alarms_flagged", "estimator", "estimated_accuracy", "estimated_interval"}
LABELED_KEYS = {"accuracy", "balanced_accuracy", "macro_auc", "ece", "per_class", "confusion_matrix",
                "atc_estimate_error", "doc_estimate_error", "deployed_estimate_error", "deployed_interval_covers"}


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _evaluate_cli(run, out, *extra) -> dict:
    code = main(["evaluate", "--checkpoint", str(run.checkpoint), "--data", str(run.target_dir), "--out", str(out),
                 "--cache", str(run.cache_dir), *extra])
    assert code == 0
    return _strict_json(out / "metrics.json")


def test_evaluate_without_labels_writes_the_label_free_block_only(eval_tiny_run, tmp_path):
    metrics = _evaluate_cli(eval_tiny_run, tmp_path)
    free = metrics["label_free"]
    assert LABEL_FREE_KEYS <= free.keys() and "labeled" not in metrics
    low, high = free["atc_interval"]
    assert low <= free["atc_estimated_accuracy"] <= high
    assert sum(free["predicted_prevalence"].values()) == pytest.approx(1.0)
    assert {a["flagged"] for a in free["shift_alarms"].values()} <= {True, False}
    with open(tmp_path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == free["n_images"] and {"path", "pred", "confidence"} <= rows[0].keys()
    assert (tmp_path / "report.html").is_file()


def test_evaluate_with_labels_adds_metrics_and_estimate_errors(eval_tiny_run, tmp_path):
    metrics = _evaluate_cli(eval_tiny_run, tmp_path, "--labels", str(eval_tiny_run.target_labels))
    free, labeled = metrics["label_free"], metrics["labeled"]
    assert LABELED_KEYS <= labeled.keys()
    assert labeled["atc_estimate_error"] == pytest.approx(free["atc_estimated_accuracy"] - labeled["accuracy"])
    assert labeled["doc_estimate_error"] == pytest.approx(free["doc_estimated_accuracy"] - labeled["accuracy"])
    matrix = np.array(labeled["confusion_matrix"]["rows_true_cols_pred"])
    assert matrix.sum() == free["n_images"]
    assert labeled["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())


def test_save_adapted_without_adaptation_is_a_usage_error(eval_tiny_run, tmp_path):
    code = main(["evaluate", "--checkpoint", str(eval_tiny_run.checkpoint), "--data", str(eval_tiny_run.target_dir),
                 "--out", str(tmp_path), "--save-adapted", str(tmp_path / "x.pt")])
    assert code == 1 and not (tmp_path / "x.pt").exists()


def test_several_adaptations_write_one_folder_each(eval_tiny_run, tmp_path):
    code = main(["evaluate", "--checkpoint", str(eval_tiny_run.checkpoint), "--data", str(eval_tiny_run.target_dir),
                 "--out", str(tmp_path), "--cache", str(eval_tiny_run.cache_dir), "--adapt", "none", "adabn", "none"])
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["adabn", "none"]
    for method in ("none", "adabn"):
        metrics = json.loads((tmp_path / method / "metrics.json").read_text())
        assert metrics["adaptation"]["method"] == method and (tmp_path / method / "report.html").exists()
    code = main(["evaluate", "--checkpoint", str(eval_tiny_run.checkpoint), "--data", str(eval_tiny_run.target_dir),
                 "--out", str(tmp_path / "x"), "--adapt", "adabn", "tent", "--save-adapted", str(tmp_path / "x.pt")])
    assert code == 1 and not (tmp_path / "x.pt").exists()


def test_atc_interval_covers_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    source = rng.uniform(0.3, 1.0, 2000)
    histogram = confidence_histogram(source)
    threshold = atc_threshold(histogram, 0.7)
    widths = []
    for n in (100, 2000):
        target = rng.uniform(0.3, 1.0, n)
        low, high = atc_interval(target, histogram, 0.7, len(source), seed=0)
        assert low <= atc_estimate(target, threshold) <= high
        widths.append(high - low)
    assert widths[1] < widths[0]


def test_reliability_bins_agree_with_ece_and_doc_subtracts_source_overconfidence():
    confidence = np.array([0.95, 0.95, 0.55, 0.55])
    correct = np.array([True, True, True, False])
    mean_conf, bin_acc, counts = reliability_bins(confidence, correct, bins=10)
    assert counts.sum() == 4 and counts[9] == 2 and bin_acc[5] == 0.5
    expected = 0.5 * abs(1.0 - 0.95) + 0.5 * abs(0.5 - 0.55)
    assert expected_calibration_error(confidence, correct, bins=10) == pytest.approx(expected)
    assert doc_estimate(confidence, source_mean_confidence=0.9, source_accuracy=0.8) == pytest.approx(0.75 - 0.1)


@pytest.fixture(scope="module")
def held_out_source_predictions(eval_tiny_run, tmp_path_factory):
    """The tiny model's probabilities and labels on a fresh draw of the three source hospitals."""
    ckpt = load_checkpoint(eval_tiny_run.checkpoint)
    pool = generate_hospitals(tmp_path_factory.mktemp("atc_pool"), seed=1, images_per_site=ATC_POOL_IMAGES_PER_SITE,
                              image_size=ckpt.config.data.image_size)
    sites = [load_site(folder, ckpt.config.data, labeled=True, classes=ckpt.classes,
                       cache_dir=eval_tiny_run.cache_dir) for folder in pool.source_sites]
    probs, _ = infer(ckpt.build_model(), torch.cat([s.images for s in sites]), torch.device("cpu"))
    return ckpt, probs, torch.cat([s.labels for s in sites])


def test_atc_estimates_held_out_source_accuracy_within_5_points(held_out_source_predictions):
    ckpt, probs, labels = held_out_source_predictions
    errors = []
    for split in range(ATC_SPLITS):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split))
        reference, held_out = order[:len(order) // 2], order[len(order) // 2:]
        stats = SourceStats.from_predictions(probs[reference], labels[reference], labels[reference],
                                             len(ckpt.classes))
        free = label_free_metrics(probs[held_out].numpy(), dataclasses.replace(ckpt, source=stats), {})
        truth = accuracy(labels[held_out].numpy(), probs[held_out].argmax(1).numpy())
        errors.append(free["atc_estimated_accuracy"] - truth)
    assert np.mean(np.abs(errors)) <= ATC_TOLERANCE
    assert abs(np.mean(errors)) <= ATC_BIAS_TOLERANCE

import hashlib
import json

import numpy as np
import pytest
import torch

from crosssim import adapt as adapt_module
from crosssim import adapt_choice, evaluate
from crosssim.adapt import AdaptedCopies, adapt_copy, class_prior, nearest_centroid_labels
from crosssim.adapt_choice import degeneracy_checks
from crosssim.checkpoint import load_checkpoint
from crosssim.config import AdaptConfig, ConfigError
from crosssim.data.sites import SiteError, load_site, read_labels_csv, write_labels_csv
from crosssim.evaluate import deployed_estimate, evaluate_adaptations, evaluate_site, reference_estimates
from crosssim.few_shot_check import LABEL_FREE, ShotCheck
from crosssim.metrics import atc_threshold
from crosssim.model import batchnorm_modules, batchnorm_state_keys
from crosssim.shift import shift_figures

CPU = torch.device("cpu")


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source_and_target(eval_tiny_run):
    ckpt = load_checkpoint(eval_tiny_run.checkpoint)
    site = load_site(eval_tiny_run.target_dir, ckpt.config.data, labeled=False, classes=ckpt.classes,
                     cache_dir=eval_tiny_run.cache_dir)
    return ckpt, site.images


def _bn_affine_keys(model: torch.nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, m in batchnorm_modules(model) for p in ("weight", "bias")}


def _changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_adabn_moves_running_statistics_to_the_target_and_nothing_else(source_and_target):
    ckpt, images = source_and_target
    model = ckpt.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_copy(model, images, "adabn", CPU)
    changed = _changed(before, adapted.state_dict())
    assert _changed(before, model.state_dict()) == set()  # the source model is untouched
    stat_keys = {f"{name}.{s}" for name, _ in batchnorm_modules(model) for s in ("running_mean", "running_var")}
    assert stat_keys <= changed <= batchnorm_state_keys(model) - _bn_affine_keys(model)
    drift_before = shift_figures(model, images, ckpt.prototypes, CPU)["bn_drift"]
    drift_after = shift_figures(adapted, images, ckpt.prototypes, CPU)["bn_drift"]
    assert drift_after < 0.05 < drift_before


def test_tent_changes_only_batchnorm_affine_parameters_and_is_seeded(source_and_target):
    ckpt, images = source_and_target
    model = ckpt.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_copy(model, images, "tent", CPU, settings=AdaptConfig(tent_steps=3), seed=ckpt.config.seed)
    changed_params = {name for name, p in adapted.named_parameters() if not torch.equal(p, before[name])}
    assert changed_params and changed_params <= _bn_affine_keys(model)
    assert _changed(before, adapted.state_dict()) <= batchnorm_state_keys(model)
    assert all(p.requires_grad for p in adapted.parameters())
    again = adapt_copy(model, images, "tent", CPU, settings=AdaptConfig(tent_steps=3), seed=ckpt.config.seed)
    assert _changed(adapted.state_dict(), again.state_dict()) == set()


@pytest.mark.parametrize("method", ["adabn", "tent", "crosssim", "auto"])
def test_evaluate_never_modifies_the_source_checkpoint(eval_tiny_run, tmp_path, method):
    digest = _sha256(eval_tiny_run.checkpoint)
    saved = tmp_path / "adapted.pt"
    metrics = evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "out", adapt=method,
                            adapt_overrides={"tent-steps": 2}, save_adapted=saved,
                            cache_dir=eval_tiny_run.cache_dir, progress=None)
    assert _sha256(eval_tiny_run.checkpoint) == digest
    adapted = load_checkpoint(saved)
    used = metrics["adaptation"]["method"]
    assert adapted.extra["adapted"]["method"] == used
    assert used == method or (method == "auto" and metrics["adaptation"]["auto"]["chosen"] == used)
    source = load_checkpoint(eval_tiny_run.checkpoint)
    allowed = batchnorm_state_keys(source.build_model())  # adabn, tent
    if used == "crosssim":
        allowed = {k for k in source.state_dict if k.startswith("backbone.")}
    assert _changed(source.state_dict, adapted.state_dict) <= allowed
    with pytest.raises(ValueError, match="overwrite"):
        evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "again", adapt=method,
                      save_adapted=eval_tiny_run.checkpoint, cache_dir=eval_tiny_run.cache_dir, progress=None)
    assert _sha256(eval_tiny_run.checkpoint) == digest


def test_evaluating_several_adaptations_at_once_equals_one_run_each(eval_tiny_run, tmp_path):
    methods = ["none", "adabn", "tent", "crosssim", "auto"]
    common = {"labels_csv": eval_tiny_run.target_labels, "adapt_overrides": {"tent-steps": 2},
              "cache_dir": eval_tiny_run.cache_dir, "progress": None}
    together = evaluate_adaptations(eval_tiny_run.checkpoint, eval_tiny_run.target_dir,
                                    {m: tmp_path / "together" / m for m in methods}, **common)
    for method in methods:
        alone = evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "alone" / method,
                              adapt=method, **common)
        for metrics in (together[method], alone):
            metrics["data_report"].pop("load_seconds")
        assert together[method] == json.loads(json.dumps(alone)), method
        assert (tmp_path / "together" / method / "predictions.csv").read_text() == \
            (tmp_path / "alone" / method / "predictions.csv").read_text()
    with pytest.raises(ValueError, match="single --adapt"):
        evaluate_adaptations(eval_tiny_run.checkpoint, eval_tiny_run.target_dir,
                             {m: tmp_path / "x" / m for m in methods[:2]}, save_adapted=tmp_path / "a.pt",
                             progress=None)


def _classifier_and_projection_keys(model: torch.nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(("classifier.", "projection."))}


def test_crosssim_adaptation_trains_only_the_backbone_and_is_seeded(source_and_target):
    ckpt, images = source_and_target
    model = ckpt.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"settings": AdaptConfig(shot_epochs=2), "prototypes": ckpt.prototypes,
              "prevalence": torch.as_tensor(ckpt.source.prevalence), "seed": ckpt.config.seed}
    adapted = adapt_copy(model, images, "crosssim", CPU, **kwargs)
    assert _changed(before, model.state_dict()) == set()
    changed = _changed(before, adapted.state_dict())
    backbone_weights = {k for k in before if k.startswith("backbone.") and k.endswith("weight")
                        and k not in batchnorm_state_keys(model)}
    assert backbone_weights & changed  # the feature layers moved
    assert not changed & _classifier_and_projection_keys(model)  # the head and the projection are frozen
    assert all(p.requires_grad for p in adapted.parameters())
    again = adapt_copy(model, images, "crosssim", CPU, **kwargs)
    assert _changed(adapted.state_dict(), again.state_dict()) == set()


def test_nearest_centroid_labels_follow_the_target_clusters():
    embeddings = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.1, 1.0], [0.0, 0.8], [-1.0, 0.0]])
    prototypes = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, -1.0]])  # class 0 starts between the clusters
    labels, centroids = nearest_centroid_labels(embeddings, prototypes, torch.tensor([True, True, False]))
    assert labels.tolist() == [0, 0, 1, 1, 1]  # class 2 is absent: never assigned, not even the image near it
    assert centroids[0, 0] > 0.99  # re-estimated on the images: moved from the diagonal onto its cluster
    assert centroids[2].tolist() == pytest.approx((torch.tensor([-1.0, -1.0]) / 2**0.5).tolist())


def test_class_prior_is_floored_and_normalized():
    prior = class_prior(torch.tensor([0.9, 0.1, 0.0]), 3)
    assert prior.sum().item() == pytest.approx(1.0) and prior[2] > 0
    assert class_prior(None, 4).tolist() == [0.25] * 4


def test_degeneracy_checks_on_hand_made_predictions():
    reference = torch.eye(2)[[0, 1, 0, 1]].numpy()
    collapsed = torch.eye(2)[[0, 0, 0, 0]].numpy()
    checks = degeneracy_checks(collapsed, reference)
    assert checks["agreement_with_adabn"] == 0.5 and checks["effective_class_ratio"] == pytest.approx(0.5)
    assert checks["degenerate"] and not degeneracy_checks(reference, reference)["degenerate"]


def test_auto_falls_back_to_adabn_when_every_candidate_collapses(source_and_target, monkeypatch):
    ckpt, images = source_and_target
    real_adapt_copy = adapt_module.adapt_copy

    def collapsing(model, images, method, device, **kwargs):
        adapted = real_adapt_copy(model, images, method, device, **kwargs)
        if method in adapt_choice.AUTO_CANDIDATES:  # every image to class 0: a collapsed adaptation
            with torch.no_grad():
                adapted.classifier.weight.zero_()
                adapted.classifier.bias.copy_(torch.arange(len(ckpt.classes), 0, -1).float())
        return adapted

    monkeypatch.setattr(adapt_module, "adapt_copy", collapsing)
    choice = adapt_choice.choose_adaptation(AdaptedCopies(ckpt.build_model(), images, CPU,
                                                          settings=AdaptConfig(shot_epochs=1),
                                                          prototypes=ckpt.prototypes, seed=0))
    assert choice.method == "adabn" and choice.reason.startswith("fallback")
    assert set(choice.checks) == set(adapt_choice.AUTO_CANDIDATES)
    assert all(c["degenerate"] for c in choice.checks.values())
    few = adapt_choice.choose_adaptation(AdaptedCopies(ckpt.build_model(), images[:adapt_choice.AUTO_MIN_IMAGES - 1],
                                                       CPU, prototypes=ckpt.prototypes))
    assert few.method == "none"


def test_adapted_copies_make_each_adaptation_once(source_and_target, monkeypatch):
    ckpt, images = source_and_target
    made = []
    real_adapt_copy = adapt_module.adapt_copy

    def counting(model, images, method, device, **kwargs):
        made.append(method)
        return real_adapt_copy(model, images, method, device, **kwargs)

    monkeypatch.setattr(adapt_module, "adapt_copy", counting)
    copies = AdaptedCopies(ckpt.build_model(), images, CPU, settings=AdaptConfig(tent_steps=2), seed=0)
    first = copies.predictions("tent")[0]
    assert copies.model_for("tent") is copies.model_for("tent")
    assert torch.equal(copies.predictions("tent")[0], first) and made == ["tent"]
    copies.predictions("adabn")
    assert made == ["tent", "adabn"]


def test_reference_estimates_reproduce_hand_computed_agreement_and_atc(source_and_target):
    ckpt, _ = source_and_target
    probs = np.array([[0.9, 0.1, 0, 0], [0.2, 0.8, 0, 0], [0.6, 0.4, 0, 0], [0.3, 0.7, 0, 0]])
    reference = np.array([[0.7, 0.3, 0, 0], [0.6, 0.4, 0, 0], [0.55, 0.45, 0, 0], [0.1, 0.9, 0, 0]])
    block = reference_estimates(probs, reference, ckpt)
    assert block["agreement_estimated_accuracy"] == 0.75  # images 0, 2, 3 agree
    threshold = atc_threshold(ckpt.source.confidence_histogram, ckpt.source.accuracy)
    assert block["adabn_atc_estimated_accuracy"] == pytest.approx(float((reference.max(1) > threshold).mean()))


def test_shots_adapt_the_deployed_model_and_are_never_scored(eval_tiny_run, tmp_path):
    digest = _sha256(eval_tiny_run.checkpoint)
    truth = read_labels_csv(eval_tiny_run.target_labels)
    first_per_class: dict[str, str] = {}
    for path, label in sorted(truth.items()):
        first_per_class.setdefault(label, path)
    shots_csv = write_labels_csv(tmp_path / "shots.csv", [(p, label) for label, p in first_per_class.items()])
    metrics = evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "out", adapt="adabn",
                            labels_csv=eval_tiny_run.target_labels, shots_csv=shots_csv,
                            cache_dir=eval_tiny_run.cache_dir, progress=None)
    assert _sha256(eval_tiny_run.checkpoint) == digest
    n_shots = len(first_per_class)
    assert metrics["label_free"]["n_images"] == len(truth) - n_shots
    assert metrics["few_shot"]["n_shots"] == n_shots and metrics["few_shot"]["n_scored"] == len(truth) - n_shots
    supports = sum(c["support"] for c in metrics["labeled"]["per_class"].values())
    assert supports == len(truth) - n_shots
    assert metrics["few_shot"]["deployed"] == "few-shot"  # one shot per class: nothing to cross-validate
    assert metrics["few_shot"]["few_shot_accuracy"] == metrics["few_shot"]["deployed_accuracy"] == \
        metrics["labeled"]["accuracy"]
    assert "few-shot" in (tmp_path / "out" / "report.html").read_text()
    bad = write_labels_csv(tmp_path / "bad.csv", [("no/such.dcm", next(iter(first_per_class)))])
    with pytest.raises(SiteError, match="bad.csv.*not readable images"):
        evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "bad", shots_csv=bad,
                      cache_dir=eval_tiny_run.cache_dir, progress=None)


def test_a_few_shot_model_that_loses_the_shot_check_is_not_deployed(eval_tiny_run, tmp_path, monkeypatch):
    truth = read_labels_csv(eval_tiny_run.target_labels)
    shots_csv = write_labels_csv(tmp_path / "shots.csv", sorted(truth.items())[:4])
    monkeypatch.setattr(evaluate, "check_few_shot", lambda *args: ShotCheck(LABEL_FREE, "constructed loss", 0, 4, 4))
    metrics = evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "out", adapt="adabn",
                            labels_csv=eval_tiny_run.target_labels, shots_csv=shots_csv,
                            cache_dir=eval_tiny_run.cache_dir, progress=None)
    few = metrics["few_shot"]
    assert few["deployed"] == metrics["adaptation"]["few_shot"]["deployed"] == LABEL_FREE
    assert few["deployed_accuracy"] == few["label_free_accuracy"] == metrics["labeled"]["accuracy"]
    assert metrics["label_free"]["estimator"] == "atc"  # the AdaBN model's own estimate, not few-shot's
    assert "constructed loss" in (tmp_path / "out" / "report.html").read_text()


def test_evaluate_set_takes_adapt_keys_only(eval_tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="\\[adapt\\] keys only.*lr"):
        evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path, adapt="tent",
                      adapt_overrides={"lr": 1.0}, cache_dir=eval_tiny_run.cache_dir, progress=None)


def test_the_deployed_estimate_follows_how_the_model_came_about():
    free = {"atc_estimated_accuracy": 0.9, "atc_interval": [0.85, 0.95],
            "adabn_atc_estimated_accuracy": 0.7, "adabn_atc_interval": [0.6, 0.8]}
    assert deployed_estimate(free, "adabn") == {"estimator": "atc", "estimated_accuracy": 0.9,
                                                 "estimated_interval": [0.85, 0.95]}
    assert deployed_estimate(free, "crosssim")["estimated_accuracy"] == 0.7
    assert deployed_estimate({k: free[k] for k in ("atc_estimated_accuracy", "atc_interval")},
                             "crosssim")["estimator"] == "atc"  # no AdaBN reference computed
    assert deployed_estimate({}, "none") == {}  # no source statistics: no estimate

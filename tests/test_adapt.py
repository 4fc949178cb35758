import hashlib

import pytest
import torch

from crosssim.adapt import adapt_copy
from crosssim.checkpoint import load_checkpoint
from crosssim.data.sites import load_site
from crosssim.evaluate import evaluate_site
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
    adapted = adapt_copy(model, images, "tent", CPU, tent_steps=3, seed=ckpt.config.seed)
    changed_params = {name for name, p in adapted.named_parameters() if not torch.equal(p, before[name])}
    assert changed_params and changed_params <= _bn_affine_keys(model)
    assert _changed(before, adapted.state_dict()) <= batchnorm_state_keys(model)
    assert all(p.requires_grad for p in adapted.parameters())
    again = adapt_copy(model, images, "tent", CPU, tent_steps=3, seed=ckpt.config.seed)
    assert _changed(adapted.state_dict(), again.state_dict()) == set()


@pytest.mark.parametrize("method", ["adabn", "tent"])
def test_evaluate_never_modifies_the_source_checkpoint(eval_tiny_run, tmp_path, method):
    digest = _sha256(eval_tiny_run.checkpoint)
    saved = tmp_path / "adapted.pt"
    metrics = evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "out", adapt=method,
                            tent_steps=2, save_adapted=saved, cache_dir=eval_tiny_run.cache_dir, progress=None)
    assert _sha256(eval_tiny_run.checkpoint) == digest
    adapted = load_checkpoint(saved)
    assert adapted.extra["adapted"]["method"] == method == metrics["adaptation"]["method"]
    source = load_checkpoint(eval_tiny_run.checkpoint)
    assert _changed(source.state_dict, adapted.state_dict) <= batchnorm_state_keys(source.build_model())
    with pytest.raises(ValueError, match="overwrite"):
        evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, tmp_path / "again", adapt=method,
                      save_adapted=eval_tiny_run.checkpoint, cache_dir=eval_tiny_run.cache_dir, progress=None)
    assert _sha256(eval_tiny_run.checkpoint) == digest

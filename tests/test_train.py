"""The local training loop: seeded, similarity term active once prototypes exist, FedProx anchor."""

from __future__ import annotations

import pytest
import torch

from crosssim.augment import augment_batch
from crosssim.config import load_config
from crosssim.model import build_model
from crosssim.prototypes import compute_prototypes
from crosssim.train import infer, lambda_for_step, round_lr, train_local

NUM_CLASSES = 3
SIDE_PX = 24


def _toy_data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(48) % NUM_CLASSES
    images = torch.rand(48, 1, SIDE_PX, SIDE_PX, generator=generator) * 0.2
    for c in range(NUM_CLASSES):  # class = which third of the image is bright
        images[labels == c, :, :, c * 8:(c + 1) * 8] += 0.8
    return images, labels


def _cfg(**overrides):
    return load_config(overrides={"batch-size": 16, "device": "cpu", "classes": "a,b,c", **overrides})


def _train(cfg, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = build_model(cfg.model, NUM_CLASSES)
    images, labels = _toy_data()
    result = train_local(model, images, labels, cfg, epochs=2, lr=1e-2, seed=seed, device=torch.device("cpu"),
                         **kwargs)
    return model, result


def test_same_seed_gives_identical_weights_and_other_seed_differs():
    cfg = _cfg()
    a, _ = _train(cfg, seed=3)
    b, _ = _train(cfg, seed=3)
    c, _ = _train(cfg, seed=4)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in a.state_dict())


def test_similarity_term_is_used_only_with_prototypes_and_lambda():
    cfg = _cfg()
    images, labels = _toy_data()
    protos = compute_prototypes(torch.nn.functional.normalize(torch.randn(48, 128), dim=1), labels,
                                NUM_CLASSES, min_count=2)
    _, without = _train(cfg)
    _, with_sim = _train(cfg, prototypes=protos, lambda_sim=0.5)
    _, zero_lambda = _train(cfg, prototypes=protos, lambda_sim=0.0)
    assert without.sim_loss == 0.0 and zero_lambda.sim_loss == 0.0
    assert with_sim.sim_loss > 0.0
    assert with_sim.loss == pytest.approx(with_sim.ce_loss + 0.5 * with_sim.sim_loss, rel=1e-4)


def test_fedprox_anchor_keeps_weights_closer_to_global():
    cfg = _cfg(**{"proximal-mu": 10.0})
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in build_model(cfg.model, NUM_CLASSES).named_parameters()}
    free, _ = _train(cfg)
    anchored, _ = _train(cfg, global_params=start)
    distance = lambda m: sum((p - start[n]).pow(2).sum().item() for n, p in m.named_parameters())
    assert distance(anchored) < distance(free)


def test_training_learns_a_separable_toy_task():
    cfg = _cfg(augment=False)
    model, result = _train(cfg)
    probs, _ = infer(model, *_toy_data()[:1], torch.device("cpu"))
    assert (probs.argmax(1) == _toy_data()[1]).float().mean() > 0.9
    assert result.num_examples == 48


def test_augmentation_is_seeded_and_shape_preserving():
    cfg = _cfg().augment
    x = torch.rand(4, 1, SIDE_PX, SIDE_PX)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_schedules():
    assert round_lr(1.0, "cosine", 1, 4) == 1.0
    assert round_lr(1.0, "cosine", 3, 4) == pytest.approx(0.5)
    assert round_lr(1.0, "constant", 3, 4) == 1.0
    assert lambda_for_step(0.5, 0, 2) == 0.0
    assert lambda_for_step(0.5, 1, 2) == 0.25 and lambda_for_step(0.5, 5, 2) == 0.5


def test_site_round_sends_batchnorm_statistics_of_its_final_weights_on_unaugmented_images():
    """After local training, each BN layer's running mean/var are those of the site's own training images."""
    from crosssim.federated import LocalSite, train_round
    from crosssim.model import batchnorm_modules

    cfg = _cfg(**{"augment": True, "local-epochs": 1})
    torch.manual_seed(0)
    model = build_model(cfg.model, NUM_CLASSES)
    images, labels = _toy_data()
    site = LocalSite("site", images, labels, images[:0], labels[:0], load_seconds=0.0)
    train_round(model, site, cfg, server_round=1, lr=1e-2, lambda_sim=0.0, prototypes=None,
                device=torch.device("cpu"))
    first_bn = next(m for _, m in batchnorm_modules(model))
    captured: list[torch.Tensor] = []
    handle = first_bn.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    infer(model, images, torch.device("cpu"))
    handle.remove()
    inputs = torch.cat(captured).transpose(0, 1).flatten(1)  # (channels, N·H·W)
    assert torch.allclose(first_bn.running_mean, inputs.mean(1), atol=1e-5)
    assert torch.allclose(first_bn.running_var, inputs.var(1, unbiased=True), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("anchor", ["auto", "none", "basic", "scanner"])
def test_pair_loss_renders_the_anchor_view_then_a_scanner_view(monkeypatch, anchor):
    import crosssim.train as train_module

    modes: list[tuple[str, int]] = []

    def recording(x, cfg, generator):
        modes.append((cfg.augment, len(x)))
        return augment_batch(x, cfg, generator)

    monkeypatch.setattr(train_module, "augment_batch", recording)
    _train(_cfg(**{"anchor-view": anchor, "augment": "scanner"}))  # strategy crosssim: pair loss on
    first = "scanner" if anchor == "auto" else anchor
    assert modes and [m for m, _ in modes] == [first, "scanner"] * (len(modes) // 2)  # per batch: anchor, scanner

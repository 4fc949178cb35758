import pytest
import torch

from crosssim.model import CrossSimNet, batchnorm_modules, batchnorm_state_keys

BACKBONES = [("seed-cnn", 64), ("resnet18", 512), ("densenet121", 1024)]


@pytest.mark.parametrize("backbone,feature_dim", BACKBONES)
def test_backbones_give_logits_and_unit_embeddings(backbone, feature_dim):
    torch.manual_seed(0)
    model = CrossSimNet(num_classes=4, backbone=backbone, embedding_dim=128).eval()
    x = torch.rand(2, 1, 64, 64)
    h = model.features(x)
    assert h.shape == (2, feature_dim)
    logits, z = model(x)
    assert logits.shape == (2, 4) and z.shape == (2, 128)
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    assert batchnorm_modules(model)  # every backbone has BatchNorm layers for FedBN/AdaBN


def test_seed_cnn_accepts_any_image_size():
    model = CrossSimNet(num_classes=3).eval()
    for side in (32, 48, 96):
        assert model(torch.rand(1, 1, side, side))[0].shape == (1, 3)


def test_batchnorm_keys_are_selected_by_type():
    model = CrossSimNet(num_classes=2)
    keys = batchnorm_state_keys(model)
    assert keys and keys <= set(model.state_dict())
    assert all(".running_mean" in k or ".running_var" in k or ".weight" in k or ".bias" in k
               or ".num_batches_tracked" in k for k in keys)
    assert not any(k.startswith(("classifier", "projection")) for k in keys)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        CrossSimNet(num_classes=2, backbone="vgg")

"""CrossSimNet: backbone features → (L2-normalized projection embedding, classifier logits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crosssim.config import ModelConfig

SEED_CNN_POOLED_SIDE_PX = 8  # seed CNN feature map is pooled to 8×8 so any image size fits the dense layer
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INFERENCE_BATCH_SIZE = 256  # images per forward pass when nothing trains (prediction, statistics)


class SeedCNN(nn.Module):
    """The seed's network: conv32-pool-conv64-pool-dense64, BatchNorm after each conv and the dense layer."""

    feature_dim = 64

    def __init__(self, in_channels: int = 1, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, padding=1, bias=False),
            norm_layer(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1, bias=False),
            norm_layer(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(SEED_CNN_POOLED_SIDE_PX),
        )
        # BatchNorm before the dense ReLU too: without it the 64 units died under FedAvg (98% dead by round 3
        # on the synthetic hospitals), collapsing every federated run to chance.
        self.dense = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * SEED_CNN_POOLED_SIDE_PX**2, self.feature_dim, bias=False),
            nn.BatchNorm1d(self.feature_dim), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.conv(x))


class ResNet18Features(nn.Module):
    """torchvision ResNet-18 with a 1-channel stem and no classifier; random init, never downloads."""

    feature_dim = 512

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DenseNet121Features(nn.Module):
    """MONAI DenseNet-121 feature extractor (2-D) followed by global average pooling."""

    feature_dim = 1024

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet121

        self.features = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x)), 1), 1)


BACKBONES: dict[str, type[nn.Module]] = {
    "seed-cnn": SeedCNN,
    "resnet18": ResNet18Features,
    "densenet121": DenseNet121Features,
}


class CrossSimNet(nn.Module):
    """Backbone → features h; ``embed(h)`` → unit-norm z (similarity space); ``classify(h)`` → logits."""

    def __init__(self, num_classes: int, backbone: str = "seed-cnn", embedding_dim: int = 128,
                 in_channels: int = 1) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
        self.backbone = BACKBONES[backbone](in_channels=in_channels)
        feature_dim = self.backbone.feature_dim
        self.projection = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, embedding_dim)
        )
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(h), dim=1)

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits, z) for a batch ``x`` of shape (N, 1, H, W)."""
        h = self.features(x)
        return self.classify(h), self.embed(h)


def build_model(cfg: ModelConfig, num_classes: int) -> CrossSimNet:
    return CrossSimNet(num_classes=num_classes, backbone=cfg.backbone, embedding_dim=cfg.embedding_dim)


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm layers selected by type (never by parameter name), with their module names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BATCHNORM_TYPES)]


def batchnorm_state_keys(model: nn.Module) -> set[str]:
    """state_dict keys that belong to BatchNorm layers (weights, biases and running statistics)."""
    keys: set[str] = set()
    for name, module in batchnorm_modules(model):
        keys.update(f"{name}.{k}" for k in module.state_dict())
    return keys

"""Training augmentation on whole batches, on the training device.

MONAI's per-sample spatial transforms (RandRotate, RandZoom, RandAffine) measured 10–30 ms per 64² image on
these 2-core machines, more than a forward/backward pass of the seed CNN, so rotation and zoom are applied
as one batched ``affine_grid``/``grid_sample``; intensity transforms follow MONAI's definitions
(RandAdjustContrast's gamma on min–max rescaled intensities, RandShiftIntensity, RandGaussianNoise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crosssim.config import AugmentConfig

CONTRAST_PROBABILITY = 0.5
SHIFT_PROBABILITY = 0.5
NOISE_PROBABILITY = 0.5


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _chance(n: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < probability


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, zoom, horizontal flip, gamma contrast, intensity shift and noise for (N, 1, H, W).

    Random draws come from ``generator`` (CPU) so a seed reproduces the same augmentations on any device.
    """
    n = x.shape[0]
    angle = torch.deg2rad(_uniform(n, -cfg.rotate_deg, cfg.rotate_deg, generator))
    scale = 1.0 / _uniform(n, 1 - cfg.zoom_fraction, 1 + cfg.zoom_fraction, generator)
    flip = torch.where(_chance(n, cfg.flip_probability, generator), -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(n)], 1),
                         torch.stack([sin * flip, cos, torch.zeros(n)], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    gamma = torch.where(_chance(n, CONTRAST_PROBABILITY, generator),
                        _uniform(n, 1 - cfg.contrast_gamma, 1 + cfg.contrast_gamma, generator), torch.ones(n))
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-6)
    x = ((x - low) / span).pow(gamma.view(n, 1, 1, 1).to(x)) * span + low

    shift = torch.where(_chance(n, SHIFT_PROBABILITY, generator),
                        _uniform(n, -cfg.intensity_shift, cfg.intensity_shift, generator), torch.zeros(n))
    noise_std = torch.where(_chance(n, NOISE_PROBABILITY, generator), torch.full((n,), cfg.noise_std),
                            torch.zeros(n))
    noise = torch.randn(x.shape, generator=generator) * noise_std.view(n, 1, 1, 1)
    return x + shift.view(n, 1, 1, 1).to(x) + noise.to(x)


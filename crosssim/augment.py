"""Training augmentation on whole batches, on the training device: the one entry point ``augment_batch``.

MONAI's per-sample spatial transforms (RandRotate, RandZoom, RandAffine) measured 10–30 ms per 64² image on
these 2-core machines, more than a forward/backward pass of the seed CNN, so rotation and zoom are applied
as one batched ``affine_grid``/``grid_sample``. ``basic`` then follows MONAI's definitions of
RandAdjustContrast (gamma on min–max rescaled intensities), RandShiftIntensity and RandGaussianNoise;
``scanner`` renders the batch through a freshly drawn random scanner instead (crosssim/scanner.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from crosssim.config import AugmentConfig
from crosssim.scanner import adjust_contrast, chance, scanner_view, uniform

CONTRAST_PROBABILITY = 0.5
SHIFT_PROBABILITY = 0.5
NOISE_PROBABILITY = 0.5


def _geometric(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, zoom and horizontal flip per sample, one batched ``grid_sample``."""
    n = x.shape[0]
    angle = torch.deg2rad(uniform(n, -cfg.rotate_deg, cfg.rotate_deg, generator))
    scale = 1.0 / uniform(n, 1 - cfg.zoom_fraction, 1 + cfg.zoom_fraction, generator)
    flip = torch.where(chance(n, cfg.flip_probability, generator), -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(n)], 1),
                         torch.stack([sin * flip, cos, torch.zeros(n)], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _basic_intensity(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Gamma contrast, intensity shift and Gaussian noise, each on about half the samples."""
    n = x.shape[0]
    gamma = torch.where(chance(n, CONTRAST_PROBABILITY, generator),
                        uniform(n, 1 - cfg.contrast_gamma, 1 + cfg.contrast_gamma, generator), torch.ones(n))
    x = adjust_contrast(x, gamma)
    shift = torch.where(chance(n, SHIFT_PROBABILITY, generator),
                        uniform(n, -cfg.intensity_shift, cfg.intensity_shift, generator), torch.zeros(n))
    noise_std = torch.where(chance(n, NOISE_PROBABILITY, generator), torch.full((n,), cfg.noise_std),
                            torch.zeros(n))
    noise = torch.randn(x.shape, generator=generator) * noise_std.view(n, 1, 1, 1)
    return x + shift.view(n, 1, 1, 1).to(x) + noise.to(x)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch (N, C, H, W) as ``cfg.augment`` says: none | basic | scanner.

    Random draws come from ``generator`` (CPU) so a seed reproduces the same view on any device; each call
    draws anew, so two calls on one generator give two independent views (for scanner: two scanners).
    """
    if cfg.augment == "none":
        return x
    if cfg.augment not in ("basic", "scanner"):
        raise ValueError(f"augment {cfg.augment!r}: expected none, basic or scanner")
    x = _geometric(x, cfg, generator)
    return _basic_intensity(x, cfg, generator) if cfg.augment == "basic" else scanner_view(x, cfg, generator)

"""A random simulated scanner for whole training batches: MONAI's intensity and resolution transforms, and GIN.

Each op maps a batch ``(N, C, H, W)`` to one of the same shape, dtype and device. Its random parameters,
one set per sample, come from a CPU ``torch.Generator`` (a seed gives the same view on any device); the
maths runs batched on the batch's device (MONAI's per-sample transforms cost 10-30 ms per 64² image here).
Every range is ``scanner-strength`` × the op's own ``scanner-*`` key, and each op is the identity at
strength 0. Ops act on each image's own intensity range ``[min, max]``, so min-max and z-scored inputs get
the same relative change. Nothing is clipped (MONAI's intensity transforms do not clip either): curves,
blur and resolution loss keep each image inside its ``[min, max]``; sharpening overshoots it by at most
alpha × its range; the bias field scales intensities above the minimum by ``e^(±10 c)`` at the very most;
noise adds a few sigma; GIN keeps each image's Frobenius norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from crosssim.config import AugmentConfig

MIN_INTENSITY_RANGE = 1e-6  # a constant image keeps its value instead of dividing 0 by 0
MIN_SIGMA_PX = 1e-6  # below this a Gaussian kernel is the identity (its side taps underflow to 0)
GAUSSIAN_TRUNCATE_SIGMAS = 4.0  # kernel radius in sigmas, as MONAI's GaussianFilter (truncated=4.0)
SHARPEN_SIGMA_PX = 1.0  # the unsharp mask's blur
BIAS_DEGREE = 3  # MONAI RandBiasField's default: the 10 Legendre products P_i(row) P_j(col), i + j <= 3
LOW_RESOLUTION_MIN_PX = 4  # the coarsest simulated detector, pixels a side
REMAP_CONTROL_POINTS = 10  # MONAI RandHistogramShift's default
GIN_LAYERS = 4  # Ouyang et al.'s GINGroupConv: n_layer = 4,
GIN_CHANNELS = 2  # interm_channel = 2,
GIN_KERNELS_PX = (1, 3)  # scale_pool = [1, 3] (one size per layer and call)

ScannerOp = Callable[[torch.Tensor, AugmentConfig, torch.Generator], torch.Tensor]


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws uniform in [low, high), on the CPU."""
    return low + (high - low) * torch.rand(n, generator=generator)


def chance(n: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` booleans, each true with ``probability``, on the CPU."""
    return torch.rand(n, generator=generator) < probability


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) CPU draws as (N, 1, 1, 1) on ``x``'s device and dtype."""
    return values.view(-1, 1, 1, 1).to(x)


def _intensity_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample minimum and range (at least MIN_INTENSITY_RANGE), each (N, 1, 1, 1)."""
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    return low, (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=MIN_INTENSITY_RANGE)


def adjust_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI AdjustContrast per sample: ``((x - min) / range) ** gamma * range + min``; gamma (N,) on the CPU."""
    low, span = _intensity_range(x)
    return ((x - low) / span).pow(_per_sample(gamma, x)) * span + low


def random_gamma(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandAdjustContrast with ``gamma = e^u``, u uniform in ±strength × scanner-log-gamma (as often < 1 as > 1)."""
    bound = cfg.scanner_strength * cfg.scanner_log_gamma
    return adjust_contrast(x, torch.exp(uniform(len(x), -bound, bound, generator)))


def gaussian_smooth(x: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample ((N,) pixels, CPU): one grouped conv per axis."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(GAUSSIAN_TRUNCATE_SIGMAS * float(sigma_px.max())))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma_px.double().clamp(min=MIN_SIGMA_PX).view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0).to(x)  # (N·C, taps)
    flat = x.reshape(1, n * c, h, w)
    # Edges replicated: zero padding (MONAI's) would darken the border of a [0, 1] image like a vignette.
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


def random_blur(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandGaussianSmooth: sigma uniform in [0, strength × scanner-blur-sigma-px] pixels."""
    return gaussian_smooth(x, uniform(len(x), 0.0, cfg.scanner_strength * cfg.scanner_blur_sigma_px, generator))


def random_sharpen(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Unsharp mask ``x + a (x - blur(x))`` with a uniform in [0, strength × scanner-sharpen-alpha].

    MONAI's RandGaussianSharpen blurs first and boosts a band (alpha 10-30); the plain mask is the identity
    at alpha 0 and sharpens what the detector delivered, as vendors' edge enhancement does.
    """
    alpha = uniform(len(x), 0.0, cfg.scanner_strength * cfg.scanner_sharpen_alpha, generator)
    blurred = gaussian_smooth(x, torch.full((len(x),), SHARPEN_SIGMA_PX))
    return x + _per_sample(alpha, x) * (x - blurred)


def _legendre(t: torch.Tensor, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0 … P_degree at ``t`` (Bonnet's recursion), shape (degree + 1, len(t))."""
    values = [torch.ones_like(t), t]
    for k in range(1, degree):
        values.append(((2 * k + 1) * t * values[k] - k * values[k - 1]) / (k + 1))
    return torch.stack(values[:degree + 1])


def random_bias_field(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandBiasField: intensities above the minimum times ``exp(Σ c_ij P_i(row) P_j(col))``, i + j <= 3.

    Each c_ij is uniform in ±strength × scanner-bias-coefficient (MONAI draws [0, 0.1], which only
    brightens, and its 2-D code fills the lower triangle j <= i <= 3, which favours one axis).
    """
    n, _, h, w = x.shape
    rows = _legendre(torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device), BIAS_DEGREE)
    cols = _legendre(torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device), BIAS_DEGREE)
    degrees = [(i, j) for i in range(BIAS_DEGREE + 1) for j in range(BIAS_DEGREE + 1 - i)]
    basis = torch.stack([rows[i][:, None] * cols[j][None, :] for i, j in degrees])  # (K, H, W)
    bound = cfg.scanner_strength * cfg.scanner_bias_coefficient
    coefficients = uniform(n * len(degrees), -bound, bound, generator).view(n, len(degrees)).to(x)
    field = torch.einsum("nk,khw->nhw", coefficients, basis).exp().unsqueeze(1)
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    return (x - low) * field + low


def _noise_sigma(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Per-sample sigma uniform in [0, strength × scanner-noise-std] × the image's range, (N, 1, 1, 1)."""
    sigma = uniform(len(x), 0.0, cfg.scanner_strength * cfg.scanner_noise_std, generator)
    return _per_sample(sigma, x) * _intensity_range(x)[1]


def random_gaussian_noise(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandGaussianNoise: ``x + N(0, sigma²)`` per pixel, sigma per sample as ``_noise_sigma``."""
    sigma = _noise_sigma(x, cfg, generator)
    return x + torch.randn(x.shape, generator=generator).to(x) * sigma


def random_rician_noise(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandRicianNoise above the minimum: ``sqrt((x - min + n1)² + n2²) + min``, n1, n2 ~ N(0, sigma²)."""
    sigma = _noise_sigma(x, cfg, generator)
    real, imaginary = torch.randn((2, *x.shape), generator=generator).to(x) * sigma
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.sqrt((x - low + real) ** 2 + imaginary ** 2) + low


def resampling_matrices(size: int, coarse: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, size, size) matrices: area-average ``size`` pixels down to ``coarse[i]``, then linear back up.

    The same maths as ``F.interpolate(mode="area")`` then ``mode="linear", align_corners=False``, built
    for every sample at once; a sample with ``coarse == size`` gets the identity.
    """
    n = len(coarse)
    h = coarse.to(device).view(n, 1, 1)
    k = torch.arange(size, device=device).view(1, size, 1)  # coarse pixel (rows beyond h stay zero)
    j = torch.arange(size, device=device).view(1, 1, size)  # fine pixel
    start, end = k * size // h, ((k + 1) * size + h - 1) // h
    down = ((j >= start) & (j < end) & (k < h)) / (end - start)
    source = ((torch.arange(size, device=device) + 0.5) * h.view(n, 1) / size - 0.5).clamp(min=0.0)
    left = source.floor().long().clamp(max=h.view(n, 1) - 1)
    right = (left + 1).clamp(max=h.view(n, 1) - 1)
    weight = source - left
    up = torch.zeros(n, size, size, device=device)
    up.scatter_add_(2, left.unsqueeze(2), (1 - weight).unsqueeze(2)).scatter_add_(2, right.unsqueeze(2),
                                                                                  weight.unsqueeze(2))
    return up @ down.float()


def random_low_resolution(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandSimulateLowResolution: a detector of a fraction in [1 - strength × scanner-low-resolution, 1] of
    the pixels a side (at least LOW_RESOLUTION_MIN_PX), area-averaged and interpolated back.

    MONAI's default down-sampling is nearest; area is what a coarser detector pixel integrates. One pair of
    matrix products per batch: ``M_rows @ x @ M_colsᵀ``.
    """
    n, _, h, w = x.shape
    fraction = 1.0 - uniform(n, 0.0, cfg.scanner_strength * cfg.scanner_low_resolution, generator)
    rows, cols = ((fraction * side).round().long().clamp(min=min(LOW_RESOLUTION_MIN_PX, side), max=side)
                  for side in (h, w))
    resample_rows = resampling_matrices(h, rows, x.device).to(x.dtype).unsqueeze(1)
    resample_cols = resampling_matrices(w, cols, x.device).to(x.dtype).unsqueeze(1)
    return resample_rows @ x @ resample_cols.transpose(-1, -2)


def random_remap(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """RandHistogramShift: a random monotone piecewise-linear curve on each image's [min, max].

    MONAI's control points (each uniform between its neighbours, left to right) are moved a fraction
    ``min(1, strength × scanner-remap)`` of the way from the identity; below 1 the curve stays monotone.
    """
    n, points = len(x), REMAP_CONTROL_POINTS
    reference = torch.linspace(0.0, 1.0, points)
    draws = torch.rand(n, points - 2, generator=generator)
    shifted = reference.repeat(n, 1)
    for i in range(1, points - 1):
        shifted[:, i] = shifted[:, i - 1] + draws[:, i - 1] * (shifted[:, i + 1] - shifted[:, i - 1])
    weight = min(1.0, cfg.scanner_strength * cfg.scanner_remap)
    curve = (reference + weight * (shifted - reference)).to(x)  # (N, points)
    low, span = _intensity_range(x)
    position = ((x - low) / span).clamp(0.0, 1.0) * (points - 1)
    segment = position.floor().clamp(max=points - 2)
    index = segment.long().view(n, -1)
    left = curve.gather(1, index).view_as(x)
    right = curve.gather(1, index + 1).view_as(x)
    return low + span * (left + (position - segment) * (right - left))


def random_gin(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """GIN (Ouyang et al.): a fresh random shallow conv net per sample and call, mixed with the input.

    GIN_LAYERS grouped convs (N·GIN_CHANNELS channels; kernel GIN_KERNELS_PX drawn per layer; weights and
    biases N(0, 1); LeakyReLU between), output ``a·net(x) + (1 - a)·x`` with a uniform in
    [0, min(1, strength × scanner-gin-alpha)], rescaled to the input's Frobenius norm per sample.
    """
    n, c, h, w = x.shape
    widths = [c] + [GIN_CHANNELS] * (GIN_LAYERS - 1) + [c]
    out = x.reshape(1, n * c, h, w)
    for layer, (channels_in, channels_out) in enumerate(zip(widths[:-1], widths[1:])):
        size = GIN_KERNELS_PX[int(torch.randint(len(GIN_KERNELS_PX), (1,), generator=generator))]
        weight = torch.randn(n * channels_out, channels_in, size, size, generator=generator).to(x)
        bias = torch.randn(n * channels_out, generator=generator).to(x)
        out = F.conv2d(out, weight, bias, padding=size // 2, groups=n)
        if layer < GIN_LAYERS - 1:
            out = F.leaky_relu(out)
    alpha = _per_sample(uniform(n, 0.0, min(1.0, cfg.scanner_strength * cfg.scanner_gin_alpha), generator), x)
    mixed = alpha * out.view(n, c, h, w) + (1 - alpha) * x
    norm_in, norm_out = x.flatten(1).norm(dim=1), mixed.flatten(1).norm(dim=1)
    return mixed * _per_sample(norm_in / norm_out.clamp(min=MIN_INTENSITY_RANGE), mixed)


# Acquisition (detector resolution and unsharpness, field inhomogeneity, noise), then the vendor's
# processing (edge enhancement, display curves), then GIN's random texture.
SCANNER_OPS: tuple[ScannerOp, ...] = (random_low_resolution, random_blur, random_bias_field, random_gaussian_noise,
                                      random_rician_noise, random_sharpen, random_gamma, random_remap, random_gin)


def scanner_view(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """One random scanner: each op of SCANNER_OPS in turn on the samples it picks (scanner-probability each)."""
    for op in SCANNER_OPS:
        picked = chance(len(x), cfg.scanner_probability, generator).nonzero().flatten().to(x.device)
        if len(picked):
            x = x.index_copy(0, picked, op(x[picked], cfg, generator))
    return x

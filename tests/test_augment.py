import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.transforms import AdjustContrast

from crosssim.augment import augment_batch
from crosssim.config import AugmentConfig, ConfigError, CrossSimConfig, apply_overrides, to_flat
from crosssim.scanner import (BIAS_DEGREE, SCANNER_OPS, _legendre, adjust_contrast, gaussian_smooth, random_bias_field,
                              random_blur, random_gamma, random_gaussian_noise, random_gin, random_low_resolution,
                              random_remap, random_rician_noise, random_sharpen, resampling_matrices)

BATCH, HEIGHT_PX, WIDTH_PX = 6, 20, 24  # not square: a swapped axis shows
TOLERANCE = 1e-5  # float32 rounding on [0, 1] intensities
NO_GEOMETRY = {"rotate-deg": 0.0, "zoom-fraction": 0.0, "flip-probability": 0.0}


def _cfg(**overrides) -> AugmentConfig:
    return apply_overrides(CrossSimConfig(), overrides).augment


def _images(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(BATCH, 1, HEIGHT_PX, WIDTH_PX, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _per_sample(x: torch.Tensor, reduce) -> torch.Tensor:
    return reduce(x.flatten(1), dim=1).values.view(-1, 1, 1, 1)


def _stays_in_own_range(x: torch.Tensor, out: torch.Tensor, cfg: AugmentConfig) -> bool:
    return bool((out >= _per_sample(x, torch.min) - TOLERANCE).all()
                and (out <= _per_sample(x, torch.max) + TOLERANCE).all())


def _monotone_and_keeps_range(x: torch.Tensor, out: torch.Tensor, cfg: AugmentConfig) -> bool:
    order = x.flatten(1).argsort(1)
    along = out.flatten(1).gather(1, order)
    ends = torch.allclose(along[:, [0, -1]], x.flatten(1).gather(1, order)[:, [0, -1]], atol=TOLERANCE)
    return ends and bool((along.diff(dim=1) >= -TOLERANCE).all())


def _bias_within_field_bound(x: torch.Tensor, out: torch.Tensor, cfg: AugmentConfig) -> bool:
    bound = math.exp(10 * cfg.scanner_strength * cfg.scanner_bias_coefficient)  # 10 products, |P_i P_j| <= 1
    low = _per_sample(x, torch.min)
    return bool(((out - low) >= (x - low) / bound - TOLERANCE).all()
                and ((out - low) <= (x - low) * bound + TOLERANCE).all())


def _noise_sigma_within_range(x: torch.Tensor, out: torch.Tensor, cfg: AugmentConfig) -> bool:
    span = (_per_sample(x, torch.max) - _per_sample(x, torch.min)).flatten()
    measured = (out - x).flatten(1).std(dim=1)
    return bool((measured <= 1.25 * cfg.scanner_noise_std * span).all() and (measured > 0).any())


def _not_below_minimum(x: torch.Tensor, out: torch.Tensor, cfg: AugmentConfig) -> bool:
    return bool((out >= _per_sample(x, torch.min) - TOLERANCE).all())


def _overshoot_within_alpha(x: torch.Tensor, out: torch.Tensor, cfg: AugmentConfig) -> bool:
    low, high = _per_sample(x, torch.min), _per_sample(x, torch.max)
    margin = cfg.scanner_strength * cfg.scanner_sharpen_alpha * (high - low)
    return bool((out >= low - margin - TOLERANCE).all() and (out <= high + margin + TOLERANCE).all())


def _keeps_frobenius_norm(x: torch.Tensor, out: torch.Tensor, cfg: AugmentConfig) -> bool:
    return torch.allclose(out.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), rtol=1e-5)


# op, the value-range property it promises for [0, 1] images
OP_CASES = [
    (random_low_resolution, _stays_in_own_range),
    (random_blur, _stays_in_own_range),
    (random_bias_field, _bias_within_field_bound),
    (random_gaussian_noise, _noise_sigma_within_range),
    (random_rician_noise, _not_below_minimum),
    (random_sharpen, _overshoot_within_alpha),
    (random_gamma, _monotone_and_keeps_range),
    (random_remap, _monotone_and_keeps_range),
    (random_gin, _keeps_frobenius_norm),
]
OPS = [op for op, _ in OP_CASES]
OP_IDS = [op.__name__ for op in OPS]


def test_case_table_covers_every_scanner_op():
    assert sorted(OP_IDS) == sorted(op.__name__ for op in SCANNER_OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_op_keeps_shape_dtype_and_is_finite(op, dtype):
    x = _images(dtype=dtype)
    out = op(x, _cfg(), torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == dtype and bool(out.isfinite().all())


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_op_same_seed_same_output_and_fresh_draws_per_call(op):
    x, cfg = _images(), _cfg()
    generator = torch.Generator().manual_seed(1)
    first, second = op(x, cfg, generator), op(x, cfg, generator)
    assert torch.equal(first, op(x, cfg, torch.Generator().manual_seed(1)))
    assert not torch.allclose(first, second, atol=1e-4)
    assert not torch.allclose(first, op(x, cfg, torch.Generator().manual_seed(2)), atol=1e-4)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_op_is_the_identity_at_strength_zero(op):
    x = _images()
    torch.testing.assert_close(op(x, _cfg(**{"scanner-strength": 0.0}), torch.Generator().manual_seed(1)), x,
                               atol=TOLERANCE, rtol=0.0)


@pytest.mark.parametrize("strength", [1.0, 2.0])
@pytest.mark.parametrize("op,promise", OP_CASES, ids=OP_IDS)
def test_op_keeps_its_value_range_promise(op, promise, strength):
    x, cfg = _images(), _cfg(**{"scanner-strength": strength})
    assert promise(x, op(x, cfg, torch.Generator().manual_seed(3)), cfg)


@pytest.mark.parametrize("coarse", [(4, 5), (7, 9), (13, 24), (20, 24)])
def test_resampling_matrices_match_area_down_then_linear_up(coarse):
    x = _images()[:1]
    rows = resampling_matrices(HEIGHT_PX, torch.tensor([coarse[0]]), x.device)
    cols = resampling_matrices(WIDTH_PX, torch.tensor([coarse[1]]), x.device)
    down = F.interpolate(x, size=coarse, mode="area")
    expected = F.interpolate(down, size=(HEIGHT_PX, WIDTH_PX), mode="bilinear", align_corners=False)
    torch.testing.assert_close(rows @ x @ cols.transpose(-1, -2), expected, atol=TOLERANCE, rtol=0.0)


def test_gaussian_smooth_batched_equals_each_sample_alone_and_keeps_a_constant():
    x = _images()
    sigma = torch.tensor([0.0, 0.3, 0.8, 1.5, 2.5, 0.5])
    batched = gaussian_smooth(x, sigma)
    for i in range(BATCH):
        torch.testing.assert_close(batched[i:i + 1], gaussian_smooth(x[i:i + 1], sigma[i:i + 1]))
    assert torch.equal(batched[:1], x[:1])
    torch.testing.assert_close(gaussian_smooth(torch.full_like(x, 0.3), sigma), torch.full_like(x, 0.3))
    assert (batched.diff(dim=-1).abs().mean(dim=(1, 2, 3))[1:] < x.diff(dim=-1).abs().mean(dim=(1, 2, 3))[1:]).all()


@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.7])
def test_adjust_contrast_is_monai_adjust_contrast(gamma):
    x = _images() * 3.0 - 1.0
    expected = torch.stack([torch.as_tensor(AdjustContrast(gamma)(image)) for image in x])
    torch.testing.assert_close(adjust_contrast(x, torch.full((BATCH,), gamma)), expected)


def test_legendre_polynomials_match_numpy():
    t = torch.linspace(-1.0, 1.0, 11, dtype=torch.float64)
    expected = np.stack([np.polynomial.legendre.legval(t.numpy(), np.eye(BIAS_DEGREE + 1)[k])
                         for k in range(BIAS_DEGREE + 1)])
    np.testing.assert_allclose(_legendre(t, BIAS_DEGREE).numpy(), expected, atol=1e-12)


# ---------------------------------------------------------------------------------------- the entry point

def _augment_batch_at_fff7df1(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """crosssim/augment.py's augment_batch as of commit fff7df1: the oracle for augment = basic."""
    def uniform(n, low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    def chance(n, probability):
        return torch.rand(n, generator=generator) < probability

    n = x.shape[0]
    angle = torch.deg2rad(uniform(n, -cfg.rotate_deg, cfg.rotate_deg))
    scale = 1.0 / uniform(n, 1 - cfg.zoom_fraction, 1 + cfg.zoom_fraction)
    flip = torch.where(chance(n, cfg.flip_probability), -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros(n)], 1),
                         torch.stack([sin * flip, cos, torch.zeros(n)], 1)], 1).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gamma = torch.where(chance(n, 0.5), uniform(n, 1 - cfg.contrast_gamma, 1 + cfg.contrast_gamma), torch.ones(n))
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - low).clamp(min=1e-6)
    x = ((x - low) / span).pow(gamma.view(n, 1, 1, 1).to(x)) * span + low
    shift = torch.where(chance(n, 0.5), uniform(n, -cfg.intensity_shift, cfg.intensity_shift), torch.zeros(n))
    noise_std = torch.where(chance(n, 0.5), torch.full((n,), cfg.noise_std), torch.zeros(n))
    noise = torch.randn(x.shape, generator=generator) * noise_std.view(n, 1, 1, 1)
    return x + shift.view(n, 1, 1, 1).to(x) + noise.to(x)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_basic_is_bit_identical_to_the_augmentation_before_scanner_views(seed):
    x, cfg = _images(seed), _cfg(augment="basic")
    first = torch.Generator().manual_seed(seed)
    expected = torch.Generator().manual_seed(seed)
    for _ in range(2):  # the generator's state after a call is the old one's too
        assert torch.equal(augment_batch(x, cfg, first), _augment_batch_at_fff7df1(x, cfg, expected))


def test_none_returns_the_batch():
    x = _images()
    assert augment_batch(x, _cfg(augment="none"), torch.Generator()) is x




def test_two_scanner_views_of_one_batch_differ_and_a_seed_repeats_them():
    x, cfg = _images(), _cfg(augment="scanner", **NO_GEOMETRY)
    generator = torch.Generator().manual_seed(5)
    first, second = augment_batch(x, cfg, generator), augment_batch(x, cfg, generator)
    assert torch.equal(first, augment_batch(x, cfg, torch.Generator().manual_seed(5)))
    assert (first - second).flatten(1).abs().amax(dim=1).gt(1e-3).sum() >= BATCH - 1
    assert bool(first.isfinite().all() and second.isfinite().all())


@pytest.mark.parametrize("setting", [{"scanner-probability": 0.0}, {"scanner-strength": 0.0}])
def test_scanner_without_geometry_is_the_identity_at_probability_or_strength_zero(setting):
    x = _images()
    out = augment_batch(x, _cfg(augment="scanner", **NO_GEOMETRY, **setting), torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x, atol=TOLERANCE, rtol=0.0)


def test_scanner_probability_one_applies_every_op():
    x, cfg = _images(), _cfg(augment="scanner", **NO_GEOMETRY, **{"scanner-probability": 1.0})
    expected = x
    chain = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.rand(BATCH, generator=chain)  # the geometry's angle, zoom and flip, identity here
    for op in SCANNER_OPS:
        torch.rand(BATCH, generator=chain)  # the op's pick
        expected = op(expected, cfg, chain)
    torch.testing.assert_close(augment_batch(x, cfg, torch.Generator().manual_seed(1)), expected)


# ---------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("old,new", [(True, "basic"), (False, "none"), ("true", "basic"), ("False", "none")])
def test_boolean_augment_of_old_configs_and_checkpoints_still_loads(old, new):
    flat = {**to_flat(CrossSimConfig()), "augment": old}
    assert apply_overrides(CrossSimConfig(), flat).augment.augment == new


@pytest.mark.parametrize("key,value", [("augment", "heavy"), ("scanner-noise-std", -0.1), ("scanner-strength", -1.0),
                                       ("scanner-probability", 1.5), ("flip-probability", -0.1),
                                       ("scanner-low-resolution", 1.0)])
def test_bad_augment_values_are_rejected_by_key(key, value):
    with pytest.raises(ConfigError, match=key):
        apply_overrides(CrossSimConfig(), {key: value})

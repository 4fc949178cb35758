"""Synthetic hospitals: chest radiographs with four shape-defined classes, written as real DICOM files.

Every site follows the data contract (a folder of DICOM files in site-specific nesting, plus
``labels.csv`` for labeled sources); the target's ground truth lies next to it as
``OUT/<target>_labels.csv``. Scanner profiles (matrix, bit depth, rescale, photometric, contrast
curve, noise, blur, bias field, class prevalence) come from ``configs/synth/<preset>.toml``.

Anatomy is drawn in millimetres in a patient frame (x to the image right, y down, origin near the
chest centre), so one description serves every matrix and pixel spacing. Classes differ only in the
shape of an added opacity: none, a small round nodule, a large lobulated mass, or a pleural effusion
(fluid filling the bottom of one lung with a meniscus). Lesion contrast has one distribution for all
classes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from crosssim.config import CONFIGS_DIR
from crosssim.data.sites import LABELS_FILENAME, write_labels_csv

CLASSES = ("normal", "nodule", "mass", "effusion")
SYNTH_CONFIGS_DIR = CONFIGS_DIR / "synth"
MARKER_NAME = ".crosssim-synth"  # marks a folder this module may wipe and regenerate
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://crosssim.invalid/synth/v1")  # UUIDs of synth UIDs
SOP_CLASS_UIDS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
PRESET_KEYS = {"images-per-site", "image-size", "site"}  # top level of a preset, after `extends`
SCALAR_TYPES = {"str": str, "int": int, "float": float}  # SiteProfile field annotation -> TOML value coercion
BASE_STUDY_DATE = date(2024, 1, 1)
STUDY_DATE_SPAN_DAYS = 365
STUDIES_PER_PATIENT = 2
LABEL_STREAM = 2**32 - 1  # rng stream id for a site's label order (image streams use 0..n-1)
RENDER_MAX_SIDE_PX = 128  # the smooth part of an image is drawn at most this large, then resized
EDGE_SOFTNESS_MM = 2.5  # width of the smooth boundary of every drawn structure

# Anatomy of the standard patient, mm (before per-image jitter).
BODY_HALF_WIDTH_MM = 165.0
BODY_HALF_HEIGHT_MM = 260.0
LUNG_OFFSET_X_MM = 75.0  # lung centre from the midline
LUNG_CENTER_Y_MM = -15.0
LUNG_HALF_WIDTH_MM = 58.0
LUNG_HALF_HEIGHT_MM = 125.0
MEDIASTINUM_HALF_WIDTH_MM = 28.0
LUNG_BASE_WIDENING = 0.2  # lung half-width grows by this fraction from mid-height to base
LUNG_EXPONENT = 2.4  # superellipse exponent of the lung outline (2: ellipse)
HEART_CENTER_MM = (22.0, 70.0)  # (x, y): patient's left shows on the image right in a PA view
HEART_HALF_AXES_MM = (66.0, 50.0)
RIB_PERIOD_MM = (26.0, 32.0)  # spacing between rib arcs, uniform range
RIB_WIDTH_FRACTION = 0.3  # of the period
RIB_CURVATURE_PER_MM = (0.005, 0.009)  # arcs drop by curvature * (distance from the spine)²
RIB_MARGIN_MM = 12.0  # ribs show over the lungs and this far around them

# Per-image jitter, uniform ranges.
SHIFT_MM = 18.0
ROTATION_DEG = 6.0
PATIENT_SCALE = (0.9, 1.1)
LUNG_SIZE_JITTER = 0.08  # relative, per lung
LUNG_OFFSET_JITTER = 0.05  # relative, of the lung centre's distance from the midline
LUNG_SHIFT_Y_MM = 8.0

# Attenuation units: full soft-tissue thickness of the body is 1.
LUNG_AIR_ATTENUATION = 0.6
RIB_ATTENUATION = 0.08
LESION_ATTENUATION = (0.3, 0.55)  # peak added by any lesion, same for every class
LUNG_TEXTURE_ATTENUATION = 0.04  # std of the vessel-like mottling over the lungs (present in every class)
LUNG_TEXTURE_GRAIN_MM = 4.0  # its correlation length
MAX_ATTENUATION = 1.35  # displayed as full white

# Lesion geometry.
NODULE_RADIUS_MM = (10.0, 16.0)
MASS_RADIUS_MM = (18.0, 38.0)
MASS_LOBULATION = 0.15  # max amplitude of each angular harmonic of the mass outline
MASS_HARMONICS = (2, 3, 4, 5)
LESION_MAX_LUNG_RADIUS = 0.6  # lesion centre within this fraction of the lung half-axes
EFFUSION_FILL_FRACTION = (0.15, 0.45)  # of lung height
EFFUSION_MENISCUS = (0.1, 0.3)  # rise of the fluid edge at the lateral wall, lung half-heights
BIAS_WAVES = 3  # cosine waves summed into the bias field, each below one cycle per image


@dataclass(frozen=True)
class SiteProfile:
    """One scanner/site of a preset (keys in the TOML are the kebab-case field names)."""

    name: str
    role: str
    manufacturer: str
    model: str
    institution: str
    modality: str
    view_position: str
    bits_stored: int
    pixel_representation: int
    rescale_slope: float
    rescale_intercept: float
    value_range: tuple[float, float]
    photometric: str
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]
    gamma: float
    sigmoid_gain: float
    sigmoid_center: float
    noise_std: float
    blur_mm: float
    bias_strength: float
    prevalence: tuple[float, ...]
    layout: str

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest stored pixel value that BitsStored/PixelRepresentation allow."""
        if self.pixel_representation:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1


@dataclass(frozen=True)
class SynthSummary:
    """What ``generate_hospitals`` wrote."""

    out_dir: Path
    source_sites: list[Path]
    target_site: Path
    target_labels: Path
    counts: dict[str, dict[str, int]]  # site name -> class -> images


def available_presets() -> list[str]:
    return sorted(p.stem for p in SYNTH_CONFIGS_DIR.glob("*.toml"))


def _preset_path(preset: str | Path) -> Path:
    path = Path(preset)
    if path.suffix == ".toml" or len(path.parts) > 1:
        if not path.is_file():
            raise ValueError(f"synth preset file {path} not found")
        return path
    path = SYNTH_CONFIGS_DIR / f"{preset}.toml"
    if not path.is_file():
        raise ValueError(f"unknown synth preset '{preset}' (available: {', '.join(available_presets())})")
    return path


def _load_preset_doc(preset: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The preset's TOML with ``extends`` resolved: top-level keys replaced, sites merged by name."""
    path = _preset_path(preset).resolve()
    if path in seen:
        raise ValueError(f"synth preset {path} extends itself")
    doc = tomllib.loads(path.read_text())
    parent_name = doc.pop("extends", None)
    if parent_name is None:
        return doc
    parent = _load_preset_doc(parent_name, (*seen, path))
    sites = {site.get("name"): dict(site) for site in parent.pop("site", [])}
    for site in doc.pop("site", []):
        if "name" not in site:
            raise ValueError(f"synth preset {path}: a [[site]] that extends another needs its name")
        sites.setdefault(site["name"], {}).update(site)
    return {**parent, **doc, "site": list(sites.values())}


def _site_from_table(table: Mapping[str, Any]) -> SiteProfile:
    """Parse one ``[[site]]`` table: exact keys, scalar types coerced, prevalence normalized."""
    types = {f.name: f.type for f in fields(SiteProfile)}
    given = {key.replace("-", "_"): value for key, value in table.items()}
    label = table.get("name", "?")
    unknown, missing = sorted(given.keys() - types.keys()), sorted(types.keys() - given.keys())
    if unknown or missing:
        raise ValueError(f"synth site '{label}': unknown keys {unknown}, missing keys {missing}")
    prevalence = given["prevalence"]
    if (not isinstance(prevalence, Mapping) or sorted(prevalence) != sorted(CLASSES)
            or min(prevalence.values()) < 0 or sum(prevalence.values()) <= 0):
        raise ValueError(f"synth site '{label}': prevalence needs non-negative fractions for {list(CLASSES)}")
    given["prevalence"] = tuple(prevalence[c] / sum(prevalence.values()) for c in CLASSES)
    try:
        for name, kind in types.items():
            if kind in SCALAR_TYPES:
                given[name] = SCALAR_TYPES[kind](given[name])
        given["value_range"] = tuple(float(v) for v in given["value_range"])
        given["pixel_spacing_mm"] = tuple(float(v) for v in given["pixel_spacing_mm"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"synth site '{label}': {exc}") from None
    if len(given["value_range"]) != 2 or len(given["pixel_spacing_mm"]) != 2:
        raise ValueError(f"synth site '{label}': value-range and pixel-spacing-mm take two numbers")
    site = SiteProfile(**given)
    _validate_site(site)
    return site


def _validate_site(site: SiteProfile) -> None:
    problems = []
    if site.role not in ("source", "target"):
        problems.append(f"role {site.role!r} is not source or target")
    if site.modality not in SOP_CLASS_UIDS:
        problems.append(f"modality {site.modality!r} is not one of {sorted(SOP_CLASS_UIDS)}")
    if site.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        problems.append(f"photometric {site.photometric!r} is not MONOCHROME1 or MONOCHROME2")
    if site.bits_stored not in (10, 12, 14, 16) or site.pixel_representation not in (0, 1):
        problems.append("bits-stored must be 10/12/14/16 and pixel-representation 0/1")
    if site.rescale_slope <= 0:
        problems.append("rescale-slope must be positive")
    low, high = (np.asarray(site.value_range) - site.rescale_intercept) / site.rescale_slope
    stored_min, stored_max = site.stored_range
    if not stored_min <= low < high <= stored_max:
        problems.append(f"value-range {list(site.value_range)} does not fit stored values "
                        f"[{stored_min}, {stored_max}]")
    if "{image" not in site.layout and "{uid" not in site.layout:
        problems.append("layout needs {image} or {uid} so file paths are unique")
    if problems:
        raise ValueError(f"synth site '{site.name}': " + "; ".join(problems))


def load_preset(preset: str | Path = "default") -> tuple[list[SiteProfile], int, int]:
    """Sites, images per site and image size (0: native matrix) of a preset name or TOML path."""
    doc = _load_preset_doc(preset)
    if doc.keys() != PRESET_KEYS:
        raise ValueError(f"synth preset '{preset}' needs exactly the top-level keys {sorted(PRESET_KEYS)}, "
                         f"has {sorted(doc)}")
    sites = [_site_from_table(table) for table in doc["site"]]
    targets = [site for site in sites if site.role == "target"]
    if len(targets) != 1 or len(sites) < 2:
        raise ValueError(f"synth preset '{preset}' needs one target site and at least one source site")
    if len({site.name for site in sites}) != len(sites):
        raise ValueError(f"synth preset '{preset}' has two sites with the same name")
    return sites, int(doc["images-per-site"]), int(doc["image-size"])


def scale_matrix(site: SiteProfile, image_size: int) -> SiteProfile:
    """The site with its longer side scaled to ``image_size`` pixels; same field of view in mm."""
    if image_size <= 0:
        return site
    factor = image_size / max(site.rows, site.columns)
    rows, columns = max(1, round(site.rows * factor)), max(1, round(site.columns * factor))
    spacing = (site.pixel_spacing_mm[0] * site.rows / rows, site.pixel_spacing_mm[1] * site.columns / columns)
    return replace(site, rows=rows, columns=columns, pixel_spacing_mm=spacing)


def class_counts(prevalence: tuple[float, ...], n: int) -> list[int]:
    """Images per class for ``n`` images (largest remainder, ties to the earlier class)."""
    exact = np.asarray(prevalence) * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    return counts.tolist()


# ---------------------------------------------------------------- rendering


def _smooth_inside(distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, with a logistic edge of ``softness``."""
    return 0.5 * (1.0 - np.tanh(distance / (2.0 * softness)))


def _ellipse(x: np.ndarray, y: np.ndarray, center: tuple[float, float], half_axes: tuple[float, float],
             exponent: float = 2.0) -> np.ndarray:
    """Soft (super)ellipse mask; ``exponent`` > 2 makes it boxier."""
    r = np.abs((x - center[0]) / half_axes[0]) ** exponent + np.abs((y - center[1]) / half_axes[1]) ** exponent
    return _smooth_inside((r ** (1.0 / exponent) - 1.0) * min(half_axes), EDGE_SOFTNESS_MM)


def _sphere(distance_ratio: np.ndarray) -> np.ndarray:
    """Projected thickness of a ball: 1 at the centre, 0 at the rim."""
    return np.sqrt(np.clip(1.0 - distance_ratio**2, 0.0, None))


@dataclass(frozen=True)
class _Lung:
    """One lung field in the patient frame, mm; ``side`` -1 on the image left, +1 on the right."""

    side: int
    center_x: float
    center_y: float
    half_width: float  # at mid-height; the base is wider, the apex narrower
    half_height: float

    def mask(self, x: np.ndarray, y: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
        """Soft mask of the lung grown by ``margin_mm``."""
        height = np.clip((y - self.center_y) / self.half_height, -1.0, 1.0)  # -1 apex, +1 base
        u = (x - self.center_x) / (self.half_width * (1.0 + LUNG_BASE_WIDENING * height) + margin_mm)
        v = (y - self.center_y) / (self.half_height + margin_mm)
        r = np.abs(u) ** LUNG_EXPONENT + np.abs(v) ** LUNG_EXPONENT
        return _smooth_inside((r ** (1.0 / LUNG_EXPONENT) - 1.0) * self.half_width, EDGE_SOFTNESS_MM)


def _random_lung(rng: np.random.Generator, side: int) -> _Lung:
    size = 1.0 + rng.uniform(-LUNG_SIZE_JITTER, LUNG_SIZE_JITTER, 2)
    center_x = side * LUNG_OFFSET_X_MM * (1.0 + rng.uniform(-LUNG_OFFSET_JITTER, LUNG_OFFSET_JITTER))
    center_y = LUNG_CENTER_Y_MM + rng.uniform(-LUNG_SHIFT_Y_MM, LUNG_SHIFT_Y_MM)
    return _Lung(side, center_x, center_y, LUNG_HALF_WIDTH_MM * size[0], LUNG_HALF_HEIGHT_MM * size[1])


def _point_in_lung(rng: np.random.Generator, lung: _Lung) -> tuple[float, float]:
    radius, angle = LESION_MAX_LUNG_RADIUS * np.sqrt(rng.uniform()), rng.uniform(0.0, 2.0 * np.pi)
    return (lung.center_x + lung.half_width * radius * np.cos(angle),
            lung.center_y + lung.half_height * radius * np.sin(angle))


def _nodule(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, lung: _Lung) -> np.ndarray:
    """Small round opacity."""
    cx, cy = _point_in_lung(rng, lung)
    return _sphere(np.hypot(x - cx, y - cy) / rng.uniform(*NODULE_RADIUS_MM))


def _mass(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, lung: _Lung) -> np.ndarray:
    """Large opacity with a lobulated outline."""
    cx, cy = _point_in_lung(rng, lung)
    angle = np.arctan2(y - cy, x - cx)
    outline = np.ones_like(angle)
    for harmonic in MASS_HARMONICS:
        outline += rng.uniform(0.0, MASS_LOBULATION) * np.cos(harmonic * angle + rng.uniform(0.0, 2.0 * np.pi))
    return _sphere(np.hypot(x - cx, y - cy) / (rng.uniform(*MASS_RADIUS_MM) * outline))


def _effusion(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, lung: _Lung) -> np.ndarray:
    """Fluid in the bottom of the lung, its surface (meniscus) rising towards the lateral chest wall."""
    level = lung.center_y + lung.half_height * (1.0 - 2.0 * rng.uniform(*EFFUSION_FILL_FRACTION))
    lateral = np.clip(((x - lung.center_x) * lung.side / lung.half_width + 1.0) / 2.0, 0.0, 1.0)  # 0 medial edge
    surface = level - lung.half_height * rng.uniform(*EFFUSION_MENISCUS) * lateral**2
    return _smooth_inside(surface - y, EDGE_SOFTNESS_MM) * lung.mask(x, y)


def _lesion(label: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, lungs: list[_Lung]) -> np.ndarray:
    """Opacity (0..1, before masking to the lung field) that makes ``label`` in one random lung; 0 for normal."""
    lung = lungs[int(rng.integers(len(lungs)))]
    if label == "nodule":
        return _nodule(x, y, rng, lung)
    if label == "mass":
        return _mass(x, y, rng, lung)
    if label == "effusion":
        return _effusion(x, y, rng, lung)
    return np.zeros_like(x)


def _patient_grid(shape: tuple[int, int], spacing_mm: tuple[float, float],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in the jittered patient frame (mm): shifted, rotated and scaled per image."""
    rows, columns = shape
    y_mm = (np.arange(rows) - (rows - 1) / 2.0)[:, None] * spacing_mm[0] - rng.uniform(-SHIFT_MM, SHIFT_MM)
    x_mm = (np.arange(columns) - (columns - 1) / 2.0)[None, :] * spacing_mm[1] - rng.uniform(-SHIFT_MM, SHIFT_MM)
    theta = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG))
    scale = rng.uniform(*PATIENT_SCALE)
    x = (np.cos(theta) * x_mm + np.sin(theta) * y_mm) / scale
    y = (-np.sin(theta) * x_mm + np.cos(theta) * y_mm) / scale
    return x, y


def _ribs(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bands (0..1) along arcs that drop with the distance from the spine."""
    period, curvature = rng.uniform(*RIB_PERIOD_MM), rng.uniform(*RIB_CURVATURE_PER_MM)
    phase = (y - curvature * (np.abs(x) - MEDIASTINUM_HALF_WIDTH_MM) ** 2) / period + rng.uniform()
    distance_to_arc = np.abs(phase - np.floor(phase) - 0.5) * period
    return _smooth_inside(distance_to_arc - RIB_WIDTH_FRACTION * period / 2.0, EDGE_SOFTNESS_MM / 2.0)


def _lung_texture(shape: tuple[int, int], spacing_mm: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Smoothed white noise with std ``LUNG_TEXTURE_ATTENUATION``: vessel shadows that mimic small nodules."""
    grain = _gaussian_blur(rng.standard_normal(shape), tuple(LUNG_TEXTURE_GRAIN_MM / s for s in spacing_mm))
    return LUNG_TEXTURE_ATTENUATION * grain / max(float(grain.std()), 1e-6)


def render_attenuation(label: str, shape: tuple[int, int], spacing_mm: tuple[float, float],
                       rng: np.random.Generator) -> np.ndarray:
    """Chest attenuation map (body ≈ 1) of one image with a ``label`` finding, float32 (rows, columns)."""
    x, y = _patient_grid(shape, spacing_mm, rng)
    body_profile = 0.4 + 0.6 * _sphere(np.clip(x / BODY_HALF_WIDTH_MM, -1.0, 1.0))
    body = _ellipse(x, y, (0.0, 0.0), (BODY_HALF_WIDTH_MM, BODY_HALF_HEIGHT_MM), exponent=4.0) * body_profile
    lungs = [_random_lung(rng, side) for side in (-1, 1)]
    outside_lungs = (1.0 - _ellipse(x, y, HEART_CENTER_MM, HEART_HALF_AXES_MM)) * (
        1.0 - _smooth_inside(np.abs(x) - MEDIASTINUM_HALF_WIDTH_MM, EDGE_SOFTNESS_MM))  # heart, mediastinum
    lung_field = sum(lung.mask(x, y) for lung in lungs) * outside_lungs
    rib_region = sum(lung.mask(x, y, RIB_MARGIN_MM) for lung in lungs)
    lesion = _lesion(label, x, y, rng, lungs) * lung_field * rng.uniform(*LESION_ATTENUATION)  # fills air
    texture = _lung_texture(shape, spacing_mm, rng) * lung_field
    attenuation = (body - LUNG_AIR_ATTENUATION * lung_field + RIB_ATTENUATION * _ribs(x, y, rng) * rib_region
                   + texture + lesion)
    return attenuation.astype(np.float32)


def _linear_resize_axis(image: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` to ``size`` samples, pixel centres aligned."""
    n_in = image.shape[axis]
    position = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
    low = np.floor(position).astype(int)
    weight = (position - low).astype(np.float32)
    weight = weight[:, None] if axis == 0 else weight[None, :]
    low_values = np.take(image, low, axis=axis)
    return low_values + weight * (np.take(image, np.minimum(low + 1, n_in - 1), axis=axis) - low_values)


def _resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float32 image (separable, no BLAS)."""
    return _linear_resize_axis(_linear_resize_axis(image, shape[0], 0), shape[1], 1)


def _contrast_curve(image: np.ndarray, site: SiteProfile) -> np.ndarray:
    """Site display curve on [0, 1]: gamma, then a sigmoid rescaled to keep 0 → 0 and 1 → 1."""
    out = np.clip(image, 0.0, 1.0) ** site.gamma
    if site.sigmoid_gain > 0:
        def sigmoid(v):
            return 1.0 / (1.0 + np.exp(-site.sigmoid_gain * (v - site.sigmoid_center)))
        low, high = sigmoid(0.0), sigmoid(1.0)
        out = (sigmoid(out) - low) / (high - low)
    return out


def _bias_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth field in [-1, 1]: a few cosine waves of less than one cycle across the image."""
    v = np.linspace(-0.5, 0.5, shape[0])[:, None]
    u = np.linspace(-0.5, 0.5, shape[1])[None, :]
    field = sum(np.cos(2 * np.pi * (rng.uniform(-1, 1) * u + rng.uniform(-1, 1) * v) + rng.uniform(0, 2 * np.pi))
                for _ in range(BIAS_WAVES))
    return field / BIAS_WAVES


def _gaussian_blur(image: np.ndarray, sigma_px: tuple[float, float]) -> np.ndarray:
    """Gaussian blur by multiplying the spectrum (periodic edges; the borders are background)."""
    if max(sigma_px) < 0.1:
        return image
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.rfftfreq(image.shape[1])[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * ((sigma_px[0] * fy) ** 2 + (sigma_px[1] * fx) ** 2))
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape)


def render_site_image(site: SiteProfile, label: str, rng: np.random.Generator) -> np.ndarray:
    """One image as the site stores it: int16/uint16 (rows, columns) within BitsStored.

    The smooth part (anatomy, contrast curve, bias field, blur) is drawn at most
    ``RENDER_MAX_SIDE_PX`` a side and resized; the noise is added at the full matrix.
    """
    shape = (site.rows, site.columns)
    factor = min(1.0, RENDER_MAX_SIDE_PX / max(shape))
    draw_shape = (max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor)))
    spacing = tuple(s * n / d for s, n, d in zip(site.pixel_spacing_mm, shape, draw_shape))
    display = _contrast_curve(render_attenuation(label, draw_shape, spacing, rng) / MAX_ATTENUATION, site)
    display = display + site.bias_strength * _bias_field(draw_shape, rng)
    display = _gaussian_blur(display, (site.blur_mm / spacing[0], site.blur_mm / spacing[1]))
    display = _resize_bilinear(display.astype(np.float32), shape)
    display = np.clip(display + site.noise_std * rng.standard_normal(shape, dtype=np.float32), 0.0, 1.0)
    if site.photometric == "MONOCHROME1":
        display = 1.0 - display
    low, high = site.value_range
    value = low + display * (high - low)  # modality values; stored = inverse of the modality LUT
    stored = np.rint((value - site.rescale_intercept) / site.rescale_slope)
    stored = np.clip(stored, *site.stored_range)
    return stored.astype(np.int16 if site.pixel_representation else np.uint16)


# ---------------------------------------------------------------- DICOM


def _uid(seed: int, site_key: str, kind: str, number: int) -> UID:
    """Deterministic UID under the 2.25 root from a name-based (v5) UUID.

    Not ``generate_uid(prefix=None, entropy_srcs=...)``: pydicom 3 ignores the entropy when the prefix is None.
    """
    name = "|".join((str(seed), site_key, kind, str(number)))
    return UID(f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}")


def _site_key(site: SiteProfile, n_images: int) -> str:
    """Hash of everything that changes a site's images: new images get new UIDs."""
    profile = {f.name: getattr(site, f.name) for f in fields(site)}
    return hashlib.sha256(json.dumps([profile, n_images], sort_keys=True).encode()).hexdigest()[:16]


def _patient_id(site: SiteProfile, patient: int) -> str:
    return f"SYN{zlib.crc32(site.name.encode()) % 10**4:04d}-{patient:05d}"


def new_part10_dataset(sop_class: str, sop_uid: str, image_type: list[str]) -> Dataset:
    """An empty DICOM Part 10 dataset: file meta (Explicit VR Little Endian), preamble, SOP identity."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = image_type
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    return ds


def build_dataset(site: SiteProfile, pixels: np.ndarray, index: int, seed: int, site_key: str,
                  study_day: int) -> Dataset:
    """A DICOM Part 10 dataset (Explicit VR Little Endian) for image ``index`` of ``site``."""
    patient, study = divmod(index, STUDIES_PER_PATIENT)
    sop_class = SOP_CLASS_UIDS[site.modality]
    sop_uid = _uid(seed, site_key, "sop", index)

    ds = new_part10_dataset(sop_class, sop_uid, ["ORIGINAL", "PRIMARY"])
    ds.StudyInstanceUID = _uid(seed, site_key, "study", index)
    ds.SeriesInstanceUID = _uid(seed, site_key, "series", index)
    study_date = BASE_STUDY_DATE + timedelta(days=study_day)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
    ds.StudyID = str(study + 1)
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = site.modality
    ds.Manufacturer = site.manufacturer
    ds.ManufacturerModelName = site.model
    ds.InstitutionName = site.institution
    ds.PatientName = ""  # type 2, left empty: synthetic patients are known only by the PatientID pseudonym
    ds.PatientID = _patient_id(site, patient)
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = site.view_position
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PixelSpacing = ds.ImagerPixelSpacing = [f"{v:.6g}" for v in site.pixel_spacing_mm]
    ds.RescaleSlope = f"{site.rescale_slope:.6g}"
    ds.RescaleIntercept = f"{site.rescale_intercept:.6g}"
    ds.RescaleType = "US"
    ds.BurnedInAnnotation = "NO"
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.set_pixel_data(pixels, site.photometric, site.bits_stored, generate_instance_uid=False)
    return ds


# ---------------------------------------------------------------- sites and output folder


def _prepare_out_dir(out_dir: Path, marker: str) -> None:
    """Empty ``out_dir`` if synth made it; refuse a non-empty folder that synth did not make."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER_NAME).is_file():
            raise FileExistsError(
                f"{out_dir} is not empty and was not made by crosssim synth (no {MARKER_NAME}); "
                "choose an empty or new folder")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER_NAME).write_text(marker)


def site_labels(site: SiteProfile, n_images: int, seed: int) -> list[str]:
    """Class of each image index: profile prevalence, order shuffled per (seed, site)."""
    labels = np.repeat(np.arange(len(CLASSES)), class_counts(site.prevalence, n_images))
    rng = np.random.default_rng([seed, zlib.crc32(site.name.encode()), LABEL_STREAM])
    return [CLASSES[i] for i in rng.permutation(labels)]


def write_site(site: SiteProfile, site_dir: Path, n_images: int, seed: int) -> list[tuple[str, str]]:
    """Render and write every image of ``site``; returns (relative path, label) rows."""
    site_key = _site_key(site, n_images)
    rows: list[tuple[str, str]] = []
    for index, label in enumerate(site_labels(site, n_images, seed)):
        rng = np.random.default_rng([seed, zlib.crc32(site.name.encode()), index])
        pixels = render_site_image(site, label, rng)
        ds = build_dataset(site, pixels, index, seed, site_key, int(rng.integers(STUDY_DATE_SPAN_DAYS)))
        patient, study = divmod(index, STUDIES_PER_PATIENT)
        relative = site.layout.format(patient=patient, study=study + 1, image=index, uid=ds.SOPInstanceUID)
        path = site_dir / relative
        if path.exists():
            raise ValueError(f"synth site '{site.name}': layout {site.layout!r} gives {relative} twice")
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        rows.append((Path(relative).as_posix(), label))
    return rows


def _describe(site: SiteProfile, native: SiteProfile, n_images: int) -> str:
    return (f"{site.name}: {n_images} images ({site.modality}, {site.photometric}, {site.bits_stored}-bit, "
            f"{native.rows}x{native.columns} → {site.rows}x{site.columns}, "
            f"{site.pixel_spacing_mm[0]:.3g} mm)")


def generate_hospitals(out_dir: str | Path, preset: str = "default", seed: int = 0,
                       images_per_site: int | None = None, image_size: int | None = None,
                       progress: Callable[[str], None] | None = None) -> SynthSummary:
    """Write the preset's synthetic hospitals under ``out_dir`` (see the module docstring)."""
    native_sites, default_count, default_size = load_preset(preset)
    n_images = default_count if images_per_site is None else images_per_site
    size = default_size if image_size is None else image_size
    if n_images < 1 or size < 0:
        raise ValueError(f"images_per_site must be at least 1 and image_size at least 0, got {n_images}, {size}")
    out_dir = Path(out_dir)
    marker = json.dumps({"preset": str(preset), "seed": seed, "images_per_site": n_images, "image_size": size})
    _prepare_out_dir(out_dir, marker + "\n")

    counts: dict[str, dict[str, int]] = {}
    sources: list[Path] = []
    for native in native_sites:
        site = scale_matrix(native, size)
        site_dir = out_dir / site.name
        rows = write_site(site, site_dir, n_images, seed)
        counts[site.name] = {c: sum(label == c for _, label in rows) for c in CLASSES}
        if site.role == "source":
            write_labels_csv(site_dir / LABELS_FILENAME, rows)
            sources.append(site_dir)
        else:
            target, target_labels = site_dir, out_dir / f"{site.name}_labels.csv"
            write_labels_csv(target_labels, rows)
        if progress is not None:
            progress(_describe(site, native, n_images))
    return SynthSummary(out_dir=out_dir, source_sites=sources, target_site=target,
                        target_labels=target_labels, counts=counts)

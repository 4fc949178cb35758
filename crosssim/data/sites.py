"""A site: a read-only folder of DICOM files plus, for labeled sites, ``labels.csv`` (``path,label``)."""

from __future__ import annotations

import csv
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from crosssim.config import CrossSimConfig, DataConfig
from crosssim.data.cache import CachedEntry, FileStamp, SiteCache, default_cache_dir
from crosssim.data.files import iter_candidate_files

LABELS_FILENAME = "labels.csv"
PROGRESS_EVERY_FILES = 200

Progress = Callable[[str], None] | None


class SiteError(ValueError):
    """A site that cannot be used at all (missing folder, bad labels.csv, no readable image)."""


@dataclass
class SkippedRecord:
    path: str
    kind: str  # no-image | refused
    reason: str


@dataclass
class DataReport:
    """What loading a site found: files read, skipped with reasons, class counts, timing."""

    site: str
    folder: str
    files_seen: int = 0
    images_loaded: int = 0
    from_cache: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    unlabeled_images: int = 0
    labels_without_image: list[str] = field(default_factory=list)
    load_seconds: float = 0.0

    def summary(self) -> str:
        line = (f"{self.site}: {self.images_loaded} images from {self.files_seen} files "
                f"({self.from_cache} cached) in {self.load_seconds:.1f}s")
        if self.class_counts:
            line += " | " + ", ".join(f"{k}={v}" for k, v in self.class_counts.items())
        if self.skipped:
            line += f" | skipped {len(self.skipped)}"
        if self.unlabeled_images:
            line += f" | {self.unlabeled_images} image(s) without a label, not used"
        if self.labels_without_image:
            line += f" | {len(self.labels_without_image)} label(s) without an image"
        return line

    def skipped_lines(self) -> list[str]:
        return [f"  skipped {s.path}: {s.reason}" for s in self.skipped]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SiteData:
    """Preprocessed images of one site, in memory: ``images`` (N, 1, S, S), ``labels`` (N,) or None."""

    name: str
    folder: Path
    paths: list[str]
    images: torch.Tensor
    labels: torch.Tensor | None
    classes: tuple[str, ...]
    report: DataReport

    def __len__(self) -> int:
        return len(self.paths)

    def split(self, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stratified (train, val) index split, deterministic for a seed."""
        generator = torch.Generator().manual_seed(seed)
        groups = [torch.arange(len(self))] if self.labels is None else \
            [torch.nonzero(self.labels == c).flatten() for c in range(len(self.classes))]
        train, val = [], []
        for idx in groups:
            idx = idx[torch.randperm(len(idx), generator=generator)]
            n_val = int(round(len(idx) * val_fraction))
            val.append(idx[:n_val])
            train.append(idx[n_val:])
        return torch.cat(train).sort().values, torch.cat(val).sort().values


def read_labels_csv(path: Path) -> dict[str, str]:
    """``path,label`` rows → {relative path: label}; a malformed file is one clear SiteError."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
                raise SiteError(f"{path}: header must be 'path,label' (found {reader.fieldnames})")
            labels: dict[str, str] = {}
            for line_number, row in enumerate(reader, start=2):
                rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not rel or not label:
                    raise SiteError(f"{path}:{line_number}: empty path or label")
                labels[Path(rel).as_posix()] = label
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteError(f"{path}: cannot read labels ({exc})") from None
    return labels


def write_labels_csv(path: Path, rows: Iterable[tuple[str, str]]) -> Path:
    """Write ``(relative path, label)`` rows as a ``path,label`` CSV: the one writer of the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def site_labels_path(folder: Path) -> Path | None:
    path = Path(folder) / LABELS_FILENAME
    return path if path.is_file() else None


def labels_file_of(folder: str | Path) -> Path:
    """``folder/labels.csv`` of a labeled site; a clear SiteError when the folder or the file is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SiteError(f"{folder}: site folder not found")
    labels_file = site_labels_path(folder)
    if labels_file is None:
        raise SiteError(f"{folder}: a labeled site needs {LABELS_FILENAME} (header 'path,label')")
    return labels_file


def union_of_labels(site_dirs: Sequence[str | Path]) -> tuple[str, ...]:
    """Sorted union of the labels in every site's ``labels.csv`` (classes when the config sets none)."""
    labels: set[str] = set()
    for folder in site_dirs:
        labels.update(read_labels_csv(labels_file_of(folder)).values())
    return tuple(sorted(labels))


def with_site_classes(cfg: CrossSimConfig, site_dirs: Sequence[str | Path],
                      progress: Progress = None) -> CrossSimConfig:
    """``cfg`` with its classes set: the config's own, else the sorted union of the sites' labels (printed).

    Only for runs on one machine (train, simulate), where reading every site's labels crosses no boundary.
    """
    if cfg.data.classes:
        return cfg
    classes = union_of_labels(site_dirs)
    if progress:
        progress(f"classes (sorted union of the sites' labels; set 'classes' to fix them): {', '.join(classes)}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=classes))


def resolve_classes(cfg: DataConfig, label_values: Sequence[str]) -> tuple[str, ...]:
    """Classes from the config, else the sorted union of labels seen."""
    return tuple(cfg.classes) if cfg.classes else tuple(sorted(set(label_values)))


def check_known_labels(labels_file: Path, labels_by_path: dict[str, str], classes: Sequence[str]) -> None:
    """A labels file with labels outside ``classes`` is one clear SiteError: never train on a reduced set."""
    unknown = Counter(label for label in labels_by_path.values() if label not in set(classes))
    if unknown:
        listed = ", ".join(f"{label!r} ×{n}" for label, n in sorted(unknown.items()))
        raise SiteError(f"{labels_file}: {sum(unknown.values())} label(s) outside the classes {list(classes)}: "
                        f"{listed} (add them to 'classes' or fix the file)")


def _load_entry(path: Path, rel: str, cfg: DataConfig, cache: SiteCache) -> tuple[CachedEntry, bool]:
    """Return (entry, came_from_cache) for one file, decoding it only on a cache miss."""
    stamp = FileStamp.of(path)
    cached = cache.get(rel, stamp)
    if cached is not None:
        return cached, True
    # Imported on a miss only: pydicom takes 0.5 s of every ClientApp process, and a cached site never decodes.
    from crosssim.data.dicom import SkippedFile, read_image

    try:
        entry = CachedEntry(stamp, torch.from_numpy(read_image(path, cfg)))
    except SkippedFile as skip:
        entry = CachedEntry(stamp, None, skip.kind, skip.reason)
    cache.put(rel, entry)
    return entry, False


def load_site(folder: str | Path, cfg: DataConfig, *, labels_csv: str | Path | None = None,
              labeled: bool | None = None, classes: Sequence[str] | None = None,
              cache_dir: str | Path | None = None, name: str | None = None,
              progress: Progress = None) -> SiteData:
    """Read every image of a site through the hospital-side cache.

    ``labeled``: None = labeled when a labels file is present. A labeled site keeps only the images that
    have a label of a known class; files that fail are skipped and listed in the site's report.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SiteError(f"{folder}: site folder not found")
    labels_file = Path(labels_csv) if labels_csv else site_labels_path(folder)
    if labeled is None:
        labeled = labels_file is not None
    if labeled and (labels_file is None or not labels_file.is_file()):
        raise SiteError(f"{folder}: labeled site needs {LABELS_FILENAME} (header 'path,label')")
    labels_by_path = read_labels_csv(labels_file) if labeled else {}
    site_classes = tuple(classes) if classes else resolve_classes(cfg, list(labels_by_path.values()))
    if labeled:
        check_known_labels(labels_file, labels_by_path, site_classes)
    report = DataReport(site=name or folder.name, folder=str(folder))
    started = time.perf_counter()

    cache = SiteCache.open(Path(cache_dir) if cache_dir else default_cache_dir(cfg), folder, cfg)
    files = iter_candidate_files(folder)
    report.files_seen = len(files)
    kept_paths: list[str] = []
    kept_images: list[torch.Tensor] = []
    for i, path in enumerate(files, start=1):
        rel = path.relative_to(folder).as_posix()
        entry, hit = _load_entry(path, rel, cfg, cache)
        report.from_cache += hit
        if entry.image is None:
            report.skipped.append(SkippedRecord(rel, entry.skip_kind, entry.skip_reason))
        else:
            kept_paths.append(rel)
            kept_images.append(entry.image)
        if progress and i % PROGRESS_EVERY_FILES == 0:
            progress(f"{report.site}: read {i}/{len(files)} files")
    cache.prune({p.relative_to(folder).as_posix() for p in files})
    cache.save()

    labels: torch.Tensor | None = None
    if labeled:
        kept_paths, kept_images, labels = _attach_labels(kept_paths, kept_images, labels_by_path,
                                                         site_classes, report)
        report.labels_without_image = sorted(set(labels_by_path) - {p.relative_to(folder).as_posix()
                                                                     for p in files})
    report.images_loaded = len(kept_paths)
    report.load_seconds = time.perf_counter() - started
    if not kept_paths:
        reasons = Counter(s.reason.split(" (")[0] for s in report.skipped).most_common(3)
        detail = "; ".join(f"{n}× {r}" for r, n in reasons) or "no files"
        raise SiteError(f"{folder}: no usable DICOM image among {len(files)} files ({detail})")
    images = torch.stack(kept_images)
    return SiteData(report.site, folder, kept_paths, images, labels, site_classes, report)


def _attach_labels(paths: list[str], images: list[torch.Tensor], labels_by_path: dict[str, str],
                   classes: tuple[str, ...], report: DataReport):
    """Keep images with a label (every label is a known class: ``check_known_labels``); count the rest."""
    class_index = {c: i for i, c in enumerate(classes)}
    kept_paths, kept_images, kept_labels = [], [], []
    for rel, image in zip(paths, images):
        label = labels_by_path.get(rel)
        if label is None:
            report.unlabeled_images += 1
        else:
            kept_paths.append(rel)
            kept_images.append(image)
            kept_labels.append(class_index[label])
    counts = Counter(kept_labels)
    report.class_counts = {c: counts.get(i, 0) for i, c in enumerate(classes)}
    return kept_paths, kept_images, torch.tensor(kept_labels, dtype=torch.int64)


def load_labels_for(site: SiteData, labels_csv: str | Path) -> torch.Tensor:
    """Ground-truth indices for an unlabeled site's images from a separate CSV (``evaluate --labels``)."""
    labels_by_path = read_labels_csv(Path(labels_csv))
    class_index = {c: i for i, c in enumerate(site.classes)}
    missing = [p for p in site.paths if p not in labels_by_path]
    if missing:
        raise SiteError(f"{labels_csv}: no label for {len(missing)} image(s), e.g. {missing[0]}")
    unknown = sorted({labels_by_path[p] for p in site.paths} - set(class_index))
    if unknown:
        raise SiteError(f"{labels_csv}: labels {unknown} are not among the model's classes {list(site.classes)}")
    return torch.tensor([class_index[labels_by_path[p]] for p in site.paths], dtype=torch.int64)

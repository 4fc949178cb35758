"""``crosssim check DIR [--labels CSV] [--json]``: what a hospital's site folder holds, before it joins.

Every candidate file goes through the same steps as :func:`~crosssim.data.dicom.read_image` in
training, and labels are read by the same ``sites.read_labels_csv``, so "usable" here means usable
there. The report counts usable images by modality, photometric interpretation, transfer syntax and
size; lists skipped files with their reasons; checks label coverage; and warns when files carry
identifying tags. ``cli.py`` calls :func:`run_check`; exit code 0: usable images found, 1: none
usable, 2: folder or labels file missing.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from crosssim.config import DataConfig
from crosssim.data.dicom import (
    NO_IMAGE,
    REFUSED,
    SkippedFile,
    describe,
    preprocess,
    read_dataset,
    skip_on_error,
)
from crosssim.data.files import iter_candidate_files
from crosssim.data.sites import LABELS_FILENAME, SiteError, read_labels_csv, site_labels_path

IDENTIFYING_KEYWORDS = ("PatientName", "PatientBirthDate", "PatientAddress", "OtherPatientIDs")
PROGRESS_EVERY_FILES = 500
PRIVACY_EXAMPLES = 5  # example paths kept in the privacy warning
TEXT_LIST_LIMIT = 20  # lines per list in the text report; --json has them all
BREAKDOWNS = ("modality", "photometric", "transfer_syntax", "image_size")  # counted over usable images

EXIT_USABLE = 0
EXIT_NOTHING_USABLE = 1
EXIT_MISSING_INPUT = 2


@dataclass
class LabelCoverage:
    """How ``labels.csv`` matches the usable images; paths are relative to the site folder."""

    csv: str
    rows: int = 0
    per_class: dict[str, int] = field(default_factory=dict)  # usable labeled images per class
    missing: list[str] = field(default_factory=list)  # labeled path with no such file
    unusable: list[str] = field(default_factory=list)  # labeled path whose file was skipped
    unlabeled: list[str] = field(default_factory=list)  # usable image without a label
    classes: list[str] = field(default_factory=list)  # the config's classes; empty when it sets none
    outside_classes: dict[str, int] = field(default_factory=dict)  # label outside ``classes`` → rows
    error: str = ""  # the CSV itself could not be used


@dataclass
class PrivacyFindings:
    """Files carrying identifying tags (non-empty, or BurnedInAnnotation YES)."""

    files: int = 0
    by_tag: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


@dataclass
class CheckReport:
    folder: str
    files: int = 0
    usable: int = 0
    by_modality: dict[str, int] = field(default_factory=dict)  # usable images only, as the four below
    by_photometric: dict[str, int] = field(default_factory=dict)
    by_transfer_syntax: dict[str, int] = field(default_factory=dict)
    by_image_size: dict[str, int] = field(default_factory=dict)  # "ROWSxCOLS", frame count when > 1
    skipped_by_kind: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {path, kind, reason}
    labels: LabelCoverage | None = None
    privacy: PrivacyFindings = field(default_factory=PrivacyFindings)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _identifying_tags(ds: pydicom.Dataset) -> list[str]:
    tags = [k for k in IDENTIFYING_KEYWORDS if str(ds.get(k) or "").strip()]
    if str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        tags.append("BurnedInAnnotation")
    return tags


def _image_size(info: dict[str, Any]) -> str:
    size = f"{info['rows']}x{info['cols']}"
    return f"{size}, {info['frames']} frames" if info["frames"] > 1 else size


def _label_coverage(csv_path: Path, usable: list[str], skipped: set[str], present: set[str],
                    classes: tuple[str, ...]) -> LabelCoverage:
    try:
        labels, error = read_labels_csv(csv_path), ""
    except SiteError as exc:
        labels, error = {}, str(exc)
    coverage = LabelCoverage(csv=str(csv_path), rows=len(labels), error=error)
    counts: Counter[str] = Counter()
    for path, label in labels.items():
        if path not in present:
            coverage.missing.append(path)
        elif path in skipped:
            coverage.unusable.append(path)
        else:
            counts[label] += 1
    coverage.per_class = dict(sorted(counts.items()))
    coverage.classes = list(classes)
    if classes:
        coverage.outside_classes = dict(sorted(Counter(v for v in labels.values() if v not in classes).items()))
    coverage.unlabeled = [p for p in usable if p not in labels]
    coverage.missing.sort()
    coverage.unusable.sort()
    return coverage


def scan_site(folder: Path, cfg: DataConfig, labels_csv: Path | None = None,
              progress: Callable[[str], None] | None = None) -> CheckReport:
    """Read every candidate file of a site folder once; labels default to ``folder/labels.csv`` if present."""
    start = time.perf_counter()
    folder = Path(folder)
    files = iter_candidate_files(folder)
    report = CheckReport(folder=str(folder), files=len(files))
    counters: dict[str, Counter[str]] = {k: Counter() for k in BREAKDOWNS}
    privacy_tags: Counter[str] = Counter()
    usable: list[str] = []
    for number, path in enumerate(files, start=1):
        rel = path.relative_to(folder).as_posix()
        try:
            with skip_on_error(path):
                ds = read_dataset(path)
                tags = _identifying_tags(ds)
                if tags:
                    report.privacy.files += 1
                    privacy_tags.update(tags)
                    if len(report.privacy.examples) < PRIVACY_EXAMPLES:
                        report.privacy.examples.append(rel)
                preprocess(ds, cfg, str(path))  # read_dataset + preprocess is read_image
                info = describe(ds)
        except SkippedFile as exc:
            report.skipped.append({"path": rel, "kind": exc.kind, "reason": exc.reason})
        else:
            usable.append(rel)
            info["image_size"] = _image_size(info)
            for key in BREAKDOWNS:
                counters[key][info[key]] += 1
        if progress and number % PROGRESS_EVERY_FILES == 0:
            progress(f"checked {number}/{len(files)} files")
    report.usable = len(usable)
    report.by_modality, report.by_photometric, report.by_transfer_syntax, report.by_image_size = (
        dict(counters[k].most_common()) for k in BREAKDOWNS)
    kinds = Counter(s["kind"] for s in report.skipped)
    report.skipped_by_kind = {kind: kinds[kind] for kind in (NO_IMAGE, REFUSED)}
    report.privacy.by_tag = dict(privacy_tags.most_common())
    labels_csv = labels_csv or site_labels_path(folder)
    if labels_csv is not None:
        present = {p.relative_to(folder).as_posix() for p in files}
        skipped = {s["path"] for s in report.skipped}
        report.labels = _label_coverage(Path(labels_csv), usable, skipped, present, cfg.classes)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {n}" for key, n in counts.items()) or "-"


def _listing(items: list[str], indent: str = "    ") -> list[str]:
    lines = [indent + item for item in items[:TEXT_LIST_LIMIT]]
    if len(items) > TEXT_LIST_LIMIT:
        lines.append(f"{indent}... {len(items) - TEXT_LIST_LIMIT} more (--json lists all)")
    return lines


def format_report(report: CheckReport) -> str:
    """The human-readable report ``crosssim check`` prints."""
    rate = report.files / report.seconds if report.seconds else 0.0
    lines = [
        f"Site folder: {report.folder}",
        f"Files checked: {report.files} in {report.seconds:.1f} s ({rate:.0f} files/s)",
        f"Usable images: {report.usable}",
        f"  modality:        {_counts(report.by_modality)}",
        f"  photometric:     {_counts(report.by_photometric)}",
        f"  transfer syntax: {_counts(report.by_transfer_syntax)}",
        f"  image size:      {_counts(report.by_image_size)}",
        f"Skipped files: {len(report.skipped)} (no image {report.skipped_by_kind.get(NO_IMAGE, 0)}, "
        f"refused {report.skipped_by_kind.get(REFUSED, 0)})",
    ]
    lines += _listing([f"{s['kind']:<8}  {s['path']}: {s['reason']}" for s in report.skipped])
    labels = report.labels
    if labels is None:
        lines.append(f"Labels: none ({LABELS_FILENAME} not found; fine for an unlabeled target site)")
    elif labels.error:
        lines.append(f"Labels: ERROR {labels.error}")
    else:
        lines.append(f"Labels: {labels.csv}: {labels.rows} labeled paths; "
                     f"usable per class: {_counts(labels.per_class)}")
        if labels.outside_classes:
            lines.append(f"  labels outside the configured classes {labels.classes}: "
                         f"{_counts(labels.outside_classes)}: training refuses this site until they match")
        for title, paths in (("labels pointing at missing files", labels.missing),
                             ("labels pointing at unusable files", labels.unusable),
                             ("usable images without a label", labels.unlabeled)):
            lines.append(f"  {title}: {len(paths)}")
            lines += _listing(paths)
    privacy = report.privacy
    if privacy.files:
        lines.append(f"PRIVACY WARNING: {privacy.files} file(s) carry identifying tags "
                     f"({_counts(privacy.by_tag)}); images never leave the site, "
                     "but de-identify before sharing files. Examples:")
        lines += _listing(privacy.examples)
    if not report.usable:
        lines.append("No usable image: this site cannot join.")
    return "\n".join(lines)


def run_check(folder: str, labels: str | None, cfg: DataConfig, as_json: bool) -> int:
    """Scan, print the report (text or JSON) and return the exit code; progress goes to stderr."""
    if not Path(folder).is_dir():
        print(f"crosssim check: {folder}: site folder not found", file=sys.stderr)
        return EXIT_MISSING_INPUT
    if labels is not None and not Path(labels).is_file():
        print(f"crosssim check: {labels}: labels file not found", file=sys.stderr)
        return EXIT_MISSING_INPUT
    report = scan_site(Path(folder), cfg, Path(labels) if labels else None,
                       progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))
    return EXIT_USABLE if report.usable else EXIT_NOTHING_USABLE

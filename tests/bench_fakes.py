"""Tiny fake suite sites shared by the benchmark-runner tests (no images: the crosssim commands are faked)."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

from benchmarks import accuracy as acc
from benchmarks.datasets import SuiteSites
from crosssim.data.sites import write_labels_csv

CLASSES = ("a", "b")
# target images: (path, true label), classes alternating; the oracle's held-out half is the first four
TARGET = [(f"images/{i:05d}.dcm", CLASSES[i % 2]) for i in range(8)]
HELDOUT = TARGET[:4]
TINY = acc.Protocol("quick", "quick", 5, 2, 1, 2, 3, {})


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def fake_sites(root: Path) -> SuiteSites:
    sources = [root / "sites" / name for name in ("s1", "s2", "s3")]
    for folder in sources:
        folder.mkdir(parents=True, exist_ok=True)
    target = root / "sites" / "target"
    target.mkdir(parents=True, exist_ok=True)
    return SuiteSites("fake", CLASSES, sources, target,
                      write_labels_csv(root / "sites" / "target_labels.csv", TARGET), root / "oracle" / "train",
                      write_labels_csv(root / "oracle" / "test_labels.csv", HELDOUT))


def evaluate_out_dirs(argv: list[str]) -> dict[str, Path]:
    """{adaptation: folder} of a faked ``crosssim evaluate`` argv, laid out as the real command writes them."""
    out = Path(argv[argv.index("--out") + 1])
    adapts = list(itertools.takewhile(lambda a: not a.startswith("--"), argv[argv.index("--adapt") + 1:]))
    return {adapts[0]: out} if len(adapts) == 1 else {adapt: out / adapt for adapt in adapts}

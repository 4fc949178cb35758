"""Shared pytest fixtures. Append new fixtures with distinctive names; tests of one area own theirs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

EVAL_TINY_IMAGES_PER_SITE = 32
EVAL_TINY_IMAGE_SIZE_PX = 32
# A few large un-augmented steps: far from a good model, but its confidences spread (ATC needs that).
EVAL_TINY_OVERRIDES = {"epochs": 3, "lr": 0.01, "augment": False, "image-size": EVAL_TINY_IMAGE_SIZE_PX,
                       "device": "cpu"}


@dataclass(frozen=True)
class EvalTinyRun:
    """Tiny synthetic hospitals and one pooled checkpoint trained on their sources (evaluation tests)."""

    source_dirs: list[Path]
    target_dir: Path
    target_labels: Path
    checkpoint: Path
    cache_dir: Path


@pytest.fixture(scope="session")
def eval_tiny_run(tmp_path_factory: pytest.TempPathFactory) -> EvalTinyRun:
    """Train once per session (a few seconds on CPU) for test_evaluate, test_adapt, test_shift and test_report."""
    from crosssim.centralized import train_pooled
    from crosssim.config import load_config
    from crosssim.data.synth import generate_hospitals

    root = tmp_path_factory.mktemp("eval_tiny")
    hospitals = generate_hospitals(root / "sites", images_per_site=EVAL_TINY_IMAGES_PER_SITE,
                                   image_size=EVAL_TINY_IMAGE_SIZE_PX)
    cache = root / "cache"
    cfg = load_config(overrides={**EVAL_TINY_OVERRIDES, "cache-dir": str(cache)})
    checkpoint = train_pooled(hospitals.source_sites, cfg, root / "run", cache_dir=cache, progress=None)
    return EvalTinyRun(list(hospitals.source_sites), hospitals.target_site, hospitals.target_labels, checkpoint,
                       cache)


BINARY_CLASSES = ("abnormal", "normal")


@pytest.fixture(scope="session")
def binary_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny labeled sites whose labels.csv use a consortium's own classes: normal / abnormal."""
    from crosssim.data.sites import LABELS_FILENAME, read_labels_csv, write_labels_csv
    from crosssim.data.synth import generate_hospitals

    sites = generate_hospitals(tmp_path_factory.mktemp("binary") / "sites", images_per_site=12,
                               image_size=EVAL_TINY_IMAGE_SIZE_PX).source_sites
    for site in sites:
        labels = read_labels_csv(site / LABELS_FILENAME)
        write_labels_csv(site / LABELS_FILENAME, [(path, "normal" if label == "normal" else "abnormal")
                                                  for path, label in labels.items()])
    return list(sites)

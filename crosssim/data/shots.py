"""`evaluate --shots`: the k labeled target images of few-shot adaptation, matched to a loaded site."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from crosssim.data.sites import SiteData, SiteError, read_labels_csv

MAX_SHOTS_PER_CLASS = 20  # few-shot means a handful; more labels call for fine-tuning, not this


@dataclass(frozen=True)
class Shots:
    """Indices into the site's images and their class indices; these images are never scored."""

    index: torch.Tensor  # (k,) int64 positions in SiteData.paths
    labels: torch.Tensor  # (k,) int64 class indices
    per_class: dict[str, int]


def load_shots(site: SiteData, shots_csv: str | Path) -> Shots:
    """Read a ``path,label`` CSV of target images; one SiteError naming the file for any problem."""
    rows = read_labels_csv(Path(shots_csv))
    if not rows:
        raise SiteError(f"{shots_csv}: no shots listed")
    position = {path: i for i, path in enumerate(site.paths)}
    missing = [p for p in rows if p not in position]
    if missing:
        raise SiteError(f"{shots_csv}: {len(missing)} shot(s) are not readable images of {site.name}, "
                        f"e.g. {missing[0]}")
    class_index = {c: i for i, c in enumerate(site.classes)}
    unknown = sorted(set(rows.values()) - set(class_index))
    if unknown:
        raise SiteError(f"{shots_csv}: labels {unknown} are not among the model's classes {list(site.classes)}")
    per_class = {c: sum(1 for label in rows.values() if label == c) for c in site.classes}
    too_many = {c: n for c, n in per_class.items() if n > MAX_SHOTS_PER_CLASS}
    if too_many:
        raise SiteError(f"{shots_csv}: at most {MAX_SHOTS_PER_CLASS} shots per class (got {too_many})")
    paths = sorted(rows, key=position.__getitem__)
    return Shots(torch.tensor([position[p] for p in paths], dtype=torch.int64),
                 torch.tensor([class_index[rows[p]] for p in paths], dtype=torch.int64), per_class)

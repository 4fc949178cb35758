"""Hospital-side cache of preprocessed tensors, one file per (site folder, preprocessing config).

Entries are keyed by the file's path relative to the site, its size and its mtime; the cache file's name
carries the preprocessing hash, so changing any preprocessing setting starts a fresh cache. The cache
never lives inside the (read-only) source folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crosssim.config import DataConfig, preprocessing_hash
from crosssim.fileio import atomic_torch_save, load_tensors

CACHE_FORMAT_VERSION = 1
CACHE_DIR_ENV = "CROSSSIM_CACHE_DIR"


def default_cache_dir(data_cfg: DataConfig) -> Path:
    """``cache-dir`` from the config, else $CROSSSIM_CACHE_DIR, else ~/.cache/crosssim."""
    chosen = data_cfg.cache_dir or os.environ.get(CACHE_DIR_ENV) or "~/.cache/crosssim"
    return Path(chosen).expanduser()


@dataclass(frozen=True)
class FileStamp:
    size_bytes: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        stat = path.stat()
        return cls(stat.st_size, stat.st_mtime_ns)


@dataclass
class CachedEntry:
    stamp: FileStamp
    image: torch.Tensor | None = None  # (1, S, S) float32, None when skipped
    skip_kind: str = ""
    skip_reason: str = ""


@dataclass
class SiteCache:
    """Entries of one site under one preprocessing config; ``save`` writes atomically when changed."""

    path: Path
    entries: dict[str, CachedEntry] = field(default_factory=dict)
    dirty: bool = False

    @classmethod
    def open(cls, cache_dir: Path, site_folder: Path, data_cfg: DataConfig) -> "SiteCache":
        site_folder = site_folder.resolve()
        cache_dir = cache_dir.resolve()
        if cache_dir == site_folder or site_folder in cache_dir.parents:
            raise ValueError(f"{cache_dir}: the cache must not live inside the source folder {site_folder}")
        site_key = hashlib.sha256(str(site_folder).encode()).hexdigest()[:16]
        path = cache_dir / f"{site_folder.name}-{site_key}-{preprocessing_hash(data_cfg)}.pt"
        cache = cls(path)
        if path.is_file():
            cache._read()
        return cache

    def _read(self) -> None:
        try:
            blob = load_tensors(self.path)
        except Exception:  # a damaged cache is rebuilt, never trusted
            return
        if blob.get("version") != CACHE_FORMAT_VERSION:
            return
        for i, rel in enumerate(blob["paths"]):
            stamp = FileStamp(int(blob["sizes"][i]), int(blob["mtimes"][i]))
            index = int(blob["image_index"][i])
            image = blob["images"][index] if index >= 0 else None
            self.entries[rel] = CachedEntry(stamp, image, blob["skip_kinds"][i], blob["skip_reasons"][i])

    def get(self, rel_path: str, stamp: FileStamp) -> CachedEntry | None:
        entry = self.entries.get(rel_path)
        return entry if entry is not None and entry.stamp == stamp else None

    def put(self, rel_path: str, entry: CachedEntry) -> None:
        self.entries[rel_path] = entry
        self.dirty = True

    def prune(self, keep: set[str]) -> None:
        """Forget files that are gone from the site."""
        for rel in set(self.entries) - keep:
            del self.entries[rel]
            self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        paths = sorted(self.entries)
        images, image_index = [], []
        for rel in paths:
            image = self.entries[rel].image
            image_index.append(len(images) if image is not None else -1)
            if image is not None:
                images.append(image)
        blob = {
            "version": CACHE_FORMAT_VERSION,
            "paths": paths,
            "sizes": torch.tensor([self.entries[p].stamp.size_bytes for p in paths], dtype=torch.int64),
            "mtimes": torch.tensor([self.entries[p].stamp.mtime_ns for p in paths], dtype=torch.int64),
            "image_index": torch.tensor(image_index, dtype=torch.int64),
            "images": torch.stack(images) if images else torch.zeros(0),
            "skip_kinds": [self.entries[p].skip_kind for p in paths],
            "skip_reasons": [self.entries[p].skip_reason for p in paths],
        }
        atomic_torch_save(blob, self.path)
        self.dirty = False

"""The files of a site folder that may be DICOM, found without pydicom (a cached site never needs it)."""

from __future__ import annotations

import os
from pathlib import Path


def _is_inside(target: str, root: str) -> bool:
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def iter_candidate_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` (recursive, sorted) that may be a DICOM file.

    Skips ``*.csv`` (``labels.csv`` included) and hidden files and folders (name starting with ".").
    A symlink is followed only when its target lies inside ``folder``; each real folder is walked
    once, so links cannot loop. Unreadable sub-folders are skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: site folder not found")
    root = os.path.realpath(folder)
    files: list[Path] = []
    walked: set[str] = set()

    def walk(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in walked:
            return
        walked.add(real)
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = directory / entry.name
            if entry.is_symlink() and not _is_inside(os.path.realpath(path), root):
                continue
            if entry.is_dir():
                walk(path)
            elif entry.is_file() and not entry.name.lower().endswith(".csv"):
                files.append(path)

    walk(folder)
    return sorted(files)

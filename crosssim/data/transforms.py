"""The one preprocessing function wrapped as a MONAI transform for pipelines.

Kept apart from ``dicom.py`` so that reading a site (each Flower message runs in a fresh process) does not
pay MONAI's import time.
"""

from __future__ import annotations

import os
from pathlib import Path

import monai.transforms
import torch

from crosssim.config import DataConfig
from crosssim.data.dicom import read_image


class LoadDicomImage(monai.transforms.Transform):
    """MONAI transform: DICOM path → float32 tensor ``(1, S, S)`` via :func:`read_image`.

    Args:
        cfg: preprocessing settings (``image_size``, normalization, frame rule, VOI LUT).

    Raises:
        SkippedFile: for files that yield no image; datasets should drop them beforehand.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:
        return torch.from_numpy(read_image(Path(path), self.cfg))

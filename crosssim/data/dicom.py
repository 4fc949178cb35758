"""Read one DICOM file into the float32 image every CrossSim stage uses (DESIGN.md, "The data contract").

``read_image(source, cfg)`` is the only way a DICOM file becomes a model input: training, evaluation,
adaptation, ``crosssim check`` and ``crosssim serve`` (the file's bytes, in memory) all call it, so a site
sees the same pixels in every stage. A file that yields no image raises :class:`SkippedFile`; no other
exception escapes ``read_image``.

Preprocessing, in order:

1. decode one frame (``cfg.frame``: middle | first | last, or max | mean over all frames, combined
   after step 3 one frame at a time) with pydicom's decoders (pylibjpeg / Pillow plugins for JPEG,
   JPEG-LS, JPEG 2000, RLE). Only that frame is decoded and converted to float.
2. colour to grayscale: PALETTE COLOR through its lookup table to RGB; YBR_FULL(_422) is converted to
   RGB by pydicom; RGB → luminance ``0.299 R + 0.587 G + 0.114 B``; any other YBR_* keeps its Y
   channel, which is that same luminance.
3. grayscale only: Modality LUT (Rescale Slope/Intercept or LUT, per frame for enhanced multi-frame
   objects), then VOI LUT / windowing when ``cfg.voi_lut``; MONOCHROME1 is negated, so it normalizes
   to the same image as its MONOCHROME2 counterpart.
4. intensity: clip to the ``[clip_low_percentile, clip_high_percentile]`` percentiles (the full range
   when those coincide), then ``minmax`` scales to [0, 1] or ``zscore`` to mean 0, std 1; a
   constant image becomes zeros.
5. resize to ``image_size`` × ``image_size`` (bilinear, antialiased when shrinking). The aspect ratio
   is not kept: a plain resize to the square, so the whole field of view stays in the image.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import as_pixel_options, get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from crosssim.config import DataConfig

NO_IMAGE = "no-image"  # a valid DICOM object that carries no image (SR, RTPLAN, DICOMDIR, waveform)
REFUSED = "refused"  # not DICOM, truncated, undecodable or unsupported
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
REQUIRED_IMAGE_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance, the Y of DICOM YBR_FULL
LUT_KEYWORDS = ("PhotometricInterpretation", "BitsStored", "PixelRepresentation", "RescaleSlope",
                "RescaleIntercept", "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
                "VOILUTSequence")  # what pydicom's Modality/VOI LUT functions read
MAX_REASON_CHARS = 160  # a skip reason is one short line
# Colour models step 2 turns into grayscale, and the two grayscale ones; anything else (HSV, ARGB, CMYK,
# MONOCHROME3, ...) is refused rather than read as if it were RGB or grayscale.
SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL", "YBR_FULL_422",
                         "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT")
DicomSource = Path | bytes  # a file on disk, or a whole file's bytes in memory (an upload to `crosssim serve`)
_ENCODING_TO_SYNTAX = {  # (implicit VR, little endian) of a file without a Transfer Syntax UID
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


class SkippedFile(Exception):
    """A file that yields no image; ``str(exc)`` is one line naming the file and the problem.

    Args:
        path: the file (or a caller's label for an in-memory dataset).
        reason: short description of the problem.
        kind: ``"no-image"`` (valid DICOM without an image) or ``"refused"`` (anything that failed).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, kind: str) -> None:
        self.path = str(path) or "<dataset>"
        self.reason = reason
        self.kind = kind
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        return (SkippedFile, (self.path, self.reason, self.kind))


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's per-file warnings: problems surface as SkippedFile or in `crosssim check`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _looks_like_dataset(ds: pydicom.Dataset) -> bool:
    """A force-read file is accepted only when it parsed into a real object, not bytes taken for tags."""
    return "SOPClassUID" in ds or ("Rows" in ds and any(k in ds for k in PIXEL_KEYWORDS))


def _opened(source: DicomSource) -> Path | io.BytesIO:
    """What ``pydicom.dcmread`` reads: the path itself, or a fresh in-memory stream over the bytes."""
    return io.BytesIO(source) if isinstance(source, bytes) else source


def _label(source: DicomSource, name: str) -> str:
    """How errors name ``source``: ``name`` when given, else the path (``<bytes>`` for unnamed bytes)."""
    return name or ("<bytes>" if isinstance(source, bytes) else str(source))


def read_dataset(source: DicomSource, name: str = "") -> pydicom.Dataset:
    """Read a DICOM file or its bytes (read-only); data without the preamble/meta header is retried with force.

    ``name`` labels errors (default: the path; give one for bytes).

    Raises:
        SkippedFile: ``refused`` when the data cannot be read or is not DICOM.
    """
    path = _label(source, name)
    try:
        with _quiet():
            try:
                ds = pydicom.dcmread(_opened(source))
            except InvalidDicomError:
                ds = pydicom.dcmread(_opened(source), force=True)
                if not _looks_like_dataset(ds):
                    raise SkippedFile(path, "not a DICOM file", REFUSED) from None
    except SkippedFile:
        raise
    except OSError as exc:
        raise SkippedFile(path, f"cannot read file ({exc.strerror or _short(exc)})", REFUSED) from None
    except Exception as exc:  # pydicom raises many types on malformed input
        raise SkippedFile(path, f"unreadable DICOM ({_short(exc)})", REFUSED) from None
    if len(ds) == 0:  # pydicom drops the whole dataset when the file ends inside encapsulated pixel data
        raise SkippedFile(path, _empty_dataset_reason(source, ds), REFUSED)
    return ds


def _empty_dataset_reason(source: DicomSource, ds: pydicom.Dataset) -> str:
    try:
        with _quiet():
            header = pydicom.dcmread(_opened(source), stop_before_pixels=True)
    except Exception:
        header = pydicom.Dataset()
    syntax = _transfer_syntax(ds)
    if len(header) and syntax:
        return f"truncated {syntax.name} pixel data (file ends inside it)"
    return "no data elements after the file header (truncated?)"


def describe(ds: pydicom.Dataset) -> dict[str, Any]:
    """Summary used by ``crosssim check``: modality, photometric, transfer syntax, size, frames, bits."""
    syntax = _transfer_syntax(ds)

    def value(keyword: str) -> Any:
        element = ds.get(keyword)
        return None if element in (None, "") else element

    return {
        "modality": str(value("Modality") or "unknown"),
        "photometric": str(value("PhotometricInterpretation") or "none"),
        "transfer_syntax_uid": str(syntax) if syntax else "",
        "transfer_syntax": syntax.name if syntax else "unknown",
        "rows": _as_int(value("Rows")),
        "cols": _as_int(value("Columns")),
        "frames": _as_int(value("NumberOfFrames")) or 1,
        "bits": _as_int(value("BitsStored") or value("BitsAllocated")),
    }


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    """The file meta Transfer Syntax UID, or the one implied by how a header-less file was read."""
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if syntax:
        return UID(syntax)
    return _ENCODING_TO_SYNTAX.get(tuple(ds.original_encoding))


def _check_image(ds: pydicom.Dataset, path: str) -> UID:
    """Raise SkippedFile unless ``ds`` holds decodable image pixels; return the transfer syntax."""
    if not any(k in ds for k in PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        kind = UID(sop).name if sop else str(ds.get("Modality") or "object without SOP class")
        if "DirectoryRecordSequence" in ds:
            kind = "DICOMDIR"
        raise SkippedFile(path, f"no pixel data ({kind})", NO_IMAGE)
    missing = [k for k in REQUIRED_IMAGE_KEYWORDS if ds.get(k) in (None, "")]
    if missing:
        raise SkippedFile(path, f"missing image attribute(s): {', '.join(missing)}", REFUSED)
    if int(ds.Rows) <= 0 or int(ds.Columns) <= 0:
        raise SkippedFile(path, f"zero-size image ({ds.Rows}x{ds.Columns})", REFUSED)
    frames = ds.get("NumberOfFrames")
    if frames not in (None, "") and _as_int(frames) is None:
        raise SkippedFile(path, f"invalid Number of Frames {str(frames)!r}", REFUSED)
    if int(ds.SamplesPerPixel) not in (1, 3):
        raise SkippedFile(path, f"unsupported samples per pixel ({ds.SamplesPerPixel})", REFUSED)
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric not in SUPPORTED_PHOTOMETRIC:
        raise SkippedFile(path, f"unsupported photometric interpretation {photometric}", REFUSED)
    syntax = _transfer_syntax(ds)
    if syntax is None:
        raise SkippedFile(path, "no transfer syntax (file meta lacks (0002,0010))", REFUSED)
    if not syntax.is_transfer_syntax:
        raise SkippedFile(path, f"unknown transfer syntax {syntax}", REFUSED)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        reason = f"unsupported transfer syntax {syntax.name} (no pydicom decoder)"
        raise SkippedFile(path, reason, REFUSED) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise SkippedFile(path, f"no decoder installed for {syntax.name} ({missing})", REFUSED)
    if not syntax.is_encapsulated and "PixelData" in ds:
        expected = get_expected_length(ds)
        found = len(ds.PixelData)
        if found < expected:
            reason = f"truncated pixel data (expected {expected} bytes, found {found})"
            raise SkippedFile(path, reason, REFUSED)
    return syntax


def _frame_index(n_frames: int, rule: str) -> int | None:
    """The one frame ``rule`` picks, or None when it combines every frame (max | mean)."""
    return {"first": 0, "last": n_frames - 1, "middle": n_frames // 2}.get(rule)


def _functional_group_view(ds: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """``ds`` with an enhanced multi-frame object's rescale and window for frame ``index`` on top level.

    pydicom's LUT functions read top-level attributes only; enhanced CT/MR/PET keep them in the
    shared and per-frame functional groups.
    """
    groups = [ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")]
    items = [groups[0][0] if groups[0] else None,
             groups[1][index] if groups[1] and index < len(groups[1]) else None]
    found: dict[str, Any] = {}
    for item in items:
        for sequence in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            if item is not None and item.get(sequence):
                for element in item.get(sequence)[0]:
                    found[element.keyword] = element
    if not found:
        return ds
    view = pydicom.Dataset()
    view.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in LUT_KEYWORDS:
        if keyword in found:
            view[keyword] = found[keyword]
        elif keyword in ds:
            view[keyword] = ds[keyword]
    return view


def _grayscale(frame: np.ndarray, photometric: str, ds: pydicom.Dataset, index: int,
               cfg: DataConfig) -> np.ndarray:
    """One decoded frame → float32 (rows, cols) in modality units (grayscale) or luminance (colour)."""
    if photometric == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
        photometric = "RGB"
    if frame.ndim == 3:
        if photometric.startswith("YBR"):
            return frame[..., 0].astype(np.float32)
        weights = np.asarray(LUMA_WEIGHTS, dtype=np.float32)
        return frame.astype(np.float32) @ weights
    lut_ds = _functional_group_view(ds, index)
    values = apply_modality_lut(frame, lut_ds)
    if cfg.voi_lut:
        values = apply_voi_lut(values, lut_ds)
    values = values.astype(np.float32, copy=False)
    if photometric == "MONOCHROME1":
        np.negative(values, out=values)
    return values


def _decode(ds: pydicom.Dataset, syntax: UID, cfg: DataConfig) -> np.ndarray:
    """Decode the frame(s) ``cfg.frame`` selects and combine them into one float32 (rows, cols) image."""
    options = as_pixel_options(ds)
    n_frames = int(options["number_of_frames"])
    chosen = _frame_index(n_frames, cfg.frame)
    indices = range(n_frames) if chosen is None else [chosen]
    frames = get_decoder(syntax).iter_array(ds, indices=None if chosen is None else indices, **options)
    image: np.ndarray | None = None
    for index, (frame, props) in zip(indices, frames, strict=True):
        gray = _grayscale(frame, str(props.get("photometric_interpretation", "")), ds, index, cfg)
        if image is None:
            image = gray
        elif cfg.frame == "max":
            np.maximum(image, gray, out=image)
        else:
            image += gray
    if image is None:
        raise ValueError("no frame decoded")
    if cfg.frame == "mean":
        image /= n_frames
    return image


def _normalize(image: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Percentile clip, then minmax to [0, 1] or z-score, in float32; non-finite pixels become the minimum."""
    finite = np.isfinite(image)
    if not finite.all():
        if not finite.any():
            raise ValueError("no finite pixel values")
        image[~finite] = image[finite].min()
    low, high = (float(v) for v in np.percentile(image, [cfg.clip_low_percentile, cfg.clip_high_percentile]))
    if high <= low:  # mostly-constant image (small masks): keep the full range
        low, high = float(image.min()), float(image.max())
    np.clip(image, low, high, out=image)
    if cfg.normalize == "zscore":
        std = float(image.std())
        return (image - image.mean()) / std if std > 0 else np.zeros_like(image)
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Plain resize to size × size (aspect not kept), bilinear with antialiasing when shrinking."""
    if image.shape == (size, size):
        return image[None]
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    resized = torch.nn.functional.interpolate(tensor, size=(size, size), mode="bilinear",
                                              align_corners=False, antialias=True)
    return resized[0].numpy()


def preprocess(ds: pydicom.Dataset, cfg: DataConfig, path: str = "") -> np.ndarray:
    """DICOM dataset → float32 ``(1, S, S)`` finite image, ``S = cfg.image_size`` (steps in the module doc).

    Raises:
        SkippedFile: ``no-image`` without pixel data, ``refused`` for anything that cannot be decoded.
    """
    syntax: UID | None = None
    with _quiet():
        try:
            syntax = _check_image(ds, path)
            image = _normalize(_decode(ds, syntax, cfg), cfg)
        except SkippedFile:
            raise
        except Exception as exc:  # decoders and LUT code raise many types on malformed input
            what = f"{syntax.name} pixel data" if syntax else "image attributes"
            raise SkippedFile(path, f"cannot decode {what} ({_short(exc)})", REFUSED) from None
    image = _resize(image.astype(np.float32, copy=False), cfg.image_size)
    if cfg.normalize == "minmax":
        np.clip(image, 0.0, 1.0, out=image)
    return image


@contextmanager
def skip_on_error(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn any exception but SkippedFile (a malformed element pydicom parses lazily) into ``refused``."""
    try:
        yield
    except SkippedFile:
        raise
    except Exception as exc:
        raise SkippedFile(path, f"unexpected error ({type(exc).__name__}: {_short(exc)})", REFUSED) from None


def read_image(source: DicomSource, cfg: DataConfig, name: str = "") -> np.ndarray:
    """Read and preprocess one file or its bytes: float32 ``(1, S, S)``; any failure is a :class:`SkippedFile`.

    ``name`` labels errors (default: the path; give one for bytes).
    """
    path = _label(source, name)
    with skip_on_error(path):
        return preprocess(read_dataset(source, path), cfg, path)


"""The one preprocessing function on small DICOM files built in memory (tables of variants → outcomes)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, pack_bits
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from crosssim.config import DataConfig
from crosssim.data.dicom import (
    NO_IMAGE,
    REFUSED,
    SkippedFile,
    describe,
    preprocess,
    read_dataset,
    read_image,
)
from crosssim.data.files import iter_candidate_files
from crosssim.data.transforms import LoadDicomImage

RNG = np.random.default_rng(0)
SIZE = 16
EXACT = DataConfig(image_size=SIZE, clip_low_percentile=0.0, clip_high_percentile=100.0)  # no clipping


def make_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                 frames: bool = False, **attrs: object) -> FileDataset:
    """A minimal Secondary Capture (or ``attrs``-overridden) image; ``pixels`` is (F,)H,W(,3)."""
    arr = np.asarray(pixels)
    samples = 3 if photometric == "RGB" or photometric.startswith("YBR") else 1
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    shape = arr.shape[1:] if frames else arr.shape
    ds.Rows, ds.Columns = int(shape[0]), int(shape[1])
    if frames:
        ds.NumberOfFrames = arr.shape[0]
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits_allocated = 1 if bits_stored == 1 else arr.dtype.itemsize * 8
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    little_endian = arr.astype(arr.dtype.newbyteorder("<"))
    ds.PixelData = pack_bits(arr) if bits_allocated == 1 else little_endian.tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.min()) / (x.max() - x.min())


def gradient(dtype: str, low: int, high: int, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.linspace(low, high, shape[0] * shape[1]).round().astype(dtype).reshape(shape)


# ---- bit depths and signedness: a gradient over the stored range comes back as a [0, 1] ramp ----
BIT_DEPTH_CASES = [
    ("uint8", gradient("uint8", 0, 255), 8),
    ("int8", gradient("int8", -128, 127), 8),
    ("uint12", gradient("uint16", 0, 4095), 12),
    ("int12", gradient("int16", -2048, 2047), 12),
    ("uint16", gradient("uint16", 0, 65535), 16),
    ("int16", gradient("int16", -32768, 32767), 16),
    ("uint32", gradient("uint32", 0, 2**32 - 1), 32),
    ("int32", gradient("int32", -(2**31), 2**31 - 1), 32),
    ("1-bit", (gradient("uint8", 0, 255) > 100).astype("uint8"), 1),
]


@pytest.mark.parametrize("name, pixels, bits", BIT_DEPTH_CASES, ids=[c[0] for c in BIT_DEPTH_CASES])
def test_bit_depths(tmp_path: Path, name: str, pixels: np.ndarray, bits: int) -> None:
    path = save(make_dataset(pixels, bits_stored=bits), tmp_path / f"{name}.dcm")
    image = read_image(path, EXACT)
    assert image.dtype == np.float32 and image.shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(image[0], minmax(pixels), atol=1e-5)


def test_monochrome1_with_rescale_matches_monochrome2_original(tmp_path: Path) -> None:
    original = 2 * RNG.integers(0, 1000, (24, 20)).astype("uint16")  # MONOCHROME2, no rescale
    slope, intercept, top = 2, -100, 2100
    # slope * stored + intercept = top - original: the same picture, inverted and rescaled
    stored = ((top - original.astype(int) - intercept) // slope).astype("uint16")
    mono2 = save(make_dataset(original, bits_stored=12), tmp_path / "m2.dcm")
    mono1 = save(make_dataset(stored, "MONOCHROME1", 12, RescaleSlope=slope, RescaleIntercept=intercept,
                              Modality="CR"), tmp_path / "m1.dcm")
    for cfg in (DataConfig(image_size=SIZE), DataConfig(image_size=SIZE, normalize="zscore")):
        np.testing.assert_allclose(read_image(mono1, cfg), read_image(mono2, cfg), atol=1e-5)


# ---- colour: every photometric interpretation ends as the luminance of its RGB ----
RGB = RNG.integers(0, 256, (SIZE, SIZE, 3)).astype("uint8")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
LUMA = RGB.astype(np.float64) @ LUMA_WEIGHTS
PALETTE_INDEX = RNG.integers(0, 256, (SIZE, SIZE)).astype("uint8")
PALETTE_LUT = np.stack([np.arange(256) * 257, (255 - np.arange(256)) * 257, (np.arange(256) * 7 % 256) * 257])


def ybr_partial(rgb: np.ndarray) -> np.ndarray:
    """RGB → limited-range YCbCr (Y in 16..235), stored without subsampling."""
    full = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float64)
    return np.round(16 + full * 219 / 255).astype("uint8")


def palette_dataset() -> FileDataset:
    ds = make_dataset(PALETTE_INDEX, "PALETTE COLOR", 8)
    for colour, lut in zip(("Red", "Green", "Blue"), PALETTE_LUT, strict=True):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut.astype("<u2").tobytes())
    return ds


COLOUR_CASES = [
    ("rgb", lambda: make_dataset(RGB, "RGB", 8), LUMA, 1e-5),
    ("ybr_full", lambda: make_dataset(convert_color_space(RGB, "RGB", "YBR_FULL"), "YBR_FULL", 8), LUMA,
     0.02),
    # Y of limited-range YBR is an affine map of luminance, so it normalizes to the same image
    ("ybr_partial", lambda: make_dataset(ybr_partial(RGB), "YBR_PARTIAL_422", 8), LUMA, 0.01),
    ("palette", palette_dataset, PALETTE_LUT.T[PALETTE_INDEX].astype(float) @ LUMA_WEIGHTS, 1e-5),
]


@pytest.mark.parametrize("name, build, luminance, atol", COLOUR_CASES, ids=[c[0] for c in COLOUR_CASES])
def test_colour_to_luminance(tmp_path: Path, name: str, build, luminance: np.ndarray, atol: float) -> None:
    image = read_image(save(build(), tmp_path / f"{name}.dcm"), EXACT)
    assert image.shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(image[0], minmax(luminance), atol=atol)


# ---- multi-frame: frame k has a bright square at row 3k; the rule decides which survive ----
N_FRAMES = 5
FRAMES = np.zeros((N_FRAMES, SIZE, SIZE), dtype="uint16")
for k in range(N_FRAMES):
    FRAMES[k, 3 * k: 3 * k + 2, 2:6] = 1000
    FRAMES[k, -1, -1] = 10 * (k + 1)  # frames differ in background too
FRAME_CASES = [
    ("middle", FRAMES[N_FRAMES // 2]),
    ("first", FRAMES[0]),
    ("last", FRAMES[-1]),
    ("max", FRAMES.max(axis=0)),
    ("mean", FRAMES.astype(float).mean(axis=0)),
]


@pytest.mark.parametrize("rule, expected", FRAME_CASES, ids=[c[0] for c in FRAME_CASES])
def test_multi_frame_rule(tmp_path: Path, rule: str, expected: np.ndarray) -> None:
    path = save(make_dataset(FRAMES, frames=True), tmp_path / "cine.dcm")
    cfg = DataConfig(image_size=SIZE, clip_low_percentile=0.0, clip_high_percentile=100.0, frame=rule)
    np.testing.assert_allclose(read_image(path, cfg)[0], minmax(expected), atol=1e-5)


# ---- resizing and intensity edge cases ----
SHAPE_CASES = [
    ("non-square", gradient("uint16", 0, 4000, (30, 50)), 16),
    ("upsample-3x3", gradient("uint8", 0, 255, (3, 3)), 32),
    ("large-2500x2000", RNG.integers(0, 4096, (2500, 2000)).astype("uint16"), 64),
]


@pytest.mark.parametrize("name, pixels, size", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_resize_to_square(tmp_path: Path, name: str, pixels: np.ndarray, size: int) -> None:
    path = save(make_dataset(pixels, bits_stored=12 if pixels.itemsize == 2 else 8), tmp_path / "x.dcm")
    image = read_image(path, DataConfig(image_size=size))
    assert image.dtype == np.float32 and image.shape == (1, size, size)
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


@pytest.mark.parametrize("normalize", ["minmax", "zscore"])
def test_constant_image_is_zeros(tmp_path: Path, normalize: str) -> None:
    path = save(make_dataset(np.full((20, 20), 700, dtype="uint16"), bits_stored=12), tmp_path / "flat.dcm")
    image = read_image(path, DataConfig(image_size=SIZE, normalize=normalize))
    assert image.shape == (1, SIZE, SIZE) and np.isfinite(image).all() and not image.any()


def test_zscore_has_zero_mean_unit_std(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 4096, (SIZE, SIZE)).astype("uint16")
    path = save(make_dataset(pixels, bits_stored=12), tmp_path / "z.dcm")
    image = read_image(path, DataConfig(image_size=SIZE, normalize="zscore"))
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1.0) < 1e-4


def test_percentile_clip_ignores_outlier(tmp_path: Path) -> None:
    pixels = gradient("uint16", 0, 1000)
    pixels[0, 0] = 60000  # one hot pixel would squash the ramp under plain min-max
    image = read_image(save(make_dataset(pixels), tmp_path / "hot.dcm"), DataConfig(image_size=SIZE))
    assert image.max() == 1.0 and float(np.median(image)) > 0.4


def test_sparse_mask_keeps_foreground(tmp_path: Path) -> None:
    mask = np.zeros((64, 64), dtype="uint8")
    mask[10, 10] = 1  # below the 99.5th percentile: the clip range collapses, the full range is used
    path = save(make_dataset(mask, bits_stored=1), tmp_path / "mask.dcm")
    image = read_image(path, DataConfig(image_size=64))
    assert image[0, 10, 10] == 1.0 and image.sum() == 1.0


def window_dataset(enhanced: bool) -> FileDataset:
    ds = make_dataset(gradient("uint16", 0, 1000), bits_stored=12)
    window = pydicom.Dataset()
    window.WindowCenter, window.WindowWidth = 500, 201
    if enhanced:  # enhanced multi-frame objects keep the window in the functional groups
        shared = pydicom.Dataset()
        shared.FrameVOILUTSequence = [window]
        ds.SharedFunctionalGroupsSequence = [shared]
    else:
        ds.WindowCenter, ds.WindowWidth = window.WindowCenter, window.WindowWidth
    return ds


@pytest.mark.parametrize("enhanced", [False, True], ids=["top-level", "functional-group"])
def test_voi_lut_windowing(tmp_path: Path, enhanced: bool) -> None:
    path = save(window_dataset(enhanced), tmp_path / "w.dcm")
    windowed = read_image(path, DataConfig(image_size=SIZE, voi_lut=True, clip_low_percentile=0.0,
                                           clip_high_percentile=100.0))[0]
    expected = np.clip((gradient("uint16", 0, 1000).astype(float) - 400) / 200, 0, 1)
    np.testing.assert_allclose(windowed, expected, atol=0.01)
    plain = read_image(path, EXACT)[0]
    np.testing.assert_allclose(plain, minmax(gradient("uint16", 0, 1000)), atol=1e-5)


# ---- files that yield no image: one line naming the file, and the right kind ----
def truncated(tmp_path: Path) -> Path:
    path = save(make_dataset(gradient("uint16", 0, 4095, (64, 64)), bits_stored=12), tmp_path / "trunc.dcm")
    path.write_bytes(path.read_bytes()[:-4000])
    return path


def truncated_rle(tmp_path: Path) -> Path:
    ds = make_dataset(RNG.integers(0, 4096, (64, 64)).astype("uint16"), bits_stored=12)
    ds.compress(RLELossless)
    path = save(ds, tmp_path / "rle.dcm")
    path.write_bytes(path.read_bytes()[:-3000])
    return path


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "notes.dcm"
    path.write_text("patient list\nname,id\n")
    return path


def empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    return path


def structured_report(tmp_path: Path) -> Path:
    ds = make_dataset(np.zeros((2, 2), dtype="uint8"), SOPClassUID=BasicTextSRStorage, Modality="SR")
    ds.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, keyword)
    return save(ds, tmp_path / "report.dcm")


def missing_rows(tmp_path: Path) -> Path:
    ds = make_dataset(gradient("uint8", 0, 255))
    del ds.Rows
    return save(ds, tmp_path / "norows.dcm")


def zero_size(tmp_path: Path) -> Path:
    ds = make_dataset(gradient("uint8", 0, 255))
    ds.Rows = 0
    return save(ds, tmp_path / "zero.dcm")


def unsupported_syntax(tmp_path: Path) -> Path:
    ds = make_dataset(gradient("uint8", 0, 255))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder
    ds.PixelData = encapsulate([ds.PixelData])
    return save(ds, tmp_path / "video.dcm")


def hsv_colour(tmp_path: Path) -> Path:
    ds = make_dataset(np.zeros((8, 8, 3), dtype="uint8"), photometric="RGB")
    ds.PhotometricInterpretation = "HSV"  # retired colour model: must not be read as RGB
    return save(ds, tmp_path / "hsv.dcm")


SKIP_CASES = [
    ("truncated", truncated, REFUSED, "truncated pixel data (expected 8192 bytes"),
    ("truncated-rle", truncated_rle, REFUSED, "truncated RLE Lossless pixel data"),
    ("text", text_file, REFUSED, "not a DICOM file"),
    ("empty", empty_file, REFUSED, "not a DICOM file"),
    ("sr", structured_report, NO_IMAGE, "no pixel data (Basic Text SR Storage)"),
    ("missing-rows", missing_rows, REFUSED, "missing image attribute(s): Rows"),
    ("zero-size", zero_size, REFUSED, "zero-size image"),
    ("mpeg2", unsupported_syntax, REFUSED, "unsupported transfer syntax MPEG2 Main Profile / Main Level"),
    ("missing", lambda tmp: tmp / "gone.dcm", REFUSED, "cannot read file"),
    ("hsv", hsv_colour, REFUSED, "unsupported photometric interpretation HSV"),
]


@pytest.mark.parametrize("name, build, kind, reason", SKIP_CASES, ids=[c[0] for c in SKIP_CASES])
def test_skipped_files(tmp_path: Path, name: str, build, kind: str, reason: str) -> None:
    path = build(tmp_path)
    with pytest.raises(SkippedFile) as info:
        read_image(path, DataConfig(image_size=SIZE))
    exc = info.value
    assert (exc.kind, exc.path) == (kind, str(path))
    assert reason in exc.reason and str(exc) == f"{path}: {exc.reason}" and "\n" not in str(exc)


def test_bytes_in_memory_read_as_the_file_and_errors_carry_the_given_name(tmp_path: Path) -> None:
    path = save(make_dataset(gradient("uint16", 0, 4095), bits_stored=12), tmp_path / "a.dcm")
    np.testing.assert_array_equal(read_image(path.read_bytes(), EXACT), read_image(path, EXACT))
    with pytest.raises(SkippedFile, match=r"^upload: not a DICOM file$"):
        read_image(b"patient list\n", EXACT, name="upload")


def test_skipped_file_pickles() -> None:
    exc = pickle.loads(pickle.dumps(SkippedFile("a.dcm", "not a DICOM file", REFUSED)))
    assert (exc.path, exc.reason, exc.kind) == ("a.dcm", "not a DICOM file", REFUSED)
    assert str(exc) == "a.dcm: not a DICOM file"


def test_file_without_meta_header_is_read_with_force(tmp_path: Path) -> None:
    ds = make_dataset(gradient("uint16", 0, 4095), bits_stored=12, SOPClassUID=CTImageStorage, Modality="CT")
    with_meta = save(ds, tmp_path / "with_meta.dcm")
    bare = tmp_path / "bare.dcm"
    ds.preamble = None
    ds.file_meta = FileMetaDataset()
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[:4] != with_meta.read_bytes()[:4] and b"DICM" not in bare.read_bytes()[:132]
    np.testing.assert_allclose(read_image(bare, EXACT), read_image(with_meta, EXACT))
    assert describe(read_dataset(bare))["transfer_syntax"] == "Implicit VR Little Endian"


def test_source_file_untouched(tmp_path: Path) -> None:
    path = save(make_dataset(gradient("uint16", 0, 4095), bits_stored=12), tmp_path / "src.dcm")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    read_image(path, EXACT)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_describe() -> None:
    ds = make_dataset(FRAMES, frames=True, Modality="US")
    assert describe(ds) == {
        "modality": "US", "photometric": "MONOCHROME2", "transfer_syntax_uid": ExplicitVRLittleEndian,
        "transfer_syntax": "Explicit VR Little Endian", "rows": SIZE, "cols": SIZE, "frames": N_FRAMES,
        "bits": 16,
    }


def test_preprocess_in_memory_and_monai_transform(tmp_path: Path) -> None:
    ds = make_dataset(gradient("uint16", 0, 4095, (40, 30)), bits_stored=12)
    direct = preprocess(ds, DataConfig(image_size=24))
    path = save(ds, tmp_path / "m.dcm")
    tensor = Compose([LoadDicomImage(DataConfig(image_size=24))])(str(path))
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (1, 24, 24) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), direct)


def test_iter_candidate_files(tmp_path: Path) -> None:
    site = tmp_path / "site"
    junk = ("labels.csv", "other.CSV", ".DS_Store", ".git/objects/x.dcm")
    for rel in ("a.dcm", "b/IM0001", "b/c/d.dcm", *junk):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(b"x")
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(b"x")
    (site / "link_inside.dcm").symlink_to(site / "a.dcm")
    (site / "link_outside.dcm").symlink_to(outside)
    (site / "b" / "loop").symlink_to(site / "b", target_is_directory=True)
    found = [p.relative_to(site).as_posix() for p in iter_candidate_files(site)]
    assert found == ["a.dcm", "b/IM0001", "b/c/d.dcm", "link_inside.dcm"]
    with pytest.raises(FileNotFoundError):
        iter_candidate_files(tmp_path / "nowhere")

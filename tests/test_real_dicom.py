"""Every file of two real DICOM corpora through ``read_image``: pydicom's test files and pydicom-data.

The corpora are walked directly (``get_testdata_files('*')`` would try to download missing files).
Counts and refusals are pinned to what pydicom 3.0.2 + pylibjpeg decode; a change means a decoder or
our preprocessing changed, and the tables below must be re-measured on purpose.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from crosssim.config import DataConfig
from crosssim.data.dicom import NO_IMAGE, REFUSED, SkippedFile, preprocess, read_dataset, read_image

SIZE = 32  # small output keeps the whole corpus cheap
CFG = DataConfig(image_size=SIZE)
PYDICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
try:
    import data_store

    DATA_STORE_DIR: Path | None = Path(data_store.__file__).parent / "data"
except ImportError:  # pydicom-data is in the test extra: pip install -e '.[test]'
    DATA_STORE_DIR = None
CORPORA = {"pydicom": PYDICOM_DIR, "pydicom-data": DATA_STORE_DIR}

EXPECTED_COUNTS = {  # measured: loaded / no-image / refused
    "pydicom": {"loaded": 89, NO_IMAGE: 71, REFUSED: 16},
    "pydicom-data": {"loaded": 67, NO_IMAGE: 0, REFUSED: 1},
}
EXPECTED_REFUSED = {  # every refused file and a fragment of its reason
    "pydicom": {
        "JPEG-lossy.dcm": "cannot decode JPEG Extended",  # pylibjpeg rejects a misplaced marker (GDCM too)
        "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode JPEG 2000",  # broken codestream
        "MR_truncated.dcm": "truncated pixel data (expected 8192 bytes, found 8130)",
        "badVR.dcm": "invalid Number of Frames '1A'",
        "meta_missing_tsyntax.dcm": "missing image attribute(s): Rows",
        "nested_priv_SQ.dcm": "missing image attribute(s): Rows",
        "no_meta.dcm": "not a DICOM file",  # starts one byte off a tag boundary
        "README.txt": "not a DICOM file",
        "dicomdirtests/README.txt": "not a DICOM file",
        "dicomdirtests/TINY_ALPHA/README": "not a DICOM file",
        "crayons.icc": "not a DICOM file",
        "rtplan.dump": "not a DICOM file",
        "rtstruct.dump": "not a DICOM file",
        "test1.json": "not a DICOM file",
        "test_PN.json": "not a DICOM file",
        "zipMR.gz": "not a DICOM file",
    },
    "pydicom-data": {
        "emri_small_jpeg_2k_lossless_too_short.dcm":
            "truncated JPEG 2000 Image Compression (Lossless Only) pixel data",
    },
}
KNOWN_GOOD = [  # (corpus, file, what it covers)
    ("pydicom", "CT_small.dcm", "CT, rescale"),
    ("pydicom", "MR_small.dcm", "MR"),
    ("pydicom", "dicomdirtests/77654033/CR1/6154", "CR MONOCHROME1, rescale"),
    ("pydicom", "MR_small_bigendian.dcm", "explicit VR big endian"),
    ("pydicom", "image_dfl.dcm", "deflated explicit VR"),
    ("pydicom", "SC_rgb_jpeg_dcmtk.dcm", "JPEG baseline, YBR_FULL"),
    ("pydicom", "JPGExtended.dcm", "JPEG extended 12-bit"),
    ("pydicom", "MR_small_jpeg_ls_lossless.dcm", "JPEG-LS lossless"),
    ("pydicom", "JPEGLSNearLossless_16.dcm", "JPEG-LS near-lossless"),
    ("pydicom", "MR_small_jp2klossless.dcm", "JPEG 2000 lossless"),
    ("pydicom", "693_J2KI.dcm", "JPEG 2000 lossy, signed"),
    ("pydicom", "MR_small_RLE.dcm", "RLE"),
    ("pydicom", "examples_ybr_color.dcm", "multi-frame US, JPEG YBR_FULL_422"),
    ("pydicom", "examples_rgb_color.dcm", "RGB"),
    ("pydicom", "examples_palette.dcm", "PALETTE COLOR"),
    ("pydicom", "liver_1frame.dcm", "1-bit segmentation"),
    ("pydicom", "rtdose.dcm", "32-bit multi-frame dose"),
    ("pydicom-data", "RG1_UNCR.dcm", "CR MONOCHROME1 1955x1841"),
    ("pydicom-data", "RG1_J2KR.dcm", "CR MONOCHROME1 JPEG 2000"),
    ("pydicom-data", "MR2_J2KI.dcm", "MR 1024x1024 JPEG 2000 lossy"),
    ("pydicom-data", "US1_J2KR.dcm", "US JPEG 2000 YBR_RCT"),
    ("pydicom-data", "JPEG-LL.dcm", "JPEG lossless"),
    ("pydicom-data", "color3d_jpeg_baseline.dcm", "multi-frame US cine, 120 frames"),
    ("pydicom-data", "emri_small_jpeg_ls_lossless.dcm", "multi-frame JPEG-LS"),
    ("pydicom-data", "OBXXXX1A_rle_2frame.dcm", "PALETTE COLOR RLE multi-frame"),
    ("pydicom-data", "gdcm-US-ALOKA-16.dcm", "16-bit PALETTE COLOR"),
    ("pydicom-data", "mlut_18.dcm", "Modality LUT sequence"),
    ("pydicom-data", "eCT_Supplemental.dcm", "enhanced CT, functional groups"),
]
SAME_IMAGE_PAIRS = [  # (corpus, a, b, max abs difference after preprocessing)
    ("pydicom", "MR_small.dcm", "MR_small_RLE.dcm", 1e-6),
    ("pydicom", "MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 1e-6),
    ("pydicom", "MR_small.dcm", "MR_small_jp2klossless.dcm", 1e-6),
    ("pydicom", "MR_small.dcm", "MR_small_expb.dcm", 1e-6),
    ("pydicom-data", "RG1_UNCR.dcm", "RG1_J2KR.dcm", 1e-6),  # CR MONOCHROME1, lossless J2K
    ("pydicom-data", "RG1_UNCI.dcm", "RG1_J2KI.dcm", 1e-6),  # UNCI is the lossy J2K decoded and stored raw
    ("pydicom-data", "RG1_UNCR.dcm", "RG1_J2KI.dcm", 1e-3),  # lossy vs original
    ("pydicom-data", "RG3_UNCR.dcm", "RG3_J2KR.dcm", 1e-6),
    ("pydicom-data", "RG3_UNCR.dcm", "RG3_J2KI.dcm", 1e-3),
    ("pydicom-data", "MR2_UNCR.dcm", "MR2_J2KR.dcm", 1e-6),
    ("pydicom-data", "MR2_UNCR.dcm", "MR2_J2KI.dcm", 5e-3),
    ("pydicom-data", "US1_UNCR.dcm", "US1_J2KR.dcm", 1e-6),
    ("pydicom-data", "US1_UNCR.dcm", "US1_J2KI.dcm", 1e-2),
    ("pydicom-data", "emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", 1e-6),
    ("pydicom-data", "OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", 1e-6),
]

Outcomes = dict[str, "np.ndarray | SkippedFile"]


def corpus_dir(name: str) -> Path:
    root = CORPORA[name]
    if root is None:
        pytest.skip("pydicom-data (import name data_store) is not installed: pip install -e '.[test]'")
    return root


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcomes]:
    """Every file of every installed corpus → image or SkippedFile, keyed by corpus and relative path."""
    results: dict[str, Outcomes] = {}
    for name, root in CORPORA.items():
        if root is None:
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file())
        start = time.perf_counter()
        results[name] = {}
        for path in files:
            try:
                results[name][path.relative_to(root).as_posix()] = read_image(path, CFG)
            except SkippedFile as exc:
                results[name][path.relative_to(root).as_posix()] = exc
        elapsed = time.perf_counter() - start
        print(f"\n{name}: {len(files)} files in {elapsed:.1f} s ({len(files) / elapsed:.0f} files/s)")
    return results


def count(results: Outcomes) -> dict[str, int]:
    counts = {"loaded": 0, NO_IMAGE: 0, REFUSED: 0}
    for result in results.values():
        counts[result.kind if isinstance(result, SkippedFile) else "loaded"] += 1
    return counts


@pytest.mark.parametrize("name", list(CORPORA))
def test_every_file_loads_or_is_skipped_with_a_reason(outcomes: dict[str, Outcomes], name: str) -> None:
    root = corpus_dir(name)
    results = outcomes[name]
    for rel, result in results.items():
        if isinstance(result, SkippedFile):
            assert result.kind in (NO_IMAGE, REFUSED) and result.reason, rel
            assert str(result) == f"{root / rel}: {result.reason}" and "\n" not in str(result)
        else:
            assert result.dtype == np.float32 and result.shape == (1, SIZE, SIZE), rel
            assert np.isfinite(result).all() and 0.0 <= result.min() and result.max() <= 1.0, rel
    counts = count(results)
    print(f"{name}: {counts}")
    assert counts == EXPECTED_COUNTS[name]
    refused = {rel: r.reason for rel, r in results.items()
               if isinstance(r, SkippedFile) and r.kind == REFUSED}
    assert sorted(refused) == sorted(EXPECTED_REFUSED[name])
    for rel, fragment in EXPECTED_REFUSED[name].items():
        assert fragment in refused[rel], (rel, refused[rel])


@pytest.mark.parametrize("name, rel, what", KNOWN_GOOD, ids=[c[2] for c in KNOWN_GOOD])
def test_known_good_images_load(outcomes: dict[str, Outcomes], name: str, rel: str, what: str) -> None:
    corpus_dir(name)
    image = outcomes[name][rel]
    assert isinstance(image, np.ndarray), f"{what}: {image}"
    assert image.std() > 0.01, f"{what}: image is flat"


@pytest.mark.parametrize("name, a, b, atol", SAME_IMAGE_PAIRS,
                         ids=[f"{c[1]}~{c[2]}" for c in SAME_IMAGE_PAIRS])
def test_encodings_of_one_image_agree(outcomes: dict[str, Outcomes], name: str, a: str, b: str,
                                      atol: float) -> None:
    corpus_dir(name)
    np.testing.assert_allclose(outcomes[name][a], outcomes[name][b], atol=atol, rtol=0)


def test_monochrome1_cr_matches_its_monochrome2_inversion(outcomes: dict[str, Outcomes]) -> None:
    """RG1 is a MONOCHROME1 CR; storing its pixels inverted as MONOCHROME2 must give the same input."""
    root = corpus_dir("pydicom-data")
    ds = read_dataset(root / "RG1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    pixels = ds.pixel_array
    ds.PixelData = (2**ds.BitsStored - 1 - pixels).astype(pixels.dtype).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"
    monochrome1 = outcomes["pydicom-data"]["RG1_J2KR.dcm"]
    np.testing.assert_allclose(preprocess(ds, CFG), monochrome1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rule", ["first", "middle", "last", "max", "mean"])
def test_frame_rules_on_a_real_multi_frame_mr(rule: str) -> None:
    path = corpus_dir("pydicom-data") / "emri_small_jpeg_2k_lossless.dcm"  # 10 frames of 64x64
    frames = read_dataset(path).pixel_array.astype(np.float64)
    pick = {"first": frames[0], "middle": frames[5], "last": frames[9],
            "max": frames.max(0), "mean": frames.mean(0)}
    expected = pick[rule]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    cfg = DataConfig(image_size=64, frame=rule, clip_low_percentile=0.0, clip_high_percentile=100.0)
    np.testing.assert_allclose(read_image(path, cfg)[0], expected, atol=1e-5)


def test_enhanced_ct_window_comes_from_functional_groups() -> None:
    """eCT_Supplemental keeps rescale (-1024) and window (49/102 HU) only in its shared functional groups."""
    path = corpus_dir("pydicom-data") / "eCT_Supplemental.dcm"
    hounsfield = read_dataset(path).pixel_array[1].astype(np.float64) - 1024  # middle of 2 frames
    expected = np.clip((hounsfield - (49 - 51)) / 102, 0, 1)
    cfg = DataConfig(image_size=512, voi_lut=True, clip_low_percentile=0.0, clip_high_percentile=100.0)
    np.testing.assert_allclose(read_image(path, cfg)[0], expected, atol=0.02)

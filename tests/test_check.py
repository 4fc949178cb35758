"""`crosssim check` on a small site folder: counts, skipped reasons, label coverage, privacy, exit codes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from crosssim.config import DataConfig
from crosssim.data.check import (
    EXIT_MISSING_INPUT,
    EXIT_NOTHING_USABLE,
    EXIT_USABLE,
    PROGRESS_EVERY_FILES,
    format_report,
    run_check,
    scan_site,
)

CFG = DataConfig(image_size=16)


def write_dicom(path: Path, rows: int = 20, cols: int = 20, sop_class: str = CTImageStorage,
                pixels: bool = True, **attrs: object) -> Path:
    """A small 12-bit MONOCHROME2 image (or, with ``pixels=False``, an object without pixel data)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    if pixels:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.arange(rows * cols, dtype="<u2").tobytes()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    """3 usable images (one with PatientName), a truncated file, an SR, a text file, labels.csv."""
    root = tmp_path / "site"
    for name in ("ct/series1/IM1", "ct/series1/IM2"):
        write_dicom(root / name, Modality="CT")
    write_dicom(root / "mr" / "a.dcm", 24, 32, MRImageStorage, Modality="MR", PatientName="Doe^Jane",
                PatientBirthDate="19700101")
    broken = write_dicom(root / "broken.dcm", 64, 64, Modality="CT")
    broken.write_bytes(broken.read_bytes()[:-3000])
    write_dicom(root / "report.dcm", sop_class=BasicTextSRStorage, pixels=False, Modality="SR")
    (root / "notes.dcm").write_text("not an image\n")
    (root / ".hidden.dcm").write_bytes(b"ignored")
    (root / "labels.csv").write_text(
        "path,label\n"
        "ct/series1/IM1,normal\n"
        "./mr/a.dcm,abnormal\n"
        "missing.dcm,normal\n"
        "report.dcm,abnormal\n"
    )
    return root


def test_scan_site_counts_and_findings(site: Path) -> None:
    report = scan_site(site, CFG)
    assert (report.files, report.usable) == (6, 3)
    assert report.by_modality == {"CT": 2, "MR": 1}
    assert report.by_photometric == {"MONOCHROME2": 3}
    assert report.by_transfer_syntax == {"Explicit VR Little Endian": 3}
    assert report.by_image_size == {"20x20": 2, "24x32": 1}
    assert report.skipped_by_kind == {"no-image": 1, "refused": 2}
    reasons = {s["path"]: (s["kind"], s["reason"]) for s in report.skipped}
    assert reasons["broken.dcm"][0] == "refused" and "truncated pixel data" in reasons["broken.dcm"][1]
    assert reasons["notes.dcm"] == ("refused", "not a DICOM file")
    assert reasons["report.dcm"] == ("no-image", "no pixel data (Basic Text SR Storage)")

    labels = report.labels
    assert labels is not None and labels.csv == str(site / "labels.csv") and not labels.error
    assert labels.rows == 4
    assert labels.per_class == {"abnormal": 1, "normal": 1}
    assert labels.missing == ["missing.dcm"]
    assert labels.unusable == ["report.dcm"]
    assert labels.unlabeled == ["ct/series1/IM2"]

    assert report.privacy.files == 1
    assert report.privacy.by_tag == {"PatientName": 1, "PatientBirthDate": 1}
    assert report.privacy.examples == ["mr/a.dcm"]

    text = format_report(report)
    for fragment in ("Usable images: 3", "CT 2, MR 1", "refused   notes.dcm: not a DICOM file",
                     "labels pointing at missing files: 1", "usable images without a label: 1",
                     "PRIVACY WARNING: 1 file(s)", "mr/a.dcm"):
        assert fragment in text


def test_burned_in_annotation_and_explicit_labels(site: Path, tmp_path: Path) -> None:
    write_dicom(site / "burned.dcm", Modality="US", BurnedInAnnotation="YES")
    other_labels = tmp_path / "elsewhere.csv"
    other_labels.write_text("path,label\nburned.dcm,normal\n")
    report = scan_site(site, CFG, labels_csv=other_labels)
    assert report.privacy.by_tag["BurnedInAnnotation"] == 1 and "burned.dcm" in report.privacy.examples
    assert report.labels is not None and report.labels.per_class == {"normal": 1}
    assert len(report.labels.unlabeled) == 3


def test_bad_labels_header_is_reported(site: Path) -> None:
    (site / "labels.csv").write_text("file,class\nmr/a.dcm,normal\n")
    report = scan_site(site, CFG)
    assert report.labels is not None and "header must be 'path,label'" in report.labels.error
    assert "Labels: ERROR" in format_report(report)


def test_progress_every_n_files(tmp_path: Path) -> None:
    for i in range(PROGRESS_EVERY_FILES + 1):
        (tmp_path / f"f{i:04d}.txt").write_bytes(b"")
    messages: list[str] = []
    report = scan_site(tmp_path, CFG, progress=messages.append)
    assert messages == [f"checked {PROGRESS_EVERY_FILES}/{PROGRESS_EVERY_FILES + 1} files"]
    assert report.usable == 0 and report.labels is None


def test_run_check_json_and_exit_codes(site: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run_check(str(site), None, CFG, as_json=True) == EXIT_USABLE
    data = json.loads(capsys.readouterr().out)
    assert data["usable"] == 3 and data["labels"]["missing"] == ["missing.dcm"]
    assert data["privacy"]["files"] == 1 and data["skipped_by_kind"] == {"no-image": 1, "refused": 2}

    assert run_check(str(site), None, CFG, as_json=False) == EXIT_USABLE
    assert "Usable images: 3" in capsys.readouterr().out

    empty = tmp_path / "only_junk"
    empty.mkdir()
    (empty / "x.dcm").write_text("hello")
    assert run_check(str(empty), None, CFG, as_json=False) == EXIT_NOTHING_USABLE
    assert "No usable image" in capsys.readouterr().out

    assert run_check(str(tmp_path / "nowhere"), None, CFG, as_json=False) == EXIT_MISSING_INPUT
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "site folder not found" in captured.err

    assert run_check(str(site), str(tmp_path / "no.csv"), CFG, as_json=False) == EXIT_MISSING_INPUT
    assert "labels file not found" in capsys.readouterr().err


def test_labels_outside_the_configured_classes_are_counted(site: Path) -> None:
    cfg = dataclasses.replace(CFG, classes=("normal",))
    report = scan_site(site, cfg)
    # rows, as training counts them
    assert report.labels is not None and report.labels.outside_classes == {"abnormal": 2}
    assert "labels outside the configured classes ['normal']: abnormal 2: training refuses this site" \
        in format_report(report)

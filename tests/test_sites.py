"""Site loading, the hospital-side cache, corrupt files and read-only sources."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosssim.config import load_config
from crosssim.data.cache import SiteCache
from crosssim.data.sites import SiteError, load_site

TINY_IMAGES_PER_SITE = 12
TINY_IMAGE_SIZE_PX = 32


@pytest.fixture(scope="module")
def tiny_hospitals(tmp_path_factory):
    from crosssim.data.synth import generate_hospitals

    return generate_hospitals(tmp_path_factory.mktemp("sites_tiny"), images_per_site=TINY_IMAGES_PER_SITE,
                              image_size=TINY_IMAGE_SIZE_PX)


@pytest.fixture
def site_copy(tiny_hospitals, tmp_path) -> Path:
    """A private copy of one labeled site that a test may damage."""
    return Path(shutil.copytree(tiny_hospitals.source_sites[0], tmp_path / "site"))


def _data_cfg(**overrides):
    return load_config(overrides={"image-size": TINY_IMAGE_SIZE_PX, **overrides}).data


def _tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_labeled_site_loads_every_image_with_its_label(tiny_hospitals, tmp_path):
    site = load_site(tiny_hospitals.source_sites[0], _data_cfg(), cache_dir=tmp_path)
    assert site.images.shape == (TINY_IMAGES_PER_SITE, 1, TINY_IMAGE_SIZE_PX, TINY_IMAGE_SIZE_PX)
    assert site.images.dtype == torch.float32 and torch.isfinite(site.images).all()
    assert site.labels is not None and len(site.labels) == TINY_IMAGES_PER_SITE
    assert sum(site.report.class_counts.values()) == TINY_IMAGES_PER_SITE
    assert site.report.skipped == []


def test_cache_hit_returns_identical_tensors_and_config_change_invalidates(tiny_hospitals, tmp_path):
    folder = tiny_hospitals.source_sites[1]
    first = load_site(folder, _data_cfg(), cache_dir=tmp_path)
    second = load_site(folder, _data_cfg(), cache_dir=tmp_path)
    assert first.report.from_cache == 0
    assert second.report.from_cache == TINY_IMAGES_PER_SITE
    assert torch.equal(first.images, second.images)
    changed = load_site(folder, _data_cfg(**{"clip-high-percentile": 98.0}), cache_dir=tmp_path)
    assert changed.report.from_cache == 0
    assert not torch.equal(changed.images, first.images)
    resized = load_site(folder, _data_cfg(**{"image-size": 24}), cache_dir=tmp_path)
    assert resized.report.from_cache == 0 and resized.images.shape[-1] == 24


def test_modified_file_is_reread(site_copy, tmp_path):
    load_site(site_copy, _data_cfg(), cache_dir=tmp_path)
    victim = sorted(site_copy.rglob("*.dcm"))[0]
    victim.write_bytes(victim.read_bytes())  # same bytes, new mtime
    again = load_site(site_copy, _data_cfg(), cache_dir=tmp_path)
    assert again.report.from_cache == TINY_IMAGES_PER_SITE - 1


def test_corrupt_files_are_skipped_and_reported(site_copy, tmp_path):
    victim = sorted(site_copy.rglob("*.dcm"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 4 // 5])  # cut mid-transfer, inside the pixel data
    (site_copy / "notes.dcm").write_text("this is not an image\n")
    site = load_site(site_copy, _data_cfg(), cache_dir=tmp_path)
    skipped = {s.path: s for s in site.report.skipped}
    rel_victim = victim.relative_to(site_copy).as_posix()
    assert set(skipped) == {rel_victim, "notes.dcm"}
    assert all(s.kind == "refused" and s.reason for s in skipped.values())
    assert len(site) == TINY_IMAGES_PER_SITE - 1
    assert site.report.unlabeled_images == 0  # notes.dcm never became an image


def test_site_without_readable_image_is_one_clear_error(tmp_path):
    folder = tmp_path / "empty-site"
    folder.mkdir()
    (folder / "a.dcm").write_text("garbage")
    (folder / "labels.csv").write_text("path,label\na.dcm,normal\n")
    with pytest.raises(SiteError, match=r"empty-site: no usable DICOM image among 1 files"):
        load_site(folder, _data_cfg(), cache_dir=tmp_path / "cache")
    result = subprocess.run([sys.executable, "-m", "crosssim.cli", "train", "--sites", str(folder),
                             "--out", str(tmp_path / "run"), "--cache", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and "empty-site: no usable DICOM image" in error_lines[0]


def test_bad_labels_header_names_the_file(site_copy, tmp_path):
    (site_copy / "labels.csv").write_text("file,class\nx.dcm,normal\n")
    with pytest.raises(SiteError, match=r"labels.csv: header must be 'path,label'"):
        load_site(site_copy, _data_cfg(), cache_dir=tmp_path)


def test_cache_refuses_to_live_inside_the_source_folder(site_copy):
    with pytest.raises(ValueError, match="must not live inside the source folder"):
        SiteCache.open(site_copy / ".cache", site_copy, _data_cfg())


def test_training_proceeds_past_a_corrupt_file_and_leaves_the_source_untouched(site_copy, tiny_hospitals,
                                                                               tmp_path):
    from crosssim.centralized import train_pooled
    from crosssim.checkpoint import load_checkpoint

    (site_copy / "broken.dcm").write_bytes(b"DICM" * 10)
    before = _tree_digest(site_copy)
    cfg = load_config(overrides={"image-size": TINY_IMAGE_SIZE_PX, "epochs": 1, "batch-size": 8,
                                 "min-count": 1, "device": "cpu"})
    checkpoint = train_pooled([site_copy, tiny_hospitals.source_sites[1]], cfg, tmp_path / "run",
                              cache_dir=tmp_path / "cache", progress=None)
    assert _tree_digest(site_copy) == before
    assert load_checkpoint(checkpoint).classes == ["effusion", "mass", "nodule", "normal"]  # union of the labels
    report = (tmp_path / "run" / "data_report.json").read_text()
    assert "broken.dcm" in report

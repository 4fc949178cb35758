"""A consortium's own labels work on the first try: classes are never silently wrong."""

import shutil
from collections import Counter

from crosssim.checkpoint import load_checkpoint
from crosssim.cli import main as crosssim_main
from crosssim.config import load_config
from crosssim.data.sites import LABELS_FILENAME, read_labels_csv, write_labels_csv

TINY = ["--set", "image-size=32", "--set", "epochs=1", "--set", "batch-size=8", "--set", "min-count=1",
        "--set", "device=cpu"]


def label_counts(sites) -> dict[str, int]:
    return dict(Counter(label for site in sites for label in read_labels_csv(site / LABELS_FILENAME).values()))


def test_train_without_classes_takes_the_sorted_union_and_counts_every_image(binary_sites, tmp_path, capsys):
    run = tmp_path / "run"
    assert crosssim_main(["train", "--sites", *map(str, binary_sites), "--out", str(run),
                          "--cache", str(tmp_path / "cache"), *TINY]) == 0
    assert "classes (sorted union of the sites' labels; set 'classes' to fix them): abnormal, normal" \
        in capsys.readouterr().out
    checkpoint = load_checkpoint(run / "final.pt")
    assert checkpoint.classes == ["abnormal", "normal"]
    assert checkpoint.extra["class_counts"] == label_counts(binary_sites)
    assert load_config(run / "config.toml").data.classes == ("abnormal", "normal")  # the run records its classes


def test_a_label_outside_the_configured_classes_is_one_line_naming_the_file(binary_sites, tmp_path, capsys):
    site = shutil.copytree(binary_sites[0], tmp_path / "site")
    labels = list(read_labels_csv(site / LABELS_FILENAME).items())
    write_labels_csv(site / LABELS_FILENAME,
                     [(p, "effusion" if i < 2 else label) for i, (p, label) in enumerate(labels)])
    assert crosssim_main(["train", "--sites", str(site), "--out", str(tmp_path / "run"), "--cache",
                          str(tmp_path / "cache"), "--set", "classes=abnormal,normal", *TINY]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1, error
    assert str(site / LABELS_FILENAME) in error[0] and "'effusion' ×2" in error[0]
    assert not (tmp_path / "run" / "final.pt").exists()  # never trained on a silently reduced set


def test_server_without_classes_refuses_to_start_with_one_line(tmp_path, capsys):
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--dry-run"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no classes: pass --classes" in error[0]
    assert not (tmp_path / "run").exists()

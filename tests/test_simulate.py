"""`crosssim simulate`: a whole tiny federation in Flower's Simulation Engine, as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from crosssim.checkpoint import load_checkpoint
from crosssim.data.sites import LABELS_FILENAME, read_labels_csv

RUN_TIMEOUT_S = 300  # Ray start-up dominates (tens of seconds on 2 cores)
EXIT_GRACE_S = 30  # Ray's worker processes finish exiting shortly after the driver
TINY = ["--set", "image-size=32", "--set", "batch-size=8", "--set", "local-epochs=1", "--set", "min-count=2",
        "--set", "augment=false"]


def _group_ends(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.e2e
def test_simulate_two_sites_two_rounds_with_the_sites_own_classes(tmp_path, binary_sites):
    sites = binary_sites[:2]  # labels.csv say normal / abnormal; no config names the classes
    run = tmp_path / "run"
    command = [sys.executable, "-m", "crosssim.cli", "simulate", "--sites", *map(str, sites), "--strategy", "crosssim",
               "--rounds", "2", "--out", str(run), "--cache", str(tmp_path / "cache"), *TINY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-3000:]
    assert _group_ends(process.pid, EXIT_GRACE_S), "processes it started (Ray) outlived it"

    lines = output.strip().splitlines()
    assert any(line.startswith("round 1/2:") for line in lines) and any(line.startswith("round 2/2:") for line in lines)
    assert lines[-1] == f"done: {run / 'final.pt'}"
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["sites"] == 2 for r in rounds)
    assert rounds[0]["lambda"] == 0.0 < rounds[1]["lambda"]  # no prototypes before round 2
    for name in ("round-0001.pt", "round-0002.pt", "latest.pt", "final.pt", "config.toml"):
        assert (run / name).is_file(), name
    final = load_checkpoint(run / "final.pt")
    assert final.kind == "federated" and final.round == 2 and final.source is not None
    assert final.classes == ["abnormal", "normal"]
    assert "classes (sorted union of the sites' labels; set 'classes' to fix them): abnormal, normal" in lines
    counts = Counter(label for site in sites for label in read_labels_csv(site / LABELS_FILENAME).values())
    assert final.extra["class_counts"] == dict(counts)  # every image of every site trained (each class ≥ min-count)
    assert sum(line.startswith("node ") for line in lines) == 2  # round 1 shows what each site brings


def test_a_target_in_the_loop_needs_the_style_bank(tmp_path, capsys):
    from crosssim.cli import main as crosssim_main
    from crosssim.data.synth import generate_hospitals

    hospitals = generate_hospitals(tmp_path / "sites", images_per_site=8, image_size=32)
    argv = ["simulate", "--sites", *map(str, hospitals.source_sites), "--target", str(hospitals.target_site),
            "--out", str(tmp_path / "run"), "--rounds", "1", *TINY]
    assert crosssim_main(argv) == 1  # the default: style bank off
    error = capsys.readouterr().err.strip()
    assert "--target" in error and "style-mix-probability > 0" in error and "\n" not in error
    assert not (tmp_path / "run").exists()

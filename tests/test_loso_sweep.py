"""Choosing a default by leaving one source out (benchmarks/loso_sweep.py): never reads the target's labels to
choose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import accuracy as acc
from benchmarks import loso_sweep as sweep
from tests.bench_fakes import TARGET, TINY, evaluate_out_dirs, fake_sites, write_csv

SOURCE_IMAGES = ["images/00000.dcm", "images/00001.dcm"]
CANDIDATES = {"small": {"lambda-sim": "0"}, "mid": {"lambda-sim": "0.5"}, "large": {"lambda-sim": "2"}}


class FakeSweepCrosssim:
    """Stands in for ``crosssim.cli.main``: a model's accuracy on a held-out source depends on λ (best at 0.5)
    and on the adaptation; on the target every model scores 0.5. Records which label files evaluations read."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.label_files: list[str] = []

    def __call__(self, argv: list[str], log: Path) -> None:
        self.calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if argv[0] == "simulate":
            lam = next(float(a.split("=")[1]) for a in argv if a.startswith("lambda-sim="))
            (out / "final.pt").write_text(json.dumps({"lambda": lam}))
            return
        lam = json.loads(Path(argv[argv.index("--checkpoint") + 1]).read_text())["lambda"]
        self.label_files.append(argv[argv.index("--labels") + 1])
        on_target = argv[argv.index("--data") + 1].endswith("/target")
        rows = [[path, "a", "0.900000", "0.9", "0.1"] for path, _ in TARGET]
        for adapt, folder in evaluate_out_dirs(argv).items():
            adabn_bonus = 0.1 if adapt == "adabn" else 0.0  # crosssim/auto: no bonus
            accuracy = 0.5 if on_target else {0.0: 0.6, 0.5: 0.8, 2.0: 0.7}[lam] + adabn_bonus
            folder.mkdir(parents=True, exist_ok=True)
            write_csv(folder / "predictions.csv", ["path", "pred", "confidence", "p_a", "p_b"], rows)
            (folder / "metrics.json").write_text(json.dumps({
                "label_free": {"n_images": len(TARGET), "atc_threshold": 0.5, "atc_estimated_accuracy": 0.75},
                "labeled": {"accuracy": accuracy, "balanced_accuracy": accuracy}}))


def test_a_candidate_is_chosen_on_held_out_sources_then_scored_once_on_the_target(tmp_path: Path) -> None:
    fake = FakeSweepCrosssim()

    def prepare(name, out_dir, *, seed, size, limit, cache_dir, progress):
        sites = fake_sites(Path(out_dir) / name)
        for site in sites.source_sites:
            write_csv(site / "labels.csv", ["path", "label"], [[p, "a"] for p in SOURCE_IMAGES])
        return sites

    doc = sweep.run_sweep("lambda", "synthetic", [0], CANDIDATES, tmp_path / "work", tmp_path / "results",
                          protocol=TINY, crosssim=fake, prepare=prepare)
    record = doc["runs"]["0"]
    assert record["chosen"] == "mid"
    assert record["mean_held_out_accuracy"] == pytest.approx({"small": 0.65, "mid": 0.85, "large": 0.75})
    # 3 candidates × 3 held-out sources, each trained on the two others; then one run on all three sources
    simulations = [c for c in fake.calls if c[0] == "simulate"]
    assert len(simulations) == 10
    assert all(len(c[c.index("--sites") + 1:c.index("--out")]) == 2 for c in simulations[:9])
    assert len(simulations[-1][simulations[-1].index("--sites") + 1:simulations[-1].index("--out")]) == 3
    # the choice reads only source labels (every held-out adaptation); the target's are read after, to score it
    target_reads = [i for i, f in enumerate(fake.label_files) if f.endswith("target_labels.csv")]
    source_reads = 9 * len(sweep.HELD_OUT_ADAPTS)
    assert len(fake.label_files) - len(target_reads) == source_reads and min(target_reads) == source_reads
    assert set(record["target"]) == set(acc.ADAPTS)
    held = record["held_out_accuracy"]["mid"]
    assert set(held) == {"s1", "s2", "s3"} and set(held["s1"]) == set(sweep.HELD_OUT_ADAPTS)
    assert held["s1"]["crosssim"]["atc_abs_error"] == pytest.approx(0.05)  # |0.75 − 0.8|: estimator evidence
    saved = json.loads((tmp_path / "results" / "loso-lambda-synthetic.json").read_text())
    assert saved["runs"]["0"]["chosen"] == "mid"


def test_ties_go_to_the_candidate_listed_first() -> None:
    assert sweep.choose({"b": 0.7, "a": 0.7, "c": 0.6}) == "b"


def test_candidates_parse_from_the_command_line() -> None:
    assert sweep.parse_candidate("mix0:style-mix-probability=0,pair-loss=false") == (
        "mix0", {"style-mix-probability": "0", "pair-loss": "false"})
    assert sweep.parse_candidate("defaults:") == ("defaults", {})


def test_sweep_table_row_and_results_md_section(tmp_path: Path) -> None:
    from benchmarks import run_all

    doc = {"study": "lambda", "suite": "synthetic", "candidates": {"small": {"lambda-sim": "0"}, "mid": {}},
           "runs": {"0": {"mean_held_out_accuracy": {"small": 0.61, "mid": 0.64}, "chosen": "mid",
                          "target": {"none": {"accuracy": 0.55}, "adabn": {"accuracy": 0.6}}}}}
    assert "| synthetic | 0 | 0.610 | 0.640 | mid | 0.550 | 0.600 |" in sweep.sweep_table(doc)
    (tmp_path / "loso-lambda-synthetic.json").write_text(json.dumps(doc))
    text = run_all.write_results_md(tmp_path, tmp_path / "RESULTS.md", generated="now",
                                    commit={"commit": None, "dirty": None}).read_text()
    assert "## Choosing defaults without target labels" in text and "loso-lambda-synthetic.json" not in text
    assert "small: `lambda-sim=0`; mid: `defaults`" in text


class FakeAdaptCrosssim:
    """Every model scores 0.6 after AdaBN; after ``--adapt crosssim`` its accuracy depends on ``shot-lr``."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], log: Path) -> None:
        self.calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if argv[0] == "simulate":
            (out / "final.pt").write_text("stand-in")
            return
        lr = next((a.split("=")[1] for a in argv if a.startswith("shot-lr=")), "default")
        accuracy = {"default": 0.6, "3e-5": 0.7, "1e-3": 0.5}[lr] if "crosssim" in argv else 0.6
        (out / "metrics.json").write_text(json.dumps({
            "label_free": {"n_images": 4, "atc_estimated_accuracy": 0.6},
            "labeled": {"accuracy": accuracy, "balanced_accuracy": accuracy}}))


def test_an_adaptation_study_trains_each_fold_once_and_chooses_on_held_out_sources(tmp_path: Path) -> None:
    fake = FakeAdaptCrosssim()
    candidates = {"fast": {"shot-lr": "1e-3"}, "slow": {"shot-lr": "3e-5"}}
    assert sweep.is_adaptation_study(candidates) and not sweep.is_adaptation_study(CANDIDATES)
    doc = sweep.run_sweep("shot", "synthetic", [0], candidates, tmp_path / "work", tmp_path / "results",
                          protocol=TINY, crosssim=fake, prepare=lambda name, out, **_: fake_sites(Path(out) / name))
    record = doc["runs"]["0"]
    assert record["chosen"] == "slow"
    assert record["mean_held_out_accuracy"] == pytest.approx({"fast": 0.5, "slow": 0.7})
    assert len([c for c in fake.calls if c[0] == "simulate"]) == 3 + 1  # one per fold, then all sources
    assert record["target"]["crosssim"]["accuracy"] == 0.7 and record["target"]["adabn"]["accuracy"] == 0.6
    target_evals = [c for c in fake.calls if c[0] == "evaluate" and c[c.index("--data") + 1].endswith("target")]
    assert len(target_evals) == 3 and all("shot-lr=1e-3" not in c for c in target_evals)

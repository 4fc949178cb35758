"""The accuracy benchmark runner (benchmarks/accuracy.py) and RESULTS.md (benchmarks/run_all.py).

No training: the ``crosssim`` commands are replaced by a fake that writes what the real ones write
(final.pt, metrics.json, predictions.csv), so the loop, the scoring and the aggregation run for real.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import accuracy as acc
from benchmarks import few_shot
from benchmarks import run_all
from tests.bench_fakes import CLASSES, HELDOUT, TARGET, TINY, evaluate_out_dirs, fake_sites, write_csv

class FakeCrosssim:
    """Stands in for ``crosssim.cli.main``: every model predicts class ``a`` with confidence 0.9, except
    models trained on site s2, which predict the true class; the ATC estimate is always 0.75."""

    def __init__(self, fail_method: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_method = fail_method

    def __call__(self, argv: list[str], log: Path) -> None:
        self.calls.append(argv)
        if self.fail_method and f"/{self.fail_method}/" in argv[argv.index("--out") + 1] + "/":
            raise RuntimeError("simulated failure")
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if argv[0] in ("train", "simulate"):
            (out / "final.pt").write_text(json.dumps({"sites": argv[argv.index("--sites") + 1:]}))
            return
        trained_on = json.loads(Path(argv[argv.index("--checkpoint") + 1]).read_text())["sites"]
        perfect = any(site.endswith("/s2") for site in trained_on)
        rows = [[path, label if perfect else "a", "0.900000", "0.9", "0.1"] for path, label in TARGET]
        metrics = {"label_free": {"n_images": len(TARGET), "atc_threshold": 0.5, "atc_estimated_accuracy": 0.75}}
        if "--labels" in argv:
            metrics["labeled"] = {"accuracy": 1.0 if perfect else 0.5, "balanced_accuracy": 1.0 if perfect else 0.5}
        for folder in evaluate_out_dirs(argv).values():
            folder.mkdir(parents=True, exist_ok=True)
            write_csv(folder / "predictions.csv", ["path", "pred", "confidence", "p_a", "p_b"], rows)
            (folder / "metrics.json").write_text(json.dumps(metrics))


def run(tmp_path: Path, crosssim: FakeCrosssim, seeds=(0,), protocol: acc.Protocol = TINY, **kwargs) -> dict:
    def prepare(name, out_dir, *, seed, size, limit, cache_dir, progress):
        assert size == protocol.size and limit == protocol.limit
        return fake_sites(Path(out_dir) / name)

    return acc.run_suite("synthetic", list(seeds), protocol, tmp_path / "work", results_dir=tmp_path / "results",
                         prepare=prepare, crosssim=crosssim, progress=lambda line: None, **kwargs)


# ---------------------------------------------------------------- aggregation


def test_mean_std_is_sample_std_over_present_values() -> None:
    stat = acc.mean_std([0.5, None, 0.7, 0.6])
    assert stat.n == 3 and stat.mean == pytest.approx(0.6) and stat.std == pytest.approx(0.1)
    assert acc.mean_std([0.4]) == acc.Stat(0.4, None, 1)
    assert acc.mean_std([None]) == acc.Stat(None, None, 0)
    assert acc.format_stat(acc.Stat(0.6, 0.1, 3)) == "0.600 ± 0.100"
    assert acc.format_stat(acc.Stat(0.4, None, 1)) == "0.400"
    assert acc.format_stat(None) == "–"


def test_local_only_is_the_mean_over_sources_and_atc_error_is_a_mean_absolute_error() -> None:
    per_source = {  # errors +0.2 and -0.2: the mean error is 0, the mean absolute error 0.2
        "s1": {a: {"accuracy": 0.4, "balanced_accuracy": 0.3, "atc_estimated_accuracy": 0.6,
                   "atc_abs_error": 0.2} for a in acc.ADAPTS},
        "s2": {a: {"accuracy": 0.8, "balanced_accuracy": 0.7, "atc_estimated_accuracy": 0.6,
                   "atc_abs_error": 0.2} for a in acc.ADAPTS},
    }
    mean = acc.mean_over_sources(per_source)
    assert set(mean) == set(acc.ADAPTS)
    assert mean["none"]["accuracy"] == pytest.approx(0.6)
    assert mean["none"]["balanced_accuracy"] == pytest.approx(0.5)
    assert mean["none"]["atc_abs_error"] == pytest.approx(0.2)
    assert mean["none"]["n_sources"] == 2


def test_figures_from_metrics_take_the_absolute_atc_error() -> None:
    metrics = {"label_free": {"n_images": 10, "atc_estimated_accuracy": 0.55},
               "labeled": {"accuracy": 0.75, "balanced_accuracy": 0.6}}
    figures = acc.figures_from_metrics(metrics)
    assert figures["atc_abs_error"] == pytest.approx(0.2)
    assert figures["accuracy"] == 0.75 and figures["balanced_accuracy"] == 0.6
    metrics["label_free"]["atc_estimated_accuracy"] = None  # a checkpoint without source statistics
    assert acc.figures_from_metrics(metrics)["atc_abs_error"] is None


def test_summarize_over_seeds() -> None:
    doc = {"runs": {str(seed): {"pooled": {"figures": {"none": {"accuracy": value, "balanced_accuracy": value,
                                                                  "atc_abs_error": 0.1}}}}
                    for seed, value in enumerate([0.5, 0.7, 0.6])}}
    stats = acc.summarize(doc)["pooled"]["none"]
    assert stats["accuracy"].mean == pytest.approx(0.6) and stats["accuracy"].std == pytest.approx(0.1)
    assert stats["atc_abs_error"].std == pytest.approx(0.0) and stats["accuracy"].n == 3


# ---------------------------------------------------------------- oracle scoring


def test_oracle_scoring_uses_only_the_heldout_paths(tmp_path: Path) -> None:
    predictions = {path: ("a", 0.9 if i < 4 else 0.3) for i, (path, _) in enumerate(TARGET)}
    labels = {"images/00000.dcm": "a", "images/00001.dcm": "b", "images/00004.dcm": "a", "images/00005.dcm": "b"}
    scored = acc.score_on_labels(predictions, labels, CLASSES, atc_threshold=0.5)
    assert scored["n_images"] == 4
    assert scored["accuracy"] == pytest.approx(0.5)
    assert scored["balanced_accuracy"] == pytest.approx(0.5)  # recall 1 for a, 0 for b
    assert scored["atc_estimated_accuracy"] == pytest.approx(0.5)  # 2 of the 4 held-out confidences > 0.5
    assert scored["atc_abs_error"] == pytest.approx(0.0)
    assert acc.score_on_labels(predictions, labels, CLASSES, None)["atc_abs_error"] is None
    with pytest.raises(ValueError, match="no prediction"):
        acc.score_on_labels(predictions, {**labels, "images/99999.dcm": "a"}, CLASSES, 0.5)


def test_predictions_csv_round_trip(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "predictions.csv", ["path", "pred", "confidence", "p_a", "p_b"],
                     [["x/1.dcm", "b", "0.750000", "0.25", "0.75"]])
    assert acc.read_predictions(path) == {"x/1.dcm": ("b", 0.75)}


# ---------------------------------------------------------------- the loop, skip-if-present, failures


def test_run_suite_records_every_method_and_skips_finished_work(tmp_path: Path) -> None:
    fake = FakeCrosssim()
    doc = run(tmp_path, fake, seeds=(0, 1))
    path = tmp_path / "results" / "accuracy-synthetic.json"
    assert json.loads(path.read_text())["runs"] == doc["runs"]
    assert set(doc["runs"]) == {"0", "1"} and all(set(r) == set(acc.METHODS) for r in doc["runs"].values())
    record = doc["runs"]["0"]
    # local-only: three trainings, each evaluated once with every adaptation; s2's model is perfect, the others 0.5
    local_commands = record["local-only"]["commands"]
    assert len(local_commands) == 3 * 2 and all(c.startswith("crosssim ") for c in local_commands)
    assert record["local-only"]["figures"]["none"]["accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert record["local-only"]["figures"]["tent"]["atc_abs_error"] == pytest.approx((0.25 + 0.25 + 0.25) / 3)
    assert set(record["local-only"]["per_source"]) == {"s1", "s2", "s3"}
    assert record["pooled"]["figures"]["adabn"]["accuracy"] == 1.0  # trained on s1, s2, s3
    pooled_commands = record["pooled"]["commands"]
    assert pooled_commands[0].startswith("crosssim train --sites ") and "strategy=fedavg" in pooled_commands[0]
    assert any(f"--adapt {' '.join(acc.ADAPTS)} --set tent-steps=3" in c for c in pooled_commands)
    simulate = record["crosssim-contrastive"]["commands"][0]
    assert "simulate" in simulate and "similarity=contrastive" in simulate and "--rounds 2" in simulate
    assert "--seed 0" in simulate and "classes=a,b" in simulate
    # the oracle is evaluated without labels and scored on the held-out half only
    oracle = record["oracle"]
    assert "--labels" not in oracle["commands"][1] and set(oracle["figures"]) == {"none"}
    assert oracle["figures"]["none"]["n_images"] == len(HELDOUT)
    assert oracle["figures"]["none"]["accuracy"] == pytest.approx(0.5)  # predicts a; the half is a, b, a, b
    assert oracle["figures"]["none"]["atc_abs_error"] == pytest.approx(0.5)  # every confidence 0.9 > 0.5
    assert record["fedavg"]["figures"]["none"]["heldout_accuracy"] == 1.0  # every method also on the oracle's half
    assert record["local-only"]["per_source"]["s1"]["tent"]["heldout_accuracy"] == 0.5
    assert doc["environment"]["cpu_count"] and doc["classes"] == list(CLASSES) and "commit" in record["oracle"]

    calls = len(fake.calls)
    run(tmp_path, fake, seeds=(0, 1), resume=True)  # everything is in the results file: nothing runs again
    assert len(fake.calls) == calls
    run(tmp_path, fake, seeds=(0, 1, 2), methods=["pooled"], resume=True)  # only the new (seed, method) runs
    per_method = 2  # one training, one evaluation of every adaptation
    assert len(fake.calls) == calls + per_method
    run(tmp_path, fake, seeds=(0,), methods=["pooled"])  # without resume: measured again
    assert len(fake.calls) == calls + 2 * per_method
    other = acc.Protocol("quick", "quick", 5, 3, 1, 3, 3, {})  # another protocol: earlier figures do not count
    run(tmp_path, fake, seeds=(0,), methods=["fedbn"], protocol=other, resume=True)
    assert len(fake.calls) == calls + 3 * per_method


def test_resume_skips_only_results_of_the_same_protocol_and_code() -> None:
    key = TINY.for_suite("synthetic")
    doc = {"runs": {"0": {"pooled": {"protocol": key, "code": "abc", "figures": {}},
                          "fedavg": {"protocol": {**key, "rounds": 99}, "code": "abc", "figures": {}},
                          "fedbn": {"protocol": key, "code": "older", "figures": {}}}}}
    methods = ["pooled", "fedavg", "fedbn", "oracle"]
    assert acc.pending_methods(doc, 0, methods, key, "abc", resume=True) == ["fedavg", "fedbn", "oracle"]
    assert acc.pending_methods(doc, 1, ["pooled"], key, "abc", resume=True) == ["pooled"]
    assert acc.pending_methods(doc, 0, methods, key, "abc") == methods


def test_code_fingerprint_follows_source_contents_but_not_results(tmp_path: Path) -> None:
    (tmp_path / "crosssim").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "crosssim" / "train.py").write_text("lr = 1\n")
    first = acc.code_fingerprint(tmp_path)
    (tmp_path / "benchmarks" / "results" / "accuracy-synthetic.json").write_text("{}")
    assert acc.code_fingerprint(tmp_path) == first
    (tmp_path / "crosssim" / "train.py").write_text("lr = 2\n")
    assert acc.code_fingerprint(tmp_path) != first


def test_a_failed_method_is_recorded_and_retried(tmp_path: Path) -> None:
    doc = run(tmp_path, FakeCrosssim(fail_method="fedprox"))
    assert "fedprox" not in doc["runs"]["0"] and "fedbn" in doc["runs"]["0"]
    assert "simulated failure" in doc["failures"]["0"]["fedprox"]["error"]
    retry = FakeCrosssim()
    doc = run(tmp_path, retry, resume=True)  # only the failed method runs again
    assert {c[0] for c in retry.calls} == {"simulate", "evaluate"} and len(retry.calls) == 2
    assert "fedprox" in doc["runs"]["0"] and not doc["failures"]["0"]


def test_quick_protocol_constants_are_consistent() -> None:
    assert acc.QUICK.epochs == acc.QUICK_ROUNDS * acc.QUICK_LOCAL_EPOCHS
    assert acc.FULL.size == "full" and acc.QUICK.size == "quick"
    assert acc.results_path("digits", acc.FULL, Path("r")) == Path("r/accuracy-digits-full.json")
    assert acc.QUICK.for_suite("digits")["image_size_px"] == acc.DIGITS_IMAGE_SIZE_PX
    assert "rounds" in acc.QUICK.describe()


# ---------------------------------------------------------------- RESULTS.md


def test_results_md_renders_from_json(tmp_path: Path) -> None:
    run(tmp_path, FakeCrosssim(), seeds=(0, 1))
    results = tmp_path / "results"
    (results / "load.json").write_text(json.dumps({"machine": "test-machine", "repeats": 1, "rows": {
        "synthetic hospital-a": {"files": 10, "images": 10, "cold_s": 1.0, "cached_s": 0.1, "speedup": 10.0}}}))
    (results / "perf.json").write_text(json.dumps({"date": "2000-01-01", "table": "| step | A | B |"}))
    out = run_all.write_results_md(results, tmp_path / "RESULTS.md", generated="2000-01-01T00:00:00+00:00",
                                   commit={"commit": "abcdef1234567890", "dirty": False})
    text = out.read_text()
    assert "Generated 2000-01-01T00:00:00+00:00" in text and "abcdef123456" in text
    assert "| method | synthetic |" in text  # overview: methods × suites
    assert "| local-only (mean over sources) | 0.667 ± 0.000 |" in text  # two identical seeds
    assert "| target oracle (held-out half) | 2 | 0.500 ± 0.000 | – | – |" in text
    assert "python benchmarks/accuracy.py --suites synthetic --seeds 2" in text
    assert "crosssim simulate --sites" in text and "# crosssim-contrastive" in text
    assert "| synthetic hospital-a | 10 | 10 | 1.00 | 0.100 | 10.0× |" in text
    assert "## System performance, side by side" in text and "| step | A | B |" in text
    assert "machine:" in text and "CPU(s)" in text


def test_results_md_without_results(tmp_path: Path) -> None:
    text = run_all.render_results_md([], generated="now", commit={"commit": None, "dirty": None})
    assert "No accuracy results yet" in text and "unknown" in text


def test_results_written_by_the_run_do_not_mark_the_tree_dirty(tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "accuracy-synthetic.json").write_text("{}")
    (tmp_path / "train.py").write_text("lr = 1\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (tmp_path / "benchmarks" / "results" / "accuracy-synthetic.json").write_text('{"runs": {}}')
    assert acc.git_commit(tmp_path)["dirty"] is False
    (tmp_path / "train.py").write_text("lr = 2\n")
    assert acc.git_commit(tmp_path)["dirty"] is True


def test_make_bench_steps_pass_size_and_resume_to_the_scripts() -> None:
    quick = run_all.bench_steps(run_all.parse_args([]), python="py")
    assert [Path(step[1]).name for step in quick] == ["accuracy.py", "few_shot.py"]
    assert "--full" not in quick[0] and "--resume" not in quick[0]
    system = run_all.bench_steps(run_all.parse_args(["--system"]), python="py")
    assert [Path(step[1]).name for step in system] == ["perf.py", "load.py", "serve.py"] and system[0][2] == "--quick"
    assert run_all.bench_steps(run_all.parse_args(["--system", "--full"]), python="py")[0][2] == "--full"
    assert quick[0][2:4] == ["--seeds", str(acc.DEFAULT_SEEDS)]
    assert quick[0][quick[0].index("--methods") + 1:] == list(acc.BENCH_METHODS)
    few_shot = quick[1]
    assert few_shot[few_shot.index("--shots") + 1] == "5" and few_shot[few_shot.index("--seeds") + 1] == "3"
    ablation = run_all.bench_steps(run_all.parse_args(["--ablation", "--resume", "--work", "w"]), python="py")
    assert [Path(step[1]).name for step in ablation[:3]] == ["accuracy.py", "accuracy.py", "few_shot.py"]
    rows = ablation[1]
    assert rows[rows.index("--methods") + 1:rows.index("--work")] == list(acc.ABLATION_METHODS)
    assert rows[rows.index("--suites") + 1:rows.index("--methods")] == list(acc.ABLATION_SUITES)
    assert rows[-3:] == ["--work", "w", "--resume"] and ablation[2][-2:] == ["--work", "w"]
    full = run_all.bench_steps(run_all.parse_args(["--full", "--resume", "--seeds", "2"]), python="py")
    assert full[0][2:] == ["--seeds", "2", "--jobs", str(run_all.BENCH_JOBS), "--full", "--suites",
                           *run_all.FULL_SUITES, "--methods", *acc.BENCH_METHODS, "--resume"]
    assert len(full) == 1  # no few-shot step with the longer protocol
    once = run_all.bench_steps(run_all.parse_args(["--full"]), python="py")
    assert once[0][2:4] == ["--seeds", "1"]  # the longer protocol runs once unless --seeds says otherwise


def test_the_estimate_comes_from_recorded_durations_per_suite_and_method(tmp_path: Path) -> None:
    def record(seconds_by_method: dict) -> dict:
        return {m: {"seconds": sec} for m, sec in seconds_by_method.items()}
    fast = {m: 10.0 for m in acc.METHODS}  # the ablation rows are recorded too but not part of the default bench
    for suite in acc.SUITES:
        doc = acc.empty_results(suite, acc.QUICK)
        doc["runs"] = {"0": record({**fast, "fedavg": 40.0}), "1": record({**fast, "fedavg": 20.0})}
        acc.save_results(doc, acc.results_path(suite, acc.QUICK, tmp_path))
    args = run_all.parse_args(["--seeds", "3", "--jobs", "2"])
    estimate = run_all.estimate_seconds(args, tmp_path)
    per_suite = 10.0 * (len(acc.BENCH_METHODS) - 1) + 30.0  # fedavg: the mean of its two recorded runs
    assert estimate["accuracy.py"] == pytest.approx(per_suite * len(acc.SUITES) * 3 / 2)
    assert estimate["few_shot.py"] == len(run_all.FEW_SHOT_SUITES) * 3 * few_shot.FEW_SHOT_EVAL_SECONDS
    assert set(estimate) == {"accuracy.py", "few_shot.py"}
    assert run_all.estimate_seconds(run_all.parse_args(["--system"]), tmp_path) == run_all.SCRIPT_SECONDS["quick"]
    ablation = run_all.estimate_seconds(run_all.parse_args(["--ablation", "--seeds", "3", "--jobs", "2"]), tmp_path)
    assert ablation["accuracy.py (ablation)"] == pytest.approx(
        10.0 * len(acc.ABLATION_METHODS) * len(acc.ABLATION_SUITES) * 3 / 2)
    whole = sum(estimate.values()) / 60
    assert run_all.estimate_line(estimate).startswith(f"this benchmark run: about {whole:.0f} min")
    unknown = run_all.estimate_seconds(run_all.parse_args(["--full"]), tmp_path)  # no full-protocol runs recorded
    assert unknown["accuracy.py"] is None and "unknown" in run_all.estimate_line(unknown)


def test_paired_difference_pairs_by_seed_with_an_exact_sign_test() -> None:
    runs = {str(seed): {"crosssim": {"figures": {"none": {"accuracy": a}}},
                        "fedavg": {"figures": {"none": {"accuracy": b}}}}
            for seed, (a, b) in enumerate([(0.7, 0.6), (0.8, 0.6), (0.5, 0.6), (0.6, 0.6)])}
    paired = acc.paired_difference({"runs": runs}, "crosssim", "fedavg", "none")
    assert paired.differences == pytest.approx((0.1, 0.2, -0.1, 0.0))
    assert (paired.wins, paired.losses) == (2, 1)
    assert paired.sign_test_p == pytest.approx(1.0)  # 2 vs 1: as even as 3 coins get
    assert acc.sign_test_p(5, 0) == pytest.approx(2 / 32)
    assert acc.paired_difference({"runs": runs}, "crosssim", "fedavg", "adabn") is None


def test_oracle_table_counts_its_target_labels_and_sets_every_method_on_the_same_heldout_half() -> None:
    def seed(oracle: float, fedavg: float) -> dict:
        return {"oracle": {"figures": {"none": {"n_images": 60, "accuracy": oracle}}},
                "fedavg": {"figures": {"none": {"n_images": 120, "accuracy": 0.9, "heldout_accuracy": fedavg}}}}
    doc = {"suite": "synthetic", "runs": {"0": seed(0.4, 0.5), "1": seed(0.6, 0.7)}}
    lines = run_all.oracle_table([doc, {"suite": "no-oracle", "runs": {"0": {}}}]).splitlines()
    assert lines[2] == "| synthetic | 60 | 0.500 ± 0.141 | – | 0.600 ± 0.141 | – |"
    assert len(lines) == 3  # a suite without an oracle run has no row


def test_recorded_commands_are_shown_relative_to_the_checkout_they_ran_in() -> None:
    command = (f"crosssim evaluate --checkpoint /tmp/clone/runs/bench/quick/x.pt "
               f"--data {run_all.REPO_ROOT}/runs/bench/d --out runs/bench/o --set note=/abs/kept")
    assert run_all._relative(command) == ("crosssim evaluate --checkpoint runs/bench/quick/x.pt --data runs/bench/d "
                                          "--out runs/bench/o --set note=/abs/kept")

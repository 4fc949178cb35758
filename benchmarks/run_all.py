"""`make bench`: the method benchmarks, then benchmarks/RESULTS.md regenerated from benchmarks/results/*.json.

1. ``benchmarks/accuracy.py`` on every suite at quick size, 3 seeds, ``BENCH_METHODS`` measured again
   (``--resume``: keep what an interrupted run of the same code already saved); with ``--ablation`` also the
   CrossSim ablation rows (``ABLATION_METHODS``) on ``ABLATION_SUITES``;
2. ``benchmarks/few_shot.py``: k = 5 shots per class on the checkpoints of step 1 (``FEW_SHOT_METHODS`` on
   ``FEW_SHOT_SUITES``; quick protocol only);
3. ``write_results_md()``: tables of every results JSON (mean ± std over seeds), the date, commit, machine and
   the exact commands, and the figures of ``benchmarks/plots.py`` (benchmarks/figures/).

``make bench-system`` (``--system``) runs the system benchmarks instead, which time the machine and want it
quiet: ``benchmarks/perf.py``, ``benchmarks/load.py``, ``benchmarks/serve.py``; then step 3.

    .venv/bin/python benchmarks/run_all.py [--seeds 3] [--jobs 2] [--full] [--ablation] [--system] [--work DIR]
        [--resume] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks.accuracy` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.accuracy import (ABLATION_METHODS, ABLATION_SUITES, ADAPT_LABELS, ADAPTS,  # noqa: E402
                                 BENCH_METHODS, DEFAULT_SEEDS, ESTIMATE_FIGURES, FIGURE_LABELS, FIGURES, FULL,
                                 METHOD_LABELS, METHODS, QUICK, RESULTS_DIR, SUITES, format_stat,
                                 git_commit, load_results, mean_std, paired_difference, results_path, suite_label,
                                 suite_table, summarize)
from benchmarks.few_shot import FEW_SHOT_EVAL_SECONDS, few_shot_table  # noqa: E402
from benchmarks.perf import OVERHEAD  # noqa: E402
from benchmarks.plots import ACCURACY_PLOT, ESTIMATE_BAND, ESTIMATE_PLOT, FEW_SHOT_PLOT, write_plots  # noqa: E402
from benchmarks.serve import serve_lines  # noqa: E402
from benchmarks.loso_sweep import sweep_table  # noqa: E402

RESULTS_MD = BENCH_DIR / "RESULTS.md"
ACCURACY_GLOB = "accuracy-*.json"
LOSO_GLOB = "loso-*.json"  # benchmarks/loso_sweep.py
FEW_SHOT_GLOB = "few-shot-*.json"  # benchmarks/few_shot.py
BENCH_JOBS = 2  # parallel accuracy tasks: Ray start-up and file I/O of one overlap compute of the other (2 cores)
FULL_SUITES = ("synthetic-hard", "digits")  # --full: the longer protocol, once (one seed unless --seeds is given)
# Step 2: issue 12's few-shot suites, k = 5, the default federation only (each evaluation fine-tunes 6 times: 5 folds
# of the shot check and the deployed model; fedavg too would add as long again).
FEW_SHOT_SUITES = ("digits", "elpv-mono2poly", "elpv-poly2mono")
FEW_SHOT_METHODS = ("crosssim",)
FEW_SHOT_K = 5
# Durations of the other scripts for the estimate, as measured on 2 CPU cores (their JSON holds no total).
SCRIPT_SECONDS = {"quick": {"perf.py": 11 * 60, "load.py": 60, "serve.py": 70},
                  "full": {"perf.py": 30 * 60, "load.py": 60, "serve.py": 70}}
RECORDED_ROOT = re.compile(r"(?<!\S)/\S*?/(?=runs/bench/)")  # the checkout a recorded command ran in
EXAMPLE_SEED = "0"  # RESULTS.md lists the crosssim command lines of this seed (other seeds differ in --seed only)


# ---------------------------------------------------------------- running


def run_step(argv: Sequence[str]) -> int:
    """One benchmark script in its own process; its output streams through. Returns its exit status."""
    print(f"\n$ {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    rc = subprocess.call(list(argv), cwd=REPO_ROOT)
    print(f"({Path(argv[1]).name}: exit {rc} after {time.perf_counter() - started:.0f} s)", flush=True)
    return rc


# ---------------------------------------------------------------- RESULTS.md


def load_accuracy_docs(results_dir: Path) -> list[dict[str, Any]]:
    """Every accuracy results file, in SUITES order (quick before full)."""
    docs = []
    for path in sorted(Path(results_dir).glob(ACCURACY_GLOB)):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        doc["_file"] = path.name
        docs.append(doc)
    order = {s: i for i, s in enumerate(SUITES)}
    return sorted(docs, key=lambda d: (d.get("protocol", {}).get("name") != "quick",
                                       order.get(d.get("suite"), len(order)), d["_file"]))


def _relative(command: str) -> str:
    """A recorded command line with the repository root left out (the commands run from it), also when it ran in
    another checkout (a clean clone): any absolute folder before the default work folder ``runs/bench/``."""
    return RECORDED_ROOT.sub("", command.replace(f"{REPO_ROOT}/", ""))


def _records(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [r for by_method in doc.get("runs", {}).values() for r in by_method.values() if "figures" in r]


def _protocol_line(protocol: Mapping[str, Any]) -> str:
    if not protocol:
        return "protocol unknown"
    size = f", image size {protocol['image_size_px']} px" if protocol.get("image_size_px") else ""
    limit = f" (at most {protocol['limit']} images per site)" if protocol.get("limit") else ""
    return (f"protocol `{protocol.get('name')}`: {protocol.get('size')} sites{limit}, federated "
            f"{protocol.get('rounds')} rounds × {protocol.get('local_epochs')} local epochs, "
            f"pooled / local-only / oracle {protocol.get('epochs')} epochs, "
            f"TENT {protocol.get('tent_steps')} steps{size}")


def _suite_command(doc: Mapping[str, Any]) -> str:
    seeds = len(doc.get("runs", {}))
    full = " --full" if doc.get("protocol", {}).get("name") == "full" else ""
    return f"python benchmarks/accuracy.py --suites {doc.get('suite')} --seeds {max(seeds, 1)}{full}"


def overview_table(docs: Sequence[Mapping[str, Any]], figure: str, adapt: str) -> str:
    """Methods × suites, one figure at one adaptation, mean ± std over seeds."""
    summaries = [(suite_label(d), summarize(d)) for d in docs]
    lines = ["| method | " + " | ".join(name for name, _ in summaries) + " |",
             "|---|" + "---|" * len(summaries)]
    for method in METHODS:
        if not any(method in s for _, s in summaries):
            continue
        cells = [format_stat(s.get(method, {}).get(adapt, {}).get(figure)) for _, s in summaries]
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(docs: Sequence[Mapping[str, Any]], method_a: str = "crosssim", method_b: str = "fedavg") -> str:
    """Suites × adaptations: the paired difference ``method_a − method_b`` of target accuracy."""
    lines = ["| suite | adaptation | seeds | difference (mean ± std) | won / lost | sign-test p |",
             "|---|---|---|---|---|---|"]
    for doc in docs:
        for adapt in ADAPTS:
            paired = paired_difference(doc, method_a, method_b, adapt)
            if paired is None:
                continue
            p = "–" if paired.sign_test_p is None else f"{paired.sign_test_p:.2f}"
            lines.append(f"| {suite_label(doc)} | {ADAPT_LABELS[adapt]} | {paired.stat.n} | "
                         f"{format_stat(paired.stat)} | {paired.wins} / {paired.losses} | {p} |")
    return "\n".join(lines)


ORACLE_PEERS = ("pooled", "fedavg", "crosssim")  # compared with the oracle on its held-out half


def oracle_table(docs: Sequence[Mapping[str, Any]]) -> str:
    """Per suite: how many target labels the oracle trains on, and its accuracy beside the source-trained methods'
    on the same held-out half of the target (plain, no adaptation), mean ± std over seeds."""
    header = ["suite", "oracle's target labels", "oracle", *(METHOD_LABELS.get(m, m) for m in ORACLE_PEERS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for doc in docs:
        runs = [r for r in doc.get("runs", {}).values() if "none" in r.get("oracle", {}).get("figures", {})]
        if not runs:
            continue
        tested = runs[0]["oracle"]["figures"]["none"]["n_images"]
        whole = next((r[m]["figures"]["none"].get("n_images") for r in runs for m in ORACLE_PEERS
                      if "none" in r.get(m, {}).get("figures", {})), None)
        peers = [format_stat(mean_std(r.get(m, {}).get("figures", {}).get("none", {}).get("heldout_accuracy")
                                      for r in runs)) for m in ORACLE_PEERS]
        lines.append(f"| {suite_label(doc)} | {'?' if whole is None else whole - tested} | "
                     f"{format_stat(mean_std(r['oracle']['figures']['none']['accuracy'] for r in runs))} | "
                     + " | ".join(peers) + " |")
    return "\n".join(lines)


def environment_lines(doc: Mapping[str, Any]) -> list[str]:
    """Date range, commits and machine behind one results file."""
    records = _records(doc)
    env = doc.get("environment", {})
    dates = sorted(r["date"] for r in records if r.get("date"))
    commits = sorted({(r.get("commit") or "unknown")[:12] + (" (dirty)" if r.get("dirty") else "")
                      for r in records})
    seconds = sum(r.get("seconds", 0.0) for r in records)
    lines = [f"- runs: {len(records)} (seed, method) pairs, {seconds / 60:.1f} min of compute"
             + (f", {dates[0]} … {dates[-1]}" if dates else ""),
             f"- commit(s): {', '.join(commits) or 'unknown'}",
             f"- machine: {env.get('platform', 'unknown')}, {env.get('cpu_count', '?')} CPU(s), "
             f"Python {env.get('python', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}"]
    failures = [(seed, method) for seed, by_method in doc.get("failures", {}).items() for method in by_method]
    if failures:
        lines.append("- FAILED (rerun to retry): " + ", ".join(f"seed {s} {m}" for s, m in failures))
    return lines


def command_block(doc: Mapping[str, Any]) -> list[str]:
    """The crosssim command lines of one seed, per method, as recorded."""
    runs = doc.get("runs", {})
    seed = EXAMPLE_SEED if EXAMPLE_SEED in runs else next(iter(runs), None)
    if seed is None:
        return []
    lines = ["<details><summary>crosssim commands of seed "
             f"{seed} (other seeds differ in <code>--seed</code> and folder names)</summary>", "", "```"]
    for method in METHODS:
        record = runs[seed].get(method)
        if record:
            lines.append(f"# {method}")
            lines += [_relative(c) for c in record.get("commands", [])]
    return lines + ["```", "", "</details>"]


def load_table(load: Mapping[str, Any]) -> list[str]:
    lines = [f"Machine: {load.get('machine', 'unknown')}; median of {load.get('repeats', '?')} cold/cached pairs.", "",
             "| corpus | files | images | cold s | cached s | cached/cold speed-up |", "|---|---|---|---|---|---|"]
    for name, r in load.get("rows", {}).items():
        lines.append(f"| {name} | {r.get('files')} | {r.get('images')} | {r.get('cold_s', 0):.2f} | "
                     f"{r.get('cached_s', 0):.3f} | {r.get('speedup', 0):.1f}× |")
    return lines


def _step_runs_line(perf: Mapping[str, Any]) -> list[str]:
    """Which run measured which steps, when ``perf.py --steps`` replaced some of them."""
    by_run: dict[tuple[str, str], list[str]] = {}
    for step, run in perf.get("step_runs", {}).items():
        by_run.setdefault((str(run.get("date")), str(run.get("git_commit"))[:12]), []).append(step)
    if len(by_run) < 2:
        return []
    return [" Steps " + "; steps ".join(f"{', '.join(steps)} from the run of {date} at commit {commit}"
                                        for (date, commit), steps in by_run.items()) + "."]


def deployment_table(deployment: Mapping[str, Any]) -> list[str]:
    """perf.py step 4: a deployment round, phase by phase (mean over rounds, seconds), before and after; then the
    overhead of the baseline commit, before and after from the sites' compute-s metrics."""
    before, after = deployment["before"], deployment["after"]
    rounds = len(after["rounds"])
    lines = ["### A deployment round, phase by phase", "",
             f"Loopback, 2 SuperNodes of {deployment.get('images_per_site', '?')} images, {rounds} rounds each; "
             f"{len(after.get('repeats', [after]))} runs of each variant interleaved in the same run, the least "
             "disturbed run of each (lowest mean round wall) shown; per round, along the site the server waited "
             "for, from the "
             "server's and the sites' wall-clock instants (`RUN/rounds.jsonl`: `timeline`, `site_timings`). "
             "Before: today's rounds on this checkout: two messages a round (train, then evaluate), Flower's 3 s reply "
             "poll, SuperExec's 1 s poll, each message computed in its own ClientApp process (`--no-site-worker`). "
             "After: this commit's defaults (one message a round plus one final evaluate message, 0.25 s reply "
             "poll and first retry of a reply object not uploaded yet, 0.1 s SuperExec poll, no pydicom import in "
             "the ClientApp, every message computed by the hospital's resident site worker, so the ClientApp "
             "process imports no torch). Both send the weights packed in two arrays (`crosssim/wire.py`). See "
             "docs/FLOWER-OVERHEAD.md.", "",
             "| phase | before (s a round) | after (s a round) | after / before |", "|---|---|---|---|"]
    for phase, value in after["mean"].items():
        old = before["mean"][phase]
        lines.append(f"| {phase} | {old:.2f} | {value:.2f} | {value / old if old else float('nan'):.2f} |")
    lines.append(f"| messages per site, whole run | {before['messages_per_site']:g} | {after['messages_per_site']:g} "
                 f"| {after['messages_per_site'] / before['messages_per_site']:.2f} |")
    baseline = deployment.get("baseline")
    if baseline is None:
        return lines + [""]
    commit = deployment.get("baseline_commit", "?")
    lines += ["", f"Against the code as issue 16 found it (commit {commit}, run from its own files in the same run: "
              "weights tensor by tensor, two messages a round, Flower's polls). It records no site timestamps, so "
              "every column here takes the slowest site's compute from the sites' own `compute-s` metrics "
              "(train + evaluate); means a round, seconds.", "",
              f"| figure | baseline {commit} | before | after | after / baseline |", "|---|---|---|---|---|"]
    for figure, value in after["from_metrics"].items():
        old = baseline["from_metrics"][figure]
        lines.append(f"| {figure} | {old:.2f} | {before['from_metrics'][figure]:.2f} | {value:.2f} "
                     f"| {value / old if old else float('nan'):.2f} |")
    means = [statistics.mean(r["from_metrics"][OVERHEAD] for r in run.get("repeats", [run]))
             for run in (baseline, before, after)]
    lines.append(f"| {OVERHEAD}, mean of every run | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.2f} "
                 f"| {means[2] / means[0] if means[0] else float('nan'):.2f} |")
    lines.append(f"| messages per site, whole run | {baseline['messages_per_site']:g} | "
                 f"{before['messages_per_site']:g} | {after['messages_per_site']:g} "
                 f"| {after['messages_per_site'] / baseline['messages_per_site']:.2f} |")
    return lines + [""]


def render_results_md(docs: Sequence[Mapping[str, Any]], *, load: Mapping[str, Any] | None = None,
                      perf: Mapping[str, Any] | None = None, loso_docs: Sequence[Mapping[str, Any]] = (),
                      few_shot_docs: Sequence[Mapping[str, Any]] = (), serve: Mapping[str, Any] | None = None,
                      other_files: Sequence[str] = (), generated: str | None = None,
                      commit: Mapping[str, Any] | None = None, plots: Sequence[str] = ()) -> str:
    """The whole RESULTS.md as text (a pure function of the results, for tests); ``plots``: the figures written
    beside it (``benchmarks.plots.write_plots``), each shown in its section."""
    generated = generated or datetime.now(timezone.utc).isoformat(timespec="seconds")
    commit = commit if commit is not None else git_commit()
    head = (commit.get("commit") or "unknown")[:12] + (" (dirty)" if commit.get("dirty") else "")
    out = ["# Benchmark results", "",
           f"Generated {generated} by `python benchmarks/run_all.py --report-only` at commit {head} on "
           f"{platform.platform()} ({_cpu_count()} CPU(s)). Everything below is read from "
           "`benchmarks/results/*.json`;",
           "`make bench` (`python benchmarks/run_all.py`) measures everything again and regenerates this file.", ""]
    out += ["## Target accuracy across hospitals (`benchmarks/accuracy.py`)", "",
            "Each figure is the mean ± sample standard deviation over seeds (the seed also changes the site "
            "splits). Methods are trained on the labeled source sites only and scored on the whole unlabeled "
            "target with its ground truth, which is read only to score: nothing is tuned on it. "
            "`local-only` is the mean over the three single-source models. `pooled` trains one model on the "
            "union of the sources (cross-entropy only). The target oracle trains on a labeled half of the "
            "target and is scored on the other half (its `heldout_*` counterparts for every method are in the "
            "JSON). ATC abs. error: |label-free ATC accuracy estimate minus true accuracy| (for local-only, the "
            "mean absolute error over the sources). Plain = no adaptation; AdaBN / TENT / CrossSim-adapt / auto = "
            "`crosssim evaluate --adapt adabn|tent|crosssim|auto`.", ""]
    if not docs:
        out += ["No accuracy results yet: run `python benchmarks/accuracy.py`.", ""]
    out += _image(plots, ACCURACY_PLOT, "target accuracy per suite and method, plain and AdaBN")
    for figure in FIGURES:
        for adapt in ADAPTS:
            if adapt != "none" and figure != "accuracy":
                continue  # the overview keeps adaptation for accuracy only; per-suite tables have all
            out += [f"### {FIGURE_LABELS[figure]}, {ADAPT_LABELS[adapt]}", "", overview_table(docs, figure, adapt), ""]
    if ESTIMATE_PLOT in plots:
        out += ["### Label-free ATC estimate vs true accuracy", "",
                "One point per suite, method, adaptation and seed; the grey band is "
                f"±{ESTIMATE_BAND:g} around estimate = truth.",
                "", *_image(plots, ESTIMATE_PLOT, "label-free ATC estimate vs true target accuracy")]
    out += ["### The target oracle, on its own held-out half", "",
            "The oracle is `crosssim train` (same epochs and augmentation as `pooled`) on a labeled half of the "
            "target, scored on the other half; here every method is scored on that same half. It is bounded by "
            "how many target labels a suite has: the synthetic targets hold 120 images, so the oracle learns "
            "from 60 (15 a class) while the other methods learn from three labeled source sites, and it stays "
            "below them; elpv and digits give it 150 and it is far above every method. It is the "
            "ceiling of labeling that many target images, not of the target.", "", oracle_table(docs), ""]
    out += ["### CrossSim − FedAvg, paired by seed", "",
            "Target accuracy of `crosssim` minus `fedavg` on the same seed (same sites and splits): mean ± std "
            "over seeds, seeds won / lost, and the two-sided exact sign-test p-value (with 3 seeds it cannot "
            "go below 0.25: read it as how little 3 seeds can show).", "", paired_table(docs), ""]
    out += ["### The deployed model's label-free estimate", "",
            "`estimated_accuracy` of `crosssim evaluate` for the model it deploys (see `DEPLOYED_ESTIMATOR` in "
            "`crosssim/evaluate.py`): mean absolute error against the truth, and the fraction of seeds whose "
            "interval covered the truth.", ""]
    for figure in ESTIMATE_FIGURES:
        for adapt in ADAPTS:
            out += [f"#### {FIGURE_LABELS[figure]}, {ADAPT_LABELS[adapt]}", "", overview_table(docs, figure, adapt), ""]
    for doc in docs:
        name = doc.get("suite", "?")
        out += [f"### {name} ({doc.get('protocol', {}).get('name', '?')}) — `{doc.get('_file', '')}`", "",
                f"{_protocol_line(doc.get('protocol', {}))}; classes: {', '.join(doc.get('classes', [])) or '?'}.",
                "", suite_table(doc), "", *environment_lines(doc), f"- command: `{_suite_command(doc)}`", "",
                *command_block(doc), ""]
    if load is not None:
        out += ["## Site loading: cold DICOM decode vs hospital-side cache (`benchmarks/load.py`)", "",
                *load_table(load), ""]
    if perf is not None:
        out += ["## System performance, side by side (`benchmarks/perf.py`)", "",
                f"Run {perf.get('date', '?')} at commit {str(perf.get('git_commit', '?'))[:12]}, mode "
                f"{perf.get('mode', '?')}, {perf.get('torch_threads_in_process', '?')} torch thread(s) in process; "
                "every ratio is A/B measured in the same run.", *_step_runs_line(perf), "",
                str(perf.get("table", "")).rstrip(), ""]
        deployment = perf.get("details", {}).get("deployment")
        if deployment and "before" in deployment:
            out += deployment_table(deployment)
    if serve is not None:
        out += ["## The model in service (`benchmarks/serve.py`)", "",
                "`crosssim export` (ONNX, and int8 statically quantized on the target's images) served by "
                "`crosssim serve` over loopback HTTP, against the same checkpoint in-process in PyTorch and "
                "ONNX Runtime in-process; every variant in the same run. Run "
                f"{serve.get('environment', {}).get('date', '?')} at commit "
                f"{str(serve.get('environment', {}).get('commit', '?'))[:12]}.", "", *serve_lines(serve), ""]
    if loso_docs:
        out += ["## Choosing defaults without target labels (`benchmarks/loso_sweep.py`, not part of `make bench`)",
                "", "Each candidate trains CrossSim on two sources and is scored on the third (plain and with "
                "AdaBN), for every choice of the third; the best mean picks the candidate, and only that one is "
                "trained on all sources and scored on the target. A study whose candidates set only `[adapt]` "
                "keys trains each fold once with the defaults and scores `--adapt crosssim` instead. Keys a "
                "candidate does not set take the defaults of the commit recorded in its JSON.", ""]
        for doc in loso_docs:
            candidates = "; ".join(f"{name}: `{', '.join(f'{k}={v}' for k, v in o.items()) or 'defaults'}`"
                                   for name, o in doc.get("candidates", {}).items())
            out += [f"### {doc.get('study', '?')} on {doc.get('suite', '?')}", "", f"Candidates: {candidates}.", "",
                    sweep_table(doc), ""]
    if few_shot_docs:
        out += ["## Few-shot adaptation at the target (`benchmarks/few_shot.py`)", "",
                "k labeled target images per class (drawn per seed); few-shot and label-free `auto` accuracy on "
                f"the other target images, side by side. `make bench` measures k = {FEW_SHOT_K} for "
                f"{', '.join(FEW_SHOT_METHODS)} on {', '.join(FEW_SHOT_SUITES)} again; the other rows are earlier "
                "runs of `benchmarks/few_shot.py` (date and commit per record in the JSON).", "",
                *_image(plots, FEW_SHOT_PLOT, "few-shot accuracy vs shots per class"),
                *[few_shot_table(doc) for doc in few_shot_docs], ""]
    if other_files:
        out += ["## Other results", "", *[f"- `benchmarks/results/{name}`" for name in other_files], ""]
    return "\n".join(out).rstrip() + "\n"


def _image(plots: Sequence[str], name: str, alt: str) -> list[str]:
    """A Markdown image of the figure ``name`` when it is among ``plots``, else nothing."""
    return [f"![{alt}]({name})", ""] if name in plots else []


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def _read_json(path: Path) -> dict[str, Any] | None:
    """A results file, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_results_md(results_dir: Path = RESULTS_DIR, out: Path = RESULTS_MD, **kwargs: Any) -> Path:
    """Regenerate RESULTS.md and its figures (``out``'s folder/figures/) from the JSON files in ``results_dir``
    (callable alone: ``--report-only``)."""
    results_dir = Path(results_dir)
    docs = load_accuracy_docs(results_dir)
    load, perf = _read_json(results_dir / "load.json"), _read_json(results_dir / "perf.json")
    serve = _read_json(results_dir / "serve.json")
    loso_docs = [doc for path in sorted(results_dir.glob(LOSO_GLOB)) if (doc := _read_json(path)) is not None]
    few_shot_docs = [doc for path in sorted(results_dir.glob(FEW_SHOT_GLOB)) if (doc := _read_json(path)) is not None]
    known = ({d["_file"] for d in docs} | {"load.json", "perf.json", "serve.json"}
             | {p.name for p in results_dir.glob(LOSO_GLOB)}
             | {p.name for p in results_dir.glob(FEW_SHOT_GLOB)})
    others = sorted(p.name for p in results_dir.glob("*.json") if p.name not in known)
    plots = write_plots(docs, few_shot_docs, Path(out).parent)
    text = render_results_md(docs, load=load, perf=perf, loso_docs=loso_docs, few_shot_docs=few_shot_docs,
                             serve=serve, other_files=others, plots=plots, **kwargs)
    Path(out).write_text(text)
    return Path(out)


def bench_steps(args: argparse.Namespace, python: str = sys.executable) -> list[list[str]]:
    """The command lines of the method benchmarks (``--system``: of the system ones), in the order they run."""
    size = "--full" if args.full else "--quick"
    if args.system:
        return [[python, str(BENCH_DIR / "perf.py"), size], [python, str(BENCH_DIR / "load.py")],
                [python, str(BENCH_DIR / "serve.py")]]
    seeds = ["--seeds", str(bench_seeds(args))]
    work = [] if args.work is None else ["--work", str(args.work)]
    resume = ["--resume"] if args.resume else []
    accuracy = [python, str(BENCH_DIR / "accuracy.py"), *seeds, "--jobs", str(args.jobs)]
    if args.full:
        steps = [[*accuracy, size, "--suites", *FULL_SUITES, "--methods", *BENCH_METHODS, *work, *resume]]
    else:
        steps = [[*accuracy, "--methods", *BENCH_METHODS, *work, *resume]]
        if args.ablation:
            steps.append([*accuracy, "--suites", *ABLATION_SUITES, "--methods", *ABLATION_METHODS, *work, *resume])
        steps.append([python, str(BENCH_DIR / "few_shot.py"), "--suites", *FEW_SHOT_SUITES, *seeds,
                      "--methods", *FEW_SHOT_METHODS, "--shots", str(FEW_SHOT_K), *work])
    return steps


def bench_seeds(args: argparse.Namespace) -> int:
    """Seeds of the accuracy step: --seeds, else 3 (quick) or 1 (--full, run once)."""
    return args.seeds if args.seeds is not None else (1 if args.full else DEFAULT_SEEDS)


def accuracy_seconds(suites: Sequence[str], methods: Sequence[str], args: argparse.Namespace,
                     results_dir: Path = RESULTS_DIR) -> float | None:
    """Expected seconds of one accuracy.py step: the durations the results JSON recorded for each (suite, method)
    under this protocol (a pair never run: that method's mean over suites, else every run's mean), times the seeds,
    spread over the jobs. None: nothing recorded for this protocol."""
    protocol = FULL if args.full else QUICK
    recorded: dict[tuple[str, str], list[float]] = {}
    for suite in SUITES:
        for runs in load_results(results_path(suite, protocol, results_dir), suite, protocol)["runs"].values():
            for method, run in runs.items():
                if isinstance(run.get("seconds"), (int, float)):
                    recorded.setdefault((suite, method), []).append(float(run["seconds"]))
    every_run = [t for times in recorded.values() for t in times]
    if not every_run:
        return None
    per_method = {m: [t for (_, method), times in recorded.items() if method == m for t in times] for m in methods}
    pairs = [recorded.get((suite, m)) or per_method[m] or every_run for suite in suites for m in methods]
    return sum(sum(times) / len(times) for times in pairs) * bench_seeds(args) / max(args.jobs, 1)


def estimate_seconds(args: argparse.Namespace, results_dir: Path = RESULTS_DIR) -> dict[str, float | None]:
    """Expected seconds of each step of ``make bench`` (``bench_steps``): the accuracy steps from recorded durations
    (``accuracy_seconds``), few-shot from ``FEW_SHOT_EVAL_SECONDS`` per evaluation, the other scripts as measured
    (``SCRIPT_SECONDS``)."""
    if args.system:
        return dict(SCRIPT_SECONDS["full" if args.full else "quick"])
    if args.full:
        return {"accuracy.py": accuracy_seconds(FULL_SUITES, BENCH_METHODS, args, results_dir)}
    steps = {"accuracy.py": accuracy_seconds(SUITES, BENCH_METHODS, args, results_dir)}
    if args.ablation:
        steps["accuracy.py (ablation)"] = accuracy_seconds(ABLATION_SUITES, ABLATION_METHODS, args, results_dir)
    evaluations = len(FEW_SHOT_SUITES) * len(FEW_SHOT_METHODS) * bench_seeds(args)
    return {**steps, "few_shot.py": evaluations * FEW_SHOT_EVAL_SECONDS}


def estimate_line(estimates: Mapping[str, float | None]) -> str:
    """One line: the whole expected duration and each step's share."""
    parts = [f"{name} {'?' if sec is None else f'{sec / 60:.0f} min'}" for name, sec in estimates.items()]
    known = [sec for sec in estimates.values() if sec is not None]
    whole = "unknown (no recorded accuracy runs of this protocol)" if len(known) < len(estimates) else \
        f"about {sum(known) / 60:.0f} min"
    return f"this benchmark run: {whole} ({', '.join(parts)}; from the durations in benchmarks/results/)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, help="accuracy seeds (default 3; with --full 1)")
    parser.add_argument("--jobs", type=int, default=BENCH_JOBS, help=f"parallel accuracy tasks (default {BENCH_JOBS})")
    parser.add_argument("--full", action="store_true",
                        help="the larger protocol, once: full-size sites, more rounds and epochs, on "
                             f"{' and '.join(FULL_SUITES)} (accuracy.py --full); with --system perf.py --full")
    parser.add_argument("--ablation", action="store_true",
                        help=f"also the CrossSim ablation rows ({' '.join(ABLATION_METHODS)}) on "
                             f"{' '.join(ABLATION_SUITES)} (quick protocol)")
    parser.add_argument("--system", action="store_true",
                        help="the system benchmarks instead (make bench-system): perf.py (with --full: its longer "
                             "form), load.py and serve.py; they time the machine, so run them with nothing else "
                             "running")
    parser.add_argument("--work", type=Path, help="accuracy.py and few_shot.py work folder (default: their own)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run (accuracy.py --resume: same code, same protocol)")
    parser.add_argument("--report-only", action="store_true",
                        help="only regenerate RESULTS.md and its figures from the JSON")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if not args.report_only:
        print(estimate_line(estimate_seconds(args)), flush=True)
    failed = 0 if args.report_only else sum(run_step(step) != 0 for step in bench_steps(args))
    path = write_results_md()
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s in all)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Target accuracy of every method on every benchmark suite, plain and with test-time adaptation.

For each suite (``benchmarks/datasets.py``) and seed: prepare the sites, then run through the real
``crosssim`` command (in process, ``crosssim.cli.main``):

- ``local-only``: ``crosssim train`` on each source alone; every figure is the MEAN over the sources;
- ``pooled``: ``crosssim train`` on the union of the sources with ``strategy=fedavg`` (cross-entropy only,
  the centralized bound);
- ``fedavg``, ``fedprox``, ``fedbn`` and the CrossSim ablation rows (``FEDERATED_METHODS``: fedavg + scanner
  views, the previous prototype-only CrossSim, + scanner views and pair loss, the default with the style bank,
  + the target's style in the loop, the contrastive form): ``crosssim simulate``;
- every checkpoint above is scored on the whole target by one ``crosssim evaluate --labels --adapt none adabn
  tent crosssim auto`` (each adaptation in its own folder, as its own ``evaluate`` would write it);
- ``oracle``: ``crosssim train`` on the labeled half of the target (``oracle/train``), evaluated on the
  target without labels and scored on the other (held-out) half only.

Reported per method: target accuracy, balanced accuracy and the absolute error of the label-free ATC
estimate (|ATC estimate − accuracy|), mean ± sample standard deviation over seeds. Nothing is tuned on
the target's labels: they are read only after predicting, to score. The seed goes to ``prepare_suite`` and
to every command that takes ``--seed`` (``evaluate`` uses the checkpoint's).

Results go to ``benchmarks/results/accuracy-<suite>.json`` (``accuracy-<suite>-full.json`` with ``--full``),
rewritten after every finished (seed, method) with the figures, the exact command lines, date, git commit,
a fingerprint of the code that ran and the machine. Every requested (suite, seed, method) is measured again;
``--resume`` continues an interrupted run instead, skipping those already saved under the same protocol by
the same code.

    .venv/bin/python benchmarks/accuracy.py [--suites synthetic digits] [--seeds 3] [--full] [--work runs/bench]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks.datasets` and `crosssim` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.datasets import SUITES, SuiteSites  # noqa: E402
from crosssim.data.sites import read_labels_csv  # noqa: E402

# ---------------------------------------------------------------- protocol (units in the names)

# quick: `make bench`, all 5 suites × 3 seeds (run_all.py prints the expected duration; see benchmarks/README.md).
# Every method passes over each source image the same number of times: rounds × local epochs = epochs.
QUICK_ROUNDS = 5
QUICK_LOCAL_EPOCHS = 2
QUICK_EPOCHS = QUICK_ROUNDS * QUICK_LOCAL_EPOCHS  # pooled, local-only and oracle trainings
# images per site (sources and target) on top of the quick sizes: the elpv and digits targets (600) drop to
# 300, halving the 28 evaluations per (suite, seed); sources keep their quick size (120 / 200 / 300).
QUICK_IMAGES_PER_SITE_LIMIT = 300
# full: all the data of every suite, the demo's training length.
FULL_ROUNDS = 10
FULL_LOCAL_EPOCHS = 2
FULL_EPOCHS = FULL_ROUNDS * FULL_LOCAL_EPOCHS
FULL_IMAGES_PER_SITE_LIMIT = None  # every image of the full size
TENT_STEPS = 10  # TENT gradient steps (one target mini-batch each), crosssim evaluate's default
DIGITS_IMAGE_SIZE_PX = 32  # digits are 28 px; the default 64 px would only cost time
SUITE_IMAGE_SIZE_PX = {"digits": DIGITS_IMAGE_SIZE_PX}  # other suites: configs/default.toml's image-size
DEFAULT_SEEDS = 3
DEFAULT_JOBS = 1  # parallel (suite, seed) processes

TARGET_SITE_TOKEN = "{target}"  # in a method's flags: the suite's unlabeled target folder
STYLE_MIX_ON = 0.5  # MixStyle's probability, for the ablation rows with the style bank (the default is off)
FEDERATED_METHODS: dict[str, list[str]] = {  # method → crosssim simulate flags that define it
    "fedavg": ["--strategy", "fedavg"],
    "fedavg-scanner": ["--strategy", "fedavg", "--set", "augment=scanner"],
    "fedprox": ["--strategy", "fedprox"],
    "fedbn": ["--strategy", "fedbn"],
    "crosssim-prototypes": ["--strategy", "crosssim", "--set", "augment=basic", "--set", "pair-loss=false",
                            "--set", "style-mix-probability=0"],
    "crosssim": ["--strategy", "crosssim"],
    "crosssim-style": ["--strategy", "crosssim", "--set", f"style-mix-probability={STYLE_MIX_ON}"],
    "crosssim-scanner": ["--strategy", "crosssim", "--set", "augment=scanner",
                         "--set", f"style-mix-probability={STYLE_MIX_ON}"],
    "crosssim-target": ["--strategy", "crosssim", "--set", f"style-mix-probability={STYLE_MIX_ON}",
                        "--target", TARGET_SITE_TOKEN],
    "crosssim-contrastive": ["--strategy", "crosssim", "--set", "similarity=contrastive"],
}
METHODS = ("local-only", "pooled", *FEDERATED_METHODS, "oracle")
# What `make bench` runs on every suite (issue 13's list); the CrossSim ablation rows on ABLATION_SUITES only with
# `make bench BENCH_ARGS=--ablation` (issue 11's check): together they would double the bench.
BENCH_METHODS = ("local-only", "pooled", "fedavg", "fedprox", "fedbn", "crosssim-prototypes", "crosssim", "oracle")
ABLATION_METHODS = tuple(m for m in METHODS if m not in BENCH_METHODS)
ABLATION_SUITES = ("synthetic-hard", "elpv-mono2poly", "digits")
METHOD_LABELS = {"local-only": "local-only (mean over sources)", "pooled": "pooled (centralized bound)",
                 "fedavg-scanner": "fedavg + scanner views",
                 "crosssim-prototypes": "crosssim, prototype term only (previous method)",
                 "crosssim": "crosssim (default: two views + pair loss)",
                 "crosssim-style": "crosssim + style bank",
                 "crosssim-scanner": "crosssim + style bank + scanner views",
                 "crosssim-target": "crosssim + style bank + target style in the loop",
                 "crosssim-contrastive": "crosssim, contrastive form",
                 "oracle": "target oracle (held-out half)"}
ADAPTS = ("none", "adabn", "tent", "crosssim", "auto")
ADAPT_LABELS = {"none": "plain", "adabn": "AdaBN", "tent": "TENT", "crosssim": "CrossSim-adapt", "auto": "auto"}
FIGURES = ("accuracy", "balanced_accuracy", "atc_abs_error")
FIGURE_LABELS = {"accuracy": "target accuracy", "balanced_accuracy": "balanced accuracy",
                 "atc_abs_error": "ATC abs. error", "deployed_abs_error": "deployed-model estimate abs. error",
                 "deployed_interval_covers": "deployed-model interval coverage"}
# Summarized over seeds beside FIGURES (RESULTS.md overviews), not in the per-suite tables.
ESTIMATE_FIGURES = ("deployed_abs_error", "deployed_interval_covers")

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_WORK = REPO_ROOT / "runs" / "bench"
RESULTS_FORMAT = 1  # bump when the JSON layout changes

Progress = Callable[[str], None]
Crosssim = Callable[[list[str], Path], None]  # runs one `crosssim` command line, log to the given file
Prepare = Callable[..., SuiteSites]


@dataclass(frozen=True)
class Protocol:
    """How long and on how much data every method trains. Part of every result: a change reruns the method."""

    name: str  # quick | full
    size: str  # benchmarks.datasets size
    limit: int | None  # at most this many images per site (prepare_suite's limit); None: the size's own caps
    rounds: int  # federated rounds
    local_epochs: int  # epochs per round at each site
    epochs: int  # pooled, local-only and oracle epochs
    tent_steps: int
    image_size_px: dict[str, int]  # per-suite image-size; suites not named keep the default config's

    def for_suite(self, suite: str) -> dict[str, Any]:
        """The protocol as it applies to one suite (what a result is keyed on)."""
        doc = {k: v for k, v in asdict(self).items() if k != "image_size_px"}
        doc["image_size_px"] = self.image_size_px.get(suite)
        return doc

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {px} px" for s, px in self.image_size_px.items())
        limit = f" capped at {self.limit} images per site" if self.limit else ""
        return (f"protocol {self.name}: {self.size} sites{limit}; federated {self.rounds} rounds × "
                f"{self.local_epochs} local epochs; pooled / local-only / oracle {self.epochs} epochs; "
                f"TENT {self.tent_steps} steps; image size {sizes or 'default'} (others configs/default.toml)")


QUICK = Protocol("quick", "quick", QUICK_IMAGES_PER_SITE_LIMIT, QUICK_ROUNDS, QUICK_LOCAL_EPOCHS, QUICK_EPOCHS,
                 TENT_STEPS, SUITE_IMAGE_SIZE_PX)
FULL = Protocol("full", "full", FULL_IMAGES_PER_SITE_LIMIT, FULL_ROUNDS, FULL_LOCAL_EPOCHS, FULL_EPOCHS,
                TENT_STEPS, SUITE_IMAGE_SIZE_PX)


def results_path(suite: str, protocol: Protocol, results_dir: Path = RESULTS_DIR) -> Path:
    suffix = "" if protocol.name == "quick" else f"-{protocol.name}"
    return Path(results_dir) / f"accuracy-{suite}{suffix}.json"


# ---------------------------------------------------------------- environment


# Files whose content decides a benchmark figure: a saved result is reused by --resume only under the same ones.
CODE_FILE_PATTERNS = ("crosssim/**/*.py", "server/**/*.py", "client/**/*.py", "configs/**/*.toml",
                      "benchmarks/accuracy.py", "benchmarks/datasets.py", "pyproject.toml")


def code_fingerprint(repo: Path = REPO_ROOT) -> str:
    """Short SHA-256 of the paths and contents of ``CODE_FILE_PATTERNS`` (results files are not part of it)."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in CODE_FILE_PATTERNS for p in repo.glob(pattern) if p.is_file()}):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# What a benchmark run writes itself: its changes do not make the working tree "dirty".
RESULT_PATHS = ("benchmarks/results", "benchmarks/RESULTS.md", "benchmarks/figures")  # figures: benchmarks/plots.py


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """HEAD commit and whether tracked files other than the results differ from it (None without git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                  *[f":(exclude){path}" for path in RESULT_PATHS]]
        dirty = bool(subprocess.run(status, cwd=repo, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": dirty}


def environment() -> dict[str, Any]:
    """Date, commit, machine: what RESULTS.md prints beside the tables."""
    env: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **git_commit(),
                           "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        env.update({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "torch_threads": torch.get_num_threads()})
    except ImportError:
        pass
    return env


# ---------------------------------------------------------------- results file and skip-if-present


def empty_results(suite: str, protocol: Protocol) -> dict[str, Any]:
    return {"format": RESULTS_FORMAT, "suite": suite, "protocol": protocol.for_suite(suite), "classes": [],
            "environment": {}, "runs": {}, "failures": {}}


def load_results(path: Path, suite: str, protocol: Protocol) -> dict[str, Any]:
    """The suite's results file, or an empty one when missing, unreadable or of another format."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return empty_results(suite, protocol)
    if doc.get("format") != RESULTS_FORMAT or doc.get("suite") != suite:
        return empty_results(suite, protocol)
    doc.setdefault("runs", {})
    doc.setdefault("failures", {})
    return doc


def save_results(doc: Mapping[str, Any], path: Path) -> Path:
    """Write atomically (a crash mid-write leaves the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def is_done(doc: Mapping[str, Any], seed: int, method: str, protocol_key: Mapping[str, Any], code: str) -> bool:
    """True when (seed, method) has figures in ``doc`` measured under the same protocol by the same code."""
    record = doc.get("runs", {}).get(str(seed), {}).get(method)
    return (bool(record) and record.get("protocol") == dict(protocol_key) and record.get("code") == code
            and "figures" in record)


def pending_methods(doc: Mapping[str, Any], seed: int, methods: Iterable[str], protocol_key: Mapping[str, Any],
                    code: str, resume: bool = False) -> list[str]:
    """Methods of ``methods`` to run at ``seed``: all of them, or with ``resume`` those not done by ``code``."""
    return [m for m in methods if not (resume and is_done(doc, seed, m, protocol_key, code))]


# ---------------------------------------------------------------- scoring


def _float_or_none(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def read_predictions(path: Path) -> dict[str, tuple[str, float]]:
    """predictions.csv of crosssim evaluate → {relative path: (predicted class, confidence)}."""
    with Path(path).open(newline="") as handle:
        return {row["path"]: (row["pred"], float(row["confidence"])) for row in csv.DictReader(handle)}


def score_on_labels(predictions: Mapping[str, tuple[str, float]], labels: Mapping[str, str],
                    classes: Sequence[str], atc_threshold: float | None) -> dict[str, Any]:
    """Accuracy, balanced accuracy and ATC error (``crosssim.metrics``) on exactly the paths of ``labels``.

    Every labeled path must have a prediction (a skipped file is an error, not a silently smaller test set).
    The ATC estimate is the fraction of those paths whose confidence exceeds the checkpoint's threshold.
    """
    from crosssim.metrics import accuracy, atc_estimate, balanced_accuracy

    missing = sorted(set(labels) - set(predictions))
    if missing:
        raise ValueError(f"{len(missing)} labeled path(s) have no prediction, e.g. {missing[0]}")
    paths = sorted(labels)
    index = {c: i for i, c in enumerate(classes)}
    truth = np.array([index[labels[p]] for p in paths])
    predicted = np.array([index[predictions[p][0]] for p in paths])
    acc = accuracy(truth, predicted)
    figures: dict[str, Any] = {"n_images": len(paths), "accuracy": acc,
                               "balanced_accuracy": balanced_accuracy(truth, predicted, len(classes))}
    if atc_threshold is not None:
        estimate = atc_estimate(np.array([predictions[p][1] for p in paths]), atc_threshold)
        figures.update({"atc_estimated_accuracy": estimate, "atc_abs_error": abs(estimate - acc)})
    else:
        figures.update({"atc_estimated_accuracy": None, "atc_abs_error": None})
    return figures


def figures_from_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of one ``crosssim evaluate --labels`` metrics.json."""
    labeled, free = metrics["labeled"], metrics["label_free"]
    acc = _float_or_none(labeled["accuracy"])
    estimate = _float_or_none(free.get("atc_estimated_accuracy"))
    row = {"n_images": free["n_images"], "accuracy": acc,
           "balanced_accuracy": _float_or_none(labeled["balanced_accuracy"]),
           "atc_estimated_accuracy": estimate,
           "atc_abs_error": None if estimate is None or acc is None else abs(estimate - acc),
           "adaptation_used": metrics.get("adaptation", {}).get("method")}
    for name in ("doc", "adabn_atc", "agreement", "deployed"):
        error = _float_or_none(labeled.get(f"{name}_estimate_error"))
        row[f"{name}_abs_error"] = None if error is None else abs(error)
    row["deployed_estimator"] = free.get("estimator")
    row["deployed_interval_covers"] = labeled.get("deployed_interval_covers")
    return row


def mean_of(values: Iterable[float | None]) -> float | None:
    """Mean of the values that exist (None when none does)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def mean_over_sources(per_source: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """local-only: {source: {adapt: figures}} → {adapt: figures averaged over the sources}.

    The ATC figure is then the mean absolute error over the sources (each source's |estimate − accuracy|).
    """
    adapts = [a for a in ADAPTS if all(a in by_adapt for by_adapt in per_source.values())]
    out: dict[str, dict[str, Any]] = {}
    for adapt in adapts:
        rows = [by_adapt[adapt] for by_adapt in per_source.values()]
        out[adapt] = {name: mean_of(row.get(name) for row in rows)
                      for name in ("accuracy", "balanced_accuracy", "atc_estimated_accuracy", "atc_abs_error")}
        out[adapt]["n_sources"] = len(rows)
    return out


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None  # sample standard deviation over seeds; None with fewer than two
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """Method A − method B on the same seeds: mean ± std, wins / losses / ties and the sign-test p-value."""

    differences: tuple[float, ...]
    stat: Stat
    wins: int
    losses: int
    sign_test_p: float | None  # two-sided exact binomial test on wins vs losses (ties dropped)


def sign_test_p(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test: P(a split at least this uneven | each non-tied seed a fair coin)."""
    n = wins + losses
    if n == 0:
        return None
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_difference(doc: Mapping[str, Any], method_a: str, method_b: str, adapt: str,
                      figure: str = "accuracy") -> PairedDifference | None:
    """``method_a − method_b`` of ``figure`` at ``adapt``, over the seeds both finished; None when none did."""
    differences = []
    for by_method in doc.get("runs", {}).values():
        rows = [by_method.get(m, {}).get("figures", {}).get(adapt, {}).get(figure) for m in (method_a, method_b)]
        if all(v is not None for v in rows):
            differences.append(float(rows[0]) - float(rows[1]))
    if not differences:
        return None
    wins, losses = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    return PairedDifference(tuple(differences), mean_std(differences), wins, losses, sign_test_p(wins, losses))


def mean_std(values: Iterable[float | None]) -> Stat:
    present = [float(v) for v in values if v is not None]
    if not present:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present))


def summarize(doc: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Stat]]]:
    """{method: {adapt: {figure: Stat over seeds}}} of every finished (seed, method) in ``doc``."""
    out: dict[str, dict[str, dict[str, Stat]]] = {}
    runs = doc.get("runs", {})
    for method in METHODS:
        records = [by_method[method] for by_method in runs.values() if "figures" in by_method.get(method, {})]
        if not records:
            continue
        out[method] = {}
        for adapt in ADAPTS:
            per_seed = [r["figures"][adapt] for r in records if adapt in r["figures"]]
            if per_seed:
                out[method][adapt] = {f: mean_std(row.get(f) for row in per_seed) for f in FIGURES + ESTIMATE_FIGURES}
    return out


def suite_label(doc: Mapping[str, Any]) -> str:
    """A results document's suite, with its protocol unless it is the quick one (or unrecorded)."""
    protocol = doc.get("protocol", {}).get("name")
    return doc.get("suite", "?") + ("" if protocol in ("quick", None) else f" ({protocol})")


def format_stat(stat: Stat | None, digits: int = 3) -> str:
    if stat is None or stat.mean is None:
        return "–"
    if stat.std is None:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.std:.{digits}f}"


def suite_table(doc: Mapping[str, Any]) -> str:
    """Markdown table of one suite: rows are methods; plain/AdaBN/TENT columns for each figure."""
    summary = summarize(doc)
    header = ["method", "seeds"] + [f"{FIGURE_LABELS[f]} ({ADAPT_LABELS[a]})" for f in FIGURES for a in ADAPTS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, by_adapt in summary.items():
        seeds = max((s.n for stats in by_adapt.values() for s in stats.values()), default=0)
        cells = [METHOD_LABELS.get(method, method), str(seeds)]
        cells += [format_stat(by_adapt.get(a, {}).get(f)) for f in FIGURES for a in ADAPTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- running crosssim commands


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["crosssim", *argv])


def run_crosssim(argv: list[str], log: Path) -> None:
    """Run ``crosssim ARGV`` in this process (no torch import per call); its output goes to ``log``."""
    from crosssim.cli import main

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        print(f"$ {command_line(argv)}", flush=True)
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"`{command_line(argv)}` exited with {rc} (log: {log})")


class MethodRun:
    """One (suite, seed, method): runs commands, records their exact lines and durations."""

    def __init__(self, crosssim: Crosssim, run_dir: Path) -> None:
        self.crosssim = crosssim
        self.run_dir = run_dir
        self.commands: list[str] = []
        self.command_seconds: list[float] = []

    def __call__(self, argv: list[str]) -> None:
        self.commands.append(command_line(argv))
        started = time.perf_counter()
        self.crosssim(argv, self.run_dir / "commands.log")
        self.command_seconds.append(round(time.perf_counter() - started, 2))


def settings(sites: SuiteSites, suite: str, protocol: Protocol, seed: int, cache: Path) -> list[str]:
    """Flags every training command of a suite shares: classes, image size, seed, cache."""
    flags = ["--set", f"classes={','.join(sites.classes)}"]
    if protocol.image_size_px.get(suite):
        flags += ["--set", f"image-size={protocol.image_size_px[suite]}"]
    return flags + ["--seed", str(seed), "--cache", str(cache)]


def simulate_argv(sites: Sequence[Path], out: Path, method_flags: Sequence[str], protocol: Protocol,
                  common: Sequence[str]) -> list[str]:
    """``crosssim simulate`` over ``sites`` for the protocol's rounds; ``method_flags`` define the method."""
    return ["simulate", "--sites", *map(str, sites), "--out", str(out), *method_flags,
            "--rounds", str(protocol.rounds), "--set", f"local-epochs={protocol.local_epochs}", *common]


def evaluate_all(run: MethodRun, checkpoint: Path, sites: SuiteSites, out: Path, cache: Path,
                 protocol: Protocol) -> dict[str, dict[str, Any]]:
    """Evaluate one checkpoint on the whole target with every adaptation (one ``crosssim evaluate --adapt`` of
    them all: the model and the site load once, auto reuses the others); figures per adaptation.

    Also scores the held-out oracle half from the same predictions, so methods and oracle compare on one set.
    """
    classes = list(sites.classes)
    heldout = read_labels_csv(sites.oracle_test_labels)
    figures = {}
    run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(sites.target_site),
         "--labels", str(sites.target_labels), "--out", str(out / "eval"), "--cache", str(cache),
         "--adapt", *ADAPTS, "--set", f"tent-steps={protocol.tent_steps}"])
    for adapt in ADAPTS:
        eval_dir = out / "eval" / adapt
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        row = figures_from_metrics(metrics)
        half = score_on_labels(read_predictions(eval_dir / "predictions.csv"), heldout, classes,
                               _float_or_none(metrics["label_free"].get("atc_threshold")))
        row.update({"heldout_accuracy": half["accuracy"], "heldout_balanced_accuracy": half["balanced_accuracy"]})
        figures[adapt] = row
    return figures


def run_method(method: str, run: MethodRun, sites: SuiteSites, suite: str, seed: int, protocol: Protocol,
               cache: Path) -> dict[str, Any]:
    """Train and evaluate one method; returns the figures part of its record."""
    common = settings(sites, suite, protocol, seed, cache)
    out = run.run_dir
    ce_only = ["--set", "strategy=fedavg", "--set", f"epochs={protocol.epochs}"]  # no similarity term
    if method == "local-only":
        per_source = {}
        for site in sites.source_sites:
            site_out = out / site.name
            run(["train", "--sites", str(site), "--out", str(site_out / "train"), *ce_only, *common])
            per_source[site.name] = evaluate_all(run, site_out / "train" / "final.pt", sites, site_out, cache,
                                                 protocol)
        return {"figures": mean_over_sources(per_source), "per_source": per_source}
    if method == "pooled":
        run(["train", "--sites", *map(str, sites.source_sites), "--out", str(out / "train"), *ce_only, *common])
        return {"figures": evaluate_all(run, out / "train" / "final.pt", sites, out, cache, protocol)}
    if method in FEDERATED_METHODS:
        flags = [str(sites.target_site) if f == TARGET_SITE_TOKEN else f for f in FEDERATED_METHODS[method]]
        run(simulate_argv(sites.source_sites, out / "train", flags, protocol, common))
        return {"figures": evaluate_all(run, out / "train" / "final.pt", sites, out, cache, protocol)}
    if method == "oracle":
        run(["train", "--sites", str(sites.oracle_train), "--out", str(out / "train"), *ce_only, *common])
        eval_dir = out / "eval-none"
        run(["evaluate", "--checkpoint", str(out / "train" / "final.pt"), "--data", str(sites.target_site),
             "--out", str(eval_dir), "--cache", str(cache), "--adapt", "none"])  # no --labels: half is training data
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        scored = score_on_labels(read_predictions(eval_dir / "predictions.csv"),
                                 read_labels_csv(sites.oracle_test_labels), list(sites.classes),
                                 _float_or_none(metrics["label_free"].get("atc_threshold")))
        return {"figures": {"none": scored}}
    raise ValueError(f"unknown method {method!r} (available: {', '.join(METHODS)})")


# ---------------------------------------------------------------- the loop


def say(line: str) -> None:
    print(line, flush=True)  # the log of a background run follows progress as it happens


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def _short(figures: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for adapt in ADAPTS:
        if adapt in figures and figures[adapt].get("accuracy") is not None:
            parts.append(f"{ADAPT_LABELS[adapt]} {figures[adapt]['accuracy']:.3f}")
    return "accuracy " + ", ".join(parts)


@contextlib.contextmanager
def locked(lock_path: Path):
    """Exclusive lock between processes (parallel tasks share results files and the download folder)."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update_results(path: Path, suite: str, protocol: Protocol, lock_dir: Path,
                   change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Reload the results file under its lock, apply ``change``, stamp the environment, write it back."""
    with locked(lock_dir / f"{path.name}.lock"):
        doc = load_results(path, suite, protocol)
        doc["protocol"] = protocol.for_suite(suite)
        change(doc)
        doc["environment"] = environment()
        save_results(doc, path)
    return doc


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_suite(suite: str, seeds: Sequence[int], protocol: Protocol, work: Path, *,
              results_dir: Path = RESULTS_DIR, methods: Sequence[str] = METHODS, resume: bool = False,
              prepare: Prepare | None = None, crosssim: Crosssim = run_crosssim, progress: Progress | None = None,
              started: float | None = None) -> dict[str, Any]:
    """Every pending (seed, method) of one suite; the results file is updated after each one.

    Sites of each seed live in ``WORK/<protocol>/data/seed-<seed>/<suite>``, runs in
    ``WORK/<protocol>/runs/<suite>/seed-<seed>/<method>``; ``WORK/cache`` is the tensor cache of every site.
    """
    if prepare is None:
        from benchmarks.datasets import prepare_suite as prepare
    progress = progress or say
    started = time.time() if started is None else started  # wall clock: shared with parallel tasks
    path = results_path(suite, protocol, results_dir)
    key = protocol.for_suite(suite)
    cache, locks = work / "cache", work / "locks"
    doc = load_results(path, suite, protocol)
    code = code_fingerprint()

    def elapsed() -> str:
        return _clock(time.time() - started)

    for seed in seeds:
        todo = pending_methods(doc, seed, methods, key, code, resume)
        if not todo:
            progress(f"[{suite} seed {seed}] {len(methods)} method(s) already in {path.name} (same code): skipped")
            continue
        progress(f"[{suite} seed {seed}] preparing {protocol.size} sites (limit {protocol.limit}) — "
                 f"elapsed {elapsed()}")
        with locked(locks / "prepare.lock"):  # one preparation at a time: downloads are shared
            sites = prepare(suite, work / protocol.name / "data" / f"seed-{seed}", seed=seed, size=protocol.size,
                            limit=protocol.limit, cache_dir=work / "downloads", progress=None)
        for method in todo:
            method_started = time.perf_counter()
            progress(f"[{suite} seed {seed}] {method}: running — elapsed {elapsed()}")
            run_dir = work / protocol.name / "runs" / suite / f"seed-{seed}" / method
            shutil.rmtree(run_dir, ignore_errors=True)  # a rerun starts clean (no rounds of an interrupted run)
            run = MethodRun(crosssim, run_dir)
            try:
                result = run_method(method, run, sites, suite, seed, protocol, cache)
            except Exception as exc:  # one failed method must not lose the others: recorded, retried next run
                failure = {"error": f"{type(exc).__name__}: {exc}", "commands": run.commands, "date": _now(),
                           "code": code, **git_commit()}

                def note_failure(d: dict[str, Any], seed=seed, method=method, failure=failure) -> None:
                    d["classes"] = list(sites.classes)
                    d["failures"].setdefault(str(seed), {})[method] = failure

                doc = update_results(path, suite, protocol, locks, note_failure)
                progress(f"[{suite} seed {seed}] {method}: FAILED after "
                         f"{_clock(time.perf_counter() - method_started)}: {exc}")
                continue
            seconds = time.perf_counter() - method_started
            record = {"protocol": key, **result, "seconds": round(seconds, 1), "commands": run.commands,
                      "command_seconds": run.command_seconds, "date": _now(), "code": code, **git_commit()}

            def note_record(d: dict[str, Any], seed=seed, method=method, record=record) -> None:
                d["classes"] = list(sites.classes)
                d["runs"].setdefault(str(seed), {})[method] = record
                d["failures"].get(str(seed), {}).pop(method, None)

            doc = update_results(path, suite, protocol, locks, note_record)
            progress(f"[{suite} seed {seed}] {method}: done in {_clock(seconds)} ({_short(result['figures'])}) "
                     f"— elapsed {elapsed()}")
        progress(f"\n### {suite} ({protocol.name}, after seed {seed})\n\n{suite_table(doc)}\n")
    return doc


def _task(suite: str, seed: int, protocol: Protocol, work: Path, results_dir: Path, methods: Sequence[str],
          resume: bool, started: float, threads: int | None = None) -> int:
    """One (suite, seed) in a worker process; returns its number of failed methods.

    ``threads``: torch CPU threads of this process (parallel tasks share the cores instead of oversubscribing).
    """
    if threads:
        import torch

        torch.set_num_threads(threads)
    doc = run_suite(suite, [seed], protocol, work, results_dir=results_dir, methods=methods, resume=resume,
                    started=started)
    return len(doc["failures"].get(str(seed), {}))


def run_all_suites(suites: Sequence[str], seeds: Sequence[int], protocol: Protocol, work: Path, *,
                   results_dir: Path = RESULTS_DIR, methods: Sequence[str] = METHODS, resume: bool = False,
                   jobs: int = 1) -> int:
    """Every (suite, seed), seed-major (each suite gets a first figure early); ``jobs`` in parallel processes.

    Returns the number of failed (suite, seed, method) triples.
    """
    started = time.time()
    tasks = [(suite, seed) for seed in seeds for suite in suites]
    if jobs <= 1:
        return sum(_task(suite, seed, protocol, work, results_dir, methods, resume, started) for suite, seed in tasks)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # a fresh process per task: Ray and torch state never carry over from one suite to the next
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        futures = [pool.submit(_task, suite, seed, protocol, work, results_dir, list(methods), resume, started,
                               threads) for suite, seed in tasks]
        return sum(future.result() for future in futures)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES), metavar="SUITE",
                        help=f"suites to run (default: all: {', '.join(SUITES)})")
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, metavar="N", help="seeds 0..N-1 (default 3)")
    parser.add_argument("--full", action="store_true", help="full-size sites and the longer training protocol")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="sites, runs and caches (default: runs/bench; never committed)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="JSON output folder")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(BENCH_METHODS), metavar="METHOD",
                        help=f"methods to run (default: {' '.join(BENCH_METHODS)}; the ablation rows: "
                             f"{' '.join(ABLATION_METHODS)})")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: skip (seed, method) pairs already saved under the same "
                             "protocol by the same code (default: measure every requested pair again)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                        help=f"(suite, seed) tasks run in parallel processes (default {DEFAULT_JOBS})")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    protocol = FULL if args.full else QUICK
    work = args.work.resolve()
    say(protocol.describe())
    say(f"suites {', '.join(args.suites)}; seeds 0..{args.seeds - 1}; methods {', '.join(args.methods)}; "
        f"{args.jobs} job(s); work {work}; results {args.results}")
    started = time.time()
    failed = run_all_suites(args.suites, range(args.seeds), protocol, work, results_dir=args.results,
                            methods=args.methods, resume=args.resume, jobs=args.jobs)
    for suite in args.suites:
        path = results_path(suite, protocol, args.results)
        say(f"\n### {suite} ({protocol.name})\n\n{suite_table(load_results(path, suite, protocol))}\n\n({path})")
    if failed:
        say(f"{failed} (suite, seed, method) run(s) failed: rerun the same command to retry only those")
    say(f"accuracy benchmark finished in {_clock(time.time() - started)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Choosing CrossSim's λ without the target's labels: leave one source hospital out.

For each λ in ``--lambdas`` and each source site: ``crosssim simulate`` (strategy crosssim, InfoNCE, the quick
protocol of ``accuracy.py``) on the other sources, then ``crosssim evaluate --labels`` on the held-out source,
which plays the unseen hospital. λ = 0 is the same federation without the similarity term. The λ with the best
mean held-out accuracy (ties: the smaller λ) is what a consortium could choose before it meets its target;
only that λ is then trained on every source and scored on the target, plain and adapted.

Results: ``benchmarks/results/lambda-<suite>.json`` (held-out accuracy per λ and site, the choice, the
target figures, commands, commit and code fingerprint).

    .venv/bin/python benchmarks/lambda_sweep.py [--suites synthetic elpv-mono2poly] [--seeds 1] [--lambdas 0 0.5 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks.accuracy` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.accuracy import (DEFAULT_WORK, FEDERATED_METHODS, QUICK, RESULTS_DIR, Crosssim,  # noqa: E402
                                 MethodRun, Protocol, code_fingerprint, environment, evaluate_all, run_crosssim,
                                 say, settings, simulate_argv)
from benchmarks.datasets import SUITES, SuiteSites  # noqa: E402

DEFAULT_LAMBDAS = (0.0, 0.5, 2.0)
DEFAULT_SUITES = ("synthetic", "elpv-mono2poly")


def federate(run: MethodRun, sites: Sequence[Path], lambda_sim: float, out: Path, protocol: Protocol,
             common: Sequence[str]) -> Path:
    """CrossSim (InfoNCE) at ``lambda_sim`` over ``sites``; returns its final checkpoint."""
    run(simulate_argv(sites, out, [*FEDERATED_METHODS["crosssim"], "--set", f"lambda-sim={lambda_sim:g}"],
                      protocol, common))
    return out / "final.pt"


def held_out_accuracy(run: MethodRun, checkpoint: Path, site: Path, out: Path, cache: Path) -> float:
    """Plain accuracy of ``checkpoint`` on a labeled source site it never trained on."""
    run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(site), "--labels", str(site / "labels.csv"),
         "--out", str(out), "--cache", str(cache), "--adapt", "none"])
    return float(json.loads((out / "metrics.json").read_text())["labeled"]["accuracy"])


def choose_lambda(mean_accuracy: dict[float, float]) -> float:
    """The λ with the best mean held-out accuracy; ties go to the smaller λ."""
    return max(mean_accuracy, key=lambda lam: (mean_accuracy[lam], -lam))


def sweep(sites: SuiteSites, suite: str, seed: int, lambdas: Sequence[float], protocol: Protocol, run: MethodRun,
          cache: Path) -> dict[str, Any]:
    """Leave-one-source-out accuracy per λ, the chosen λ, and that λ's target figures."""
    common = settings(sites, suite, protocol, seed, cache)
    held_out: dict[float, dict[str, float]] = {}
    for lam in lambdas:
        held_out[lam] = {}
        for site in sites.source_sites:
            out = run.run_dir / f"lambda-{lam:g}" / f"without-{site.name}"
            others = [s for s in sites.source_sites if s != site]
            checkpoint = federate(run, others, lam, out / "train", protocol, common)
            held_out[lam][site.name] = held_out_accuracy(run, checkpoint, site, out / "eval", cache)
        say(f"[{suite} seed {seed}] λ={lam:g}: held-out source accuracy "
            + ", ".join(f"{name} {value:.3f}" for name, value in held_out[lam].items()))
    means = {lam: statistics.fmean(values.values()) for lam, values in held_out.items()}
    chosen = choose_lambda(means)
    out = run.run_dir / f"chosen-lambda-{chosen:g}"
    checkpoint = federate(run, sites.source_sites, chosen, out / "train", protocol, common)
    return {"held_out_accuracy": {f"{lam:g}": values for lam, values in held_out.items()},
            "mean_held_out_accuracy": {f"{lam:g}": value for lam, value in means.items()},
            "chosen_lambda": chosen, "target": evaluate_all(run, checkpoint, sites, out, cache, protocol)}


def run_sweep(suite: str, seeds: Sequence[int], lambdas: Sequence[float], work: Path, results_dir: Path,
              protocol: Protocol = QUICK, crosssim: Crosssim = run_crosssim, prepare=None) -> dict[str, Any]:
    """Every seed of one suite; writes and returns ``results_dir/lambda-<suite>.json``."""
    if prepare is None:
        from benchmarks.datasets import prepare_suite as prepare
    doc: dict[str, Any] = {"suite": suite, "protocol": protocol.for_suite(suite), "lambdas": list(lambdas),
                           "environment": environment(), "code": code_fingerprint(), "runs": {}}
    for seed in seeds:
        started = time.perf_counter()
        sites = prepare(suite, work / protocol.name / "data" / f"seed-{seed}", seed=seed, size=protocol.size,
                        limit=protocol.limit, cache_dir=work / "downloads", progress=None)
        run = MethodRun(crosssim, work / protocol.name / "runs" / suite / f"seed-{seed}" / "lambda-sweep")
        record = sweep(sites, suite, seed, lambdas, protocol, run, work / "cache")
        doc["runs"][str(seed)] = {**record, "seconds": round(time.perf_counter() - started, 1),
                                  "commands": run.commands}
        target = record["target"]
        say(f"[{suite} seed {seed}] chosen λ={record['chosen_lambda']:g}; target accuracy plain "
            f"{target['none']['accuracy']:.3f}, AdaBN {target['adabn']['accuracy']:.3f}")
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"lambda-{suite}.json").write_text(json.dumps(doc, indent=1))
    return doc


def sweep_table(doc: dict[str, Any]) -> str:
    """Markdown: per seed, mean held-out source accuracy per λ, the chosen λ and its target accuracy."""
    lambdas = [f"{lam:g}" for lam in doc.get("lambdas", [])]
    lines = ["| suite | seed | " + " | ".join(f"held-out sources, λ={lam}" for lam in lambdas)
             + " | chosen λ | target accuracy (plain) | target accuracy (AdaBN) |",
             "|---" * (len(lambdas) + 5) + "|"]
    for seed, record in sorted(doc.get("runs", {}).items()):
        means = record["mean_held_out_accuracy"]
        target = record["target"]
        lines.append(f"| {doc.get('suite')} | {seed} | " + " | ".join(f"{means[lam]:.3f}" for lam in lambdas)
                     + f" | {record['chosen_lambda']:g} | {target['none']['accuracy']:.3f} | "
                       f"{target['adabn']['accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(DEFAULT_SUITES), metavar="SUITE",
                        help=f"suites (default: {', '.join(DEFAULT_SUITES)})")
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 (default 1)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS), metavar="λ",
                        help=f"values of lambda-sim to compare (default: {' '.join(f'{v:g}' for v in DEFAULT_LAMBDAS)})")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="sites, runs and caches (default: runs/bench)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="JSON output folder")
    args = parser.parse_args(argv)
    if args.seeds < 1 or any(lam < 0 for lam in args.lambdas):
        parser.error("--seeds must be at least 1 and every λ non-negative")
    for suite in args.suites:
        run_sweep(suite, range(args.seeds), args.lambdas, args.work.resolve(), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

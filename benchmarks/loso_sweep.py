"""Choosing a default without the target's labels: leave one source hospital out.

Each *candidate* is a named set of config overrides of CrossSim (e.g. ``lambda-sim=0.5`` or
``style-mix-probability=0``). When every candidate sets only ``[adapt]`` keys (e.g. ``shot-lr=3e-5``), the
study chooses ``--adapt crosssim`` settings: each fold is trained once with the defaults and every candidate
adapts that model to the held-out source. For each candidate and each source site: ``crosssim simulate`` (the quick
protocol of ``accuracy.py``) on the other sources, then ``crosssim evaluate --labels`` on the held-out source,
which plays the unseen hospital, plain and with ``--adapt adabn`` (how a target deploys the model). The
candidate with the best mean held-out accuracy over sites and both adaptations (ties: the one listed first)
is what a consortium could choose before it meets its target; only that candidate is then trained on every
source and scored on the target.

Results: ``benchmarks/results/loso-<study>-<suite>.json`` (held-out accuracy per candidate, site and
adaptation, the choice, the target figures, commands, commit and code fingerprint).

    .venv/bin/python benchmarks/loso_sweep.py --study lambda --suites synthetic --candidates \\
        'λ=0:lambda-sim=0' 'λ=0.5:lambda-sim=0.5' 'λ=2:lambda-sim=2'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks.accuracy` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.accuracy import (DEFAULT_WORK, FEDERATED_METHODS, QUICK, RESULTS_DIR, Crosssim,  # noqa: E402
                                 MethodRun, Protocol, code_fingerprint, environment, evaluate_all,
                                 figures_from_metrics, run_crosssim, say, settings, simulate_argv)
from benchmarks.datasets import SUITES, SuiteSites  # noqa: E402
from crosssim.config import FIELD_INDEX  # noqa: E402
from crosssim.data.sites import LABELS_FILENAME  # noqa: E402

CHOICE_ADAPTS = ("none", "adabn")  # a candidate is chosen on held-out accuracy plain and with AdaBN
# Every held-out source is also scored after the label-free adaptations, with the error of each label-free
# accuracy estimate: the leave-one-source-out evidence for crosssim/auto and for the deployed model's estimator.
HELD_OUT_ADAPTS = (*CHOICE_ADAPTS, "crosssim", "auto")
DEFAULT_SUITES = ("synthetic-hard", "elpv-mono2poly", "digits")

Candidates = Mapping[str, Mapping[str, str]]  # name → config overrides


def parse_candidate(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:key=value,key=value`` (``NAME:`` alone: the defaults) → (name, overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:key=value[,key=value...]")
    pairs = [p for p in rest.split(",") if p]
    if any("=" not in p for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: every override is key=value")
    return name, dict(p.split("=", 1) for p in pairs)


def override_flags(overrides: Mapping[str, str]) -> list[str]:
    return [flag for key, value in overrides.items() for flag in ("--set", f"{key}={value}")]


def federate(run: MethodRun, sites: Sequence[Path], overrides: Mapping[str, str], out: Path, protocol: Protocol,
             common: Sequence[str]) -> Path:
    """CrossSim with ``overrides`` over ``sites``; returns its final checkpoint."""
    run(simulate_argv(sites, out, [*FEDERATED_METHODS["crosssim"], *override_flags(overrides)], protocol, common))
    return out / "final.pt"


def held_out_figures(run: MethodRun, checkpoint: Path, site: Path, out: Path, cache: Path, adapt: str,
                     adapt_overrides: Mapping[str, str] | None = None, labels: Path | None = None) -> dict[str, Any]:
    """Figures of ``checkpoint`` (adapted with ``adapt``) on a labeled source site it never trained on."""
    run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(site),
         "--labels", str(labels or site / LABELS_FILENAME), "--out", str(out), "--cache", str(cache),
         "--adapt", adapt, *override_flags(adapt_overrides or {})])
    return figures_from_metrics(json.loads((out / "metrics.json").read_text()))


def is_adaptation_study(candidates: Candidates) -> bool:
    """Every candidate sets [adapt] keys only: one training per fold serves them all (``adaptation_sweep``)."""
    return all(FIELD_INDEX.get(key, ("",))[0] == "adapt" for overrides in candidates.values() for key in overrides)


def adaptation_sweep(sites: SuiteSites, suite: str, seed: int, candidates: Candidates, protocol: Protocol,
                     run: MethodRun, cache: Path) -> dict[str, Any]:
    """``--adapt crosssim`` settings chosen on held-out sources (one default federation per fold), then the
    chosen settings scored once on the target beside AdaBN."""
    common = settings(sites, suite, protocol, seed, cache)
    held_out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {name: {} for name in candidates}
    for site in sites.source_sites:
        out = run.run_dir / f"without-{site.name}"
        checkpoint = federate(run, [s for s in sites.source_sites if s != site], {}, out / "train", protocol, common)
        adabn = held_out_figures(run, checkpoint, site, out / "eval-adabn", cache, "adabn")
        for name, overrides in candidates.items():
            held_out[name][site.name] = {"adabn": adabn, "crosssim": held_out_figures(
                run, checkpoint, site, out / f"eval-crosssim-{name}", cache, "crosssim", overrides)}
    means = {name: statistics.fmean(v["crosssim"]["accuracy"] for v in per_site.values())
             for name, per_site in held_out.items()}
    for name, mean in means.items():
        say(f"[{suite} seed {seed}] {name}: held-out source accuracy after --adapt crosssim {mean:.3f}")
    chosen = choose(means)
    out = run.run_dir / "all-sources"
    checkpoint = federate(run, sites.source_sites, {}, out / "train", protocol, common)
    target = {adapt: held_out_figures(run, checkpoint, sites.target_site, out / f"eval-{adapt}", cache, adapt,
                                      candidates[chosen] if adapt == "crosssim" else None, sites.target_labels)
              for adapt in ("none", "adabn", "crosssim")}
    return {"held_out_accuracy": held_out, "mean_held_out_accuracy": means, "chosen": chosen, "target": target}


def choose(mean_accuracy: Mapping[str, float]) -> str:
    """The candidate with the best mean held-out accuracy; ties go to the one listed first."""
    names = list(mean_accuracy)
    return max(names, key=lambda name: (mean_accuracy[name], -names.index(name)))


def sweep(sites: SuiteSites, suite: str, seed: int, candidates: Candidates, protocol: Protocol, run: MethodRun,
          cache: Path) -> dict[str, Any]:
    """Leave-one-source-out accuracy per candidate, the chosen candidate, and its target figures."""
    if is_adaptation_study(candidates):
        return adaptation_sweep(sites, suite, seed, candidates, protocol, run, cache)
    common = settings(sites, suite, protocol, seed, cache)
    held_out: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for name, overrides in candidates.items():
        held_out[name] = {}
        for site in sites.source_sites:
            out = run.run_dir / name / f"without-{site.name}"
            others = [s for s in sites.source_sites if s != site]
            checkpoint = federate(run, others, overrides, out / "train", protocol, common)
            held_out[name][site.name] = {adapt: held_out_figures(run, checkpoint, site, out / f"eval-{adapt}",
                                                                 cache, adapt) for adapt in HELD_OUT_ADAPTS}
        say(f"[{suite} seed {seed}] {name}: held-out source accuracy ({'/'.join(HELD_OUT_ADAPTS)}) "
            + ", ".join(f"{s} " + "/".join(f"{v[a]['accuracy']:.3f}" for a in HELD_OUT_ADAPTS)
                        for s, v in held_out[name].items()))
    means = {name: statistics.fmean(by_adapt[a]["accuracy"] for by_adapt in per_site.values() for a in CHOICE_ADAPTS)
             for name, per_site in held_out.items()}
    chosen = choose(means)
    out = run.run_dir / f"chosen-{chosen}"
    checkpoint = federate(run, sites.source_sites, candidates[chosen], out / "train", protocol, common)
    return {"held_out_accuracy": held_out, "mean_held_out_accuracy": means, "chosen": chosen,
            "target": evaluate_all(run, checkpoint, sites, out, cache, protocol)}


def results_file(results_dir: Path, study: str, suite: str) -> Path:
    return Path(results_dir) / f"loso-{study}-{suite}.json"


def run_sweep(study: str, suite: str, seeds: Sequence[int], candidates: Candidates, work: Path, results_dir: Path,
              protocol: Protocol = QUICK, crosssim: Crosssim = run_crosssim, prepare=None) -> dict[str, Any]:
    """Every seed of one suite; writes and returns ``results_dir/loso-<study>-<suite>.json``."""
    if prepare is None:
        from benchmarks.datasets import prepare_suite as prepare
    doc: dict[str, Any] = {"study": study, "suite": suite, "protocol": protocol.for_suite(suite),
                           "candidates": {name: dict(o) for name, o in candidates.items()},
                           "environment": environment(), "code": code_fingerprint(), "runs": {}}
    for seed in seeds:
        started = time.perf_counter()
        sites = prepare(suite, work / protocol.name / "data" / f"seed-{seed}", seed=seed, size=protocol.size,
                        limit=protocol.limit, cache_dir=work / "downloads", progress=None)
        run = MethodRun(crosssim, work / protocol.name / "runs" / suite / f"seed-{seed}" / f"loso-{study}")
        record = sweep(sites, suite, seed, candidates, protocol, run, work / "cache")
        doc["runs"][str(seed)] = {**record, "seconds": round(time.perf_counter() - started, 1),
                                  "commands": run.commands}
        target = record["target"]
        say(f"[{suite} seed {seed}] chosen {record['chosen']}; target accuracy plain "
            f"{target['none']['accuracy']:.3f}, AdaBN {target['adabn']['accuracy']:.3f}")
        path = results_file(results_dir, study, suite)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
    return doc


def sweep_table(doc: Mapping[str, Any]) -> str:
    """Markdown: per seed, mean held-out source accuracy per candidate, the choice and its target accuracy."""
    names = list(doc.get("candidates", {}))
    lines = ["| suite | seed | " + " | ".join(f"held-out sources, {name}" for name in names)
             + " | chosen | target accuracy (plain) | target accuracy (AdaBN) |",
             "|---" * (len(names) + 5) + "|"]
    for seed, record in sorted(doc.get("runs", {}).items()):
        means = record["mean_held_out_accuracy"]
        target = record["target"]
        lines.append(f"| {doc.get('suite')} | {seed} | " + " | ".join(f"{means[name]:.3f}" for name in names)
                     + f" | {record['chosen']} | {target['none']['accuracy']:.3f} | "
                       f"{target['adabn']['accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="name of what is being chosen (results file name part)")
    parser.add_argument("--candidates", nargs="+", type=parse_candidate, required=True, metavar="NAME:K=V,...",
                        help="named config overrides of CrossSim; the first listed wins ties")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(DEFAULT_SUITES), metavar="SUITE",
                        help=f"suites (default: {', '.join(DEFAULT_SUITES)})")
    parser.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds 0..N-1 (default 1)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="sites, runs and caches (default: runs/bench)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="JSON output folder")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    candidates = dict(args.candidates)
    if len(candidates) != len(args.candidates):
        parser.error("candidate names must be unique")
    for suite in args.suites:
        run_sweep(args.study, suite, range(args.seeds), candidates, args.work.resolve(), args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Few-shot adaptation at the target: k labeled target images per class vs the best label-free result.

For each suite, seed and federated method whose quick-protocol checkpoint ``benchmarks/accuracy.py`` left
in the work folder, and each k: draw k target images per class (seeded; the target's ground truth is what
a hospital would label), then ``crosssim evaluate --adapt auto --shots`` scores on the other images both
the few-shot model and the label-free ``auto`` one, side by side on the same images.

Results: ``benchmarks/results/few-shot-<suite>.json`` and a table on stdout. A run replaces the (seed, method, k)
figures it measures and keeps the others (``make bench`` measures k = 5 only; the k = 1 and 10 points of the few-shot
curve stay those of the last run that measured them); each (seed, method) records the commit and code it ran.

    .venv/bin/python benchmarks/accuracy.py --suites digits --methods fedavg crosssim   # the checkpoints
    .venv/bin/python benchmarks/few_shot.py --suites digits --seeds 3 --shots 1 5 10
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks.accuracy` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.accuracy import (DEFAULT_WORK, QUICK, RESULTS_DIR, Crosssim, MethodRun, code_fingerprint,  # noqa: E402
                                 environment, git_commit, run_crosssim, say)
from benchmarks.datasets import SUITES  # noqa: E402
from crosssim.data.sites import read_labels_csv, write_labels_csv  # noqa: E402

DEFAULT_SHOTS = (1, 5, 10)
DEFAULT_METHODS = ("fedavg", "crosssim")
LABEL_FREE_ADAPT = "auto"  # what the few-shot result is compared with
FEW_SHOT_EVAL_SECONDS = 40  # one few-shot evaluation (6 fine-tunes), 2 CPU cores: 359 s for 9 in make bench, 2026-12-08


def draw_shots(labels: Mapping[str, str], k: int, seed: int) -> list[tuple[str, str]]:
    """k (path, label) rows per class, drawn with ``seed``; a class with fewer images gives all it has."""
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for label in sorted(set(labels.values())):
        paths = sorted(p for p, lab in labels.items() if lab == label)
        rows += [(p, label) for p in rng.sample(paths, min(k, len(paths)))]
    return rows


def few_shot_figures(run: MethodRun, checkpoint: Path, target: Path, target_labels: Path, k: int, seed: int,
                     out: Path, cache: Path) -> dict[str, Any]:
    """Few-shot and label-free accuracy on the target images that are not shots."""
    shots = write_labels_csv(out / f"shots-{k}.csv", draw_shots(read_labels_csv(target_labels), k, seed))
    eval_dir = out / f"eval-shots-{k}"
    run(["evaluate", "--checkpoint", str(checkpoint), "--data", str(target), "--labels", str(target_labels),
         "--out", str(eval_dir), "--cache", str(cache), "--adapt", LABEL_FREE_ADAPT, "--shots", str(shots)])
    few = json.loads((eval_dir / "metrics.json").read_text())["few_shot"]
    return {key: few[key] for key in ("n_shots", "n_scored", "label_free_method", "label_free_accuracy",
                                      "few_shot_accuracy", "deployed", "deployed_accuracy")}


def load_few_shot(path: Path, suite: str) -> dict[str, Any]:
    """The suite's few-shot results so far, or an empty document."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        doc = {}
    if doc.get("suite") != suite or doc.get("protocol") != QUICK.for_suite(suite):
        doc = {"suite": suite, "protocol": QUICK.for_suite(suite), "shots": [], "runs": {}}
    return doc


def run_few_shot(suite: str, seeds: Sequence[int], methods: Sequence[str], shots: Sequence[int], work: Path,
                 results_dir: Path, crosssim: Crosssim = run_crosssim, prepare=None) -> dict[str, Any]:
    """Every (seed, method, k) of one suite whose checkpoint exists, merged into ``few-shot-<suite>.json``."""
    if prepare is None:
        from benchmarks.datasets import prepare_suite as prepare
    path = Path(results_dir) / f"few-shot-{suite}.json"
    doc = load_few_shot(path, suite)
    doc.update({"environment": environment(), "code": code_fingerprint(), "missing": []})
    doc["shots"] = sorted({*doc["shots"], *shots})
    for seed in seeds:
        sites = prepare(suite, work / QUICK.name / "data" / f"seed-{seed}", seed=seed, size=QUICK.size,
                        limit=QUICK.limit, cache_dir=work / "downloads", progress=None)
        for method in methods:
            method_dir = work / QUICK.name / "runs" / suite / f"seed-{seed}" / method
            checkpoint = method_dir / "train" / "final.pt"
            if not checkpoint.is_file():
                doc["missing"].append(str(checkpoint))
                say(f"[{suite} seed {seed}] {method}: no checkpoint {checkpoint} (run benchmarks/accuracy.py "
                    "first); skipped")
                continue
            run = MethodRun(crosssim, method_dir / "few-shot")
            figures = {str(k): few_shot_figures(run, checkpoint, sites.target_site, sites.target_labels, k, seed,
                                                run.run_dir, work / "cache") for k in shots}
            earlier = doc["runs"].get(str(seed), {}).get(method, {})
            doc["runs"].setdefault(str(seed), {})[method] = {
                "figures": {**earlier.get("figures", {}), **figures}, "commands": run.commands,
                "code": doc["code"], **git_commit()}
            say(f"[{suite} seed {seed}] {method}: " + ", ".join(
                f"k={k} few-shot {f['few_shot_accuracy']:.3f} vs {f['label_free_method']} "
                f"{f['label_free_accuracy']:.3f}, deployed {f['deployed']}" for k, f in figures.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    return doc


def few_shot_table(doc: Mapping[str, Any]) -> str:
    """Markdown: per method and k, few-shot, label-free and deployed accuracy, mean ± std over seeds, and how
    often the shot check kept few-shot."""
    lines = ["| suite | method | k per class | seeds | few-shot accuracy | label-free (auto) accuracy | "
             "deployed (shot check) accuracy | few-shot deployed |", "|---|---|---|---|---|---|---|---|"]
    for method in few_shot_methods(doc):
        for k in doc["shots"]:
            few, free = few_shot_values(doc, method, k)
            checked = [r for r in few_shot_rows(doc, method, k) if "deployed" in r]  # none before the shot check
            deployed = _stat([r["deployed_accuracy"] for r in checked])
            kept = f"{sum(r['deployed'] == 'few-shot' for r in checked)} of {len(checked)}" if checked else "–"
            lines.append(f"| {doc['suite']} | {method} | {k} | {len(few)} | {_stat(few)} | {_stat(free)} | "
                         f"{deployed} | {kept} |")
    return "\n".join(lines)


def few_shot_methods(doc: Mapping[str, Any]) -> list[str]:
    """The methods of a few-shot results document, sorted."""
    return sorted({m for by_method in doc["runs"].values() for m in by_method})


def few_shot_rows(doc: Mapping[str, Any], method: str, k: int) -> list[Mapping[str, Any]]:
    """The figures of ``method`` with ``k`` shots per class, one per seed that measured them."""
    return [r[method]["figures"][str(k)] for r in doc["runs"].values()
            if str(k) in r.get(method, {}).get("figures", {})]


def few_shot_values(doc: Mapping[str, Any], method: str, k: int) -> tuple[list[float], list[float]]:
    """Few-shot and label-free accuracy of ``method`` with ``k`` shots per class, one of each per seed."""
    rows = few_shot_rows(doc, method, k)
    return [r["few_shot_accuracy"] for r in rows], [r["label_free_accuracy"] for r in rows]


def _stat(values: Sequence[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES), metavar="SUITE")
    parser.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 (default 3)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="METHOD",
                        help=f"federated methods whose checkpoints to adapt (default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--shots", nargs="+", type=int, default=list(DEFAULT_SHOTS), metavar="K",
                        help="labeled target images per class (1-20; default 1 5 10)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="accuracy.py's work folder")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="JSON output folder")
    args = parser.parse_args(argv)
    if any(not 1 <= k <= 20 for k in args.shots):
        parser.error("--shots: each k must be in 1..20")
    for suite in args.suites:
        doc = run_few_shot(suite, range(args.seeds), args.methods, args.shots, args.work.resolve(), args.results)
        print(few_shot_table(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

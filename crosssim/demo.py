"""`make demo`: synthetic hospitals → FedAvg and CrossSim federations (+ the pooled bound) → target scores.

The federations run through `crosssim simulate` in a child process (crosssim itself never imports Flower).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from crosssim.centralized import train_pooled
from crosssim.config import CONFIGS_DIR, load_config
from crosssim.data.synth import generate_hospitals
from crosssim.evaluate import evaluate_site
from crosssim.fileio import atomic_write_text

DEMO_CONFIG = CONFIGS_DIR / "demo.toml"
FEDERATED_STRATEGIES = ("fedavg", "crosssim")
ADAPTATIONS = ("none", "adabn")  # each model plain and with AdaBN on the target's images


def simulate(site_dirs: list[Path], strategy: str, out: Path, seed: int, cache: Path) -> Path:
    """One federation via the `crosssim simulate` command; returns its final checkpoint."""
    command = [sys.executable, "-m", "crosssim.cli", "simulate", "--sites", *map(str, site_dirs),
               "--strategy", strategy, "--out", str(out), "--config", str(DEMO_CONFIG), "--seed", str(seed),
               "--cache", str(cache)]
    subprocess.run(command, check=True)
    return out / "final.pt"


def _figure(value: float | None) -> str:
    """Three decimals; an undefined figure (NaN, written as null) shows as n/a."""
    return "n/a" if value is None or value != value else f"{value:.3f}"


def table_row(name: str, metrics: dict[str, Any]) -> str:
    lab, free = metrics["labeled"], metrics["label_free"]
    figures = (lab["accuracy"], lab["balanced_accuracy"], lab["macro_auc"], free.get("atc_estimated_accuracy"))
    return f"| {name} | " + " | ".join(_figure(v) for v in figures) + " |"


def run_demo(out: Path, preset: str, seed: int) -> str:
    started = time.perf_counter()
    cache = out / "cache"
    print(f"[1/4] writing synthetic hospitals ({preset} preset) to {out / 'sites'}")
    hospitals = generate_hospitals(out / "sites", preset=preset, seed=seed, progress=print)
    cfg = load_config(DEMO_CONFIG, {"seed": seed, "cache-dir": str(cache)})
    checkpoints: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for step, strategy in enumerate(FEDERATED_STRATEGIES, start=2):
        print(f"[{step}/4] federated training with {strategy}: {cfg.federation.rounds} rounds × "
              f"{cfg.federation.local_epochs} local epochs, one simulated hospital per source")
        begun = time.perf_counter()
        checkpoints[f"{strategy} (federated)"] = simulate(hospitals.source_sites, strategy, out / strategy, seed, cache)
        seconds[f"{strategy} (federated)"] = time.perf_counter() - begun
    print(f"[4/4] pooled training on the 3 sources ({cfg.train.epochs} epochs, the centralized bound), then "
          "every model on the unlabeled target, scored with its ground truth")
    begun = time.perf_counter()
    checkpoints["pooled (centralized bound)"] = train_pooled(hospitals.source_sites, cfg, out / "pooled")
    seconds["pooled (centralized bound)"] = time.perf_counter() - begun
    rows = []
    for name, checkpoint in checkpoints.items():
        for adapt in ADAPTATIONS:
            metrics = evaluate_site(checkpoint, hospitals.target_site,
                                    checkpoint.parent / ("target" if adapt == "none" else f"target-{adapt}"),
                                    labels_csv=hospitals.target_labels, cache_dir=cache, adapt=adapt)
            label = name if adapt == "none" else f"{name} + {adapt}"
            rows.append(table_row(label, metrics) + f" {seconds[name]:.0f} |")
    table = "\n".join(["| method | target accuracy | balanced accuracy | macro AUC | ATC estimate | train s |",
                       "|---|---|---|---|---|---|", *rows])
    elapsed = time.perf_counter() - started
    summary = (f"{table}\n\nDemo wall time: {elapsed:.0f} s (seed {seed}, preset {preset}, backbone "
               f"{cfg.model.backbone}, config {DEMO_CONFIG.name}).\n")
    atomic_write_text(out / "summary.md", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crosssim.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="demo folder (sites, runs, summary.md)")
    parser.add_argument("--preset", default="default", help="synthetic preset: default | hard")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(run_demo(Path(args.out).resolve(), args.preset, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CrossSim performance: every figure is a ratio of two measurements taken side by side in this one run.

Steps (one progress line each; a table at the end; JSON with date, git commit and machine):

1. client training throughput: ``crosssim.train.train_local`` vs a bare PyTorch loop (same CrossSimNet,
   same in-memory tensors, same batch size, plain CE + Adam, no augmentation), with ``augment`` none,
   basic and scanner and with CrossSim's default (two basic views, λ > 0 with prototypes); repeats
   interleaved, the best of them reported (the least disturbed on a shared machine; medians in the JSON),
   in ``--threads`` torch threads (default 1), and the CrossSim default once more in torch's default
   thread count; the augmentation's cost as training-step times: scanner vs basic vs none;
2. one epoch from the hospital-side cache (``load_site`` through the cache, then train) vs from tensors
   already in memory;
3. cold vs cached site load (``benchmarks/load.py``'s ``measure``);
4. a loopback deployment (SuperLink + 2 SuperNodes via ``crosssim server`` / ``crosssim client``, as in
   tests/test_deployment.py): the code as issue 16 found it (``BASELINE_COMMIT``, run from its own files), today's
   rounds on this checkout (two messages, Flower's poll intervals, no site worker) and this checkout's defaults,
   one after the other: each round's wall time split into message delivery wait, ClientApp start, imports, data
   load, model build, compute, reply transport and the server's aggregation + checkpoint, from the server's and the
   sites' wall-clock instants in ``RUN/rounds.jsonl``; the overhead (wall − slowest site compute) of all three from the
   sites' compute-s metrics;
5. bytes per round per client by record (weights, prototypes, metrics, config; both directions) with
   ``update-dtype`` float16 vs float32, serialized by Flower's own protobuf serde from the records the
   ClientApp's train/evaluate handlers return; and the target accuracy of a small ``crosssim simulate``
   (same seed, synthetic sites, constant LR) with float16 vs float32;
6. peak memory (summed PSS/RSS of the whole process tree, read from /proc) and round times of a 20-site
   ``crosssim simulate`` of tiny sites vs a 2-site one of the same kind of sites.

    .venv/bin/python benchmarks/perf.py [--quick | --full] [--steps 1,2,...] [--out benchmarks/results/perf.json]

``--quick`` (default) takes about 6-10 minutes on 2 CPU cores; ``--full`` uses larger sites, more
repeats and rounds. Timings on a shared machine are noisy: the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.load and tests.deployment_kit are reused, not copied

import torch
import torch.nn.functional as F
from flwr.app import (DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord,
                      RecordDict)
from flwr.common.serde import array_record_to_proto, config_record_to_proto, metric_record_to_proto

from benchmarks.load import measure as measure_site_load
from client.app import app as client_app
from crosssim.boundary import (ARRAYS_RECORD, COMPUTE_DONE, CONFIG_RECORD, DATA_LOADED, HANDLER_STARTED, IMPORTS_DONE,
                               IMPORTS_STARTED, MODEL_BUILT, PROCESS_STARTED, PROTOTYPES_RECORD, REPLY_PACKED,
                               ROUND_LAMBDA, ROUND_LR, ROUNDS_LOG_NAME, SERVER_ROUND)
from crosssim.config import CrossSimConfig, load_config
from crosssim.data.sites import load_site
from crosssim.data.synth import CLASSES as SYNTH_CLASSES
from crosssim.data.synth import generate_hospitals
from crosssim.evaluate import evaluate_site
from crosssim.federated import LocalSite, federated_classes, prototypes_to_arrays, round_schedule, wire_config
from crosssim.wire import to_wire
from crosssim.model import build_model
from crosssim.processes import SUPEREXEC_POLL_ENV
from crosssim.prototypes import compute_prototypes
from crosssim.train import infer, resolve_device, seed_everything, train_local
from tests.deployment_kit import descendants, flower_ports_env, free_ports, launch, stop

RESULTS_PATH = ROOT / "benchmarks" / "results" / "perf.json"
ALL_STEPS = (1, 2, 3, 4, 5, 6)
CLI = [sys.executable, "-m", "crosssim.cli"]
DEPLOY_TIMEOUT_S = 480.0  # like tests/test_deployment.py: each message starts a fresh ClientApp process
SIMULATE_TIMEOUT_S = 600.0
MEMORY_POLL_S = 0.5
PAGE_KIB = os.sysconf("SC_PAGESIZE") // 1024
MIB = 1024 * 1024
TINY_SIZE_PX = 32  # deployment and many-site simulations: tiny sites, like the e2e tests


@dataclass(frozen=True)
class Sizes:
    images_per_site: int  # synthetic sites for throughput, cache, bytes and accuracy (config image size)
    epochs: int  # per timed training call (throughput)
    repeats: int  # interleaved repeats per variant (throughput: best reported, as timeit does; others: median)
    load_repeats: int  # cold/cached pairs (benchmarks/load.py)
    deploy_rounds: int
    deploy_repeats: int  # before/after deployment pairs, interleaved; the least disturbed (lowest mean wall) reported
    accuracy_rounds: int  # float16 vs float32 simulation (constant LR: a short run still learns)
    tiny_images: int  # per tiny site (deployment, 2- and 20-site simulations)
    many_sites: int
    many_rounds: int


SIZES = {"quick": Sizes(images_per_site=160, epochs=1, repeats=5, load_repeats=2, deploy_rounds=5, deploy_repeats=2,
                        accuracy_rounds=8, tiny_images=24, many_sites=20, many_rounds=2),
         "full": Sizes(images_per_site=480, epochs=2, repeats=7, load_repeats=3, deploy_rounds=10, deploy_repeats=2,
                       accuracy_rounds=12, tiny_images=48, many_sites=20, many_rounds=3)}
TINY_SETTINGS = {"classes": ",".join(SYNTH_CLASSES), "image-size": TINY_SIZE_PX, "local-epochs": 1, "min-count": 2}
FLOWER_REPLY_POLL_S = 3.0  # flwr.superlink.grid.http_grid.HttpGrid.send_and_receive: time.sleep(3) between pulls
FLOWER_SUPEREXEC_POLL_S = 1.0  # flwr.supercore.superexec.run_superexec: _DEFAULT_TASK_POLL_INTERVAL_SECONDS
# Step 4's deployments: (checkout, config overrides, environment). "baseline" is main as issue 16 found it, run from
# its own files (weights tensor by tensor, two messages a round, Flower's polls, pydicom at import); it has no site
# timestamps, so only its wall, compute and overhead are known. "before" is today's rounds reproduced on this
# checkout (two messages, Flower's polls) and "after" this checkout's defaults, both split into phases.
BASELINE_COMMIT = "e25840d"
DEPLOY_VARIANTS = {  # name → (commit, config overrides, environment, crosssim client flags)
    "baseline": (BASELINE_COMMIT, {}, {}, ()),
    "before": (None, {"round-style": "two-messages", "reply-poll-s": FLOWER_REPLY_POLL_S},
               {SUPEREXEC_POLL_ENV: str(FLOWER_SUPEREXEC_POLL_S)}, ("--no-site-worker",)),
    "after": (None, {}, {}, ()),
}
OVERHEAD = "overhead (wall − slowest compute)"  # the issue-16 goal's figure, a round's wall minus its site compute
ROUND_PHASES = ("message delivery wait", "ClientApp start (Python, flwr, message + FAB pull)",
                "imports of client.app (torch, crosssim)", "ClientApp load → handler (Flower)", "data load (cache)",
                "model build", "compute", "reply transport", "server: aggregation + checkpoint")


# ---------------------------------------------------------------------------------------------- helpers

class Report:
    """Rows of the table: A and B measured side by side, and A/B."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self.started = time.perf_counter()

    def progress(self, line: str) -> None:
        print(f"[perf {time.perf_counter() - self.started:6.1f}s] {line}", flush=True)

    def row(self, step: str, a_name: str, a: float, b_name: str, b: float, unit: str, note: str = "") -> None:
        self.rows.append({"step": step, "a": a_name, "a_value": a, "b": b_name, "b_value": b, "unit": unit,
                          "ratio": a / b if b else float("nan"), "note": note})

    def merge(self, earlier: dict[str, Any], steps: set[int]) -> None:
        """Keep ``earlier``'s rows and details of the steps not run now (``--steps``), in step order."""
        kept = [r for r in earlier.get("rows", []) if int(r["step"].split()[0]) not in steps]
        self.rows = sorted(kept + self.rows, key=lambda r: int(r["step"].split()[0]))
        self.details = {**earlier.get("details", {}), **self.details}

    def table(self) -> str:
        lines = ["| step | A | B | unit | A | B | A/B | note |", "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['step']} | {r['a']} | {r['b']} | {r['unit']} | {_fmt(r['a_value'])} | "
                         f"{_fmt(r['b_value'])} | {r['ratio']:.3f} | {r['note']} |")
        return "\n".join(lines)


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _cfg(overrides: dict[str, Any] | None = None) -> CrossSimConfig:
    """configs/default.toml with ``overrides`` and the synthetic hospitals' classes: the product's defaults."""
    return load_config(None, {"classes": ",".join(SYNTH_CLASSES), **(overrides or {})})


def _set_flags(overrides: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for key, value in overrides.items():
        flags += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return flags


def _images_per_epoch(n: int, batch_size: int) -> int:
    """Images one epoch trains on: train.make_loader drops the last partial batch when there are several."""
    return n if n <= batch_size else n // batch_size * batch_size


def _median_by_variant(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in samples.items()}


def _in_threads(count: int, restore: int, run: Callable[[torch.nn.Module], None]) -> Callable[[torch.nn.Module], None]:
    def wrapped(model: torch.nn.Module) -> None:
        torch.set_num_threads(count)
        try:
            run(model)
        finally:
            torch.set_num_threads(restore)
    return wrapped


def _best_by_variant(samples: dict[str, list[float]]) -> dict[str, float]:
    """Highest rate per variant: on a shared machine the least-disturbed repeat is the truest (timeit's rule)."""
    return {name: max(values) for name, values in samples.items()}


# ------------------------------------------------------------------------------ 1. training throughput

def bare_loop(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
              batch_size: int, lr: float, seed: int) -> None:
    """The baseline: shuffled batches of in-memory tensors, cross-entropy, Adam. Nothing else."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    used = _images_per_epoch(len(labels), batch_size)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)[:used]
        for start in range(0, used, batch_size):
            index = order[start:start + batch_size]
            logits, _ = model(images[index])
            loss = F.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def throughput(report: Report, site: LocalSite, sizes: Sizes, threads: int, default_threads: int) -> None:
    """Variants interleaved in ``threads`` torch threads; the product default once more in torch's default."""
    cfg_off = _cfg({"augment": "none"})
    cfg_default = _cfg()
    device = resolve_device(cfg_off.train.device)
    classes = federated_classes(cfg_off)
    seed_everything(cfg_off.seed)
    initial = build_model(cfg_off.model, len(classes))
    x, y = site.train_x.to(device), site.train_y.to(device)
    _, embeddings = infer(copy.deepcopy(initial), site.train_x, device)
    prototypes = compute_prototypes(embeddings, site.train_y, len(classes), min_count=1)
    lambda_sim = cfg_default.method.lambda_sim
    batch = cfg_off.train.batch_size
    images = sizes.epochs * _images_per_epoch(len(site.train_y), batch)

    def product(cfg: CrossSimConfig, with_prototypes: bool) -> Callable[[torch.nn.Module], None]:
        return lambda model: train_local(model, site.train_x, site.train_y, cfg, epochs=sizes.epochs,
                                         lr=cfg.train.lr, seed=cfg.seed, device=device,
                                         prototypes=prototypes if with_prototypes else None,
                                         lambda_sim=lambda_sim if with_prototypes else 0.0)

    modes = ("none", "basic", "scanner")
    by_mode = {mode: f"train_local, augment {mode}, λ=0" for mode in modes}
    default_name = (f"train_local default (augment {cfg_default.augment.augment} = "
                    f"pair views, λ={lambda_sim:g} + prototypes)")
    bare_name = "bare loop (CE + Adam)"
    variants: dict[str, Callable[[torch.nn.Module], None]] = {
        bare_name: lambda model: bare_loop(model.to(device), x, y, epochs=sizes.epochs, batch_size=batch,
                                           lr=cfg_off.train.lr, seed=cfg_off.seed),
        **{by_mode[mode]: product(_cfg({"augment": mode}), False) for mode in modes},
        default_name: product(cfg_default, True),
    }
    more_threads = f"train_local default, {default_threads} torch threads"
    if default_threads != threads:
        variants[more_threads] = _in_threads(default_threads, threads, product(cfg_default, True))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(sizes.repeats + 1):  # repeat 0 warms every code path up and is not counted
        for name, run in variants.items():
            model = copy.deepcopy(initial)
            started = time.perf_counter()
            run(model)
            if repeat:
                samples[name].append(images / (time.perf_counter() - started))
        report.progress(f"throughput: repeat {repeat}/{sizes.repeats} done" + (" (warm-up)" if not repeat else ""))
    rates, medians = _best_by_variant(samples), _median_by_variant(samples)
    step = "1 client training throughput"
    for name in (*by_mode.values(), default_name):
        report.row(step, name, rates[name], bare_name, rates[bare_name], "images/s",
                   f"best of {sizes.repeats}; medians {medians[name]:.0f} vs {medians[bare_name]:.0f}")
    report.row(step, default_name, rates[default_name], by_mode["none"], rates[by_mode["none"]],
               "images/s", "the method's overhead (augmentation + similarity loss)")
    if more_threads in variants:
        report.row(step, more_threads, rates[more_threads], f"the same, {threads} thread(s)", rates[default_name],
                   "images/s", f"medians {medians[more_threads]:.0f} vs {medians[default_name]:.0f}; "
                   "torch's default thread count on a shared machine")
    step_ms = {mode: 1000.0 * batch / rates[name] for mode, name in by_mode.items()}
    median_ms = {mode: 1000.0 * batch / medians[name] for mode, name in by_mode.items()}
    cost = (f"1 augmentation cost ({cfg_off.model.backbone}, {cfg_off.data.image_size} px, batch {batch}, "
            f"{device.type}, {threads} thread(s))")
    for a, b in (("scanner", "basic"), ("basic", "none"), ("scanner", "none")):
        report.row(cost, f"training step, augment {a}", step_ms[a], f"augment {b}", step_ms[b], "ms/step",
                   f"best of {sizes.repeats}; medians {median_ms[a]:.1f} vs {median_ms[b]:.1f}"
                   + ("; goal ≤ 1.3" if (a, b) == ("scanner", "basic") else ""))
    report.progress("augmentation cost: step time " + ", ".join(f"{mode} {ms:.1f} ms" for mode, ms in step_ms.items())
                    + f"; scanner/basic {step_ms['scanner'] / step_ms['basic']:.3f}")
    report.details["throughput"] = {"images_per_call": images, "train_images": len(site.train_y),
                                    "batch_size": batch, "device": str(device), "torch_threads": threads,
                                    "samples": samples, "step_ms_best": step_ms, "step_ms_median": median_ms,
                                    "best_images_per_s": rates, "median_images_per_s": medians}


# ------------------------------------------------------------------------------ 2. epoch from the cache

def epoch_from_cache(report: Report, folder: Path, cache_dir: Path, sizes: Sizes) -> None:
    cfg = _cfg()
    device = resolve_device(cfg.train.device)
    classes = federated_classes(cfg)
    seed_everything(cfg.seed)
    initial = build_model(cfg.model, len(classes))

    def load() -> LocalSite:
        site = load_site(folder, cfg.data, labeled=True, classes=classes, cache_dir=cache_dir)
        return LocalSite.from_site(site, cfg)

    in_memory = load()  # also warms the cache

    def epoch(site: LocalSite) -> None:
        train_local(copy.deepcopy(initial), site.train_x, site.train_y, cfg, epochs=1, lr=cfg.train.lr,
                    seed=cfg.seed, device=device)

    samples: dict[str, list[float]] = {"cache": [], "memory": [], "load": []}
    epoch(in_memory)  # warm-up
    for _ in range(sizes.repeats):
        started = time.perf_counter()
        site = load()
        loaded = time.perf_counter()
        epoch(site)
        samples["cache"].append(time.perf_counter() - started)
        samples["load"].append(loaded - started)
        started = time.perf_counter()
        epoch(in_memory)
        samples["memory"].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in samples.items()}  # least disturbed repeat
    report.row("2 epoch from the hospital cache", "load_site (cached) + 1 epoch", best["cache"],
               "1 epoch on in-memory tensors", best["memory"], "s",
               f"best of {sizes.repeats}; cached load alone {best['load']:.3f} s for "
               f"{len(in_memory.train_y) + len(in_memory.val_y)} images")
    report.details["epoch_from_cache"] = {"samples_s": samples, "best_s": best,
                                          "median_s": _median_by_variant(samples)}
    report.progress(f"epoch: {best['cache']:.2f} s through the cache vs {best['memory']:.2f} s in memory")


# ------------------------------------------------------------------------------ 3. cold vs cached load

def site_load(report: Report, folder: Path, work: Path, sizes: Sizes) -> None:
    result = measure_site_load(folder, work, sizes.load_repeats)
    report.row("3 site load", "first (cold) load", result["cold_s"], "cached load", result["cached_s"], "s",
               f"{result['files']} DICOM files: {result['cold_files_per_s']:.0f} vs "
               f"{result['cached_files_per_s']:.0f} files/s")
    report.details["site_load"] = result
    report.progress(f"site load: cold {result['cold_s']:.2f} s, cached {result['cached_s']:.3f} s")


# ------------------------------------------------------------------------------ 4. loopback deployment

def cold_import_seconds(module: str) -> float:
    """Wall time of a fresh Python that imports ``module``: ``client.app`` is what each deployment message pays with
    a site worker, ``client.task`` (torch, crosssim) what it pays without one."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
    return time.perf_counter() - started


def checkout(commit: str, work: Path) -> Path:
    """The files of ``commit`` (``git archive``) under ``work``, to run as they were."""
    folder = work / f"checkout-{commit}"
    if not (folder / "pyproject.toml").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def deploy(sites: list[Path], work: Path, name: str, rounds: int, overrides: dict[str, Any],
           env_extra: dict[str, str], client_flags: tuple[str, ...] = (),
           root: Path = ROOT) -> tuple[list[dict[str, Any]], float]:
    """One loopback deployment of the code in ``root`` with ``overrides`` (``env_extra`` for every process,
    ``client_flags`` for each ``crosssim client``); (its records, whole s)."""
    link_port, *node_ports, http_port, control_port = free_ports(5)
    env = {**flower_ports_env([http_port, control_port]), "PYTHONPATH": str(root), **env_extra}
    run = work / f"deploy-{name}"
    started = time.perf_counter()
    server = launch(["server", "--out", run, "--port", link_port, "--min-sites", 2, "--rounds", rounds,
                     "--app", root, *_set_flags({**TINY_SETTINGS, **overrides})], env, work / f"deploy-{name}.log",
                    cwd=root)
    clients = [launch(["client", "--superlink", f"127.0.0.1:{link_port}", "--port", port, "--data", site,
                       "--cache", work / f"deploy-cache-{i}", *client_flags],
                      {**env, "FLWR_HOME": str(work / f"flwr-{name}-{i}")}, work / f"deploy-{name}-client-{i}.log",
                      cwd=root)
               for i, (site, port) in enumerate(zip(sites, node_ports))]
    try:
        server.wait(timeout=DEPLOY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in [*clients, server]:
            stop(process)
    total = time.perf_counter() - started
    if server.returncode != 0 or not (run / ROUNDS_LOG_NAME).is_file():
        raise RuntimeError(f"deployment {name} failed (exit {server.returncode}); see {work}/deploy-{name}*.log\n"
                           + (work / f"deploy-{name}.log").read_text()[-2000:])
    return [json.loads(line) for line in (run / ROUNDS_LOG_NAME).read_text().splitlines()], total


def round_breakdown(record: dict[str, Any]) -> dict[str, float]:
    """A round's wall time split along the path the server waited on: per message kind, the site whose reply was
    packed last, from the server's and that site's wall-clock instants (one machine: one clock); the phases sum to
    the round's wall time. ``site compute (slowest)`` is the largest compute over sites, summed over kinds."""
    phases = dict.fromkeys(ROUND_PHASES, 0.0)
    transit = slowest = 0.0
    for kind in ("train", "evaluate"):
        sent, received = record["timeline"].get(f"{kind}-sent"), record["timeline"].get(f"{kind}-received")
        sites = [t for key, t in record["site_timings"].items() if key.startswith(f"{kind} ")]
        if sent is None or received is None or not sites:
            continue
        last = max(sites, key=lambda t: t[REPLY_PACKED])
        phases["message delivery wait"] += last[PROCESS_STARTED] - sent
        phases["ClientApp start (Python, flwr, message + FAB pull)"] += last[IMPORTS_STARTED] - last[PROCESS_STARTED]
        phases["imports of client.app (torch, crosssim)"] += last[IMPORTS_DONE] - last[IMPORTS_STARTED]
        phases["ClientApp load → handler (Flower)"] += last[HANDLER_STARTED] - last[IMPORTS_DONE]
        phases["data load (cache)"] += last[DATA_LOADED] - last[HANDLER_STARTED]
        phases["model build"] += last[MODEL_BUILT] - last[DATA_LOADED]
        phases["compute"] += last[COMPUTE_DONE] - last[MODEL_BUILT]
        phases["reply transport"] += received - last[COMPUTE_DONE]
        transit += received - sent
        slowest += max(t[COMPUTE_DONE] - t[MODEL_BUILT] for t in sites)
    phases["server: aggregation + checkpoint"] = record["wall_s"] - transit
    phases["site compute (slowest)"] = slowest
    phases[OVERHEAD] = record["wall_s"] - slowest
    phases["wall"] = record["wall_s"]
    return phases


def metrics_overhead(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean round wall, slowest site compute (train + evaluate, from the sites' own compute-s metrics) and their
    difference: figures every version's ``rounds.jsonl`` holds, timestamps or not."""
    compute = [max(r["train_compute_s"] or [0.0]) + max(r["evaluate_compute_s"] or [0.0]) for r in records]
    wall = statistics.mean(r["wall_s"] for r in records)
    return {"wall": wall, "site compute (slowest)": statistics.mean(compute),
            OVERHEAD: wall - statistics.mean(compute)}


def _messages_per_site(records: list[dict[str, Any]], sites: int) -> float:
    """Messages each site handled over the run: one per timestamped reply, else one per train and evaluate reply."""
    if all("site_timings" in r for r in records):
        return sum(len(r["site_timings"]) for r in records) / sites
    return sum(len(r["train_compute_s"]) + len(r["evaluate_compute_s"]) for r in records) / sites


def deployment(report: Report, sites: list[Path], work: Path, sizes: Sizes) -> None:
    """The baseline commit, today's rounds on this checkout and this checkout's defaults, the same tiny federation,
    runs interleaved; rounds split into phases from timestamps where the code records them. Of each variant the
    least disturbed run (lowest mean round wall) is reported, every run is in the JSON."""
    step = f"4 loopback deployment (2 SuperNodes, {sizes.deploy_rounds} rounds)"
    cfg = _cfg(TINY_SETTINGS)
    for i, site in enumerate(sites):  # every deployment finds the caches warm, as after a first round
        load_site(site, cfg.data, labeled=True, classes=federated_classes(cfg), cache_dir=work / f"deploy-cache-{i}")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in DEPLOY_VARIANTS}
    for repeat in range(sizes.deploy_repeats):
        for name, (commit, overrides, env_extra, client_flags) in DEPLOY_VARIANTS.items():
            root = checkout(commit, work) if commit else ROOT
            rounds, total = deploy(sites, work, f"{name}-{repeat}", sizes.deploy_rounds, overrides, env_extra,
                                   client_flags, root)
            split = [round_breakdown(r) for r in rounds] if all("site_timings" in r for r in rounds) else []
            mean = {phase: statistics.mean(s[phase] for s in split) for phase in split[0]} if split else {}
            overall = metrics_overhead(rounds)
            runs[name].append({"rounds": split, "mean": mean, "from_metrics": overall, "total_s": total,
                               "load_average": os.getloadavg(), "load_s": [r["load_s"] for r in rounds],
                               "messages_per_site": _messages_per_site(rounds, len(sites))})
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in rounds)
            report.progress(f"deployment {name} {repeat + 1}/{sizes.deploy_repeats}: rounds {walls} s, overhead "
                            f"{overall[OVERHEAD]:.1f} s a round, whole run {total:.1f} s")
    outcome: dict[str, Any] = {name: {**min(results, key=lambda r: r["from_metrics"]["wall"]), "repeats": results,
                                      "commit": DEPLOY_VARIANTS[name][0], "overrides": DEPLOY_VARIANTS[name][1],
                                      "env": DEPLOY_VARIANTS[name][2], "client_flags": DEPLOY_VARIANTS[name][3]}
                               for name, results in runs.items()}
    after, before, baseline = (outcome[name] for name in ("after", "before", "baseline"))
    for phase in after["mean"]:
        report.row(step, f"after: {phase}, mean a round", after["mean"][phase], "before", before["mean"][phase], "s",
                   f"rounds {', '.join(f'{s[phase]:.2f}' for s in after['rounds'])} vs "
                   f"{', '.join(f'{s[phase]:.2f}' for s in before['rounds'])}")
    for figure, value in after["from_metrics"].items():
        goal = "; goal ≤ 0.5" if figure == OVERHEAD else ""
        report.row(step, f"after: {figure} (compute-s metrics), mean a round", value,
                   f"baseline {BASELINE_COMMIT}", baseline["from_metrics"][figure], "s",
                   f"today's settings on this checkout: {before['from_metrics'][figure]:.2f} s{goal}")
    report.row(step, "after: messages per site", after["messages_per_site"], f"baseline {BASELINE_COMMIT}",
               baseline["messages_per_site"], "messages", "whole run")
    report.row(step, "after: whole `crosssim server` run", after["total_s"], f"baseline {BASELINE_COMMIT}",
               baseline["total_s"], "s", "incl. SuperLink start, nodes joining, FAB, ServerApp start, stop")
    imports = {module: statistics.median(cold_import_seconds(module) for _ in range(2))
               for module in ("client.app", "client.task")}
    report.row(step, "cold `python -c 'import client.app'`", imports["client.app"],
               "cold `python -c 'import client.task'`", imports["client.task"], "s",
               "what each message's fresh process imports with a site worker vs without one")
    report.details["deployment"] = {**outcome, "cold_import_s": imports, "images_per_site": sizes.tiny_images,
                                    "settings": TINY_SETTINGS, "phases": list(ROUND_PHASES),
                                    "baseline_commit": BASELINE_COMMIT}


# ------------------------------------------------------------------------------ 5. bytes and accuracy

def _record_bytes(record: Any) -> int:
    """Size of one record in Flower's own protobuf serialization."""
    if isinstance(record, ArrayRecord):
        return array_record_to_proto(record).ByteSize()
    if isinstance(record, MetricRecord):
        return metric_record_to_proto(record).ByteSize()
    if isinstance(record, ConfigRecord):
        return config_record_to_proto(record).ByteSize()
    raise TypeError(type(record))


def _message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(run_id=1, message_id="perf", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="2", created_at=time.time(), ttl=DEFAULT_TTL, message_type=message_type)
    return Message(content=content, metadata=metadata)


def round_bytes(folder: Path, cache_dir: Path, update_dtype: str, server_round: int = 2) -> dict[str, int]:
    """Bytes of every record one site receives and sends in a round with prototypes (λ > 0).

    Server → site: the records CrossSimStrategy sends (weights via ``to_wire``, the wire config, global
    prototypes). Site → server: what the ClientApp's train and evaluate handlers return.
    """
    cfg = _cfg({"update-dtype": update_dtype, "local-epochs": 1})  # sizes do not depend on the epochs
    classes = federated_classes(cfg)
    seed_everything(cfg.seed)
    model = build_model(cfg.model, len(classes))
    site = LocalSite.from_site(load_site(folder, cfg.data, labeled=True, classes=classes, cache_dir=cache_dir), cfg)
    _, embeddings = infer(model, site.train_x, torch.device("cpu"))
    protos = ArrayRecord(prototypes_to_arrays(compute_prototypes(embeddings, site.train_y, len(classes), 1)))
    lr, lambda_sim = round_schedule(cfg, server_round)
    arrays = ArrayRecord(to_wire(model.state_dict(), update_dtype))
    down = {"train": RecordDict({ARRAYS_RECORD: arrays, PROTOTYPES_RECORD: protos, CONFIG_RECORD: ConfigRecord(
                {**wire_config(cfg), SERVER_ROUND: server_round, ROUND_LR: lr, ROUND_LAMBDA: lambda_sim})}),
            "evaluate": RecordDict({ARRAYS_RECORD: arrays, PROTOTYPES_RECORD: protos,
                                    CONFIG_RECORD: ConfigRecord({**wire_config(cfg), SERVER_ROUND: server_round})})}
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"data": str(folder), "site": folder.name, "cache": str(cache_dir)})
    sizes: dict[str, int] = {}
    for kind, message_type in (("train", MessageType.TRAIN), ("evaluate", MessageType.EVALUATE)):
        for name, record in down[kind].items():
            sizes[f"server→site {kind}: {name}"] = _record_bytes(record)
        reply = client_app(_message(down[kind], message_type), context)
        if reply.has_error():
            raise RuntimeError(f"{kind} handler failed: {reply.error.reason}")
        for name, record in reply.content.items():
            sizes[f"site→server {kind}: {name}"] = _record_bytes(record)
    return sizes


def simulate(sites: list[Path], out: Path, cache_dir: Path, overrides: dict[str, Any],
             rounds: int) -> tuple[float, dict[str, float]]:
    """``crosssim simulate`` in a child process (own session); returns (wall s, peak memory of its tree)."""
    command = [*CLI, "simulate", "--sites", *map(str, sites), "--rounds", str(rounds), "--out", str(out),
               "--cache", str(cache_dir), *_set_flags(overrides)]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    peak = {"pss_mib": 0.0, "rss_mib": 0.0, "largest_rss_mib": 0.0, "processes": 0}
    try:
        while process.poll() is None and time.perf_counter() - started < SIMULATE_TIMEOUT_S:
            memory = tree_memory(process.pid)
            for key in peak:
                peak[key] = max(peak[key], memory[key])
            time.sleep(MEMORY_POLL_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"crosssim simulate failed (exit {process.returncode}):\n{log.read_text()[-3000:]}")
    return wall, peak


def _session_members(session: int) -> set[int]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == session:  # field 6 of /proc/PID/stat: session id
                members.add(int(entry.name))
    return members


def tree_memory(root: int) -> dict[str, float]:
    """Summed PSS (shared pages split fairly) and RSS of ``root``, its descendants and its session, in MiB."""
    pids = {root} | {pid for pid, _ in descendants([root])} | _session_members(root)
    pss = rss = largest = 0.0
    alive = 0
    for pid in pids:
        try:
            rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (OSError, IndexError, ValueError):
            continue
        alive += 1
        process_rss = rss_pages * PAGE_KIB / 1024
        rss += process_rss
        largest = max(largest, process_rss)
        pss += next((int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:")), 0) / 1024
    return {"pss_mib": pss, "rss_mib": rss, "largest_rss_mib": largest, "processes": alive}


def wire_and_accuracy(report: Report, hospitals: Any, cache_dir: Path, work: Path, sizes: Sizes) -> None:
    step = "5 bytes per round per client"
    by_dtype = {dtype: round_bytes(hospitals.source_sites[0], cache_dir, dtype) for dtype in ("float32", "float16")}
    for name in by_dtype["float32"]:
        report.row(step, f"float16: {name}", by_dtype["float16"][name], "float32", by_dtype["float32"][name], "bytes")
    totals = {dtype: sum(values.values()) for dtype, values in by_dtype.items()}
    report.row(step, "float16: all records, both directions", totals["float16"], "float32", totals["float32"], "bytes")
    report.progress(f"bytes per round per client: float32 {totals['float32']:,}, float16 {totals['float16']:,}")

    step = f"5 float16 vs float32 ({sizes.accuracy_rounds}-round simulation, 3 sites, constant LR)"
    outcome = {}
    # The simulation is deterministic for a seed, so float16 vs float32 at seed 0 isolates the wire dtype;
    # float32 at seed 1 shows how far an unrelated perturbation moves the same figures.
    for run_name, dtype, seed in (("float32", "float32", 0), ("float16", "float16", 0),
                                  ("float32-seed1", "float32", 1)):
        run = work / f"accuracy-{run_name}"
        wall, _ = simulate(hospitals.source_sites, run, cache_dir,
                           {"update-dtype": dtype, "seed": seed, "schedule": "constant"}, sizes.accuracy_rounds)
        metrics = evaluate_site(run / "final.pt", hospitals.target_site, work / f"target-{run_name}",
                                labels_csv=hospitals.target_labels, cache_dir=cache_dir, progress=None)
        last = json.loads((run / ROUNDS_LOG_NAME).read_text().splitlines()[-1])
        outcome[run_name] = {"target_accuracy": metrics["labeled"]["accuracy"],
                             "val_accuracy": last["evaluate"]["val-accuracy"], "wall_s": wall}
        report.progress(f"simulate {run_name}: target accuracy {outcome[run_name]['target_accuracy']:.3f}, "
                        f"val accuracy {outcome[run_name]['val_accuracy']:.3f} ({wall:.1f} s)")
    for key, label in (("target_accuracy", "target accuracy (labels)"), ("val_accuracy", "source val accuracy")):
        for run_name, a_label in (("float16", "float16"), ("float32-seed1", "float32, seed 1 (reference)")):
            delta = outcome[run_name][key] - outcome["float32"][key]
            report.row(step, f"{a_label}: {label}", outcome[run_name][key], "float32, seed 0",
                       outcome["float32"][key], "fraction", f"Δ {delta:+.3f}")
    report.details["wire"] = {"bytes": by_dtype, "totals": totals, "accuracy": outcome}


# ------------------------------------------------------------------------------ 6. many-site simulation

def many_sites(report: Report, sites: list[Path], work: Path, sizes: Sizes) -> None:
    step = f"6 {sizes.many_sites}-site simulation ({sizes.tiny_images} images × {TINY_SIZE_PX} px a site)"
    outcome = {}
    for count in (2, sizes.many_sites):
        run = work / f"sites-{count}"
        wall, peak = simulate(sites[:count], run, work / f"tiny-cache-{count}", TINY_SETTINGS, sizes.many_rounds)
        rounds = [json.loads(line) for line in (run / ROUNDS_LOG_NAME).read_text().splitlines()]
        later = rounds[1:] or rounds  # round 1 also starts Ray's actors and loads every site cold
        outcome[count] = {"wall_s": wall, "round_wall_s": [r["wall_s"] for r in rounds],
                          "first_round_s": rounds[0]["wall_s"],
                          "later_round_s": statistics.mean(r["wall_s"] for r in later),
                          "later_site_compute_s": statistics.mean(
                              sum(r["train_compute_s"]) + sum(r["evaluate_compute_s"]) for r in later), **peak}
        report.progress(f"simulate {count} sites: {wall:.1f} s, rounds "
                        f"{', '.join(f'{r:.1f}' for r in outcome[count]['round_wall_s'])} s, peak PSS "
                        f"{peak['pss_mib']:.0f} MiB over up to {peak['processes']} processes")
    many, two = outcome[sizes.many_sites], outcome[2]
    n = sizes.many_sites
    report.row(step, f"{n} sites: round 1 wall", many["first_round_s"], "2 sites", two["first_round_s"], "s",
               "incl. Ray actor start and cold site loads")
    report.row(step, f"{n} sites: later rounds, mean wall", many["later_round_s"], "2 sites", two["later_round_s"],
               "s")
    report.row(step, f"{n} sites: later rounds, wall per site", many["later_round_s"] / n, "2 sites",
               two["later_round_s"] / 2, "s")
    report.row(step, f"{n} sites: later rounds, summed site compute", many["later_site_compute_s"], "2 sites",
               two["later_site_compute_s"], "s", "train + evaluate, all sites")
    report.row(step, f"{n} sites: peak memory (summed PSS)", many["pss_mib"], "2 sites", two["pss_mib"], "MiB",
               "whole process tree incl. Ray")
    report.row(step, f"{n} sites: peak memory (summed RSS)", many["rss_mib"], "2 sites", two["rss_mib"], "MiB",
               "shared pages counted per process")
    report.row(step, f"{n} sites: largest process RSS", many["largest_rss_mib"], "2 sites",
               two["largest_rss_mib"], "MiB")
    report.row(step, f"{n} sites: whole command", many["wall_s"], "2 sites", two["wall_s"], "s",
               "incl. Ray start-up and the first (cold) site loads")
    report.details["many_sites"] = {str(k): v for k, v in outcome.items()}


# ---------------------------------------------------------------------------------------------- driver

def machine(default_threads: int) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    import flwr

    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_default_threads": default_threads, "python": platform.python_version(),
            "torch": torch.__version__, "flwr": getattr(flwr, "__version__", "?"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3}


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", help="small sizes (default)")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="larger sites, more repeats")
    parser.add_argument("--out", type=Path, default=RESULTS_PATH, help=f"JSON results (default {RESULTS_PATH})")
    parser.add_argument("--work", type=Path, help="keep the sites, runs and logs here (default: a temporary folder)")
    parser.add_argument("--steps", default=",".join(map(str, ALL_STEPS)), metavar="N,...",
                        help="steps to run (default all); a subset replaces those steps' rows and details in --out "
                             "and keeps the others")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the in-process timings (steps 1-2; default 1: steady on a shared "
                             "machine); child processes keep the product's setting")
    args = parser.parse_args()
    mode = args.size or "quick"
    sizes = SIZES[mode]
    steps = {int(n) for n in args.steps.split(",")}
    report = Report()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    report.progress(f"mode {mode}: {asdict(sizes)}; load average {load_before[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="crosssim-perf-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        tiny = [site for i in range(-(-sizes.many_sites // 3))
                for site in generate_hospitals(work / f"tiny-{i}", seed=i, images_per_site=sizes.tiny_images,
                                               image_size=TINY_SIZE_PX).source_sites][:sizes.many_sites]
        cache_dir = work / "cache"
        if steps & {1, 2, 3, 5}:
            hospitals = generate_hospitals(work / "sites", images_per_site=sizes.images_per_site)
            cfg = _cfg()
            folder = hospitals.source_sites[0]
            site = LocalSite.from_site(load_site(folder, cfg.data, labeled=True, classes=federated_classes(cfg),
                                                 cache_dir=cache_dir), cfg)
            for other in hospitals.source_sites[1:] + [hospitals.target_site]:  # warm the cache for step 5
                load_site(other, cfg.data, labeled=False, cache_dir=cache_dir)
        report.progress(f"sites written; {len(tiny)} tiny sites of {sizes.tiny_images}")
        runs = {1: ("client training throughput", lambda: throughput(report, site, sizes, args.threads,
                                                                     default_threads)),
                2: ("an epoch through the hospital-side cache vs in memory",
                    lambda: epoch_from_cache(report, folder, cache_dir, sizes)),
                3: ("cold vs cached site load", lambda: site_load(report, folder, work / "load", sizes)),
                4: ("loopback deployment (crosssim server + 2 × crosssim client): baseline commit, before, after",
                    lambda: deployment(report, tiny[:2], work, sizes)),
                5: ("bytes on the wire and accuracy, float16 vs float32",
                    lambda: wire_and_accuracy(report, hospitals, cache_dir, work, sizes)),
                6: (f"{sizes.many_sites}-site vs 2-site simulation", lambda: many_sites(report, tiny, work, sizes))}
        for number in sorted(steps):
            title, run = runs[number]
            report.progress(f"step {number}/{len(ALL_STEPS)}: {title}")
            run()

    now = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit()}
    step_runs = {str(n): now for n in sorted(steps)}
    if steps != set(ALL_STEPS) and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        report.merge(earlier, steps)
        old = {n: {"date": earlier.get("date"), "git_commit": earlier.get("git_commit")} for n in map(str, ALL_STEPS)}
        step_runs = {**old, **earlier.get("step_runs", {}), **step_runs}
    table = report.table()
    print(table)
    result = {**now, "step_runs": step_runs, "machine": machine(default_threads), "mode": mode,
              "torch_threads_in_process": args.threads, "sizes": asdict(sizes),
              "load_average": {"before": load_before, "after": os.getloadavg()},
              "seconds": time.perf_counter() - report.started, "rows": report.rows, "details": report.details,
              "table": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    report.progress(f"wrote {args.out}")


if __name__ == "__main__":
    main()

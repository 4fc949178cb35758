"""`crosssim serve` throughput and latency vs in-process PyTorch, and int8 vs float accuracy, in one run.

Steps: synthetic hospitals (``crosssim synth``'s generator) → a pooled model (``crosssim train``) →
``crosssim export --quantize int8`` calibrated on the target's images (never its labels) → for the same
DICOM files, one request at a time:

- ``pytorch``: in-process, the baseline: DICOM bytes → ``read_image`` → CrossSimNet forward (batch 1);
- ``onnx-float`` / ``onnx-int8``: in-process ONNX Runtime (``crosssim.served_model``), same preprocessing;
- the same three ``(model only)``: already preprocessed images, so the model's own share (what int8 can speed up);
- the same three ``(model only, batch 32)``: 32 preprocessed images a call, as ``POST /v1/predict/batch`` runs them
  (req/s counts calls);
- ``http-float`` / ``http-int8``: ``crosssim serve`` subprocesses over loopback, raw application/dicom bodies
  on one keep-alive connection.

Every variant runs in ``--threads`` threads (default 1: on a shared 2-core machine more threads mostly
contend). Requests/s and p50/p95 latency of each, with ratios vs the PyTorch baseline; then accuracy on the labeled
target of PyTorch, float and int8 ONNX and the int8-vs-float agreement. Writes benchmarks/results/serve.json.

    .venv/bin/python benchmarks/serve.py [--requests 200] [--images-per-site 96] [--epochs 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.accuracy import environment  # noqa: E402
from crosssim.centralized import train_pooled  # noqa: E402
from crosssim.checkpoint import load_checkpoint  # noqa: E402
from crosssim.config import load_config  # noqa: E402
from crosssim.data.dicom import read_image  # noqa: E402
from crosssim.data.files import iter_candidate_files  # noqa: E402
from crosssim.data.sites import load_labels_for, load_site  # noqa: E402
from crosssim.data.synth import generate_hospitals  # noqa: E402
from crosssim.export import export_model  # noqa: E402
from crosssim.processes import first_free_port, stop_group, wait_for_port  # noqa: E402
from crosssim.served_model import ServedModel  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results" / "serve.json"
WARMUP_REQUESTS = 10  # per variant, not timed (session and connection set-up, lazy imports)
SERVER_START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
SEARCH_FROM_PORT = 18800
MS_PER_S = 1000.0
MODEL_ONLY = " (model only)"  # row suffix: preprocessed images in, no DICOM parsing; compared with PyTorch's alike
BATCH_IMAGES = 32  # images a call of the batch rows
MODEL_ONLY_BATCH = f" (model only, batch {BATCH_IMAGES})"


def timed(call: Callable[[Any], Any], bodies: Sequence[Any], requests: int) -> dict[str, float]:
    """Requests/s and p50/p95 latency (ms) of ``call`` over ``requests`` bodies (DICOM bytes or preprocessed
    images), cycling, after a warm-up."""
    for i in range(WARMUP_REQUESTS):
        call(bodies[i % len(bodies)])
    latencies = []
    start = time.perf_counter()
    for i in range(requests):
        t0 = time.perf_counter()
        call(bodies[i % len(bodies)])
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    quantiles = statistics.quantiles(latencies, n=100)
    return {"requests": requests, "requests_per_s": requests / wall, "p50_ms": quantiles[49] * MS_PER_S,
            "p95_ms": quantiles[94] * MS_PER_S}


def pytorch_call(checkpoint: Path, preprocessed: bool = False) -> Callable[[Any], Any]:
    """DICOM bytes (or, ``preprocessed``, an image (1, 1, S, S)) → class probabilities by in-process PyTorch."""
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model().eval()

    @torch.no_grad()
    def call(body: Any) -> Any:
        image = torch.from_numpy(body if preprocessed else read_image(body, ckpt.config.data, name="request")[None])
        logits, _ = model(image)
        return torch.softmax(logits, 1)

    return call


def onnx_call(model: ServedModel) -> Callable[[bytes], Any]:
    return lambda body: model.predict(model.preprocess(body, "request")[None])


def http_variant(folder: Path, int8: bool, threads: int, bodies: Sequence[bytes], requests: int) -> dict[str, float]:
    """Start ``crosssim serve`` on a free loopback port, time raw-body requests, stop it by PID."""
    port = first_free_port("127.0.0.1", SEARCH_FROM_PORT)
    command = [sys.executable, "-m", "crosssim.cli", "serve", str(folder), "--port", str(port),
               "--threads", str(threads), *(["--int8"] if int8 else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_for_port("127.0.0.1", port, SERVER_START_TIMEOUT_S, process, "crosssim serve")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_S,
                          headers={"content-type": "application/dicom"}) as client:
            def call(body: bytes) -> Any:
                response = client.post("/v1/predict", content=body)
                response.raise_for_status()
                return response

            return timed(call, bodies, requests)
    finally:
        stop_group(process)  # the server and anything it started, by PID


def accuracies(checkpoint: Path, folder: Path, target: Path, labels: Path, cache: Path) -> dict[str, float]:
    """Accuracy of PyTorch, float and int8 ONNX on the labeled target, and int8-vs-float agreement."""
    ckpt = load_checkpoint(checkpoint)
    site = load_site(target, ckpt.config.data, labeled=False, classes=ckpt.classes, cache_dir=cache)
    truth = load_labels_for(site, labels).numpy()
    with torch.no_grad():
        torch_pred = ckpt.build_model().eval()(site.images)[0].argmax(1).numpy()
    float_pred = ServedModel(folder).run(site.images.numpy())[0].argmax(1)
    int8_pred = ServedModel(folder, int8=True).run(site.images.numpy())[0].argmax(1)
    return {"images": len(site), "pytorch": float((torch_pred == truth).mean()),
            "onnx_float": float((float_pred == truth).mean()), "onnx_int8": float((int8_pred == truth).mean()),
            "int8_float_agreement": float((int8_pred == float_pred).mean())}


def serve_lines(doc: dict[str, Any]) -> list[str]:
    """A serve.json document as text: the settings line, one table row per variant against in-process PyTorch,
    the accuracy line (printed by this script and shown in RESULTS.md)."""
    settings, rows, accuracy = doc.get("settings", {}), doc.get("rows", {}), doc.get("accuracy", {})
    load = doc.get("load_average")
    lines = [f"{settings.get('requests')} sequential requests per variant, target DICOM files of "
             f"{settings.get('image_size')} px, {settings.get('threads')} thread(s), "
             f"{doc.get('environment', {}).get('cpu_count')} CPUs, load average "
             f"{'?' if load is None else f'{load:.1f}'}", "",
             "| variant | requests/s | p50 ms | p95 ms | req/s vs pytorch | p50 vs pytorch | p95 vs pytorch |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        kind = name[name.find(" "):] if " " in name else ""  # "" or a suffix such as MODEL_ONLY
        base = rows.get(f"pytorch{kind}", rows["pytorch"])
        lines.append(f"| {name} | {row['requests_per_s']:.1f} | {row['p50_ms']:.2f} | {row['p95_ms']:.2f} | "
                     f"{row['requests_per_s'] / base['requests_per_s']:.2f}× | {row['p50_ms'] / base['p50_ms']:.2f}× | "
                     f"{row['p95_ms'] / base['p95_ms']:.2f}× |")
    speeds = [f"{suffix.strip(' ()') or 'whole request in process'} "
              f"{rows[f'onnx-float{suffix}']['p50_ms'] / rows[f'onnx-int8{suffix}']['p50_ms']:.2f}×"
              for suffix in (MODEL_ONLY, MODEL_ONLY_BATCH, "")
              if f"onnx-int8{suffix}" in rows and f"onnx-float{suffix}" in rows]
    if speeds:
        int8 = doc.get("int8", {})
        layers = (f"{', '.join(int8['float_nodes']) or 'no layer'} kept in float, calibration agreement "
                  f"{int8['calibration_agreement']:.3f}; " if int8 else "")
        lines += ["", f"int8 ({layers}speed-up over float ONNX, p50 latency): {'; '.join(speeds)} (goal ≥ 1.5×)."]
    if accuracy:
        change = accuracy['onnx_int8'] - accuracy['onnx_float']
        lines += ["", f"Accuracy on the labeled target ({accuracy['images']} images): pytorch "
                      f"{accuracy['pytorch']:.3f}, onnx float {accuracy['onnx_float']:.3f}, onnx int8 "
                      f"{accuracy['onnx_int8']:.3f} (int8 − float {change:+.3f}; "
                      f"int8 agrees with float on {accuracy['int8_float_agreement']:.3f})."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="timed requests per variant")
    parser.add_argument("--images-per-site", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=64, help="pixels a side, files and model input")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads of every variant")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="crosssim-bench-serve-") as tmp:
        work = Path(tmp)
        hospitals = generate_hospitals(work / "sites", images_per_site=args.images_per_site,
                                       image_size=args.image_size)
        cache = work / "cache"
        cfg = load_config(overrides={"epochs": args.epochs, "image-size": args.image_size, "device": "cpu",
                                     "cache-dir": str(cache)})
        print(f"training a pooled model on {len(hospitals.source_sites)} synthetic sites ...", flush=True)
        checkpoint = train_pooled(hospitals.source_sites, cfg, work / "run", cache_dir=cache, progress=None)
        folder = work / "serve"
        manifest = export_model(checkpoint, folder, quantize="int8", data_dir=hospitals.target_site,
                                cache_dir=cache, progress=None)
        bodies = [p.read_bytes() for p in iter_candidate_files(hospitals.target_site)]
        rows: dict[str, dict[str, float]] = {}
        rows["pytorch"] = timed(pytorch_call(checkpoint), bodies, args.requests)
        models = {name: ServedModel(folder, int8=name == "int8", threads=args.threads) for name in ("float", "int8")}
        for name, model in models.items():
            rows[f"onnx-{name}"] = timed(onnx_call(model), bodies, args.requests)
        images = [models["float"].preprocess(body, "request")[None] for body in bodies]  # the model's share alone
        rows[f"pytorch{MODEL_ONLY}"] = timed(pytorch_call(checkpoint, preprocessed=True), images, args.requests)
        for name, model in models.items():
            rows[f"onnx-{name}{MODEL_ONLY}"] = timed(model.run, images, args.requests)
        batches = [np.concatenate([images[(start + i) % len(images)] for i in range(BATCH_IMAGES)])
                   for start in range(0, len(images), BATCH_IMAGES)]
        rows[f"pytorch{MODEL_ONLY_BATCH}"] = timed(pytorch_call(checkpoint, preprocessed=True), batches,
                                                   args.requests)
        for name, model in models.items():
            rows[f"onnx-{name}{MODEL_ONLY_BATCH}"] = timed(model.run, batches, args.requests)
        for int8 in (False, True):
            name = "http-int8" if int8 else "http-float"
            print(f"timing {name} ...", flush=True)
            rows[name] = http_variant(folder, int8, args.threads, bodies, args.requests)
        accuracy = accuracies(checkpoint, folder, hospitals.target_site, hospitals.target_labels, cache)
    int8 = {k: v for k, v in manifest.models["int8"].items() if k in ("float_nodes", "calibration_agreement")}
    doc = {"environment": environment(), "settings": vars(args) | {"out": str(args.out)}, "rows": rows, "int8": int8,
           "accuracy": accuracy, "load_average": os.getloadavg()[0]}
    print("\n" + "\n".join(serve_lines(doc)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

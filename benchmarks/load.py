"""Site loading throughput: cold (decode every DICOM) vs the hospital-side cache, side by side.

Suites: a synthetic hospital (default preset) and the real DICOM corpora shipped with pydicom and
pydicom-data. Prints a table with the cached/cold speed-up and writes benchmarks/results/load.json.

    .venv/bin/python benchmarks/load.py [--images-per-site 240] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import pydicom

from crosssim.config import load_config
from crosssim.data.sites import load_site
from crosssim.data.synth import generate_hospitals

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def corpus_folders(work: Path, images_per_site: int) -> dict[str, Path]:
    folders = {"synthetic hospital-a": generate_hospitals(work / "synth", images_per_site=images_per_site)
               .source_sites[0],
               "pydicom test_files": Path(pydicom.__file__).parent / "data" / "test_files"}
    try:
        import data_store

        folders["pydicom-data"] = Path(data_store.__file__).parent / "data"
    except ImportError:
        print("pydicom-data not installed: that corpus is left out (pip install pydicom-data)")
    return folders


def time_load(folder: Path, cache_dir: Path) -> tuple[float, int, int]:
    started = time.perf_counter()
    site = load_site(folder, load_config().data, labeled=False, cache_dir=cache_dir)
    return time.perf_counter() - started, site.report.files_seen, len(site)


def measure(folder: Path, work: Path, repeats: int) -> dict:
    cold, cached = [], []
    for i in range(repeats):
        cache = work / f"cache-{folder.name}-{i}"
        seconds, files, images = time_load(folder, cache)
        cold.append(seconds)
        cached.append(time_load(folder, cache)[0])
    cold_s, cached_s = statistics.median(cold), statistics.median(cached)
    return {"files": files, "images": images, "cold_s": cold_s, "cached_s": cached_s,
            "cold_files_per_s": files / cold_s, "cached_files_per_s": files / cached_s,
            "speedup": cold_s / cached_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images-per-site", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3, help="median of this many cold/cached pairs")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in corpus_folders(Path(tmp), args.images_per_site).items():
            rows[name] = measure(folder, Path(tmp), args.repeats)
    print("| corpus | files | images | cold s | cached s | cold files/s | cached files/s | cached/cold speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['files']} | {r['images']} | {r['cold_s']:.2f} | {r['cached_s']:.3f} | "
              f"{r['cold_files_per_s']:.0f} | {r['cached_files_per_s']:.0f} | {r['speedup']:.1f}× |")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "load.json"
    out.write_text(json.dumps({"machine": platform.platform(), "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

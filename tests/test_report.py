import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from crosssim.evaluate import evaluate_site

CHROMIUM_TIMEOUT_S = 120
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
ALWAYS = ("summary", "alarms", "prevalence", "confidence", "embedding", "examples", "data")
WITH_LABELS = ("confusion", "per-class", "reliability")
# Appended to a copy of the report: after load, count images the browser could not decode.
IMAGE_CHECK = ('<script>window.addEventListener("load",()=>{const i=[...document.images];'
               'document.body.dataset.images=i.length;'
               'document.body.dataset.broken=i.filter(x=>!(x.complete&&x.naturalWidth>0)).length;});</script>')


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "chromium is required for this test: apt-get install -y --no-install-recommends chromium"
    return path


def _dump_dom(page: Path, profile: Path) -> str:
    done = subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("labeled", [True, False], ids=["labels", "no-labels"])
def test_report_renders_in_headless_chromium_with_every_section(eval_tiny_run, tmp_path, labeled):
    out = tmp_path / "out"
    evaluate_site(eval_tiny_run.checkpoint, eval_tiny_run.target_dir, out, cache_dir=eval_tiny_run.cache_dir,
                  labels_csv=eval_tiny_run.target_labels if labeled else None, progress=None)
    report = (out / "report.html").read_text()
    assert "http://" not in report and "https://" not in report  # self-contained
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', report):
        Image.open(io.BytesIO(base64.b64decode(uri))).verify()
    checked = tmp_path / "checked.html"
    checked.write_text(report.replace("</body>", IMAGE_CHECK + "</body>"))
    dom = _dump_dom(checked, tmp_path / "profile")
    sections = set(re.findall(r'<section id="([^"]+)"', dom))
    assert sections == set(ALWAYS) | (set(WITH_LABELS) if labeled else set())
    body = re.search(r"<body([^>]*)>", dom).group(1)
    images = int(re.search(r'data-images="(\d+)"', body).group(1))
    assert images >= 3 + labeled + 1  # prevalence, confidence, embedding (+ reliability), thumbnails
    assert 'data-broken="0"' in body

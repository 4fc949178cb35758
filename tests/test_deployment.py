"""A real deployment on loopback over TLS: `crosssim server` (SuperLink) and two `crosssim client` (SuperNodes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crosssim.cli import main as crosssim_main
from crosssim.data.synth import generate_hospitals

RUN_TIMEOUT_S = 480  # 2 rounds; each message starts a fresh ClientApp process (torch import ≈ 5 s)
STOP_TIMEOUT_S = 30
POLL_INTERVAL_S = 1.0
TINY = ["--set", "classes=normal,nodule,mass,effusion", "--set", "image-size=32", "--set", "batch-size=8", "--set", "local-epochs=1", "--set", "min-count=2",
        "--set", "augment=false"]
CLI = [sys.executable, "-m", "crosssim.cli"]
RUN_CONFIG_MIN_COUNT = 50  # more images than a tiny site has per class: every reported class count becomes 0


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out for bind-to-0 (held together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) from /proc, or None when the process is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def descendants(roots: list[int]) -> set[tuple[int, int]]:
    """(pid, start time) of every live process below ``roots``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if (stat := _stat(child)) is not None:
                found.add((child, stat[2]))
                todo.append(child)
    return found


def still_running(processes: set[tuple[int, int]]) -> list[int]:
    """Those of ``processes`` alive now (same start time, not a zombie)."""
    return [pid for pid, start in processes if (stat := _stat(pid)) is not None and stat[2] == start and stat[1] != "Z"]


def launch(args: list, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([*CLI, *map(str, args)], env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the launcher (it stops its own children); SIGKILL its group only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process accounting reads /proc")
@pytest.mark.e2e
def test_superlink_and_two_supernodes_run_two_rounds_over_tls(tmp_path, capsys):
    hospitals = generate_hospitals(tmp_path / "sites", images_per_site=12, image_size=32)
    link_port, node_ports, local_ports = (lambda p: (p[0], p[1:3], p[3:]))(free_ports(5))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(local_ports[0]),
           "FLWR_LOCAL_CONTROL_API_PORT": str(local_ports[1])}
    run, tls = tmp_path / "run", tmp_path / "tls"
    assert crosssim_main(["certs", str(tls), "--host", "127.0.0.1", "localhost"]) == 0  # the whole run is TLS
    # min-count through Flower's own --run-config: the sites apply it to the class counts they report
    server = launch(["server", "--out", run, "--port", link_port, "--min-sites", 2, "--rounds", 2, *TINY,
                     "--tls-dir", tls, "--run-config", f"min-count={RUN_CONFIG_MIN_COUNT}"], env,
                    tmp_path / "server.log")
    clients = [launch(["client", "--superlink", f"127.0.0.1:{link_port}", "--port", port, "--data", site,
                       "--cache", tmp_path / f"cache-{i}", "--root-certificates", tls / "ca.pem"],
                      {**env, "FLWR_HOME": str(tmp_path / f"flwr-{i}")}, tmp_path / f"client-{i}.log")
               for i, (site, port) in enumerate(zip(hospitals.source_sites[:2], node_ports))]
    spawned: set[tuple[int, int]] = set()
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while server.poll() is None and time.monotonic() < deadline:
            spawned |= descendants([server.pid, *(c.pid for c in clients)])
            time.sleep(POLL_INTERVAL_S)
        spawned |= descendants([c.pid for c in clients])
    finally:
        for process in [*clients, server]:
            stop(process)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))
    assert server.returncode == 0, logs
    assert not still_running(spawned), logs
    assert len(spawned) >= 5  # SuperLink, 2 SuperNodes, flwr run, ServerApp (at least) were seen and stopped

    for name in ("round-0001.pt", "round-0002.pt", "final.pt"):
        assert (run / name).is_file(), name
    assert crosssim_main(["evaluate", "--checkpoint", str(run / "final.pt"), "--data", str(hospitals.target_site),
                          "--labels", str(hospitals.target_labels), "--out", str(tmp_path / "target"),
                          "--cache", str(tmp_path / "cache-target")]) == 0
    metrics = json.loads((tmp_path / "target" / "metrics.json").read_text())
    assert 0.0 <= metrics["label_free"]["atc_estimated_accuracy"] <= 1.0

    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    with capsys.disabled():
        for r in rounds:
            compute = max(r["train_compute_s"]) + max(r["evaluate_compute_s"])
            print(f"\ndeployment round {r['round']}: wall {r['wall_s']:.1f} s = site compute {compute:.1f} s "
                  f"+ everything else {r['wall_s'] - compute:.1f} s (process start, imports, data loading "
                  f"{max(r['load_s']):.2f} s, transport)")
    assert all(max(r["train_compute_s"]) < r["wall_s"] for r in rounds)
    assert all(count == 0 for r in rounds for counts in r["class_counts"].values() for count in counts)
    assert f"min-count = {RUN_CONFIG_MIN_COUNT}" in (run / "config.toml").read_text()


def test_dry_run_prints_the_raw_flower_commands(tmp_path, capsys):
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--port", "9999", "--classes", "a,b",
                          "--dry-run"]) == 0
    server = capsys.readouterr().out
    superlink = "flower-superlink --insecure --host 127.0.0.1 --port 9999 --disable-runtime-dependency-installation"
    assert superlink in server
    assert "flwr run" in server and "--stream" in server and f'out="{tmp_path / "run"}"' in server
    assert 'address = "127.0.0.1:9999"' in server and not (tmp_path / "run").exists()
    assert crosssim_main(["client", "--superlink", "10.0.0.5:9999", "--data", str(tmp_path), "--site", "north",
                          "--dry-run"]) == 0
    client = capsys.readouterr().out
    assert "flower-supernode --insecure --superlink 10.0.0.5:9999 --port 9094 --node-config" in client
    assert f'data="{tmp_path}" site="north"' in client


def test_dry_run_with_tls_passes_certificates_instead_of_insecure(tmp_path, capsys):
    certs = ["--ssl-ca-certfile", "ca.crt", "--ssl-certfile", "server.pem", "--ssl-keyfile", "server.key"]
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), *certs, "--classes", "a,b", "--dry-run"]) == 0
    server = capsys.readouterr().out
    assert "--insecure" not in server and "--ssl-certfile server.pem" in server
    assert f'root-certificates = "{Path("ca.crt").resolve()}"' in server
    assert crosssim_main(["client", "--superlink", "h:1", "--data", str(tmp_path), "--root-certificates", "ca.crt",
                          "--dry-run"]) == 0
    client = capsys.readouterr().out
    assert "--root-certificates ca.crt" in client and "--insecure" not in client

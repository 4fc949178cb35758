"""A real deployment on loopback over TLS with SuperNode authentication: `crosssim server` (SuperLink) and two
registered `crosssim client` (SuperNodes), while three hospitals that must not join are refused in one line."""

import json
import time
from pathlib import Path

import pytest

from crosssim.cli import main as crosssim_main
from crosssim.data.synth import generate_hospitals
from tests.deployment_kit import (POLL_INTERVAL_S, TINY, descendants, flower_ports_env, free_ports, launch,
                                  logs_of, still_running, stop)

RUN_TIMEOUT_S = 480  # 2 rounds; each message starts a fresh ClientApp process (torch import ≈ 5 s)
REFUSAL_TIMEOUT_S = 120
RUN_CONFIG_MIN_COUNT = 50  # more images than a tiny site has per class: every reported class count becomes 0


def _error_line(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("crosssim client: error: ")]
    assert len(lines) == 1, log.read_text()[-2000:]
    return lines[0]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process accounting reads /proc")
@pytest.mark.e2e
def test_tls_federation_admits_only_registered_hospitals(tmp_path, capsys):
    hospitals = generate_hospitals(tmp_path / "sites", images_per_site=12, image_size=32)
    link_port, *node_ports = free_ports(8)
    env = flower_ports_env(node_ports[-2:])
    run, tls, other = tmp_path / "run", tmp_path / "tls", tmp_path / "other-ca"
    assert crosssim_main(["certs", str(tls), "--host", "127.0.0.1", "localhost", "--sites", "a,b"]) == 0
    assert crosssim_main(["certs", str(other), "--host", "127.0.0.1", "--sites", "intruder"]) == 0
    # min-count through Flower's own --run-config: the sites apply it to the class counts they report
    server = launch(["server", "--out", run, "--port", link_port, "--min-sites", 2, "--rounds", 2, *TINY,
                     "--tls-dir", tls, "--auth-keys", tls / "auth-keys",
                     "--run-config", f"min-count={RUN_CONFIG_MIN_COUNT}"], env, tmp_path / "server.log")

    def client(name: str, site: Path, port: int, security: list) -> tuple[str, object]:
        return name, launch(["client", "--superlink", f"127.0.0.1:{link_port}", "--port", port, "--data", site,
                             "--cache", tmp_path / f"cache-{name}", "--connect-timeout", 120, *security],
                            {**env, "FLWR_HOME": str(tmp_path / f"flwr-{name}")}, tmp_path / f"client-{name}.log")

    ca = ["--root-certificates", tls / "ca.pem"]
    sources = hospitals.source_sites
    clients = dict([client("a", sources[0], node_ports[0], [*ca, "--auth-key", tls / "sites" / "a.key"]),
                    client("b", sources[1], node_ports[1], [*ca, "--auth-key", tls / "sites" / "b.key"])])
    refused = dict([client("unregistered", sources[2], node_ports[2], [*ca, "--connect-timeout", 15, "--auth-key",
                                                                       other / "sites" / "intruder.key"]),
                    client("no-ca", sources[2], node_ports[3], []),
                    client("other-ca", sources[2], node_ports[4], ["--root-certificates", other / "ca.pem"])])
    spawned: set[tuple[int, int]] = set()
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while server.poll() is None and time.monotonic() < deadline:
            spawned |= descendants([server.pid, *(c.pid for c in [*clients.values(), *refused.values()])])
            time.sleep(POLL_INTERVAL_S)
        for process in refused.values():
            process.wait(timeout=REFUSAL_TIMEOUT_S)
        spawned |= descendants([c.pid for c in clients.values()])
    finally:
        for process in [*clients.values(), *refused.values(), server]:
            stop(process)
    logs = logs_of(tmp_path)
    assert server.returncode == 0, logs
    assert not still_running(spawned), logs
    assert len(spawned) >= 5  # SuperLink, 2 SuperNodes, flwr run, ServerApp (at least) were seen and stopped
    assert "registered 2 hospital key(s): a, b" in (tmp_path / "server.log").read_text()
    for name in clients:  # each hospital's messages went to its resident site worker, none computed elsewhere
        log = (tmp_path / f"client-{name}.log").read_text()
        assert "site worker ready" in log and "in the ClientApp process" not in log, log

    assert all(process.returncode != 0 for process in refused.values()), logs
    assert "has not registered it" in _error_line(tmp_path / "client-unregistered.log")
    assert "uses TLS: pass --root-certificates" in _error_line(tmp_path / "client-no-ca.log")
    assert f"{other / 'ca.pem'} does not vouch for" in _error_line(tmp_path / "client-other-ca.log")

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
    assert all(r["sites"] == 2 and not r["failures"] for r in rounds)  # only the two registered hospitals trained
    assert all(max(r["train_compute_s"]) < r["wall_s"] for r in rounds)
    assert all(count == 0 for r in rounds for counts in r["class_counts"].values() for count in counts)
    assert f"min-count = {RUN_CONFIG_MIN_COUNT}" in (run / "config.toml").read_text()


def test_dry_run_prints_the_raw_flower_commands(tmp_path, capsys):
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--port", "9999", "--classes", "a,b",
                          "--dry-run"]) == 0
    server = capsys.readouterr().out
    database = tmp_path / "run" / ".flwr" / "superlink.db"
    superlink = (f"flower-superlink --insecure --host 127.0.0.1 --port 9999 --database {database} "
                 "--disable-runtime-dependency-installation")
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


def test_auth_keys_need_tls_and_the_dry_run_registers_each_key(tmp_path, capsys):
    assert crosssim_main(["certs", str(tmp_path / "tls"), "--host", "127.0.0.1", "--sites", "north,south"]) == 0
    capsys.readouterr()
    keys = tmp_path / "tls" / "auth-keys"
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--classes", "a,b", "--auth-keys", str(keys),
                          "--dry-run"]) == 1
    assert "--auth-keys needs TLS" in capsys.readouterr().err
    assert crosssim_main(["server", "--out", str(tmp_path / "run"), "--classes", "a,b", "--tls-dir",
                          str(tmp_path / "tls"), "--auth-keys", str(keys), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--enable-supernode-auth" in out
    for name in ("north", "south"):
        assert f"flwr supernode register {keys / name}.pub crosssim --name {name}" in out
    assert crosssim_main(["client", "--superlink", "h:1", "--data", str(tmp_path), "--auth-key",
                          str(tmp_path / "tls" / "sites" / "north.key")]) == 1
    assert "--auth-key needs TLS" in capsys.readouterr().err

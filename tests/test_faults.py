"""Faults injected into a loopback deployment: a site and the server killed with SIGKILL mid-round.

Tiny synthetic sites, this test's own ports, every process it starts stopped by PID.
"""

import time
from pathlib import Path

import pytest

from crosssim.checkpoint import load_checkpoint
from crosssim.data.synth import generate_hospitals
from tests.deployment_kit import (TINY, command_line, descendants, flower_ports_env, free_ports, kill_tree, launch,
                                  logs_of, rounds_logged, still_running, stop, wait_until)

ROUND_TIMEOUT_S = 90  # round-timeout-s here; a killed site is given up earlier, by Flower's offline detection (≤ 60 s)
RUN_TIMEOUT_S = 420
CONNECT_TIMEOUT_S = 120  # clients start first and wait for the SuperLink
CLIENTAPP = "flwr-clientapp"

pytestmark = [pytest.mark.e2e, pytest.mark.faults,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="process accounting reads /proc")]


class Federation:
    """`crosssim server` and `crosssim client`s on loopback, started, killed and stopped by this test."""

    def __init__(self, tmp_path: Path, sites: int) -> None:
        self.tmp = tmp_path
        self.hospitals = generate_hospitals(tmp_path / "sites", images_per_site=12, image_size=32)
        self.link_port, *self.ports = free_ports(4 + 2 * sites)
        self.env = flower_ports_env(self.ports[-2:])
        self.run = tmp_path / "run"
        self.processes: list = []
        self.spawned: set[tuple[int, int]] = set()

    def client(self, index: int, name: str):
        """Hospital ``index`` as a new SuperNode (own port, own log ``client-NAME.log``)."""
        port = self.ports[len(self.processes)]
        process = launch(["client", "--superlink", f"127.0.0.1:{self.link_port}", "--port", port,
                          "--data", self.hospitals.source_sites[index], "--cache", self.tmp / f"cache-{index}",
                          "--connect-timeout", CONNECT_TIMEOUT_S],
                         {**self.env, "FLWR_HOME": str(self.tmp / f"flwr-{name}")}, self.tmp / f"client-{name}.log")
        self.processes.append(process)
        return process

    def server(self, name: str, *extra):
        process = launch(["server", "--out", self.run, "--port", self.link_port, *TINY,
                          "--set", f"round-timeout-s={ROUND_TIMEOUT_S}", *extra], self.env, self.tmp / f"{name}.log")
        self.processes.append(process)
        return process

    def clientapps(self, processes) -> set[int]:
        """PIDs of the ClientApp processes (one per message) running under ``processes`` now."""
        found = descendants([p.pid for p in processes])
        self.spawned |= found
        return {pid for pid, _ in found if CLIENTAPP in command_line(pid)}

    def kill_in_round_2(self, victim, watched) -> None:
        """Once round 1 is logged, wait for a ClientApp that started after it under the sites, then SIGKILL
        ``victim`` (a launcher and everything below it)."""
        sites = [p for p in self.processes if p is not victim and "client" in p.args]
        wait_until(lambda: len(rounds_logged(self.run)) >= 1, RUN_TIMEOUT_S, "round 1 logged", watched)
        before = self.clientapps(sites + [victim])
        wait_until(lambda: self.clientapps(sites + [victim]) - before, RUN_TIMEOUT_S, "a round-2 ClientApp", watched)
        assert kill_tree(victim) >= 2
        assert [r["round"] for r in rounds_logged(self.run)] == [1]  # killed inside round 2

    def finished(self, server) -> str:
        """Wait for ``server`` to end, stop every process, check it succeeded and left nothing running; the logs."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while server.poll() is None and time.monotonic() < deadline:
            self.clientapps(self.processes)
            time.sleep(0.5)
        self.stop_all()
        logs = logs_of(self.tmp)
        assert server.returncode == 0, logs
        assert not still_running(self.spawned), logs
        return logs

    def stop_all(self) -> None:
        self.spawned |= descendants([p.pid for p in self.processes if p.poll() is None])
        for process in reversed(self.processes):
            stop(process)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop_all()  # whatever failed, every process this test started is stopped by PID


def test_a_site_killed_in_round_2_fails_that_round_only_and_rejoins_when_restarted(tmp_path):
    with Federation(tmp_path, sites=4) as fed:
        clients = [fed.client(i, f"site-{i}") for i in range(3)]  # first: they wait for the SuperLink
        # "round 1 logged" must mean round 2 has not started: with one-message a round is logged when the next
        # one's train replies arrive (tests/test_round_style.py checks that both styles log the same failures)
        server = fed.server("server", "--min-sites", 2, "--rounds", 3, "--set", "round-style=two-messages")
        fed.kill_in_round_2(clients[2], [server])
        fed.client(2, "site-2-restarted")
        logs = fed.finished(server)
    rounds = rounds_logged(fed.run)
    assert [r["round"] for r in rounds] == [1, 2, 3], logs
    first, second = rounds[0], rounds[1]
    assert first["sites"] == 3 and not first["failures"], logs
    killed = set(first["class_counts"]) - set(second["class_counts"])
    assert second["sites"] == 2 and len(killed) == 1 and len(second["failures"]) == 1, logs
    assert second["failures"][0].startswith(f"{killed.pop()}: ")  # "no reply within …" or Flower's node-offline
    assert "failed reply" in (tmp_path / "server.log").read_text()
    rejoined = {node for r in rounds[2:] for node in r["class_counts"]} - set(first["class_counts"])
    assert len(rejoined) == 1 and any(r["sites"] == 3 for r in rounds[2:]), logs  # the restarted site trains again
    assert load_checkpoint(fed.run / "final.pt").round == 3


def test_the_server_killed_in_round_2_resumes_from_latest_with_no_round_lost_or_repeated(tmp_path):
    args = ["--min-sites", 2, "--rounds", 2, "--set", "style-mix-probability=0.5"]  # the style bank is state too
    with Federation(tmp_path, sites=2) as fed:
        clients = [fed.client(i, f"site-{i}") for i in range(2)]
        fed.kill_in_round_2(fed.server("server", *args), clients)
        after_round_1 = load_checkpoint(fed.run / "latest.pt")
        assert after_round_1.round == 1
        logs = fed.finished(fed.server("server-resumed", *args, "--resume"))
    assert f"resuming {fed.run} after round 1" in (tmp_path / "server-resumed.log").read_text()
    assert [r["round"] for r in rounds_logged(fed.run)] == [1, 2], logs  # each exactly once
    final = load_checkpoint(fed.run / "final.pt")
    assert final.round == 2 and load_checkpoint(fed.run / "round-0001.pt").round == 1
    assert after_round_1.extra["style_bank"] and final.extra["style_bank"]  # carried through the restart

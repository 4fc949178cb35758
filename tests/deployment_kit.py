"""Processes of a loopback deployment for end-to-end tests: launched, watched through /proc, stopped by PID."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STOP_TIMEOUT_S = 30
POLL_INTERVAL_S = 0.5
CLASSES = "normal,nodule,mass,effusion"
TINY = ["--set", f"classes={CLASSES}", "--set", "image-size=32", "--set", "batch-size=8", "--set", "local-epochs=1",
        "--set", "min-count=2", "--set", "augment=false"]
CLI = [sys.executable, "-m", "crosssim.cli"]


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out for bind-to-0 (held together so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def flower_ports_env(ports: list[int]) -> dict[str, str]:
    """This test's own ports for `flwr`'s local SuperLink APIs (two), so parallel runs never collide."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
            "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1])}


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


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def launch(args: list, env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """``crosssim ARGS`` in its own session, output to ``log``; from ``cwd`` (whose ``crosssim`` it then runs)."""
    with open(log, "w") as handle:
        return subprocess.Popen([*CLI, *map(str, args)], env=env, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=cwd)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the launcher (it stops its own children); SIGKILL its group only if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def kill_tree(process: subprocess.Popen) -> int:
    """SIGKILL a launcher and everything below it at once, as a power cut would; how many processes died."""
    victims = [process.pid, *(pid for pid, _ in descendants([process.pid]))]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    return len(victims)


def rounds_logged(run: Path) -> list[dict]:
    log = run / "rounds.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def wait_until(condition, timeout_s: float, what: str, watched: list[subprocess.Popen]) -> None:
    """Poll ``condition`` until true; AssertionError naming ``what`` on timeout or when a watched process ends."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        ended = [p.args[3] for p in watched if p.poll() is not None]
        assert not ended, f"{what}: {ended} ended first"
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(POLL_INTERVAL_S)


def logs_of(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(folder.glob("*.log")))

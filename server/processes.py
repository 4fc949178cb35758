"""Child processes of the deployment launchers (`crosssim server`, `crosssim client`), stopped cleanly.

Each child runs in its own process group, so stopping it also stops whatever it spawned (the SuperLink's
ServerApp process, a SuperNode's ClientApp processes). SIGTERM and Ctrl-C both stop every child.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

STOP_GRACE_S = 10.0  # SIGTERM → wait this long → SIGKILL
POLL_INTERVAL_S = 0.2
PORT_PROBE_TIMEOUT_S = 0.5
# Flower's environment for every child: no telemetry, no update check.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with Flower's quiet settings (and ``extra``) applied.

    This Python's scripts folder leads PATH: Flower starts its own helpers (flower-superexec,
    flwr-serverapp, flwr-clientapp) by name, and they must come from this environment even when it
    is not activated.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **FLOWER_ENV, **(extra or {})}


def toml_string(value: str) -> str:
    """A TOML string literal for Flower's ``key=value`` options (``--node-config``, ``--run-config``)."""
    if '"' not in value and "\\" not in value:
        return f'"{value}"'  # basic string
    if "'" not in value:
        return f"'{value}'"  # literal string: backslashes kept as they are
    raise ValueError(f"{value!r}: a path with both quote kinds cannot be passed to Flower")


def key_values(values: Mapping[str, str | bool | int]) -> str:
    """``k1='v1' k2=true`` as Flower's config options take them."""
    parts = []
    for key, value in values.items():
        text = ("true" if value else "false") if isinstance(value, bool) else \
            str(value) if isinstance(value, int) else toml_string(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def describe_command(command: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """A copy-pasteable shell line for ``--dry-run``."""
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    return f"{prefix} {shlex.join(command)}".strip()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PORT_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def local_address(host: str) -> str:
    """Where this machine reaches a service bound to ``host`` (wildcard binds → loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class Children:
    """Processes this launcher started; ``stop_all`` ends them (and their process groups) newest first."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, command: Sequence[str], env: Mapping[str, str], log: IO | None = None) -> subprocess.Popen:
        process = subprocess.Popen(list(command), env=dict(env), stdout=log, stderr=subprocess.STDOUT if log else None,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after ``STOP_GRACE_S``; reap the leader."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # the whole group is gone
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and _group_alive(process):
            time.sleep(POLL_INTERVAL_S)
        if not _group_alive(process):
            break
    process.poll()


def _group_alive(process: subprocess.Popen) -> bool:
    process.poll()  # reap the leader so it does not linger as a zombie member of its group
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_port(host: str, port: int, timeout_s: float, process: subprocess.Popen, what: str) -> None:
    """Block until ``host:port`` accepts connections; a clear error if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before listening on {host}:{port}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s")
        time.sleep(POLL_INTERVAL_S)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so the launcher's ``finally`` stops its children."""
    signal.signal(signal.SIGTERM, _raise_interrupt)

"""Child processes of the deployment launchers (`crosssim server`, `crosssim client`), stopped cleanly.

Each child runs in its own process group, so stopping it also stops whatever it spawned (the SuperLink's
ServerApp process, a SuperNode's ClientApp processes). SIGTERM and Ctrl-C both stop every child. The checks
a launcher makes before it starts anything (ports, reachability, certificate files) live here too, each
failing with a ``LaunchError`` whose one line names the problem and the fix. Flower-free.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import ssl
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
TLS_PROBE_TIMEOUT_S = 10.0
PORT_SEARCH_SPAN = 100  # ports tried from the default when a launcher picks a free one
# Flower's environment for every child: no telemetry, no update check.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
# Flower's SuperExec (one per SuperLink and per SuperNode) polls every this many seconds for a message to start an app
# process for; Flower's default 1 s costs each message 0.5 s on average (docs/FLOWER-OVERHEAD.md). The environment's
# own value wins.
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
SUPEREXEC_POLL_S = 0.1


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with Flower's quiet settings (and ``extra``) applied, SuperExec's poll shortened.

    This Python's scripts folder leads PATH: Flower starts its own helpers (flower-superexec,
    flwr-serverapp, flwr-clientapp) by name, and they must come from this environment even when it
    is not activated.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {SUPEREXEC_POLL_ENV: str(SUPEREXEC_POLL_S), **os.environ, "PATH": path, **FLOWER_ENV, **(extra or {})}


def toml_string(value: str) -> str:
    """A TOML string literal for Flower's ``key=value`` options (``--node-config``, ``--run-config``)."""
    if '"' not in value and "\\" not in value:
        return f'"{value}"'  # basic string
    if "'" not in value:
        return f"'{value}'"  # literal string: backslashes kept as they are
    raise ValueError(f"{value!r}: a path with both quote kinds cannot be passed to Flower")


def key_values(values: Mapping[str, str | bool | int | float]) -> str:
    """``k1="v1" k2=true k3=0.5`` as Flower's config options take them (TOML values)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = toml_string(str(value))
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


class LaunchError(RuntimeError):
    """A launcher cannot start: one line naming the problem and what to do about it."""


def port_free(host: str, port: int) -> bool:
    """True when this machine can bind ``host:port`` now."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def require_free_port(host: str, port: int, flag: str) -> None:
    if not port_free(host, port):
        raise LaunchError(f"port {port} on {host} is already in use (another SuperLink or SuperNode?): "
                          f"stop that process or pass another {flag}")


def first_free_port(host: str, start: int, attempts: int = PORT_SEARCH_SPAN) -> int:
    """The first port from ``start`` that ``host`` can bind."""
    for port in range(start, start + attempts):
        if port_free(host, port):
            return port
    raise LaunchError(f"no free port in {start}-{start + attempts - 1} on {host}: pass --port")


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise LaunchError(f"{address!r} is not HOST:PORT (e.g. server.example.org:8000)")
    return host.strip("[]"), int(port)


def wait_until_reachable(address: str, timeout_s: float) -> None:
    """Block until ``address`` accepts TCP connections; a ``LaunchError`` after ``timeout_s``."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise LaunchError(f"cannot reach the SuperLink at {address} within {timeout_s:.0f} s: check the address, "
                              "that `crosssim server` runs there (with --host 0.0.0.0 for other machines) and that "
                              "no firewall blocks the port")
        time.sleep(POLL_INTERVAL_S)


def tls_problem(address: str, root_certificates: str | None) -> str | None:
    """Why a SuperNode with these TLS settings could not talk to the SuperLink at ``address``, from one TLS
    handshake (None when they match): another CA, a name the certificate does not cover, TLS on one side only."""
    host, port = split_address(address)
    if root_certificates:
        context = ssl.create_default_context(cafile=root_certificates)
    else:  # only to learn whether the server speaks TLS at all
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=TLS_PROBE_TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                speaks_tls = True
    except ssl.SSLCertVerificationError as exc:
        return (f"the SuperLink at {address} presented a certificate that {root_certificates} does not vouch for "
                f"({exc.verify_message}): pass the server's own ca.pem with --root-certificates")
    except (ssl.SSLError, OSError):
        speaks_tls = False
    if root_certificates and not speaks_tls:
        return (f"the SuperLink at {address} does not speak TLS: drop --root-certificates, or start the server "
                f"with --tls-dir")
    if not root_certificates and speaks_tls:
        return f"the SuperLink at {address} uses TLS: pass --root-certificates with the server's ca.pem"
    return None


def require_pem(path: str, kind: str, flag: str) -> None:
    """``path`` exists and holds a PEM ``kind`` ("certificate" or "private key"), checked with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"{path}: {kind} file not found (given with {flag})")
    data = file.read_bytes()
    try:
        if kind == "certificate":
            x509.load_pem_x509_certificate(data)
        else:
            load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise LaunchError(f"{path}: not a PEM {kind} (given with {flag}); pass the {kind} file itself") from None


def local_address(host: str) -> str:
    """Where this machine reaches a service bound to ``host`` (wildcard binds → loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class Children:
    """Processes this launcher started; ``stop_all`` ends them (and their process groups) newest first."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen] = []

    def start(self, command: Sequence[str], env: Mapping[str, str],
              log: IO | int | None = None) -> subprocess.Popen:
        """``log``: a file or ``subprocess.PIPE`` for stdout and stderr together (None: this process's own)."""
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
            raise LaunchError(f"{what} exited with code {process.returncode} before listening on {host}:{port}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} did not listen on {host}:{port} within {timeout_s:.0f} s")
        time.sleep(POLL_INTERVAL_S)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Treat SIGTERM like Ctrl-C, so the launcher's ``finally`` stops its children."""
    signal.signal(signal.SIGTERM, _raise_interrupt)

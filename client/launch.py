"""`crosssim client`: one hospital joins a federation as a Flower SuperNode serving its site folder.

Raw Flower equivalent (printed by ``--dry-run``)::

    flower-supernode --insecure --superlink H:P --port 9094 --node-config "data='DIR' site='NAME' cache='DIR'"

With ``--root-certificates`` one TLS handshake checks the server's certificate before the SuperNode starts;
with ``--auth-key`` the SuperNode signs in with this hospital's key (the server must have registered it).
Beside the SuperNode runs the resident site worker (``client.site_worker``; off with ``--no-site-worker``), which
computes every message so that Flower's fresh ClientApp process per message does not import torch each time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from client.site_worker import WORKER_SOCKET_ENV, wait_until_listening
from crosssim.boundary import NODE_CACHE_KEY, NODE_DATA_KEY, NODE_SITE_KEY, NODE_UNLABELED_KEY
from crosssim.processes import (Children, LaunchError, describe_command, first_free_port, flower_env, key_values,
                                require_free_port, require_pem, split_address, stop_group, stop_on_sigterm,
                                tls_problem, wait_until_reachable)

DEFAULT_SUPERNODE_PORT = 9094  # Flower's default port of a SuperNode's own API (for its ClientApp processes)
SUPERNODE_HOST = "127.0.0.1"  # where the SuperNode's own API listens (Flower's default)
DEFAULT_CONNECT_TIMEOUT_S = 60.0
WORKER_START_TIMEOUT_S = 60.0  # the site worker imports torch and crosssim before it listens
REGISTRATION_RETRY_S = 5.0  # a key the server registers moments after its SuperLink opens: try again this often
NOT_REGISTERED = "[code: 2004]"
# What a refused SuperNode prints before Flower's exit 305 (Flower 1.42), and the fix in one line.
FLOWER_REFUSALS = {
    "[code: 2001]": "the SuperLink admits registered hospitals only: pass --auth-key with this hospital's key "
                    "(crosssim certs DIR --sites NAME writes DIR/sites/NAME.key)",
    NOT_REGISTERED: "the SuperLink refused this hospital's key: the server has not registered it (crosssim server "
                    "--auth-keys DIR, with this hospital's NAME.pub in DIR)",
    "SSL/TLS handshake error": "the TLS handshake with the SuperLink failed: pass the server's ca.pem with "
                               "--root-certificates",
}


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server's SuperLink address")
    parser.add_argument("--data", required=True, metavar="DIR", help="this hospital's site folder (labeled: with "
                        "labels.csv; with --unlabeled: any DICOM folder)")
    parser.add_argument("--unlabeled", action="store_true",
                        help="join as an unlabeled target in the loop: receive the global model each round and send "
                             "only this site's style entry (feature statistics) and image count; never trains, never "
                             "sends weights, prototypes or per-image values (useful only when the federation runs "
                             "the style bank, style-mix-probability > 0)")
    parser.add_argument("--site", metavar="NAME", help="site name in logs (default: the folder's name)")
    parser.add_argument("--cache", metavar="DIR", help="tensor cache on this hospital's disk "
                        "(default: $CROSSSIM_CACHE_DIR or ~/.cache/crosssim)")
    parser.add_argument("--port", type=int,
                        help=f"local port of this SuperNode's own API (default: the first free one from "
                             f"{DEFAULT_SUPERNODE_PORT}; one per SuperNode on a machine)")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="SECONDS",
                        help=f"how long to wait for the SuperLink to accept connections (and, with --auth-key, to "
                             f"admit this hospital's key) before giving up (default {DEFAULT_CONNECT_TIMEOUT_S:.0f})")
    security = parser.add_argument_group("transport security")
    security.add_argument("--insecure", action="store_true", default=True,
                          help="plain HTTP (the default until --root-certificates is given)")
    security.add_argument("--root-certificates", metavar="FILE", help="CA certificate of the SuperLink (enables TLS)")
    security.add_argument("--auth-key", metavar="FILE", help="this hospital's private key (DIR/sites/NAME.key from "
                          "`crosssim certs DIR --sites NAME`) for a server that admits registered hospitals only "
                          "(needs --root-certificates)")
    parser.add_argument("--no-site-worker", dest="site_worker", action="store_false",
                        help="compute each message in the ClientApp process Flower starts for it (Flower's default; "
                             "each then imports torch again) instead of in this hospital's resident site worker")
    parser.add_argument("--dry-run", action="store_true", help="print the raw Flower command and exit")


def supernode_command(args: argparse.Namespace, port: int) -> list[str]:
    data = Path(args.data).resolve()
    node_config: dict[str, str | bool] = {NODE_DATA_KEY: str(data), NODE_SITE_KEY: args.site or data.name}
    if args.unlabeled:
        node_config[NODE_UNLABELED_KEY] = True
    if args.cache:
        node_config[NODE_CACHE_KEY] = str(Path(args.cache).resolve())
    security = ["--root-certificates", args.root_certificates] if args.root_certificates else ["--insecure"]
    if args.auth_key:
        security += ["--auth-supernode-private-key", args.auth_key]
    return ["flower-supernode", *security, "--superlink", args.superlink, "--port", str(port),
            "--node-config", key_values(node_config)]


def supernode_port(args: argparse.Namespace) -> int:
    """``--port`` when it is free, else a clear error; without it the first free port from the default."""
    if args.port is not None:
        require_free_port(SUPERNODE_HOST, args.port, "--port")
        return args.port
    port = first_free_port(SUPERNODE_HOST, DEFAULT_SUPERNODE_PORT)
    print(f"SuperNode API on port {port}" + (f" ({DEFAULT_SUPERNODE_PORT} is in use)"
                                               if port != DEFAULT_SUPERNODE_PORT else ""), flush=True)
    return port


def join(args: argparse.Namespace) -> int:
    """Run the SuperNode in the foreground until it exits, Ctrl-C or SIGTERM (then stop it and its apps)."""
    if args.dry_run:
        print(describe_command(supernode_command(args, args.port or DEFAULT_SUPERNODE_PORT)))
        return 0
    if not Path(args.data).is_dir():
        raise LaunchError(f"{args.data}: site folder not found (given with --data)")
    split_address(args.superlink)
    if args.root_certificates:
        require_pem(args.root_certificates, "certificate", "--root-certificates")
    if args.auth_key:
        require_auth_key(args)
    command = supernode_command(args, supernode_port(args))
    wait_until_reachable(args.superlink, args.connect_timeout)
    problem = tls_problem(args.superlink, args.root_certificates)
    if problem:
        raise LaunchError(problem)
    stop_on_sigterm()
    children = Children()
    worker_dir = Path(tempfile.mkdtemp(prefix="crosssim-site-"))  # mode 0700: the socket is this user's alone
    deadline = time.monotonic() + args.connect_timeout
    try:
        env = flower_env(start_site_worker(children, worker_dir) if args.site_worker else None)
        print(f"joining {args.superlink} with site {args.site or Path(args.data).resolve().name}", flush=True)
        while True:
            code, refusal = _run_supernode(children.start(command, env, subprocess.PIPE))
            if code == 0 or refusal is None:
                return code
            if refusal != NOT_REGISTERED or time.monotonic() + REGISTRATION_RETRY_S > deadline:
                raise LaunchError(f"{FLOWER_REFUSALS[refusal]} (flower-supernode exit code {code})")
            print(f"this hospital's key is not registered at the SuperLink (yet): trying again in "
                  f"{REGISTRATION_RETRY_S:.0f} s, until --connect-timeout", flush=True)
            time.sleep(REGISTRATION_RETRY_S)
    finally:
        children.stop_all()
        shutil.rmtree(worker_dir, ignore_errors=True)


def start_site_worker(children: Children, folder: Path) -> dict[str, str]:
    """Start the resident site worker on a socket in ``folder``; the environment that names it to the ClientApps,
    or none (each message computed in its own ClientApp process) when it does not come up."""
    socket_path = folder / "worker.sock"
    process = children.start([sys.executable, "-m", "client.site_worker", "--socket", str(socket_path)],
                             flower_env())
    problem = wait_until_listening(process, socket_path, WORKER_START_TIMEOUT_S)
    if problem:
        print(f"site worker {problem}: each message is computed in its own ClientApp process", flush=True)
        return {}
    return {WORKER_SOCKET_ENV: str(socket_path)}


def require_auth_key(args: argparse.Namespace) -> None:
    """``--auth-key`` is an OpenSSH EC private key and TLS is on (Flower signs in only over TLS)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    if not args.root_certificates:
        raise LaunchError("--auth-key needs TLS: pass --root-certificates with the server's ca.pem too")
    key = Path(args.auth_key)
    if not key.is_file():
        raise LaunchError(f"{key}: key file not found (given with --auth-key)")
    try:
        private = load_ssh_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError):
        private = None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise LaunchError(f"{key}: not an OpenSSH ECDSA private key (given with --auth-key; crosssim certs DIR "
                          f"--sites NAME writes one)")


def _run_supernode(process: subprocess.Popen) -> tuple[int, str | None]:
    """Echo the SuperNode's output until it exits (then stop what it left running); its exit code and the marker
    of a known refusal it printed, if any."""
    refusals: list[str] = []
    echo = threading.Thread(target=_echo, args=(process.stdout, refusals), daemon=True)
    echo.start()
    code = process.wait()
    stop_group(process)  # its SuperExec and ClientApps hold the output pipe open
    echo.join()
    return code, next(iter(refusals), None)


def _echo(stream: IO[bytes], refusals: list[str]) -> None:
    """Copy ``stream`` to stdout line by line, noting the marker of each refusal a line names."""
    for raw in stream:
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        refusals += [marker for marker in FLOWER_REFUSALS if marker in line]

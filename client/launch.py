"""`crosssim client`: one hospital joins a federation as a Flower SuperNode serving its site folder.

Raw Flower equivalent (printed by ``--dry-run``)::

    flower-supernode --insecure --superlink H:P --port 9094 --node-config "data='DIR' site='NAME' cache='DIR'"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from crosssim.boundary import NODE_CACHE_KEY, NODE_DATA_KEY, NODE_SITE_KEY, NODE_UNLABELED_KEY
from crosssim.processes import (Children, LaunchError, describe_command, first_free_port, flower_env, key_values,
                                require_free_port, require_pem, split_address, stop_on_sigterm,
                                wait_until_reachable)

DEFAULT_SUPERNODE_PORT = 9094  # Flower's default port of a SuperNode's own API (for its ClientApp processes)
SUPERNODE_HOST = "127.0.0.1"  # where the SuperNode's own API listens (Flower's default)
DEFAULT_CONNECT_TIMEOUT_S = 60.0


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
                        help=f"how long to wait for the SuperLink to accept connections before giving up "
                             f"(default {DEFAULT_CONNECT_TIMEOUT_S:.0f})")
    security = parser.add_argument_group("transport security")
    security.add_argument("--insecure", action="store_true", default=True,
                          help="plain HTTP (the default until --root-certificates is given)")
    security.add_argument("--root-certificates", metavar="FILE", help="CA certificate of the SuperLink (enables TLS)")
    parser.add_argument("--dry-run", action="store_true", help="print the raw Flower command and exit")


def supernode_command(args: argparse.Namespace, port: int) -> list[str]:
    data = Path(args.data).resolve()
    node_config: dict[str, str | bool] = {NODE_DATA_KEY: str(data), NODE_SITE_KEY: args.site or data.name}
    if args.unlabeled:
        node_config[NODE_UNLABELED_KEY] = True
    if args.cache:
        node_config[NODE_CACHE_KEY] = str(Path(args.cache).resolve())
    security = ["--root-certificates", args.root_certificates] if args.root_certificates else ["--insecure"]
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
    command = supernode_command(args, supernode_port(args))
    wait_until_reachable(args.superlink, args.connect_timeout)
    stop_on_sigterm()
    children = Children()
    try:
        print(f"joining {args.superlink} with site {args.site or Path(args.data).resolve().name}", flush=True)
        return children.start(command, flower_env()).wait()
    finally:
        children.stop_all()

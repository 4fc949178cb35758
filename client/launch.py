"""`crosssim client`: one hospital joins a federation as a Flower SuperNode serving its site folder.

Raw Flower equivalent (printed by ``--dry-run``)::

    flower-supernode --insecure --superlink H:P --port 9094 --node-config "data='DIR' site='NAME' cache='DIR'"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.processes import (Children, describe_command, flower_env, key_values,
                              stop_on_sigterm)

# The node config a SuperNode passes to every ClientApp run on it (read in client.task).
NODE_DATA_KEY = "data"
NODE_SITE_KEY = "site"
NODE_CACHE_KEY = "cache"
DEFAULT_SUPERNODE_PORT = 9094  # Flower's default port of a SuperNode's own API (for its ClientApp processes)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server's SuperLink address")
    parser.add_argument("--data", required=True, metavar="DIR", help="this hospital's labeled site folder")
    parser.add_argument("--site", metavar="NAME", help="site name in logs (default: the folder's name)")
    parser.add_argument("--cache", metavar="DIR", help="tensor cache on this hospital's disk "
                        "(default: $CROSSSIM_CACHE_DIR or ~/.cache/crosssim)")
    parser.add_argument("--port", type=int, default=DEFAULT_SUPERNODE_PORT,
                        help=f"local port of this SuperNode's own API (default {DEFAULT_SUPERNODE_PORT}; "
                             "one per SuperNode on a machine)")
    security = parser.add_argument_group("transport security")
    security.add_argument("--insecure", action="store_true", default=True,
                          help="plain HTTP (the default until --root-certificates is given)")
    security.add_argument("--root-certificates", metavar="FILE", help="CA certificate of the SuperLink (enables TLS)")
    parser.add_argument("--dry-run", action="store_true", help="print the raw Flower command and exit")


def supernode_command(args: argparse.Namespace) -> list[str]:
    data = Path(args.data).resolve()
    node_config = {NODE_DATA_KEY: str(data), NODE_SITE_KEY: args.site or data.name}
    if args.cache:
        node_config[NODE_CACHE_KEY] = str(Path(args.cache).resolve())
    security = ["--root-certificates", args.root_certificates] if args.root_certificates else ["--insecure"]
    return ["flower-supernode", *security, "--superlink", args.superlink, "--port", str(args.port),
            "--node-config", key_values(node_config)]


def join(args: argparse.Namespace) -> int:
    """Run the SuperNode in the foreground until it exits, Ctrl-C or SIGTERM (then stop it and its apps)."""
    command = supernode_command(args)
    if args.dry_run:
        print(describe_command(command))
        return 0
    if not Path(args.data).is_dir():
        raise FileNotFoundError(f"{args.data}: site folder not found")
    stop_on_sigterm()
    children = Children()
    try:
        print(f"joining {args.superlink} with site {args.site or Path(args.data).resolve().name}", flush=True)
        return children.start(command, flower_env()).wait()
    finally:
        children.stop_all()

"""Federation sub-commands on the server side: `crosssim simulate` and `crosssim server`.

Flower and torch are imported inside the handlers, so `crosssim --help` stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any

from crosssim.cli import config_from_args

STRATEGIES = ("crosssim", "fedavg", "fedprox", "fedbn")


def _run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config keys that have their own flags (they win over --config and --set)."""
    overrides: dict[str, Any] = {}
    for flag, key in (("strategy", "strategy"), ("rounds", "rounds"), ("cache", "cache-dir")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    return overrides


def _simulate(args: argparse.Namespace) -> int:
    from server.simulation import simulate

    cfg = config_from_args(args, _run_overrides(args))
    final = simulate(args.sites, cfg, args.out, resume=args.resume, target=args.target, verbose=args.verbose)
    print(f"done: {final}")
    return 0


def _server(args: argparse.Namespace) -> int:
    from server.launch import serve

    overrides = _run_overrides(args)
    if args.min_sites is not None:
        overrides["min-sites"] = args.min_sites
    if args.classes is not None:
        overrides["classes"] = args.classes
    return serve(config_from_args(args, overrides), args)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="RUN",
                        help="run folder: config.toml, rounds.jsonl, round-NNNN.pt, latest.pt, final.pt")
    parser.add_argument("--strategy", choices=STRATEGIES, help="federated strategy (overrides the config)")
    parser.add_argument("--rounds", type=int, help="number of rounds (overrides the config)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from RUN/latest.pt with the same round counter (remaining rounds only)")


def add_commands(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    simulate = subparsers.add_parser(
        "simulate", parents=[common], help="run a whole federation on this machine (Flower Simulation Engine)",
        description="Train across labeled sites with Flower's Simulation Engine: one virtual hospital per site "
                    "folder, sites in parallel where CPU cores allow. Prints one line per round and writes "
                    "the same run folder as a real deployment.")
    simulate.add_argument("--sites", nargs="+", required=True, metavar="DIR", help="labeled site folders")
    add_run_options(simulate)
    simulate.add_argument("--target", metavar="DIR",
                          help="an unlabeled target site in the loop: one more virtual node that receives the global "
                               "model each round and sends only its style entry and image count (never weights, "
                               "prototypes or per-image values); sources then mix toward its style too (needs the "
                               "style bank: --set style-mix-probability=0.5; it is off by default)")
    simulate.add_argument("--cache", metavar="DIR", help="tensor cache for every site (default: config cache-dir)")
    simulate.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    simulate.set_defaults(handler=_simulate)

    from server.launch import add_server_options

    server = subparsers.add_parser(
        "server", parents=[common], help="run the aggregation server of a real federation (Flower SuperLink)",
        description="Start a Flower SuperLink, wait for --min-sites hospitals (`crosssim client`), submit the "
                    "CrossSim app with `flwr run --stream`, print its log until the run ends, then stop the "
                    "SuperLink. Ctrl-C stops everything it started.")
    add_run_options(server)
    add_server_options(server)
    server.set_defaults(handler=_server)

"""Federation sub-command on the hospital side: `crosssim client`."""

from __future__ import annotations

import argparse


def _client(args: argparse.Namespace) -> int:
    from client.launch import join

    return join(args)


def add_commands(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from client.launch import add_client_options

    client = subparsers.add_parser(
        "client", help="join a federation as a hospital (Flower SuperNode serving one site folder)",
        description="Start a Flower SuperNode for this hospital. Images stay here: the site folder is read by "
                    "CrossSim's ClientApp on this machine, and only weights, class prototypes with counts and "
                    "scalar metrics leave. The training config comes from the server with each round.")
    add_client_options(client)
    client.set_defaults(handler=_client)

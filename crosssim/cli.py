"""The `crosssim` command: one entry point for hospitals, the aggregation server and the target site.

Federation commands (simulate, server, client) are registered by the ``server`` and ``client`` packages;
this module itself never imports Flower.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from crosssim.config import ConfigError, CrossSimConfig, load_config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Modules that add sub-commands with ``add_commands(subparsers, common)``; none imports Flower at import time.
COMMAND_MODULES = ("crosssim.commands", "crosssim.serve_commands", "server.commands", "client.commands")


def parse_set(values: Sequence[str]) -> dict[str, str]:
    """``--set key=value`` pairs → dict (values are converted by the config schema)."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def common_options() -> argparse.ArgumentParser:
    """Options every command that reads the config takes."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE",
                       help="TOML config layered over configs/default.toml (see configs/ for presets)")
    group.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                       help="override one config key, e.g. --set epochs=5 --set backbone=resnet18 (repeatable)")
    group.add_argument("--seed", type=int, help="random seed (overrides the config's seed)")
    return parent


def config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> CrossSimConfig:
    overrides: dict[str, Any] = parse_set(args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crosssim",
        description="Federated training across hospitals with a cross-site similarity loss, native DICOM, "
                    "and label-free trust estimates at unlabeled sites.",
        epilog="Run 'crosssim COMMAND --help' for the options of each command.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("crosssim: interrupted", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"crosssim {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

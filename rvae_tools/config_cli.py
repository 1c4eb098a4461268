"""``rvae-tools validate-config``: check a config file before running anything."""

from __future__ import annotations

import argparse
import json
import sys

from .config import load_config


def configure_validate_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file (YAML)")
    parser.add_argument("--print", action="store_true", dest="print_config",
                        help="print the config with every default filled in (JSON)")


def run_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.print_config:
        json.dump(config, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(f"{args.config}: valid ({len(config['movies'])} movie(s): {', '.join(config['movies'])})")
    return 0


COMMANDS = {"validate-config": (configure_validate_parser, run_validate)}

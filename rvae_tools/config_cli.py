"""``rvae-tools validate-config``: check a config file before running anything."""

from __future__ import annotations

import argparse
import json
import sys

from .config import check_config, load_config


def configure_validate_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file (YAML)")
    parser.add_argument("--print", action="store_true", dest="print_config",
                        help="print the config with every default filled in (JSON)")
    parser.add_argument("--no-device-check", action="store_false", dest="device_check",
                        help="do not check that the configured device exists on this machine "
                             "(e.g. on a cluster's submit host without GPUs)")


def run_validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    # The checks against the movies' shapes and the machine, as at Snakemake start.
    check_config(config, source=args.config, device=args.device_check)
    if args.print_config:
        json.dump(config, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(f"{args.config}: valid ({len(config['movies'])} movie(s): {', '.join(config['movies'])})")
    return 0


COMMANDS = {"validate-config": (configure_validate_parser, run_validate)}

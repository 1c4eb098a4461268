"""``rvae-tools provenance PATH``: print the provenance attributes of a store, table or checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InputError
from .io import open_zarr, table_metadata

_KEYS = ("stage", "rvae_tools_version", "git_commit", "config_hash", "seed", "model_checksum",
         "python_version", "library_versions", "inputs", "config")


def read_provenance(path: str | Path) -> dict:
    """Provenance of a Zarr store (its attrs), a Parquet table (its footer) or a checkpoint."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found")
    if path.suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").exists()):
        attrs = dict(open_zarr(path).attrs)
    elif path.suffix == ".parquet":
        attrs = table_metadata(path)
    elif path.suffix in (".pt", ".pth"):
        import torch

        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a foreign file
            raise InputError(f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc})") from None
        attrs = dict(ckpt.get("provenance", {})) if isinstance(ckpt, dict) else {}
    else:
        raise InputError(f"{path}: unknown kind of file; expected a .zarr store, a .parquet table or a .pt checkpoint")
    out = {}
    for key, value in attrs.items():
        if isinstance(value, str) and value[:1] in "{[":
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def configure_provenance_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a .zarr store, .parquet table or .pt checkpoint")
    parser.add_argument("--json", action="store_true", help="print everything as JSON")


def run_provenance(args: argparse.Namespace) -> int:
    prov = read_provenance(args.path)
    if args.json:
        json.dump(prov, sys.stdout, indent=2, sort_keys=True, default=str)
        print()
        return 0
    if not prov:
        print(f"{args.path}: no provenance recorded")
        return 1
    for key in _KEYS:
        if key in prov:
            value = prov[key]
            if isinstance(value, (dict, list)):
                value = json.dumps(value, sort_keys=True)
            print(f"{key}: {value}")
    for key in sorted(set(prov) - set(_KEYS)):
        print(f"{key}: {prov[key]}")
    return 0


COMMANDS = {"provenance": (configure_provenance_parser, run_provenance)}

"""Reading and checking checkpoints: the saved model and the trainer's per-epoch state.

Every checkpoint is read with ``torch.load(..., weights_only=True)``, so a file can hold
tensors, numbers, strings and containers of them but never code. On top of that the structure
is checked before anything uses it: a foreign ``.pt`` (another tool's state dict, a bare
tensor, a pickle of objects, a text file) or a crafted one (the right marker but keys missing
or of the wrong type) is one :class:`~rvae_tools.errors.InputError` naming the file and what is
wrong, never a ``KeyError`` deep inside the loader.

The trainer's resume key is :func:`training_fingerprint`: a SHA-256 of everything that
determines the trained weights, so checkpoints are only continued by a run that would have
produced them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError

FORMAT = "rvae-tools/rvae-checkpoint"
FORMAT_VERSION = 1

#: key -> (accepted types, what is expected) of every model checkpoint.
MODEL_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "format_version": ((int,), "an integer"),
    "kind": ((str,), "a model kind such as 'rvae'"),
    "config": ((dict,), "a mapping of settings"),
    "state_dict": ((dict,), "a mapping of parameter names to tensors"),
}

#: Extra keys of the trainer's per-epoch checkpoints.
EPOCH_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "epoch": ((int,), "an integer"),
    "optimizer": ((dict,), "an optimiser state"),
    "train_index": ((torch.Tensor,), "a tensor of window indices"),
    "val_index": ((torch.Tensor,), "a tensor of window indices"),
    "best_loss": ((float, int), "a number"),
    "bad_epochs": ((int,), "an integer"),
    "history": ((list,), "a list of per-epoch rows"),
    "fingerprint": ((str,), "the training fingerprint"),
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_checkpoint(path: str | Path, *, epoch: bool = False) -> dict[str, Any]:
    """The checked contents of a model checkpoint (``epoch=True``: a trainer epoch checkpoint).

    Raises
    ------
    InputError
        The file is missing, is not a torch file, holds anything but plain data, is not an
        rvae-tools checkpoint, or lacks a key / has one of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises UnpicklingError, RuntimeError, EOFError, ...)
        raise InputError(f"{path}: cannot be read as a model checkpoint ({type(exc).__name__}: "
                         f"{_first_line(exc)[:200]})") from None
    if not isinstance(payload, dict):
        raise InputError(f"{path}: holds a {type(payload).__name__}, not an rvae-tools checkpoint "
                         f"(expected a mapping with format {FORMAT!r})")
    if payload.get("format") != FORMAT:
        shown = payload.get("format", "missing")
        raise InputError(f"{path}: not an rvae-tools checkpoint (format marker {shown!r}, expected {FORMAT!r}); "
                         "is it another tool's file?")
    _check_keys(path, payload, MODEL_KEYS)
    if payload["format_version"] > FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format version {payload['format_version']} is newer than this "
                         f"rvae-tools reads ({FORMAT_VERSION}); upgrade rvae-tools")
    bad = [k for k, v in payload["state_dict"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise InputError(f"{path}: 'state_dict' entry {bad[0]!r} is not a named tensor")
    config = payload["config"]
    ws = config.get("window_size")
    if not (isinstance(ws, (list, tuple)) and len(ws) == 2 and all(isinstance(v, int) and v > 0 for v in ws)):
        raise InputError(f"{path}: 'config.window_size' is {ws!r}; expected two positive integers")
    if "normalisation" in payload and not isinstance(payload["normalisation"], dict):
        raise InputError(f"{path}: 'normalisation' is a {type(payload['normalisation']).__name__}; expected a mapping")
    if epoch:
        _check_keys(path, payload, EPOCH_KEYS)
    return payload


def _check_keys(path: Path, payload: Mapping[str, Any], keys: Mapping[str, tuple[tuple[type, ...], str]]) -> None:
    for key, (types, expected) in keys.items():
        if key not in payload:
            raise InputError(f"{path}: checkpoint lacks '{key}' (expected {expected})")
        value = payload[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise InputError(f"{path}: checkpoint's '{key}' is a {type(value).__name__}; expected {expected}")


def check_compatible(config: dict[str, Any], source: str, *, window_size=None, latent_dim=None) -> None:
    """Raise InputError when a checkpoint's window size or latent size differs from what is expected."""
    if window_size is not None:
        ws = (window_size, window_size) if isinstance(window_size, (int, np.integer)) else tuple(window_size)
        have = tuple(config["window_size"])
        if tuple(int(v) for v in ws) != tuple(int(v) for v in have):
            raise InputError(f"{source}: checkpoint is for {have[0]}x{have[1]} windows, but the windows are {ws[0]}x{ws[1]}")
    if latent_dim is not None and int(latent_dim) != int(config["latent_dim"]):
        raise InputError(f"{source}: checkpoint has latent_dim {config['latent_dim']}, but latent_dim {latent_dim} was asked for")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def training_fingerprint(parts: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the JSON-able ``parts`` that determine a training run's weights."""
    return hashlib.sha256(_canonical(dict(parts)).encode()).hexdigest()


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two fingerprint descriptions."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed += fingerprint_changes(a, b, name + ".")
        elif _canonical(a) != _canonical(b):
            changed.append(name)
    return changed

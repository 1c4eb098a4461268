"""Provenance attributes carried by every store: who made it, from what, with which settings."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from . import __version__

_LIBRARIES = ("numpy", "scipy", "pandas", "xarray", "zarr", "trackpy", "torch", "scikit-image", "scikit-learn")


def config_hash(settings: Any) -> str:
    """SHA-256 (hex, first 16 characters) of the canonical JSON form of ``settings``."""
    blob = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks so large movies need no memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the source tree this package runs from, or '' when unknown."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    commit = out.stdout.strip()
    try:
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        dirty = ""
    return commit + ("-dirty" if dirty else "")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers (absent ones are skipped)."""
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def provenance_attrs(
    *,
    settings: Any = None,
    seed: int | None = None,
    model_checksum: str | None = None,
    inputs: dict[str, str] | None = None,
    stage: str | None = None,
) -> dict[str, Any]:
    """Attributes to attach to an output store.

    Parameters
    ----------
    settings : dict, optional
        The (validated) config section the stage ran with; hashed into ``config_hash`` and
        stored in full as ``config`` (JSON text).
    seed : int, optional
        Random seed the stage used.
    model_checksum : str, optional
        SHA-256 of the model checkpoint that produced the output.
    inputs : dict, optional
        Input name -> path or checksum, for the record.
    stage : str, optional
        The stage that wrote the store.
    """
    attrs: dict[str, Any] = {
        "rvae_tools_version": __version__,
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "library_versions": json.dumps(library_versions(), sort_keys=True),
    }
    if stage is not None:
        attrs["stage"] = stage
    if settings is not None:
        attrs["config_hash"] = config_hash(settings)
        attrs["config"] = json.dumps(settings, sort_keys=True, default=str)
    if seed is not None:
        attrs["seed"] = int(seed)
    if model_checksum is not None:
        attrs["model_checksum"] = model_checksum
    if inputs:
        attrs["inputs"] = json.dumps(inputs, sort_keys=True, default=str)
    return attrs

"""Shared figure helpers: a non-interactive backend, one style, atomic saving in several formats."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written by batch jobs without a display

import matplotlib.pyplot as plt

from ..io import atomic_output

STYLE = {
    "figure.dpi": 100,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": "medium",
    "axes.labelsize": "medium",
    "legend.frameon": False,
    "image.cmap": "viridis",
    "svg.hashsalt": "rvae-tools",  # stable SVG ids, so reruns give identical files
}


def new_figure(*args, **kwargs):
    """``plt.subplots`` under the project style (with constrained layout unless told otherwise)."""
    kwargs.setdefault("layout", "constrained")
    with plt.rc_context(STYLE):
        return plt.subplots(*args, **kwargs)


def sample_trajectories(n_particles: int, n_frames: int, max_windows: int, seed: int = 0):
    """Trajectories a whole-movie figure reads: all (``slice(None)``) when they hold at most
    ``max_windows`` (trajectory, frame) values, else a seeded random subset of whole
    trajectories (sorted indices) that does, so the figure's memory does not grow with the movie."""
    if n_particles * max(n_frames, 1) <= max_windows:
        return slice(None)
    import numpy as np

    keep = max(1, int(max_windows) // max(n_frames, 1))
    return np.sort(np.random.default_rng(seed).choice(n_particles, keep, replace=False))


def save_figure(
    fig,
    figures_dir: str | os.PathLike,
    stem: str,
    *,
    formats: Iterable[str] = ("png", "svg"),
    dpi: int = 150,
) -> list[Path]:
    """Write ``fig`` as ``figures_dir/stem.<fmt>`` for every format (atomically) and close it."""
    out = []
    figures_dir = Path(figures_dir)
    try:
        for fmt in formats:
            path = figures_dir / f"{stem}.{fmt}"
            with atomic_output(path) as tmp, plt.rc_context(STYLE):
                fig.savefig(tmp, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
            out.append(path)
    finally:
        plt.close(fig)
    return out

"""Figures of the tracking stage: trajectories over a frame, track lengths, drift, ensemble MSD."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .style import new_figure, save_figure

FIGURES = {
    "tracking_trajectories": "Trajectories (coloured lines, image pixels) drawn over the middle frame of the "
                             "movie; each colour is one trajectory id after stub filtering.",
    "tracking_lengths": "Histogram of trajectory lengths (detections per trajectory) after stub filtering; "
                        "the dashed line is the minimum length kept.",
    "tracking_drift": "Ensemble drift of the field of view against time (x and y, in the movie's length "
                      "unit), as estimated from the mean frame-to-frame displacement of all particles.",
    "tracking_msd": "Ensemble mean squared displacement against lag time (log-log, drift removed) with the "
                    "power-law fit <r^2> = A t^n; n = 1 is free diffusion, A = 4 D.",
}


def _units(movie_dir: Path) -> tuple[float, str, float, dict]:
    from ..io import table_metadata

    meta = table_metadata(movie_dir / "tracks.parquet")
    stats = meta.get("tracking", {})
    unit = meta.get("units", {}).get("pixel_unit", "px")
    return float(stats.get("pixel_size", 1.0)), unit, float(stats.get("frame_interval", 1.0)), meta


def draw(
    movie_dir: str | os.PathLike,
    figures_dir: str | os.PathLike,
    *,
    formats: Iterable[str] = ("png", "svg"),
    dpi: int = 150,
) -> list[Path]:
    """Draw every figure in :data:`FIGURES` from ``movie_dir`` (``results/{movie}``).

    Reads ``tracks.parquet``, ``drift.parquet``, ``trajectories.parquet``, ``msd.parquet``
    and one frame of ``movie.zarr`` (when present) for the background.
    """
    from ..io import read_table, table_metadata

    movie_dir, figures_dir = Path(movie_dir), Path(figures_dir)
    formats = tuple(formats)
    tracks = read_table(movie_dir / "tracks.parquet", required=["frame", "x", "y", "particle"], what="tracks table")
    drift = read_table(movie_dir / "drift.parquet", required=["frame", "x", "y"], what="drift table")
    summary = read_table(movie_dir / "trajectories.parquet", required=["particle", "length"],
                         what="trajectory summary")
    msd = read_table(movie_dir / "msd.parquet", required=["lag_time", "msd"], what="ensemble MSD table")
    pixel_size, unit, frame_interval, meta = _units(movie_dir)
    config = meta.get("config")
    min_length = None
    if config:
        import json

        min_length = json.loads(config).get("min_length")
    written: list[Path] = []

    # Trajectories over the middle frame.
    fig, ax = new_figure(figsize=(6, 5))
    frame_index, image = _background(movie_dir, tracks)
    if image is not None:
        ax.imshow(image, cmap="gray", origin="upper")
        ax.set_xlim(-0.5, image.shape[1] - 0.5)
        ax.set_ylim(image.shape[0] - 0.5, -0.5)
    else:
        ax.invert_yaxis()
    ax.set_aspect("equal")
    cmap = __import__("matplotlib").colormaps["tab20"]
    if len(tracks):
        ordered = tracks.sort_values(["particle", "frame"])
        for i, (_, one) in enumerate(ordered.groupby("particle", sort=False)):
            ax.plot(one["x"].to_numpy(), one["y"].to_numpy(), lw=0.8, color=cmap(i % 20))
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    title = f"{tracks['particle'].nunique()} trajectories"
    ax.set_title(title + (f" over frame {frame_index}" if image is not None else ""))
    written += save_figure(fig, figures_dir, "tracking_trajectories", formats=formats, dpi=dpi)

    # Track lengths.
    fig, ax = new_figure(figsize=(5, 3.5))
    lengths = summary["length"].to_numpy()
    if len(lengths):
        bins = np.arange(0.5, lengths.max() + 1.5, max(1, int(np.ceil(lengths.max() / 60))))
        ax.hist(lengths, bins=bins, color="C0")
    if min_length:
        ax.axvline(min_length, color="k", ls="--", lw=1, label=f"min_length = {min_length}")
        ax.legend()
    ax.set_xlabel("trajectory length (detections)")
    ax.set_ylabel("trajectories")
    written += save_figure(fig, figures_dir, "tracking_lengths", formats=formats, dpi=dpi)

    # Drift.
    fig, ax = new_figure(figsize=(5, 3.5))
    t = drift["frame"].to_numpy() * frame_interval
    ax.plot(t, drift["x"].to_numpy() * pixel_size, label="x")
    ax.plot(t, drift["y"].to_numpy() * pixel_size, label="y")
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"drift ({unit})")
    ax.legend()
    written += save_figure(fig, figures_dir, "tracking_drift", formats=formats, dpi=dpi)

    # Ensemble MSD with the power-law fit.
    fig, ax = new_figure(figsize=(5, 3.5))
    if len(msd):
        ax.loglog(msd["lag_time"], msd["msd"], "o", ms=3, label="ensemble MSD")
        fit = table_metadata(movie_dir / "msd.parquet").get("power_law", {})
        n, a = fit.get("n"), fit.get("A")
        if n is not None and a is not None and np.isfinite(n) and np.isfinite(a):
            lag = msd["lag_time"].to_numpy()
            ax.loglog(lag, a * lag ** n, "k-", lw=1, label=f"fit: n = {n:.3f}, A = {a:.3g} {unit}$^2$/s$^n$")
        ax.legend()
    ax.set_xlabel("lag time (s)")
    ax.set_ylabel(f"<r$^2$> ({unit}$^2$)")
    written += save_figure(fig, figures_dir, "tracking_msd", formats=formats, dpi=dpi)
    return written


def _background(movie_dir: Path, tracks):
    """(frame index, image) of the middle tracked frame, or (None, None) without a movie store."""
    store = movie_dir / "movie.zarr"
    if not store.exists():
        return None, None
    from ..io import open_zarr

    ds = open_zarr(store, required=["image"], what="movie store")
    n = ds.sizes["frame"]
    if len(tracks):
        frame = int(np.clip(int(np.median(tracks["frame"])), 0, n - 1))
    else:
        frame = n // 2
    return frame, np.asarray(ds["image"].isel(frame=frame).values)

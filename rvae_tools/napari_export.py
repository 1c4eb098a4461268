"""Export one movie's results as napari layers that napari opens without a plugin.

``rvae-tools export-napari results/MOVIE -o DIR`` writes:

- ``points.csv``: every detection in napari's own points CSV layout (``index, axis-0,
  axis-1, axis-2`` = frame, y, x in pixels, then the detection columns as features), which
  napari's built-in reader opens by drag and drop or ``viewer.open("points.csv")``;
- ``tracks.csv``: trajectories in napari's Tracks layout, ``track_id, t, y, x`` (pixels,
  sorted by track then frame) followed by properties (score, area, angle, z1, ...);
- ``vectors.csv``: one orientation vector per window with latents, ``t, y, x`` (the start
  of the vector) and ``v_t, v_y, v_x`` (its extent: 0 in time, the particle's length along
  its angle), so that ``data[:, 0] = (t, y, x)`` and ``data[:, 1] = (v_t, v_y, v_x)`` is the
  ``(N, 2, 3)`` Vectors array, plus ``angle`` and ``colour`` (the value to colour by).

The movie itself is ``movie.zarr``, an OME-Zarr image (see :mod:`rvae_tools.ngff`). Coordinates
are pixels in ``(frame, y, x)``; scale them by ``pixel_size`` for physical units.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .io import atomic_output, open_zarr, read_table

log = logging.getLogger(__name__)

POINTS_AXES = ["axis-0", "axis-1", "axis-2"]


def points_layer(detections: pd.DataFrame) -> pd.DataFrame:
    """Detections in napari's points CSV layout: ``index, axis-0 (frame), axis-1 (y), axis-2 (x)``, features."""
    features = [c for c in detections.columns if c not in ("frame", "y", "x")]
    out = pd.DataFrame({"index": np.arange(len(detections)),
                        "axis-0": detections["frame"].to_numpy(float),
                        "axis-1": detections["y"].to_numpy(float),
                        "axis-2": detections["x"].to_numpy(float)})
    for c in features:
        out[c] = detections[c].to_numpy()
    return out


def tracks_layer(tracks: pd.DataFrame, latents=None) -> pd.DataFrame:
    """Trajectories as napari Tracks data ``track_id, t, y, x`` (+ properties), sorted by track and frame."""
    out = pd.DataFrame({"track_id": tracks["particle"].to_numpy(np.int64), "t": tracks["frame"].to_numpy(np.int64),
                        "y": tracks["y"].to_numpy(float), "x": tracks["x"].to_numpy(float)})
    for c in ("score", "area", "orientation", "eccentricity", "cls"):
        if c in tracks:
            out[c] = tracks[c].to_numpy()
    if latents is not None:
        flat = _latent_rows(latents)
        keep = ["particle", "frame", "angle"] + [c for c in flat.columns if c.startswith("z")]
        out = out.merge(flat[keep].rename(columns={"particle": "track_id", "frame": "t"}),
                        on=["track_id", "t"], how="left")
    return out.sort_values(["track_id", "t"], kind="stable").drop_duplicates(["track_id", "t"]).reset_index(drop=True)


def _latent_rows(latents) -> pd.DataFrame:
    flat = latents[["angle", "x", "y"]].to_dataframe().dropna(subset=["angle"]).reset_index()
    z = latents["z"].transpose("particle", "frame", "latent").values
    pi = pd.Index(latents["particle"].values).get_indexer(flat["particle"])
    fi = pd.Index(latents["frame"].values).get_indexer(flat["frame"])
    for k in range(z.shape[2]):
        flat[f"z{k + 1}"] = z[pi, fi, k]
    return flat


def vectors_layer(latents, tracks: pd.DataFrame | None = None, colour: str = "angle",
                  default_length: float = 10.0) -> pd.DataFrame:
    """One centred orientation vector per window with latents (napari Vectors rows).

    Parameters
    ----------
    latents : xarray.Dataset
        ``latents.zarr``: ``angle`` (rad, from +x towards +y), ``x``, ``y`` (px) on (particle, frame).
    tracks : DataFrame, optional
        ``tracks.parquet``; its ``area`` (px^2) gives each particle's length, the diameter of
        a disc of its median area. Without it, every vector is ``default_length`` px long.
    colour : str
        ``angle`` or a latent (``z1``, ``z2``, ...): the value stored in column ``colour``.
    """
    flat = _latent_rows(latents)
    if colour != "angle" and colour not in flat:
        raise InputError(f"--colour: {colour!r} is not a latent of this movie; "
                         f"expected angle or one of {', '.join(c for c in flat.columns if c.startswith('z'))}")
    length = np.full(len(flat), float(default_length))
    if tracks is not None and "area" in tracks:
        size = 2 * np.sqrt(tracks.groupby("particle")["area"].median() / np.pi)
        length = flat["particle"].map(size).fillna(default_length).to_numpy(float)
    vy, vx = length * np.sin(flat["angle"].to_numpy(float)), length * np.cos(flat["angle"].to_numpy(float))
    # centred on the particle: the vector starts half a length behind it
    return pd.DataFrame({"t": flat["frame"].to_numpy(float), "y": flat["y"].to_numpy(float) - vy / 2,
                         "x": flat["x"].to_numpy(float) - vx / 2, "v_t": 0.0, "v_y": vy, "v_x": vx,
                         "particle": flat["particle"].to_numpy(np.int64), "angle": flat["angle"].to_numpy(float),
                         "length": length, "colour": flat[colour].to_numpy(float)})


def export_napari(movie_dir: str | Path, output: str | Path, *, colour: str = "angle") -> list[Path]:
    """Write ``points.csv``, ``tracks.csv`` and ``vectors.csv`` of one movie's results into ``output``.

    Layers whose inputs are missing (e.g. no latents yet) are not written; at least the
    detections must be there.
    """
    movie_dir, output = Path(movie_dir), Path(output)
    if not (movie_dir / "detections.parquet").exists():
        raise InputError(f"{movie_dir}: no detections.parquet (expected a results/MOVIE folder)")
    output.mkdir(parents=True, exist_ok=True)
    written = []

    def write(df: pd.DataFrame, name: str) -> None:
        with atomic_output(output / name) as tmp:
            df.to_csv(tmp, index=False)
        written.append(output / name)
        log.info("wrote %s (%d rows)", output / name, len(df))

    write(points_layer(read_table(movie_dir / "detections.parquet", required=["frame", "x", "y"])), "points.csv")
    tracks = None
    if (movie_dir / "tracks.parquet").exists():
        tracks = read_table(movie_dir / "tracks.parquet", required=["frame", "x", "y", "particle"])
    latents = None
    if (movie_dir / "latents.zarr").exists():
        latents = open_zarr(movie_dir / "latents.zarr", required=["angle", "x", "y", "z"], what="latents store")
    if tracks is not None:
        write(tracks_layer(tracks, latents), "tracks.csv")
    if latents is not None:
        write(vectors_layer(latents, tracks, colour=colour), "vectors.csv")
    return written


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("movie_dir", help="results/{movie}: detections.parquet, tracks.parquet, latents.zarr")
    parser.add_argument("-o", "--output", required=True, help="folder for points.csv, tracks.csv, vectors.csv")
    parser.add_argument("--colour", default="angle", help="colour the vectors by angle (default) or a latent (z1, z2, ...)")


def run(args: argparse.Namespace) -> int:
    written = export_napari(args.movie_dir, args.output, colour=args.colour)
    log.info("wrote %d napari layer file(s) under %s", len(written), args.output)
    return 0


COMMANDS = {"export-napari": (configure, run)}

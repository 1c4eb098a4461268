"""Windows: a square sub-image cut around every tracked detection -> ``patches.zarr``.

Every row of ``tracks.parquet`` (``frame``, ``x``, ``y``, ``particle``; x = column, y = row,
in pixels) gives one window of ``size x size`` pixels whose centre is the detection's
sub-pixel position. The window's pixel ``(i, j)`` samples the frame at
``(y + i - (size - 1) / 2, x + j - (size - 1) / 2)``, so the detection sits exactly at the
window's geometric centre, ``((size - 1) / 2, (size - 1) / 2)`` in window pixel indices; this
is also the origin of the rVAE decoder's coordinate grid. For even sizes the centre falls
between pixels, which is what keeps the grid symmetric.

Sub-pixel sampling uses :func:`scipy.ndimage.map_coordinates`. The default is linear
interpolation (``interpolation: linear``, spline order 1): it never overshoots, so windows of
a probability map stay in [0, 1] and a dark background never rings around a bright particle,
and it is the fastest. ``cubic`` (order 3) keeps more of the high frequencies of sharp
particles at the cost of mild ringing and about three times the time.

Normalisation is per movie, not per window, so that contrast differences between particles
(a species that is brighter than another) survive into the latent space. With
``normalize: percentile`` the low and high percentiles of the pixels of a sample of windows
(up to :data:`SAMPLE_FRAMES` evenly spaced frames, at most :data:`SAMPLE_WINDOWS` windows)
map to 0 and 1; sampling windows rather than whole frames puts the levels on the particles the
model will see instead of on the background that dominates a frame. The levels are recorded in
the store's attributes (``norm_low``, ``norm_high``).

**The window belongs to its particle.** A neighbour reaching into a window would steer its
encoded angle and content. With ``mask: aperture`` (the default ``auto`` when the tracks give
each detection's size) every window is blended towards the movie's background level outside a
soft elliptical aperture around its own particle: the ellipse has the detection's major and
minor axes (columns ``major_axis``/``minor_axis``, else derived from ``area`` and
``eccentricity`` as an ellipse of that area), each widened by ``mask_margin`` px, and lies
along the detection's ``orientation``; the weight is 1 inside and falls off as a Gaussian of
:data:`APERTURE_SOFTNESS` px outside (:func:`aperture_weights`). The fill level is the median
of the sampled window pixels (the background of all but the densest movies), recorded as
``mask_fill``; the semi-axes of every window are stored as ``aperture_a``/``aperture_b``.

**Only the particle's own contrast.** Phase-contrast cells are dark with a bright halo, and
the bright gaps between touching cells are the strongest features of a dense colony's windows;
an rVAE lines its template up with them (their layout, not the cell's axis), so on a real
colony its angles agreed with the cells' moment axes at only 0.63 (``|mean exp 2i delta|``).
With ``polarity`` dark (bright) every window's pixels brighter (darker) than the background
level, the median of the sampled window pixels (attr ``background_level``, normalised), are set
to it before the aperture, and the percentiles are taken after it (:func:`particle_side`):
0.93 on the same windows. ``auto`` is the inspected polarity of a user movie (the one the
detector runs at; ``both``, nothing cut, for a simulated movie).

**Edges.** With ``edge: pad`` (the default) a detection near the frame edge keeps its window,
the missing pixels set to the background level (the low percentile, or ``mask_fill`` with the
aperture); the share of each window's pixels that lies
outside the frame is stored as ``padded_fraction`` (0 for whole windows). ``edge: drop``
discards such windows instead.

The movie is read in blocks of frames and the windows are written to the store in chunks of
``chunk_size`` along ``obs``, so memory is bounded by the block and chunk sizes, not by the
length of the movie.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

from .config import add_settings_arguments, settings_from_args
from .errors import InputError
from .io import atomic_output, json_safe_attrs, open_zarr, read_table
from .provenance import provenance_attrs

log = logging.getLogger(__name__)

#: Columns a tracks table must have.
TRACK_COLUMNS = ("frame", "x", "y", "particle")
#: Extra per-detection columns carried into the store as coordinates on ``obs`` when present.
CARRIED_COLUMNS = ("cls", "score", "orientation", "eccentricity")
#: Frames and windows sampled to estimate the normalisation levels.
SAMPLE_FRAMES = 16
SAMPLE_WINDOWS = 4096
#: Upper bound on the bytes of movie frames read at once.
BLOCK_BYTES = 64 << 20

_ORDERS = {"linear": 1, "cubic": 3}
#: Gaussian fall-off (px) of the aperture weight outside the widened ellipse.
APERTURE_SOFTNESS = 1.5


# --------------------------------------------------------------------------- geometry


def window_offsets(size: int) -> np.ndarray:
    """Pixel offsets of a window's rows (and columns) from its centre: ``arange(size) - (size-1)/2``."""
    return np.arange(size, dtype=np.float64) - (size - 1) / 2.0


def inside_frame(x: np.ndarray, y: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
    """True where every sample point of the window centred on ``(x, y)`` lies inside the frame.

    Parameters
    ----------
    x, y : array of float
        Window centres in pixels (x = column, y = row).
    size : int
        Window side in pixels.
    shape : (height, width)
        Frame shape in pixels.
    """
    half = (size - 1) / 2.0
    height, width = shape
    eps = 1e-9  # a centre exactly half a window from the edge still fits
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return (x - half >= -eps) & (x + half <= width - 1 + eps) & (y - half >= -eps) & (y + half <= height - 1 + eps)


def cut_windows(
    frame: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    size: int,
    *,
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """Cut square windows centred (sub-pixel) on ``(x, y)`` from one frame.

    Parameters
    ----------
    frame : ndarray (height, width)
        Intensities of one frame.
    x, y : array of float, shape (n,)
        Window centres in pixels (x = column, y = row).
    size : int
        Window side in pixels.
    order : {1, 3}
        Spline order of the interpolation (1 = linear, 3 = cubic).
    cval : float
        Value of sample points outside the frame (edge padding).

    Returns
    -------
    ndarray (n, size, size) float32
        ``out[k, i, j]`` = frame sampled at row ``y[k] + offsets[i]``, column ``x[k] + offsets[j]``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    if n == 0:
        return np.zeros((0, size, size), dtype=np.float32)
    off = window_offsets(size)
    rows = (y[:, None, None] + off[None, :, None]) * np.ones((1, 1, size))
    cols = (x[:, None, None] + off[None, None, :]) * np.ones((1, size, 1))
    coords = np.stack([rows.ravel(), cols.ravel()])
    # One call per frame for all of its windows: the spline prefilter (cubic) then runs once.
    values = ndimage.map_coordinates(
        np.asarray(frame, dtype=np.float64), coords, order=order, mode="constant", cval=float(cval), prefilter=order > 1,
    )
    return values.reshape(n, size, size).astype(np.float32)


def padded_fraction(x: np.ndarray, y: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
    """Share (0-1) of each window's sample points that fall outside the frame."""
    off = window_offsets(size)
    height, width = shape
    eps = 1e-9
    cols = np.asarray(x, dtype=np.float64)[:, None] + off[None, :]
    rows = np.asarray(y, dtype=np.float64)[:, None] + off[None, :]
    in_cols = ((cols >= -eps) & (cols <= width - 1 + eps)).mean(1)
    in_rows = ((rows >= -eps) & (rows <= height - 1 + eps)).mean(1)
    return 1.0 - in_cols * in_rows


def aperture_axes(tracks: pd.DataFrame, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Semi-axes (a, b) px and orientation (rad) of each detection's aperture, or None without sizes.

    From ``major_axis``/``minor_axis`` (full lengths, px) when present, else from ``area``
    (px) and ``eccentricity`` as the ellipse of that area; both widened by ``margin`` px.
    A missing orientation gives a circle of the major semi-axis.
    """
    if {"major_axis", "minor_axis"} <= set(tracks.columns):
        a = pd.to_numeric(tracks["major_axis"], errors="coerce").to_numpy(np.float64) / 2
        b = pd.to_numeric(tracks["minor_axis"], errors="coerce").to_numpy(np.float64) / 2
    elif {"area", "eccentricity"} <= set(tracks.columns):
        area = pd.to_numeric(tracks["area"], errors="coerce").to_numpy(np.float64)
        ecc = np.clip(pd.to_numeric(tracks["eccentricity"], errors="coerce").to_numpy(np.float64), 0, 0.999)
        ratio = np.sqrt(1 - ecc ** 2)  # b / a of an ellipse of that eccentricity
        a = np.sqrt(area / (np.pi * ratio))
        b = a * ratio
    else:
        return None
    if "orientation" in tracks.columns:
        theta = pd.to_numeric(tracks["orientation"], errors="coerce").to_numpy(np.float64)
    else:
        theta = np.full(len(tracks), np.nan)
    good = np.isfinite(a) & np.isfinite(b) & (a > 0)
    if not good.any():
        return None
    # A detection without a size gets the movie's typical one; without an angle, a circle.
    a = np.where(good, a, np.nanmedian(a[good]))
    b = np.where(good, b, np.nanmedian(b[good]))
    circle = ~np.isfinite(theta)
    b = np.where(circle, a, b)
    theta = np.where(circle, 0.0, theta)
    return a + margin, np.maximum(b, 0.5) + margin, theta


def aperture_weights(size: int, dx: np.ndarray, dy: np.ndarray, a: np.ndarray, b: np.ndarray,
                     theta: np.ndarray, softness: float = APERTURE_SOFTNESS) -> np.ndarray:
    """Weights (n, size, size) in [0, 1]: 1 inside each ellipse, Gaussian fall-off outside.

    Parameters
    ----------
    size : int
        Window side in pixels.
    dx, dy : array (n,) px
        Offset of the particle's centre from the window centre (0 for windows centred on it).
    a, b : array (n,) px
        Semi-axes along and across the orientation.
    theta : array (n,) rad
        Orientation of the major axis, from +x towards +y.
    softness : float px
        Width of the fall-off outside the ellipse.
    """
    off = window_offsets(size)
    px = off[None, None, :] - np.asarray(dx, dtype=np.float64)[:, None, None]
    py = off[None, :, None] - np.asarray(dy, dtype=np.float64)[:, None, None]
    c, s = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = c * px + s * py
    v = -s * px + c * py
    a, b = np.asarray(a)[:, None, None], np.asarray(b)[:, None, None]
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    # Distance outside the ellipse, approximately, in px along the ray from the centre.
    outside = np.clip(rho - 1, 0, None) * np.sqrt(u ** 2 + v ** 2) / np.maximum(rho, 1e-9)
    return np.exp(-0.5 * (outside / softness) ** 2).astype(np.float32)


def particle_side(pixels: np.ndarray, level: float, polarity: str) -> np.ndarray:
    """Pixels on the far side of the background ``level`` set to it: only the particles' own contrast is left.

    ``polarity`` dark keeps what is darker than ``level`` (bright halos and the bright gaps
    between phase-contrast cells go), bright keeps what is brighter (dark rings of bright-field
    spheres go), both keeps everything.
    """
    if polarity == "dark":
        return np.minimum(pixels, np.asarray(level, dtype=pixels.dtype))
    if polarity == "bright":
        return np.maximum(pixels, np.asarray(level, dtype=pixels.dtype))
    return pixels


def normalise(windows: np.ndarray, low: float, high: float, clip: bool) -> np.ndarray:
    """Map intensities ``low -> 0`` and ``high -> 1`` (float32), clipped to [0, 1] when ``clip``."""
    out = (np.asarray(windows, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out


# --------------------------------------------------------------------------- inputs


def _frame_positions(movie: xr.Dataset, frames: np.ndarray, movie_path: Path, tracks_path: Path) -> np.ndarray:
    """Index along the movie's frame axis of each track frame number."""
    n_frames = movie.sizes["frame"]
    if "frame" in movie.coords:
        labels = np.asarray(movie["frame"].values)
        lookup = pd.Index(labels)
        pos = lookup.get_indexer(frames)
    else:
        pos = np.where((frames >= 0) & (frames < n_frames), frames, -1)
    bad = pos < 0
    if bad.any():
        missing = np.unique(frames[bad])
        shown = ", ".join(map(str, missing[:5])) + (" ..." if missing.size > 5 else "")
        raise InputError(
            f"{tracks_path}: {bad.sum()} detection(s) refer to frame(s) {shown} that {movie_path} "
            f"does not have ({n_frames} frames)"
        )
    return pos.astype(np.int64)


def _frame_progression(movie: xr.Dataset, n_frames: int) -> dict[str, int]:
    """First frame number and step of the movie, so encode can lay out every frame (with or without windows)."""
    labels = np.asarray(movie["frame"].values) if "frame" in movie.coords else np.arange(n_frames)
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return {}
    step = int(labels[1] - labels[0]) if labels.size > 1 else 1
    if step < 1 or not np.array_equal(labels, labels[0] + step * np.arange(labels.size)):
        return {}
    return {"frame_first": int(labels[0]), "frame_step": step}


def _read_tracks(path: Path) -> pd.DataFrame:
    tracks = read_table(path, required=TRACK_COLUMNS, what="tracks table")
    if len(tracks) == 0:
        raise InputError(f"{path}: tracks table has zero tracks (no rows); nothing to cut windows from")
    for col in ("frame", "particle"):
        values = tracks[col]
        if not pd.api.types.is_numeric_dtype(values) or values.isna().any() or not np.all(np.mod(values, 1) == 0):
            raise InputError(f"{path}: column '{col}' must hold whole numbers without gaps (found {values.dtype})")
    for col in ("x", "y"):
        values = pd.to_numeric(tracks[col], errors="coerce")
        if not np.isfinite(values.to_numpy(dtype=np.float64)).all():
            raise InputError(f"{path}: column '{col}' must hold finite pixel positions; found missing or non-numeric values")
    tracks = tracks.astype({"frame": np.int64, "particle": np.int64, "x": np.float64, "y": np.float64})
    dup = tracks.duplicated(["particle", "frame"])
    if dup.any():
        row = tracks[dup].iloc[0]
        raise InputError(
            f"{path}: {int(dup.sum())} duplicate (particle, frame) pair(s), e.g. particle {row.particle} in "
            f"frame {row.frame}; a trajectory may visit each frame once"
        )
    return tracks.sort_values(["frame", "particle"], kind="stable").reset_index(drop=True)


def _open_source(movie_path: Path, probability_path: Path | None, source: str) -> tuple[xr.Dataset, xr.DataArray]:
    movie = open_zarr(movie_path, required=["image"], what="movie store")
    image = movie["image"]
    if image.ndim != 3:
        raise InputError(f"{movie_path}: image must have dims (frame, y, x); found {image.dims}")
    if source == "image":
        return movie, image
    if probability_path is None:
        raise InputError(
            "windows.source is 'probability' but no probability map was given (--probability PROBABILITY.zarr)"
        )
    prob_ds = open_zarr(probability_path, required=["probability"], what="probability store")
    prob = prob_ds["probability"]
    if prob.shape != image.shape:
        raise InputError(
            f"{probability_path}: probability has shape {tuple(prob.shape)} but the movie {movie_path} "
            f"has image shape {tuple(image.shape)}; expected (frame, y, x) of the same movie"
        )
    return movie, prob


def _frame_blocks(pos: np.ndarray, frame_bytes: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(first frame, stop frame, row indices) for blocks of frames with detections, ``pos`` sorted."""
    per_block = max(1, BLOCK_BYTES // max(frame_bytes, 1))
    used = np.unique(pos)
    starts = np.searchsorted(pos, used, side="left")
    stops = np.searchsorted(pos, used, side="right")
    i = 0
    while i < used.size:
        j = i
        # A block spans at most `per_block` consecutive frames of the movie.
        while j + 1 < used.size and used[j + 1] < used[i] + per_block:
            j += 1
        yield int(used[i]), int(used[j]) + 1, np.arange(starts[i], stops[j])
        i = j + 1


def _sample_levels(
    source: xr.DataArray, pos: np.ndarray, x: np.ndarray, y: np.ndarray, size: int, order: int,
    percentiles: tuple[float, float], where: str, polarity: str = "both",
) -> tuple[float, float, float]:
    """Low and high percentile and the median of the pixels of a sample of (unpadded, in-frame) windows.

    With ``polarity`` bright or dark the percentiles are those of the pixels after
    :func:`particle_side` at the median, so that the particle's own contrast spans 0..1.
    """
    used = np.unique(pos)
    frames = used[np.unique(np.linspace(0, used.size - 1, min(SAMPLE_FRAMES, used.size)).round().astype(int))]
    per_frame = max(1, SAMPLE_WINDOWS // frames.size)
    pixels = []
    for f in frames:
        rows = np.flatnonzero(pos == f)
        rows = rows[np.unique(np.linspace(0, rows.size - 1, min(per_frame, rows.size)).round().astype(int))]
        frame = np.asarray(source[int(f)].values)
        pixels.append(cut_windows(frame, x[rows], y[rows], size, order=order, cval=np.nan).ravel())
    values = np.concatenate(pixels)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError(f"{where}: all windows are NaN (no finite pixel values at the tracked positions)")
    values = values.astype(np.float64)
    median = float(np.median(values))
    values = particle_side(values, median, polarity)
    low, high = np.percentile(values, [percentiles[0], percentiles[1]])
    if not high > low:
        raise InputError(
            f"{where}: all windows are constant (every sampled pixel is {float(low):.6g}); "
            f"there is no contrast at the tracked positions to learn from"
        )
    return float(low), float(high), float(median)


# --------------------------------------------------------------------------- main entry


def make_windows(
    movie_path: str | Path,
    tracks_path: str | Path,
    output: str | Path,
    settings: dict[str, Any],
    *,
    probability_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cut a window around every tracked detection and write ``patches.zarr``.

    Parameters
    ----------
    movie_path : path
        ``movie.zarr`` with ``image(frame, y, x)`` and attrs ``pixel_size``, ``pixel_unit``,
        ``frame_interval``.
    tracks_path : path
        ``tracks.parquet`` with ``frame``, ``x``, ``y`` (px), ``particle``, optionally ``cls``.
    output : path
        The ``patches.zarr`` to write (atomically).
    settings : dict
        The validated ``windows`` config section.
    probability_path : path, optional
        ``probability.zarr`` with ``probability(frame, y, x)``, used when ``settings["source"]``
        is ``"probability"``.

    Returns
    -------
    dict
        Counts and levels (the same as the store's attributes).

    Raises
    ------
    InputError
        Missing columns, zero tracks, a window larger than the frame, all windows constant or
        NaN, frames the movie lacks.
    """
    from tqdm import tqdm

    movie_path, tracks_path, output = Path(movie_path), Path(tracks_path), Path(output)
    probability_path = Path(probability_path) if probability_path is not None else None
    from .inspect import resolve_settings

    settings, _ = resolve_settings("windows", settings)  # an 'auto' left by a direct caller: its fallback
    size = int(settings["size"])
    order = _ORDERS[settings["interpolation"]]
    edge = settings["edge"]
    source_name = settings["source"]
    chunk = int(settings["chunk_size"])
    p_low, p_high = (float(p) for p in settings["percentiles"])
    if not p_low < p_high:
        raise InputError(f"windows.percentiles: the low percentile {p_low} must be below the high one {p_high}")
    normalize = settings["normalize"]
    if normalize == "auto":
        # Probabilities already live in [0, 1]; rescaling them would only add noise to the levels.
        normalize = "none" if source_name == "probability" else "percentile"

    movie, source = _open_source(movie_path, probability_path, source_name)
    n_frames, height, width = (int(s) for s in source.shape)
    where = probability_path if source_name == "probability" else movie_path
    if size > min(height, width):
        raise InputError(
            f"windows.size {size} px is larger than the frame of {movie_path} ({height} x {width} px); "
            f"choose a size <= {min(height, width)}"
        )
    tracks = _read_tracks(tracks_path)
    n_detections = len(tracks)
    pos = _frame_positions(movie, tracks["frame"].to_numpy(), movie_path, tracks_path)

    inside = inside_frame(tracks["x"].to_numpy(), tracks["y"].to_numpy(), size, (height, width))
    n_edge = int((~inside).sum())
    if edge == "drop":
        tracks, pos = tracks[inside].reset_index(drop=True), pos[inside]
        if len(tracks) == 0:
            raise InputError(
                f"{tracks_path}: all {n_detections} detections lie within {size / 2:g} px of the frame edge, "
                f"so no {size} x {size} window fits; set windows.edge to 'pad' or choose a smaller windows.size"
            )
    x_all, y_all = tracks["x"].to_numpy(), tracks["y"].to_numpy()
    inside_kept = inside_frame(x_all, y_all, size, (height, width))
    sample_rows = np.flatnonzero(inside_kept) if inside_kept.any() else np.arange(len(tracks))
    polarity = settings.get("polarity", "both")
    low, high, median = _sample_levels(
        source, pos[sample_rows], x_all[sample_rows], y_all[sample_rows], size, order, (p_low, p_high), str(where),
        polarity,
    )
    # Pad with the background level (the low percentile), which normalisation maps to 0.
    pad_value = low
    if normalize == "percentile":
        norm_low, norm_high = low, high
    else:
        norm_low, norm_high = 0.0, 1.0

    mask = settings.get("mask", "none")
    axes = aperture_axes(tracks, float(settings.get("mask_margin", 2.0))) if mask != "none" else None
    if mask == "aperture" and axes is None:
        raise InputError(
            f"{tracks_path}: windows.mask is 'aperture' but the tracks give no particle size (columns "
            f"major_axis and minor_axis, or area and eccentricity); set windows.mask: none"
        )
    mask = "aperture" if axes is not None else "none"
    fill = median if mask == "aperture" else pad_value
    if mask == "aperture":
        # The median is the background whether particles are bright or dark; the low
        # percentile would pad a dark-on-bright movie with particle-coloured pixels.
        pad_value = fill
    if polarity != "both":
        # The background, not a particle-coloured low percentile, fills what lies past the edge.
        pad_value = median
    frac_all = padded_fraction(x_all, y_all, size, (height, width))

    carried = [c for c in CARRIED_COLUMNS if c in tracks.columns]
    offsets = window_offsets(size)
    attrs: dict[str, Any] = {
        key: movie.attrs[key] for key in ("pixel_size", "pixel_unit", "frame_interval") if key in movie.attrs
    }
    attrs.update({
        "movie_sha256": movie.attrs.get("sha256", ""),
        "window_size": size,
        "source": source_name,
        "interpolation": settings["interpolation"],
        "spline_order": order,
        "edge": edge,
        "normalize": normalize,
        "percentiles": [p_low, p_high],
        "norm_low": norm_low,
        "norm_high": norm_high,
        "clip": bool(settings["clip"]),
        "pad_value": float(normalise(np.array([pad_value]), norm_low, norm_high, bool(settings["clip"]))[0]),
        "polarity": polarity,
        "background_level": float(normalise(np.array([median]), norm_low, norm_high, bool(settings["clip"]))[0]),
        "mask": mask,
        "mask_margin": float(settings.get("mask_margin", 2.0)),
        "mask_softness": APERTURE_SOFTNESS if mask == "aperture" else 0.0,
        "mask_fill": float(normalise(np.array([fill]), norm_low, norm_high, bool(settings["clip"]))[0]),
        "n_frames": n_frames,
        **_frame_progression(movie, n_frames),
        "frame_height": height,
        "frame_width": width,
        "n_detections": n_detections,
        "n_dropped_edge": n_edge if edge == "drop" else 0,
        "n_padded": n_edge if edge == "pad" else 0,
    })
    attrs.update(provenance_attrs(
        settings=settings, seed=settings.get("seed") or 0, stage="windows",
        inputs={"movie": str(movie_path), "tracks": str(tracks_path),
                **({"probability": str(probability_path)} if source_name == "probability" else {})},
    ))

    frame_bytes = height * width * 8
    buffer: list[tuple[np.ndarray, pd.DataFrame]] = []
    buffered = 0
    written = 0
    n_nonfinite = 0
    any_contrast = False
    first_value: float | None = None

    def flush(tmp: Path, final: bool) -> None:
        nonlocal buffer, buffered, written
        if buffered == 0:
            return
        wins = np.concatenate([w for w, _ in buffer])
        meta = pd.concat([m for _, m in buffer], ignore_index=True)
        take = buffered if final else (buffered // chunk) * chunk
        if take == 0:
            return
        _write_part(tmp, wins[:take], meta.iloc[:take], offsets, carried, chunk, first=written == 0)
        written += take
        buffer = [(wins[take:], meta.iloc[take:].reset_index(drop=True))] if take < buffered else []
        buffered -= take

    with atomic_output(output) as tmp:
        bar = tqdm(total=len(tracks), unit="win", desc="windows", file=sys.stderr, disable=not progress,
                   mininterval=1.0 if sys.stderr.isatty() else 15.0)
        with bar:
            for f0, f1, rows in _frame_blocks(pos, frame_bytes):
                block = np.asarray(source[f0:f1].values)
                block_pos = pos[rows]
                for f in np.unique(block_pos):
                    r = rows[block_pos == f]
                    wins = cut_windows(block[f - f0], x_all[r], y_all[r], size, order=order, cval=pad_value)
                    finite = np.isfinite(wins).all(axis=(1, 2))
                    if not finite.all():
                        # Non-finite pixels (masked regions of the movie) would poison training.
                        n_nonfinite += int((~finite).sum())
                        wins, r = wins[finite], r[finite]
                    if r.size == 0:
                        continue
                    wins = particle_side(wins, median, polarity)
                    if axes is not None:
                        weight = aperture_weights(size, np.zeros(r.size), np.zeros(r.size),
                                                  axes[0][r], axes[1][r], axes[2][r])
                        wins = weight * wins + (1 - weight) * np.float32(fill)
                    wins = normalise(wins, norm_low, norm_high, bool(settings["clip"]))
                    if not any_contrast:
                        if first_value is None:
                            first_value = float(wins[0, 0, 0])
                        any_contrast = bool((wins != first_value).any())
                    meta = tracks.iloc[r][["particle", "frame", "x", "y", *carried]].reset_index(drop=True)
                    meta["padded"] = ~inside_kept[r]
                    meta["padded_fraction"] = frac_all[r]
                    if axes is not None:
                        meta["aperture_a"], meta["aperture_b"] = axes[0][r], axes[1][r]
                    buffer.append((wins, meta))
                    buffered += r.size
                    if buffered >= chunk:
                        flush(tmp, final=False)
                bar.update(rows.size)
            flush(tmp, final=True)
        if written == 0:
            raise InputError(f"{where}: all windows are NaN ({n_nonfinite} windows held non-finite pixels)")
        if not any_contrast:
            raise InputError(
                f"{where}: all {written} windows are constant (value {first_value:.6g} after normalisation); "
                "there is no contrast at the tracked positions to learn from"
            )
        attrs["n_windows"] = written
        attrs["n_dropped_nonfinite"] = n_nonfinite
        _finalise(tmp, attrs)
    if n_nonfinite:
        log.warning("%s: dropped %d window(s) holding NaN or infinite pixels", where, n_nonfinite)
    log.info(
        "%s: %d windows of %d x %d px from %d detections (%d dropped at the edge, %d padded, %d non-finite)",
        output, written, size, size, n_detections, attrs["n_dropped_edge"], attrs["n_padded"], n_nonfinite,
    )
    return {k: attrs[k] for k in ("n_windows", "n_detections", "n_dropped_edge", "n_padded", "n_dropped_nonfinite",
                                  "norm_low", "norm_high", "pad_value")}


def _write_part(
    store: Path, wins: np.ndarray, meta: pd.DataFrame, offsets: np.ndarray, carried: list[str], chunk: int, first: bool,
) -> None:
    coords: dict[str, Any] = {
        "particle": ("obs", meta["particle"].to_numpy(np.int64), {"description": "trajectory id"}),
        "frame": ("obs", meta["frame"].to_numpy(np.int64), {"description": "frame number"}),
        "x": ("obs", meta["x"].to_numpy(np.float64), {"units": "px", "description": "window centre, column"}),
        "y": ("obs", meta["y"].to_numpy(np.float64), {"units": "px", "description": "window centre, row"}),
        "padded": ("obs", meta["padded"].to_numpy(bool), {"description": "window reaches past the frame edge (padded)"}),
        "padded_fraction": ("obs", meta["padded_fraction"].to_numpy(np.float32),
                            {"units": "1", "description": "share of the window's pixels outside the frame (padded)"}),
    }
    for name, text in (("aperture_a", "semi-axis of the aperture along the particle"),
                       ("aperture_b", "semi-axis of the aperture across the particle")):
        if name in meta.columns:
            coords[name] = ("obs", meta[name].to_numpy(np.float32), {"units": "px", "description": text})
    for col in carried:
        values = meta[col].to_numpy()
        if values.dtype == object or pd.api.types.is_string_dtype(meta[col]):
            # Variable-length strings: Zarr v3 has a specified type for them (not for fixed-width unicode).
            values = values.astype(str).astype(object)
        coords[col] = ("obs", values)
    ds = xr.Dataset(
        {"window": (("obs", "wy", "wx"), wins, {"units": "normalised intensity",
                                                "description": "window centred on the detection"})},
        coords=coords,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        if first:
            ds = ds.assign_coords(
                wy=("wy", offsets, {"units": "px", "description": "row offset from the window centre"}),
                wx=("wx", offsets, {"units": "px", "description": "column offset from the window centre"}),
            )
            encoding = {name: {"chunks": (chunk,)} for name in coords}
            encoding["window"] = {"chunks": (chunk, wins.shape[1], wins.shape[2])}
            ds.to_zarr(store, mode="w", encoding=encoding, consolidated=False)
        else:
            ds.to_zarr(store, append_dim="obs", consolidated=False)


def _finalise(store: Path, attrs: dict[str, Any]) -> None:
    """Attributes go on last (appending replaces them) and metadata is consolidated once."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        group = zarr.open_group(store, mode="r+")
        group.attrs.update(json_safe_attrs(attrs))
        zarr.consolidate_metadata(store)


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("movie", help="movie store (movie.zarr) with image(frame, y, x)")
    parser.add_argument("tracks", help="tracks table (tracks.parquet): frame, x, y, particle")
    parser.add_argument("-o", "--output", required=True, help="patches store to write (patches.zarr)")
    parser.add_argument("--probability", metavar="PROBABILITY.zarr", default=None,
                        help="probability map probability(frame, y, x) of the segmenter, cut instead of the "
                             "image when the settings say source: probability")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser, "windows")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, "windows")
    make_windows(args.movie, args.tracks, args.output, settings,
                 probability_path=args.probability, progress=not args.no_progress)
    return 0


COMMANDS = {"windows": (configure, run)}

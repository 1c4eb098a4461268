"""Tracking: link detections into trajectories with trackpy, estimate drift, filter stubs, MSD.

The stage reads ``results/{movie}/detections.parquet`` (``frame``, ``x``, ``y`` in pixels) and
writes

``tracks.parquet``
    the detections that survive stub (and optional appearance) filtering, with an integer
    ``particle`` trajectory id and the drift-corrected positions ``x_corrected``,
    ``y_corrected`` (px). ``x`` and ``y`` stay the positions in the image, because the
    windows stage cuts the image there.
``drift.parquet``
    the ensemble drift per frame: ``frame``, ``x``, ``y`` (cumulative, px), zero at the first
    frame.
``trajectories.parquet``
    one row per trajectory: length, first and last frame, duration (s), mean position (px)
    and the translational diffusion coefficient from a line fitted to its first MSD lags
    (``pixel_unit``\\ ^2/s).
``msd.parquet``
    the ensemble MSD (trackpy's ``emsd`` weighting) against lag time, with the power-law fit
    ``<r^2> = A t^n`` in the file's metadata.

Linking is trackpy's Crocker-Grier algorithm with every trackpy knob exposed. A subnetwork
too large to solve does not abort the run: it is re-linked with adaptive search (and, if that
still fails, its particles start new trajectories), with a warning naming the frame.

All functions take and return DataFrames; positions are pixels, times frames unless stated.
Drift, drift-corrected positions and MSDs live in :mod:`rvae_tools.motion`, shared with the
dynamics stage (their names are re-exported here).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError
from .motion import LagPairs, ensemble_msd, estimate_drift, fit_power_law, subtract_drift

logger = logging.getLogger(__name__)

#: Columns a detections table must have.
REQUIRED_COLUMNS = ("frame", "x", "y")

#: trackpy link strategies that need numba.
_NUMBA_STRATEGIES = ("numba", "hybrid")


# --------------------------------------------------------------------------- input checks


def check_detections(detections: pd.DataFrame, source: str = "detections") -> pd.DataFrame:
    """Check a detections table and return it with an integer ``frame`` column.

    Parameters
    ----------
    detections : DataFrame
        One row per detection with ``frame`` (integer-valued), ``x`` and ``y`` (px).
    source : str
        Name of the table for error messages (its file path).

    Returns
    -------
    DataFrame
        A copy with a fresh RangeIndex and ``frame`` as int64.

    Raises
    ------
    InputError
        A missing column, a non-numeric or NaN/infinite coordinate, or a non-integer or
        negative frame number.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in detections.columns]
    if missing:
        raise InputError(
            f"{source}: lacks column(s) {', '.join(missing)}; expected {', '.join(REQUIRED_COLUMNS)} "
            f"(found {', '.join(map(str, detections.columns)) or 'none'})"
        )
    if "particle" in detections.columns:
        # trackpy would overwrite it silently; a stale id column is almost always a mistake.
        detections = detections.drop(columns="particle")
    out = detections.reset_index(drop=True).copy()
    for column in ("x", "y", "frame"):
        if not pd.api.types.is_numeric_dtype(out[column]) or pd.api.types.is_bool_dtype(out[column]):
            raise InputError(f"{source}: column {column!r} has dtype {out[column].dtype}; expected numbers")
        values = out[column].to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise InputError(
                f"{source}: column {column!r} has {bad.sum()} NaN or infinite value(s) "
                f"(first at row {rows[0]}); expected finite {'frame numbers' if column == 'frame' else 'pixel coordinates'}"
            )
    frames = out["frame"].to_numpy(dtype=float)
    if len(frames) and (np.any(frames != np.round(frames)) or frames.min() < 0):
        raise InputError(f"{source}: column 'frame' must hold non-negative whole numbers")
    out["frame"] = out["frame"].astype(np.int64)
    return out


# --------------------------------------------------------------------------- linking


@dataclass
class OversizeEvent:
    """A subnetwork trackpy could not solve at the full search range."""

    frame: int
    size: int
    resolution: str  # "adaptive" or "unlinked"


@dataclass
class _GuardedSubnetLinker:
    """A trackpy subnet linker that never lets an oversize subnetwork abort the run.

    With ``adaptive_stop`` set it behaves as trackpy's adaptive search. Without it, a
    subnetwork larger than ``max_size`` is re-linked adaptively down to ``fallback_stop``;
    if even that fails, its particles end their trajectories and start new ones (trackpy's
    'drop' strategy) for that subnetwork only. Every such event is logged with its frame.
    """

    base: Any
    max_size: int
    adaptive_max_size: int
    adaptive_stop: float | None
    adaptive_step: float
    fallback_stop: float
    events: list[OversizeEvent] = field(default_factory=list)

    def __call__(self, source_set, dest_set, search_range, **kwargs):
        from trackpy.linking.linking import adaptive_link_wrap
        from trackpy.linking.subnet import split_subnet
        from trackpy.linking.subnetlinker import subnet_linker_drop
        from trackpy.linking.utils import SubnetOversizeException

        kwargs.pop("max_size", None)
        try:
            if self.adaptive_stop is not None:
                return adaptive_link_wrap(
                    source_set, dest_set, search_range, self.base, adaptive_stop=self.adaptive_stop,
                    adaptive_step=self.adaptive_step, max_size=self.adaptive_max_size, **kwargs,
                )
            return self.base(source_set, dest_set, search_range, max_size=self.max_size, **kwargs)
        except SubnetOversizeException:
            pass
        frame = self._frame(source_set, dest_set)
        size = len(source_set)
        if self.adaptive_stop is None:
            try:
                new_range = search_range * self.adaptive_step
                spl, dpl = [], []
                for source, dest in split_subnet(source_set, dest_set, new_range):
                    s, d = adaptive_link_wrap(
                        source, dest, new_range, self.base, adaptive_stop=self.fallback_stop,
                        adaptive_step=self.adaptive_step, max_size=self.adaptive_max_size, **kwargs,
                    )
                    spl.extend(s)
                    dpl.extend(d)
                logger.warning(
                    "frame %d: a subnetwork of %d particles was too large for search_range %.3g px; "
                    "linked it with adaptive search instead", frame, size, search_range,
                )
                self.events.append(OversizeEvent(frame, size, "adaptive"))
                return spl, dpl
            except SubnetOversizeException:
                pass
        logger.warning(
            "frame %d: a subnetwork of %d particles stayed too large even with adaptive search; "
            "its particles start new trajectories here (lower search_range or set adaptive_stop)",
            frame, size,
        )
        self.events.append(OversizeEvent(frame, size, "unlinked"))
        return subnet_linker_drop(source_set, dest_set, search_range, max_size=np.inf)

    @staticmethod
    def _frame(source_set, dest_set) -> int:
        if dest_set:
            return int(max(p.t for p in dest_set))
        return int(max(p.t for p in source_set)) + 1


def _base_subnet_linker(link_strategy: str):
    from trackpy.linking import subnetlinker
    from trackpy.try_numba import NUMBA_AVAILABLE

    if link_strategy in _NUMBA_STRATEGIES and not NUMBA_AVAILABLE:
        raise InputError(
            f"track.link_strategy: {link_strategy!r} needs the numba package, which is not installed; "
            "install numba or use 'auto', 'recursive' or 'nonrecursive'"
        )
    if link_strategy == "auto":
        link_strategy = "hybrid" if NUMBA_AVAILABLE else "recursive"
    if link_strategy == "recursive":
        return subnetlinker.subnet_linker_recursive
    if link_strategy == "nonrecursive":
        return subnetlinker.subnet_linker_nonrecursive
    if link_strategy == "hybrid":
        return subnetlinker.subnet_linker_numba
    if link_strategy == "numba":
        return lambda *a, **k: subnetlinker.subnet_linker_numba(*a, hybrid=False, **k)
    if link_strategy == "drop":
        return subnetlinker.subnet_linker_drop
    raise InputError(f"track.link_strategy: unknown strategy {link_strategy!r}")


def link_detections(
    detections: pd.DataFrame,
    search_range: float,
    *,
    memory: int = 0,
    adaptive_stop: float | None = None,
    adaptive_step: float = 0.95,
    max_subnet_size: int = 30,
    neighbor_strategy: str = "KDTree",
    link_strategy: str = "auto",
    predictor: str = "none",
    predictor_span: int = 1,
    events: list[OversizeEvent] | None = None,
) -> pd.DataFrame:
    """Link detections into trajectories (trackpy's Crocker-Grier linking).

    Parameters
    ----------
    detections : DataFrame
        Checked detections (:func:`check_detections`): ``frame``, ``x``, ``y`` (px).
    search_range : float
        Largest displacement between frames, px.
    memory : int
        Frames a particle may go undetected and still keep its id.
    adaptive_stop : float or None
        Smallest search range (px) adaptive search may shrink to; None = no adaptive search,
        except as the fallback for a subnetwork that is too large (down to
        0.1 x ``search_range``).
    adaptive_step : float
        Factor (0-1) the search range is multiplied by at each adaptive step.
    max_subnet_size : int
        Largest subnetwork (particles) solved exactly; trackpy's ``Linker.MAX_SUB_NET_SIZE``.
        Adaptive search uses at most 15 (trackpy's ``MAX_SUB_NET_SIZE_ADAPTIVE``).
    neighbor_strategy : {'KDTree', 'BTree'}
        Neighbour search structure.
    link_strategy : {'auto', 'recursive', 'nonrecursive', 'numba', 'hybrid', 'drop'}
        Subnetwork solver ('auto' = 'hybrid' when numba is installed, else 'recursive').
    predictor : {'none', 'nearest_velocity', 'drift'}
        Where a particle is expected in the next frame: where it was, moved by the velocity
        of its nearest tracked neighbour, or by the mean velocity of all particles.
    predictor_span : int
        Frames over which the predictor estimates velocities.
    events : list, optional
        Receives an :class:`OversizeEvent` for every subnetwork that needed a fallback.

    Returns
    -------
    DataFrame
        ``detections`` with an int64 ``particle`` column, sorted by frame (stable).
    """
    import trackpy
    from trackpy.linking.linking import Linker

    out = detections.sort_values("frame", kind="stable").reset_index(drop=True)
    if out.empty:
        out["particle"] = pd.Series(dtype=np.int64)
        return out
    guard = _GuardedSubnetLinker(
        base=_base_subnet_linker(link_strategy),
        max_size=int(max_subnet_size),
        adaptive_max_size=int(min(max_subnet_size, Linker.MAX_SUB_NET_SIZE_ADAPTIVE)),
        adaptive_stop=adaptive_stop,
        adaptive_step=float(adaptive_step),
        fallback_stop=0.1 * float(search_range),
    )
    # Link only what linking needs and map the ids back by row: trackpy copies and sorts the
    # frame it is given, so handing it every detection column would only cost time.
    coords = pd.DataFrame({
        "frame": out["frame"].to_numpy(), "y": out["y"].to_numpy(dtype=float),
        "x": out["x"].to_numpy(dtype=float), "_row": np.arange(len(out)),
    })
    options = {"memory": int(memory), "neighbor_strategy": neighbor_strategy, "link_strategy": guard,
               "pos_columns": ["y", "x"], "t_column": "frame"}
    with _quiet_trackpy():
        if predictor == "none":
            linked = trackpy.link(coords, float(search_range), **options)
        else:
            linked = _predictor(predictor, int(predictor_span)).link_df(coords, float(search_range), **options)
    particle = np.empty(len(out), dtype=np.int64)
    particle[linked["_row"].to_numpy()] = linked["particle"].to_numpy(dtype=np.int64)
    out["particle"] = particle
    if events is not None:
        events.extend(guard.events)
    return out


def _predictor(kind: str, span: int):
    """A fresh trackpy predictor; the drift one keeps its last velocity when a frame links nothing.

    trackpy's ``DriftPredict`` averages the velocities of the particles linked in the last
    frames; when none were linked that mean is NaN and the next frame's KD-tree query fails
    deep inside trackpy. Keeping the last finite velocity (zero at the start) avoids that.
    """
    import trackpy.predict

    if kind == "nearest_velocity":
        return trackpy.predict.NearestVelocityPredict(span=span)
    if kind != "drift":
        raise InputError(f"track.predictor: unknown predictor {kind!r}; expected none, nearest_velocity or drift")

    class _SteadyDriftPredict(trackpy.predict.DriftPredict):
        def observe(self, frame):
            previous = getattr(self, "vel", None)
            super().observe(frame)
            if not np.all(np.isfinite(self.vel)):
                ok = previous is not None and np.all(np.isfinite(previous))
                self.vel = previous if ok else np.zeros(len(self.pos_columns))

    return _SteadyDriftPredict(span=span)


class _quiet_trackpy:
    """trackpy logs one INFO line per frame while linking; keep the stage log readable."""

    def __enter__(self):
        self._logger = logging.getLogger("trackpy")
        self._level = self._logger.level
        self._logger.setLevel(max(self._level, logging.WARNING))

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False


# --------------------------------------------------------------------------- filtering


#: Shortest trajectory (detections) kept when ``track.min_length`` is ``auto`` and the movie is longer.
MIN_LENGTH = 10


def resolve_min_length(settings: dict[str, Any], n_frames: int) -> dict[str, Any]:
    """``track.min_length`` for a movie of ``n_frames`` frames (a copy of the settings).

    ``auto`` is :data:`MIN_LENGTH`, or ``n_frames`` when the movie is shorter, so a short movie
    (trackpy's 5-frame ``stuck.tif``) keeps trajectories that span it. A set value wins; one
    longer than the movie is kept and warned about, as it leaves no trajectory.
    """
    out = dict(settings)
    if out["min_length"] == "auto":
        out["min_length"] = int(min(MIN_LENGTH, max(int(n_frames), 1)))
        why = "default" if out["min_length"] == MIN_LENGTH else f"the movie has only {n_frames} frames"
        logger.info("track.min_length: auto -> %d (%s)", out["min_length"], why)
    elif n_frames and int(out["min_length"]) > n_frames:
        logger.warning("track.min_length: %d is longer than the movie's %d frames, so no trajectory is kept "
                       "(kept as set; 'auto' would use %d)", out["min_length"], n_frames, n_frames)
    return out


def filter_short_tracks(tracks: pd.DataFrame, min_length: int) -> pd.DataFrame:
    """Keep trajectories with at least ``min_length`` detections (trackpy's ``filter_stubs``).

    Parameters
    ----------
    tracks : DataFrame
        Linked detections with ``particle``.
    min_length : int
        Minimum number of detections (frames) a trajectory must have.

    Returns
    -------
    DataFrame
        The surviving rows (fresh RangeIndex).
    """
    if tracks.empty:
        return tracks.reset_index(drop=True)
    length = tracks.groupby("particle")["frame"].transform("size")
    return tracks.loc[length.to_numpy() >= int(min_length)].reset_index(drop=True)


def select_detections(tracks: pd.DataFrame, bounds: dict[str, dict[str, float | None]],
                      source: str = "tracks") -> pd.DataFrame:
    """Keep rows whose columns lie strictly inside open bounds (an appearance filter).

    Parameters
    ----------
    tracks : DataFrame
        Tracked (or raw) detections.
    bounds : dict
        column -> {"above": low or None, "below": high or None}; a row is kept when
        ``low < value < high`` for every column (the trackpy walkthrough's
        ``mass > 50 & size < 2.6 & ecc < 0.3``).
    source : str
        Name of the table for error messages.

    Returns
    -------
    DataFrame
        The kept rows (fresh RangeIndex).
    """
    keep = np.ones(len(tracks), dtype=bool)
    for column, bound in (bounds or {}).items():
        if column not in tracks.columns:
            raise InputError(
                f"track.select: {source} has no column {column!r} to select on "
                f"(columns: {', '.join(map(str, tracks.columns))})"
            )
        values = pd.to_numeric(tracks[column], errors="coerce").to_numpy(dtype=float)
        if bound.get("above") is not None:
            keep &= values > bound["above"]
        if bound.get("below") is not None:
            keep &= values < bound["below"]
    return tracks.loc[keep].reset_index(drop=True)


# --------------------------------------------------------------------------- summary


def trajectory_summary(
    tracks: pd.DataFrame,
    *,
    pixel_size: float = 1.0,
    frame_interval: float = 1.0,
    fit_lags: int = 4,
) -> pd.DataFrame:
    """One row per trajectory: length, extent in time, mean position and diffusion coefficient.

    Parameters
    ----------
    tracks : DataFrame
        ``particle``, ``frame``, ``x``, ``y`` and (for the MSD) ``x_corrected``,
        ``y_corrected``, all in px.
    pixel_size : float
        Physical size of a pixel (in the movie's ``pixel_unit``).
    frame_interval : float
        Seconds between frames.
    fit_lags : int
        The MSD at lags 1..fit_lags frames is fitted with ``MSD = 4 D t + c`` (2-D diffusion
        plus a localisation-noise offset); lags without any pair are skipped.

    Returns
    -------
    DataFrame
        ``particle``, ``length`` (detections), ``first_frame``, ``last_frame``, ``duration``
        (s), ``x_mean``, ``y_mean`` (px), ``diffusion`` (pixel_unit^2/s; NaN when fewer than
        two lags could be measured), ``msd_lag1`` (pixel_unit^2).
    """
    columns = ["particle", "length", "first_frame", "last_frame", "duration", "x_mean", "y_mean",
               "diffusion", "msd_lag1"]
    if tracks.empty:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c in ("particle", "length", "first_frame", "last_frame") else float)
                             for c in columns})
    grouped = tracks.groupby("particle", sort=True)
    summary = grouped.agg(length=("frame", "size"), first_frame=("frame", "min"), last_frame=("frame", "max"),
                          x_mean=("x", "mean"), y_mean=("y", "mean")).reset_index()
    summary["duration"] = (summary["last_frame"] - summary["first_frame"]) * float(frame_interval)
    lags = np.arange(1, int(fit_lags) + 1)
    # groupby sorts by particle and np.unique does too, so the rows line up.
    msd = LagPairs(tracks, int(fit_lags)).msd_matrix(lags) * float(pixel_size) ** 2
    t = lags * float(frame_interval)
    # Least-squares line per trajectory over its measured lags, vectorised over trajectories.
    valid = np.isfinite(msd)
    n = valid.sum(axis=1)
    tt = np.where(valid, t, 0.0)
    yy = np.where(valid, msd, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_mean = tt.sum(axis=1) / n
        y_mean = yy.sum(axis=1) / n
        cov = (np.where(valid, (t - t_mean[:, None]) * (msd - y_mean[:, None]), 0.0)).sum(axis=1)
        var = (np.where(valid, (t - t_mean[:, None]) ** 2, 0.0)).sum(axis=1)
        slope = cov / var
    summary["diffusion"] = np.where(n >= 2, slope / 4.0, np.nan)
    summary["msd_lag1"] = msd[:, 0]
    return summary[columns]


# --------------------------------------------------------------------------- scoring against truth


def match_to_truth(tracks: pd.DataFrame, truth: pd.DataFrame, max_distance: float) -> np.ndarray:
    """The true particle of every row of ``tracks`` (-1 when none), frame by frame.

    A row and a truth position are matched when each is the other's nearest neighbour in
    the same frame and they are at most ``max_distance`` px apart.

    Parameters
    ----------
    tracks : DataFrame
        ``frame``, ``x``, ``y`` (px).
    truth : DataFrame
        ``frame``, ``particle``, ``x``, ``y`` (px).
    max_distance : float
        Match radius, px (half a particle diameter is the usual choice).

    Returns
    -------
    numpy.ndarray
        int64, one entry per row of ``tracks``.
    """
    from scipy.spatial import cKDTree

    out = np.full(len(tracks), -1, dtype=np.int64)
    if len(tracks) == 0 or len(truth) == 0:
        return out
    extent = max(np.ptp(tracks["x"]), np.ptp(tracks["y"]), np.ptp(truth["x"]), np.ptp(truth["y"]))
    # Frames become a third coordinate so far apart that no match can cross frames.
    sep = 4.0 * (extent + max_distance + 1.0)

    def points(df):
        return np.column_stack([df["x"].to_numpy(float), df["y"].to_numpy(float), df["frame"].to_numpy(float) * sep])

    a, b = points(tracks), points(truth)
    _, to_truth = cKDTree(b).query(a, distance_upper_bound=max_distance)
    _, to_tracks = cKDTree(a).query(b, distance_upper_bound=max_distance)
    found = to_truth < len(b)
    rows = np.flatnonzero(found)
    mutual = to_tracks[to_truth[rows]] == rows
    out[rows[mutual]] = truth["particle"].to_numpy(dtype=np.int64)[to_truth[rows[mutual]]]
    return out


def link_accuracy(tracks: pd.DataFrame, truth: pd.DataFrame, max_distance: float = 3.0) -> dict[str, float]:
    """How well trajectories follow true particles.

    Parameters
    ----------
    tracks : DataFrame
        ``frame``, ``x``, ``y`` (px), ``particle`` (trajectory id).
    truth : DataFrame
        ``frame``, ``particle``, ``x``, ``y`` (px).
    max_distance : float
        Match radius between a tracked detection and a true position, px.

    Returns
    -------
    dict
        ``link_accuracy``: of the consecutive-frame pairs of one true particle whose two
        positions were both tracked, the fraction that carry one trajectory id;
        ``purity``: mean over trajectories of the share of their detections that belong to
        their dominant true particle (unmatched detections count against it);
        ``purity_weighted``: the same, weighted by trajectory length; ``matched_fraction``:
        share of tracked detections matched to a true particle; ``n_links``, ``n_correct``,
        ``n_trajectories``, ``n_true_particles``.
    """
    true_id = match_to_truth(tracks, truth, max_distance)
    matched = true_id >= 0
    frame = tracks["frame"].to_numpy(dtype=np.int64)[matched]
    traj = tracks["particle"].to_numpy(dtype=np.int64)[matched]
    tid = true_id[matched]
    keyed = pd.Series(traj, index=pd.MultiIndex.from_arrays([tid, frame]))
    keyed = keyed[~keyed.index.duplicated()]
    nxt = keyed.reindex(pd.MultiIndex.from_arrays([tid, frame + 1]))
    has_pair = nxt.notna().to_numpy()
    n_links = int(has_pair.sum())
    n_correct = int((nxt.to_numpy()[has_pair] == traj[has_pair]).sum())
    rows = pd.DataFrame({"traj": tracks["particle"].to_numpy(dtype=np.int64), "true": true_id})
    length = rows.groupby("traj").size()
    dominant = rows[rows["true"] >= 0].groupby(["traj", "true"]).size().groupby(level="traj").max()
    dominant = dominant.reindex(length.index, fill_value=0)
    share = dominant / length
    return {
        "link_accuracy": n_correct / n_links if n_links else float("nan"),
        "purity": float(share.mean()) if len(share) else float("nan"),
        "purity_weighted": float(dominant.sum() / length.sum()) if len(length) else float("nan"),
        "matched_fraction": float(matched.mean()) if len(matched) else float("nan"),
        "n_links": n_links,
        "n_correct": n_correct,
        "n_trajectories": len(length),
        "n_true_particles": int(truth["particle"].nunique()),
    }


# --------------------------------------------------------------------------- the whole stage


@dataclass
class TrackingResult:
    """Everything the stage produces for one movie."""

    tracks: pd.DataFrame
    drift: pd.DataFrame
    trajectories: pd.DataFrame
    msd: pd.DataFrame
    stats: dict[str, Any]


def track(
    detections: pd.DataFrame,
    settings: dict[str, Any],
    *,
    pixel_size: float = 1.0,
    frame_interval: float = 1.0,
    source: str = "detections",
) -> TrackingResult:
    """Run the whole stage on a detections table: link, filter, drift, summary, ensemble MSD.

    Parameters
    ----------
    detections : DataFrame
        ``frame``, ``x``, ``y`` (px) plus any other columns (kept in the tracks).
    settings : dict
        The validated ``track`` config section.
    pixel_size : float
        Physical size of a pixel (the movie's ``pixel_unit``).
    frame_interval : float
        Seconds between frames.
    source : str
        Name of the detections for error messages.
    """
    from .inspect import resolve_settings

    settings, _ = resolve_settings("track", settings)  # an 'auto' left by a direct caller: its fallback
    timings: dict[str, float] = {}
    start = time.perf_counter()
    detections = check_detections(detections, source)
    frames = (np.arange(detections["frame"].min(), detections["frame"].max() + 1)
              if len(detections) else np.array([], dtype=np.int64))
    settings = resolve_min_length(settings, len(frames))
    events: list[OversizeEvent] = []
    linked = link_detections(
        detections, settings["search_range"], memory=settings["memory"],
        adaptive_stop=settings["adaptive_stop"], adaptive_step=settings["adaptive_step"],
        max_subnet_size=settings["max_subnet_size"], neighbor_strategy=settings["neighbor_strategy"],
        link_strategy=settings["link_strategy"], predictor=settings["predictor"],
        predictor_span=settings["predictor_span"], events=events,
    )
    timings["link_s"] = time.perf_counter() - start
    n_linked = int(linked["particle"].nunique())
    kept = filter_short_tracks(linked, settings["min_length"])
    n_long = int(kept["particle"].nunique())
    kept = select_detections(kept, settings["select"], source=source)
    n_selected = int(kept["particle"].nunique())
    drift_settings = settings["drift"]
    drift = estimate_drift(kept, drift_settings["smoothing"], frames=frames)
    kept = subtract_drift(kept, drift, subtract=drift_settings["subtract"])
    kept = kept.sort_values(["frame", "particle"], kind="stable").reset_index(drop=True)
    summary = trajectory_summary(kept, pixel_size=pixel_size, frame_interval=frame_interval,
                                 fit_lags=settings["diffusion_fit_lags"])
    msd = ensemble_msd(kept, pixel_size=pixel_size, frame_interval=frame_interval,
                       max_lagtime=settings["msd_max_lagtime"])
    fit = fit_power_law(msd)
    timings["total_s"] = time.perf_counter() - start
    stats = {
        "n_detections": len(detections),
        "n_frames": len(frames),
        "n_trajectories_linked": n_linked,
        "min_length": int(settings["min_length"]),
        "n_trajectories_after_min_length": n_long,
        "n_trajectories": n_selected,
        "n_tracked_detections": len(kept),
        "oversize_subnetworks": [vars(e) for e in events],
        "msd_power_law": fit,
        "pixel_size": float(pixel_size),
        "frame_interval": float(frame_interval),
        "timings": timings,
    }
    return TrackingResult(kept, drift, summary, msd, stats)


# --------------------------------------------------------------------------- CLI


def movie_units(movie_zarr: str | Path | None) -> tuple[float, str, float]:
    """(pixel_size, pixel_unit, frame_interval in s) from a movie store's attributes.

    Missing values fall back to 1 px and 1 s per frame (with a warning), so a movie without
    calibration still tracks, with MSDs in px^2.
    """
    if movie_zarr is None:
        logger.warning("no movie store given: MSD and diffusion are in px and frames")
        return 1.0, "px", 1.0
    from .io import open_zarr

    ds = open_zarr(movie_zarr, what="movie store")
    attrs = ds.attrs

    def number(name: str) -> float | None:
        value = attrs.get(name)
        if value in (None, ""):
            return None
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{movie_zarr}: attribute {name!r} is {value!r}; expected a positive number") from None
        if not np.isfinite(value) or value <= 0:
            raise InputError(f"{movie_zarr}: attribute {name!r} is {value!r}; expected a positive number")
        return value

    pixel_size, frame_interval = number("pixel_size"), number("frame_interval")
    unit = attrs.get("pixel_unit") or "px"
    if pixel_size is None:
        logger.warning("%s: no pixel_size; distances are in px", movie_zarr)
        pixel_size, unit = 1.0, "px"
    if frame_interval is None:
        logger.warning("%s: no frame_interval; times are in frames", movie_zarr)
        frame_interval = 1.0
    return pixel_size, str(unit), frame_interval


def configure_track_parser(parser: argparse.ArgumentParser) -> None:
    from .config import add_settings_arguments

    parser.add_argument("detections", help="detections table (Parquet): frame, x, y (px), ...")
    parser.add_argument("--movie-zarr", metavar="STORE",
                        help="the movie's movie.zarr, for pixel_size, pixel_unit and frame_interval")
    parser.add_argument("--tracks", required=True, metavar="FILE",
                        help="output: tracked detections with 'particle' (Parquet)")
    parser.add_argument("--drift", required=True, metavar="FILE", help="output: drift per frame (Parquet)")
    parser.add_argument("--trajectories", required=True, metavar="FILE",
                        help="output: one row per trajectory (Parquet)")
    parser.add_argument("--msd", required=True, metavar="FILE",
                        help="output: ensemble MSD with its power-law fit in the metadata (Parquet)")
    add_settings_arguments(parser, "track")


def run_track(args: argparse.Namespace) -> int:
    from .config import settings_from_args
    from .io import read_table, write_table
    from .provenance import provenance_attrs

    settings = settings_from_args(args, "track")
    pixel_size, unit, frame_interval = movie_units(args.movie_zarr)
    detections = read_table(args.detections, required=REQUIRED_COLUMNS, what="detections table")
    if detections.empty:
        logger.warning("%s: no detections; writing empty outputs", args.detections)
    result = track(detections, settings, pixel_size=pixel_size, frame_interval=frame_interval,
                   source=str(args.detections))
    settings = {**settings, "min_length": result.stats["min_length"]}  # provenance records the value used
    inputs = {"detections": str(args.detections)}
    if args.movie_zarr:
        inputs["movie"] = str(args.movie_zarr)
    units = {"x": "px", "y": "px", "x_corrected": "px", "y_corrected": "px", "duration": "s",
             "diffusion": f"{unit}^2/s", "msd_lag1": f"{unit}^2", "lag_time": "s", "msd": f"{unit}^2",
             "pixel_unit": unit}
    base = provenance_attrs(settings=settings, seed=settings["seed"], inputs=inputs, stage="track")
    meta = {**base, "tracking": result.stats, "units": units}
    write_table(result.tracks, args.tracks, metadata=meta)
    write_table(result.drift, args.drift, metadata={**base, "units": {"x": "px", "y": "px"},
                                                    "subtracted": settings["drift"]["subtract"]})
    write_table(result.trajectories, args.trajectories, metadata={**base, "units": units})
    write_table(result.msd, args.msd, metadata={**base, "units": units,
                                                "power_law": {**result.stats["msd_power_law"],
                                                              "A_unit": f"{unit}^2/s^n"}})
    s = result.stats
    logger.info(
        "%d detections in %d frames -> %d trajectories linked, %d with >= %d detections, %d after selection; "
        "ensemble MSD n = %.3f, A = %.4g %s^2/s; %d oversize subnetwork(s); %.2f s",
        s["n_detections"], s["n_frames"], s["n_trajectories_linked"], s["n_trajectories_after_min_length"],
        settings["min_length"], s["n_trajectories"], s["msd_power_law"]["n"], s["msd_power_law"]["A"], unit,
        len(s["oversize_subnetworks"]), s["timings"]["total_s"],
    )
    return 0


COMMANDS = {"track": (configure_track_parser, run_track)}

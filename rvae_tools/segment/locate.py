"""The classical baseline: trackpy.locate (band-pass, grey dilation, centroid refinement)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from .postprocess import DETECTION_COLUMNS, empty_detections

log = logging.getLogger(__name__)


def _as_integer_if_exact(frame: np.ndarray) -> np.ndarray:
    """Give trackpy integer-valued frames as uint8/uint16, NaNs replaced by the median.

    trackpy rescales float images before measuring mass, so ``minmass`` would mean
    something else than in trackpy's documentation for the same 8-bit movie read as float32
    (on bulk_water frame 299: 477 instead of the published 624 features).
    """
    if not np.issubdtype(frame.dtype, np.floating):
        return frame
    if np.isnan(frame).any():
        frame = np.where(np.isnan(frame), np.nanmedian(frame), frame)
    lo, hi = float(frame.min()), float(frame.max())
    if lo >= 0 and hi <= 65535 and np.array_equal(frame, np.round(frame)):
        return frame.astype(np.uint8 if hi <= 255 else np.uint16)
    return frame


def locate_frame(frame: np.ndarray, settings: dict[str, Any], *, invert: bool, index: int = 0) -> pd.DataFrame:
    """Detect round blobs in one frame with ``trackpy.locate``.

    Parameters
    ----------
    frame : ndarray (y, x)
        Raw intensities; NaNs are replaced by the frame's median. Integer-valued frames
        are passed to trackpy as 8- or 16-bit integers so ``minmass`` has trackpy's meaning.
    settings : dict
        ``segment.locate``: ``diameter`` (odd, px), ``minmass`` (integrated brightness after
        band-pass, trackpy units), ``separation`` (px, null = diameter + 1), ``percentile``,
        ``maxsize`` (px, null = none), ``noise_size`` (px), ``smoothing_size`` (px, null =
        diameter), ``threshold`` (null = trackpy's default).
    invert : bool
        Particles darker than the background.
    index : int
        Frame index written into the table.

    Returns
    -------
    DataFrame
        The detections contract (``area`` = 2 pi size^2, the area of the uniform disc with
        trackpy's radius of gyration ``size``; ``orientation`` NaN; ``eccentricity`` = trackpy's
        ``ecc``; ``score`` = ``mass``; ``cls`` 0) plus trackpy's ``mass``, ``size``, ``signal``,
        ``raw_mass`` and ``ep``.
    """
    import trackpy

    frame = _as_integer_if_exact(np.asarray(frame))
    kwargs = {
        "minmass": settings["minmass"], "invert": invert, "separation": settings["separation"],
        "percentile": settings["percentile"], "maxsize": settings["maxsize"],
        "noise_size": settings["noise_size"], "smoothing_size": settings["smoothing_size"],
        "threshold": settings["threshold"],
    }
    trackpy.quiet()
    found = trackpy.locate(frame, settings["diameter"], **kwargs)
    if len(found) == 0:
        return empty_detections()
    out = pd.DataFrame({
        "frame": np.full(len(found), index, dtype="int64"),
        "x": found["x"].to_numpy(float), "y": found["y"].to_numpy(float),
        "score": found["mass"].to_numpy(float),
        "area": 2 * np.pi * found["size"].to_numpy(float) ** 2,
        "orientation": np.full(len(found), np.nan),
        "eccentricity": found["ecc"].to_numpy(float),
        "cls": np.zeros(len(found), dtype="int64"),
    })
    for col in ("mass", "size", "signal", "raw_mass", "ep"):
        if col in found:
            out[col] = found[col].to_numpy(float)
    return out[DETECTION_COLUMNS + [c for c in out.columns if c not in DETECTION_COLUMNS]]

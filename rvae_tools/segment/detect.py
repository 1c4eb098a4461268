"""Detect particles in every frame of a movie: U-Net, the classical detector or ``trackpy.locate``."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .postprocess import blobs_to_detections, empty_detections

log = logging.getLogger(__name__)


class SegmentationWarning(UserWarning):
    """A frame gave no detections because it is blank, constant, all-NaN or empty."""


def _frame_warning(index: int, reason: str) -> None:
    warnings.warn(f"frame {index}: {reason}; no detections", SegmentationWarning, stacklevel=3)


def segment_movie(
    frames,
    settings: dict[str, Any],
    *,
    model=None,
    model_config: dict[str, Any] | None = None,
    device=None,
    keep_probability: bool = False,
    probability_sink: Callable[[int, np.ndarray], None] | None = None,
    detections_sink: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = False,
    first_frame: int = 0,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Detect particles in every frame.

    Parameters
    ----------
    frames : array-like (frame, y, x)
        Raw frames (numpy, xarray or zarr; read one frame at a time).
    settings : dict
        Validated ``segment`` section.
    model : UNet, optional
        Required for ``method: unet`` (``classical`` and ``locate`` need none).
    model_config : dict, optional
        The checkpoint config of ``model`` (normalisation).
    device : torch.device, optional
    keep_probability : bool
        Also return the foreground probability (frame, y, x) float32 (the whole movie in
        memory; for small movies and tests).
    probability_sink : callable(position, probability), optional
        Called with each frame's foreground probability (y, x) float32 as soon as it is
        computed, so a caller can write the map frame by frame and memory stays flat with
        the movie's length (``unet`` only). ``position`` counts the frames given from 0.
    detections_sink : callable(detections), optional
        Called with each frame's detections (a non-empty table) instead of collecting them,
        so memory does not grow with the number of detections; the returned table is then
        empty (:class:`rvae_tools.segment.store.DetectionStore` writes them to Parquet).
    progress : bool
        Progress bar on stderr.
    first_frame : int
        Frame number of ``frames[0]`` in the whole movie, written into the ``frame`` column
        and the warnings, so that a frame range segmented on its own (a workflow chunk)
        gives the rows the whole movie gives for those frames. Every step is per frame
        (normalisation, threshold, blobs), so nothing else depends on the range.

    Returns
    -------
    detections : DataFrame (the detections contract)
    probability : ndarray (frame, y, x) float32 or None
    """
    from ..inspect import resolve_settings

    settings, _ = resolve_settings("segment", settings)  # an 'auto' left by a direct caller: its fallback
    n = len(frames)
    tables: list[pd.DataFrame] = []
    prob_out = None
    pp = settings["postprocess"]
    if settings["method"] in ("locate", "classical"):
        import sys

        from tqdm import tqdm

        from .classical import classical_frame
        from .locate import locate_frame
        method = settings["method"]
        for i in tqdm(range(n), desc=method, unit="frame", file=sys.stderr, disable=not progress, mininterval=2.0):
            frame = np.asarray(frames[i], np.float32) if not isinstance(frames, np.ndarray) else frames[i]
            finite = np.isfinite(frame)
            if not finite.any() or np.nanmax(frame) == np.nanmin(frame):
                _frame_warning(first_frame + i, "blank, constant or all-NaN frame")
                continue
            number = first_frame + i
            if method == "classical":
                found = classical_frame(frame, settings["classical"], invert=bool(settings["invert"]), index=number)
            else:
                found = locate_frame(frame, settings["locate"], invert=bool(settings["invert"]), index=number)
            if method == "locate" and pp["edge"] > 0 and len(found):
                h, w = frame.shape
                e = pp["edge"]
                found = found[(found.x >= e) & (found.x <= w - 1 - e) & (found.y >= e) & (found.y <= h - 1 - e)]
            if len(found) == 0:
                _frame_warning(number, "no particles found")
            _keep(tables, found, detections_sink)
    else:
        from ..device import select_device
        from .infer import predict_frames
        if model is None:
            raise InputError("segment.method: unet needs a trained checkpoint (segment.checkpoint or --checkpoint)")
        device = device or select_device("auto")
        model = model.to(device)
        # `invert` describes the movie being segmented; the network expects bright particles.
        invert = bool(settings["invert"])
        core = (model_config or {}).get("core")
        inf = settings["inference"]
        stream = (np.asarray(frames[i], np.float32) for i in range(n))
        for i, (prob, usable) in enumerate(predict_frames(model, stream, invert=invert, device=device, tile=inf["tile"],
                                                          overlap=inf["overlap"], batch_size=inf["batch_size"],
                                                          progress=progress, total=n)):
            fg = 1.0 - prob[0]
            if keep_probability:
                if prob_out is None:
                    prob_out = np.zeros((n,) + fg.shape, np.float32)
                prob_out[i] = fg
            if probability_sink is not None:
                probability_sink(i, fg)
            if not usable:
                _frame_warning(first_frame + i, "blank, constant or all-NaN frame")
                continue
            found = blobs_to_detections(
                fg, threshold=pp["threshold"], min_area=pp["min_area"], max_area=pp["max_area"], edge=pp["edge"],
                split=pp["split"], split_h=pp["split_h"], split_area=pp["split_area"],
                min_distance=pp["min_distance"], border_fraction=pp["border_fraction"], class_prob=prob[1:], frame=first_frame + i,
            )
            if core:
                # Cores are shrunken footprints; report the footprint's area.
                found["core_area"] = found["area"]
                found["area"] = found["area"] / core**2
            if len(found) == 0:
                _frame_warning(first_frame + i, "no particles found")
            _keep(tables, found, detections_sink)
    if detections_sink is not None:
        return empty_detections(), prob_out
    tables = [t for t in tables if len(t)]
    detections = pd.concat(tables, ignore_index=True) if tables else empty_detections()
    detections["frame"] = detections["frame"].astype("int64")
    detections["cls"] = detections["cls"].astype("int64")
    return detections, prob_out


def _keep(tables: list[pd.DataFrame], found: pd.DataFrame, sink: Callable[[pd.DataFrame], None] | None) -> None:
    """Hand a frame's detections to the sink (streaming) or keep them for the returned table."""
    if sink is None:
        tables.append(found)
    elif len(found):
        sink(found)

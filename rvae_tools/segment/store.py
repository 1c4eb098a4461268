"""Write the segmenter's probability map to Zarr a chunk of frames at a time."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from ..io import atomic_output, json_safe_attrs
from ..ngff import add_ngff


class ProbabilityStore:
    """A ``probability(frame, y, x)`` Zarr store filled frame by frame.

    Frames are buffered ``chunk_frames`` at a time and appended along ``frame``, so memory
    holds one chunk whatever the movie's length. The store is built at a temporary path and
    renamed into place on a clean exit (:func:`rvae_tools.io.atomic_output`); an error
    leaves no store.

    Parameters
    ----------
    path : path-like
        Destination ``.zarr`` directory.
    attrs : dict
        Dataset attributes (units, provenance).
    chunk_frames : int
        Frames held in memory before they are appended.
    """

    def __init__(self, path: str | os.PathLike, attrs: dict[str, Any], chunk_frames: int = 16):
        self.path = Path(path)
        self.attrs = json_safe_attrs(dict(attrs))
        self.chunk_frames = max(int(chunk_frames), 1)
        self._buffer: list[np.ndarray] = []
        self._next = 0
        self._written = 0
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None

    def __enter__(self):
        self._tmp = self._stack.enter_context(atomic_output(self.path))
        return self

    def __call__(self, index: int, probability: np.ndarray) -> None:
        if index != self._next:
            raise ValueError(f"probability of frame {index} arrived after frame {self._next - 1}; frames must come in order")
        self._buffer.append(np.asarray(probability, np.float32))
        self._next += 1
        if len(self._buffer) >= self.chunk_frames:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        ds = xr.Dataset({"probability": (("frame", "y", "x"), np.stack(self._buffer))}, attrs=self.attrs)
        ds["probability"].attrs["description"] = "probability that a pixel lies in a particle core (any class)"
        with warnings.catch_warnings():
            # zarr 3 warns that consolidated metadata is not in the v3 spec yet (see io.write_zarr).
            warnings.simplefilter("ignore", category=UserWarning)
            if self._written == 0:
                chunks = (1,) + ds["probability"].shape[1:]
                ds.to_zarr(self._tmp, mode="w", encoding={"probability": {"chunks": chunks}}, consolidated=True)
            else:
                ds.to_zarr(self._tmp, append_dim="frame", consolidated=True)
        self._written += len(self._buffer)
        self._buffer = []

    @property
    def frames_written(self) -> int:
        """Frames appended so far (buffered frames not included)."""
        return self._written

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self._flush()
            if self._written:
                # OME-Zarr metadata so napari and Fiji open the map with the movie's scale
                add_ngff(self._tmp, "probability", pixel_size=self.attrs.get("pixel_size"),
                         pixel_unit=self.attrs.get("pixel_unit"), frame_interval=self.attrs.get("frame_interval"))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", category=UserWarning)
                    zarr.consolidate_metadata(str(self._tmp))
            return bool(self._stack.__exit__(None, None, None))
        return bool(self._stack.__exit__(exc_type, exc, tb))

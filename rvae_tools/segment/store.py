"""Write the segmenter's outputs a chunk of frames at a time: the probability map (Zarr) and
the detections (Parquet row groups), so memory stays flat with the movie's length."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
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


class DetectionStore:
    """A detections table written to Parquet a row group at a time.

    Tables handed to the store (one per frame) are buffered until ``chunk_rows`` rows, then
    written as one row group; columns are put in the contract's order (``columns`` first, the
    rest as they come) and ``frame``/``cls`` stored as int64. ``metadata`` given to
    :meth:`finish` goes into the file footer under ``rvae_tools`` (as
    :func:`rvae_tools.io.write_table` does; the Arrow schema is not stored, so readers see that
    footer metadata as the schema's). Written at a temporary path and renamed into
    place on a clean exit; an error leaves no table.
    """

    def __init__(self, path: str | os.PathLike, columns: list[str], empty: pd.DataFrame, chunk_rows: int = 65536):
        self.path = Path(path)
        self.columns = list(columns)
        self.empty = empty
        self.chunk_rows = max(int(chunk_rows), 1)
        self.rows = 0
        self._buffer: list[pd.DataFrame] = []
        self._buffered = 0
        self._writer = None
        self._schema = None
        self._metadata: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()
        self._tmp: Path | None = None

    def __enter__(self):
        self._tmp = self._stack.enter_context(atomic_output(self.path))
        return self

    def __call__(self, table: pd.DataFrame) -> None:
        self._buffer.append(table)
        self._buffered += len(table)
        if self._buffered >= self.chunk_rows:
            self._flush()

    def _ordered(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df[self.columns + [c for c in df.columns if c not in self.columns]].reset_index(drop=True)
        for col in ("frame", "cls"):
            df[col] = df[col].astype("int64")
        return df

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffer:
            return
        df = self._ordered(pd.concat(self._buffer, ignore_index=True))
        if self._writer is None:
            self._schema = pa.Schema.from_pandas(df, preserve_index=False)
            self._writer = pq.ParquetWriter(self._tmp, self._schema, store_schema=False)
        self._writer.write_table(pa.Table.from_pandas(df, schema=self._schema, preserve_index=False))
        self.rows += len(df)
        self._buffer, self._buffered = [], 0

    def finish(self, metadata: dict[str, Any]) -> None:
        """Metadata for the footer (call before the block ends)."""
        self._metadata = dict(metadata)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            import pyarrow.parquet as pq

            self._flush()
            if self._writer is None:  # no detections at all: an empty table with the contract's columns
                import pyarrow as pa

                df = self._ordered(self.empty)
                self._schema = pa.Schema.from_pandas(df, preserve_index=False)
                self._writer = pq.ParquetWriter(self._tmp, self._schema, store_schema=False)
                self._writer.write_table(pa.Table.from_pandas(df, schema=self._schema, preserve_index=False))
            if self._metadata:
                self._writer.add_key_value_metadata(
                    {"rvae_tools": json.dumps(self._metadata, sort_keys=True, default=str)})
            self._writer.close()
            return bool(self._stack.__exit__(None, None, None))
        if self._writer is not None:
            self._writer.close()
        return bool(self._stack.__exit__(exc_type, exc, tb))


def _part_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``rvae_tools`` footer of a chunk's detections table (written by ``segment --frames``)."""
    import pyarrow.parquet as pq

    from ..errors import InputError

    try:
        footer = pq.read_metadata(path).metadata or {}
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable Parquet table ({exc}); expected a chunk of segment --frames") from None
    meta = json.loads(footer.get(b"rvae_tools", b"{}"))
    if not isinstance(meta.get("frame_range"), list) or "movie_frames" not in meta:
        raise InputError(f"{path}: no frame_range/movie_frames in its rvae_tools metadata; expected a "
                         "detections table written by rvae-tools segment --frames START STOP")
    return meta


#: Footer keys that must agree between the chunks of one movie (same settings, model, code).
_SAME_IN_EVERY_CHUNK = ("config_hash", "model_checksum", "method", "rvae_tools_version", "git_commit", "movie_frames")


def gather_detections(parts: list[str | os.PathLike], output: str | os.PathLike) -> list[tuple[int, int]]:
    """Join the detections tables of frame chunks into the table the whole movie gives.

    Rows are copied in frame order a row group at a time (memory holds one row group), into
    a :class:`DetectionStore`, as ``segment`` writes them; the footer is the chunks' with
    ``frames`` the whole movie's, ``seconds`` their sum and ``frame_chunks`` the ranges.

    Parameters
    ----------
    parts : list of path-like
        Detections tables of ``rvae-tools segment --frames START STOP``, in any order; their
        frame ranges must cover the movie's frames once, without gap or overlap.
    output : path-like
        The joined table (.parquet), written at a temporary path and renamed into place.

    Returns
    -------
    list of (start, stop)
        The chunks' frame ranges in order (frames start..stop-1).

    Raises
    ------
    InputError
        A part that is not a chunk, chunks of different settings, models or movies, or
        ranges with a gap or an overlap.
    """
    import pyarrow.parquet as pq

    from ..errors import InputError
    from .postprocess import DETECTION_COLUMNS, empty_detections

    metas = sorted(((_part_metadata(p), str(p)) for p in parts), key=lambda item: item[0]["frame_range"][0])
    first, first_path = metas[0]
    for meta, path in metas[1:]:
        for key in _SAME_IN_EVERY_CHUNK:
            if meta.get(key) != first.get(key):
                raise InputError(f"{path}: {key} {meta.get(key)!r} differs from {first_path}'s {first.get(key)!r}; "
                                 "expected chunks of one movie segmented with one config and model")
    chunks = [tuple(int(v) for v in meta["frame_range"]) for meta, _ in metas]
    expected = 0
    for (start, stop), (_, path) in zip(chunks, metas):
        if start != expected:
            raise InputError(f"{path}: frame_range starts at {start}; expected {expected} "
                             f"({'an overlap' if start < expected else 'a gap'} between the chunks)")
        expected = stop
    total = int(first["movie_frames"])
    if expected != total:
        raise InputError(f"--parts: the chunks end at frame {expected}; expected {total} (the movie's frames): a chunk is missing")
    footer = {k: v for k, v in first.items() if k not in ("frame_range", "movie_frames")}
    footer.update(frames=total, seconds=sum(float(m.get("seconds", 0.0)) for m, _ in metas),
                  frame_chunks=[list(c) for c in chunks])
    with DetectionStore(output, DETECTION_COLUMNS, empty_detections()) as table:
        for _, path in metas:
            reader = pq.ParquetFile(path)
            for group in range(reader.num_row_groups):
                df = reader.read_row_group(group).to_pandas()
                if len(df):  # an empty chunk holds only the contract's empty table
                    table(df)
        table.finish(footer)
    return chunks


def gather_probability(parts: list[str | os.PathLike], output: str | os.PathLike,
                       chunks: list[tuple[int, int]]) -> None:
    """Join the probability maps of frame chunks into the map the whole movie gives.

    Copied frame by frame into a :class:`ProbabilityStore` (same chunks, attributes and NGFF
    metadata as ``segment`` writes), with ``frame_chunks`` added to the attributes.

    Parameters
    ----------
    parts : list of path-like
        ``probability.zarr`` stores of ``segment --frames``, in any order.
    output : path-like
        The joined store.
    chunks : list of (start, stop)
        The frame ranges the detections tables covered (:func:`gather_detections`); the
        maps must cover exactly these.
    """
    from ..errors import InputError
    from ..io import open_zarr

    stores = []
    for path in parts:
        attrs = dict(open_zarr(path, required=["probability"], what="probability map").attrs)
        if not isinstance(attrs.get("frame_range"), list):
            raise InputError(f"{path}: no frame_range attribute; expected a probability map of segment --frames")
        stores.append((tuple(int(v) for v in attrs["frame_range"]), str(path), attrs))
    stores.sort()
    if [s[0] for s in stores] != list(chunks):
        raise InputError(f"--probability-parts: frame ranges {[list(s[0]) for s in stores]}; expected "
                         f"{[list(c) for c in chunks]} (those of --parts)")
    attrs = {k: v for k, v in stores[0][2].items() if k not in ("frame_range", "movie_frames", "ome", "multiscales")}
    attrs["frame_chunks"] = [list(c) for c in chunks]
    with ProbabilityStore(output, attrs) as sink:
        position = 0
        for (start, stop), path, _ in stores:
            part = open_zarr(path, required=["probability"], what="probability map")["probability"]
            if part.shape[0] != stop - start:
                raise InputError(f"{path}: {part.shape[0]} frames; expected {stop - start} (frames {start}..{stop - 1})")
            for i in range(part.shape[0]):
                sink(position, part[i].values)
                position += 1

"""Shared I/O: atomic writes and contract-checked reading of Zarr stores and Parquet tables.

Every stage writes its output through :func:`atomic_output` (directly or via
:func:`write_zarr` / :func:`write_table` / :func:`write_json`), so an interrupted run never
leaves a half-written store where the next stage (or Snakemake) would take it for finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .errors import InputError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writes of ``path`` left beside it, and return what was removed.

    :func:`atomic_output` writes ``.NAME.tmp-PID-*`` (and briefly keeps the replaced output
    as ``.NAME.old-PID-*``); a process killed with SIGKILL cannot clean them up. Only those
    whose writer PID is no longer alive on this machine are removed, so a concurrent writer
    of the same path keeps its temporary.
    """
    final = Path(path)
    removed = []
    if not final.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(final.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]+$")
    for candidate in final.parent.iterdir():
        m = pattern.match(candidate.name)
        if m and not _pid_alive(int(m.group(1))):
            _remove(candidate)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it into place when the block succeeds.

    Works for files and directories (Zarr stores). If the block raises (or the process is
    interrupted), the temporary path is removed and any existing ``path`` is left untouched.
    The parent directory is created when missing. Temporaries of earlier writes of ``path``
    that were killed are removed first (:func:`remove_stale_temporaries`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{final}: nothing was written to the temporary path {tmp}")
        if final.exists() or final.is_symlink():
            # A directory cannot be replaced by os.replace; move the old one aside first so
            # that the window without any output is as short as possible.
            old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def scratch_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` for intermediate stores; removed when the block ends.

    Named like :func:`atomic_output`'s temporaries (``.NAME.tmp-PID-*``), so the scratch of a
    killed run is removed by the next write of ``path`` (:func:`remove_stale_temporaries`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    scratch.mkdir()
    try:
        yield scratch
    finally:
        _remove(scratch)


def json_safe_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Zarr attributes must be JSON: turn numpy scalars into Python ones, dicts into JSON text."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, dict):
            value = json.dumps(value, sort_keys=True, default=str)
        elif value is None:
            value = ""
        out[key] = value
    return out


def write_zarr(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    provenance: dict[str, Any] | None = None,
    encoding: dict[str, Any] | None = None,
) -> Path:
    """Write ``ds`` as a Zarr store at ``path`` atomically, with provenance attributes.

    Parameters
    ----------
    ds : xarray.Dataset
        The dataset; its ``attrs`` are kept and ``provenance`` is added to them.
    path : path-like
        Destination store (a directory ending in ``.zarr``).
    provenance : dict, optional
        Output of :func:`rvae_tools.provenance.provenance_attrs`.
    encoding : dict, optional
        Per-variable encoding passed to :meth:`xarray.Dataset.to_zarr` (e.g. chunks).
    """
    ds = ds.copy()
    attrs = dict(ds.attrs)
    if provenance:
        attrs.update(provenance)
    ds.attrs = json_safe_attrs(attrs)
    for name in ds.variables:
        ds[name].attrs = json_safe_attrs(dict(ds[name].attrs))
    with atomic_output(path) as tmp, warnings.catch_warnings():
        # zarr 3 warns that consolidated metadata is not part of the v3 spec yet; we
        # still write it because it makes opening remote/large stores one request.
        warnings.simplefilter("ignore", category=UserWarning)
        ds.to_zarr(tmp, mode="w", encoding=encoding or {}, consolidated=True)
    return Path(path)


def write_zarr_parts(
    parts: Iterable[xr.Dataset],
    path: str | os.PathLike,
    *,
    append_dim: str,
    provenance: dict[str, Any] | None = None,
    encoding: Callable[[xr.Dataset], dict[str, Any]] | None = None,
) -> Path:
    """Write consecutive parts of one dataset along ``append_dim`` as a Zarr store, atomically.

    Only one part is in memory at a time. The first part sets the store's variables, dtypes,
    attributes (with ``provenance`` added) and encoding; each later part adds its slice along
    ``append_dim`` (its variables without that dim are the first part's and are not written
    again). The store is renamed into place after the last part (see :func:`atomic_output`).

    Parameters
    ----------
    parts : iterable of xarray.Dataset
        Slices of the dataset along ``append_dim``, in order; at least one.
    path : path-like
        Destination store (a directory ending in ``.zarr``).
    append_dim : str
        The dimension the parts follow each other along.
    provenance : dict, optional
        Output of :func:`rvae_tools.provenance.provenance_attrs`.
    encoding : callable, optional
        Given the first part, the per-variable encoding for :meth:`xarray.Dataset.to_zarr`.
    """
    import zarr

    with atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # consolidated metadata and zarr 3, as write_zarr
        first, attrs = True, {}
        for part in parts:
            part = part.copy()
            if first:
                attrs = json_safe_attrs({**part.attrs, **(provenance or {})})
            else:
                part = part.drop_vars([name for name in part.variables if append_dim not in part[name].dims])
            # Every part carries the store's attributes: an append rewrites them.
            part.attrs = attrs
            for name in part.variables:
                part[name].attrs = json_safe_attrs(dict(part[name].attrs))
            # Metadata is consolidated once at the end: doing it per part reads every array's again.
            if first:
                part.to_zarr(tmp, mode="w", encoding=encoding(part) if encoding else {}, consolidated=False)
                first = False
            else:
                part.to_zarr(tmp, append_dim=append_dim, consolidated=False)
            del part  # before the next part is made: one part in memory at a time
        if first:
            raise ValueError(f"{path}: no parts to write")
        zarr.consolidate_metadata(tmp)
    return Path(path)


#: ``chunks`` not given: xarray's own default (dask arrays in the store's chunks).
_XARRAY_DEFAULT = object()


def open_zarr(
    path: str | os.PathLike,
    *,
    required: Sequence[str] = (),
    what: str = "store",
    chunks: Any = _XARRAY_DEFAULT,
) -> xr.Dataset:
    """Open a Zarr store lazily and check that it holds the ``required`` variables.

    ``chunks`` is passed to :func:`xarray.open_zarr`: ``None`` gives lazily indexed arrays
    without dask, read only where they are indexed.

    Raises
    ------
    InputError
        When the store is missing, unreadable, or lacks a required variable.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            ds = xr.open_zarr(path) if chunks is _XARRAY_DEFAULT else xr.open_zarr(path, chunks=chunks)
    except Exception as exc:  # noqa: BLE001 - zarr raises many types for a broken store
        raise InputError(f"{path}: cannot be read as a Zarr {what} ({type(exc).__name__}: {exc})") from None
    missing = [name for name in required if name not in ds.variables]
    if missing:
        raise InputError(
            f"{path}: {what} lacks variable(s) {', '.join(missing)}; "
            f"expected {', '.join(required)} (found {', '.join(map(str, ds.variables)) or 'none'})"
        )
    return ds


def write_table(
    df: pd.DataFrame,
    path: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``df`` to Parquet atomically; ``metadata`` is stored as JSON in the file footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged[b"rvae_tools"] = json.dumps(metadata, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(merged)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def read_table(
    path: str | os.PathLike,
    *,
    required: Sequence[str] = (),
    what: str = "table",
) -> pd.DataFrame:
    """Read a Parquet table and check that it has the ``required`` columns.

    Raises
    ------
    InputError
        When the file is missing, unreadable, or lacks a required column.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a broken table
        raise InputError(f"{path}: cannot be read as a Parquet {what} ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: {what} lacks column(s) {', '.join(missing)}; expected {', '.join(required)}"
        )
    return df


def table_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata that :func:`write_table` stored in a Parquet file ({} when none)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"rvae_tools")
    return json.loads(raw) if raw else {}


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Read JSON, raising :class:`InputError` naming the file when missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: {what} is not valid JSON ({exc})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")

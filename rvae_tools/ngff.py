"""OME-Zarr (NGFF 0.5) metadata on the image-like stores, so napari and Fiji know axes and scale.

``movie.zarr`` and ``probability.zarr`` stay xarray stores (``image(frame, y, x)``,
``probability(frame, y, x)``); this module adds, on the same Zarr 3 group:

- the ``ome`` attribute: one multiscale image whose full-resolution level is the xarray
  variable itself (no copy), with axes ``frame`` (type time, unit second), ``y`` and ``x``
  (type space, unit from ``pixel_unit``) and a ``c`` axis (type channel) for a class
  dimension;
- for frames larger than ``pyramid_above`` pixels, lower-resolution levels under
  ``pyramid/1``, ``pyramid/2``, ... (2 x 2 block means of the level above), in a subgroup
  that ``xarray.open_zarr`` does not read.

The time axis is named ``frame`` rather than ``t``: NGFF 0.5 requires an array's
``dimension_names`` to match the axis names, and ``frame`` is the dimension name of the
xarray contract. The metadata is built from ngff-zarr's v0.5 data model and checked with
ngff-zarr's JSON-schema validator before it is written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from .errors import InputError

# pixel_unit spellings -> NGFF (UDUNITS-2) unit names; "px" and unknown units get no unit.
SPACE_UNITS = {
    "m": "meter", "mm": "millimeter", "um": "micrometer", "\u00b5m": "micrometer",
    "micron": "micrometer", "nm": "nanometer", "pm": "picometer", "a": "angstrom",
    "\u00e5": "angstrom", "angstrom": "angstrom",
}
CHANNEL_DIMS = ("c", "class", "channel")
PYRAMID_GROUP = "pyramid"


def space_unit(pixel_unit: str | None) -> str | None:
    """The NGFF unit name of a ``pixel_unit`` (``"nm"`` -> ``"nanometer"``), None for pixels."""
    if not pixel_unit:
        return None
    text = str(pixel_unit).strip()
    if text in ("nanometer", "micrometer", "millimeter", "meter", "picometer", "angstrom"):
        return text
    return SPACE_UNITS.get(text.lower())


def _block_mean(frame: np.ndarray) -> np.ndarray:
    """2 x 2 block mean of a (..., y, x) array; an odd last row/column is dropped."""
    h, w = (frame.shape[-2] // 2) * 2, (frame.shape[-1] // 2) * 2
    f = frame[..., :h, :w].astype(np.float32)
    return 0.25 * (f[..., 0::2, 0::2] + f[..., 1::2, 0::2] + f[..., 0::2, 1::2] + f[..., 1::2, 1::2])


def _axes(dims: tuple[str, ...], pixel_unit: str | None, frame_interval: float | None):
    from ngff_zarr.v04.zarr_metadata import Axis

    axes = []
    for dim in dims:
        if dim == "frame":
            axes.append(Axis(name=dim, type="time", unit="second" if frame_interval else None))
        elif dim in ("y", "x"):
            axes.append(Axis(name=dim, type="space", unit=space_unit(pixel_unit)))
        elif dim in CHANNEL_DIMS:
            axes.append(Axis(name=dim, type="channel"))
        else:
            raise InputError(f"NGFF metadata: dimension {dim!r} is none of frame, {', '.join(CHANNEL_DIMS)}, y, x")
    return axes


def add_ngff(
    store: str | os.PathLike,
    variable: str,
    *,
    pixel_size: float | None = None,
    pixel_unit: str | None = None,
    frame_interval: float | None = None,
    name: str | None = None,
    pyramid_above: int = 2048,
) -> dict[str, Any]:
    """Add NGFF 0.5 multiscale metadata (and a pyramid for large frames) to a Zarr 3 store.

    Call it on the temporary store before it is renamed into place and before its metadata
    is consolidated (the caller consolidates).

    Parameters
    ----------
    store : path-like
        A Zarr 3 group holding ``variable`` with ``dimension_names`` ending in ``(y, x)``.
    variable : str
        The full-resolution array (``"image"``, ``"probability"``).
    pixel_size : float, optional
        Pixel size in ``pixel_unit`` (default 1).
    pixel_unit : str, optional
        ``nm``, ``um``, ...; ``px`` (or None) writes no unit.
    frame_interval : float, optional
        Seconds between frames (default 1, written without a unit when unknown).
    name : str, optional
        The multiscale's name (default ``variable``).
    pyramid_above : int
        Add 2 x 2 downsampled levels while a level's larger side exceeds this many pixels.

    Returns
    -------
    dict
        The ``ome`` attribute written.
    """
    import ngff_zarr
    import zarr
    from ngff_zarr.v04.zarr_metadata import Dataset, MethodMetadata, Scale, Translation
    from ngff_zarr.v05.zarr_metadata import Metadata

    group = zarr.open_group(str(store), mode="r+")
    array = group[variable]
    dims = tuple(array.metadata.dimension_names or ())
    if len(dims) != array.ndim or dims[-2:] != ("y", "x"):
        raise InputError(f"{store}/{variable}: dimension names {dims} do not end in (y, x)")
    step = float(pixel_size) if pixel_size else 1.0
    dt = float(frame_interval) if frame_interval else 1.0

    def transforms(factor: int):
        scale = [dt if d == "frame" else step * factor if d in ("y", "x") else 1.0 for d in dims]
        # a merged pixel's centre sits half a fine pixel less than half a coarse one from 0
        shift = [step * (factor - 1) / 2 if d in ("y", "x") else 0.0 for d in dims]
        out = [Scale(scale=scale)]
        if factor > 1:
            out.append(Translation(translation=shift))
        return out

    datasets = [Dataset(path=variable, coordinateTransformations=transforms(1))]
    level, factor = array, 1
    if max(array.shape[-2:]) > pyramid_above:
        pyramid = group.require_group(PYRAMID_GROUP)
        while max(level.shape[-2:]) > pyramid_above and min(level.shape[-2:]) >= 2:
            factor *= 2
            shape = level.shape[:-2] + (level.shape[-2] // 2, level.shape[-1] // 2)
            coarse = pyramid.create_array(
                str(int(math.log2(factor))), shape=shape, dtype="float32",
                chunks=(1,) * (len(shape) - 2) + shape[-2:], dimension_names=dims, fill_value=np.nan,
                overwrite=True,
            )
            # one frame at a time: memory stays at one full-resolution frame
            for index in np.ndindex(*level.shape[:-2]):
                coarse[index] = _block_mean(np.asarray(level[index]))
            datasets.append(Dataset(path=f"{PYRAMID_GROUP}/{int(math.log2(factor))}",
                                    coordinateTransformations=transforms(factor)))
            level = coarse
    metadata = Metadata(
        axes=_axes(dims, pixel_unit, frame_interval),
        datasets=datasets,
        coordinateTransformations=None,
        name=name or variable,
        type="mean" if len(datasets) > 1 else None,
        metadata=(MethodMetadata(description="2 x 2 block mean of the level above", method="numpy.mean",
                                 version=np.__version__) if len(datasets) > 1 else None),
    )
    entry = _without_none(dataclasses.asdict(metadata))
    entry.pop("extra", None)
    ome = {"version": "0.5", "multiscales": [entry]}
    ngff_zarr.validate({"ome": ome}, version="0.5", model="image")
    group.attrs["ome"] = ome
    return ome


def _without_none(obj: Any) -> Any:
    # NGFF treats an absent field and null alike; the schema rejects nulls for optional fields
    if isinstance(obj, dict):
        return {k: _without_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_without_none(v) for v in obj]
    return obj

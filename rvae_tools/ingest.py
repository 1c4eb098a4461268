"""Ingest: read a movie from disk into the canonical ``movie.zarr`` store.

Readers
-------
``tiff``
    A multi-page TIFF (``.tif``/``.tiff``; ImageJ hyperstacks, OME-TIFF and tifffile's own
    shaped files included). Every axis other than Y, X, samples (S) and channels (C) counts as
    a frame axis, in file order. ImageJ / OME pixel size and frame interval are read when
    present, and a ``simulation.json`` beside the TIFF (written by ``rvae-tools simulate``)
    supplies ``pixel_size``, ``pixel_unit`` and ``frame_interval``.
``folder``
    A folder of PNG or TIFF frames, one frame per file, in natural order (``frame_2`` before
    ``frame_10``); other files are ignored.
``npy`` / ``npz``
    A NumPy array ``(frame, y, x)``, ``(frame, y, x, channel)``, ``(frame, channel, y, x)``
    or one image ``(y, x)``. ``dataset`` picks the array inside a ``.npz`` (default: the only
    one).
``video``
    ``.mp4``, ``.avi``, ``.mov`` decoded by the ffmpeg binary bundled with imageio-ffmpeg;
    the frame interval is ``1 / fps``.
``zarr``
    A plain Zarr array, or a group (e.g. an xarray store) holding ``image`` or the
    ``dataset`` variable. Dimension names (``frame``/``t``/``time``, ``y``, ``x``,
    ``c``/``channel``) are used when present; otherwise the shape rules of ``npy`` apply.

Processing, in order: pick the channel (colour frames of an image format without a
``channel`` become luminance, ITU-R BT.601 weights 0.299 R + 0.587 G + 0.114 B, alpha
ignored), crop ``[y0, y1, x0, x1]``, convert to float32, check that every value is finite,
invert. Inversion maps ``v`` to ``M - v`` where ``M`` is the largest value the source's
integer type can hold (255 for 8-bit, 65535 for 16-bit, 1 for binary) so the result does not
depend on which frames were kept; for floating-point sources ``M`` is the largest value of
the kept, cropped frames (found in an extra streaming pass). ``M`` is recorded in the
``invert_max`` attribute.

Only the kept frames are read, one at a time: a movie never has to fit in memory (except a
Fortran-ordered array inside a ``.npz``, which NumPy cannot read in pieces).

Output ``movie.zarr`` (Zarr format 3, one chunk per frame): ``image(frame, y, x)`` float32;
coordinate ``frame`` holds the index of each kept frame in the source movie (so a stride
keeps true frame numbers) and ``time`` (s) = ``frame * frame_interval`` when the frame
interval is known. Attributes: ``pixel_size``, ``pixel_unit``, ``frame_interval`` (s);
``defaults`` lists those of the three that are placeholders (1.0, ``"px"``, 1.0) because
neither the options nor the source gave them; ``source``, ``sha256`` (of the source file; of
the frame files' bytes in frame order for a folder; of every file's relative path and bytes
in sorted order for a Zarr store), ``reader``, the processing applied, and provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .config import MOVIE_READER_KEYS, load_config, movie_entry, validate_config
from .errors import InputError
from .io import atomic_output, read_json
from .ngff import add_ngff
from .provenance import file_sha256, provenance_attrs

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff")
FRAME_SUFFIXES = (".png",) + TIFF_SUFFIXES
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov")
#: Reader options accepted by :func:`ingest` (a movie entry's keys other than path/simulate).
OPTION_KEYS = tuple(k for k in MOVIE_READER_KEYS if k not in ("path", "simulate"))
#: Placeholders for units the options and the source leave unknown.
DEFAULT_UNITS = {"pixel_size": 1.0, "pixel_unit": "px", "frame_interval": 1.0}
#: ITU-R BT.601 luma weights (the ones PIL uses for "L").
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_DIM_ROLES = {
    "frame": "f",
    "frames": "f",
    "t": "f",
    "time": "f",
    "z": "f",
    "y": "y",
    "row": "y",
    "rows": "y",
    "x": "x",
    "col": "x",
    "column": "x",
    "columns": "x",
    "c": "c",
    "channel": "c",
    "channels": "c",
    "band": "c",
    "rgb": "c",
    "color": "c",
    "colour": "c",
}


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """An opened movie: raw frames come out as ``(y, x)`` or ``(y, x, channel)`` arrays."""

    path: Path
    reader: str
    n_frames: int
    height: int
    width: int
    n_channels: int  # 0 = grey
    samples: bool  # channels are colour samples of one pixel (RGB, RGBA, grey + alpha)
    dtype: np.dtype
    frames: Callable[[Sequence[int]], Iterator[np.ndarray]]
    checksum: Callable[[], str]
    name: Callable[[int], str] = lambda i: f"frame {i}"
    metadata: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _shape_text(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _guard(path: Path, what: str):
    """Turn a reader library's exception into an InputError naming the file."""

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except InputError:
            raise
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - readers raise many types for damaged files
            message = str(exc).splitlines()[0] if str(exc) else ""
            raise InputError(f"{path}: {what} ({type(exc).__name__}: {message})") from None

    return guard()


def _roles_from_shape(path: Path, shape: tuple[int, ...], channel: int | None) -> str:
    """Axis roles of an array without axis names: f(rame), y, x, c(hannel)."""
    ndim = len(shape)
    if ndim < 2:
        raise InputError(
            f"{path}: array of shape {_shape_text(shape)} is {ndim}-D; expected frames "
            "(frame, y, x), (frame, y, x, channel) or one image (y, x)"
        )
    if ndim == 2:
        return "yx"
    if ndim == 3:
        if shape[2] <= 4 and min(shape[0], shape[1]) > 4:
            if channel is None:
                raise InputError(
                    f"{path}: array of shape {_shape_text(shape)} looks like one colour image "
                    "(y, x, channel); set 'channel' to take one of its channels, or store a movie "
                    "as (frame, y, x)"
                )
            return "yxc"
        return "fyx"
    if ndim == 4:
        if shape[3] <= 4:
            roles = "fyxc"
        elif shape[1] <= 4:
            roles = "fcyx"
        else:
            raise InputError(
                f"{path}: 4-D array of shape {_shape_text(shape)}: cannot tell which axis holds "
                "the channels; expected (frame, y, x, channel) or (frame, channel, y, x) with at "
                "most 4 channels"
            )
        if channel is None and shape[roles.index("c")] > 1:
            raise InputError(
                f"{path}: 4-D array of shape {_shape_text(shape)} has {shape[roles.index('c')]} "
                f"channels (axis {roles.index('c')}); set 'channel' to the one to keep"
            )
        return roles
    raise InputError(
        f"{path}: array of shape {_shape_text(shape)} is {ndim}-D; expected at most 4 axes "
        "(frame, y, x, channel)"
    )


def _roles_from_names(names: Sequence[str] | None, ndim: int) -> str | None:
    if not names or len(names) != ndim or any(n is None for n in names):
        return None
    roles = "".join(_DIM_ROLES.get(str(n).lower(), "?") for n in names)
    if "?" in roles or roles.count("y") != 1 or roles.count("x") != 1 or roles.count("c") > 1:
        return None
    return roles


def _array_source(
    path: Path,
    reader: str,
    array: Any,
    roles: str,
    checksum,
    *,
    frame_getter: Callable[[int], np.ndarray] | None = None,
    samples: bool = False,
    dataset: str | None = None,
    metadata: dict | None = None,
) -> _Source:
    """A source over an array-like indexable per frame (memmap, Zarr array, tifffile memmap).

    ``frame_getter(k)`` may replace indexing for readers that stream along axis 0.
    """
    shape = tuple(int(s) for s in array.shape)
    frame_axes = [i for i, r in enumerate(roles) if r == "f"]
    frame_dims = tuple(shape[i] for i in frame_axes)
    n_frames = int(np.prod(frame_dims)) if frame_axes else 1
    rest = [r for r in roles if r != "f"]
    order = [rest.index("y"), rest.index("x")] + ([rest.index("c")] if "c" in rest else [])
    n_channels = shape[roles.index("c")] if "c" in roles else 0

    def get(k: int) -> np.ndarray:
        if frame_getter is not None:
            raw = frame_getter(k)
        else:
            index: list[Any] = [slice(None)] * len(shape)
            for axis, i in zip(frame_axes, np.unravel_index(k, frame_dims) if frame_axes else ()):
                index[axis] = int(i)
            raw = array[tuple(index)]
        return np.transpose(np.asarray(raw), order)

    def frames(indices: Sequence[int]) -> Iterator[np.ndarray]:
        for k in indices:
            with _guard(path, f"cannot read frame {k}"):
                frame = get(k)
            yield frame

    return _Source(
        path=path,
        reader=reader,
        n_frames=n_frames,
        height=shape[roles.index("y")],
        width=shape[roles.index("x")],
        n_channels=n_channels if n_channels > 1 else 0,
        samples=samples,
        dtype=np.dtype(array.dtype),
        frames=_squeeze_single_channel(frames, n_channels),
        checksum=checksum,
        dataset=dataset,
        metadata=metadata or {},
    )


def _squeeze_single_channel(frames, n_channels):
    if n_channels != 1:
        return frames

    def squeezed(indices):
        for frame in frames(indices):
            yield frame[..., 0]

    return squeezed


def _check_numeric(path: Path, dtype: np.dtype, what: str = "array") -> None:
    if dtype.kind not in "biuf":
        raise InputError(
            f"{path}: {what} has data type {dtype}; expected numbers (integer, float or bool)"
        )


# ----- NumPy


def _open_npy(path: Path, options: dict) -> _Source:
    if options["dataset"] is not None:
        raise InputError(f"{path}: 'dataset' applies to .npz and .zarr inputs only, not .npy")
    with _guard(path, "cannot be read as a NumPy .npy file, damaged or truncated?"):
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    _check_numeric(path, array.dtype)
    roles = _roles_from_shape(path, array.shape, options["channel"])
    return _array_source(path, "npy", array, roles, lambda: file_sha256(path))


def _open_npz(path: Path, options: dict) -> _Source:
    with _guard(path, "cannot be read as a NumPy .npz archive, damaged or truncated?"):
        archive = zipfile.ZipFile(path)
        members = [n for n in archive.namelist() if n.endswith(".npy")]
    names = [n[:-4] for n in members]
    if not names:
        raise InputError(f"{path}: the .npz archive holds no arrays (zero frames)")
    name = options["dataset"]
    if name is None:
        if len(names) > 1:
            raise InputError(
                f"{path}: the .npz archive holds {len(names)} arrays ({', '.join(names)}); set 'dataset' to the one to read"
            )
        name = names[0]
    elif name not in names:
        raise InputError(
            f"{path}: no array {name!r} in the .npz archive (have: {', '.join(names)})"
        )
    member = name + ".npy"

    with _guard(path, f"array {name!r} cannot be read"), archive.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }.get(version)
        if read_header is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = read_header(fh)
        data_start = fh.tell()
    _check_numeric(path, dtype, f"array {name!r}")
    roles = _roles_from_shape(path, shape, options["channel"])
    frame_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    header = SimpleNamespace(shape=shape, dtype=dtype)  # what _array_source needs to know
    whole: list[np.ndarray] = []

    def load_all() -> np.ndarray:
        if not whole:
            log.warning(
                "%s: array %r is stored in Fortran order or as one image; reading it whole",
                path,
                name,
            )
            with archive.open(member) as fh:
                whole.append(np.lib.format.read_array(fh, allow_pickle=False))
        return whole[0]

    state: dict[str, Any] = {"fh": None}

    def frame_getter(k: int) -> np.ndarray:
        if fortran or roles[0] != "f":
            data = load_all()
            return data[k] if roles[0] == "f" else data
        fh = state["fh"]
        offset = data_start + k * frame_bytes
        if fh is None or fh.tell() > offset:
            # a compressed member can only be read forwards; reopen to go back
            if fh is not None:
                fh.close()
            fh = state["fh"] = archive.open(member)
        fh.seek(offset)
        block = fh.read(frame_bytes)
        if len(block) != frame_bytes:
            raise InputError(f"{path}: array {name!r} is truncated: frame {k} is incomplete")
        return np.frombuffer(block, dtype=dtype).reshape(shape[1:])

    return _array_source(
        path, "npz", header, roles, lambda: file_sha256(path), frame_getter=frame_getter, dataset=name
    )


# ----- Zarr


def _zarr_checksum(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(
        (p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
    )
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _open_zarr(path: Path, options: dict) -> _Source:
    import zarr

    with _guard(path, "cannot be read as a Zarr array or group"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        node = zarr.open(str(path), mode="r")
    name = options["dataset"]
    attrs: dict[str, Any] = {}
    if isinstance(node, zarr.Array):
        if name is not None:
            raise InputError(
                f"{path}: is a single Zarr array; 'dataset' ({name!r}) applies to groups only"
            )
        array = node
    else:
        attrs = dict(node.attrs)
        arrays = {key: value for key, value in node.arrays()}
        if name is None:
            if "image" in arrays:
                name = "image"
            elif len(arrays) == 1:
                name = next(iter(arrays))
            else:
                raise InputError(
                    f"{path}: Zarr group has no 'image' array and {len(arrays)} others "
                    f"({', '.join(sorted(arrays)) or 'none'}); set 'dataset' to the one to read"
                )
        if name not in arrays:
            raise InputError(
                f"{path}: no array {name!r} in the Zarr group (have: {', '.join(sorted(arrays)) or 'none'})"
            )
        array = arrays[name]
    _check_numeric(path, np.dtype(array.dtype), f"array {name or ''}".strip())
    names = getattr(array.metadata, "dimension_names", None) or array.attrs.get("_ARRAY_DIMENSIONS")
    roles = _roles_from_names(names, array.ndim)
    if roles is not None:
        if "c" in roles and options["channel"] is None and array.shape[roles.index("c")] > 1:
            raise InputError(
                f"{path}: array {name or ''} has {array.shape[roles.index('c')]} channels "
                f"(dimension {names[roles.index('c')]!r}); set 'channel' to the one to keep"
            )
    else:
        roles = _roles_from_shape(path, tuple(array.shape), options["channel"])
    # a store written by this stage (or by hand with these attributes) carries its units
    defaulted = set(attrs.get("defaults") or [])
    metadata = {k: attrs[k] for k in DEFAULT_UNITS if k in attrs and k not in defaulted}
    return _array_source(
        path, "zarr", array, roles, lambda: _zarr_checksum(path), dataset=name, metadata=metadata
    )


# ----- TIFF


class _TiffLog(logging.Handler):
    """Collects tifffile's complaints: it logs (rather than raises) on a damaged page chain."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tiff_units(tif) -> dict[str, Any]:
    """Pixel size, unit and frame interval from ImageJ or OME metadata, when present."""
    found: dict[str, Any] = {}
    try:
        if tif.is_imagej and tif.imagej_metadata:
            meta = tif.imagej_metadata
            page = tif.pages.first
            tag = page.tags.get("XResolution")
            unit = str(meta.get("unit", "")).strip()
            if tag is not None and unit and unit.lower() not in ("pixel", "pixels", "px"):
                num, den = tag.value
                if num > 0 and den > 0:
                    found["pixel_size"] = den / num
                    found["pixel_unit"] = {
                        "micron": "um",
                        "\u00b5m": "um",
                        "\\u00B5m": "um",
                        "microns": "um",
                    }.get(unit, unit)
            if float(meta.get("finterval", 0) or 0) > 0:
                found["frame_interval"] = float(meta["finterval"])
        elif tif.is_ome and tif.ome_metadata:
            import xml.etree.ElementTree as ET

            pixels = ET.fromstring(tif.ome_metadata).find(".//{*}Pixels")
            if pixels is not None:
                if pixels.get("PhysicalSizeX"):
                    found["pixel_size"] = float(pixels.get("PhysicalSizeX"))
                    unit = pixels.get("PhysicalSizeXUnit", "\u00b5m")
                    found["pixel_unit"] = "um" if unit == "\u00b5m" else unit
                if pixels.get("TimeIncrement"):
                    scale = {"s": 1.0, "ms": 1e-3, "\u00b5s": 1e-6, "min": 60.0, "h": 3600.0}
                    factor = scale.get(pixels.get("TimeIncrementUnit", "s"))
                    if factor is not None and float(pixels.get("TimeIncrement")) > 0:
                        found["frame_interval"] = float(pixels.get("TimeIncrement")) * factor
    except Exception as exc:  # noqa: BLE001 - metadata is a bonus: never fail a readable movie over it
        log.warning("%s: ignoring unreadable ImageJ/OME metadata (%s)", tif.filehandle.path, exc)
    return found


def _open_tiff(path: Path, options: dict, *, single_frame: bool = False) -> _Source:
    import tifffile

    if options.get("dataset") is not None:
        raise InputError(f"{path}: 'dataset' applies to .npz and .zarr inputs only, not TIFF")
    complaints = _TiffLog()
    tlog = logging.getLogger("tifffile")
    # tifffile logs (rather than raises) on a damaged page chain; collect those messages and
    # keep them off stderr, where the CLI's one-line error should be the only thing shown
    tlog.addHandler(complaints)
    propagate, tlog.propagate = tlog.propagate, False
    tif = None
    try:
        with _guard(path, "cannot be read as a TIFF file"):
            tif = tifffile.TiffFile(path)
            len(tif.pages)  # walks the whole page chain: reveals a cut file
            if not tif.series:
                raise InputError(f"{path}: TIFF holds no images (zero frames)")
            series = tif.series[0]
            keyframe = series.keyframe
            size = path.stat().st_size
            for page in series.pages:
                ends = (
                    [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
                    if page is not None
                    else []
                )
                if ends and max(ends) > size:
                    raise InputError(
                        f"{path}: TIFF is truncated: image data end at byte {max(ends)} but the file has {size} bytes"
                    )
        if complaints.messages:
            raise InputError(f"{path}: TIFF is damaged or truncated ({complaints.messages[0]})")
        return _tiff_source(path, tif, series, keyframe, options, single_frame)
    except BaseException:
        if tif is not None:
            tif.close()
        raise
    finally:
        tlog.removeHandler(complaints)
        tlog.propagate = propagate


def _tiff_source(path: Path, tif, series, keyframe, options: dict, single_frame: bool) -> _Source:
    import tifffile

    axes, shape = series.axes, tuple(series.shape)
    page_axes, page_shape = keyframe.axes, tuple(keyframe.shape)
    if "Y" not in axes or "X" not in axes or set(page_axes) - set("YXS"):
        raise InputError(
            f"{path}: TIFF series has axes {axes} of shape {_shape_text(shape)}; expected image planes with Y and X"
        )
    roles = "".join({"Y": "y", "X": "x", "S": "c", "C": "c"}.get(a, "f") for a in axes)
    if roles.count("c") > 1:
        raise InputError(
            f"{path}: TIFF has both colour samples and channels (axes {axes}); not supported"
        )
    n_c = shape[roles.index("c")] if "c" in roles else 0
    samples = "S" in axes
    if n_c > 1 and options["channel"] is None and not (samples and n_c in (2, 3, 4)):
        raise InputError(
            f"{path}: TIFF has {n_c} channels (axis {axes[roles.index('c')]}); set 'channel' to the one to keep"
        )
    metadata = _tiff_units(tif)

    def checksum() -> str:
        return file_sha256(path)

    if single_frame and roles.count("f"):
        raise InputError(
            f"{path}: TIFF holds {int(np.prod([s for s, r in zip(shape, roles) if r == 'f']))} frames; a folder must hold one frame per file"
        )

    if series.dataoffset is not None:
        # uncompressed and contiguous: map the file, so frames are read on demand
        with _guard(path, "cannot map the TIFF image data"):
            array = tifffile.memmap(path, series=0, mode="r")
        tif.close()
        if tuple(array.shape) != shape:
            array = array.reshape(shape)
        return _array_source(
            path, "tiff", array, roles, checksum, samples=samples, metadata=metadata
        )

    if shape[len(shape) - len(page_shape) :] != page_shape:
        raise InputError(
            f"{path}: TIFF series shape {_shape_text(shape)} does not end with its page shape {_shape_text(page_shape)}"
        )
    outer_roles = roles[: len(shape) - len(page_shape)]
    outer_shape = shape[: len(outer_roles)]
    page_roles = roles[len(outer_roles) :]
    f_dims = tuple(s for s, r in zip(outer_shape, outer_roles) if r == "f")
    page_order = [page_roles.index("y"), page_roles.index("x")] + (
        [page_roles.index("c")] if "c" in page_roles else []
    )
    pages = series.pages

    def read_page(i: int) -> np.ndarray:
        return np.transpose(pages[i].asarray(), page_order)

    def frames(indices: Sequence[int]) -> Iterator[np.ndarray]:
        for k in indices:
            f_index = iter(np.unravel_index(k, f_dims) if f_dims else ())
            base = [0 if r == "c" else int(next(f_index)) for r in outer_roles]
            with _guard(path, f"cannot read frame {k}"):
                if "c" in outer_roles:
                    c_axis = outer_roles.index("c")
                    planes = []
                    for c in range(outer_shape[c_axis]):
                        base[c_axis] = c
                        planes.append(read_page(int(np.ravel_multi_index(base, outer_shape))))
                    frame = np.stack(planes, axis=-1)
                else:
                    frame = read_page(
                        int(np.ravel_multi_index(base, outer_shape)) if outer_shape else 0
                    )
            yield frame[..., 0] if frame.ndim == 3 and frame.shape[2] == 1 else frame

    return _Source(
        path=path,
        reader="tiff",
        n_frames=int(np.prod(f_dims)) if f_dims else 1,
        height=shape[roles.index("y")],
        width=shape[roles.index("x")],
        n_channels=n_c if n_c > 1 else 0,
        samples=samples,
        dtype=np.dtype(series.dtype),
        frames=frames,
        checksum=checksum,
        metadata=metadata,
    )


# ----- folder of frames


_PIL_CONVERT = {"P": None, "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
_PIL_CHANNELS = {"LA": 2, "RGB": 3, "RGBA": 4}


def _pil_mode(image) -> str:
    mode = image.mode
    if mode == "P":
        return "RGBA" if "transparency" in image.info else "RGB"
    return _PIL_CONVERT.get(mode) or mode


def _read_png(file: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(file) as image:
        image.load()
        mode = _pil_mode(image)
        if mode != image.mode:
            image = image.convert(mode)
        return np.asarray(image)


def _open_folder(path: Path, options: dict) -> _Source:
    from PIL import Image

    if options["dataset"] is not None:
        raise InputError(
            f"{path}: 'dataset' applies to .npz and .zarr inputs only, not a folder of frames"
        )
    files = sorted(
        (
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in FRAME_SUFFIXES
        ),
        key=lambda p: _natural_key(p.name),
    )
    if not files:
        raise InputError(f"{path}: folder holds no PNG or TIFF frames (zero frames)")

    def describe(file: Path) -> tuple[tuple[int, ...], str]:
        """(height, width[, channels]) and the pixel format, from the header only."""
        if file.suffix.lower() in TIFF_SUFFIXES:
            src = _open_tiff(file, {"channel": options["channel"]}, single_frame=True)
            shape = (src.height, src.width) + ((src.n_channels,) if src.n_channels else ())
            return shape, f"TIFF {src.dtype}"
        with _guard(file, "cannot be read as a PNG image"), Image.open(file) as image:
            mode = _pil_mode(image)
            width, height = image.size
        channels = _PIL_CHANNELS.get(mode, 0)
        return (height, width) + ((channels,) if channels else ()), f"PNG mode {mode}"

    first_shape, first_format = describe(files[0])
    for file in files[1:]:
        shape, fmt = describe(file)
        if shape != first_shape:
            raise InputError(
                f"{file}: frame shape {_shape_text(shape)} differs from {_shape_text(first_shape)} "
                f"of the first frame {files[0].name}"
            )
        if fmt != first_format:
            raise InputError(
                f"{file}: pixel format {fmt} differs from {first_format} of the first frame {files[0].name}"
            )

    def read(file: Path) -> np.ndarray:
        if file.suffix.lower() in TIFF_SUFFIXES:
            return next(
                _open_tiff(file, {"channel": options["channel"]}, single_frame=True).frames([0])
            )
        with _guard(file, "cannot be read as a PNG image, damaged or truncated"):
            return _read_png(file)

    first = read(files[0])

    def frames(indices: Sequence[int]) -> Iterator[np.ndarray]:
        for k in indices:
            frame = read(files[k])
            if frame.shape != first.shape or frame.dtype != first.dtype:
                raise InputError(
                    f"{files[k]}: decoded frame {_shape_text(frame.shape)} {frame.dtype} differs from "
                    f"{_shape_text(first.shape)} {first.dtype} of the first frame {files[0].name}"
                )
            yield frame

    def checksum() -> str:
        digest = hashlib.sha256()
        for file in files:
            with open(file, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
        return digest.hexdigest()

    n_channels = first.shape[2] if first.ndim == 3 else 0
    return _Source(
        path=path,
        reader="folder",
        n_frames=len(files),
        height=first.shape[0],
        width=first.shape[1],
        n_channels=n_channels,
        samples=True,
        dtype=first.dtype,
        frames=frames,
        checksum=checksum,
        name=lambda k: f"frame {k} ({files[k].name})",
    )


# ----- video


def _open_video(path: Path, options: dict) -> _Source:
    import imageio_ffmpeg

    if options["dataset"] is not None:
        raise InputError(f"{path}: 'dataset' applies to .npz and .zarr inputs only, not video")
    with _guard(path, "cannot be decoded as a video, damaged file or unsupported codec?"):
        n_frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        reader.close()
    width, height = (int(v) for v in meta["size"])
    fps = float(meta.get("fps") or 0)
    metadata = {"frame_interval": 1.0 / fps} if fps > 0 else {}

    def frames(indices: Sequence[int]) -> Iterator[np.ndarray]:
        wanted = iter(indices)
        target = next(wanted, None)
        if target is None:
            return
        gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        try:
            with _guard(path, "cannot be decoded as a video"):
                next(gen)
            k = 0
            while target is not None:
                with _guard(path, f"cannot decode frame {k}"):
                    block = next(gen, None)
                if block is None:
                    raise InputError(
                        f"{path}: video ended after {k} frames; expected {n_frames} (truncated file?)"
                    )
                if k == target:
                    yield np.frombuffer(block, dtype=np.uint8).reshape(height, width, 3)
                    target = next(wanted, None)
                k += 1
        finally:
            gen.close()

    return _Source(
        path=path,
        reader="video",
        n_frames=int(n_frames),
        height=height,
        width=width,
        n_channels=3,
        samples=True,
        dtype=np.dtype(np.uint8),
        frames=frames,
        checksum=lambda: file_sha256(path),
        metadata=metadata,
    )


def _open_source(path: Path, options: dict) -> _Source:
    if not path.exists():
        raise InputError(f"{path}: movie not found")
    suffix = path.suffix.lower()
    if path.is_dir():
        if (
            suffix == ".zarr"
            or (path / "zarr.json").exists()
            or (path / ".zarray").exists()
            or (path / ".zgroup").exists()
        ):
            source = _open_zarr(path, options)
        else:
            source = _open_folder(path, options)
    elif suffix in TIFF_SUFFIXES:
        source = _open_tiff(path, options)
    elif suffix == ".npy":
        source = _open_npy(path, options)
    elif suffix == ".npz":
        source = _open_npz(path, options)
    elif suffix in VIDEO_SUFFIXES:
        source = _open_video(path, options)
    else:
        raise InputError(
            f"{path}: unknown movie format {suffix or '(no extension)'}; expected a TIFF, a folder of "
            f"PNG/TIFF frames, .npy/.npz, {'/'.join(VIDEO_SUFFIXES)} or .zarr"
        )
    if source.n_frames == 0 or source.height == 0 or source.width == 0:
        raise InputError(
            f"{path}: movie holds no data (zero frames or empty frames: {source.n_frames} x {source.height} x {source.width})"
        )
    return source


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    source: _Source
    options: dict[str, Any]
    indices: list[int]
    crop: tuple[int, int, int, int]
    channel: int | None  # None: grey, or luminance when luminance is True
    luminance: bool
    units: dict[str, Any]
    defaults: list[str]

    @property
    def shape(self) -> tuple[int, int, int]:
        y0, y1, x0, x1 = self.crop
        return len(self.indices), y1 - y0, x1 - x0


def _validate_options(
    path: str | os.PathLike, options: dict | None, source: str = "options"
) -> dict[str, Any]:
    options = dict(options or {})
    for key in ("path", "simulate"):
        if key in options:
            raise InputError(
                f"{source}: {key!r} is not a reader option (the movie path is the INPUT argument)"
            )
    config = validate_config({"movies": {"movie": {"path": str(path), **options}}}, source=source)
    validated = config["movies"]["movie"]
    extra = sorted(set(validated) - set(OPTION_KEYS) - {"path"})
    if extra:
        raise InputError(
            f"{source}: {', '.join(map(repr, extra))}: not a reader option; expected only: {', '.join(OPTION_KEYS)}"
        )
    return {k: validated[k] for k in OPTION_KEYS}


def _plan(path: str | os.PathLike, options: dict | None, source_name: str = "options") -> _Plan:
    path = Path(path)
    options = _validate_options(path, options, source_name)
    source = _open_source(path, options)
    n = source.n_frames

    frames = options["frames"]
    start, stop, step = frames["start"], frames["stop"], frames["step"]
    if start >= n:
        raise InputError(
            f"{path}: frames.start {start} is outside the movie ({n} frames, 0..{n - 1})"
        )
    if stop is not None and stop > n:
        raise InputError(
            f"{path}: frames.stop {stop} is outside the movie ({n} frames; stop may be at most {n})"
        )
    indices = list(range(start, n if stop is None else stop, step))
    if not indices:
        raise InputError(f"{path}: frames {start}:{stop}:{step} select no frames (zero frames)")

    crop = options["crop"]
    if crop is None:
        crop = (0, source.height, 0, source.width)
    y0, y1, x0, x1 = crop
    if not (y0 < y1 <= source.height and x0 < x1 <= source.width):
        raise InputError(
            f"{path}: crop [y0, y1, x0, x1] = {list(crop)} is outside the {source.height} x {source.width} px "
            "frame or empty; expected 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width"
        )

    channel, luminance = options["channel"], False
    if source.n_channels == 0:
        if channel not in (None, 0):
            raise InputError(
                f"{path}: 'channel' is {channel} but the movie has a single (grey) channel"
            )
        channel = None
    elif channel is not None:
        if channel >= source.n_channels:
            raise InputError(
                f"{path}: 'channel' {channel} does not exist; the movie has {source.n_channels} channels (0..{source.n_channels - 1})"
            )
    elif source.samples and source.n_channels == 2:
        channel = 0
        log.info("%s: grey + alpha frames: keeping the grey channel", path)
    elif source.samples and source.n_channels in (3, 4):
        luminance = True
        log.info(
            "%s: colour frames without 'channel': converting to luminance (0.299 R + 0.587 G + 0.114 B)",
            path,
        )
    else:
        raise InputError(
            f"{path}: the movie has {source.n_channels} channels; set 'channel' to the one to keep"
        )

    units, defaults = {}, []
    sidecar = path.parent / "simulation.json"
    sim = (
        read_json(sidecar, what="simulator metadata")
        if source.reader == "tiff" and sidecar.is_file()
        else {}
    )
    if not isinstance(sim, dict):
        raise InputError(f"{sidecar}: simulator metadata must be a JSON object")
    for key, default in DEFAULT_UNITS.items():
        for value in (options[key], sim.get(key), source.metadata.get(key)):
            if value is not None:
                units[key] = value
                break
        else:
            units[key] = default
            defaults.append(key)
    try:
        units["pixel_size"] = float(units["pixel_size"])
        units["frame_interval"] = float(units["frame_interval"])
        units["pixel_unit"] = str(units["pixel_unit"])
    except (TypeError, ValueError):
        raise InputError(
            f"{path}: pixel size / frame interval from the source are not numbers: {units}"
        ) from None
    if not (units["pixel_size"] > 0 and units["frame_interval"] > 0):
        raise InputError(f"{path}: pixel size and frame interval must be > 0, got {units}")
    if defaults:
        log.info(
            "%s: %s unknown; using placeholder(s) %s",
            path,
            ", ".join(defaults),
            ", ".join(f"{k}={DEFAULT_UNITS[k]!r}" for k in defaults),
        )
    return _Plan(
        source, options, indices, tuple(int(v) for v in crop), channel, luminance, units, defaults
    )


def _raw_to_float(plan: _Plan, raw: np.ndarray, k: int) -> np.ndarray:
    """Channel, crop and float32 conversion of one raw frame, checked for NaN/inf."""
    y0, y1, x0, x1 = plan.crop
    raw = raw[y0:y1, x0:x1]
    if plan.luminance:
        frame = raw[..., :3].astype(np.float32) @ LUMA
    elif plan.channel is not None:
        frame = raw[..., plan.channel].astype(np.float32)
    else:
        frame = raw.astype(np.float32)
    if frame.shape != plan.shape[1:]:
        raise InputError(
            f"{plan.source.path}: {plan.source.name(k)} has shape {_shape_text(raw.shape)}; expected {_shape_text(plan.shape[1:])} like the others"
        )
    if not np.isfinite(frame).all():
        bad = "NaN" if np.isnan(frame).any() else "infinite"
        raise InputError(f"{plan.source.path}: {plan.source.name(k)} contains {bad} values")
    return frame


def _invert_max(plan: _Plan) -> float | None:
    if not plan.options["invert"]:
        return None
    dtype = plan.source.dtype
    if dtype.kind == "b":
        return 1.0
    if dtype.kind in "iu":
        return float(np.iinfo(dtype).max)
    top = -np.inf
    for k, raw in zip(plan.indices, plan.source.frames(plan.indices)):
        top = max(top, float(_raw_to_float(plan, raw, k).max()))
    return top


def _processed(plan: _Plan, invert_max: float | None) -> Iterator[np.ndarray]:
    for k, raw in zip(plan.indices, plan.source.frames(plan.indices)):
        frame = _raw_to_float(plan, raw, k)
        if invert_max is not None:
            frame = np.float32(invert_max) - frame
        yield frame


# --------------------------------------------------------------------------- public API


def read_movie_info(path: str | os.PathLike, **options: Any) -> dict[str, Any]:
    """Describe a movie without reading its pixels.

    Parameters
    ----------
    path : path-like
        Movie file or folder (see the module docstring for the formats).
    **options
        Reader options (``dataset``, ``channel``, ``invert``, ``crop``, ``frames``,
        ``pixel_size``, ``pixel_unit``, ``frame_interval``), validated like a movie entry of
        the config.

    Returns
    -------
    dict
        ``reader``; ``n_frames`` and ``frame_shape`` (height, width in px) of the source;
        ``channels`` (0 = grey); ``dtype`` of the source; ``frames`` (source indices kept),
        ``shape`` (frames, height, width) of the output after range, stride and crop;
        ``pixel_size`` (in ``pixel_unit``), ``pixel_unit``, ``frame_interval`` (s) and
        ``defaults`` (which of those three are placeholders); ``dataset`` where relevant.

    Raises
    ------
    InputError
        The file is missing or unreadable, or an option does not fit the movie.
    """
    plan = _plan(path, options)
    src = plan.source
    return {
        "reader": src.reader,
        "source": str(src.path),
        "dataset": src.dataset,
        "n_frames": src.n_frames,
        "frame_shape": (src.height, src.width),
        "channels": src.n_channels,
        "dtype": str(src.dtype),
        "frames": list(plan.indices),
        "shape": plan.shape,
        **plan.units,
        "defaults": list(plan.defaults),
    }


def iter_frames(path: str | os.PathLike, **options: Any) -> Iterator[np.ndarray]:
    """Yield the processed frames of a movie one at a time.

    Options are checked when this function is called; pixel problems (a damaged frame, NaN or
    infinite values) are raised when the frame is reached.

    Parameters
    ----------
    path : path-like
        Movie file or folder.
    **options
        Reader options, as for :func:`read_movie_info`.

    Yields
    ------
    numpy.ndarray
        One ``(height, width)`` float32 frame (intensity in the source's units, after channel
        selection, crop and inversion) per kept frame, in order.
    """
    plan = _plan(path, options)
    # a float source needs one pass for its maximum before inverted frames can be produced
    invert_max = _invert_max(plan)
    return _processed(plan, invert_max)


def ingest(
    path: str | os.PathLike,
    output: str | os.PathLike,
    options: dict[str, Any] | None = None,
    *,
    options_source: str = "options",
) -> Path:
    """Read a movie and write ``movie.zarr`` frame by frame.

    Parameters
    ----------
    path : path-like
        Movie file or folder (see the module docstring for the formats).
    output : path-like
        Destination Zarr store. Written to a temporary sibling and renamed into place, so bad
        input or an interruption leaves nothing at ``output``.
    options : dict, optional
        Reader options (the keys of a config movie entry other than ``path``/``simulate``).
    options_source : str
        Where the options came from, for error messages.

    Returns
    -------
    pathlib.Path
        ``output``.

    Raises
    ------
    InputError
        Bad input: the message names the file and the problem.
    """
    import zarr

    plan = _plan(path, options, options_source)
    src = plan.source
    n, height, width = plan.shape
    log.info(
        "%s: %s reader, %d source frames of %d x %d px -> %d frames of %d x %d px",
        src.path,
        src.reader,
        src.n_frames,
        src.height,
        src.width,
        n,
        height,
        width,
    )
    sha256 = src.checksum()
    invert_max = _invert_max(plan)
    if plan.luminance:
        colour = "luminance (0.299 R + 0.587 G + 0.114 B)"
    elif plan.channel is not None:
        colour = f"channel {plan.channel}"
    else:
        colour = "grey"
    attrs = {
        **plan.units,
        "defaults": list(plan.defaults),
        "source": str(path),
        "sha256": sha256,
        "reader": src.reader,
        "dataset": src.dataset or "",
        "source_frames": src.n_frames,
        "source_shape": [src.height, src.width],
        "source_dtype": str(src.dtype),
        "colour": colour,
        "crop": list(plan.crop),
        "frames": json.dumps(plan.options["frames"], sort_keys=True),
        "invert": bool(plan.options["invert"]),
        "invert_max": invert_max if invert_max is not None else "",
        **provenance_attrs(settings=plan.options, stage="ingest"),
    }
    frame_index = np.asarray(plan.indices, dtype=np.int64)
    with atomic_output(output) as tmp, warnings.catch_warnings():
        # zarr warns that consolidated metadata is not in the v3 spec yet; xarray reads it
        warnings.simplefilter("ignore", category=UserWarning)
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
        frame = group.create_array(
            "frame",
            shape=(n,),
            dtype="int64",
            chunks=(n,),
            dimension_names=("frame",),
            attributes={"long_name": "frame index in the source movie"},
        )
        frame[:] = frame_index
        coords = ""
        if "frame_interval" not in plan.defaults:
            time = group.create_array(
                "time",
                shape=(n,),
                dtype="float64",
                chunks=(n,),
                dimension_names=("frame",),
                fill_value=np.nan,
                attributes={"units": "s", "long_name": "time since source frame 0"},
            )
            time[:] = frame_index * plan.units["frame_interval"]
            coords = "time"
        image = group.create_array(
            "image",
            shape=(n, height, width),
            dtype="float32",
            chunks=(1, height, width),
            dimension_names=("frame", "y", "x"),
            fill_value=np.nan,
            attributes={
                "long_name": "intensity",
                "units": "source intensity units",
                **({"coordinates": coords} if coords else {}),
            },
        )
        # Frames go to zarr in small blocks: one call per frame costs a thread hand-off each,
        # while a block of at most ~64 MB keeps memory bounded for any movie length.
        batch = int(max(1, min(32, (64 << 20) // (height * width * 4))))
        block = np.empty((batch, height, width), dtype=np.float32)
        written, filled, report = 0, 0, max(10, n // 10)
        for data in _processed(plan, invert_max):
            block[filled] = data
            filled += 1
            if filled == batch:
                image[written : written + filled] = block
                written, filled = written + filled, 0
            if (written + filled) % report == 0:
                log.info("%s: %d / %d frames", src.path, written + filled, n)
        if filled:
            image[written : written + filled] = block[:filled]
            written += filled
        if written != n:
            raise InputError(f"{src.path}: only {written} of {n} frames could be read")
        add_ngff(tmp, "image", pixel_size=plan.units["pixel_size"], pixel_unit=plan.units["pixel_unit"],
                 frame_interval=None if "frame_interval" in plan.defaults else plan.units["frame_interval"],
                 name=Path(str(path)).stem)
        zarr.consolidate_metadata(str(tmp))
    log.info("wrote %s (%d frames, %d x %d px, sha256 %s)", output, n, height, width, sha256[:12])
    return Path(output)


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rvae-tools ingest``."""
    parser.add_argument(
        "input",
        metavar="INPUT",
        help="movie: TIFF, folder of PNG/TIFF frames, .npy/.npz, .mp4/.avi/.mov, or .zarr",
    )
    parser.add_argument(
        "-o", "--output", required=True, metavar="OUTPUT.zarr", help="the movie.zarr store to write"
    )
    parser.add_argument(
        "--options",
        metavar="JSON",
        help="reader options as JSON: " + ", ".join(OPTION_KEYS) + " (overrides --config)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="config file (YAML) holding the movie's reader options"
    )
    parser.add_argument(
        "--movie", metavar="NAME", help="the movie of --config whose reader options are used"
    )


def _options_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    options: dict[str, Any] = {}
    sources = []
    if args.config:
        config = load_config(args.config)
        name = args.movie
        if name is None:
            if len(config["movies"]) != 1:
                raise InputError(
                    f"{args.config}: holds {len(config['movies'])} movies; choose one with --movie"
                )
            name = next(iter(config["movies"]))
        entry = movie_entry(config, name, source=args.config)
        options.update({k: v for k, v in entry.items() if k in OPTION_KEYS})
        sources.append(f"{args.config}: movies.{name}")
    elif args.movie:
        raise InputError("--movie needs --config FILE")
    if args.options:
        try:
            extra = json.loads(args.options)
        except json.JSONDecodeError as exc:
            raise InputError(f"--options: not valid JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise InputError(
                f"--options: expected a JSON object of reader options, got {type(extra).__name__}"
            )
        options.update(extra)
        sources.append("--options")
    return options, " + ".join(sources) or "options"


def run(args: argparse.Namespace) -> int:
    """Run ``rvae-tools ingest``; returns the exit code."""
    options, source = _options_from_args(args)
    ingest(args.input, args.output, options, options_source=source)
    return 0


COMMANDS = {"ingest": (configure_parser, run)}

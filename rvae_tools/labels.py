"""Class labels for windows: read a labels table and match it to the windows of patches stores.

A labels file (CSV or Parquet) has one row per labelled window ``(movie, particle, frame,
class)`` or per labelled trajectory ``(movie, particle, class)`` (every window of the particle
takes the class; a row with an empty frame does the same). ``movie`` may be left out when
there is one movie. Rows are numbered from 1 after the header in error messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

REQUIRED = ("particle", "class")


@dataclass
class WindowIndex:
    """Where the windows of one movie are: its name, and ``particle``/``frame`` of each window (obs)."""

    movie: str
    particle: np.ndarray
    frame: np.ndarray
    frames: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """The labels table at ``path`` with columns movie (or absent), particle, frame (or absent), class, row.

    Raises
    ------
    InputError
        Missing or unreadable file, missing columns, non-integer particle or frame values, empty class.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: labels file not found")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep=None, engine="python")
    except Exception as exc:  # noqa: BLE001 (pandas/pyarrow raise many types for a broken file)
        raise InputError(f"{path}: cannot be read as a CSV or Parquet labels table ({type(exc).__name__}: {exc})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"{path}: labels lack column(s) {', '.join(missing)}; expected (movie, particle, frame, class) "
                         f"or (movie, particle, class), found {', '.join(df.columns) or 'none'}")
    if len(df) == 0:
        raise InputError(f"{path}: labels file has no rows; expected at least one labelled window per class")
    out = pd.DataFrame({"row": np.arange(1, len(df) + 1)})
    if "movie" in df.columns:
        if df["movie"].isna().any():
            raise InputError(f"{path}: row {_first(df['movie'].isna())}: empty movie; expected a movie name")
        out["movie"] = df["movie"].astype(str).str.strip().to_numpy()
    out["particle"] = _integers(df["particle"], path, "particle", allow_missing=False)
    if "frame" in df.columns:
        out["frame"] = _integers(df["frame"], path, "frame", allow_missing=True)
    bad = df["class"].isna() | (df["class"].astype(str).str.strip() == "")
    if bad.any():
        raise InputError(f"{path}: row {_first(bad)}: empty class; expected a class name or number")
    cls = df["class"]
    if pd.api.types.is_float_dtype(cls) and np.all(np.mod(cls.to_numpy(), 1) == 0):
        cls = cls.astype(np.int64)
    out["class"] = cls.to_numpy() if pd.api.types.is_integer_dtype(cls) else cls.astype(str).str.strip().to_numpy()
    return out


def _first(mask: pd.Series) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0]) + 1


def _integers(col: pd.Series, path: Path, name: str, *, allow_missing: bool) -> pd.Series:
    values = pd.to_numeric(col, errors="coerce")
    given = col.notna() & (col.astype(str).str.strip() != "")
    bad = (given & (values.isna() | (np.mod(values.fillna(0), 1) != 0))) | (values < 0)
    if not allow_missing:
        bad |= ~given
    if bad.any():
        r = _first(bad)
        raise InputError(f"{path}: row {r}: {name} {col.iloc[r - 1]!r} is not a non-negative integer; "
                         f"expected the {name} number of the tracks")
    return values.astype("Int64")


def window_labels(labels: pd.DataFrame, stores: list[WindowIndex], *, source: str = "labels",
                  classes: int | None = None, class_names: list | None = None) -> tuple[np.ndarray, list]:
    """Class index of every window of ``stores`` (concatenated in order; -1 = unlabelled).

    Parameters
    ----------
    labels : DataFrame
        From :func:`read_labels`.
    stores : list of WindowIndex
        The windows, one entry per movie, in the order they are trained on.
    source : str
        The labels file (named in errors).
    classes : int, optional
        The model's number of classes; it must equal the number of classes the labels name
        (every class needs a labelled example).
    class_names : list, optional
        The class values, in index order (default: the sorted classes of the labels).

    Returns
    -------
    (ndarray of int64, list)
        Per-window class index, and the class values in index order.
    """
    names_seen = sorted(pd.unique(labels["class"]).tolist(), key=lambda v: (isinstance(v, str), v))
    if class_names is None:
        class_names = names_seen
    else:
        unknown = [v for v in names_seen if v not in class_names]
        if unknown:
            r = int(labels.loc[labels["class"] == unknown[0], "row"].iloc[0])
            raise InputError(f"{source}: row {r}: class {unknown[0]!r} is not one of the model's classes "
                             f"{', '.join(map(str, class_names))}")
    if classes is not None:
        if len(class_names) > classes:
            raise InputError(f"{source}: the labels name {len(class_names)} classes ({', '.join(map(str, class_names))}) "
                             f"but rvae.classes is {classes}; expected at most {classes} (or raise rvae.classes)")
        if len(names_seen) < classes:
            raise InputError(f"{source}: rvae.classes is {classes} but the labels give examples of only "
                             f"{len(names_seen)} class(es) ({', '.join(map(str, names_seen))}); every class needs "
                             "at least one labelled window (label more, or lower rvae.classes)")
    index = {v: i for i, v in enumerate(class_names)}
    movies = [s.movie for s in stores]
    if "movie" in labels.columns:
        bad = ~labels["movie"].isin(movies)
        if bad.any():
            r = _first(bad)
            raise InputError(f"{source}: row {r}: movie {labels['movie'].iloc[r - 1]!r} is not among the movies "
                             f"trained on ({', '.join(movies)})")
        movie_col = labels["movie"].to_numpy()
    elif len(stores) == 1:
        movie_col = np.full(len(labels), movies[0], dtype=object)
    else:
        raise InputError(f"{source}: labels have no movie column but {len(stores)} movies are trained on "
                         f"({', '.join(movies)}); expected columns (movie, particle, frame, class)")
    out = []
    assigned: dict[tuple[int, int], int] = {}
    has_frame = "frame" in labels.columns
    for offset, store in enumerate(stores):
        lab = np.full(len(store.particle), -1, dtype=np.int64)
        rows = labels[movie_col == store.movie]
        if len(rows):
            known_particles = np.unique(store.particle)
            bad = ~rows["particle"].isin(known_particles)
            if bad.any():
                ids = sorted(set(rows.loc[bad, "particle"].astype(int).tolist()))
                first = int(rows.loc[bad, "row"].iloc[0])
                raise InputError(f"{source}: row {first}: unknown particle id(s) {', '.join(map(str, ids[:10]))}"
                                 f"{' ...' if len(ids) > 10 else ''} in movie {store.movie}; expected particle ids "
                                 f"that have windows ({known_particles.min()}..{known_particles.max()})")
            key = store.particle.astype(np.int64) * (1 << 32) + store.frame.astype(np.int64)
            order = np.argsort(key, kind="stable")
            frames_axis = store.frames if store.frames is not None else _frame_axis(store)
            frame_col = rows["frame"].to_numpy() if has_frame else np.full(len(rows), pd.NA, dtype=object)
            for r, p, c, f in zip(rows["row"].to_numpy(), rows["particle"].to_numpy(),
                                  rows["class"].map(index).to_numpy(), frame_col):
                r, p, c = int(r), int(p), int(c)
                if f is pd.NA or pd.isna(f):
                    sel = np.flatnonzero(store.particle == p)
                else:
                    f = int(f)
                    pos = np.searchsorted(key[order], p * (1 << 32) + f)
                    if pos >= len(order) or key[order][pos] != p * (1 << 32) + f:
                        if frames_axis is not None and f not in frames_axis:
                            raise InputError(f"{source}: row {r}: frame {f} does not exist in movie {store.movie}; "
                                             f"expected a frame of {frames_axis.min()}..{frames_axis.max()}")
                        dropped = int(store.attrs.get("n_dropped_edge", 0) or 0)
                        why = (f"it was dropped at the frame edge (windows.edge: drop removed {dropped} windows) "
                               "or the particle is not tracked in that frame") if dropped else \
                            "the particle is not tracked in that frame"
                        raise InputError(f"{source}: row {r}: particle {p} has no window in frame {f} of movie "
                                         f"{store.movie} ({why}); expected a (particle, frame) that has a window")
                    sel = np.array([order[pos]])
                for i in sel:
                    prev = assigned.get((offset, int(i)))
                    if prev is not None and lab[i] != c:
                        raise InputError(f"{source}: row {r}: particle {p} frame {int(store.frame[i])} is labelled "
                                         f"{class_names[c]!r} here but {class_names[lab[i]]!r} in row {prev}; "
                                         "expected one class per window")
                    lab[i] = c
                    assigned[(offset, int(i))] = r
        out.append(lab)
    return np.concatenate(out) if out else np.empty(0, np.int64), list(class_names)


def _frame_axis(store: WindowIndex) -> np.ndarray | None:
    n, first, step = (store.attrs.get(k) for k in ("n_frames", "frame_first", "frame_step"))
    if all(isinstance(v, (int, np.integer)) for v in (n, first, step)) and n > 0 and step > 0:
        return first + step * np.arange(int(n), dtype=np.int64)
    return None


def store_index(path: str | os.PathLike, movie: str | None = None) -> WindowIndex:
    """The :class:`WindowIndex` of a patches.zarr store (movie name: the store's folder name by default)."""
    from .io import open_zarr

    path = Path(path)
    ds = open_zarr(path, required=["window", "particle", "frame"], what="patches store")
    return WindowIndex(movie=movie or path.resolve().parent.name,
                       particle=ds["particle"].values.astype(np.int64), frame=ds["frame"].values.astype(np.int64),
                       attrs=dict(ds.attrs))


#: Image files read from a folder of labelled windows.
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def read_label_images(folder: str | os.PathLike, window_size: tuple[int, int],
                      normalisation: dict[str, Any] | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    """Labelled example windows from ``folder``: one subfolder per class, named by the class, of images.

    Parameters
    ----------
    folder : path
        ``folder/<class>/*.png`` (or .tif, .tiff, .jpg); grey images, or RGB(A) taken as
        luminance 0.299 R + 0.587 G + 0.114 B.
    window_size : (int, int)
        The windows' height and width in pixels; every image must have it.
    normalisation : dict, optional
        The patches store's attrs ``normalize``, ``percentiles``, ``clip``: with ``normalize:
        percentile`` the images are normalised as the windows stage normalises a movie, the
        low and high percentiles of all their pixels mapped to 0 and 1; otherwise kept as read.

    Returns
    -------
    (ndarray (n, wy, wx) float32, list of str, list of str)
        The images, the class (subfolder name) of each, and each one's path (for messages).

    Raises
    ------
    InputError
        Missing folder, no class subfolders, a class without images, an unreadable image, an
        image of another size or shape.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: labels folder not found; expected a folder with one subfolder of window "
                         "images per class")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{folder}: no class subfolders; expected one subfolder per class (its name is the class) "
                         f"holding {', '.join(IMAGE_SUFFIXES)} images of that class's windows")
    images, names, paths = [], [], []
    for sub in classes:
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise InputError(f"{sub}: class {sub.name!r} has no labelled example; expected "
                             f"{', '.join(IMAGE_SUFFIXES)} images in it")
        for path in files:
            img = _read_image(path)
            if img.shape != tuple(window_size):
                raise InputError(f"{path}: image is {img.shape[0]}x{img.shape[1]} pixels; expected the windows' "
                                 f"{window_size[0]}x{window_size[1]} (cut it to the window size)")
            images.append(img)
            names.append(sub.name)
            paths.append(str(path))
    x = np.stack(images).astype(np.float32)
    norm = normalisation or {}
    if norm.get("normalize") == "percentile":
        from .windows import normalise

        lo, hi = np.nanpercentile(x, [float(p) for p in norm.get("percentiles", [1.0, 99.5])])
        if not hi > lo:
            raise InputError(f"{folder}: the labelled images are constant ({lo:g}); expected particle images")
        x = normalise(x, float(lo), float(hi), bool(norm.get("clip", True))).astype(np.float32)
    return x, names, paths


def _read_image(path: Path) -> np.ndarray:
    """One image as a 2-D float array (RGB(A) to luminance)."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                img = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 (image readers raise many types for a broken file)
        raise InputError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    img = np.squeeze(img).astype(np.float64)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3] @ np.array([0.299, 0.587, 0.114])
    if img.ndim != 2:
        raise InputError(f"{path}: image has shape {img.shape}; expected a single grey (or RGB) window")
    return img

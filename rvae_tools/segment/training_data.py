"""Training frames and target masks for the U-Net: the simulator, user annotations or pseudo-labels."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from .postprocess import empty_detections

log = logging.getLogger(__name__)


def _species_dims(metadata: dict[str, Any]) -> tuple[dict[int, tuple[float, float]], list[str]]:
    """cls -> (length, width) px and the species names from simulator metadata."""
    species = metadata.get("species")
    if not species:
        raise InputError("simulator metadata: no 'species' list (length and width per species) to draw masks from")
    if isinstance(species, dict):
        species = [dict(v, name=k) if isinstance(v, dict) else {"name": k} for k, v in species.items()]
    dims, names = {}, []
    for k, sp in enumerate(species):
        length = sp.get("length_px", sp.get("length"))
        width = sp.get("width_px", sp.get("width"))
        if length is None or width is None:
            raise InputError(f"simulator metadata: species {k} lacks 'length'/'width'; expected both in pixels")
        if sp.get("shape") == "triangle":
            # An equilateral triangle's core is a disc; 0.8 * side keeps it inside the
            # inscribed circle (diameter side / sqrt(3)) for any core fraction <= 0.7.
            width = length = 0.8 * float(length)
        dims[k] = (float(length), float(width))
        names.append(str(sp.get("name", f"species{k}")))
    return dims, names


def simulated_training_data(sim_settings: dict[str, Any], train: dict[str, Any], seed: int
                            ) -> tuple[np.ndarray, pd.DataFrame, dict[int, tuple[float, float]], list[str]]:
    """Frames and truth from the project's simulator with a movie's settings and a new seed.

    Returns
    -------
    images : ndarray (frame, y, x) float32
        ``train.frames`` frames spread evenly over the simulated movie (early, disordered
        frames and late, ordered ones alike).
    truth : DataFrame (frame renumbered 0..n-1)
    dims : dict cls -> (length, width) px
    names : list of species names
    """
    from .. import simulate as simulator

    settings = dict(sim_settings)
    settings["seed"] = int(seed)
    sim = simulator.simulate(settings)
    dims, names = _species_dims(sim.metadata)
    n = sim.movie.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(train["frames"], n)).round().astype(int))
    truth = sim.truth[sim.truth["frame"].isin(picks)].copy()
    truth["frame"] = np.searchsorted(picks, truth["frame"].to_numpy())
    return np.asarray(sim.movie[picks], np.float32), truth, dims, names


def _read_array_store(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.exists():
        raise InputError(f"{path}: annotation file not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in names if k in data}
        if path.suffix == ".zarr" or path.is_dir():
            import xarray as xr
            ds = xr.open_zarr(path)
            return {k: ds[k].values for k in names if k in ds}
    except Exception as exc:  # noqa: BLE001 - numpy/zarr raise many types for a broken file
        raise InputError(f"{path}: cannot read annotations ({type(exc).__name__}: {exc})") from None
    raise InputError(f"{path}: annotations must be a .npz or .zarr with 'image' and 'mask' (or centres); got {path.suffix!r}")


def disc_masks(centres: pd.DataFrame, n_frames: int, shape: tuple[int, int], radius: float) -> np.ndarray:
    """Label masks with a disc of ``radius`` px around every centre (``cls`` + 1, or 1)."""
    h, w = shape
    masks = np.zeros((n_frames, h, w), np.uint8)
    cls = centres["cls"].to_numpy(int) if "cls" in centres else np.zeros(len(centres), int)
    r = int(np.ceil(radius))
    for (frame, x, y), k in zip(centres[["frame", "x", "y"]].to_numpy(), cls):
        f = int(frame)
        if not 0 <= f < n_frames:
            continue
        x0, x1, y0, y1 = max(int(x) - r - 1, 0), min(int(x) + r + 2, w), max(int(y) - r - 1, 0), min(int(y) + r + 2, h)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        masks[f, y0:y1, x0:x1][(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = k + 1
    return masks


def annotation_training_data(train: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(images, masks) from ``train.annotations`` (image + mask, or image + ``train.centres``)."""
    path = Path(train["annotations"])
    arrays = _read_array_store(path, ("image", "mask"))
    if "image" not in arrays:
        raise InputError(f"{path}: annotations lack the array 'image' (frame, y, x)")
    images = arrays["image"].astype(np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise InputError(f"{path}: 'image' has shape {images.shape}; expected (frame, y, x) or (y, x)")
    if "mask" in arrays:
        masks = arrays["mask"]
        masks = masks[None] if masks.ndim == 2 else masks
        if masks.shape != images.shape:
            raise InputError(f"{path}: 'mask' has shape {masks.shape}; expected the shape of 'image' {images.shape}")
        if masks.min() < 0 or not np.array_equal(masks, np.round(masks)):
            raise InputError(f"{path}: 'mask' must hold integer labels >= 0 (0 background, k+1 class k)")
        return images, masks.astype(np.uint8)
    if not train.get("centres"):
        raise InputError(f"{path}: annotations have no 'mask'; give segment.train.centres (a CSV or Parquet of frame, x, y)")
    cpath = Path(train["centres"])
    if not cpath.exists():
        raise InputError(f"{cpath}: centres table not found")
    centres = pd.read_csv(cpath) if cpath.suffix == ".csv" else pd.read_parquet(cpath)
    missing = [c for c in ("frame", "x", "y") if c not in centres]
    if missing:
        raise InputError(f"{cpath}: centres table lacks column(s) {', '.join(missing)}; expected frame, x, y")
    return images, disc_masks(centres, len(images), images.shape[1:], train["disc_radius"])


def region_core_masks(detections: pd.DataFrame, n_frames: int, shape: tuple[int, int], core: float) -> np.ndarray:
    """Label masks of elliptical cores of detected regions (the particles' own shapes).

    Each detection with ``length``, ``width`` (px) and ``orientation`` (rad) gets an ellipse
    of ``core`` times its length and width (at least 2 px across) centred on it, labelled
    ``cls + 1``: the same kind of target as the simulator's cores, so touching particles
    stay apart in the prediction.
    """
    h, w = shape
    masks = np.zeros((n_frames, h, w), np.uint8)
    for row in detections.itertuples():
        f = int(row.frame)
        if not 0 <= f < n_frames:
            continue
        a = max(core * float(row.length), 2.0) / 2
        b = max(core * float(row.width), 2.0) / 2
        r = int(np.ceil(max(a, b))) + 1
        x0, x1 = max(int(row.x) - r, 0), min(int(row.x) + r + 2, w)
        y0, y1 = max(int(row.y) - r, 0), min(int(row.y) + r + 2, h)
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        c, s = np.cos(row.orientation), np.sin(row.orientation)
        u = (xx - row.x) * c + (yy - row.y) * s
        v = -(xx - row.x) * s + (yy - row.y) * c
        masks[f, y0:y1, x0:x1][(u / a) ** 2 + (v / b) ** 2 <= 1] = int(getattr(row, "cls", 0)) + 1
    return masks


def pseudo_label_training_data(movie: np.ndarray, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(frames, masks) for self-training: cores of the regions the classical detector finds in the movie.

    ``train.frames`` frames spread evenly over the movie; the masks are
    :func:`region_core_masks` of :func:`rvae_tools.segment.classical.classical_frame` with
    ``train.core``.
    """
    from .classical import classical_frame

    train = settings["train"]
    n = movie.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(train["frames"], n)).round().astype(int))
    frames = np.stack([np.asarray(movie[i], np.float32) for i in picks])
    found = [classical_frame(f, settings["classical"], invert=bool(settings["invert"]), index=k)
             for k, f in enumerate(frames)]
    regions = pd.concat(found, ignore_index=True) if found else empty_detections()
    regions["cls"] = 0
    log.info("pseudo-labels: %d particles (classical detector) in %d frames", len(regions), len(frames))
    return frames, region_core_masks(regions, len(frames), frames.shape[1:], train["core"])

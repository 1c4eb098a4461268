"""Encode: every window of ``patches.zarr`` -> per-trajectory latents in ``latents.zarr``.

The trained rVAE maps each window to an angle, two shifts and ``k`` content variables, each
with a posterior spread. The windows are a flat list of observations (``obs``) tagged with
``(particle, frame)``; the latents are laid out on the grid ``(particle, frame)`` (and
``(particle, frame, latent)``), with NaN where a particle is absent, so a notebook can follow
one trajectory with ``ds.sel(particle=p)`` or average over particles per frame.

Memory is bounded by a chunk of whole trajectories (``rvae.encode_chunk_trajectories``, by
default as many as fill :data:`CHUNK_CELLS` grid cells), not by the whole grid, in four passes:

1. every window is read and encoded in blocks of the windows store's chunk length; the model's
   outputs go to a scratch store on ``obs`` beside the output (:func:`_encode_pass`);
2. chunk by chunk, each trajectory's mean ``z`` and class (:func:`_summary_pass`), from which
   the species are found (:class:`rvae_tools.calibration.LabFrameFit`);
3. chunk by chunk, each window's shape correction and each species' moment sums
   (:func:`_correction_pass`); the lab-frame angle calibration and the spread calibration of
   every species are fitted from them and from a seeded sample of the windows (:func:`_fit_spreads`);
4. chunk by chunk, the calibrated latents appended to the output store (:func:`_final_chunk`),
   which is renamed into place at the end, so killing the command leaves no store behind.

Each chunk's grid is laid out again from the scratch store in every pass (reading it is cheap
next to encoding). Per window only its trajectory and frame, and their grid indices, stay in memory (32 bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .calibration import LabFrameFit, trajectory_means
from .config import add_settings_arguments, settings_from_args
from .errors import InputError
from .io import open_zarr, scratch_path, write_zarr_parts
from .provenance import provenance_attrs
from .rvae.uncertainty import apply_calibration, fit_calibration

log = logging.getLogger(__name__)

#: Per-window outputs of ``RVAE.encode`` on dims (particle, frame), with their units.
SCALARS = {
    "angle": ("rad", "encoded rotation angle of the window (mapped to the lab frame by calibration.lab_frame)"),
    "angle_sd": ("rad", "spread of the angle within its half-circle (calibrated; see attrs uncertainty)"),
    "flip_prob": ("1", "posterior probability that the particle points the other way (angle + pi); 0.5 = its ends look alike"),
    "dx": ("px", "encoded shift along x (columns)"),
    "dy": ("px", "encoded shift along y (rows)"),
    "dx_sd": ("px", "spread of dx (calibrated; see attrs uncertainty)"),
    "dy_sd": ("px", "spread of dy (calibrated; see attrs uncertainty)"),
}
#: Per-window outputs on dims (particle, frame, latent).
VECTORS = {
    "z": ("1", "content latent (posterior mean)"),
    "z_sd": ("1", "posterior spread of the content latent"),
}
#: Outputs of the out-of-plane model (``rvae.model: rvae3d``, see rvae_tools.rvae.rvae3d), kept
#: with their units when the model gives them: the 3D pose and what is derived from it.
POSE_3D = {
    "quaternion": ("1", "3D pose: unit quaternion (w, x, y, z), body -> lab, w >= 0 (lab z = viewing axis)"),
    "quaternion_sd": ("rad", "geodesic spread of the 3D pose posterior about the quaternion (same mirror branch)"),
    "mirror_prob": ("1", ("posterior mass of the mirror pose (a projection cannot tell it apart): 1/2 for a "
                          "body that is its own mirror image, near 0 for a chiral one; NaN where the two "
                          "poses are within two grid cells")),
    "in_plane_angle": ("rad", "angle of the body axis projected onto the image, from +x towards +y"),
    "tilt": ("rad", "angle between the body axis and the image plane (0 = lying flat, pi/2 = end-on)"),
    "tilt_sd": ("rad", "spread of the tilt"),
}
#: In-plane models whose angle and shift spreads come from the likelihood's curvature and are
#: calibrated here: the rVAE and its class variants with a pose (ssvae infers none).
POSE_MODELS = ("rvae", "ssrvae", "jrvae")
PATCH_COORDS = ("particle", "frame", "x", "y")
#: Windows read from the store at once when its chunks are not known.
DEFAULT_BLOCK = 4096


def _window_shape(size: Any) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def check_compatible(
    model: Any, window_shape: tuple[int, int], *, latent_dim: int | None = None,
    model_path: str | Path = "model", patches_path: str | Path = "patches",
) -> None:
    """Raise :class:`InputError` naming both sizes when the model does not fit the windows or config."""
    trained = _window_shape(model.window_size)
    if trained != tuple(window_shape):
        raise InputError(
            f"{model_path}: the model was trained on {trained[0]} x {trained[1]} px windows but {patches_path} "
            f"holds {window_shape[0]} x {window_shape[1]} px windows; retrain the model on these windows "
            f"or cut windows with windows.size: {trained[0]}"
        )
    if latent_dim is not None and int(model.latent_dim) != int(latent_dim):
        raise InputError(
            f"{model_path}: the model has {model.latent_dim} content latent(s) but the config asks for "
            f"rvae.latent_dim: {latent_dim}; retrain the model (or set latent_dim: {model.latent_dim})"
        )


def majority_class(particle: np.ndarray, cls: np.ndarray) -> pd.Series:
    """The most frequent class of each particle along its trajectory (ties: the smallest class)."""
    df = pd.DataFrame({"particle": particle, "cls": cls}).dropna()
    counts = df.groupby(["particle", "cls"], sort=True).size().rename("n").reset_index()
    # stable sort on count only: among equal counts the (sorted) smallest class stays first
    best = counts.sort_values("n", ascending=False, kind="stable").drop_duplicates("particle")
    return best.set_index("particle")["cls"].sort_index()


def _frame_axis(frames: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """Every frame of the movie when the patches know its numbering, so frames without windows stay in time."""
    n, first, step = (attrs.get(key) for key in ("n_frames", "frame_first", "frame_step"))
    if all(isinstance(v, (int, np.integer)) for v in (n, first, step)) and n > 0 and step > 0:
        axis = first + step * np.arange(int(n), dtype=np.int64)
        if np.isin(frames, axis).all():
            return axis
    return np.unique(frames)


def _known(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value) and value > 0


def encode_patches(
    patches_path: str | Path,
    model_path: str | Path,
    output: str | Path,
    *,
    settings: dict[str, Any] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    progress: bool = True,
    model: Any = None,
    chunk_trajectories: int | None = None,
) -> xr.Dataset:
    """Encode every window of ``patches_path`` with the rVAE at ``model_path``; write ``output``.

    Runs in passes (see the module doc) so that memory is bounded by one chunk of
    ``chunk_trajectories`` whole trajectories over every frame, not by the whole
    (particle, frame) grid.

    Parameters
    ----------
    patches_path : path
        ``patches.zarr``: ``window(obs, wy, wx)`` with coords ``particle``, ``frame``, ``x``,
        ``y`` (px) on ``obs``, optionally ``cls``.
    model_path : path
        The checkpoint written by ``rvae-tools train``.
    output : path
        The ``latents.zarr`` to write (atomically).
    settings : dict, optional
        The validated ``rvae`` config section; when given, its ``latent_dim`` must match the
        checkpoint and it is hashed into the provenance.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    batch_size : int, optional
        Windows per forward pass (default: ``encode_batch_size`` of ``settings``, else the model's).
    model : RVAE, optional
        An already loaded model (``model_path`` is then only recorded).
    chunk_trajectories : int, optional
        Trajectories laid out on the grid at once (default: ``encode_chunk_trajectories`` of
        ``settings``, else :func:`trajectories_per_chunk` of the movie's frames). The result does
        not depend on it beyond float rounding of the sums the calibrations are fitted on.

    Returns
    -------
    xarray.Dataset
        The store that was written, opened lazily.
    """
    from tqdm import tqdm

    patches_path, model_path, output = Path(patches_path), Path(model_path), Path(output)
    if batch_size is None and settings is not None:
        batch_size = settings.get("encode_batch_size")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be a positive number of windows, got {batch_size}")
    if chunk_trajectories is None and settings is not None:
        chunk_trajectories = settings.get("encode_chunk_trajectories")
    if chunk_trajectories is not None and chunk_trajectories < 1:
        raise InputError(f"--chunk-trajectories must be a positive number of trajectories, got {chunk_trajectories}")
    patches = open_zarr(patches_path, required=["window", *PATCH_COORDS], what="patches store")
    window = patches["window"]
    if window.ndim != 3 or window.dims[0] != "obs":
        raise InputError(f"{patches_path}: window must have dims (obs, wy, wx); found {window.dims}")
    n_obs = int(window.shape[0])
    if n_obs == 0:
        raise InputError(f"{patches_path}: patches store holds no windows")
    particle = patches["particle"].values.astype(np.int64)
    frame = patches["frame"].values.astype(np.int64)
    # Before the model: bad windows are the store's fault whatever the model (reading is far
    # cheaper than encoding, so the extra pass costs little).
    chunks = window.encoding.get("chunks") or (DEFAULT_BLOCK,)
    for start in range(0, n_obs, int(chunks[0])):
        _read_windows(window, np.arange(start, min(start + int(chunks[0]), n_obs)), patches_path, particle, frame)
    if model is None:
        from .rvae import load_model

        model = load_model(model_path)
    check_compatible(
        model, tuple(window.shape[1:]),
        latent_dim=(settings or {}).get("latent_dim"), model_path=model_path, patches_path=patches_path,
    )
    particles = np.unique(particle)
    frames = _frame_axis(frame, patches.attrs)
    pi = np.searchsorted(particles, particle)
    fi = np.searchsorted(frames, frame)
    if np.unique(pi * frames.size + fi).size != n_obs:
        raise InputError(f"{patches_path}: some (particle, frame) pairs have more than one window")
    layout = Layout(particles, frames, pi, fi, chunk_trajectories or trajectories_per_chunk(frames.size),
                    int(model.latent_dim))

    method = (settings or {}).get("encode_method")
    model_config = getattr(model, "config", {}) or {}
    seed = (settings or {}).get("seed")
    if seed is None:
        seed = model_config.get("seed", patches.attrs.get("seed", 0))
    # The angle-conditional model is given each window's known angle, the segmenter's axis.
    known = model_config.get("condition") == "angle" and model_config.get("model", "rvae") == "rvae"
    if known and "orientation" not in patches.variables:
        raise InputError(f"{patches_path}: no orientation coordinate; the model {model_path} is conditioned on "
                         "each window's known angle (rvae.condition: angle) and reads it from there")
    # Without settings, the checkpoint's own (filled with the schema's default when it predates the key).
    refine = bool((settings if settings is not None else model_config).get("refine_angle", False))
    encode_kwargs = {"batch_size": batch_size, "device": device, "method": method, "refine": refine}
    with scratch_path(output) as scratch:
        bar = tqdm(total=n_obs, unit="win", desc="encode", file=sys.stderr, disable=not progress,
                   mininterval=1.0 if sys.stderr.isatty() else 15.0)
        with bar:
            outputs = _encode_pass(model, window, patches_path, particle, frame, scratch / "windows.zarr",
                                   block=max(int(chunks[0]), batch_size or 0), bar=bar,
                                   orientation=patches["orientation"].values if known else None, **encode_kwargs)
        summary = _summary_pass(layout, outputs, patches, model)
        if summary["missing"]:
            # A baseline without pose latents has no angle or shifts: they stay NaN rather than 0,
            # so nobody mistakes them for measured orientations.
            log.warning("%s: the model gives no %s; stored as NaN", model_path, ", ".join(summary["missing"]))
        fit, corrections = None, None
        if summary["has_angles"]:
            fit = LabFrameFit.from_trajectories(model, settings, summary["zmean"], summary["classes"])
            corrections = _correction_pass(layout, outputs, patches, model, fit, scratch / "corrections.zarr")
            fit.finish()
        else:
            log.info("no angles (a model without pose latents): no species symmetry or lab-frame calibration")
        # After the species are known: each species' windows miss by their own amounts.
        spreads = _fit_spreads(model, window, patches_path, particle, frame, layout, fit, settings, seed,
                               **encode_kwargs)
        attrs = _store_attrs(patches, window, model, model_path, n_obs, method, fit, spreads,
                             refined=_refines(model, method, refine))
        parts = (_final_chunk(layout, chunk, outputs, patches, model, fit, corrections, spreads, attrs)
                 for chunk in layout.chunks())
        write_zarr_parts(parts, output, append_dim="particle", encoding=layout.encoding,
                         provenance=provenance_attrs(
                             settings=settings if settings is not None else model_config, seed=seed,
                             model_checksum=getattr(model, "checksum", None), stage="encode",
                             inputs={"patches": str(patches_path), "model": str(model_path)}))
    log.info("%s: %d windows of %d particles over %d frames encoded (latent size %d) in %d chunk(s) of up to %d "
             "trajectories", output, n_obs, particles.size, frames.size, layout.k, layout.n_chunks, layout.size)
    return open_zarr(output)


# --------------------------------------------------------------------------- chunks of trajectories

#: Grid cells (trajectories x frames) held at once when the chunk size is not given: with every
#: latent, spread and calibration grid about 0.1-0.2 kB a cell, some 100-200 MB.
CHUNK_CELLS = 2**20
#: Trajectories per chunk of the output store's arrays (see :func:`_chunks`).
STORE_PARTICLES = 256


def trajectories_per_chunk(n_frames: int, cells: int = CHUNK_CELLS) -> int:
    """Trajectories laid out at once: as many as fit ``cells`` grid cells over ``n_frames`` frames.

    Whole chunks of the output store (:data:`STORE_PARTICLES` trajectories) when that is more
    than one, so that every chunk is written once.
    """
    n = max(1, cells // max(int(n_frames), 1))
    return n - n % STORE_PARTICLES if n >= STORE_PARTICLES else n


class Layout:
    """Where every window sits on the (particle, frame) grid, and the grid's chunks of trajectories.

    Parameters
    ----------
    particles, frames : ndarray
        The grid's trajectory ids and frame numbers (sorted).
    pi, fi : int ndarray (obs,)
        Each window's trajectory and frame index on the grid.
    size : int
        Trajectories per chunk.
    k : int
        Content latents.
    """

    def __init__(self, particles: np.ndarray, frames: np.ndarray, pi: np.ndarray, fi: np.ndarray, size: int,
                 k: int) -> None:
        self.particles, self.frames, self.pi, self.fi, self.size, self.k = particles, frames, pi, fi, int(size), k
        self.n_chunks = -(-particles.size // self.size)

    def chunks(self) -> Iterator[Chunk]:
        """The chunks in order of trajectory index."""
        for lo in range(0, self.particles.size, self.size):
            hi = min(lo + self.size, self.particles.size)
            rows = np.nonzero((self.pi >= lo) & (self.pi < hi))[0]
            yield Chunk(lo, hi, rows, self.pi[rows] - lo, self.fi[rows])

    def encoding(self, first: xr.Dataset) -> dict[str, Any]:
        """Chunks of the output store's variables on ``particle`` (see :func:`_chunks`), given the first chunk.

        A chunk of trajectories fills whole store chunks (of :data:`STORE_PARTICLES`, or of its own
        size when it is not a multiple of them), so that no append reads back and rewrites a
        store chunk: that would hold several store chunks of every frame at once.
        """
        per = STORE_PARTICLES if self.size % STORE_PARTICLES == 0 else self.size
        return {name: {"chunks": (min(per, self.particles.size), *_chunks(first[name].shape)[1:])}
                for name in first.variables if first[name].dims[:1] == ("particle",)}


class Chunk:
    """A chunk of whole trajectories: grid indices ``lo:hi``, its windows ``rows`` (obs, sorted) and their cells."""

    def __init__(self, lo: int, hi: int, rows: np.ndarray, pi: np.ndarray, fi: np.ndarray) -> None:
        self.lo, self.hi, self.rows, self.cells = lo, hi, rows, (pi, fi)
        self.n = hi - lo


def _encode_pass(model, window, patches_path, particle, frame, store, *, block, bar, orientation=None,
                 **encode_kwargs) -> Any:
    """Pass 1: every window encoded in the store's order; the model's outputs written to ``store`` on ``obs``.

    Returns the opened Zarr group (one array per output kept, see :func:`_kept_outputs`).
    """
    import zarr

    n_obs = int(window.shape[0])
    group = zarr.open_group(store, mode="w")
    for start in range(0, n_obs, block):
        stop = min(start + block, n_obs)
        wins = _read_windows(window, np.arange(start, stop), patches_path, particle, frame)
        out = _encode_windows(model, wins, angles=None if orientation is None else orientation[start:stop],
                              **encode_kwargs)
        for name, value in _kept_outputs(out, stop - start).items():
            if name not in group:
                group.create_array(name, shape=(n_obs, *value.shape[1:]), chunks=(block, *value.shape[1:]),
                                   dtype=value.dtype, fill_value=np.nan)
            group[name][start:stop] = value
        bar.update(stop - start)
    return group


def _kept_outputs(out: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    """The model's outputs for ``n`` windows that the latents keep (floats; others left out)."""
    kept = {}
    for name, value in out.items():
        value = np.asarray(value)
        if name in SCALARS or name in VECTORS or name in ("quaternion", "cls_prob") or (
                value.ndim == 1 and value.shape[0] == n):
            kept[name] = value if np.issubdtype(value.dtype, np.floating) else value.astype(np.float64)
    return kept


def _chunk_dataset(layout: Layout, chunk: Chunk, outputs: Any, patches: xr.Dataset, model: Any) -> xr.Dataset:
    """The latents of one chunk of trajectories on (particle, frame), as encoded (before any calibration)."""
    shape, k = (chunk.n, layout.frames.size), layout.k
    rows, cells = chunk.rows, chunk.cells
    grids = {name: np.full(shape, np.nan, dtype=np.float32) for name in SCALARS}
    grids.update({name: np.full((*shape, k), np.nan, dtype=np.float32) for name in VECTORS})
    extra: dict[str, np.ndarray] = {}
    for name in ("x", "y"):
        grids[name] = np.full(shape, np.nan, dtype=np.float64)
        grids[name][cells] = _obs_values(patches, name, rows)
    for name in outputs.array_keys():
        value = outputs[name].oindex[rows]
        if name in grids:
            grids[name][cells] = value
        elif name == "quaternion":
            extra[name] = np.full((*shape, 4), np.nan, dtype=np.float64)
        elif name == "cls_prob":
            extra[name] = np.full((*shape, value.shape[1]), np.nan, dtype=np.float32)
        else:
            # Extras of the model (e.g. class probabilities) are kept under their own names.
            extra[name] = np.full(shape, np.nan, dtype=np.float32)
        if name in extra:
            extra[name][cells] = value

    dims2, dims3 = ("particle", "frame"), ("particle", "frame", "latent")
    data_vars: dict[str, Any] = {}
    for name, (unit, text) in SCALARS.items():
        data_vars[name] = (dims2, grids[name], {"units": unit, "description": text})
    for name, (unit, text) in VECTORS.items():
        data_vars[name] = (dims3, grids[name], {"units": unit, "description": text})
    data_vars["x"] = (dims2, grids["x"], {"units": "px", "description": "window centre (detection), column"})
    data_vars["y"] = (dims2, grids["y"], {"units": "px", "description": "window centre (detection), row"})
    for name, value in extra.items():
        if name == "quaternion":
            unit, text = POSE_3D[name]
            data_vars[name] = (("particle", "frame", "q"), value, {"units": unit, "description": text})
        elif name in POSE_3D:
            unit, text = POSE_3D[name]
            data_vars[name] = (dims2, value, {"units": unit, "description": text})
        elif name != "cls_prob":  # laid out with the classes below
            data_vars[name] = (dims2, value, {"description": f"{name} from the model's encoder"})

    particles = layout.particles[chunk.lo:chunk.hi]
    frames = layout.frames
    coords: dict[str, Any] = {
        "particle": ("particle", particles, {"description": "trajectory id"}),
        "frame": ("frame", frames, {"description": "frame number"}),
        "latent": ("latent", np.arange(k), {"description": "index of the content latent z"}),
        **({"q": ("q", np.arange(4), {"description": "quaternion component: 0 = w (scalar), 1 = x, 2 = y, 3 = z"})}
           if "quaternion" in extra else {}),
        "track_length": ("particle", np.bincount(cells[0], minlength=chunk.n).astype(np.int64),
                         {"description": "number of frames with a window"}),
    }
    frame_interval = patches.attrs.get("frame_interval")
    if _known(frame_interval):
        coords["time"] = ("frame", frames * float(frame_interval), {"units": "s"})
    if "cls" in patches.variables:
        majority = majority_class(layout.particles[layout.pi[rows]], _obs_values(patches, "cls", rows))
        cls = majority.reindex(particles).to_numpy()
        if cls.dtype == object:
            cls = np.array(["" if pd.isna(c) else str(c) for c in cls], dtype=object)
        coords["cls"] = ("particle", cls, {"description": "majority class along the trajectory"})
    if "cls_prob" in extra:
        from .classify import class_variables

        # The model's classes replace a class carried over from the tracks (kept as cls_input).
        if "cls" in coords:
            coords["cls_input"] = coords.pop("cls")
        class_vars, class_coords = class_variables(extra.pop("cls_prob"), list(model.class_names))
        data_vars.update(class_vars)
        coords.update(class_coords)
    return xr.Dataset(data_vars, coords=coords)


def _obs_values(patches: xr.Dataset, name: str, rows: np.ndarray) -> np.ndarray:
    """A coordinate of the windows store at windows ``rows`` (only the store chunks holding them are read)."""
    var = patches[name].variable
    source = patches.encoding.get("source")
    if source and var.dtype.kind == "f" and not {"scale_factor", "add_offset"} & set(var.encoding):
        import zarr

        # Numbers straight from Zarr: through xarray and dask an index array costs a task graph.
        return np.asarray(zarr.open_array(Path(source) / name, mode="r").oindex[rows], dtype=var.dtype)
    return np.asarray(var[rows].values)


def _moment_grids(patches: xr.Dataset, chunk: Chunk, shape: tuple[int, int]) -> list[np.ndarray | None]:
    """The detections' orientation and eccentricity (when the windows store has them) on a chunk's grid."""
    grids: list[np.ndarray | None] = []
    for name in ("orientation", "eccentricity"):
        if name not in patches.variables:
            grids.append(None)
            continue
        grid = np.full(shape, np.nan)
        grid[chunk.cells] = np.asarray(_obs_values(patches, name, chunk.rows), dtype=np.float64)
        grids.append(grid)
    return grids


def _summary_pass(layout: Layout, outputs: Any, patches: xr.Dataset, model: Any) -> dict[str, Any]:
    """Pass 2: what the species need from every trajectory: its mean z and class, chunk by chunk.

    Returns ``zmean`` (particle, k), ``classes`` (particle,) or None, ``has_angles`` (any
    finite angle) and ``missing`` (outputs NaN everywhere).
    """
    zmeans, classes = [], []
    has_angles, empty = False, dict.fromkeys((*SCALARS, *VECTORS), True)
    for chunk in layout.chunks():
        ds = _chunk_dataset(layout, chunk, outputs, patches, model)
        z = np.asarray(ds["z"].transpose("particle", "frame", "latent").values, dtype=np.float64)
        zmeans.append(trajectory_means(z))
        if "cls" in ds.variables and ds["cls"].dims == ("particle",):
            classes.append(np.asarray(ds["cls"].values))
        has_angles |= bool(np.isfinite(ds["angle"].values).any())
        for name in empty:
            empty[name] &= bool(np.isnan(ds[name].values).all())
        del ds, z  # before the next chunk is laid out: one chunk in memory at a time
    return {"zmean": np.concatenate(zmeans), "classes": np.concatenate(classes) if classes else None,
            "has_angles": has_angles, "missing": [name for name, none in empty.items() if none]}


def _correction_pass(layout: Layout, outputs: Any, patches: xr.Dataset, model: Any, fit: LabFrameFit,
                     store: Path) -> Any:
    """Pass 3: every chunk's shape corrections (kept in ``store``, rad) and moment sums (kept by ``fit``)."""
    import zarr

    shape = (layout.particles.size, layout.frames.size)
    corrections = zarr.open_group(store, mode="w").create_array(
        "correction", shape=shape, chunks=(layout.size, shape[1]), dtype=np.float64, fill_value=np.nan)
    for chunk in layout.chunks():
        ds = _chunk_dataset(layout, chunk, outputs, patches, model)
        raw = np.asarray(ds["angle"].values, dtype=np.float64)
        z = np.asarray(ds["z"].transpose("particle", "frame", "latent").values, dtype=np.float64)
        orientation, eccentricity = _moment_grids(patches, chunk, raw.shape)
        corrections[chunk.lo:chunk.hi] = fit.observe(raw, z, fit.labels[chunk.lo:chunk.hi], orientation,
                                                     eccentricity)
        del ds, raw, z, orientation, eccentricity  # one chunk in memory at a time
    return corrections


def _final_chunk(layout: Layout, chunk: Chunk, outputs: Any, patches: xr.Dataset, model: Any,
                 fit: LabFrameFit | None, corrections: Any, spreads: dict[str, Any] | None,
                 attrs: dict[str, Any]) -> xr.Dataset:
    """Pass 4: one chunk of the store, with lab-frame angles, species and calibrated spreads."""
    ds = _chunk_dataset(layout, chunk, outputs, patches, model)
    if fit is not None:
        ds = fit.apply(ds, fit.labels[chunk.lo:chunk.hi], corrections[chunk.lo:chunk.hi])
    if spreads is not None:
        ds = _apply_spreads(ds, chunk, spreads["of_particle"][chunk.lo:chunk.hi], spreads["fits"])
    ds.attrs = attrs
    return ds


def _store_attrs(patches, window, model, model_path, n_obs, method, fit, spreads, *,
                 refined: bool = False) -> dict[str, Any]:
    """The latents store's attributes (provenance aside)."""
    model_config = getattr(model, "config", {}) or {}
    attrs: dict[str, Any] = {
        key: patches.attrs[key] for key in ("pixel_size", "pixel_unit", "frame_interval") if key in patches.attrs
    }
    attrs.update({
        "window_size": int(window.shape[1]),
        "latent_dim": int(model.latent_dim),
        "n_windows": n_obs,
        "model_path": str(model_path),
        "model_config": json.dumps(model_config, sort_keys=True, default=str),
        "encode_method": method or model_config.get("encode_method", "exact"),
        "refine_angle": bool(refined),
        "uncertainty": ("angle_sd, dx_sd, dy_sd: the model's spread (rotation posterior within the angle's "
                        "half-circle plus the likelihood's curvature at the encoded pose, counting the residual's "
                        "spatial correlation) calibrated as "
                        "sqrt((scale sd)^2 + floor^2), fitted per species on a sample of its windows rotated and "
                        "moved by known amounts (spread_calibration; rvae_tools.rvae.uncertainty); flip_prob: "
                        "posterior mass of the other half-circle, for a species whose ends differ tempered to "
                        "predict how often a window and its rotated copy disagree on the end; z_sd: the "
                        "encoder's variational spread calibrated by the misses of z under the same transforms"),
        "patches_config_hash": patches.attrs.get("config_hash", ""),
        "movie_sha256": patches.attrs.get("movie_sha256", ""),
    })
    if fit is not None:
        attrs.update(fit.attrs())
    if spreads is not None:
        attrs["spread_calibration"] = spreads["attr"]
    return attrs


#: Fewest windows of a species for a calibration of its own (fewer: the pooled calibration).
MIN_SPECIES_WINDOWS = 50
#: Spreads calibrated by :func:`_apply_spreads`.
SPREADS = ("angle_sd", "dx_sd", "dy_sd", "flip_prob", "z_sd")


def _fit_spreads(model, window, patches_path, particle, frame, layout, fit, settings, seed,
                 **encode_kwargs) -> dict[str, Any] | None:
    """Calibrations of ``angle_sd``, ``dx_sd``, ``dy_sd``, ``z_sd`` and ``flip_prob``, per species.

    Each species with at least :data:`MIN_SPECIES_WINDOWS` windows gets a calibration fitted on
    a seeded sample of its own windows (``flip_prob`` too when its symmetry order is odd: its two
    ends differ); windows of other species, or of none, get the one fitted on a sample of all
    windows. None when ``calibration_windows`` is 0 or the model has no pose latents.

    Returns
    -------
    dict or None
        ``fits`` (the pooled fit, then one per calibrated species), ``of_particle`` (int, per
        trajectory: index into the species fits, -1 = the pooled one) and ``attr`` (JSON of
        attr ``spread_calibration``: the pooled fit and ``species``: one per species).
    """
    n_cal = int((settings or {}).get("calibration_windows", 512))
    model_settings = getattr(model, "settings", {})
    if n_cal == 0 or model_settings.get("model", "rvae") not in POSE_MODELS or model_settings.get("condition") == "angle":
        # (The angle-conditional model is given its angles: there is no angle spread to calibrate.)
        return None
    rng = np.random.default_rng(seed)
    n = int(window.shape[0])
    labels = fit.labels[layout.pi] if fit is not None else np.full(n, -1)
    symmetry = [int(e["symmetry"]) for e in fit.table] if fit is not None else []
    names = [e.get("name") for e in fit.table] if fit is not None else []

    # Refined angles follow a copy's shared noise: their calibration gives the copy fresh noise
    # made from each window's residual (rvae_tools.rvae.uncertainty.fit_calibration).
    reconstruct = None
    if _refines(model, encode_kwargs.get("method"), encode_kwargs.get("refine", False)):
        def reconstruct(w):
            return model.reconstruct(w, batch_size=encode_kwargs["batch_size"], device=encode_kwargs["device"])

    def calibrate(rows, flip=False, order=None):
        sel = np.sort(rng.choice(rows, size=min(n_cal, rows.size), replace=False))
        wins = _read_windows(window, sel, patches_path, particle, frame)
        return fit_calibration(lambda w: _encode_windows(model, w, **encode_kwargs), wins, seed=int(seed), flip=flip,
                               reconstruct=reconstruct, order=order)

    pooled = calibrate(np.arange(n))
    of_species = np.full(len(symmetry), -1)
    fits = []
    for k, order in enumerate(symmetry):
        rows = np.nonzero(labels == k)[0]
        if rows.size < MIN_SPECIES_WINDOWS or order == 0:
            continue
        cal = calibrate(rows, flip=int(order) % 2 == 1, order=int(order))
        cal["species"] = names[k] if k < len(names) else k
        of_species[k] = len(fits)
        fits.append(cal)
    of_particle = np.full(layout.particles.size, -1)
    if fit is not None:
        known = fit.labels >= 0
        of_particle[known] = of_species[fit.labels[known]]
    calibrated = np.bincount(of_particle[layout.pi] + 1, minlength=len(fits) + 1)
    for j, cal in enumerate([pooled, *fits]):
        if calibrated[j]:
            log.info("encode: spreads of %s calibrated on %d windows (angle x%.3g + %.3g rad, shift x%.3g + %.3g "
                     "px%s)", "the other windows" if j == 0 else f"species {cal['species']}", cal["n_windows"],
                     cal["angle"]["scale"], cal["angle"]["floor"], cal["shift"]["scale"], cal["shift"]["floor"],
                     f", flip temperature {cal['flip']['temperature']:.3g}" if "flip" in cal else "")
            if cal.get("moment_check", {}).get("worse_than_moments"):
                check = cal["moment_check"]
                log.warning("encode: species %s: its angles disagree with the windows' own principal axes "
                            "(consistency %.2f modulo pi) beyond either's error; angle_sd widened by %.3g rad",
                            cal.get("species"), check["consistency"], check["floor"])
    return {"fits": [pooled, *fits], "of_particle": of_particle,
            "attr": json.dumps({**pooled, "species": fits}, sort_keys=True)}


def _apply_spreads(ds: xr.Dataset, chunk: Chunk, of_particle: np.ndarray, fits: list[dict[str, Any]]) -> xr.Dataset:
    """A chunk's spreads calibrated: each window by its species' fit (``of_particle`` + 1 into ``fits``)."""
    grids = {name: np.array(ds[name].values, copy=True) for name in SPREADS if name in ds}
    rows, cols = chunk.cells
    which = of_particle[rows] + 1
    for j, cal in enumerate(fits):
        sel = which == j
        if not sel.any():
            continue
        raw = {name: grid[rows[sel], cols[sel]] for name, grid in grids.items()}
        for name, value in apply_calibration(raw, cal).items():
            if name in grids:
                grids[name][rows[sel], cols[sel]] = value
    ds = ds.copy()
    for name, grid in grids.items():
        ds[name] = (ds[name].dims, grid, ds[name].attrs)
    return ds


def _takes(model: Any, name: str) -> bool:
    """Whether ``model.encode`` has the keyword ``name``."""
    import inspect

    return name in inspect.signature(model.encode).parameters


def _refines(model: Any, method: str | None, refine: bool) -> bool:
    """Whether ``refine`` refines the angles off the rotation grid (a rotation search that decodes)."""
    model_config = getattr(model, "config", {}) or {}
    return bool(refine and _takes(model, "refine") and getattr(model, "rotations", 1) > 1
                and (method or model_config.get("encode_method", "exact")) != "encoder")


def _encode_windows(model: Any, wins: np.ndarray, *, batch_size, device, method, refine=False,
                    angles: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The model's outputs for one block of windows (``method`` and ``refine`` only for models that take
    them; ``angles``, rad, for the angle-conditional model)."""
    kwargs = {"batch_size": batch_size, "device": device}
    if angles is not None:
        kwargs["angles"] = angles
    for name, value in (("method", method), ("refine", refine)):
        if value is not None and _takes(model, name):
            kwargs[name] = value
    return model.encode(wins, **kwargs)


def _read_windows(window: xr.DataArray, sel: np.ndarray, patches_path: Path, particle: np.ndarray,
                  frame: np.ndarray) -> np.ndarray:
    """Windows ``sel`` (sorted obs indices) as float32; InputError naming them when any holds NaN."""
    lo, hi = int(sel[0]), int(sel[-1]) + 1
    if hi - lo <= 2 * sel.size:
        wins = np.asarray(window[lo:hi].values, dtype=np.float32)[sel - lo]
    else:
        wins = np.asarray(window.isel(obs=sel).values, dtype=np.float32)
    bad = ~np.isfinite(wins).all(axis=(1, 2))
    if bad.any():
        where = sel[bad]
        listed = ", ".join(f"obs {o} (particle {particle[o]}, frame {frame[o]})" for o in where[:5])
        more = f" and {where.size - 5} more in this block" if where.size > 5 else ""
        raise InputError(f"{patches_path}: window holds NaN or infinite pixels at {listed}{more}; "
                         f"expected finite intensities (recut the windows with rvae-tools windows)")
    return wins


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of whole trajectories (up to 256 particles) over up to 1024 frames."""
    caps = (256, 1024, 64)
    return tuple(max(1, min(s, c)) for s, c in zip(shape, caps))


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patches", help="windows store (patches.zarr)")
    parser.add_argument("model", help="rVAE checkpoint (model.pt) from 'rvae-tools train'")
    parser.add_argument("-o", "--output", required=True, help="latents store to write (latents.zarr)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per forward pass (default: rvae.encode_batch_size of the settings, else 256)")
    parser.add_argument("--chunk-trajectories", type=int, default=None,
                        help="trajectories laid out on the (particle, frame) grid at once, which bounds memory "
                             "(default: rvae.encode_chunk_trajectories of the settings, else as many as fill "
                             "2^20 trajectory-frames)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser, "rvae")


def run(args: argparse.Namespace) -> int:
    given = bool(args.settings or args.config)
    settings = settings_from_args(args, "rvae") if given else None
    encode_patches(args.patches, args.model, args.output, settings=settings, device=args.device,
                   batch_size=args.batch_size, progress=not args.no_progress,
                   chunk_trajectories=args.chunk_trajectories)
    return 0


COMMANDS = {"encode": (configure, run)}

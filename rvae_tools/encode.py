"""Encode: every window of ``patches.zarr`` -> per-trajectory latents in ``latents.zarr``.

The trained rVAE maps each window to an angle, two shifts and ``k`` content variables, each
with a posterior spread. The windows are a flat list of observations (``obs``) tagged with
``(particle, frame)``; the latents are laid out on the grid ``(particle, frame)`` (and
``(particle, frame, latent)``), with NaN where a particle is absent, so a notebook can follow
one trajectory with ``ds.sel(particle=p)`` or average over particles per frame.

The windows are read and encoded in blocks of the store's chunk length, so the input never
has to fit in memory; the output grid is held in memory (float32: about
``4 * (8 + 2 k) * particles * frames`` bytes) and written atomically at the end, so killing
the command leaves no store behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .calibration import lab_frame
from .config import add_settings_arguments, settings_from_args
from .errors import InputError
from .io import open_zarr, write_zarr
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
    "mirror_prob": ("1", ("posterior mass of the mirror pose (a projection cannot tell it apart); NaN where "
                          "the two poses are within one grid cell")),
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
) -> xr.Dataset:
    """Encode every window of ``patches_path`` with the rVAE at ``model_path``; write ``output``.

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

    Returns
    -------
    xarray.Dataset
        The dataset that was written.
    """
    from tqdm import tqdm

    patches_path, model_path, output = Path(patches_path), Path(model_path), Path(output)
    if batch_size is None and settings is not None:
        batch_size = settings.get("encode_batch_size")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be a positive number of windows, got {batch_size}")
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
    k = int(model.latent_dim)

    particles = np.unique(particle)
    frames = _frame_axis(frame, patches.attrs)
    pi = np.searchsorted(particles, particle)
    fi = np.searchsorted(frames, frame)
    flat = pi * frames.size + fi
    if np.unique(flat).size != n_obs:
        raise InputError(f"{patches_path}: some (particle, frame) pairs have more than one window")

    shape = (particles.size, frames.size)
    grids = {name: np.full(shape, np.nan, dtype=np.float32) for name in SCALARS}
    grids.update({name: np.full((*shape, k), np.nan, dtype=np.float32) for name in VECTORS})
    extra: dict[str, np.ndarray] = {}
    for name in ("x", "y"):
        grids[name] = np.full(shape, np.nan, dtype=np.float64)
        grids[name][pi, fi] = patches[name].values

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
    orientation = patches["orientation"].values if known else None
    block = max(int(chunks[0]), batch_size or 0)
    bar = tqdm(total=n_obs, unit="win", desc="encode", file=sys.stderr, disable=not progress,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)
    with bar:
        for start in range(0, n_obs, block):
            stop = min(start + block, n_obs)
            wins = _read_windows(window, np.arange(start, stop), patches_path, particle, frame)
            out = _encode_windows(model, wins, batch_size=batch_size, device=device, method=method,
                                  angles=None if orientation is None else orientation[start:stop])
            rows, cols = pi[start:stop], fi[start:stop]
            for name, value in out.items():
                value = np.asarray(value)
                if name in grids:
                    grids[name][rows, cols] = value
                elif name == "quaternion":
                    extra.setdefault(name, np.full((*shape, 4), np.nan, dtype=np.float64))[rows, cols] = value
                elif name == "cls_prob":
                    extra.setdefault(name, np.full((*shape, value.shape[1]), np.nan, dtype=np.float32))[rows, cols] = value
                elif value.ndim == 1 and value.shape[0] == stop - start:
                    # Extras of the model (e.g. class probabilities) are kept under their own names.
                    extra.setdefault(name, np.full(shape, np.nan, dtype=np.float32))[rows, cols] = value
            bar.update(stop - start)

    missing = [name for name in (*SCALARS, *VECTORS) if grids[name].size and np.isnan(grids[name]).all()]
    if missing:
        # A baseline without pose latents has no angle or shifts: they stay NaN rather than 0,
        # so nobody mistakes them for measured orientations.
        log.warning("%s: the model gives no %s; stored as NaN", model_path, ", ".join(missing))

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

    coords: dict[str, Any] = {
        "particle": ("particle", particles, {"description": "trajectory id"}),
        "frame": ("frame", frames, {"description": "frame number"}),
        "latent": ("latent", np.arange(k), {"description": "index of the content latent z"}),
        **({"q": ("q", np.arange(4), {"description": "quaternion component: 0 = w (scalar), 1 = x, 2 = y, 3 = z"})}
           if "quaternion" in extra else {}),
        "track_length": ("particle", np.bincount(pi, minlength=particles.size).astype(np.int64),
                         {"description": "number of frames with a window"}),
    }
    frame_interval = patches.attrs.get("frame_interval")
    if _known(frame_interval):
        coords["time"] = ("frame", frames * float(frame_interval), {"units": "s"})
    if "cls" in patches.variables:
        majority = majority_class(particle, patches["cls"].values)
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

    attrs: dict[str, Any] = {
        key: patches.attrs[key] for key in ("pixel_size", "pixel_unit", "frame_interval") if key in patches.attrs
    }
    attrs.update({
        "window_size": int(window.shape[1]),
        "latent_dim": k,
        "n_windows": n_obs,
        "model_path": str(model_path),
        "model_config": json.dumps(model_config, sort_keys=True, default=str),
        "encode_method": method or model_config.get("encode_method", "exact"),
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
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    ds = lab_frame(ds, model, settings, patches=patches, index=(pi, fi))
    # After the species are known: each species' windows miss by their own amounts.
    ds = _calibrate_spreads(ds, model, window, patches_path, particle, frame, (pi, fi), settings, seed,
                            batch_size=batch_size, device=device, method=method)
    encoding = {name: {"chunks": _chunks(ds[name].shape)} for name in ds.data_vars}
    write_zarr(ds, output, encoding=encoding, provenance=provenance_attrs(
        settings=settings if settings is not None else model_config, seed=seed,
        model_checksum=getattr(model, "checksum", None), stage="encode",
        inputs={"patches": str(patches_path), "model": str(model_path)},
    ))
    log.info("%s: %d windows of %d particles over %d frames encoded (latent size %d)",
             output, n_obs, particles.size, frames.size, k)
    return ds


#: Fewest windows of a species for a calibration of its own (fewer: the pooled calibration).
MIN_SPECIES_WINDOWS = 50


def _calibrate_spreads(ds, model, window, patches_path, particle, frame, index, settings, seed, **encode_kwargs):
    """``ds`` with ``angle_sd``, ``dx_sd``, ``dy_sd``, ``z_sd`` and ``flip_prob`` calibrated per species.

    Each species with at least :data:`MIN_SPECIES_WINDOWS` windows gets a calibration fitted on
    a seeded sample of its own windows (``flip_prob`` too when its symmetry order is odd: its two
    ends differ); windows of other species, or of none, get the one fitted on a sample of all
    windows. Attr ``spread_calibration`` (JSON) holds the pooled fit and ``species``: one per
    species. Unchanged when ``calibration_windows`` is 0 or the model has no pose latents.
    """
    n_cal = int((settings or {}).get("calibration_windows", 512))
    model_settings = getattr(model, "settings", {})
    if n_cal == 0 or model_settings.get("model", "rvae") not in POSE_MODELS or model_settings.get("condition") == "angle":
        # (The angle-conditional model is given its angles: there is no angle spread to calibrate.)
        return ds
    pi, fi = index
    rng = np.random.default_rng(seed)
    n = int(window.shape[0])
    labels = np.asarray(ds["species"].values)[pi] if "species" in ds.coords else np.full(n, -1)
    symmetry = list(ds.attrs.get("species_symmetry", []))
    names = [e.get("name") for e in json.loads(ds.attrs.get("species", "[]"))]

    def fit(rows, flip=False):
        sel = np.sort(rng.choice(rows, size=min(n_cal, rows.size), replace=False))
        wins = _read_windows(window, sel, patches_path, particle, frame)
        return fit_calibration(lambda w: _encode_windows(model, w, **encode_kwargs), wins, seed=int(seed), flip=flip)

    pooled = fit(np.arange(n))
    per_window = np.full(n, -1)
    fits = []
    for k, order in enumerate(symmetry):
        rows = np.nonzero(labels == k)[0]
        if rows.size < MIN_SPECIES_WINDOWS or order == 0:
            continue
        cal = fit(rows, flip=int(order) % 2 == 1)
        cal["species"] = names[k] if k < len(names) else k
        per_window[rows] = len(fits)
        fits.append(cal)
    names_sd = ("angle_sd", "dx_sd", "dy_sd", "flip_prob", "z_sd")
    grids = {name: np.array(ds[name].values, copy=True) for name in names_sd if name in ds}
    for j, cal in enumerate([pooled, *fits]):
        rows = per_window == j - 1
        if not rows.any():
            continue
        raw = {name: grid[pi[rows], fi[rows]] for name, grid in grids.items()}
        for name, value in apply_calibration(raw, cal).items():
            grids[name][pi[rows], fi[rows]] = value
        log.info("encode: spreads of %s calibrated on %d windows (angle x%.3g + %.3g rad, shift x%.3g + %.3g px%s)",
                 "the other windows" if j == 0 else f"species {cal['species']}", cal["n_windows"],
                 cal["angle"]["scale"], cal["angle"]["floor"], cal["shift"]["scale"], cal["shift"]["floor"],
                 f", flip temperature {cal['flip']['temperature']:.3g}" if "flip" in cal else "")
    ds = ds.copy()
    for name, grid in grids.items():
        ds[name] = (ds[name].dims, grid, ds[name].attrs)
    ds.attrs["spread_calibration"] = json.dumps({**pooled, "species": fits}, sort_keys=True)
    return ds


def _encode_windows(model: Any, wins: np.ndarray, *, batch_size, device, method,
                    angles: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The model's outputs for one block of windows (``method`` only for models that take it; ``angles``,
    rad, for the angle-conditional model)."""
    import inspect

    kwargs = {"batch_size": batch_size, "device": device}
    if angles is not None:
        kwargs["angles"] = angles
    if method is not None and "method" in inspect.signature(model.encode).parameters:
        kwargs["method"] = method
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_settings_arguments(parser, "rvae")


def run(args: argparse.Namespace) -> int:
    given = bool(args.settings or args.config)
    settings = settings_from_args(args, "rvae") if given else None
    encode_patches(args.patches, args.model, args.output, settings=settings, device=args.device,
                   batch_size=args.batch_size, progress=not args.no_progress)
    return 0


COMMANDS = {"encode": (configure, run)}

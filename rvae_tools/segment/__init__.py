"""Segmentation: find every particle in every frame -> ``detections.parquet``.

Two methods (``segment.method``):

``unet``
    A small U-Net (:mod:`.unet`) gives each pixel a probability of belonging to the *core*
    of a particle of each class (a shrunken copy of the footprint centred on the particle's
    reference point); blobs of the foreground probability become particles, centred at
    their probability-weighted centroids (:mod:`.postprocess`). The network is trained by
    ``rvae-tools train-segmenter`` on frames from the simulator (the movie's own simulator
    settings for a simulated movie, the ``segment.synthetic`` settings otherwise), on user
    annotations, or on pseudo-labels that ``trackpy.locate`` finds in the movie itself.
``locate``
    ``trackpy.locate`` (:mod:`.locate`), the classical baseline.

Frames without usable signal (all NaN, constant) or without particles give no rows and a
:class:`SegmentationWarning`, never an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import add_settings_arguments, settings_from_args
from ..errors import InputError
from .postprocess import DETECTION_COLUMNS, blobs_to_detections, empty_detections

log = logging.getLogger(__name__)


class SegmentationWarning(UserWarning):
    """A frame gave no detections because it is blank, constant, all-NaN or empty."""


# --------------------------------------------------------------------------- training data


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


def pseudo_label_training_data(movie: np.ndarray, settings: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(frames, masks) with discs where ``trackpy.locate`` finds particles in the movie itself."""
    from .locate import locate_frame

    train = settings["train"]
    n = movie.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(train["frames"], n)).round().astype(int))
    frames = np.stack([np.asarray(movie[i], np.float32) for i in picks])
    found = [locate_frame(f, settings["locate"], invert=settings["invert"], index=k) for k, f in enumerate(frames)]
    centres = pd.concat(found, ignore_index=True) if found else empty_detections()
    centres["cls"] = 0
    log.info("pseudo-labels: %d particles in %d frames", len(centres), len(frames))
    return frames, disc_masks(centres, len(frames), frames.shape[1:], train["disc_radius"])


# --------------------------------------------------------------------------- train


def train_segmenter(settings: dict[str, Any], *, sim_settings: dict[str, Any] | None = None,
                    movie: np.ndarray | None = None, device: Any = None, progress: bool = True):
    """Train a U-Net for the ``segment`` settings.

    Parameters
    ----------
    settings : dict
        Validated ``segment`` section.
    sim_settings : dict, optional
        Validated ``simulate`` section of a simulated movie; with ``train.source: simulate``
        the network is trained on a fresh simulation with these settings (another seed).
        Without it, ``simulate`` falls back to the ``segment.synthetic`` renderer.
    movie : ndarray (frame, y, x), optional
        The movie itself, needed for ``train.source: pseudo``.
    device : torch.device, optional (default: automatic choice)

    Returns
    -------
    model : UNet
    config : dict (checkpoint config)
    history : list of dict
    """
    from ..device import select_device
    from . import synthetic
    from .train import train_unet
    from .unet import model_config, normalise

    device = device or select_device("auto")
    train = settings["train"]
    seed = int(settings["seed"])
    source = train["source"]
    names = None
    if source == "simulate" and sim_settings is not None:
        images, truth, dims, names = simulated_training_data(sim_settings, train, seed + 7919)
        masks = synthetic.core_masks(truth, len(images), images.shape[1:], dims, train["core"])
    elif source in ("simulate", "synthetic"):
        if source == "simulate":
            log.info("no simulator settings for this movie (a real movie): training on segment.synthetic frames")
        images, _, truth = synthetic.render_frames(settings["synthetic"], train["frames"], seed + 7919)
        dims = {k: (sp["length"], sp["width"]) for k, sp in enumerate(synthetic.species_from_settings(settings["synthetic"]))}
        names = ["rod", "asymmetric"][: len(dims)]
        masks = synthetic.core_masks(truth, len(images), images.shape[1:], dims, train["core"])
    elif source == "annotations":
        if not train.get("annotations"):
            raise InputError("segment.train.annotations: required with train.source: annotations "
                             "(a .npz or .zarr with 'image' and 'mask' or centres)")
        images, masks = annotation_training_data(train)
    elif source == "pseudo":
        if movie is None:
            raise InputError("segment.train.source: pseudo needs the movie (train-segmenter --input movie.zarr)")
        images, masks = pseudo_label_training_data(movie, settings)
    else:  # the schema's enum makes this unreachable from the CLI
        raise InputError(f"segment.train.source: {source!r} is not one of simulate, synthetic, annotations, pseudo")

    found = int(masks.max()) if masks.size else 0
    classes = settings["classes"] if settings["classes"] is not None else max(found, 1)
    if source in ("simulate", "synthetic") and settings["classes"] == 1:
        masks = (masks > 0).astype(np.uint8)
    elif found > classes:
        raise InputError(f"segment.classes: {classes}, but the training masks hold {found} classes; "
                         f"set classes to {found} or 1 (all species as one class)")
    # The network always sees bright particles: simulated and synthetic frames have them,
    # frames of the user's movie (annotations, pseudo-labels) are inverted like the movie.
    invert = settings["invert"] if source in ("annotations", "pseudo") else False
    images = np.stack([normalise(frame, invert=invert)[0] for frame in images])
    if not (masks > 0).any():
        raise InputError("segment.train: the training frames hold no particles; check the training source settings")
    model, history = train_unet(
        images, masks, classes=classes, depth=settings["model"]["depth"], width=settings["model"]["width"],
        steps=train["steps"], batch_size=train["batch_size"], crop=train["crop"], lr=train["lr"],
        augment=train["augment"], seed=seed, device=device, progress=progress,
    )
    config = model_config(classes, 1, settings["model"]["depth"], settings["model"]["width"], invert=invert,
                          species=names if names and len(names) == classes else None)
    config["core"] = train["core"] if source in ("simulate", "synthetic") else None
    config["source"] = source
    return model, config, history


def configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--history", help="training history to write (CSV: step, loss, seconds)")
    parser.add_argument("--input", help="movie.zarr (needed for train.source: pseudo)")
    parser.add_argument("--simulate-settings", metavar="JSON",
                        help="the movie's validated 'simulate' section (JSON): train on the simulator with these settings")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_settings_arguments(parser, "segment")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def run_train(args: argparse.Namespace) -> int:
    from ..config import validate_section
    from ..device import select_device
    from ..provenance import provenance_attrs
    from .unet import save_checkpoint

    settings = settings_from_args(args, "segment")
    _set_threads(args.threads)
    sim_settings = None
    if args.simulate_settings:
        try:
            sim_settings = validate_section("simulate", json.loads(args.simulate_settings), source="--simulate-settings")
        except json.JSONDecodeError as exc:
            raise InputError(f"--simulate-settings: not valid JSON ({exc})") from None
    movie = None
    if settings["train"]["source"] == "pseudo":
        if not args.input:
            raise InputError("train.source: pseudo needs --input movie.zarr")
        from ..io import open_zarr
        movie = open_zarr(args.input, required=["image"], what="movie store")["image"]
    device = select_device(args.device)
    start = time.perf_counter()
    model, config, history = train_segmenter(settings, sim_settings=sim_settings, movie=movie, device=device)
    prov = provenance_attrs(settings=settings, seed=settings["seed"], stage="train-segmenter",
                            inputs={"simulate": sim_settings} if sim_settings else None)
    sha = save_checkpoint(args.output, model, config, prov, history)
    if args.history:
        from ..io import atomic_output
        with atomic_output(args.history) as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
    log.info("trained %d steps in %.1f s on %s; final loss %.3f; checkpoint %s (sha256 %s)",
             len(history), time.perf_counter() - start, device, history[-1]["loss"] if history else float("nan"),
             args.output, sha[:12])
    return 0


# --------------------------------------------------------------------------- segment


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
    progress: bool = False,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Detect particles in every frame.

    Parameters
    ----------
    frames : array-like (frame, y, x)
        Raw frames (numpy, xarray or zarr; read one frame at a time).
    settings : dict
        Validated ``segment`` section.
    model : UNet, optional
        Required for ``method: unet``.
    model_config : dict, optional
        The checkpoint config of ``model`` (normalisation).
    device : torch.device, optional
    keep_probability : bool
        Also return the foreground probability (frame, y, x) float32.
    progress : bool
        Progress bar on stderr.

    Returns
    -------
    detections : DataFrame (the detections contract)
    probability : ndarray (frame, y, x) float32 or None
    """
    n = len(frames)
    tables: list[pd.DataFrame] = []
    prob_out = None
    pp = settings["postprocess"]
    if settings["method"] == "locate":
        import sys

        from tqdm import tqdm

        from .locate import locate_frame
        for i in tqdm(range(n), desc="locate", unit="frame", file=sys.stderr, disable=not progress, mininterval=2.0):
            frame = np.asarray(frames[i], np.float32) if not isinstance(frames, np.ndarray) else frames[i]
            finite = np.isfinite(frame)
            if not finite.any() or np.nanmax(frame) == np.nanmin(frame):
                _frame_warning(i, "blank, constant or all-NaN frame")
                continue
            found = locate_frame(frame, settings["locate"], invert=settings["invert"], index=i)
            if pp["edge"] > 0 and len(found):
                h, w = frame.shape
                e = pp["edge"]
                found = found[(found.x >= e) & (found.x <= w - 1 - e) & (found.y >= e) & (found.y <= h - 1 - e)]
            if len(found) == 0:
                _frame_warning(i, "no particles found")
            tables.append(found)
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
            if not usable:
                _frame_warning(i, "blank, constant or all-NaN frame")
                continue
            found = blobs_to_detections(
                fg, threshold=pp["threshold"], min_area=pp["min_area"], max_area=pp["max_area"], edge=pp["edge"],
                split=pp["split"], split_h=pp["split_h"], split_area=pp["split_area"],
                min_distance=pp["min_distance"], border_fraction=pp["border_fraction"], class_prob=prob[1:], frame=i,
            )
            if core:
                # Cores are shrunken footprints; report the footprint's area.
                found["core_area"] = found["area"]
                found["area"] = found["area"] / core**2
            if len(found) == 0:
                _frame_warning(i, "no particles found")
            tables.append(found)
    tables = [t for t in tables if len(t)]
    detections = pd.concat(tables, ignore_index=True) if tables else empty_detections()
    detections["frame"] = detections["frame"].astype("int64")
    detections["cls"] = detections["cls"].astype("int64")
    return detections, prob_out


def configure_segment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="movie.zarr (image(frame, y, x))")
    parser.add_argument("-o", "--output", required=True, help="detections table to write (.parquet)")
    parser.add_argument("--checkpoint", help="U-Net checkpoint (overrides segment.checkpoint)")
    parser.add_argument("--probability", help="also write the foreground probability map here (Zarr; unet only)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_settings_arguments(parser, "segment")


def run_segment(args: argparse.Namespace) -> int:
    from ..io import open_zarr, write_table, write_zarr
    from ..provenance import provenance_attrs

    settings = settings_from_args(args, "segment")
    _set_threads(args.threads)
    ds = open_zarr(args.input, required=["image"], what="movie store")
    image = ds["image"]
    if image.ndim != 3:
        raise InputError(f"{args.input}: image has dims {image.dims}; expected (frame, y, x)")
    model = config = device = None
    checksum = None
    checkpoint = args.checkpoint or settings["checkpoint"]
    if settings["method"] == "unet":
        from ..device import select_device
        from .unet import load_checkpoint
        if not checkpoint:
            raise InputError("segment.checkpoint: method unet needs a checkpoint (train one with train-segmenter)")
        model, config, checksum = load_checkpoint(checkpoint, classes=settings["classes"], channels=1)
        device = select_device(args.device)
    start = time.perf_counter()
    frames = image.data  # dask or numpy; indexed one frame at a time
    detections, prob = segment_movie(frames, settings, model=model, model_config=config, device=device,
                                     keep_probability=bool(args.probability), progress=True)
    seconds = time.perf_counter() - start
    n = image.shape[0]
    prov = provenance_attrs(settings=settings, seed=settings["seed"], model_checksum=checksum, stage="segment",
                            inputs={"movie": str(args.input), "checkpoint": str(checkpoint) if checkpoint else None})
    meta = dict(prov, method=settings["method"], frames=int(n), seconds=seconds,
                class_names=(config or {}).get("class_names", ["particle"]))
    write_table(detections[DETECTION_COLUMNS + [c for c in detections.columns if c not in DETECTION_COLUMNS]],
                args.output, metadata=meta)
    if args.probability:
        import xarray as xr
        if prob is None:
            raise InputError("--probability: only method unet produces a probability map")
        pds = xr.Dataset({"probability": (("frame", "y", "x"), prob)},
                         attrs={k: ds.attrs[k] for k in ("pixel_size", "pixel_unit", "frame_interval") if k in ds.attrs})
        pds["probability"].attrs["description"] = "probability that a pixel lies in a particle core (any class)"
        write_zarr(pds, args.probability, provenance=prov,
                   encoding={"probability": {"chunks": (1,) + prob.shape[1:]}})
    log.info("%d detections in %d frames (%.1f per frame) in %.1f s (%.1f frames/s) with %s",
             len(detections), n, len(detections) / max(n, 1), seconds, n / max(seconds, 1e-9), settings["method"])
    return 0


COMMANDS = {"train-segmenter": (configure_train, run_train), "segment": (configure_segment, run_segment)}

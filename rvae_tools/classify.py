"""``rvae-tools classify``: the class of every window from a model with a class latent.

The classifier head of an ``ssrvae`` / ``ssvae`` / ``jrvae`` model gives ``q(class | window)``;
this command writes it per window to a Parquet table, next to the window's pose and its spreads
(``angle``, ``angle_sd``, ``flip_prob``, ``dx``, ``dy``, ``dx_sd``, ``dy_sd``, as ``encode``
writes them), and :func:`class_variables` lays the classes out on the ``(particle, frame)`` grid
of ``latents.zarr`` with a majority class per trajectory.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

log = logging.getLogger(__name__)


def has_classes(model: Any) -> bool:
    """Whether ``model`` has a class latent (a classifier head)."""
    return int(getattr(model, "classes", 0) or 0) > 0 and hasattr(model, "class_probabilities")


def class_table(particle: np.ndarray, frame: np.ndarray, prob: np.ndarray, class_names: list) -> pd.DataFrame:
    """Per-window table: particle, frame, cls (class value), cls_index, cls_prob (of cls), prob_<class> each.

    ``prob`` (n, K) are the class probabilities of the windows.
    """
    best = prob.argmax(1) if len(prob) else np.empty(0, np.int64)
    names = np.asarray(class_names, dtype=object)
    df = pd.DataFrame({"particle": np.asarray(particle, np.int64), "frame": np.asarray(frame, np.int64),
                       "cls": _values(names[best] if len(best) else np.empty(0, object)),
                       "cls_index": best.astype(np.int64),
                       "cls_prob": prob[np.arange(len(prob)), best].astype(np.float32) if len(prob) else np.empty(0, np.float32)})
    for i, name in enumerate(class_names):
        df[f"prob_{name}"] = prob[:, i].astype(np.float32)
    return df


def _values(values: np.ndarray) -> np.ndarray:
    """Class values as int64 when every name is an integer, else str."""
    if len(values) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return values.astype(np.int64)
    return values.astype(str).astype(object)


def trajectory_classes(prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Majority class index (P,) of each trajectory and its confidence, from ``prob`` (P, F, K) (NaN = no window).

    The majority is the most frequent per-window class (ties: the larger summed probability);
    the confidence is the mean probability of that class over the trajectory's windows.
    Trajectories without windows get -1 and NaN.
    """
    p, _f, k = prob.shape
    valid = np.isfinite(prob).all(-1)
    best = np.where(valid, np.nan_to_num(prob).argmax(-1), -1)
    votes = np.stack([(best == c).sum(1) for c in range(k)], 1).astype(np.float64)
    summed = np.nan_to_num(prob).sum(1)
    # Votes dominate; the summed probability (< frames) only breaks ties.
    score = votes * (prob.shape[1] + 1) + summed
    major = score.argmax(1)
    n = valid.sum(1)
    conf = np.where(n > 0, summed[np.arange(p), major] / np.maximum(n, 1), np.nan)
    major = np.where(n > 0, major, -1)
    return major.astype(np.int64), conf.astype(np.float32)


def class_variables(prob: np.ndarray, class_names: list) -> tuple[dict[str, Any], dict[str, Any]]:
    """latents.zarr variables and coords of the class probabilities ``prob`` (P, F, K) on (particle, frame).

    Returns (data_vars, coords): ``cls_prob(particle, frame, class)``, ``cls_window(particle,
    frame)`` (class index, -1 = no window), ``cls(particle)`` (majority class value),
    ``cls_confidence(particle)``; coord ``class`` (the class values).
    """
    major, conf = trajectory_classes(prob)
    names = np.asarray(class_names, dtype=object)
    values = _values(names)
    cls = values[np.clip(major, 0, None)]
    if cls.dtype == object:
        cls = np.where(major >= 0, cls, "").astype(object)
    else:
        cls = np.where(major >= 0, cls, -1)
    valid = np.isfinite(prob).all(-1)
    window_cls = np.where(valid, np.nan_to_num(prob).argmax(-1), -1).astype(np.int16)
    data_vars = {
        "cls_prob": (("particle", "frame", "class"), prob.astype(np.float32),
                     {"units": "1", "description": "probability of each class for the window (classifier q(class | window))"}),
        "cls_window": (("particle", "frame"), window_cls,
                       {"units": "1", "description": "most probable class index of the window (-1 = no window); see coord class"}),
        "cls": (("particle",), cls, {"description": "majority class of the trajectory's windows"}),
        "cls_confidence": (("particle",), conf,
                           {"units": "1", "description": "mean probability of the majority class over the trajectory's windows"}),
    }
    coords = {"class": ("class", values, {"description": "class values, in the model's index order"})}
    return data_vars, coords


#: Largest distance (px) from a window's centre to the simulated particle it is taken to show.
TRUTH_MATCH_PX = 3.0


def matched_accuracy(counts: np.ndarray) -> float:
    """Accuracy of the best one-to-one matching of predicted classes (columns) to reference classes (rows).

    ``counts`` (R, K) are window counts; a class the matching leaves out counts as wrong. For a
    model that finds its classes without labels (jrvae), whose class order is arbitrary.
    """
    from scipy.optimize import linear_sum_assignment

    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / counts.sum())


def true_species(truth_path: str | Path, frame: np.ndarray, x: np.ndarray, y: np.ndarray,
                 max_distance: float = TRUTH_MATCH_PX) -> tuple[np.ndarray, list]:
    """The simulated species (index, -1 = none) of each window, and the species' names, from ``truth.parquet``.

    A window shows the simulated particle whose true centre is nearest its own (``x``, ``y``
    px, in ``frame``), when that is within ``max_distance`` px. The names come from the file's
    metadata (``species``), else the species indices.
    """
    from scipy.spatial import cKDTree

    from .io import read_table, table_metadata

    truth = read_table(truth_path, required=["frame", "x", "y", "cls"], what="truth table")
    frame, x, y = np.asarray(frame), np.asarray(x, np.float64), np.asarray(y, np.float64)
    species = np.full(frame.size, -1, dtype=np.int64)
    for f, rows in truth.groupby("frame"):
        sel = np.flatnonzero(frame == f)
        if sel.size:
            d, i = cKDTree(rows[["x", "y"]].to_numpy(np.float64)).query(np.stack([x[sel], y[sel]], 1))
            species[sel] = np.where(d <= max_distance, rows["cls"].to_numpy(np.int64)[i], -1)
    n = int(truth["cls"].max()) + 1 if len(truth) else 0
    entries = {int(e["cls"]): e.get("name", e["cls"]) for e in table_metadata(truth_path).get("species", [])
               if isinstance(e, dict) and "cls" in e}
    return species, [entries.get(k, k) for k in range(n)]


def classify_patches(patches_path: str | Path, model_path: str | Path, output: str | Path, *,
                     device: str = "auto", batch_size: int | None = None, progress: bool = True,
                     model: Any = None, labels: str | Path | None = None, figures_dir: str | Path | None = None,
                     formats=("png",), dpi: int = 150, latents: str | Path | None = None,
                     truth: str | Path | None = None) -> pd.DataFrame:
    """Classify every window of ``patches_path`` with the class model at ``model_path``; write ``output`` (Parquet).

    With ``labels`` (a labels file of this movie, see :mod:`rvae_tools.labels`) the accuracy on
    the labelled windows is logged; with ``truth`` (a simulated movie's truth.parquet) the
    accuracy against the species of the particle each window shows (:func:`true_species`),
    under the best one-to-one matching of classes to species; with ``figures_dir`` the class
    figures are drawn there (templates, the latent manifold of each class, class fractions per
    frame, and the confusion matrix when ``labels`` or ``truth`` is given; labels win when both
    are); ``latents`` (this movie's latents.zarr) gives the manifold the z of each class's windows.

    The table also holds each window's pose and spreads (the variables of
    :data:`rvae_tools.encode.SCALARS`: angle and angle_sd in rad, flip_prob, dx, dy, dx_sd,
    dy_sd in px): with ``latents``, encode's own (calibrated, lab-frame) values; without, the
    model's encoding of the window (uncalibrated spreads, model-frame angle); NaN for a model
    without a pose (ssvae). Its metadata ``pose_source`` says which.
    Returns the table written (see :func:`class_table`, plus those columns).
    """
    from tqdm import tqdm

    from .encode import SCALARS, check_compatible
    from .io import open_zarr, write_table
    from .provenance import provenance_attrs

    patches_path, model_path, output = Path(patches_path), Path(model_path), Path(output)
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be a positive number of windows, got {batch_size}")
    patches = open_zarr(patches_path, required=["window", "particle", "frame"], what="patches store")
    window = patches["window"]
    if window.ndim != 3 or window.dims[0] != "obs":
        raise InputError(f"{patches_path}: window must have dims (obs, wy, wx); found {window.dims}")
    if model is None:
        from .rvae import load_model

        model = load_model(model_path)
    if not has_classes(model):
        raise InputError(f"{model_path}: the model ({getattr(model, 'settings', {}).get('model', '?')}) has no classes; "
                         "expected one trained with rvae.model ssrvae, ssvae or jrvae")
    check_compatible(model, tuple(window.shape[1:]), model_path=model_path, patches_path=patches_path)
    lat, rows = (None, None) if latents is None else _latent_rows(latents, patches, patches_path)
    # Without the movie's latents the model's own pose is encoded here (its spreads not calibrated).
    encode_pose = lat is None and bool(getattr(model, "pose", False))
    n = int(window.shape[0])
    prob = np.empty((n, model.classes), np.float32)
    pose = {name: np.full(n, np.nan, np.float32) for name in SCALARS}
    block = max(int((window.encoding.get("chunks") or (4096,))[0]), batch_size or 0)
    with tqdm(total=n, unit="win", desc="classify", file=sys.stderr, disable=not progress,
              mininterval=1.0 if sys.stderr.isatty() else 15.0) as bar:
        for start in range(0, n, block):
            stop = min(start + block, n)
            wins = np.asarray(window[start:stop].values, np.float32)
            if encode_pose:
                out = model.encode(wins, batch_size=batch_size, device=device)
                prob[start:stop] = out["cls_prob"]
                for name, column in pose.items():
                    column[start:stop] = out[name]
            else:
                prob[start:stop] = model.class_probabilities(wins, batch_size=batch_size, device=device)
            bar.update(stop - start)
    if lat is not None:
        pi, fi = rows
        for name in pose:
            if name in lat:
                pose[name] = np.asarray(lat[name].values[pi, fi], np.float32)
        pose_source = f"{latents} (encode's calibrated values, lab-frame angle)"
    elif encode_pose:
        pose_source = "the model's encode (spreads not calibrated, model-frame angle)"
    else:
        pose_source = "none (the model infers no pose)"
    table = class_table(patches["particle"].values, patches["frame"].values, prob, model.class_names)
    for name, values in pose.items():
        table[name] = values
    write_table(table, output, metadata={
        "class_names": list(model.class_names),
        "pose_source": pose_source,
        "units": {name: unit for name, (unit, _text) in SCALARS.items()},
        **provenance_attrs(settings=getattr(model, "config", {}), seed=int(model.settings.get("seed") or 0),
                           model_checksum=getattr(model, "checksum", None), stage="classify",
                           inputs={"patches": str(patches_path), "model": str(model_path),
                                   **({"latents": str(latents)} if latents is not None else {})}),
    })
    counts = table["cls"].value_counts().to_dict()
    log.info("%s: %d windows classified (%s)", output, n, ", ".join(f"{k}: {v}" for k, v in counts.items()))
    found = table["cls_index"].to_numpy()
    reference = None   # (class index per window, names or None = the model's classes, what the rows are)
    if truth is not None:
        if "x" not in patches.variables or "y" not in patches.variables:
            raise InputError(f"{patches_path}: no x, y coordinates; --truth matches each window's centre to the "
                             "simulated particles")
        species, species_names = true_species(truth, patches["frame"].values, patches["x"].values, patches["y"].values)
        sel = species >= 0
        counts = np.zeros((len(species_names), model.classes), dtype=np.int64)
        np.add.at(counts, (species[sel], found[sel]), 1)
        log.info("%s: accuracy %.3f against the simulated species on %d windows (classes matched one-to-one; "
                 "%d windows with no particle within %g px)", truth, matched_accuracy(counts), int(sel.sum()),
                 int((~sel).sum()), TRUTH_MATCH_PX)
        reference = (species, species_names, "true species")
    if labels is not None:
        from .labels import read_labels, store_index, window_labels

        known, _ = window_labels(read_labels(labels), [store_index(patches_path)], source=str(labels),
                                 class_names=list(model.class_names))
        sel = known >= 0
        log.info("%s: accuracy %.3f on %d labelled windows", labels, float((found[sel] == known[sel]).mean()),
                 int(sel.sum()))
        reference = (known, None, "labelled class")
    if figures_dir is not None:
        from .plots import classes as plots

        fig_dir = Path(figures_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        formats = tuple(dict.fromkeys(["png", *formats]))
        plots.templates(model, fig_dir, formats=formats, dpi=dpi)
        z = cls_index = None
        if lat is not None:
            pi, fi = rows
            z, cls_index = lat["z"].values[pi, fi], table["cls_index"].to_numpy()
        plots.manifold(model, fig_dir, z=z, cls_index=cls_index, formats=formats, dpi=dpi)
        plots.fractions(table, list(model.class_names), fig_dir, formats=formats, dpi=dpi)
        if reference is not None:
            ref, ref_names, kind = reference
            sel = ref >= 0
            plots.confusion(ref[sel], found[sel], list(model.class_names), fig_dir, formats=formats, dpi=dpi,
                            reference_names=ref_names, reference=kind)
    return table


def _latent_rows(latents: str | Path, patches, patches_path: Path):
    """The latents store and the (particle, frame) grid indices of every window of ``patches``.

    Raises InputError when the grid does not hold every window (latents of other patches).
    """
    from .io import open_zarr

    lat = open_zarr(latents, required=["z"], what="latents store")
    particle, frame = patches["particle"].values, patches["frame"].values
    pi = np.searchsorted(lat["particle"].values, particle).clip(max=lat.sizes["particle"] - 1)
    fi = np.searchsorted(lat["frame"].values, frame).clip(max=lat.sizes["frame"] - 1)
    if (lat["particle"].values[pi] != particle).any() or (lat["frame"].values[fi] != frame).any():
        raise InputError(f"{latents}: its (particle, frame) grid does not hold the windows of {patches_path}; "
                         "expected the latents encoded from these patches")
    return lat, (pi, fi)


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patches", help="windows store (patches.zarr)")
    parser.add_argument("model", help="model with classes (model.pt of rvae.model ssrvae, ssvae or jrvae)")
    parser.add_argument("-o", "--output", required=True, help="table to write (classes.parquet)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: the model's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--labels", default=None, help="labels file of this movie: log the accuracy on its windows "
                        "(and draw the confusion matrix with --figures)")
    parser.add_argument("--truth", default=None, metavar="TRUTH.parquet",
                        help="a simulated movie's truth: log the accuracy against the species of the particle each "
                             "window shows (and draw the confusion matrix with --figures)")
    parser.add_argument("--figures", default=None, metavar="DIR",
                        help="draw class templates, the class manifold, class fractions per frame (and the "
                             "confusion matrix, with --labels or --truth) here")
    parser.add_argument("--latents", default=None, metavar="LATENTS.zarr",
                        help="this movie's latents (from encode): the table takes their calibrated pose and "
                             "spreads (else the model encodes them, uncalibrated), the class manifold each "
                             "class's z")


def run(args: argparse.Namespace) -> int:
    classify_patches(args.patches, args.model, args.output, device=args.device, batch_size=args.batch_size,
                     progress=not args.no_progress, labels=args.labels, figures_dir=args.figures,
                     latents=args.latents, truth=args.truth)
    return 0


COMMANDS = {"classify": (configure, run)}

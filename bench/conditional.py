#!/usr/bin/env python
"""Conditional against unconditional rVAE: reconstruction of the demo's windows, through the whole chain.

The demo movie (two species, an ordering transition) is simulated and taken through the stages
as the workflow runs them (``rvae-tools simulate``, ``ingest``, ``train-segmenter``,
``segment``, ``track``, ``windows``); the models train on the windows of ``patches.zarr`` and
read what they are conditioned on from it, as the workflow's ``train`` does:

- ``rvae``: the unconditional rVAE (angle, shift and content inferred);
- ``rvae | angle``: ``condition: angle``, the decoder given each window's ``orientation``
  (the segmenter's major axis, known up to a half turn; the sense is summed out);
- ``jrvae``: the class model with its classes found without labels (class inferred);
- ``ssrvae | class``: ``condition: class``, the decoder given each window's ``cls`` (the
  segmenter's class), every window labelled; only when the segmenter found two classes or more.

Two further rows condition on the simulator's truth for the matched particle (nearest true
centre within 3 px in the window's frame), not through the chain: ``rvae | true angle`` (the
angle known exactly, as in the orientation poster: what the segmenter's axis costs) and
``ssrvae | true class`` (the species known for every window).

Every model has the same encoder, decoder, latent size, epochs, batch size and seed, and is
trained on the windows of 75 % of the trajectories; printed for the held-out 25 %:
reconstruction mean squared error (finite pixels, intensity units of patches.zarr, the model
decoding each window at its own encoded pose, content and class) against the windows
themselves and against their noise-free versions (:func:`clean_windows`: the demo simulated
again without its noise and cut the same way), the ratios to the unconditional model's, the
share of held-out windows the conditional model reconstructs better (against the noise-free
windows), and the training throughput. The last line is one JSON object with every figure.

Why the noise-free windows: the demo's noise (snr 5) has a mean square of about 0.0020 per
pixel in the windows' units, nearly all of the noisy-window MSE of a trained model (0.0022 at
the defaults), so a model that draws the particle markedly better barely moves that figure.
The noise is the same for every model; against the noise-free windows only the model's error
is left.

Measured at the defaults (OMP_NUM_THREADS=1; 3284 training, 1016 held-out windows; the
segmenter found one class; the noise alone 0.00201): held-out MSE noisy / noise-free: rvae
0.00223 / 0.000436, rvae | angle 0.00223 / 0.000439 (noise-free ratio 1.006, better on 0.483 of
the windows), ssrvae | true class 0.00216 / 0.000368 (ratio 0.966 noisy, 0.843 noise-free,
better on 0.645). Knowing the species cuts the model's own error by 16 %; knowing the axis does
not help the reconstruction (the rVAE infers the angle as well as the segmenter's axis gives
it) and only speeds training up, 1.8x (277 against 154 windows/s):

    python bench/conditional.py --models rvae 'rvae|angle' 'ssrvae|true_class'

The class latent is most of that gain even without labels: jrvae 0.00220 / 0.000376 (0.861 of
the rvae's noise-free error); the true species on top of it, ssrvae | true class / jrvae 0.979
noise-free (0.983 noisy, better on 0.539), as jrvae finds the species on about 97 % of the
windows (bench/jrvae.py):

    python bench/conditional.py --models jrvae 'ssrvae|true_class'

    python bench/conditional.py                           # the demo's size (60 frames, 80 particles)
    python bench/conditional.py --frames 20 --epochs 4    # a quick look
    python bench/conditional.py --frames 30 --particles 60 --epochs 10   # ~6 min on 2 shared cores
    # measured so (1355 training, 429 held-out windows; the segmenter found one class): held-out
    # MSE rvae 0.00265, rvae | angle 0.00228 (ratio 0.860, better on 0.925 of the windows),
    # rvae | true angle 0.00227 (0.857), jrvae 0.00228, ssrvae | true class 0.00227 (0.996 of jrvae)
    # measured at the defaults (3274 training, 1024 held-out windows, 12 epochs): the gain is gone,
    # rvae 0.00221, rvae | angle 0.00224 (1.014, better on 0.383), rvae | true angle 0.00222
    # (1.005), jrvae 0.00221, ssrvae | true class 0.00219 (0.988 of jrvae); the conditional models
    # train 1.6-1.7x faster (no rotation inference). With enough windows the rVAE infers the angle
    # about as well as it is known; conditioning pays where windows are few. (Those figures are
    # of an earlier chain, against the noisy windows only, whose noise alone is about 0.0020.)
    python bench/conditional.py --frames 20 --epochs 4 --models rvae 'ssrvae|true_class'
    # OMP_NUM_THREADS=1 (1160 training, 390 held-out windows; noise 0.00213): rvae 0.00372 noisy,
    # 0.00184 against the noise-free windows; ssrvae | true class 0.00342, 0.00148: ratio 0.920
    # against the noisy windows, 0.804 against the noise-free ones (better on 0.564 of the windows)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

#: The models compared (see the module docstring).
MODELS = ("rvae", "rvae|angle", "rvae|true_angle", "jrvae", "ssrvae|class", "ssrvae|true_class")


def chain_config(args) -> dict:
    """The validated config of the bench's demo movie."""
    from rvae_tools.config import validate_config

    return validate_config({"seed": args.seed, "movies": {"demo": {"simulate": {}}},
                            "simulate": {"frames": args.frames, "n_particles": args.particles},
                            "segment": {"train": {"steps": args.segmenter_steps}}}, source="bench")


def run_chain(root: Path, args) -> Path:
    """The demo movie through simulate .. windows with the CLI; returns its patches.zarr."""
    from rvae_tools.cli import main
    from rvae_tools.config import stage_settings

    config = chain_config(args)
    movie = root / "demo"

    def settings(section):
        # As the workflow's rules pass them: the movie's validated section as JSON.
        return ["--settings", json.dumps(stage_settings(config, section, "demo"), sort_keys=True)]

    steps = [
        ["simulate", "--outdir", str(movie), *settings("simulate")],
        ["ingest", str(movie / "raw" / "movie.tif"), "-o", str(movie / "movie.zarr"), "--options", "{}"],
        ["train-segmenter", "-o", str(root / "segmenter.pt"), "--simulate-settings",
         json.dumps(stage_settings(config, "simulate", "demo"), sort_keys=True), "--device", args.device,
         *settings("segment")],
        ["segment", str(movie / "movie.zarr"), "-o", str(movie / "detections.parquet"), "--checkpoint",
         str(root / "segmenter.pt"), "--probability", str(movie / "probability.zarr"), "--device", args.device,
         *settings("segment")],
        ["track", str(movie / "detections.parquet"), "--movie-zarr", str(movie / "movie.zarr"), "--tracks",
         str(movie / "tracks.parquet"), "--drift", str(movie / "drift.parquet"), "--trajectories",
         str(movie / "trajectories.parquet"), "--msd", str(movie / "msd.parquet"), *settings("track")],
        ["windows", str(movie / "movie.zarr"), str(movie / "tracks.parquet"), "-o", str(movie / "patches.zarr"),
         "--probability", str(movie / "probability.zarr"), "--no-progress", *settings("windows")],
    ]
    for step in steps:
        t0 = time.perf_counter()
        code = main(step)
        if code != 0:
            raise SystemExit(f"rvae-tools {step[0]} failed (exit {code})")
        print(f"  {step[0]}: {time.perf_counter() - t0:.1f} s", flush=True)
    return movie / "patches.zarr"


def true_particles(movie: Path, ds) -> tuple[np.ndarray, np.ndarray]:
    """The simulator's angle (rad) and class of the particle nearest each window's centre in its frame (NaN, -1 beyond 3 px)."""
    import pandas as pd
    from scipy.spatial import cKDTree

    truth = pd.read_parquet(movie / "truth.parquet")
    frame, x, y = (ds[k].values for k in ("frame", "x", "y"))
    angle, cls = np.full(frame.size, np.nan), np.full(frame.size, -1, dtype=np.int64)
    for f, rows in truth.groupby("frame"):
        sel = np.flatnonzero(frame == f)
        if sel.size:
            d, i = cKDTree(rows[["x", "y"]].to_numpy()).query(np.stack([x[sel], y[sel]], 1))
            angle[sel] = np.where(d <= 3.0, rows["angle"].to_numpy()[i], np.nan)
            cls[sel] = np.where(d <= 3.0, rows["cls"].to_numpy()[i], -1)
    return angle, cls


def clean_windows(movie: Path, ds, config_settings: dict) -> tuple[np.ndarray, float]:
    """The noise-free version of every window of ``ds`` (patches.zarr), and how closely the noisy ones are reproduced.

    The demo is simulated again with the chain's settings, once as the chain did and once with
    ``noise.snr: null``; the noise is drawn last (after the scene, the blur, the tilt and the
    scan lines), so the second movie is the first without its shot and read noise. Both are cut
    as the windows stage cut patches.zarr (same centres, interpolation, aperture blend towards
    the stored fill level, normalisation levels and clipping of the store's attrs). Returns the
    clean windows and the largest absolute difference between the re-cut noisy windows and the
    store's (~0 when the windows are cut the same way).
    """
    from rvae_tools.simulate import simulate
    from rvae_tools.windows import aperture_weights, cut_windows, normalise

    attrs = ds.attrs
    low, high, clip = float(attrs["norm_low"]), float(attrs["norm_high"]), bool(attrs["clip"])
    order = int(attrs["spline_order"])
    raw = lambda normalised: float(normalised) * (high - low) + low  # the inverse of normalise
    pad, fill = raw(attrs["pad_value"]), raw(attrs["mask_fill"])
    size = int(attrs["window_size"])
    frame, x, y = (ds[k].values for k in ("frame", "x", "y"))
    aperture = attrs.get("mask") == "aperture"
    if aperture:
        theta = np.nan_to_num(ds["orientation"].values.astype(np.float64), nan=0.0)
        weight = aperture_weights(size, np.zeros(frame.size), np.zeros(frame.size), ds["aperture_a"].values,
                                  ds["aperture_b"].values, theta)
    out = {}
    for name, snr in (("noisy", config_settings["noise"]["snr"]), ("clean", None)):
        settings = {**config_settings, "noise": {**config_settings["noise"], "snr": snr}}
        images = simulate(settings).movie
        wins = np.empty((frame.size, size, size), np.float32)
        for f in np.unique(frame):
            sel = np.flatnonzero(frame == f)
            wins[sel] = cut_windows(images[int(f)], x[sel], y[sel], size, order=order, cval=pad)
        if aperture:
            wins = weight * wins + (1 - weight) * np.float32(fill)
        out[name] = normalise(wins, low, high, clip)
    return out["clean"], float(np.nanmax(np.abs(out["noisy"] - np.asarray(ds["window"].values, np.float32))))


def mean_square(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean squared difference (n,) of each window pair over the pixels finite in ``b``."""
    ok = np.isfinite(b)
    return np.where(ok, (a - np.nan_to_num(b)) ** 2, 0.0).sum((1, 2)) / ok.sum((1, 2)).clip(min=1)


def train_and_score(name: str, overrides: dict, windows: np.ndarray, train: np.ndarray, test: np.ndarray,
                    args, *, clean: np.ndarray, labels=None, angles=None) -> dict:
    import torch

    from rvae_tools.config import validate_section
    from rvae_tools.rvae import build_model

    torch.manual_seed(args.seed)
    settings = validate_section("rvae", {
        "epochs": args.epochs, "batch_size": args.batch_size, "latent_dim": args.latent, "seed": args.seed,
        "patience": 0, "train_fraction": 1.0, **overrides}, source="bench")
    model = build_model(settings, windows.shape[1:])
    fit_kw, enc_kw = {}, {}
    if labels is not None:
        fit_kw["labels"] = labels[train]
    if angles is not None:
        fit_kw["angles"], enc_kw["angles"] = angles[train], angles[test]
    t0 = time.perf_counter()
    hist = model.fit(windows[train], device=args.device, progress=False, **fit_kw)
    seconds = time.perf_counter() - t0
    if overrides.get("condition") == "class":
        # The class-conditional model decodes each window as its known class, not the classifier's.
        enc = model.encode(windows[test], device=args.device)
        rec = model.decode(enc["z"], enc["angle"], enc["dx"], enc["dy"], cls=labels[test]) + enc["background"][:, None, None]
    else:
        rec = model.reconstruct(windows[test], device=args.device, **enc_kw)
    err = mean_square(rec, windows[test])
    # Against the noise-free windows: the noise's own variance, the same for every model,
    # no longer hides how well each one draws the particle.
    signal = mean_square(rec, clean[test])
    print(f"{name:<20} {float(err.mean()):>12.5f} {float(signal.mean()):>12.5f}  "
          f"({len(hist) * len(train) / seconds:.0f} windows/s)", flush=True)
    return {"mse": float(err.mean()), "per_window": err, "signal_mse": float(signal.mean()), "per_window_signal": signal,
            "train_windows_per_s": len(hist) * len(train) / seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60, help="frames of the demo movie (the demo: 60)")
    parser.add_argument("--particles", type=int, default=80, help="particles in view (the demo: 80)")
    parser.add_argument("--segmenter-steps", type=int, default=300, help="U-Net training steps (the default: 300)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latent", type=int, default=2, help="content latents (every model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="keep the chain's outputs here (default: a temporary folder)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to train (default: all)")
    args = parser.parse_args(argv)

    from rvae_tools.io import open_zarr

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        print(f"demo movie: {args.frames} frames, {args.particles} particles, seed {args.seed}; the chain:", flush=True)
        patches = run_chain(root, args) if not (root / "demo" / "patches.zarr").exists() else root / "demo" / "patches.zarr"
        ds = open_zarr(patches, required=["window", "particle", "orientation", "cls"], what="patches store")
        windows = np.asarray(ds["window"].values, dtype=np.float32)
        particle = ds["particle"].values
        cls = ds["cls"].values.astype(np.int64)
        orientation = ds["orientation"].values.astype(np.float64)
        truth, true_cls = true_particles(root / "demo", ds)
        rng = np.random.default_rng(args.seed)
        ids = rng.permutation(np.unique(particle))
        held = np.isin(particle, ids[: max(1, len(ids) // 4)])
        usable = np.isfinite(orientation) & np.isfinite(truth) & (cls >= 0) & (true_cls >= 0)
        train, test = np.flatnonzero(~held & usable), np.flatnonzero(held & usable)
        classes = np.unique(cls[usable])
        print(f"{windows.shape[0]} windows of {windows.shape[1]}x{windows.shape[2]} px, {np.unique(particle).size} "
              f"trajectories; training on {train.size} windows, scoring {test.size} held out; segmenter classes "
              f"{classes.tolist()}; {int((~usable).sum())} windows without an orientation, class or true "
              f"particle left out", flush=True)
        from rvae_tools.config import stage_settings

        clean, recut = clean_windows(root / "demo", ds, stage_settings(chain_config(args), "simulate", "demo"))
        if recut > 1e-4:
            raise SystemExit(f"the noisy windows re-cut from the simulation differ from patches.zarr by up to {recut:.3g}; "
                             "the clean windows would not be cut the same way")
        floor = mean_square(windows[test], clean[test])
        print(f"noise-free windows: the simulation without its noise, cut as patches.zarr (re-cut noisy windows "
              f"within {recut:.1e}); the noise's own MSE on the held-out windows {float(floor.mean()):.5f}", flush=True)
        print(f"{'model':<20} {'held-out MSE':>12} {'vs noise-free':>12}", flush=True)
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index.get(c, -1) for c in cls], dtype=np.int64)
        species = np.unique(true_cls[usable])
        true_labels = np.searchsorted(species, true_cls).astype(np.int64)
        runs = {
            "rvae": ("rvae", {"model": "rvae"}, {}),
            "rvae|angle": ("rvae | angle", {"model": "rvae", "condition": "angle"}, {"angles": orientation}),
            "rvae|true_angle": ("rvae | true angle", {"model": "rvae", "condition": "angle", "known_angle": "full"},
                                {"angles": truth}),
            "jrvae": ("jrvae", {"model": "jrvae", "classes": int(species.size)}, {}),
            "ssrvae|class": ("ssrvae | class", {"model": "ssrvae", "condition": "class", "classes": int(classes.size)},
                             {"labels": labels}),
            "ssrvae|true_class": ("ssrvae | true class", {"model": "ssrvae", "condition": "class",
                                                          "classes": int(species.size)}, {"labels": true_labels}),
        }
        # A class model needs two classes at least (the segmenter's, or the simulator's species).
        needs = {"jrvae": species.size, "ssrvae|class": classes.size, "ssrvae|true_class": species.size}
        res = {key: train_and_score(name, overrides, windows, train, test, args, clean=clean, **extra)
               for key, (name, overrides, extra) in runs.items()
               if key in args.models and needs.get(key, 2) >= 2}
    pairs = [("rvae|angle", "rvae"), ("rvae|true_angle", "rvae"), ("ssrvae|class", "jrvae"),
             ("ssrvae|true_class", "jrvae"), ("ssrvae|true_class", "rvae")]
    summary = {"mse": {k: v["mse"] for k, v in res.items()},
               "signal_mse": {k: v["signal_mse"] for k, v in res.items()}, "noise_mse": float(floor.mean()),
               "train_windows_per_s": {k: v["train_windows_per_s"] for k, v in res.items()}}
    ratios, signal_ratios, better = {}, {}, {}
    for cond, base in pairs:
        if cond in res and base in res:
            key = f"{cond}/{base}"
            ratios[key] = res[cond]["mse"] / res[base]["mse"]
            signal_ratios[key] = res[cond]["signal_mse"] / res[base]["signal_mse"]
            better[f"{cond}>{base}"] = float((res[cond]["per_window_signal"] < res[base]["per_window_signal"]).mean())
            print(f"{key}: MSE ratio {ratios[key]:.3f}; against the noise-free windows {signal_ratios[key]:.3f}, "
                  f"better on {better[f'{cond}>{base}']:.3f} of the held-out windows", flush=True)
    summary.update({"mse_ratio": ratios, "signal_mse_ratio": signal_ratios, "share_better": better,
                    "n_train": int(train.size), "n_test": int(test.size),
                    "settings": vars(args), "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)})
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

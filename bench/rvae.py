#!/usr/bin/env python
"""Benchmark of the rVAE against the peer implementations (pyroVED's and AtomAI's rVAE).

Windows are cut around the true positions of a simulated movie with uniformly random
orientations (no ordering transition) and two species (a 2-fold rod and a 1-fold tadpole),
each window centre displaced by a known random sub-pixel jitter, so that the true angle and
the true shift of every window are known. Every model trains on the same windows (the same
75 % split), with the same latent sizes (angle + 2 shifts + k content), epochs and batch size,
in this one run, and encodes all windows.

Ours encodes four times, with ``encode_method`` exact (all r rotations decoded), fast (the
encoder's top rotations and their half-turns decoded), encoder (nothing decoded; its figures
are the ones compared with the peers, whose encoders decode nothing either) and exact with the
angle refined off the rotation grid (``refine_angle``; its angle consistency is printed as
``exact_refined_angle_consistency_*``): the speed of each and its gap in angle consistency to
exact are printed.

Printed per model: angle consistency per species, |mean exp(i n (true - s encoded))| maximised
over s = +1/-1 (n = the species' symmetry order; 1 = exact up to one constant offset);
correlation of encoded and true shifts; clustering accuracy of z against species (k-means on
the standardised z, best one-to-one assignment); training and encoding windows per second
(encoding: the shortest of --encode-repeats runs, default 3, since one run of the peers is
under a second and a shared machine's load moves it by up to 4x);
then our speed-ups over each peer. The last line is one JSON object with every figure.

The peers are installed on first use into ``<repo>/.peers`` (``pip install --no-deps`` plus
the pure-Python dependencies they import; never into the environment), with the minimal
torchvision stand-in of ``bench/peer_shims`` on the path. When that fails, our figures are
still printed and the peers are marked unavailable.

    python bench/rvae.py                       # default run (~10-15 min on 2 CPU cores)
    python bench/rvae.py --epochs 3 --frames 20 --no-peers   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback

import numpy as np
from _peers import ATOMAI_PACKAGES, PEERS, PYROVED_PACKAGES, SHIMS
from _peers import ensure_peers as install_peers

PEER_PACKAGES = [*ATOMAI_PACKAGES, *PYROVED_PACKAGES]


# --------------------------------------------------------------------------- data


def make_windows(frames: int, particles: int, size: int, jitter: float, seed: int):
    """Windows around the simulated particles, with their true angle, shift, class and symmetry."""
    from rvae_tools.config import validate_section
    from rvae_tools.simulate import simulate
    from rvae_tools.windows import cut_windows, inside_frame

    settings = validate_section("simulate", {"frames": frames, "n_particles": particles,
                                             "transition": {"frame": None}})
    settings["seed"] = seed
    sim = simulate(settings)
    truth = sim.truth
    rng = np.random.default_rng(seed + 1)
    jit = rng.uniform(-jitter, jitter, (len(truth), 2))
    cx = truth["x"].to_numpy() + jit[:, 0]
    cy = truth["y"].to_numpy() + jit[:, 1]
    keep = inside_frame(cx, cy, size, sim.movie.shape[1:])
    wins, rows = [], []
    frame_col = truth["frame"].to_numpy()
    for f in np.unique(frame_col):
        sel = np.nonzero((frame_col == f) & keep)[0]
        if len(sel):
            wins.append(cut_windows(sim.movie[int(f)], cx[sel], cy[sel], size))
            rows.append(sel)
    rows = np.concatenate(rows)
    x = np.concatenate(wins)
    lo, hi = np.percentile(sim.movie, [1.0, 99.9])
    x = ((x - lo) / (hi - lo)).astype(np.float32)
    species = sim.metadata["species"]
    return {
        "windows": x,
        "cls": truth["cls"].to_numpy()[rows],
        "angle": truth["angle"].to_numpy()[rows],
        # The particle sits at -jitter from the window centre.
        "shift": -jit[rows],
        "symmetry": [int(s["symmetry"]) for s in species],
        "names": [s["name"] for s in species],
    }


# --------------------------------------------------------------------------- scores


def angle_consistency(true: np.ndarray, encoded: np.ndarray, n: int) -> float:
    return float(max(abs(np.mean(np.exp(1j * n * (true - s * encoded)))) for s in (1, -1)))


def shift_correlation(true: np.ndarray, dx: np.ndarray, dy: np.ndarray, free_convention: bool) -> float:
    """Pearson correlation of the pooled (dx, dy) against the true shifts.

    ``free_convention`` (the peers): their axis order and signs are undocumented, so the best of
    swapping the axes and flipping each sign is taken. Ours is scored with its documented
    convention only.
    """
    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else 0.0

    enc = np.stack([dx, dy], 1)
    if not np.isfinite(enc).all():
        return float("nan")
    if not free_convention:
        return corr(np.concatenate([enc[:, 0], enc[:, 1]]), np.concatenate([true[:, 0], true[:, 1]]))
    best = -1.0
    for order in ((0, 1), (1, 0)):
        for sx in (1, -1):
            for sy in (1, -1):
                e = np.concatenate([sx * enc[:, order[0]], sy * enc[:, order[1]]])
                best = max(best, corr(e, np.concatenate([true[:, 0], true[:, 1]])))
    return best


def clustering_accuracy(z: np.ndarray, cls: np.ndarray, seed: int = 0) -> float:
    from scipy.optimize import linear_sum_assignment
    from sklearn.cluster import KMeans

    k = len(np.unique(cls))
    zs = (z - z.mean(0)) / (z.std(0) + 1e-12)
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(zs)
    m = np.zeros((k, k))
    np.add.at(m, (labels, np.searchsorted(np.unique(cls), cls)), 1)
    r, c = linear_sum_assignment(-m)
    return float(m[r, c].sum() / len(cls))


def score(data, angle, dx, dy, z, free_convention: bool) -> dict[str, float]:
    out = {}
    for k, (name, n) in enumerate(zip(data["names"], data["symmetry"])):
        sel = data["cls"] == k
        out[f"angle_consistency_{name}"] = angle_consistency(data["angle"][sel], angle[sel], n)
    out["shift_correlation"] = shift_correlation(data["shift"], dx, dy, free_convention)
    out["clustering_accuracy"] = clustering_accuracy(z, data["cls"])
    return out


# --------------------------------------------------------------------------- models


def best_of(encode, repeats: int):
    """``encode()``'s result and its shortest wall time (s) over ``repeats`` calls.

    An encoding of a few thousand windows takes well under a second for the peers, so one load
    spike of a shared machine can halve or double a single timing; the shortest of several is
    what the code itself costs.
    """
    result, best = None, math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = encode()
        best = min(best, time.perf_counter() - t0)
        result = out if result is None else result
    return result, best


def run_ours(data, train_idx, args) -> dict:
    from rvae_tools.rvae import RVAE

    x = data["windows"]
    extra = {"encoder_channels": args.encoder_channels} if args.encoder_channels else {}
    model = RVAE(x.shape[1], latent_dim=args.latent, seed=args.seed, max_windows=None, **extra)  # the peers train on all
    t0 = time.perf_counter()
    hist = model.fit(x, epochs=args.epochs, batch_size=args.batch_size, device="cpu", progress=False)
    train_s = time.perf_counter() - t0
    timed = {}
    for method in ("exact", "fast", "encoder"):
        timed[method] = best_of(lambda m=method: model.encode(x, device="cpu", method=m, refine=False),
                                args.encode_repeats)
    # exact with the angle refined off the rotation grid (rvae.refine_angle).
    timed["exact_refined"] = best_of(lambda: model.encode(x, device="cpu", method="exact", refine=True),
                                     args.encode_repeats)
    exact, exact_s = timed["exact"]
    ref = score(data, exact["angle"], exact["dx"], exact["dy"], exact["z"], free_convention=False)
    enc, encode_s = timed["encoder"]
    res = score(data, enc["angle"], enc["dx"], enc["dy"], enc["z"], free_convention=False)
    res.update(epochs_run=len(hist), train_seconds=train_s,
               train_windows_per_s=len(hist) * len(train_idx) / train_s, encode_windows_per_s=len(x) / encode_s,
               encode_exact_windows_per_s=len(x) / exact_s)
    for key, value in ref.items():
        if key.startswith("angle_consistency_"):
            res[f"exact_{key}"] = value
    for method in ("fast", "encoder", "exact_refined"):
        got, seconds = timed[method]
        scored = score(data, got["angle"], got["dx"], got["dy"], got["z"], free_convention=False)
        gaps = [abs(scored[k] - v) for k, v in ref.items() if k.startswith("angle_consistency_")]
        for key, value in scored.items():
            if key.startswith("angle_consistency_") and method == "exact_refined":
                res[f"{method}_{key}"] = value
        res[f"encode_{method}_windows_per_s"] = len(x) / seconds
        res[f"encode_{method}_vs_exact"] = exact_s / seconds
        res[f"angle_consistency_gap_{method}_vs_exact"] = max(gaps)
        res[f"same_rotation_{method}_vs_exact"] = float(
            np.mean(np.abs(np.angle(np.exp(1j * (got["angle"] - exact["angle"])))) < 0.2))
    return res


def run_pyroved(data, train_idx, args) -> dict:
    import pyroved as pv
    import torch

    x = data["windows"]
    size = x.shape[1]
    model = pv.models.iVAE((size, size), latent_dim=args.latent, invariances=["r", "t"], seed=args.seed)
    trainer = pv.trainers.SVItrainer(model, lr=args.lr)
    # pyroVED's default Bernoulli likelihood needs values in [0, 1].
    xt = torch.from_numpy(np.clip(x, 0, 1))
    loader = pv.utils.init_dataloader(xt[train_idx], batch_size=args.batch_size)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        trainer.step(loader)
    train_s = time.perf_counter() - t0
    (z_mean, _), encode_s = best_of(lambda: model.encode(xt, batch_size=256), args.encode_repeats)
    z_mean = z_mean.numpy()
    res = score(data, z_mean[:, 0], z_mean[:, 1], z_mean[:, 2], z_mean[:, 3:], free_convention=True)
    res.update(epochs_run=args.epochs, train_seconds=train_s,
               train_windows_per_s=args.epochs * len(train_idx) / train_s, encode_windows_per_s=len(x) / encode_s)
    return res


def run_atomai(data, train_idx, args) -> dict:
    import torch
    from atomai.models import rVAE

    x = data["windows"]
    size = x.shape[1]
    model = rVAE((size, size), latent_dim=args.latent, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # Uniform orientations: the README's wide rotational prior (pi/3) rather than 0.1 rad.
        model.fit(x[train_idx], training_cycles=args.epochs, batch_size=args.batch_size,
                  optimizer=lambda p: torch.optim.Adam(p, lr=args.lr), rotation_prior=np.pi / 3,
                  filename=os.path.join(tmp, "atomai_model"))
        train_s = time.perf_counter() - t0
    (z_mean, _), encode_s = best_of(lambda: model.encode(x), args.encode_repeats)
    z_mean = np.asarray(z_mean)
    res = score(data, z_mean[:, 0], z_mean[:, 1], z_mean[:, 2], z_mean[:, 3:], free_convention=True)
    res.update(epochs_run=args.epochs, train_seconds=train_s,
               train_windows_per_s=args.epochs * len(train_idx) / train_s, encode_windows_per_s=len(x) / encode_s)
    return res


def ensure_peers() -> str | None:
    """Install the peers into .peers when absent; None when importable, else the reason."""
    return install_peers(PEER_PACKAGES, "pyroved.models, atomai.models")


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60, help="simulated frames (default 60)")
    parser.add_argument("--particles", type=int, default=80, help="particles in view (default 80)")
    parser.add_argument("--window", type=int, default=32, help="window side, px (default 32)")
    parser.add_argument("--jitter", type=float, default=1.5, help="max |shift| of a window centre off the particle, px")
    parser.add_argument("--latent", type=int, default=2, help="content latents k (default 2)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of every model (default 15, the config default)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per batch of every model (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the peers (ours: the config default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every model (default: torch's choice, one per core); "
                             "1 gives steadier timings on a machine shared with other jobs")
    parser.add_argument("--encode-repeats", type=int, default=3,
                        help="encode every model this many times and report the shortest (default 3)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peer implementations")
    parser.add_argument("--encoder-channels", type=int, nargs="+", default=None,
                        help="our encoder's convolution channels (rvae.encoder_channels; default: the config's), "
                             "e.g. 8 16 16 for a trunk of about a third of the multiply-adds")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from rvae_tools.config import validate_section
    from rvae_tools.rvae.trainer import split_indices

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at start", flush=True)
    t0 = time.perf_counter()
    data = make_windows(args.frames, args.particles, args.window, args.jitter, args.seed)
    x = data["windows"]
    train_fraction = validate_section("rvae", {})["train_fraction"]
    train_idx, _ = split_indices(len(x), train_fraction, args.seed)
    counts = {n: int((data["cls"] == k).sum()) for k, n in enumerate(data["names"])}
    print(f"{len(x)} windows of {x.shape[1]}x{x.shape[2]} px ({counts}; symmetry {data['symmetry']}), "
          f"{len(train_idx)} trained on; {args.epochs} epochs, batch {args.batch_size}, "
          f"latent = angle + 2 shifts + {args.latent}; data in {time.perf_counter() - t0:.0f} s", flush=True)

    results: dict[str, dict] = {}
    runners = [("rvae_tools", run_ours)]
    peer_problem = "skipped (--no-peers)" if args.no_peers else ensure_peers()
    if peer_problem is None:
        sys.path[:0] = [str(SHIMS), str(PEERS)]
        runners += [("pyroved", run_pyroved), ("atomai", run_atomai)]
    for name, runner in runners:
        print(f"--- {name}", flush=True)
        torch.manual_seed(args.seed)
        try:
            res = runner(data, train_idx, args)
        except Exception as exc:  # noqa: BLE001 (a peer breaking must not hide our figures)
            traceback.print_exc()
            res = {"error": f"{type(exc).__name__}: {exc}"}
        results[name] = res
        for key, value in res.items():
            print(f"  {key:32s} {value:.4g}" if isinstance(value, float) else f"  {key:32s} {value}", flush=True)
    if peer_problem is not None:
        for name in ("pyroved", "atomai"):
            results[name] = {"unavailable": peer_problem}
        print(f"peers unavailable: {peer_problem}")

    ours = results["rvae_tools"]
    ratios = {}
    for name in ("pyroved", "atomai"):
        peer = results.get(name, {})
        for what in ("train_windows_per_s", "encode_windows_per_s"):
            if what in peer and what in ours:
                ratios[f"{what}_vs_{name}"] = ours[what] / peer[what]
    if ratios:
        print("--- speed-up of rvae_tools")
        for key, value in ratios.items():
            print(f"  {key:40s} {value:.2f}x")
    targets = {}
    if "error" not in ours:
        angles = [v for k, v in ours.items() if k.startswith("angle_consistency_")]
        targets = {
            "angle_consistency_ge_0.95": bool(min(angles) >= 0.95),
            "shift_correlation_ge_0.95": bool(ours["shift_correlation"] >= 0.95),
            "clustering_accuracy_ge_0.95": bool(ours["clustering_accuracy"] >= 0.95),
            "train_speedup_ge_3": bool(ratios) and all(v >= 3 for k, v in ratios.items() if k.startswith("train")),
            "encode_ge_faster_peer": bool(ratios) and min(v for k, v in ratios.items() if k.startswith("encode")) >= 1,
            "fast_encode_angle_within_0.01_of_exact": bool(ours["angle_consistency_gap_fast_vs_exact"] <= 0.01),
            "encoder_encode_angle_within_0.01_of_exact": bool(ours["angle_consistency_gap_encoder_vs_exact"] <= 0.01),
        }
        print("--- targets: " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in targets.items()))
    summary = {
        "n_windows": len(x), "window": int(x.shape[1]), "epochs": args.epochs, "batch_size": args.batch_size,
        "latent": args.latent, "encoder_channels": args.encoder_channels, "seed": args.seed, "threads": torch.get_num_threads(), "encode_repeats": args.encode_repeats,
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": results, "speedups": ratios, "targets": targets,
        "wall_seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

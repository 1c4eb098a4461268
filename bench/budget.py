#!/usr/bin/env python
"""Training budget (``rvae.max_windows``): accuracy and training time against the budget and the movie size.

The windows are those of ``bench/rvae.py`` (a simulated movie, uniformly random orientations,
two species with known angles). The rVAE is trained with each budget in turn on the windows of
the base movie, and with the smallest budget also on a movie with ``--scale`` times the frames,
then encodes every window. Printed per run: windows, budget, windows trained per epoch,
training seconds, encoding seconds, angle consistency per species (see bench/rvae.py) and
clustering accuracy. The budget is met when the consistency stays within 0.01 of the
all-windows run and training time does not grow with the movie. Last line: one JSON object.

    python bench/budget.py                                   # ~5-10 min on 2 CPU cores
    python bench/budget.py --frames 20 --epochs 3 --budgets all,600   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench_rvae():
    spec = importlib.util.spec_from_file_location("bench_rvae", ROOT / "bench" / "rvae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(data, budget, args, score) -> dict:
    from rvae_tools.rvae import RVAE

    x = data["windows"]
    model = RVAE(x.shape[1], latent_dim=args.latent, seed=args.seed, max_windows=budget, epochs=args.epochs)
    t0 = time.perf_counter()
    hist = model.fit(x, device="cpu", progress=False)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc = model.encode(x, device="cpu")
    encode_s = time.perf_counter() - t0
    res = {"n_windows": len(x), "budget": budget if budget is not None else "all",
           "trained_per_epoch": round(model.normalisation["n_training_windows"] * model.settings["train_fraction"]),
           "epochs_run": len(hist), "train_seconds": train_s, "encode_seconds": encode_s}
    res.update(score(data, enc["angle"], enc["dx"], enc["dy"], enc["z"], free_convention=False))
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60, help="frames of the base movie (default 60, the demo's)")
    parser.add_argument("--particles", type=int, default=80, help="particles in view (default 80, the demo's)")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--latent", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15, help="epochs (default 15, the config default)")
    parser.add_argument("--budgets", default="all,2400,1200",
                        help="comma-separated max_windows values; 'all' = no budget (default all,2400,1200)")
    parser.add_argument("--scale", type=int, default=2, help="frames factor of the larger movie (default 2; 0 = skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bench = _bench_rvae()
    budgets = [None if b.strip() == "all" else int(b) for b in args.budgets.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    t_start = time.perf_counter()
    base = bench.make_windows(args.frames, args.particles, args.window, 1.5, args.seed)
    runs = []
    for budget in budgets:
        runs.append(run(base, budget, args, bench.score))
        print(json.dumps(runs[-1], default=float), flush=True)
    if args.scale > 1:
        smallest = min((b for b in budgets if b is not None), default=None)
        big = bench.make_windows(args.frames * args.scale, args.particles, args.window, 1.5, args.seed)
        runs.append(run(big, smallest, args, bench.score))
        print(json.dumps(runs[-1], default=float), flush=True)

    print(f"{'windows':>8} {'budget':>7} {'per epoch':>9} {'train s':>8} {'encode s':>8}  angle consistency")
    for r in runs:
        angles = ", ".join(f"{k.removeprefix('angle_consistency_')} {v:.4f}" for k, v in r.items()
                           if k.startswith("angle_consistency_"))
        print(f"{r['n_windows']:>8} {r['budget']!s:>7} {r['trained_per_epoch']:>9} {r['train_seconds']:>8.1f} "
              f"{r['encode_seconds']:>8.1f}  {angles}; clustering {r['clustering_accuracy']:.3f}")
    reference = runs[0]
    keys = [k for k in reference if k.startswith("angle_consistency_")]
    drop = {str(r["budget"]) + "@" + str(r["n_windows"]): max(reference[k] - r[k] for k in keys) for r in runs[1:]}
    growth = None
    if args.scale > 1 and len(runs) >= 2:
        same_budget = [r for r in runs[:-1] if r["budget"] == runs[-1]["budget"]]
        if same_budget:
            growth = runs[-1]["train_seconds"] / same_budget[0]["train_seconds"]
            print(f"training time at budget {runs[-1]['budget']}: {growth:.2f}x for {args.scale}x the windows")
    summary = {"runs": runs, "max_consistency_drop": drop, "train_time_growth": growth, "scale": args.scale,
               "epochs": args.epochs, "threads": torch.get_num_threads(),
               "wall_seconds": time.perf_counter() - t_start}
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

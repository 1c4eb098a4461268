#!/usr/bin/env python
"""Peak memory of ``rvae-tools encode`` as the (trajectory x frame) grid grows: chunks against one chunk.

``encode`` lays its latents out on the grid of trajectories x frames. On a long, dense movie whose
tracks break into short trajectories that grid is far larger than the windows, so this writes a
windows store of just such trajectories: ``--per-trajectory`` windows each (rods of random angle
and noise) at random frames of a ``--frames``-frame movie, for each number of ``--trajectories``.
A small rVAE (``--epochs`` of training on the first store; memory does not depend on how well it
is trained) encodes every store in a clean child process (started from a small launcher, so
this process's own size, model training included, is not counted), whose peak resident memory is
read exactly when it exits (``wait4``), twice: with the default chunks of trajectories
(``rvae.encode_chunk_trajectories: null``) and with one chunk of every trajectory, which is what
encode held before it was chunked (the peer measured in the same run). Printed per size: grid
cells, windows, wall seconds and peak MB of both, and their ratio; then the memory growth
exponent of each (log-log slope of peak MB against grid cells: 0 = flat, 1 = linear). The
last line is one JSON object.

    python bench/encode_memory.py                                   # 1000 and 2000 trajectories x 4000 frames
    python bench/encode_memory.py --trajectories 250 500 --frames 2000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from _memory import chunked_against_one_chunk, peak_run

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 16
MODEL = {"latent_dim": 2, "encoder": "mlp", "encoder_hidden": [64], "decoder_hidden": [64], "batch_size": 64,
         "seed": 0}


def write_store(path: Path, n_trajectories: int, per_trajectory: int, n_frames: int, seed: int = 0) -> int:
    """A windows store of short trajectories spread over a long movie; returns its number of windows."""
    import xarray as xr

    from rvae_tools.io import write_zarr

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:WINDOW, 0:WINDOW] - (WINDOW - 1) / 2
    particle = np.repeat(np.arange(n_trajectories), per_trajectory)
    frame = np.concatenate([np.sort(rng.choice(n_frames, per_trajectory, replace=False))
                            for _ in range(n_trajectories)])
    angle = rng.uniform(-np.pi, np.pi, particle.size)[:, None, None]
    u, v = xx * np.cos(angle) + yy * np.sin(angle), -xx * np.sin(angle) + yy * np.cos(angle)
    windows = np.exp(-(u / 5.0) ** 2 - (v / 1.5) ** 2) + rng.normal(0, 0.05, (particle.size, WINDOW, WINDOW))
    order = np.lexsort((particle, frame))  # by frame, as rvae-tools windows writes them
    coords = {"particle": particle[order], "frame": frame[order],
              "x": rng.uniform(0, 2048, particle.size), "y": rng.uniform(0, 2048, particle.size)}
    ds = xr.Dataset({"window": (("obs", "wy", "wx"), windows[order].astype(np.float32))},
                    coords={name: ("obs", value) for name, value in coords.items()},
                    attrs={"n_frames": n_frames, "frame_first": 0, "frame_step": 1, "frame_interval": 1.0})
    write_zarr(ds, path, encoding={"window": {"chunks": (4096, WINDOW, WINDOW)}})
    return int(particle.size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, nargs="+", default=[1000, 2000])
    parser.add_argument("--frames", type=int, default=4000)
    parser.add_argument("--per-trajectory", type=int, default=3, help="windows per trajectory")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the stores under bench/out/")
    args = parser.parse_args(argv)

    from rvae_tools.config import validate_section
    from rvae_tools.rvae import RVAE

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="encode-memory-", dir=out))
    tool = shutil.which("rvae-tools", path=str(Path(sys.executable).parent)) or "rvae-tools"
    env_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    os.environ.update(env_threads)
    runs = []
    try:
        model_path = work / "model.pt"
        for n in args.trajectories:
            store = work / f"patches_{n}.zarr"
            n_windows = write_store(store, n, args.per_trajectory, args.frames, seed=n)
            if not model_path.exists():
                model = RVAE(WINDOW, **MODEL)
                model.fit([str(store)], epochs=args.epochs, progress=False, device="cpu")
                model.save(model_path)
            run = {"trajectories": n, "frames": args.frames, "cells": n * args.frames, "windows": n_windows}
            for label, chunk in (("chunked", None), ("one_chunk", n)):
                settings = validate_section("rvae", {**MODEL, "encode_chunk_trajectories": chunk})
                run[label] = peak_run([tool, "encode", str(store), str(model_path), "-o", str(work / f"{label}.zarr"),
                                       "--device", "cpu", "--no-progress", "--settings", json.dumps(settings)],
                                      what="bench/encode_memory.py")
                shutil.rmtree(work / f"{label}.zarr", ignore_errors=True)
            run["memory_ratio"] = round(run["chunked"]["peak_mb"] / run["one_chunk"]["peak_mb"], 3)
            runs.append(run)
            print(f"{n} trajectories x {args.frames} frames ({run['cells']} cells, {n_windows} windows): "
                  f"chunked {run['chunked']['peak_mb']:.0f} MB {run['chunked']['s']:.1f} s, one chunk "
                  f"{run['one_chunk']['peak_mb']:.0f} MB {run['one_chunk']['s']:.1f} s, ratio {run['memory_ratio']:.2f}",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = chunked_against_one_chunk("encode_memory", runs)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

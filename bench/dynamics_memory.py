#!/usr/bin/env python
"""Peak memory of ``rvae-tools dynamics`` as the number of trajectories grows: chunks against one chunk.

Writes a ``latents.zarr`` in the encode stage's layout for each number of ``--trajectories`` over
``--frames`` frames: random-walk positions at constant density, rods (n = 2) whose alignment
ramps up at mid-movie (``angle``, ``angle_sd``), two content latents ``z`` and shifts ``dx``,
``dy``; trajectories start and end at random frames. The stage runs on every store in a child
process, whose peak resident memory is read exactly when it exits (``wait4``; the stores are
written by another child, since a child's peak starts at its parent's size when forked), twice: with the
default chunk of trajectories (``dynamics.chunk``) and with one chunk of every trajectory (the
peer measured in the same run: what the stage holds when it is not chunked). Printed per size:
grid cells, wall seconds and peak MB of both, and their ratio; then the growth of each (peak at
the largest size over the smallest) and its log-log slope against the cells (0 = flat, 1 =
linear). The last line is one JSON object.

    python bench/dynamics_memory.py                                        # 1000 and 5000 trajectories x 500 frames
    python bench/dynamics_memory.py --trajectories 500 2000 --frames 200   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _memory import chunked_against_one_chunk, peak_run

ROOT = Path(__file__).resolve().parents[1]


def write_store(path: Path, n_trajectories: int, n_frames: int, seed: int = 0) -> None:
    """A latents store of ``n_trajectories`` x ``n_frames`` in the encode stage's layout and chunks."""
    import xarray as xr

    from rvae_tools.encode import _chunks
    from rvae_tools.io import write_zarr

    rng = np.random.default_rng(seed)
    shape = (n_trajectories, n_frames)
    side = 40.0 * np.sqrt(n_trajectories)  # constant density
    x = rng.uniform(0, side, (n_trajectories, 1)) + np.cumsum(rng.normal(0, 0.3, shape), axis=1)
    y = rng.uniform(0, side, (n_trajectories, 1)) + np.cumsum(rng.normal(0, 0.3, shape), axis=1)
    start = rng.integers(0, n_frames // 2, n_trajectories)
    stop = start + rng.integers(n_frames // 4, n_frames, n_trajectories)
    frame = np.arange(n_frames)[None, :]
    absent = (frame < start[:, None]) | (frame >= stop[:, None])
    kappa = 6.0 / (1 + np.exp(-(np.arange(n_frames) - n_frames / 2) / 5.0))
    theta = np.column_stack([rng.vonmises(0.0, k + 1e-9, n_trajectories) for k in kappa]) / 2
    z = rng.normal(size=(*shape, 2))
    grids = {"angle": theta, "angle_sd": np.full(shape, 0.1), "x": x, "y": y, "dx": np.zeros(shape),
             "dy": np.zeros(shape)}
    for value in grids.values():
        value[absent] = np.nan
    z[absent] = np.nan
    ds = xr.Dataset({k: (("particle", "frame"), v.astype(np.float32)) for k, v in grids.items()},
                    coords={"particle": np.arange(n_trajectories), "frame": np.arange(n_frames)},
                    attrs={"frame_interval": 0.5, "pixel_size": 2.0, "pixel_unit": "nm", "symmetry": 2})
    ds["z"] = (("particle", "frame", "latent"), z.astype(np.float32))
    write_zarr(ds, path, encoding={name: {"chunks": _chunks(ds[name].shape)} for name in ds.data_vars})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--bootstrap", type=int, default=50, help="resamples of the transition interval")
    parser.add_argument("--keep", action="store_true", help="keep the stores under bench/out/")
    parser.add_argument("--write-store", nargs=3, metavar=("PATH", "TRAJECTORIES", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_store:
        write_store(Path(args.write_store[0]), int(args.write_store[1]), args.frames, int(args.write_store[2]))
        return 0

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dynamics-memory-", dir=out))
    tool = shutil.which("rvae-tools", path=str(Path(sys.executable).parent)) or "rvae-tools"
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    runs = []
    try:
        for n in args.trajectories:
            store = work / f"latents_{n}.zarr"
            subprocess.run([sys.executable, __file__, "--frames", str(args.frames), "--write-store", str(store), str(n),
                            str(n)], check=True)
            run = {"trajectories": n, "frames": args.frames, "cells": n * args.frames}
            for label, chunk in (("chunked", None), ("one_chunk", max(n, 16))):
                settings = {"bootstrap": args.bootstrap, **({"chunk": chunk} if chunk else {})}
                run[label] = peak_run([tool, "dynamics", str(store), "-o", str(work / f"{label}.zarr"),
                                       "--settings", json.dumps(settings)], what="bench/dynamics_memory.py")
                shutil.rmtree(work / f"{label}.zarr", ignore_errors=True)
            run["memory_ratio"] = round(run["chunked"]["peak_mb"] / run["one_chunk"]["peak_mb"], 3)
            runs.append(run)
            print(f"{n} trajectories x {args.frames} frames ({run['cells']} cells): chunked "
                  f"{run['chunked']['peak_mb']:.0f} MB {run['chunked']['s']:.1f} s, one chunk "
                  f"{run['one_chunk']['peak_mb']:.0f} MB {run['one_chunk']['s']:.1f} s, ratio {run['memory_ratio']:.2f}",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = chunked_against_one_chunk("dynamics_memory", runs)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

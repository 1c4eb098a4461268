"""Segmentation benchmark: U-Net and trackpy.locate against simulated truth, and bulk_water counts.

Trains the U-Net with the default ``segment`` settings on the default simulator settings
(the training seed differs from every evaluation seed), then scores both methods on a
held-out simulated movie with another seed and another particle density, at the default
noise and at twice the noise (half the SNR). Prints one line per figure and ends with ONE
line holding a JSON object of every figure printed.

Usage: python bench/segmentation.py [--steps N] [--frames N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bulk_water"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the schema default)")
    parser.add_argument("--frames", type=int, default=20, help="frames of each held-out movie")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    args = parser.parse_args(argv)

    import torch

    from rvae_tools.config import validate_section
    from rvae_tools.device import select_device
    from rvae_tools.segment import SegmentationWarning, segment_movie, train_segmenter
    from rvae_tools.segment.metrics import detection_scores
    from rvae_tools.simulate import simulate

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", SegmentationWarning)
    figures: dict[str, float] = {}

    def report(name: str, value: float, unit: str = "") -> None:
        figures[name] = round(float(value), 4)
        print(f"{name}: {value:.4f}{(' ' + unit) if unit else ''}", flush=True)

    overrides = {"seed": args.seed}
    if args.steps:
        overrides["train"] = {"steps": args.steps}
    settings = validate_section("segment", overrides)
    sim_settings = validate_section("simulate", {})
    device = select_device("auto")
    start = time.perf_counter()
    model, config, history = train_segmenter(settings, sim_settings=sim_settings, device=device, progress=False)
    report("unet_train_seconds", time.perf_counter() - start, "s")
    report("unet_train_steps", len(history))

    # The baseline gets a fair chance: its diameter and minmass are tuned for F1 on a
    # simulation with the training settings (not on the held-out movie).
    tune = simulate(validate_section("simulate", {"frames": 6, "seed": args.seed + 7919}))
    radius = 0.5 * min(sp["width"] for sp in validate_section("simulate", {})["species"])
    best = (-1.0, None, None)
    for diameter in (7, 9, 11, 13, 15):
        loose = dict(settings, method="locate", locate=dict(settings["locate"], diameter=diameter, minmass=0))
        found, _ = segment_movie(tune.movie, loose)
        for minmass in np.quantile(found["mass"], np.linspace(0, 0.9, 19)):
            f1 = detection_scores(tune.truth, found[found["mass"] >= minmass], radius)["f1"]
            if f1 > best[0]:
                best = (f1, diameter, float(minmass))
    locate_settings = dict(settings["locate"], diameter=best[1], minmass=best[2])
    print(f"locate tuned on the training simulation: diameter {best[1]}, minmass {best[2]:.2f} (F1 {best[0]:.4f})")
    figures["locate_diameter"], figures["locate_minmass"] = best[1], round(best[2], 4)

    base = validate_section("simulate", {"frames": args.frames, "n_particles": 60, "seed": 12345})
    print(f"held-out movie: seed 12345, {args.frames} frames, n_particles 60 (training: seed {args.seed + 7919}, "
          f"60 frames, n_particles 80); match radius {radius} px (half the narrowest particle width)", flush=True)
    for label, snr in (("", base["noise"]["snr"]), ("_2x_noise", base["noise"]["snr"] / 2)):
        sim_cfg = dict(base, noise=dict(base["noise"], snr=snr))
        sim = simulate(sim_cfg)
        shape = sim.movie.shape[1:]
        for method in ("unet", "locate"):
            s = dict(settings, method=method, locate=locate_settings)
            t0 = time.perf_counter()
            det, _ = segment_movie(sim.movie, s, model=model, model_config=config, device=device)
            seconds = time.perf_counter() - t0
            scores = detection_scores(sim.truth, det, radius, shape=shape)
            report(f"{method}_f1{label}", scores["f1"])
            report(f"{method}_precision{label}", scores["precision"])
            report(f"{method}_recall{label}", scores["recall"])
            report(f"{method}_rmse_px{label}", scores["rmse"], "px")
            report(f"{method}_fps{label}", len(sim.movie) / seconds, "frames/s")
            if method == "unet" and config["classes"] > 1 and len(det):
                from rvae_tools.segment.metrics import match_points
                hits = total = 0
                for f, t in sim.truth.groupby("frame"):
                    d = det[det["frame"] == f]
                    ti, pi = match_points(t[["x", "y"]].to_numpy(), d[["x", "y"]].to_numpy(), radius)
                    hits += int((t["cls"].to_numpy()[ti] == d["cls"].to_numpy()[pi]).sum())
                    total += len(ti)
                report(f"unet_class_accuracy{label}", hits / max(total, 1))

    if DATA.is_dir():
        from skimage.io import imread
        bw = validate_section("segment", {"method": "locate", "invert": True, "locate": {"diameter": 11, "minmass": 20}})
        for frame in (29, 299):
            path = DATA / f"bulk_water_{frame:03d}.png"
            if not path.exists():
                continue
            # The green channel as float32, as `rvae-tools ingest` stores it.
            img = imread(path)[:, :, 1].astype(np.float32)[None]
            det, _ = segment_movie(img, bw)
            report(f"bulk_water_frame{frame}_count", len(det))
    else:
        print(f"bulk_water: {DATA} not found; counts skipped", flush=True)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tracking benchmark: trackpy's walkthrough on bulk_water, link accuracy on simulated movies, overhead.

Prints its figures as it goes and ends with ONE line: a JSON object of every figure printed.

1. bulk_water (../shared/data/bulk_water, all 300 frames): trackpy.batch with the walkthrough
   parameters (green channel, invert, diameter 11, minmass 20), then our stage with
   search_range 5, memory 3, min_length 25, the walkthrough's appearance filter, drift
   subtraction and the ensemble MSD at 100/285 um/px and 24 fps. Published: 13715 ids before
   and 1505 after filter_stubs, n = 1.08024, A = 1.602365 um^2/s.
2. Overhead: the time of our stage (in-process, and the `rvae-tools track` CLI with its I/O)
   against trackpy called directly on the same detections: tp.link alone, and the
   walkthrough chain (link, filter_stubs, appearance filter, compute/subtract_drift, emsd).
3. Link accuracy on the demo movie (simulate defaults) and on one with twice the particles,
   detections built from the truth with 0.3 px localisation noise, 3% missed, rows shuffled,
   linked with the default track settings (no stub filtering, so every link is scored).
4. A subnetwork trackpy cannot solve (dense lattice): trackpy raises, our stage finishes.

Run: python bench/tracking.py [--quick]   (--quick: 60 bulk_water frames, for a smoke test)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BULK_WATER = REPO.parent / "shared" / "data" / "bulk_water"
MPP, FPS = 100 / 285, 24.0
WALKTHROUGH = {"search_range": 5, "memory": 3, "min_length": 25,
               "select": {"mass": {"above": 50}, "size": {"below": 2.6}, "ecc": {"below": 0.3}}}

figures: dict[str, object] = {}


def report(key: str, value, text: str | None = None) -> None:
    figures[key] = value
    shown = f"{value:.6g}" if isinstance(value, float) else value
    print(f"{text or key}: {shown}", flush=True)


def settings(**over):
    from rvae_tools.config import validate_section

    s = validate_section("track", over)
    s["seed"] = 0
    return s


def bulk_water(n_frames: int | None) -> pd.DataFrame | None:
    import imageio.v3 as iio
    import trackpy as tp

    from rvae_tools.track import track

    if not BULK_WATER.is_dir():
        print(f"bulk_water: skipped, {BULK_WATER} not found", flush=True)
        return None
    files = sorted(BULK_WATER.glob("bulk_water_*.png"))[:n_frames]
    start = time.perf_counter()
    frames = [iio.imread(f)[:, :, 1] for f in files]
    tp.quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        features = tp.batch(frames, 11, minmass=20, invert=True, processes=1)
    report("bulk_water_frames", len(files))
    report("bulk_water_locate_s", time.perf_counter() - start, "bulk_water trackpy.batch time (s)")
    last = int(features["frame"].max())
    report("bulk_water_features_last_frame", int((features["frame"] == last).sum()),
           f"bulk_water features in frame {last} (published for 299: 624)")
    result = track(features, settings(**WALKTHROUGH), pixel_size=MPP, frame_interval=1 / FPS)
    s = result.stats
    report("bulk_water_ids_before_filter", s["n_trajectories_linked"], "bulk_water ids before filter_stubs (published 13715)")
    report("bulk_water_ids_after_filter", s["n_trajectories_after_min_length"], "bulk_water ids after filter_stubs(25) (published 1505)")
    report("bulk_water_ids_after_select", s["n_trajectories"], "bulk_water ids after the appearance filter")
    report("bulk_water_emsd_n", s["msd_power_law"]["n"], "bulk_water ensemble MSD exponent n (published 1.08024)")
    report("bulk_water_emsd_A", s["msd_power_law"]["A"], "bulk_water ensemble MSD prefactor A, um^2/s (published 1.602365)")
    long = result.trajectories[result.trajectories["length"] >= 25]
    report("bulk_water_median_D_um2_per_s", float(long["diffusion"].median()),
           "bulk_water median per-trajectory D of trajectories >= 25 detections, um^2/s (A/4 = 0.40)")
    return features


class _Clock:
    """Wall and CPU time of a block; CPU time is what other jobs on a shared machine cannot inflate."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return False


def overhead(features: pd.DataFrame, repeats: int = 2) -> None:
    import resource

    import trackpy as tp

    from rvae_tools.io import write_table
    from rvae_tools.track import track

    tp.quiet()
    walk = settings(**WALKTHROUGH)
    ours, link, chain = [], [], []
    for _ in range(repeats):
        # Interleaved, so that load from other jobs on the machine hits both sides alike.
        with _Clock() as c_chain:
            with _Clock() as c_link:
                linked = tp.link(features, 5, memory=3)
            long = tp.filter_stubs(linked, 25)
            sel = long[(long["mass"] > 50) & (long["size"] < 2.6) & (long["ecc"] < 0.3)]
            sel = tp.subtract_drift(sel.copy(), tp.compute_drift(sel))
            tp.emsd(sel, MPP, FPS)
        with _Clock() as c_ours:
            track(features, walk, pixel_size=MPP, frame_interval=1 / FPS)
        link.append(c_link)
        chain.append(c_chain)
        ours.append(c_ours)
    for what in ("wall", "cpu"):
        t_link = min(getattr(c, what) for c in link)
        t_chain = min(getattr(c, what) for c in chain)
        t_ours = min(getattr(c, what) for c in ours)
        report(f"trackpy_link_{what}_s", t_link, f"trackpy.link alone, {what} time (s)")
        report(f"trackpy_walkthrough_chain_{what}_s", t_chain,
               f"trackpy link + filter_stubs + select + drift + emsd, {what} time (s)")
        report(f"our_stage_{what}_s", t_ours, f"our track() stage on the same detections, same work, {what} time (s)")
        report(f"overhead_ratio_vs_trackpy_chain_{what}", t_ours / t_chain,
               f"ratio our stage / trackpy chain, {what} time (target <= 1.1)")
        report(f"overhead_ratio_vs_trackpy_link_{what}", t_ours / t_link,
               f"ratio our whole stage / trackpy.link alone, {what} time")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_table(features, tmp / "detections.parquet")
        cmd = [sys.executable, "-m", "rvae_tools.cli", "track", str(tmp / "detections.parquet"),
               "--settings", json.dumps(walk)]
        for name in ("tracks", "drift", "trajectories", "msd"):
            cmd += [f"--{name}", str(tmp / f"{name}.parquet")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli_wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    t_chain_cpu = min(c.cpu for c in chain)
    report("our_cli_wall_s", cli_wall, "rvae-tools track CLI end to end (imports, read, stage, 4 tables), wall (s)")
    report("our_cli_cpu_s", cli_cpu, "rvae-tools track CLI end to end, CPU (s)")
    report("overhead_ratio_cli_vs_trackpy_chain_cpu", cli_cpu / t_chain_cpu,
           "ratio CLI (with Python start-up and I/O) / trackpy chain (in-process), CPU time")


def accuracy(name: str, overrides: dict) -> None:
    from rvae_tools.simulate import simulate
    from rvae_tools.track import link_accuracy, track

    start = time.perf_counter()
    sim = simulate({"seed": 0, **overrides})
    truth = sim.truth
    rng = np.random.default_rng(0)
    det = truth[["frame", "x", "y", "cls"]].copy()
    det["x"] += rng.normal(0, 0.3, len(det))
    det["y"] += rng.normal(0, 0.3, len(det))
    det = det[rng.random(len(det)) > 0.03].sample(frac=1.0, random_state=0).reset_index(drop=True)
    result = track(det, settings(min_length=1))
    score = link_accuracy(result.tracks, truth, max_distance=3.0)
    per_frame = len(truth) / truth["frame"].nunique()
    report(f"{name}_particles_per_frame", float(per_frame), f"{name}: true particles per frame")
    report(f"{name}_link_accuracy", score["link_accuracy"], f"{name}: link accuracy ({score['n_links']} links scored)")
    report(f"{name}_purity", score["purity"], f"{name}: trajectory purity")
    report(f"{name}_oversize_subnetworks", len(result.stats["oversize_subnetworks"]), f"{name}: oversize subnetworks")
    report(f"{name}_s", time.perf_counter() - start, f"{name}: simulate + track + score time (s)")


def oversize() -> None:
    import trackpy as tp
    from trackpy.linking.utils import SubnetOversizeException

    from rvae_tools.track import check_detections, link_detections

    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(np.arange(21.0), np.arange(21.0)), -1).reshape(-1, 2)
    pts = np.concatenate([g + rng.normal(0, 0.05, g.shape), g + rng.normal(0, 0.05, g.shape)])
    det = pd.DataFrame({"frame": np.repeat([0, 1], len(g)), "x": pts[:, 0], "y": pts[:, 1]})
    try:
        tp.link(det, 1.5)
        raised = False
    except SubnetOversizeException:
        raised = True
    report("lattice_trackpy_raises", raised, "dense lattice, search_range 1.5: trackpy.link raises SubnetOversizeException")
    events = []
    t = time.perf_counter()
    linked = link_detections(check_detections(det), 1.5, events=events)
    report("lattice_our_s", time.perf_counter() - t, "dense lattice: our link with adaptive fallback (s)")
    same = (linked.groupby("particle").size() == 2).sum()
    report("lattice_fallback_events", len(events), "dense lattice: subnetworks re-linked adaptively (warned)")
    report("lattice_linked_fraction", float(same / len(g)), "dense lattice: fraction of particles linked across the 2 frames")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 bulk_water frames instead of 300")
    args = parser.parse_args()
    features = bulk_water(60 if args.quick else None)
    if features is not None:
        overhead(features, repeats=1 if args.quick else 2)
    accuracy("demo", {})
    accuracy("dense", {"n_particles": 160, "exclusion_scale": 0.8})
    oversize()
    # JSON has no NaN: a figure that could not be measured is null.
    clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in figures.items()}
    print(json.dumps(clean, sort_keys=True))


if __name__ == "__main__":
    main()

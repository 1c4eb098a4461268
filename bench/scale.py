"""How the whole workflow's wall time and peak memory grow with frames x particles.

Runs the workflow (locally, ``--cores N``) on simulated movies of 1x, 4x and 10x the demo's
frames x particles: frames and particles each grow by sqrt(factor), and the image area grows
with the particles so that the density (what tracking and window cutting see) stays that of
the demo. Reads each stage's wall time and peak resident memory from Snakemake's benchmark
files (results/benchmarks/<rule>/*.tsv: ``s``, ``max_rss`` in MB) and prints them; the last
line is one JSON object with every figure.

    python bench/scale.py                      # the demo (config/config.yaml) at 1x, 4x, 10x
    python bench/scale.py --base small         # the test-sized demo (tests/workflow_small.yaml): minutes
    python bench/scale.py --factors 1 4 --cores 2 --keep

Budget on 2 shared CPU cores (measured): --base small, factors 1 4 10: 6.5 min in all, and
at that size fixed costs (start-up, the segmenter's fixed training steps) and machine load
dominate, so it checks the mechanism rather than the growth. The default (the demo) takes
about 1 + 4 + 10 = 15 demo runs of wall time. Every run trains the same number of epochs
(early stopping off), so training time follows the number of windows only.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _workflow import SMALL_CONFIG, run_snakemake, write_config

from rvae_tools.config import validate_config

BASES = {"demo": REPO / "config" / "config.yaml", "small": SMALL_CONFIG}


def scaled_overrides(base: dict, factor: float) -> dict:
    """Simulator and training overrides for a movie ``factor`` times the base's frames x particles."""
    sim = base["simulate"]
    grow = math.sqrt(factor)
    side = math.sqrt(grow)  # image area grows like the particle count: same density
    overrides = {
        "movies": {"demo": {"simulate": {}}},
        "simulate": {
            "frames": max(1, round(sim["frames"] * grow)),
            "n_particles": max(1, round(sim["n_particles"] * grow)),
            "height": max(16, round(sim["height"] * side)),
            "width": max(16, round(sim["width"] * side)),
        },
    }
    transition = sim.get("transition", {})
    if transition.get("frame") is not None:
        # Same place in the movie's time course (the transition at the same fraction of frames).
        overrides["simulate"]["transition"] = {
            "frame": round(transition["frame"] * overrides["simulate"]["frames"] / sim["frames"])
        }
    if "patience" in base.get("rvae", {}):
        overrides["rvae"] = {"patience": 0}  # fixed epochs at every scale
    return overrides


def read_benchmarks(results: Path) -> dict[str, dict[str, float]]:
    """Per rule: wall seconds (summed over its jobs) and the largest max_rss (MB) of its jobs."""
    stages: dict[str, dict[str, float]] = {}
    for tsv in sorted((results / "benchmarks").glob("*/*.tsv")):
        rule = tsv.parent.name
        with tsv.open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        for row in rows:
            entry = stages.setdefault(rule, {"s": 0.0, "max_rss_mb": 0.0})
            entry["s"] += float(row["s"])
            rss = row.get("max_rss", "NA")
            if rss not in ("", "NA", "-"):
                entry["max_rss_mb"] = max(entry["max_rss_mb"], float(rss))
    return {rule: {k: round(v, 2) for k, v in fig.items()} for rule, fig in stages.items()}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): 1 = linear growth, 0 = flat."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3) if den else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=sorted(BASES), default="demo",
                        help="the config scaled: demo (config/config.yaml) or small (tests/workflow_small.yaml)")
    parser.add_argument("--factors", type=float, nargs="+", default=[1, 4, 10],
                        help="multiples of the base's frames x particles")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the run folders under bench/out/")
    args = parser.parse_args(argv)

    base_path = BASES[args.base]
    base = validate_config(yaml.safe_load(base_path.read_text()), source=str(base_path))
    out_root = REPO / "bench" / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="scale-", dir=out_root))
    runs = []
    try:
        for factor in args.factors:
            overrides = scaled_overrides(base, factor)
            folder = workdir / f"x{factor:g}"
            folder.mkdir()
            config = write_config(folder / "config.yaml", overrides, base=base_path)
            t0 = time.perf_counter()
            run_snakemake(folder, config, "--cores", str(args.cores), timeout=24 * 3600)
            wall = time.perf_counter() - t0
            stages = read_benchmarks(folder / "results")
            sim = overrides["simulate"]
            run = {
                "factor": factor, "frames": sim["frames"], "n_particles": sim["n_particles"],
                "height": sim["height"], "width": sim["width"], "wall_s": round(wall, 1),
                "peak_rss_mb": max((s["max_rss_mb"] for s in stages.values()), default=0.0),
                "stages": stages,
            }
            runs.append(run)
            print(f"x{factor:g}: {sim['frames']} frames, {sim['n_particles']} particles, "
                  f"{sim['height']}x{sim['width']} px: {wall:.1f} s wall, peak {run['peak_rss_mb']:.0f} MB")
            for rule, fig in stages.items():
                print(f"    {rule:<16} {fig['s']:9.2f} s  {fig['max_rss_mb']:9.1f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    factors = [r["factor"] for r in runs]
    rules = sorted({rule for r in runs for rule in r["stages"]})
    summary = {
        "benchmark": "scale", "base": args.base, "cores": args.cores, "runs": runs,
        # log-log slopes against the factor: time ~ factor^slope (1 = linear); memory slope near 0 = flat
        "time_slope": slope(factors, [r["wall_s"] for r in runs]),
        "memory_slope": slope(factors, [r["peak_rss_mb"] for r in runs]),
        "stage_time_slope": {rule: slope(factors, [r["stages"].get(rule, {}).get("s", 0) for r in runs]) for rule in rules},
        "stage_memory_slope": {rule: slope(factors, [r["stages"].get(rule, {}).get("max_rss_mb", 0) for r in runs])
                               for rule in rules},
    }
    if args.keep:
        summary["folder"] = str(workdir)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

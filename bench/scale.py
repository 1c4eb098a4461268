"""How the whole workflow's wall time, CPU time and peak memory grow with frames x particles.

Runs the workflow (locally, ``--cores N``) on simulated movies of 1x, 4x and 10x the demo's
frames x particles: frames and particles each grow by sqrt(factor), and the image area grows
with the particles so that the density (what tracking and window cutting see) stays that of
the demo. ``--size`` and ``--frames`` first set the base movie's frame size (px) and length
(the particle count follows the area, at the base's density).

Every stage is measured in a clean process of its own: the workflow's ``rvae-tools`` is, for
the run, a shim that runs the real command as its child and reads the child's resource usage
when it exits (``wait4``: peak resident memory of the child and its descendants, exact
rather than sampled, and user + system CPU seconds). Prints per stage the wall and CPU
seconds, peak memory and CPU seconds per frame at each size, and their growth exponents
(log-log slope against the factor: 1 = linear, 0 = flat); Snakemake's own (sampled)
benchmark files are kept in the JSON as ``snakemake_stages``. The last line is one JSON
object with every figure.

    python bench/scale.py                      # the demo (config/config.yaml) at 1x, 4x, 10x
    python bench/scale.py --base small         # the test-sized demo (tests/workflow_small.yaml): minutes
    python bench/scale.py --factors 1 4 --cores 2 --keep
    python bench/scale.py --base small --size 512 512 --factors 1 2 4 --cores 1

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
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _workflow import SMALL_CONFIG, run_snakemake, tool_env, write_config

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


#: The stand-in for ``rvae-tools`` put first on the workflow's PATH: runs the real command as
#: its child and appends one JSON line (command, wall and CPU seconds, peak RSS in MB) to the
#: file named by $RVAE_SCALE_LOG. Written as one os.write on an O_APPEND file, so jobs that
#: end together do not interleave their lines.
SHIM = """#!{python}
import json, os, sys, time
real = {real!r}
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(real, [real, *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
line = json.dumps({{
    "command": sys.argv[1] if len(sys.argv) > 1 else "",
    "wall_s": time.perf_counter() - start,
    "cpu_s": usage.ru_utime + usage.ru_stime,
    "max_rss_mb": usage.ru_maxrss / 1024.0,  # Linux: kB
    "rc": os.waitstatus_to_exitcode(status),
}}) + "\\n"
fd = os.open(os.environ["RVAE_SCALE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, line.encode())
os.close(fd)
sys.exit(max(0, os.waitstatus_to_exitcode(status)))
"""


def write_shim(folder: Path, real: str | None = None) -> Path:
    """A folder holding the measuring ``rvae-tools`` shim (to put first on PATH) that runs ``real``
    (default: this interpreter's ``rvae-tools``)."""
    if real is None:
        real = shutil.which("rvae-tools", path=str(Path(sys.executable).parent)) or shutil.which(
            "rvae-tools"
        )
    if real is None:
        raise SystemExit(
            "bench/scale.py: no rvae-tools on PATH; install the package (pip install -e .)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "rvae-tools"
    shim.write_text(SHIM.format(python=sys.executable, real=str(real)))
    shim.chmod(0o755)
    return folder


def read_usage(log: Path) -> dict[str, dict[str, float]]:
    """Per stage (rvae-tools command): wall and CPU seconds summed over its jobs, largest peak RSS (MB)."""
    stages: dict[str, dict[str, float]] = {}
    if not log.exists():
        return stages
    for line in log.read_text().splitlines():
        row = json.loads(line)
        entry = stages.setdefault(
            row["command"], {"jobs": 0, "s": 0.0, "cpu_s": 0.0, "max_rss_mb": 0.0}
        )
        entry["jobs"] += 1
        entry["s"] += row["wall_s"]
        entry["cpu_s"] += row["cpu_s"]
        entry["max_rss_mb"] = max(entry["max_rss_mb"], row["max_rss_mb"])
    return {stage: {k: round(v, 2) for k, v in fig.items()} for stage, fig in stages.items()}


def read_benchmarks(results: Path) -> dict[str, dict[str, float]]:
    """Per rule, from Snakemake's sampled benchmark files: wall and CPU seconds (summed over its
    jobs) and the largest max_rss (MB) of its jobs."""
    stages: dict[str, dict[str, float]] = {}
    for tsv in sorted((results / "benchmarks").glob("*/*.tsv")):
        rule = tsv.parent.name
        with tsv.open() as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        for row in rows:
            entry = stages.setdefault(rule, {"s": 0.0, "cpu_s": 0.0, "max_rss_mb": 0.0})
            entry["s"] += float(row["s"])
            for key, name in (("max_rss", "max_rss_mb"), ("cpu_time", "cpu_s")):
                value = row.get(key, "NA")
                if value in ("", "NA", "-"):
                    continue
                entry[name] = (
                    max(entry[name], float(value))
                    if name == "max_rss_mb"
                    else entry[name] + float(value)
                )
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


def resized_base(base: dict, size: list[int] | None, frames: int | None) -> dict:
    """``base`` with its movie set to ``size`` (height, width px) and ``frames`` frames; the particle
    count follows the frame area so that the density stays the base's."""
    base = json.loads(json.dumps(base))  # a copy
    sim = base["simulate"]
    if size is not None:
        area = size[0] * size[1] / (sim["height"] * sim["width"])
        sim["n_particles"] = max(1, round(sim["n_particles"] * area))
        sim["height"], sim["width"] = int(size[0]), int(size[1])
    if frames is not None:
        transition = sim.get("transition") or {}
        if transition.get("frame") is not None:
            transition["frame"] = round(transition["frame"] * frames / sim["frames"])
        sim["frames"] = int(frames)
    return base


def per_frame_table(runs: list[dict], stages: list[str]) -> list[str]:
    """Lines of a table: per stage, CPU seconds per frame and peak MB at each size."""
    head = f"    {'stage':<18}" + "".join(f"{'x' + format(r['factor'], 'g'):>22}" for r in runs)
    sub = f"    {'':<18}" + "".join(f"{'cpu s/frame   MB':>22}" for _ in runs)
    lines = [head, sub]
    for stage in stages:
        cells = []
        for r in runs:
            fig = r["stages"].get(stage)
            cells.append(
                f"{'-':>22}"
                if fig is None
                else f"{fig['cpu_s'] / r['frames']:>14.4f} {fig['max_rss_mb']:>7.0f}"
            )
        lines.append(f"    {stage:<18}" + "".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base",
        choices=sorted(BASES),
        default="demo",
        help="the config scaled: demo (config/config.yaml) or small (tests/workflow_small.yaml)",
    )
    parser.add_argument(
        "--factors",
        type=float,
        nargs="+",
        default=[1, 4, 10],
        help="multiples of the base's frames x particles",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        default=None,
        help="the base movie's frame size in px (particles follow the area: same density)",
    )
    parser.add_argument(
        "--frames", type=int, default=None, help="the base movie's number of frames"
    )
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the run folders under bench/out/")
    args = parser.parse_args(argv)

    base_path = BASES[args.base]
    base = validate_config(yaml.safe_load(base_path.read_text()), source=str(base_path))
    base = resized_base(base, args.size, args.frames)
    out_root = REPO / "bench" / "out"
    out_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="scale-", dir=out_root))
    shim = write_shim(workdir / "shim")
    runs = []
    try:
        for factor in args.factors:
            overrides = scaled_overrides(base, factor)
            folder = workdir / f"x{factor:g}"
            folder.mkdir()
            config = write_config(folder / "config.yaml", overrides, base=base_path)
            usage_log = folder / "usage.jsonl"
            env = tool_env(RVAE_SCALE_LOG=str(usage_log))
            env["PATH"] = f"{shim}{os.pathsep}{env['PATH']}"
            t0 = time.perf_counter()
            run_snakemake(folder, config, "--cores", str(args.cores), timeout=24 * 3600, env=env)
            wall = time.perf_counter() - t0
            stages = read_usage(usage_log)
            sim = overrides["simulate"]
            run = {
                "factor": factor,
                "frames": sim["frames"],
                "n_particles": sim["n_particles"],
                "height": sim["height"],
                "width": sim["width"],
                "wall_s": round(wall, 1),
                "cpu_s": round(sum(s["cpu_s"] for s in stages.values()), 2),
                "peak_rss_mb": max((s["max_rss_mb"] for s in stages.values()), default=0.0),
                "stages": stages,
                "snakemake_stages": read_benchmarks(folder / "results"),
            }
            runs.append(run)
            print(
                f"x{factor:g}: {sim['frames']} frames, {sim['n_particles']} particles, "
                f"{sim['height']}x{sim['width']} px: {wall:.1f} s wall, {run['cpu_s']:.1f} CPU s, "
                f"peak {run['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            for stage, fig in stages.items():
                print(
                    f"    {stage:<18} {fig['s']:9.2f} s wall {fig['cpu_s']:9.2f} s CPU {fig['max_rss_mb']:9.1f} MB",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    factors = [r["factor"] for r in runs]
    stages = sorted({stage for r in runs for stage in r["stages"]})

    def stage_slope(key: str, per_frame: bool = False) -> dict[str, float | None]:
        return {
            stage: slope(
                factors,
                [
                    r["stages"].get(stage, {}).get(key, 0) / (r["frames"] if per_frame else 1)
                    for r in runs
                ],
            )
            for stage in stages
        }

    print("per frame (CPU seconds per frame, peak resident MB):")
    for line in per_frame_table(runs, stages):
        print(line)
    summary = {
        "benchmark": "scale",
        "base": args.base,
        "size": args.size,
        "cores": args.cores,
        "runs": runs,
        # log-log slopes against the factor: time ~ factor^slope (1 = linear); memory slope near 0 = flat
        "time_slope": slope(factors, [r["wall_s"] for r in runs]),
        "cpu_slope": slope(factors, [r["cpu_s"] for r in runs]),
        "memory_slope": slope(factors, [r["peak_rss_mb"] for r in runs]),
        "stage_time_slope": stage_slope("s"),
        "stage_cpu_slope": stage_slope("cpu_s"),
        # frames grow by sqrt(factor): CPU per frame of a stage linear in windows grows like factor^0.5
        "stage_cpu_per_frame_slope": stage_slope("cpu_s", per_frame=True),
        "stage_memory_slope": stage_slope("max_rss_mb"),
    }
    if args.keep:
        summary["folder"] = str(workdir)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

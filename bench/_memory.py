"""Peak memory of a command in a clean process, shared by the memory benchmarks of ``bench/``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

# Linux records the peak of the memory an exec replaces in the new program's ru_maxrss, and a
# child starts as a copy of its parent: so wait4 on a direct child reads at least the parent's
# peak (a benchmark that trained a model first reads its own size). This small launcher is that
# copy instead; it forks and execs the command and reports the command's own peak.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "max_rss_kb": usage.ru_maxrss}))
"""


def peak_run(command: list[str], *, what: str = "bench") -> dict[str, float]:
    """Run ``command``; its wall seconds and peak resident MB (the command and its descendants).

    Raises ``SystemExit`` naming ``what`` and the command's last stderr when it fails.
    """
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, check=False)
    try:
        usage = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        usage = {"rc": proc.returncode, "max_rss_kb": float("nan")}
    if usage["rc"] != 0:
        raise SystemExit(f"{what}: {' '.join(command[:3])} failed:\n{proc.stderr[-2000:]}")
    return {"s": round(time.perf_counter() - start, 2), "peak_mb": round(usage["max_rss_kb"] / 1024.0, 1)}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x) (0 = flat, 1 = linear)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return round(sum((p[0] - mx) * (p[1] - my) for p in pts) / den, 3) if den else None


def chunked_against_one_chunk(benchmark: str, runs: list[dict]) -> dict:
    """Summary of runs each holding ``cells`` and the ``chunked`` and ``one_chunk`` peaks; printed."""
    cells = [r["cells"] for r in runs]

    def growth(label: str) -> float | None:
        return round(runs[-1][label]["peak_mb"] / runs[0][label]["peak_mb"], 3) if runs else None

    summary = {
        "benchmark": benchmark,
        "runs": runs,
        "chunked_memory_slope": slope(cells, [r["chunked"]["peak_mb"] for r in runs]),
        "one_chunk_memory_slope": slope(cells, [r["one_chunk"]["peak_mb"] for r in runs]),
        "chunked_growth": growth("chunked"),
        "one_chunk_growth": growth("one_chunk"),
    }
    if runs:
        print(f"memory growth from {cells[0]} to {cells[-1]} cells: chunked x{summary['chunked_growth']}, "
              f"one chunk x{summary['one_chunk_growth']}")
    return summary

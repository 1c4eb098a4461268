"""bench/scale.py's per-stage measurement: the shim that runs each stage as its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _bench import load_bench

scale = load_bench("scale")

# A stand-in stage: allocates and touches ~200 MB, burns ~0.3 s of CPU in a child process
# of its own (the shim must count descendants), then exits with the code it was given.
STAGE = """#!{python}
import subprocess, sys, time
buf = bytearray(200 * 1024 * 1024)
for i in range(0, len(buf), 4096):
    buf[i] = 1
subprocess.run([sys.executable, "-c", "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass"])
sys.exit(int(sys.argv[2]))
"""


def test_shim_measures_peak_memory_cpu_and_keeps_the_exit_code(tmp_path):
    stage = tmp_path / "stage"
    stage.write_text(STAGE.format(python=sys.executable))
    stage.chmod(0o755)
    shim = scale.write_shim(tmp_path / "shim", real=str(stage)) / "rvae-tools"
    log = tmp_path / "usage.jsonl"
    env = {**os.environ, "RVAE_SCALE_LOG": str(log)}
    assert subprocess.run([str(shim), "encode", "0"], check=False, env=env).returncode == 0
    assert subprocess.run([str(shim), "segment", "3"], check=False, env=env).returncode == 3
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["command"] for r in rows] == ["encode", "segment"]
    assert [r["rc"] for r in rows] == [0, 3]
    for row in rows:
        assert 200 <= row["max_rss_mb"] < 400
        assert row["cpu_s"] >= 0.27
        assert row["wall_s"] >= row["cpu_s"] * 0.5
    stages = scale.read_usage(log)
    assert set(stages) == {"encode", "segment"} and stages["encode"]["jobs"] == 1


def test_slope_is_the_growth_exponent():
    assert scale.slope([1, 2, 4], [3.0, 6.0, 12.0]) == 1.0
    assert scale.slope([1, 2, 4], [5.0, 5.0, 5.0]) == 0.0
    assert abs(scale.slope([1, 4], [2.0, 4.0]) - 0.5) < 1e-3


def test_memory_benchmarks_count_the_command_not_the_process_that_starts_it():
    """Linux carries a parent's peak into an exec'd child's ru_maxrss; the launcher must not."""
    memory = load_bench("_memory")
    ballast = bytearray(600 * 2**20)
    ballast[:: 4096] = b"\x01" * len(ballast[:: 4096])  # resident, not just reserved
    stage = [sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'\\x01' * len(b[::4096])"]
    run = memory.peak_run(stage)
    assert 200 <= run["peak_mb"] < 400, run
    del ballast
    with pytest.raises(SystemExit, match="bench: .* failed"):
        memory.peak_run([sys.executable, "-c", "import sys; sys.exit(3)"])

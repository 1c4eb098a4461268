"""Fault injection (fast part; bench/faults.py runs the whole suite with kills of every stage).

Every bad input of the table in tests/_faults.py must give exit code 2 and one error line
naming the file and the field, no traceback, nothing at the output path. A case that belongs
to a slice not yet delivered is reported as an expected failure naming that slice (and passes
as soon as it is fixed). A SIGKILLed write, rerun, gives the same output as an uninterrupted
run and leaves no temporary behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import _faults
import numpy as np
import pytest

from rvae_tools.io import open_zarr

CASES = _faults.all_cases()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return _faults.build_fixtures(tmp_path_factory.mktemp("fault_fixtures"))


def test_the_table_is_large_enough():
    assert len(CASES) >= 80
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_gives_one_clear_line(case, fixtures, tmp_path):
    if "no-cuda" in case.tags:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    outcome = _faults.run_case(case, tmp_path, fixtures)
    if outcome.verdict != "clear" and case.owner:
        pytest.xfail(f"{case.owner}: {outcome.verdict} ({outcome.detail})")
    assert outcome.verdict == "clear", f"{outcome.verdict}: {outcome.detail}; error line: {outcome.error_line!r}"


def test_killed_ingest_reruns_to_the_same_store_without_leftovers(tmp_path):
    rng = np.random.default_rng(5)
    source = tmp_path / "movie.npy"
    np.save(source, rng.random((150, 96, 96), dtype=np.float32))
    reference = tmp_path / "reference.zarr"
    out = tmp_path / "out" / "movie.zarr"
    ingest = [sys.executable, "-m", "rvae_tools.cli", "ingest", str(source)]
    start = time.perf_counter()
    subprocess.run([*ingest, "-o", str(reference)], check=True, capture_output=True, timeout=120)
    elapsed = time.perf_counter() - start
    killed_mid_write = 0
    for delay in rng.uniform(0.25, 0.9, size=3) * elapsed:
        proc = subprocess.Popen([*ingest, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write += proc.wait() == -signal.SIGKILL
        else:
            proc.wait()
    assert killed_mid_write >= 1, "no kill landed while ingest was running"
    subprocess.run([*ingest, "-o", str(out)], check=True, capture_output=True, timeout=120)
    assert sorted(p.name for p in out.parent.iterdir()) == ["movie.zarr"], "temporaries left behind"
    a, b = open_zarr(reference, required=["image"]), open_zarr(out, required=["image"])
    np.testing.assert_array_equal(a["image"].values, b["image"].values)
    assert a.attrs["sha256"] == b.attrs["sha256"]

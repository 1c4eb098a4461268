"""A workflow killed mid-way (power cut, OOM killer, scancel) picks up where it was.

One run of the small workflow is killed (SIGKILL, no chance to clean up) while the rVAE
trains, once at least two epoch checkpoints exist; the rerun must continue from the newest
checkpoint, not from epoch 1. That rerun is killed while the latents store is being written;
no half-written latents.zarr may be left where Snakemake or a reader would take it for
finished. The last rerun completes, and everything equals an uninterrupted run of the same
config and seed: resuming changes no number.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from _workflow import (
    compare_results,
    planned_jobs,
    run_snakemake,
    shared_small_config,
    shared_small_run,
    snakemake_args,
    tool_env,
    write_config,
)

from rvae_tools.config import stage_settings, validate_config

pytestmark = pytest.mark.slow

_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


def _start(workdir: Path, config: Path) -> subprocess.Popen:
    """Start the workflow in its own session, so that it and every job it spawns can be killed."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "snakemake.out", "a") as log:  # the child keeps its own descriptor
        return subprocess.Popen(snakemake_args(workdir, config, "--cores", "2"), cwd=workdir, env=tool_env(),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the session ``proc`` leads (Snakemake and its jobs), as a crash
    would; only processes this test started are in that session."""
    sid = proc.pid
    for _ in range(20):
        victims = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == sid:
                        victims.append(int(entry.name))
                except OSError:
                    continue
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)
    proc.wait(timeout=30)


def _checkpoints(results: Path) -> dict[int, Path]:
    """Epoch checkpoints of the rVAE trainer (os.walk: folders may vanish while it looks)."""
    found = {}
    for folder, _, files in os.walk(results / "models" / "rvae"):
        for name in files:
            m = _EPOCH_FILE.match(name)
            if m:
                found[int(m.group(1))] = Path(folder) / name
    return found


def _encode_writing(results: Path):
    """The temporary latents store while encode writes it, True once the final one exists."""
    try:
        names = os.listdir(results / "demo")
    except FileNotFoundError:
        return None
    tmp = [n for n in names if n.startswith(".latents.zarr.tmp-")]
    return tmp or ("latents.zarr" in names)


def _wait(what: str, condition, proc: subprocess.Popen, timeout: float, poll: float):
    """Poll ``condition()`` until it returns something truthy; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            return None
        time.sleep(poll)
    _kill_session(proc)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _unlock(workdir: Path, config: Path) -> None:
    # A killed Snakemake leaves its lock behind; a user runs `snakemake --unlock` first, too.
    run_snakemake(workdir, config, "--unlock", "--cores", "1")


def test_killed_workflow_resumes_training_and_leaves_no_corrupt_store(tmp_path, tmp_path_factory):
    rules = {job["rule"] for job in planned_jobs(tmp_path / "plan", write_config(tmp_path / "plan.yaml"))}
    missing = {"train", "encode"} - rules
    if missing:
        pytest.skip(f"the workflow has no {' and '.join(sorted(missing))} rule yet")

    reference = shared_small_run(tmp_path_factory)  # uninterrupted run, same config and seed
    config = shared_small_config()
    settings = stage_settings(validate_config(yaml.safe_load(config.read_text())), "rvae", "demo")
    epochs = settings["epochs"]
    work = tmp_path / "killed"
    results = work / "results"

    # 1. Kill during training, once two epochs are checkpointed.
    proc = _start(work, config)
    got = _wait("the second epoch checkpoint", lambda: max(_checkpoints(results), default=0) >= 2, proc, 900,
                poll=0.02)
    _kill_session(proc)
    assert got, f"the run ended before writing two epoch checkpoints:\n{(work / 'snakemake.out').read_text()[-3000:]}"
    last = max(_checkpoints(results))
    assert last < epochs, (
        f"training finished ({last} of {epochs} epochs) before the kill; raise rvae.epochs in tests/workflow_small.yaml"
    )
    assert not (results / "demo" / "latents.zarr").exists()

    # 2. Rerun: training must resume after epoch `last`. Kill it again while encode writes.
    _unlock(work, config)
    encode_caught = False
    for attempt in range(3):
        proc = _start(work, config)
        tmp = _wait("encode to start writing latents.zarr", lambda: _encode_writing(results), proc, 900,
                    poll=0.001)
        _kill_session(proc)
        if attempt == 0:
            _check_resumed(results, last, epochs)
        if isinstance(tmp, list):
            encode_caught = True
            # Killed while the store was half-written: nothing may sit at the final path.
            assert not (results / "demo" / "latents.zarr").exists(), "a half-written latents.zarr was left in place"
            break
        # The write was too quick to catch: remove the store so the next run encodes again.
        _unlock(work, config)
        shutil.rmtree(results / "demo" / "latents.zarr")
    assert encode_caught, "could not kill the workflow while encode was writing latents.zarr (3 tries)"

    # 3. The last rerun completes, and the results equal the uninterrupted run's.
    _unlock(work, config)
    run_snakemake(work, config, "--cores", "2")
    compared = compare_results(reference / "results", results)
    assert any(c.startswith("demo/latents.zarr") for c in compared), compared
    print(f"killed after epoch {last} of {epochs}; resumed; killed while writing latents (try {attempt + 1}); rerun equal: "
          + ", ".join(compared))


def _check_resumed(results: Path, last: int, epochs: int) -> None:
    """The rerun's training log shows it continued from checkpoint ``last``."""
    logs = sorted((results / "logs").glob("train/*.log"))
    assert logs, f"no training log under {results / 'logs' / 'train'}"
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    trained = [int(m.group(1)) for m in re.finditer(r"epoch (\d+)/(\d+)", text)]
    assert "resuming from" in text, f"the rerun did not resume from a checkpoint:\n{text[-3000:]}"
    assert trained and trained[0] == last + 1, (
        f"the rerun trained epochs {trained} (expected to continue at {last + 1} of {epochs}):\n{text[-3000:]}"
    )

"""`rule all` requests every contract file: a missing output is rebuilt, never reported up to
date because what lies downstream of it still exists. Checked on a results tree of
placeholder files (Snakemake decides from paths and times, so no stage has to run)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from _workflow import SNAKEFILE, tool_env


def _snakemake(work: Path, configfile: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(work),
         "--cores", "1", "--workflow-profile", "none", "--configfile", str(configfile), *args],
        cwd=work, env=tool_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _planned(out: str) -> dict[str, list[str]]:
    """rule -> its jobs' outputs (and 'all' -> its inputs) in a dry-run listing."""
    jobs: dict[str, list[str]] = {}
    rule = None
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):\s*$", line)
        if m:
            rule = m.group(1)
            jobs.setdefault(rule, [])
        m = re.match(r"^\s+(output|input): (.*)$", line)
        if m and rule and (m.group(1) == "output") != (rule == "all"):
            jobs[rule] += m.group(2).split(", ")
    return jobs


def test_every_output_is_a_target_and_a_missing_one_is_rebuilt(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    configfile = tmp_path / "c.yaml"
    configfile.write_text(yaml.safe_dump({"movies": {
        "a": {"simulate": {"frames": 5}},
        "b": {"simulate": {"frames": 5}, "segment": {"method": "locate"}},
    }}))
    jobs = _planned(_snakemake(work, configfile, "--dry-run", "--forceall"))
    outputs = {path for rule, paths in jobs.items() if rule != "all" for path in paths}
    assert outputs == set(jobs["all"]), f"not requested by rule all: {sorted(outputs - set(jobs['all']))}"
    for required in ("results/a/latents.zarr", "results/b/patches.zarr", "results/a/probability.zarr",
                     "results/b/drift.parquet", "results/a/truth.parquet", "results/models/rvae/pooled/model.pt",
                     "results/models/segmenter/a.pt"):
        assert required in jobs["all"]

    # A complete tree of placeholder outputs, touched in DAG order: up to date.
    for path in outputs:
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.mkdir() if path.endswith(".zarr") else target.touch()
    _snakemake(work, configfile, "--touch")
    assert "Nothing to be done" in _snakemake(work, configfile, "--dry-run")

    # Lose outputs in the middle of the pipeline (as a killed --forcerun does): rebuilt.
    shutil.rmtree(work / "results/a/latents.zarr")
    (work / "results/b/drift.parquet").unlink()
    (work / "results/models/rvae/pooled/history.csv").unlink()
    planned = _planned(_snakemake(work, configfile, "--dry-run"))
    rebuilt = {path for rule, paths in planned.items() if rule != "all" for path in paths}
    assert {"results/a/latents.zarr", "results/b/drift.parquet", "results/models/rvae/pooled/history.csv"} <= rebuilt

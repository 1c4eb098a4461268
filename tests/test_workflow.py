"""The Snakemake workflow: lint-clean, validated config, full dry run, and the demo's first rules run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from rvae_tools.io import open_zarr, read_table

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake is not installed")

#: Every stage rule of the workflow, in pipeline order.
STAGE_RULES = ["simulate", "ingest", "train_segmenter", "segment", "track", "windows", "train",
               "encode", "dynamics", "figures"]


def snakemake(repo: Path, workdir: Path, *args: str, config: dict | None = None, timeout: int = 600):
    """Run Snakemake on the repository's Snakefile in ``workdir`` and return the finished process."""
    cmd = ["snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args]
    if config is not None:
        # last: --configfile takes several values and would swallow a target after it
        path = workdir / "test-config.yaml"
        path.write_text(yaml.safe_dump(config))
        cmd += ["--configfile", str(path)]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(cmd, check=False, cwd=workdir, capture_output=True, text=True, timeout=timeout, env=env)


def test_lint_is_clean(repo):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["snakemake", "--lint"], check=False, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_dry_run_plans_every_stage(repo, tmp_path):
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["results"] = str(tmp_path / "results")
    proc = snakemake(repo, tmp_path, "-n", config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rule in STAGE_RULES:
        assert f"rule {rule}:" in proc.stdout, f"rule {rule} missing from the dry run:\n{proc.stdout}"


def test_bad_config_stops_before_any_rule(repo, tmp_path):
    proc = snakemake(repo, tmp_path, "-n", config={"seed": 0, "movies": {"demo": {"simulate": {}}}, "trak": {}})
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "invalid configuration" in line]
    assert lines and "unknown key 'trak'" in lines[0]
    assert not (tmp_path / "results").exists()


def test_demo_simulate_and_ingest_run(repo, tmp_path):
    config = {
        "seed": 3,
        "results": str(tmp_path / "results"),
        "movies": {"demo": {"simulate": {"frames": 6}}},
    }
    movie = tmp_path / "results" / "demo" / "movie.zarr"
    proc = snakemake(repo, tmp_path, str(movie), config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ds = open_zarr(movie, required=["image"])
    assert ds["image"].dims == ("frame", "y", "x") and ds["image"].dtype == np.float32
    assert ds.sizes["frame"] == 6
    assert ds.attrs["pixel_size"] > 0 and ds.attrs["frame_interval"] > 0 and len(ds.attrs["sha256"]) == 64
    truth = read_table(tmp_path / "results" / "demo" / "truth.parquet",
                       required=["frame", "particle", "x", "y", "angle", "cls"])
    assert sorted(truth["frame"].unique()) == list(range(6))
    for rule in ("simulate", "ingest"):
        assert (tmp_path / "results" / "logs" / rule / "demo.log").exists()
        assert (tmp_path / "results" / "benchmarks" / rule / "demo.tsv").exists()

"""A user's config is the user's: `snakemake --configfile my.yaml` with `movies:` replaces the
workflow's default movies (no demo added, the pooled model trained on the user's movies only),
and Snakemake-side config errors name the file and line before any rule runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from _workflow import SNAKEFILE, tool_env

REPO = Path(__file__).resolve().parents[1]


def _dry_run(work: Path, *configfiles: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # The workflow's own config/config.yaml (the demo) is there, as in a checkout.
    (work / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "config.yaml", work / "config" / "config.yaml")
    args = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(work),
            "--dry-run", "--forceall", "--cores", "1", "--workflow-profile", "none"]
    if configfiles:
        args += ["--configfile", *map(str, configfiles)]
    args += list(extra)
    return subprocess.run(args, cwd=work, env=tool_env(), capture_output=True, text=True, timeout=300, check=False)


def _jobs(out: str) -> list[tuple[str, str]]:
    """(rule, wildcards-and-inputs text) of each planned job."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m:
            jobs.append((m.group(1), block))
    return jobs


def test_configfile_movies_replace_the_demo(tmp_path):
    work = tmp_path / "work"
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"movies": {"mine": {"simulate": {"frames": 5}}, "other": {"simulate": {}}}}))
    proc = _dry_run(work, mine)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = _jobs(proc.stdout + proc.stderr)
    simulated = sorted(re.search(r"wildcards: movie=(\S+)", b).group(1) for r, b in jobs if r == "simulate")
    assert simulated == ["mine", "other"]
    train = [b for r, b in jobs if r == "train"]
    assert len(train) == 1 and "results/mine/patches.zarr" in train[0] and "results/other/patches.zarr" in train[0]
    assert "demo" not in proc.stdout

    # Without movies of its own, a user's file keeps the default movie list.
    seed_only = tmp_path / "seed.yaml"
    seed_only.write_text("seed: 4\n")
    proc = _dry_run(work, seed_only)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [re.search(r"movie=(\S+)", b).group(1) for r, b in _jobs(proc.stdout) if r == "simulate"] == ["demo"]


def test_snakemake_config_errors_name_the_file_and_line(tmp_path):
    work = tmp_path / "work"
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\nmovies:\n  a: {simulate: {}}\nseed: 2\n")
    proc = _dry_run(work, dup)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    line = next(line for line in out.splitlines() if "invalid configuration" in line)
    assert f"{dup}: line 4: duplicate key 'seed'" in line

    bad = tmp_path / "bad.yaml"
    bad.write_text("movies:\n  a: {simulate: {height: 24, width: 30}}\n")
    proc = _dry_run(work, bad)
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "invalid configuration" in line)
    assert str(bad) in line and "movies.a.windows.size" in line and "do not fit" in line
    assert not (work / "results").exists()


def test_snakemake_stops_on_a_device_this_machine_lacks(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # the check passes on a machine with CUDA; test_config covers the message
    config = tmp_path / "cuda.yaml"
    config.write_text("device: cuda:3\nmovies:\n  a: {simulate: {}}\n")
    proc = _dry_run(tmp_path / "work", config)
    assert proc.returncode != 0
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "invalid configuration" in line)
    assert "device: 'cuda:3'" in line and "no CUDA device" in line


def test_broken_default_config_names_line_and_column(tmp_path):
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    broken = (REPO / "config" / "config.yaml").read_text().replace("seed: 0 ", "seed: [0 ", 1)
    assert broken != (REPO / "config" / "config.yaml").read_text()
    (work / "config" / "config.yaml").write_text(broken)
    args = [sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(work),
            "--dry-run", "--cores", "1", "--workflow-profile", "none"]
    proc = subprocess.run(args, cwd=work, env=tool_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    line = next(line for line in (proc.stdout + proc.stderr).splitlines() if "invalid configuration" in line)
    assert re.search(r"config/config\.yaml: line \d+, column \d+: not valid YAML", line), line


def test_a_movie_with_labels_trains_the_semi_supervised_model(tmp_path):
    import json
    import shlex

    work = tmp_path / "work"
    (work / "labels").mkdir(parents=True)
    (work / "labels" / "mine.csv").write_text("particle,class\n0,rod\n1,tadpole\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"movies": {"mine": {"simulate": {"frames": 5}, "labels": "labels/mine.csv"},
                                               "other": {"simulate": {}}}}))
    (work / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "config.yaml", work / "config" / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(SNAKEFILE), "--directory", str(work),
                           "--configfile", str(mine), "--dry-run", "--printshellcmds", "--forceall", "--cores", "1",
                           "--workflow-profile", "none", "results/models/rvae/pooled/model.pt"],
                          cwd=work, env=tool_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = [b for r, b in _jobs(proc.stdout + proc.stderr) if r == "train"]
    assert len(train) == 1 and "labels/mine.csv" in train[0]  # an input: a changed labels file retrains
    command = shlex.split(re.search(r"rvae-tools train .*", train[0]).group(0).split(">")[0])
    at = command.index("--movie-labels")
    assert command[at + 1:at + 3] == ["mine", "labels/mine.csv"] and command.count("--movie-labels") == 1
    settings = json.loads(command[command.index("--settings") + 1])
    assert settings["model"] == "ssrvae"  # rvae.model left unset: the labels make it semi-supervised
    # ... and every movie the model encodes gets its classes and class figures.
    proc = _dry_run(work, mine, extra=("--printshellcmds",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    classify = {re.search(r"wildcards: movie=(\S+)", b).group(1): b for r, b in _jobs(proc.stdout)
                if r in ("classify", "classify_with_reference")}
    assert sorted(classify) == ["mine", "other"]
    assert "results/mine/figures/class_manifold.png" in proc.stdout
    # Both have a reference class per window, so both get the confusion matrix: the labels table
    # for the labelled movie, the simulator's truth for the other.
    for movie, reference in (("mine", ["--labels", "labels/mine.csv"]), ("other", ["--truth", "results/other/truth.parquet"])):
        command = shlex.split(re.search(r"rvae-tools classify .*", classify[movie]).group(0).split(">")[0])
        at = command.index(reference[0])
        assert command[at:at + 2] == reference, command
        assert f"results/{movie}/figures/class_confusion.png" in classify[movie]

    # A labels path that does not exist, or a model that cannot learn from labels, stops before any rule.
    for entry, message in (({"labels": "labels/none.csv"}, "movies.mine.labels: labels/none.csv not found"),
                           ({"labels": "labels/mine.csv", "rvae": {"model": "jrvae", "classes": 2}},
                            "rvae.model jrvae does not learn from labels")):
        mine.write_text(yaml.safe_dump({"movies": {"mine": {"simulate": {}, **entry}}}))
        proc = _dry_run(work, mine)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr

"""Every documented example in README.md and config/README.md runs as written: each YAML
block is a config that passes validation and the checks made before any rule (its movie
files exist and fit); each shell command either runs (``rvae-tools ...``) or is planned by
Snakemake (``snakemake ...`` as a dry run from the repository root); the trackpy walkthrough
config detects, links and filters the real bulk_water movie."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _workflow import shared_small_run, tool_env

from rvae_tools.cli import main
from rvae_tools.config import check_config, parse_yaml, validate_config
from rvae_tools.io import read_table

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "config" / "README.md"]

# Commands of the examples that a test run does not execute, and why: installing packages,
# entering the virtual environment, administering a local SLURM (root), the test suite itself.
NOT_RUN = re.compile(r"^(python3 -m venv|pip install|\. \.venv/bin/activate|sudo |python -m pytest)")


def _blocks(language: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced code block of ``language`` in the documents."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
            if m.group(1) == language:
                line = text[: m.start()].count("\n") + 1
                found.append((f"{doc.relative_to(REPO)}:{line}", m.group(2)))
    return found


def _commands() -> list[tuple[str, str]]:
    """(where, command) of every distinct command of the shell examples (split at &&)."""
    commands: dict[str, str] = {}
    for where, text in _blocks("bash"):
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in filter(None, (p.strip() for p in line.split("&&"))):
                commands.setdefault(part, where)
    return [(where, command) for command, where in commands.items()]


def test_the_documents_have_examples():
    assert len(_blocks("yaml")) >= 3 and len(_commands()) >= 8


@pytest.mark.parametrize(("where", "text"), _blocks("yaml"), ids=[w for w, _ in _blocks("yaml")])
def test_yaml_example_is_a_valid_config(where, text, tmp_path, monkeypatch, shared_data):
    config = validate_config(parse_yaml(text, where), source=where)
    # Run from a checkout-like folder: ../shared/data is the real data beside the repository,
    # other movie paths are example names, for which a movie of that kind is made.
    root = tmp_path / "checkout"
    root.mkdir()
    (tmp_path / "shared").symlink_to(shared_data.parent)
    monkeypatch.chdir(root)
    for movie in config["movies"].values():
        path = Path(movie.get("path", ""))
        if "path" in movie and not path.exists():
            import tifffile

            assert path.suffix == ".tif", f"{where}: example movie {path} is not a TIFF"
            path.parent.mkdir(parents=True, exist_ok=True)
            channels = (movie.get("channel") or 0) + 1
            frames = np.zeros((3, 64, 64, max(channels, 3)), np.uint8) if channels > 1 else np.zeros((3, 64, 64), np.uint8)
            tifffile.imwrite(path, frames, photometric="rgb" if channels > 1 else "minisblack")
    shapes = check_config(config, source=where, device=False)
    assert all(shape is not None for shape in shapes.values())


@pytest.mark.parametrize(("where", "command"), _commands(), ids=[f"{w} {c[:40]}" for w, c in _commands()])
def test_shell_example_runs(where, command, tmp_path, tmp_path_factory):
    if NOT_RUN.match(command):
        return  # see NOT_RUN
    args = shlex.split(command)
    assert args[0] in ("snakemake", "rvae-tools"), f"{where}: no test runs `{command}`; add it"
    cwd = REPO
    if args[0] == "snakemake":
        args += ["--dry-run"]
    elif any(arg.startswith("results/") for arg in args):
        # A command on the workflow's outputs: run where the (small) demo workflow has run,
        # in a copy, so that the shared run stays as the workflow left it.
        cwd = tmp_path / "run"
        shutil.copytree(shared_small_run(tmp_path_factory), cwd, symlinks=True)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / args[0]), *args[1:]],
        cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"{where}: `{command}` failed:\n{(proc.stdout + proc.stderr)[-3000:]}"


def test_trackpy_walkthrough_filter_runs_on_bulk_water(tmp_path, monkeypatch, shared_data):
    """The walkthrough config, on a quarter of the first 26 frames of the real movie (for
    time; the filter is the documented one): its
    `select` names columns the detections have, and keeps a non-empty, filtered subset."""
    (where, text), = [(w, t) for w, t in _blocks("yaml") if "select:" in t and "bulk_water" in t]
    root = tmp_path / "checkout"
    root.mkdir()
    (tmp_path / "shared").symlink_to(shared_data.parent)
    monkeypatch.chdir(root)
    config = root / "walkthrough.yaml"
    config.write_text(text.replace("    channel: 1\n", "    channel: 1\n    frames: {stop: 26}\n    crop: [0, 212, 0, 320]\n"))
    movie, detections, out = root / "movie.zarr", root / "detections.parquet", root / "out"
    settings = ["--config", str(config), "--movie", "bulk_water"]
    path = parse_yaml(text, where)["movies"]["bulk_water"]["path"]
    assert main(["ingest", path, "-o", str(movie), *settings]) == 0
    assert main(["segment", str(movie), "-o", str(detections), *settings]) == 0
    assert main(["track", str(detections), "--movie-zarr", str(movie), "--tracks", str(out / "t.parquet"),
                 "--drift", str(out / "d.parquet"), "--trajectories", str(out / "j.parquet"),
                 "--msd", str(out / "m.parquet"), *settings]) == 0
    tracks = read_table(out / "t.parquet", required=["particle", "mass", "size", "eccentricity"])
    assert len(tracks) > 0
    assert (tracks["mass"] > 50).all() and (tracks["size"] < 2.6).all() and (tracks["eccentricity"] < 0.3).all()
    found = read_table(detections)
    assert len(tracks) < len(found), "the filter removed nothing"

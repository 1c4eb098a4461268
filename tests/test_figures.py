"""The figures command: every dynamics figure drawn from a small hand-made results folder, and
the Snakemake wiring (declared figures have captions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from rvae_tools.cli import main
from rvae_tools.figures import figure_stems
from rvae_tools.io import write_table, write_zarr
from rvae_tools.plots import dynamics as dynamics_plots


@pytest.fixture(scope="module")
def movie_dir(tmp_path_factory) -> Path:
    """results/{movie} with latents.zarr, tracks.parquet and movie.zarr of 30 rods over 24 frames."""
    root = tmp_path_factory.mktemp("results") / "tiny"
    rng = np.random.default_rng(0)
    p, f = 30, 24
    order = 4.0 / (1 + np.exp(-(np.arange(f) - 12) / 1.5))
    theta = np.column_stack([rng.vonmises(0, k + 1e-9, p) for k in order]) / 2 + 0.7
    theta[:4, :6] = np.nan  # particles that arrive late
    x = rng.uniform(5, 59, (p, 1)) + np.cumsum(rng.normal(0, 0.3, (p, f)), axis=1)
    y = rng.uniform(5, 59, (p, 1)) + np.cumsum(rng.normal(0, 0.3, (p, f)), axis=1)
    z = rng.normal(size=(p, f, 2))
    absent = np.isnan(theta)
    x[absent] = y[absent] = np.nan
    z[absent] = np.nan
    latents = xr.Dataset(
        {"angle": (("particle", "frame"), theta), "x": (("particle", "frame"), x), "y": (("particle", "frame"), y),
         "dx": (("particle", "frame"), np.where(absent, np.nan, 0.1)),
         "dy": (("particle", "frame"), np.where(absent, np.nan, -0.1)),
         "z": (("particle", "frame", "latent"), z)},
        coords={"particle": np.arange(p), "frame": np.arange(f)},
        attrs={"frame_interval": 2.0, "pixel_size": 1.5, "pixel_unit": "nm"},
    )
    write_zarr(latents, root / "latents.zarr")
    write_table(latents[["x", "y"]].to_dataframe().dropna().reset_index(), root / "tracks.parquet")
    movie = xr.Dataset({"image": (("frame", "y", "x"), rng.random((f, 64, 64)).astype("float32"))})
    write_zarr(movie, root / "movie.zarr")
    code = main(["dynamics", str(root / "latents.zarr"), "--tracks", str(root / "tracks.parquet"),
                 "-o", str(root / "dynamics.zarr"), "--settings", json.dumps({"bootstrap": 10})])
    assert code == 0
    return root


def test_figures_command_draws_every_dynamics_figure(movie_dir, tmp_path):
    import matplotlib.image as mpimg

    out = tmp_path / "figs"
    code = main(["figures", str(movie_dir), "-o", str(out), "--settings", json.dumps({"formats": ["svg"], "dpi": 60})])
    assert code == 0
    for stem in dynamics_plots.FIGURES:
        png, svg = out / f"{stem}.png", out / f"{stem}.svg"
        assert png.stat().st_size > 1000, stem  # PNG always written, even when only SVG is asked for
        assert svg.read_text().lstrip().startswith("<?xml"), stem
        pixels = mpimg.imread(png)
        assert pixels.std() > 0.01, f"{stem} is blank"


def test_figures_of_a_movie_without_a_fit(movie_dir, tmp_path):
    """Too few frames for a transition fit: the dynamics store has empty transition attributes."""
    import shutil

    thin = tmp_path / "thin"
    thin.mkdir()
    shutil.copytree(movie_dir / "latents.zarr", thin / "latents.zarr")
    code = main(["dynamics", str(thin / "latents.zarr"), "-o", str(thin / "dynamics.zarr"),
                 "--settings", json.dumps({"min_frames": 100})])
    assert code == 0
    assert main(["figures", str(thin), "--settings", json.dumps({"formats": ["png"], "dpi": 50})]) == 0
    for stem in dynamics_plots.FIGURES:
        assert (thin / "figures" / f"{stem}.png").stat().st_size > 1000, stem


def test_figures_command_without_any_stage_output_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["figures", str(tmp_path / "empty")]) == 2
    assert "no stage output" in capsys.readouterr().err


def test_every_declared_dynamics_figure_has_a_report_caption(repo):
    stems = figure_stems()
    assert list(stems["dynamics"]) == list(dynamics_plots.FIGURES)
    for stem in dynamics_plots.FIGURES:
        caption = repo / "workflow" / "report" / f"{stem}.rst"
        assert caption.read_text().strip(), stem
    assert (repo / "workflow" / "report" / "workflow.rst").exists()


def test_whole_movie_figures_read_a_sample_of_whole_trajectories_only_beyond_the_limit(movie_dir, tmp_path):
    from rvae_tools.plots.style import sample_trajectories

    assert sample_trajectories(30, 24, 720, seed=1) == slice(None)  # 720 values: all of them
    rows = sample_trajectories(30, 24, 719, seed=1)
    assert len(rows) == 719 // 24 and len(set(rows)) == len(rows) and (np.diff(rows) > 0).all()
    assert (rows == sample_trajectories(30, 24, 719, seed=1)).all()
    scatter = "dynamics_latent_scatter.png"
    for name, max_windows in (("whole", 10**6), ("limit", 720), ("sampled", 200)):
        dynamics_plots.draw(movie_dir, tmp_path / name, formats=("png",), dpi=50, max_windows=max_windows)
    assert (tmp_path / "whole" / scatter).read_bytes() == (tmp_path / "limit" / scatter).read_bytes()
    # 8 of the 30 trajectories: fewer points, another figure (and still one).
    assert (tmp_path / "sampled" / scatter).read_bytes() != (tmp_path / "whole" / scatter).read_bytes()
    assert (tmp_path / "sampled" / scatter).stat().st_size > 1000

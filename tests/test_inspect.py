"""Tests of `rvae-tools inspect` and of settings left at `auto` taking the inspected values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.inspect import inspect_frames, inspect_movie, resolve_settings
from rvae_tools.simulate import simulate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _simulated(length, width, dark, seed=5):
    """Four frames (two pairs) of the project's simulator; dark = mirrored about the background."""
    species = [{"name": "rod", "shape": "rod", "length": length, "width": width}]
    n = 20 if length > 20 else 25
    sim = simulate(validate_section("simulate", {"frames": 4, "seed": seed, "n_particles": n, "species": species,
                                                 "height": 192, "width": 192}))
    movie = sim.movie.astype(np.float64)
    if dark:
        movie = 2 * np.median(movie) - movie
    return {i: movie[i] for i in range(len(movie))}


def _drawn(length, width, n, dark, shape=(160, 160), seed=0, noise=0.08):
    """Ellipses drawn independently of the simulator: uniform grid positions, random angles, blur, noise."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    frames = {}
    side = int(np.ceil(np.sqrt(n)))
    cx = (np.arange(side) + 0.5) * w / side
    cy = (np.arange(side) + 0.5) * h / side
    centres = np.array([(x, y) for y in cy for x in cx])[:n]
    angles = rng.uniform(0, np.pi, len(centres))
    for f in range(2):
        img = np.zeros(shape)
        for (x, y), a in zip(centres + f * 0.5, angles):
            u = (xx - x) * np.cos(a) + (yy - y) * np.sin(a)
            v = -(xx - x) * np.sin(a) + (yy - y) * np.cos(a)
            img[(2 * u / length) ** 2 + (2 * v / width) ** 2 <= 1] = 1.0
        img = ndimage.gaussian_filter(img, 0.7) + rng.normal(0, noise, shape)
        frames[f] = (1.0 - img) if dark else (0.2 + img)
    return frames


@pytest.mark.parametrize(("length", "width"), [(10.0, 4.0), (30.0, 10.0)])
@pytest.mark.parametrize("dark", [False, True])
def test_inspect_recovers_size_and_polarity_of_simulated_rods(length, width, dark):
    ins, _ = inspect_frames(_simulated(length, width, dark))
    assert ins["polarity"] == ("dark" if dark else "bright") and ins["polarity_certain"]
    assert ins["length"] == pytest.approx(length, rel=0.15)
    assert ins["width"] == pytest.approx(width, rel=0.15)
    assert ins["orientation_meaningful"]
    # Suggestions follow: a window holds the longest particle, the watershed scale is the width.
    assert ins["suggested"]["windows"]["size"] >= length
    assert ins["suggested"]["segment"]["invert"] is dark
    assert ins["suggested"]["segment"]["classical.min_distance"] == pytest.approx(max(2.0, 0.5 * width), rel=0.15)


def test_inspect_on_drawn_ellipses_and_round_particles():
    ins, _ = inspect_frames(_drawn(24.0, 7.0, 16, dark=True))
    assert ins["polarity"] == "dark"
    assert ins["length"] == pytest.approx(24.0, rel=0.15) and ins["width"] == pytest.approx(7.0, rel=0.15)
    assert ins["particles_per_frame"] == pytest.approx(16, abs=1)
    # Every particle moved by (0.5, 0.5) px between the frames: that is drift, not motion.
    assert ins["drift"] == pytest.approx([0.5, 0.5], abs=0.15)
    discs, _ = inspect_frames(_drawn(9.0, 9.0, 25, dark=False))
    assert discs["polarity"] == "bright" and not discs["orientation_meaningful"]
    assert discs["length"] == pytest.approx(9.0, rel=0.15)


def _spots(sigma, n=64, shape=(200, 200), seed=0, noise=0.1, frames=2):
    """Sparse Gaussian spots (fluorescent beads) of a known sigma at jittered grid positions, white noise."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    step = shape[0] / side
    centres = (np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] + 0.5) * step
    centres = centres + rng.uniform(-0.5, 0.5, centres.shape)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    out = {}
    for f in range(frames):
        img = np.zeros(shape)
        for y, x in centres:
            img += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
        out[f] = 1.0 + img + rng.normal(0, noise, shape)
    return out


@pytest.mark.parametrize("sigma", [1.1, 1.5, 2.0])
def test_blurred_spots_are_measured_by_their_profile_not_their_outline(sigma):
    """A Gaussian spot's second-moment length is 4 sigma; a threshold near its peak reads less."""
    from rvae_tools.inspect import mean_spot_length
    from rvae_tools.segment.classical import classical_frame, flatten_background

    frames = _spots(sigma)
    settings = {"threshold": "otsu", "background": None, "block": None, "min_area": 4.0, "max_area": None,
                "split": True, "split_h": 1.0, "split_area": 1.6, "min_distance": 2.0, "border_fraction": 0.5, "edge": 0}
    found = {i: classical_frame(f, settings, invert=False, index=i) for i, f in frames.items()}
    signals = {i: flatten_background(f) for i, f in frames.items()}
    assert mean_spot_length(signals, found) == pytest.approx(4 * sigma, rel=0.2)
    ins, _ = inspect_frames(frames)
    assert ins["polarity"] == "bright" and ins["polarity_certain"] and not ins["orientation_meaningful"]
    assert ins["particles_per_frame"] == pytest.approx(64, abs=3)


def test_bad_movies_stop_with_one_line():
    rng = np.random.default_rng(1)
    with pytest.raises(InputError, match="no particles"):
        inspect_frames({0: rng.normal(0, 1, (96, 96)), 1: rng.normal(0, 1, (96, 96))})
    with pytest.raises(InputError, match="larger than a third"):
        inspect_frames(_drawn(60.0, 50.0, 1, dark=False, shape=(120, 120), noise=0.02))
    tiny = np.zeros((96, 96))
    tiny[8::12, 8::12] = 1.0
    with pytest.raises(InputError, match="smaller than 3 px"):
        inspect_frames({0: tiny + rng.normal(0, 0.01, tiny.shape), 1: tiny + rng.normal(0, 0.01, tiny.shape)})


def test_auto_settings_take_the_inspection_and_set_values_win(caplog):
    ins, _ = inspect_frames(_simulated(30.0, 10.0, dark=True))
    windows, notes = resolve_settings("windows", validate_section("windows", {}), ins)
    assert windows["size"] == ins["suggested"]["windows"]["size"] and "windows.size: auto ->" in notes[0]
    track, _ = resolve_settings("track", validate_section("track", {}), ins)
    assert track["search_range"] == ins["suggested"]["track"]["search_range"] > 0
    segment, _ = resolve_settings("segment", validate_section("segment", {}), ins)
    assert segment["invert"] is True and segment["method"] == "classical"
    assert segment["classical"]["min_distance"] == ins["suggested"]["segment"]["classical.min_distance"]
    # A set value wins, but one that contradicts the inspection is warned about.
    with caplog.at_level("WARNING"):
        small, notes = resolve_settings("windows", validate_section("windows", {"size": 16}), ins)
    assert small["size"] == 16 and any("smaller than the particles need" in n for n in notes)
    assert "smaller than the particles need" in caplog.text
    mism = validate_section("segment", {"method": "unet", "train": {"source": "synthetic"}})
    assert any("do not match the inspected" in n for n in resolve_settings("segment", mism, ins)[1])
    # Without an inspection (a simulated movie) auto means the demo's values.
    plain, _ = resolve_settings("windows", validate_section("windows", {}), None)
    assert plain["size"] == 32
    assert resolve_settings("segment", validate_section("segment", {}), None)[0]["method"] == "unet"


def test_inspect_cli_writes_json_figure_and_prints_config(tmp_path, capsys):
    import xarray as xr

    from rvae_tools.io import write_zarr

    frames = _simulated(14.0, 5.0, dark=False)
    movie = tmp_path / "movie.zarr"
    write_zarr(xr.Dataset({"image": (("frame", "y", "x"), np.stack(list(frames.values())).astype(np.float32))},
                          attrs={"pixel_size": 1.5, "pixel_unit": "nm", "frame_interval": 1.0}), movie)
    out, fig = tmp_path / "inspect.json", tmp_path / "inspect.png"
    settings = json.dumps({"windows": {"size": 8}, "segment": {}})
    assert main(["inspect", str(movie), "-o", str(out), "--figure", str(fig), "--settings", settings]) == 0
    printed = capsys.readouterr().out
    assert "windows:" in printed and "search_range:" in printed
    data = json.loads(out.read_text())
    assert data["polarity"] == "bright" and data["pixel_size"] == 1.5 and fig.stat().st_size > 0
    assert any("windows.size: 8 px is smaller" in d for d in data["decisions"])
    # The stage CLIs read it: the window size left at auto follows the inspection.
    import argparse

    from rvae_tools.config import add_settings_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, "windows")
    resolved = settings_from_args(parser.parse_args(["--inspect", str(out)]), "windows")
    assert resolved["size"] == data["suggested"]["windows"]["size"]
    blank = tmp_path / "blank.zarr"
    write_zarr(xr.Dataset({"image": (("frame", "y", "x"), np.zeros((2, 64, 64), np.float32))}), blank)
    assert main(["inspect", str(blank)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blank.zarr" in err[0] and "no particles" in err[0]


@pytest.mark.skipif(not (DATA / "omnipose_rods").exists(), reason="real data not available")
def test_real_movies_polarity_and_shape():
    rods, _ = inspect_movie(DATA / "omnipose_rods" / "ec_5I_t141xy5c1.tif")
    assert rods["polarity"] == "dark" and rods["orientation_meaningful"]
    spheres, _ = inspect_movie(DATA / "bulk_water", pairs=1)
    assert spheres["polarity"] == "dark" and not spheres["orientation_meaningful"]

"""The simulator: truth matches the rendered movie, dynamics are as configured, outputs and errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.io import table_metadata
from rvae_tools.simulate import simulate, write_simulation

SMALL = {"frames": 10, "height": 128, "width": 128, "n_particles": 24,
         "transition": {"frame": 5, "width": 1.0}}


def settings(seed: int = 0, **overrides) -> dict:
    s = validate_section("simulate", {**SMALL, **overrides})
    s["seed"] = seed
    return s


@pytest.fixture(scope="module")
def small():
    return simulate(settings(seed=3), masks=True)


# Rendering draws no random numbers, so the truth of these does not depend on `supersample`:
# they have the default demo's truth at a fraction of the cost.
FAST_RENDER = {"render": {"supersample": 1}, "noise": {"snr": None}}


@pytest.fixture(scope="module")
def demo():
    """The default demo's truth (transition at frame 30)."""
    return simulate({"seed": 0, **FAST_RENDER})


@pytest.fixture(scope="module")
def free():
    """The default demo's truth without a transition."""
    return simulate({"seed": 1, "transition": {"frame": None}, **FAST_RENDER})


def rod_orders(truth: pd.DataFrame, phi0: float, radius: float = 30.0) -> pd.DataFrame:
    """Per frame: substrate registry |<exp(6i(angle - phi0))>| and local nematic order of rods.

    The local nematic order is <cos 2(angle_i - angle_j)> over rod pairs closer than
    ``radius``: 0 for independent orientations, 1 for aligned neighbours.
    """
    out = []
    for frame, g in truth[truth.cls == 0].groupby("frame"):
        a = g.angle.to_numpy()
        xy = g[["x", "y"]].to_numpy()
        d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        near = (d < radius) & (d > 0)
        pair = np.cos(2 * (a[:, None] - a[None, :]))
        out.append({"frame": frame, "registry": abs(np.exp(6j * (a - phi0)).mean()),
                    "nematic": float(pair[near].mean()) if near.any() else np.nan})
    return pd.DataFrame(out).set_index("frame")


def test_contract_and_metadata(small):
    sim = small
    assert sim.movie.shape == (10, 128, 128) and sim.movie.dtype == np.float32
    assert list(sim.truth.columns[:6]) == ["frame", "particle", "x", "y", "angle", "cls"]
    assert sim.truth.frame.dtype == np.int64 and sim.truth.particle.dtype == np.int64
    assert (sim.truth[["x", "y"]] >= -0.5).all().all() and (sim.truth[["x", "y"]] < 127.5).all().all()
    assert not sim.truth.duplicated(["frame", "particle"]).any()
    sym = np.array([2, 1])[sim.truth.cls]
    assert ((sim.truth.angle >= 0) & (sim.truth.angle < 2 * np.pi / sym)).all()
    md = sim.metadata
    assert md["transition_frame"] == 5 and md["seed"] == 3
    assert [(s["name"], s["symmetry"]) for s in md["species"]] == [("rod", 2), ("tadpole", 1)]
    for key in ("particle_size", "pixel_size", "pixel_unit", "frame_interval", "diffusion", "drift", "snr"):
        assert key in md
    json.dumps(md)  # JSON-able as written to simulation.json


def test_particles_are_where_the_truth_says(small):
    sim = small
    background = np.median(sim.movie)
    frame_idx = sim.truth.frame.to_numpy()
    rows, cols = np.rint(sim.truth.y).astype(int), np.rint(sim.truth.x).astype(int)
    local = ndimage.uniform_filter(sim.movie, size=(1, 3, 3))  # 3x3 mean: less noise
    signal = local[frame_idx, rows, cols] - background
    contrast = np.array([s["contrast"] for s in sim.metadata["species"]])[sim.truth.cls]
    noise_sd = sim.metadata["noise"]["sigma"]
    assert np.all(signal > 0.4 * contrast), signal.min()
    assert np.median(signal) > 3 * noise_sd
    # ...and nothing bright where there is no particle
    empty = sim.masks == 0
    grown = ndimage.binary_dilation(~empty, iterations=3, structure=np.ones((1, 3, 3), bool))
    assert np.median(sim.movie[~grown]) < background + 0.1 * contrast.min()


def test_masks_match_classes_positions_and_counts(small):
    sim = small
    t, r, c = sim.truth.frame.to_numpy(), np.rint(sim.truth.y).astype(int), np.rint(sim.truth.x).astype(int)
    assert np.array_equal(sim.masks[t, r, c], sim.truth.cls.to_numpy() + 1)
    assert set(np.unique(sim.masks)) <= {0, 1, 2}
    for frame in range(sim.movie.shape[0]):
        # 8-connected: the thin apex of a tadpole can touch the body only diagonally.
        labels, n = ndimage.label(sim.masks[frame] > 0, structure=np.ones((3, 3)))
        truth = sim.truth[sim.truth.frame == frame]
        hit = labels[np.rint(truth.y).astype(int), np.rint(truth.x).astype(int)]
        assert len(set(hit)) == len(truth), "two truth particles in one footprint"
        border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
        interior = set(range(1, n + 1)) - border
        assert interior <= set(hit), "a footprint inside the image without a truth particle"


def test_rendered_orientation_follows_the_angle_convention(small):
    """Rods are elongated along (cos angle, sin angle); tadpoles point base -> apex along it."""
    sim = small
    labels = np.stack([ndimage.label(m > 0, structure=np.ones((3, 3)))[0] for m in sim.masks])
    for p in sim.truth.itertuples():
        lab = labels[p.frame][round(p.y), round(p.x)]
        yy, xx = np.nonzero(labels[p.frame] == lab)
        if yy.min() == 0 or xx.min() == 0 or yy.max() == 127 or xx.max() == 127:
            continue
        u = (xx - xx.mean()) * np.cos(p.angle) + (yy - yy.mean()) * np.sin(p.angle)
        v = -(xx - xx.mean()) * np.sin(p.angle) + (yy - yy.mean()) * np.cos(p.angle)
        assert (u**2).mean() > 2 * (v**2).mean()
        if p.cls == 1:
            assert (u**3).mean() > 0  # the apex (thin tail) lies at +u


def test_counts_stay_near_target_and_particles_come_and_go(demo):
    counts = demo.truth.groupby("frame").size()
    assert len(counts) == 60
    assert counts.between(60, 100).all(), counts.describe()
    first, last = demo.truth.groupby("particle").frame.min(), demo.truth.groupby("particle").frame.max()
    assert (first > 0).sum() >= 10, "particles adsorb during the movie"
    assert (last < 59).sum() >= 10, "particles desorb (or drift out) during the movie"


def test_same_seed_same_movie_other_seed_differs():
    a, b = simulate(settings(seed=7), masks=True), simulate(settings(seed=7), masks=True)
    assert np.array_equal(a.movie, b.movie) and np.array_equal(a.masks, b.masks)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    c = simulate(settings(seed=8))
    assert not np.array_equal(a.movie, c.movie)
    assert not a.truth[["x", "y"]].equals(c.truth[["x", "y"]])


def test_order_rises_across_the_transition(demo):
    phi0 = np.deg2rad(demo.metadata["transition"]["substrate_angle"])
    order = rod_orders(demo.truth, phi0)
    before, after = order.loc[:22], order.loc[38:]
    assert before.registry.mean() < 0.3 and after.registry.mean() > 0.7, order
    assert after.nematic.mean() > before.nematic.mean() + 0.3, order
    half = demo.metadata["registry_order_half_rise_frame"]
    assert 25 <= half <= 32, half
    recorded = np.array(demo.metadata["registry_order"])
    assert recorded[:20].mean() < 0.3 and recorded[40:].mean() > 0.7


def test_no_transition_order_stays_low_and_rotation_is_brownian(free):
    assert free.metadata["transition_frame"] is None
    order = rod_orders(free.truth, np.deg2rad(free.metadata["transition"]["substrate_angle"]))
    assert order.registry.mean() < 0.25 and order.registry.max() < 0.4, order
    tr = free.truth.sort_values(["particle", "frame"])
    same = (tr.particle.diff() == 0) & (tr.frame.diff() == 1)
    d_rot = np.var(tr.angle_unwrapped.diff()[same]) / 2
    assert d_rot == pytest.approx(free.metadata["diffusion"]["rotation"], rel=0.1)


def test_translation_and_drift_as_configured(free):
    tr = free.truth.sort_values(["particle", "frame"])
    same = (tr.particle.diff() == 0) & (tr.frame.diff() == 1)
    dx, dy = tr.x.diff()[same], tr.y.diff()[same]
    drift = free.metadata["drift"]
    assert dx.mean() == pytest.approx(drift[0], abs=0.03) and dy.mean() == pytest.approx(drift[1], abs=0.03)
    d_t = (dx.var() + dy.var()) / 4
    # Excluded volume rejects a few moves, so the measured constant may only fall short a little.
    assert 0.8 * free.metadata["diffusion"]["translation"] < d_t <= 1.05 * free.metadata["diffusion"]["translation"]


def test_triangles_and_no_noise():
    species = [{"name": "tri", "shape": "triangle", "length": 12.0, "contrast": 1.0}]
    sim = simulate(settings(seed=2, species=species, noise={"snr": None},
                            render={"scan_line_offset": 0, "tilt": 0}), masks=True)
    assert sim.metadata["species"][0]["symmetry"] == 3
    assert ((sim.truth.angle >= 0) & (sim.truth.angle < 2 * np.pi / 3)).all()
    t, r, c = sim.truth.frame.to_numpy(), np.rint(sim.truth.y).astype(int), np.rint(sim.truth.x).astype(int)
    assert (sim.masks[t, r, c] == 1).all()
    bg = sim.movie[sim.masks == 0]
    assert np.percentile(bg, 50) == pytest.approx(1.0, abs=1e-6)  # mica level, no noise


def test_overcrowding_is_rejected():
    with pytest.raises(InputError, match=r"simulate\.n_particles: 900 particles do not fit"):
        simulate(settings(n_particles=900))


def test_bad_species_symmetry_is_rejected():
    with pytest.raises(InputError, match=r"species\.0\.symmetry"):
        simulate(settings(species=[{"name": "r", "shape": "rod", "symmetry": 3}]))


def test_cli_writes_movie_truth_and_metadata(tmp_path):
    args = ["simulate", "--outdir", str(tmp_path), "--settings", json.dumps({**SMALL, "frames": 4}), "--seed", "5"]
    assert main(args) == 0
    movie = tifffile.imread(tmp_path / "raw" / "movie.tif")
    truth = pd.read_parquet(tmp_path / "truth.parquet")
    meta = json.loads((tmp_path / "raw" / "simulation.json").read_text())
    assert movie.shape == (4, 128, 128) and movie.dtype == np.float32
    assert set(truth.frame) == {0, 1, 2, 3}
    assert meta["seed"] == 5 and meta["transition_frame"] == 5
    assert table_metadata(tmp_path / "truth.parquet")["species"] == meta["species"]
    with tifffile.TiffFile(tmp_path / "raw" / "movie.tif") as tif:  # self-describing for ImageJ/Fiji
        assert tif.imagej_metadata["unit"] == "nm" and tif.imagej_metadata["finterval"] == 1.0
        assert tif.pages[0].tags["XResolution"].value == (2, 3)  # 1 / 1.5 nm
    expected = simulate(settings(seed=5, frames=4))
    assert np.array_equal(movie, expected.movie)
    assert not list(tmp_path.rglob(".*tmp*")), "temporary files left behind"


def test_write_simulation_with_masks(tmp_path, small):
    paths = write_simulation(small, tmp_path)
    assert np.array_equal(tifffile.imread(paths["masks"]), small.masks)


@pytest.mark.parametrize("bad, key", [
    ({"frames": -1}, "simulate.frames"),
    ({"colour": 1}, "'colour'"),
    ({"noise": {"snr": 0}}, "simulate.noise.snr"),
    ({"species": [{"name": "x", "shape": "hexagon"}]}, "simulate.species.0.shape"),
])
def test_cli_rejects_bad_settings(tmp_path, capsys, bad, key):
    code = main(["simulate", "--outdir", str(tmp_path), "--settings", json.dumps(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err and err.startswith("rvae-tools simulate: error:")
    assert not (tmp_path / "raw").exists()

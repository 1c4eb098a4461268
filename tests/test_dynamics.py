"""The dynamics stage: each statistic on constructed inputs with a known answer, the transition
fit on a planted transition, bad and thin inputs, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.dynamics import (
    bond_order,
    change_point,
    compute_dynamics,
    delaunay_bonds,
    fit_diffusion,
    fit_logistic,
    logistic,
    mean_squared_displacement,
    order_parameter,
    pair_correlation,
    unwrap_angles,
)
from rvae_tools.errors import InputError
from rvae_tools.io import open_zarr, write_table, write_zarr


def settings(**overrides):
    s = validate_section("dynamics", overrides)
    s["seed"] = 0
    return s


def make_latents(theta, x=None, y=None, z=None, frame_interval=0.5, rng=None):
    """A latents Dataset on (particle, frame) like the encode stage writes."""
    rng = rng or np.random.default_rng(0)
    p, f = theta.shape
    if x is None:
        x = rng.uniform(0, 200, (p, 1)) + np.cumsum(rng.normal(0, 0.3, (p, f)), axis=1)
        y = rng.uniform(0, 200, (p, 1)) + np.cumsum(rng.normal(0, 0.3, (p, f)), axis=1)
    if z is None:
        z = rng.normal(size=(p, f, 2))
    absent = ~np.isfinite(theta)
    x, y, z = x.copy(), y.copy(), z.copy()
    x[absent] = y[absent] = np.nan
    z[absent] = np.nan
    return xr.Dataset(
        {"angle": (("particle", "frame"), theta), "x": (("particle", "frame"), x),
         "y": (("particle", "frame"), y), "z": (("particle", "frame", "latent"), z)},
        coords={"particle": np.arange(p), "frame": np.arange(f)},
        attrs={"frame_interval": frame_interval, "pixel_size": 2.0, "pixel_unit": "nm"},
    )


def planted_angles(rng, n_particles, frames, t_c, width, depth=6.0, n=2, offset=1.0):
    """Axes of n-fold particles in a field whose depth ramps up logistically (quasi-equilibrium)."""
    t = np.arange(frames)
    kappa = depth / (1 + np.exp(-(t - t_c) / width))
    theta = np.column_stack([rng.vonmises(0.0, k + 1e-9, n_particles) for k in kappa]) / n
    return -(theta + offset)  # a sign flip and an offset, as the rVAE may give


# --------------------------------------------------------------------------- statistics


def test_order_parameter_aligned_is_one_and_offset_invariant():
    theta = np.full(50, 0.3) + np.pi * (np.arange(50) % 2)  # rods: theta and theta + pi are the same axis
    assert order_parameter(theta, 2) == pytest.approx(1.0)
    assert order_parameter(-theta + 2.1, 2) == pytest.approx(1.0)


def test_order_parameter_of_uniform_angles_is_near_zero():
    rng = np.random.default_rng(1)
    n = 4000
    values = [order_parameter(rng.uniform(0, 2 * np.pi, n), m) for m in (2, 6)]
    # E|mean of N unit phasors| = sqrt(pi / 4N) ~ 0.014; 5 times that is far in the tail.
    for v in values:
        assert v < 5 * np.sqrt(np.pi / (4 * n))


def test_psi6_of_a_perfect_triangular_lattice_is_one():
    a = 10.0
    pts = np.array([(i * a + (j % 2) * a / 2, j * a * np.sqrt(3) / 2) for i in range(12) for j in range(12)])
    pts = pts @ np.array([[np.cos(0.4), np.sin(0.4)], [-np.sin(0.4), np.cos(0.4)]])  # any lattice orientation
    bonds = delaunay_bonds(pts)
    psi, count = bond_order(pts, bonds, 6)
    assert np.abs(np.nanmean(psi)) == pytest.approx(1.0, abs=1e-9)
    assert np.allclose(np.abs(psi), 1.0)
    assert count.max() == 6 and np.median(count) == 6


def test_psi6_of_random_points_is_low():
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 300, (600, 2))
    psi, _ = bond_order(pts, delaunay_bonds(pts), 6)
    assert np.abs(np.nanmean(psi)) < 0.1
    assert np.nanmean(np.abs(psi)) < 0.6


@pytest.mark.parametrize("n", [1, 2, 3])
def test_unwrapping_removes_symmetry_flips(n):
    rng = np.random.default_rng(3)
    true = np.cumsum(rng.normal(0, 0.1, (5, 80)), axis=1)
    flips = rng.integers(-3, 4, true.shape) * 2 * np.pi / n
    observed = true + flips
    observed[1, 10:14] = np.nan  # a gap in one trajectory
    out = unwrap_angles(observed, n)
    diff = out - true
    ok = np.isfinite(out)
    # Equal up to one constant multiple of 2 pi / n per trajectory.
    assert np.allclose(diff[ok].reshape(-1) - np.repeat(diff[:, 0], ok.sum(axis=1)), 0, atol=1e-9)
    assert np.isnan(out[1, 10:14]).all()


def test_rotational_msd_of_brownian_angles_gives_d_within_10_percent():
    rng = np.random.default_rng(4)
    d_true = 0.01  # rad^2 / frame
    walk = np.cumsum(rng.normal(0, np.sqrt(2 * d_true), (300, 120)), axis=1)
    noisy = walk + rng.normal(0, 0.05, walk.shape)  # angle noise: MSD intercept, not slope
    observed = np.mod(noisy, np.pi)  # rods: angles known only mod pi
    lags, msd, _ = mean_squared_displacement(unwrap_angles(observed, 2), 20)
    d, c = fit_diffusion(lags, msd, 1, 5)
    assert d == pytest.approx(d_true, rel=0.10)
    assert c == pytest.approx(2 * 0.05 ** 2, abs=0.004)


def test_pair_correlation_of_an_ideal_gas_is_one_despite_edges():
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 400, (3000, 2))
    r_edges = np.linspace(0, 60, 13)
    g = pair_correlation(pts, r_edges, (0, 400, 0, 400))
    assert np.all(np.abs(g[2:] - 1) < 0.05)


def test_change_point_finds_a_step():
    t = np.arange(50)
    y = np.where(t < 31, 0.1, 0.8) + np.random.default_rng(6).normal(0, 0.05, 50)
    assert change_point(t, y) == pytest.approx(30.5)


def test_logistic_fit_recovers_planted_parameters():
    t = np.arange(60.0)
    y = logistic(t, 0.1, 0.85, 27.3, 2.5) + np.random.default_rng(7).normal(0, 0.02, 60)
    fit = fit_logistic(t, y)
    assert fit.t_c == pytest.approx(27.3, abs=0.3)
    assert fit.width == pytest.approx(2.5, rel=0.25)
    assert fit.high == pytest.approx(0.85, abs=0.03)
    assert fit.delta_bic > 50


# --------------------------------------------------------------------------- the stage


def test_planted_transition_is_recovered_with_an_interval():
    rng = np.random.default_rng(8)
    theta = planted_angles(rng, 120, 60, t_c=33.0, width=2.0)
    # Quasi-equilibrium axes in a ramped field: the AFM-on-mica model recovers the field's midpoint.
    ds = compute_dynamics(make_latents(theta, rng=rng), None, settings(bootstrap=60, transition_model="saturating"))
    a = ds.attrs
    assert a["transition_detected"] is True
    assert a["transition_frame"] == pytest.approx(33.0, abs=1.5)
    assert a["transition_frame_low"] <= 33.0 <= a["transition_frame_high"]
    assert a["transition_time"] == pytest.approx(a["transition_frame"] * 0.5)
    assert abs(a["transition_frame_changepoint"] - 33) < 4
    # A strong field orders the rods before it reaches half strength: the order parameter's own
    # midpoint comes first.
    assert a["transition_frame_logistic"] < a["transition_frame"]
    assert ds["S_n"].values[-5:].mean() > 0.7 and ds["S_n"].values[:5].mean() < 0.2
    assert ds["time"].attrs["units"] == "s"


def test_transition_fit_uses_offset_invariant_signals():
    rng = np.random.default_rng(9)
    theta = planted_angles(rng, 80, 50, t_c=20.0, width=1.5, offset=0.0)
    s = settings(bootstrap=0)
    a = compute_dynamics(make_latents(theta, rng=np.random.default_rng(1)), None, s).attrs
    b = compute_dynamics(make_latents(-theta + 2.7, rng=np.random.default_rng(1)), None, s).attrs
    assert a["transition_frame"] == pytest.approx(b["transition_frame"], abs=1e-6)
    assert a["rotational_diffusion"] == pytest.approx(b["rotational_diffusion"], rel=1e-9)


def test_disordered_movie_reports_no_transition():
    rng = np.random.default_rng(10)
    theta = np.cumsum(rng.normal(0, 0.2, (80, 60)), axis=1) + rng.uniform(0, np.pi, (80, 1))
    ds = compute_dynamics(make_latents(theta, rng=rng), None, settings(bootstrap=20))
    assert ds.attrs["transition_detected"] is False
    assert np.isnan(ds.attrs["transition_frame"])
    assert "no transition" in ds.attrs["notes"] or "no ordering transition" in ds.attrs["notes"]
    assert ds.attrs["rotational_diffusion_per_frame"] == pytest.approx(0.02, rel=0.1)


def test_too_few_frames_or_particles_give_statistics_and_a_note():
    rng = np.random.default_rng(11)
    short = compute_dynamics(make_latents(rng.uniform(0, np.pi, (30, 4)), rng=rng), None, settings())
    assert "no transition fit" in short.attrs["notes"]
    assert np.isnan(short.attrs["transition_frame"])
    assert np.isfinite(short["S_n"].values).all() and short["n_particles"].values.tolist() == [30] * 4
    lonely = compute_dynamics(make_latents(rng.uniform(0, np.pi, (2, 40)), rng=rng), None, settings())
    assert "no transition fit" in lonely.attrs["notes"]
    assert np.isnan(lonely["psi_6"].values).all()  # no neighbours with 2 particles
    assert lonely["S_n"].shape == (40,)


def test_species_from_cls_and_from_latent_clusters():
    rng = np.random.default_rng(12)
    p, f = 60, 30
    cls = np.repeat([0, 1], p // 2)
    z = rng.normal(0, 0.3, (p, f, 2)) + np.where(cls == 0, -2.0, 2.0)[:, None, None]
    latents = make_latents(rng.uniform(0, 2 * np.pi, (p, f)), z=z, rng=rng)
    s = settings(species=[{"name": "rod", "symmetry": 2}, {"name": "triangle", "symmetry": 3}], bootstrap=0)
    by_gmm = compute_dynamics(latents, None, s)
    assert by_gmm.attrs["species_method"] == "gmm"
    assert (by_gmm["species"].values == cls).all()
    assert by_gmm["symmetry"].values.tolist() == [2] * 30 + [3] * 30
    latents["cls"] = ("particle", 1 - cls)
    by_cls = compute_dynamics(latents, None, s)
    assert by_cls.attrs["species_method"] == "cls"
    assert (by_cls["species"].values == 1 - cls).all()


def test_classical_orientation_from_tracks_is_fitted_too():
    rng = np.random.default_rng(13)
    theta = planted_angles(rng, 80, 50, t_c=25.0, width=1.5)
    latents = make_latents(theta, rng=rng)
    rows = []
    for p in range(80):
        for f in range(50):
            rows.append((f, p, latents["x"].values[p, f], latents["y"].values[p, f],
                         np.mod(theta[p, f] + 0.4 + rng.normal(0, 0.1), np.pi)))
    tracks = pd.DataFrame(rows, columns=["frame", "particle", "x", "y", "orientation"])
    a = compute_dynamics(latents, tracks, settings(bootstrap=30, transition_model="saturating")).attrs
    assert a["classical_signal"] in ("S_n_moments", "S_6_moments")
    assert a["transition_frame_classical"] == pytest.approx(25.0, abs=2.0)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_the_store_with_provenance(tmp_path):
    rng = np.random.default_rng(14)
    theta = planted_angles(rng, 60, 40, t_c=18.0, width=1.0)
    latents = make_latents(theta, rng=rng)
    write_zarr(latents, tmp_path / "latents.zarr")
    tracks = latents[["x", "y"]].to_dataframe().dropna().reset_index()
    write_table(tracks, tmp_path / "tracks.parquet")
    out = tmp_path / "dynamics.zarr"
    code = main(["dynamics", str(tmp_path / "latents.zarr"), "--tracks", str(tmp_path / "tracks.parquet"),
                 "-o", str(out), "--settings", json.dumps({"bootstrap": 20})])
    assert code == 0
    ds = open_zarr(out, required=["S_n", "n_particles", "angle_unwrapped"])
    assert ds.attrs["stage"] == "dynamics"
    assert json.loads(ds.attrs["config"])["bootstrap"] == 20
    assert ds.attrs["transition_frame"] == pytest.approx(18.0, abs=1.5)
    assert "frame" in ds.dims and "time" in ds.coords


def test_cli_bad_input_exits_2_naming_the_field(tmp_path, capsys):
    bad = make_latents(np.zeros((3, 8))).drop_vars("angle")
    write_zarr(bad, tmp_path / "latents.zarr")
    code = main(["dynamics", str(tmp_path / "latents.zarr"), "-o", str(tmp_path / "d.zarr")])
    assert code == 2
    err = capsys.readouterr().err
    assert "latents.zarr" in err and "angle" in err
    assert not (tmp_path / "d.zarr").exists()


# --------------------------------------------------------------------------- outcomes, symmetry, no angles


def switching_movie(rng, n_particles=150, frames=60, t_c=27.3, scale=2.0, noise=0.1):
    """Polar particles (n = 1) that switch one by one from free rotation to a common direction.

    Other physics than the simulator's: no substrate directions and no equilibrium response,
    each particle switches at its own time drawn from a logistic distribution around ``t_c``
    (nucleation-like kinetics), so the polar order S_1 rises as a logistic centred on t_c.
    """
    t = np.arange(frames)
    switch = t_c + scale * np.log(1 / rng.uniform(1e-9, 1, n_particles) - 1) * -1
    free = rng.uniform(0, 2 * np.pi, (n_particles, 1)) + np.cumsum(rng.normal(0, 0.15, (n_particles, frames)), axis=1)
    aligned = 0.7 + rng.vonmises(0.0, 8.0, (n_particles, frames))
    theta = np.where(t[None, :] >= switch[:, None], aligned, free) + rng.normal(0, noise, (n_particles, frames))
    latents = make_latents(theta, rng=rng)
    latents["angle_sd"] = (("particle", "frame"), np.full(theta.shape, noise))
    latents.attrs["species"] = json.dumps([{"name": "tadpole", "symmetry": 1}])
    return latents


def test_transition_of_other_physics_is_found_within_two_frames_with_the_defaults():
    for seed in (21, 22):
        latents = switching_movie(np.random.default_rng(seed))
        a = compute_dynamics(latents, None, settings(bootstrap=60)).attrs
        assert a["transition_model"] == "logistic" and a["transition_signal"] == "S_n"
        assert a["symmetry_source"] == "latents" and json.loads(a["species"])[0]["symmetry"] == 1
        assert a["transition_detected"] is True
        assert abs(a["transition_frame"] - 27.3) <= 2.0
        assert a["transition_frame_low"] <= a["transition_frame"] <= a["transition_frame_high"]
        assert a["transition_changepoint_agrees"] is True


def test_movies_without_ordering_never_report_a_transition():
    rng = np.random.default_rng(23)
    static = rng.uniform(0, np.pi, (80, 1)) + rng.normal(0, 0.05, (80, 60))  # a static sample: beads stuck
    free = np.cumsum(rng.normal(0, 0.2, (80, 60)), axis=1) + rng.uniform(0, np.pi, (80, 1))
    for theta in (static, free):
        a = compute_dynamics(make_latents(theta, rng=rng), None, settings(bootstrap=20)).attrs
        assert a["transition_detected"] is False
        assert np.isnan(a["transition_frame"]) and np.isnan(a["transition_interval"]).all()


def test_isotropic_particles_get_no_order_and_no_rotational_diffusion():
    rng = np.random.default_rng(24)
    # Spheres: the encoder's angle of a sphere is arbitrary, here even a planted "ordering".
    theta = planted_angles(rng, 80, 40, t_c=20.0, width=1.0)
    latents = make_latents(theta, rng=rng)
    latents.attrs["species"] = json.dumps([{"name": "sphere", "symmetry": 0}])
    ds = compute_dynamics(latents, None, settings(bootstrap=10))
    a = ds.attrs
    assert a["transition_detected"] is False and np.isnan(a["transition_frame"])
    assert np.isnan(ds["S_n"].values).all() and np.isnan(a["rotational_diffusion"])
    assert "isotropic" in a["notes"]
    assert np.isfinite(ds["psi_6"].values).any()  # the centroids' bond order still means something


@pytest.mark.parametrize("angle", [np.nan, 0.0])
def test_pose_less_latents_say_no_angles_instead_of_order(angle):
    rng = np.random.default_rng(25)
    latents = make_latents(rng.uniform(0, np.pi, (60, 30)), rng=rng)
    latents["angle"] = (("particle", "frame"), np.full((60, 30), angle))  # positions stay
    ds = compute_dynamics(latents, None, settings(symmetry=2, bootstrap=10))
    assert ds.attrs["angles"] in ("absent", "constant")
    assert "no angles" in ds.attrs["notes"]
    assert np.isnan(ds["S_n"].values).all()  # never S_n = 1
    assert ds.attrs["transition_detected"] is False and np.isnan(ds.attrs["rotational_diffusion"])
    assert ds["n_particles"].values.tolist() == [60] * 30


def test_unknown_cls_values_are_an_error_naming_them():
    rng = np.random.default_rng(26)
    latents = make_latents(rng.uniform(0, 2 * np.pi, (30, 12)), rng=rng)
    latents["cls"] = ("particle", np.repeat([0, 1, 7], 10))
    s = settings(species=[{"name": "rod", "symmetry": 2, "cls": 0}, {"name": "tadpole", "symmetry": 1, "cls": 1}])
    with pytest.raises(InputError, match=r"cls value\(s\) 7 of 10 trajectories"):
        compute_dynamics(latents, None, s)


def test_attrs_keep_one_type_per_key_whatever_the_outcome(tmp_path):
    rng = np.random.default_rng(27)
    found = compute_dynamics(switching_movie(rng), None, settings(bootstrap=20))
    none = compute_dynamics(make_latents(rng.uniform(0, np.pi, (60, 40)), rng=rng), None, settings(bootstrap=20))
    assert found.attrs["transition_detected"] and not none.attrs["transition_detected"]
    write_zarr(found, tmp_path / "a.zarr")
    write_zarr(none, tmp_path / "b.zarr")
    a = open_zarr(tmp_path / "a.zarr", required=["S_n"]).attrs
    b = open_zarr(tmp_path / "b.zarr", required=["S_n"]).attrs
    for key in a:
        if key.startswith(("transition", "rotational", "translational", "frame_interval")):
            assert type(a[key]) is type(b[key]), key
    assert float(b["transition_frame"]) != float(b["transition_frame"])  # NaN, and float() works


def test_translational_msd_uses_the_drift_corrected_positions():
    rng = np.random.default_rng(28)
    p, f = 60, 40
    x0, y0 = rng.uniform(20, 180, (p, 1)), rng.uniform(20, 180, (p, 1))
    walk_x = np.cumsum(rng.normal(0, 0.3, (p, f)), axis=1)
    walk_y = np.cumsum(rng.normal(0, 0.3, (p, f)), axis=1)
    drift = 1.5 * np.arange(f)  # px/frame, far more than the diffusion
    theta = rng.uniform(0, np.pi, (p, f))
    moving = make_latents(theta, x=x0 + walk_x + drift, y=y0 + walk_y, rng=rng)
    still = make_latents(theta, x=x0 + walk_x, y=y0 + walk_y, rng=rng)
    s = settings(bootstrap=0)
    a = compute_dynamics(moving, None, s)
    b = compute_dynamics(still, None, s)
    assert a.attrs["translational_drift"] == "estimated"
    assert a.attrs["translational_diffusion"] == pytest.approx(b.attrs["translational_diffusion"], rel=0.1)
    # 0.3 px steps per axis: D = 0.045 px^2/frame, pixel 2 nm, frame 0.5 s -> 0.36 nm^2/s.
    assert b.attrs["translational_diffusion"] == pytest.approx(0.36, rel=0.15)


def test_demo_transition_is_within_one_frame_with_the_demo_config():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from dynamics import latents_from_truth

    from rvae_tools.config import load_config
    from rvae_tools.simulate import simulate

    sim_settings = validate_section("simulate", {})
    sim_settings["seed"] = 0
    sim = simulate(sim_settings)
    latents, tracks = latents_from_truth(sim.truth, sim.metadata, angle_noise=0.05, rng=np.random.default_rng(0))
    demo = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")["movies"]["demo"]["dynamics"]
    a = compute_dynamics(latents, tracks, settings(**demo, bootstrap=40)).attrs
    assert a["transition_detected"] is True
    assert abs(a["transition_frame"] - sim.metadata["transition_frame"]) <= 1.0


BULK_WATER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bulk_water"


@pytest.mark.skipif(not BULK_WATER.is_dir(), reason=f"real data not found at {BULK_WATER} (../shared/data)")
def test_real_spheres_in_water_report_isotropic_particles_and_no_transition():
    """trackpy's bulk_water movie (1 um latex spheres diffusing in water): nothing orders."""
    import warnings

    import imageio.v3 as iio
    import trackpy as tp

    from rvae_tools.track import track

    # A quarter of the field and 24 frames keep it fast; about 150 spheres remain.
    frames = [iio.imread(f)[:240, :320, 1] for f in sorted(BULK_WATER.glob("bulk_water_*.png"))[:24]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        features = tp.batch(frames, 11, minmass=20, invert=True, processes=1)
    walk = validate_section("track", {"search_range": 5, "memory": 3, "min_length": 20,
                                      "select": {"mass": {"above": 50}, "size": {"below": 2.6}}})
    tracks = track(features, walk, pixel_size=100 / 285, frame_interval=1 / 24).tracks
    grid = tracks.pivot_table(index="particle", columns="frame", values=["x", "y"])
    rng = np.random.default_rng(29)
    x, y = grid["x"].to_numpy(), grid["y"].to_numpy()
    # An encoder's angle of a sphere is arbitrary; the encode stage records the species as isotropic.
    theta = np.where(np.isfinite(x), rng.uniform(0, 2 * np.pi, x.shape), np.nan)
    latents = make_latents(theta, x=x, y=y, frame_interval=1 / 24, rng=rng)
    latents = latents.assign_coords(particle=grid.index.to_numpy())
    latents.attrs.update(pixel_size=100 / 285, pixel_unit="um")
    unknown = compute_dynamics(latents, tracks, settings(bootstrap=20))
    latents.attrs["species"] = json.dumps([{"name": "sphere", "symmetry": 0}])
    ds = compute_dynamics(latents, tracks, settings(bootstrap=20))
    for a in (unknown.attrs, ds.attrs):
        assert a["transition_detected"] is False and np.isnan(a["transition_frame"])
    a = ds.attrs
    assert "isotropic" in a["notes"] and np.isnan(ds["S_n"].values).all() and np.isnan(a["rotational_diffusion"])
    assert a["translational_drift"] == "tracks"
    # 1 um spheres in water: D = kT / (6 pi eta a), about 0.4 um^2/s (the walkthrough's A/4).
    assert a["translational_diffusion"] == pytest.approx(0.4, rel=0.3)


def test_species_recorded_by_the_encode_stage_are_used_with_their_symmetry():
    rng = np.random.default_rng(30)
    p, f = 60, 30
    latents = make_latents(rng.uniform(0, 2 * np.pi, (p, f)), rng=rng)
    # As rvae_tools.calibration records them: a JSON table and the species index per trajectory.
    latents.attrs["species"] = json.dumps([{"name": "species0", "symmetry": 2, "source": "latent"},
                                           {"name": "species1", "symmetry": 0, "source": "latent"}])
    latents.attrs["species_symmetry"] = [2, 0]
    latents = latents.assign_coords(species=("particle", np.repeat([1, 0], p // 2)))
    ds = compute_dynamics(latents, None, settings(bootstrap=0))
    assert ds.attrs["species_method"] == "latents" and ds.attrs["symmetry_source"] == "latents"
    assert ds["symmetry"].values.tolist() == [0] * 30 + [2] * 30
    assert np.isnan(ds["angle_resultant"].sel(species_index=1).values).all()  # isotropic: no order
    assert np.isfinite(ds["angle_resultant"].sel(species_index=0).values).all()
    # Class names from a classifier match the species by name.
    latents = latents.drop_vars("species")
    latents["cls"] = ("particle", np.repeat(["species1", "species0"], p // 2).astype(object))
    assert compute_dynamics(latents, None, settings(bootstrap=0))["symmetry"].values.tolist() == [0] * 30 + [2] * 30


@pytest.mark.parametrize("order", [1, 2])
def test_angle_redraw_of_the_bootstrap_matches_redrawing_every_angle(order):
    from rvae_tools.dynamics import phasor_signal

    rng = np.random.default_rng(31)
    p, f, draws = 300, 4, 4000
    theta = rng.vonmises(0.0, 2.0, (p, f)) / order
    sd = rng.uniform(0.05, 0.5, (p, f))
    flip = rng.uniform(0, 0.3, (p, f))
    sig = phasor_signal("S_n", theta, np.full(p, order), np.zeros(p, dtype=int), np.zeros(p, dtype=int), 1, 1,
                        angle_sd=sd, flip_prob=flip, chunk=64)
    fast = sig.resampled(np.ones((draws, 1)), rng)
    # Brute force: every angle redrawn from its posterior (Gaussian offset, flip by pi).
    redrawn = theta[None] + sd[None] * rng.standard_normal((draws, p, f)) + np.pi * (rng.random((draws, p, f)) < flip[None])
    brute = np.abs(np.exp(1j * order * redrawn).mean(axis=1))
    np.testing.assert_allclose(fast.mean(axis=0), brute.mean(axis=0), rtol=0.02)
    np.testing.assert_allclose(fast.std(axis=0), brute.std(axis=0), rtol=0.1)


def test_tilt_statistics_and_autocorrelation_time_of_an_ar1_tilt():
    """An AR(1) tilt (phi = exp(-1/tau)) has autocorrelation exp(-lag/tau); tilt mean/median per frame follow the planted ones."""
    rng = np.random.default_rng(3)
    n_p, n_f, tau = 40, 400, 5.0
    phi = np.exp(-1.0 / tau)
    noise = rng.normal(0, 0.1 * np.sqrt(1 - phi ** 2), (n_p, n_f))
    d = np.zeros((n_p, n_f))
    d[:, 0] = rng.normal(0, 0.1, n_p)
    for t in range(1, n_f):
        d[:, t] = phi * d[:, t - 1] + noise[:, t]
    tilt = 0.6 + d
    ds = make_latents(rng.uniform(0, np.pi, (n_p, n_f)), rng=rng)
    ds["tilt"] = (("particle", "frame"), tilt)
    out = compute_dynamics(ds, None, settings(msd_max_lag=15))
    assert out["tilt_mean"].attrs["units"] == "rad"
    np.testing.assert_allclose(out["tilt_mean"].isel(species_index=0).values, tilt.mean(axis=0), atol=1e-9)
    np.testing.assert_allclose(out["tilt_median"].isel(species_index=0).values, np.median(tilt, axis=0), atol=1e-9)
    acf = out["tilt_acf"].mean("particle").values
    assert acf[0] == pytest.approx(1.0)
    lags = np.arange(1, 8)
    tau_fit = -1.0 / np.polyfit(lags, np.log(acf[lags]), 1)[0]
    assert abs(tau_fit - tau) / tau < 0.2, tau_fit


def test_no_tilt_means_no_tilt_variables():
    rng = np.random.default_rng(4)
    out = compute_dynamics(make_latents(rng.uniform(0, np.pi, (10, 20)), rng=rng), None, settings())
    assert not [v for v in out.variables if str(v).startswith("tilt")]


# --------------------------------------------------------------------------- chunks and memory


def mixed_movie(rng, n_particles=90, frames=45):
    """Two species by class, angle posteriors, tilt, shifts, gaps and a tracks table with moments and drift."""
    theta = planted_angles(rng, n_particles, frames, t_c=20.0, width=2.0)
    latents = make_latents(theta, rng=rng)
    shape = (n_particles, frames)
    latents["angle_sd"] = (("particle", "frame"), rng.uniform(0.05, 0.2, shape))
    latents["flip_prob"] = (("particle", "frame"), rng.uniform(0.0, 0.1, shape))
    latents["tilt"] = (("particle", "frame"), rng.normal(0.3, 0.1, shape))
    latents["dx"] = (("particle", "frame"), rng.normal(0, 0.5, shape))
    latents["dy"] = (("particle", "frame"), rng.normal(0, 0.5, shape))
    for name in ("x", "y"):
        latents[name][::7, 10:14] = np.nan  # trajectories with a gap
    latents["cls"] = ("particle", np.arange(n_particles) % 2)
    tracks = latents[["x", "y", "angle"]].to_dataframe().dropna().reset_index()
    tracks["orientation"] = np.mod(tracks["angle"] + rng.normal(0, 0.1, len(tracks)), np.pi)
    tracks["x_corrected"] = tracks["x"] - 0.1 * tracks["frame"]
    tracks["y_corrected"] = tracks["y"] + 0.05 * tracks["frame"]
    return latents, tracks.drop(columns="angle")


def test_small_chunks_read_from_the_store_give_the_results_of_one_chunk(tmp_path):
    rng = np.random.default_rng(40)
    latents, tracks = mixed_movie(rng)
    kw = {"species": [{"name": "rod", "symmetry": 2}, {"name": "triangle", "symmetry": 3}], "bootstrap": 30,
          "registry_order": 6, "transition_model": "saturating"}
    whole = compute_dynamics(latents, tracks, settings(**kw))  # 90 trajectories: one chunk by default
    assert whole.attrs["transition_detected"] is True
    write_zarr(latents, tmp_path / "latents.zarr", encoding={n: {"chunks": (32, 16)} for n in latents.data_vars
                                                             if latents[n].ndim >= 2})
    write_table(tracks, tmp_path / "tracks.parquet")
    from rvae_tools.dynamics import run_dynamics_files

    # 16 trajectories (and blocks of 8 frames) at a time, read lazily from a store chunked otherwise.
    run_dynamics_files(tmp_path / "latents.zarr", tmp_path / "tracks.parquet", tmp_path / "dynamics.zarr",
                       settings(**kw, chunk=16))
    chunked = open_zarr(tmp_path / "dynamics.zarr").load()
    assert set(whole.data_vars) == set(chunked.data_vars)
    for name in whole.variables:
        a, b = whole[name].values, chunked[name].values
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-9, err_msg=name)
        else:
            assert [str(v) for v in a.ravel()] == [str(v) for v in b.ravel()], name
    for key in ("transition_frame", "transition_frame_low", "transition_frame_high", "transition_frame_classical",
                "rotational_diffusion", "translational_diffusion"):
        assert chunked.attrs[key] == pytest.approx(whole.attrs[key], rel=1e-6), key
    for key in ("transition_signal", "classical_signal", "species_method", "translational_drift"):
        assert chunked.attrs[key] == whole.attrs[key], key


def random_latents_store(path, n_particles, frames, seed=0):
    """A latents store in the encode stage's layout (whole trajectories per chunk) with random walks."""
    rng = np.random.default_rng(seed)
    side = 40 * np.sqrt(n_particles)  # constant density
    x = rng.uniform(0, side, (n_particles, 1)) + np.cumsum(rng.normal(0, 0.3, (n_particles, frames)), axis=1)
    y = rng.uniform(0, side, (n_particles, 1)) + np.cumsum(rng.normal(0, 0.3, (n_particles, frames)), axis=1)
    x[rng.uniform(size=x.shape) < 0.1] = np.nan
    grids = {"angle": rng.uniform(0, np.pi, x.shape), "angle_sd": np.full(x.shape, 0.1), "x": x, "y": y}
    ds = xr.Dataset({k: (("particle", "frame"), v) for k, v in grids.items()},
                    coords={"particle": np.arange(n_particles), "frame": np.arange(frames)}, attrs={"symmetry": 2})
    write_zarr(ds, path, encoding={k: {"chunks": (256, frames)} for k in grids})


def test_memory_grows_with_the_chunk_not_with_the_number_of_trajectories(tmp_path):
    import tracemalloc

    import dask.array  # noqa: F401 - imported before measuring: an import is no memory of the stage

    from rvae_tools.dynamics import run_dynamics_files

    frames, chunk = 60, 128
    kw = {"chunk": chunk, "bootstrap": 0, "msd_max_lag": 3, "msd_fit_lags": 3, "gr_bins": 8}
    peaks = {}
    for n in (128, 1024):
        random_latents_store(tmp_path / f"latents_{n}.zarr", n, frames)
        tracemalloc.start()
        run_dynamics_files(tmp_path / f"latents_{n}.zarr", None, tmp_path / f"dynamics_{n}.zarr", settings(**kw))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert open_zarr(tmp_path / "dynamics_1024.zarr")["angle_unwrapped"].shape == (1024, frames)
    grid = 1024 * frames * 8  # one (particle, frame) float64 array of the larger movie
    # 8x the trajectories add less than one such array (per-trajectory values only); holding the
    # movie's grids (angles, positions, their spreads, the outputs) adds more than ten.
    assert peaks[1024] - peaks[128] < grid, (peaks, grid)

"""Tracking: linking against truth and against trackpy, fallbacks, drift, MSD, CLI, bad input, bulk_water."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import trackpy as tp
import xarray as xr

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.io import read_table, table_metadata, write_table, write_zarr
from rvae_tools.track import (
    check_detections,
    ensemble_msd,
    estimate_drift,
    filter_short_tracks,
    fit_power_law,
    link_accuracy,
    link_detections,
    subtract_drift,
    track,
    trajectory_summary,
)

BULK_WATER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bulk_water"

tp.quiet()


def settings(**over):
    s = validate_section("track", over)
    s["seed"] = 0
    return s


def random_walk_truth(n=60, frames=40, diffusion=0.5, box=200.0, drift=(0.0, 0.0), seed=0):
    """Brownian particles (D in px^2/frame) with a constant drift (px/frame): the truth table."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(10, box - 10, (n, 2))
    steps = rng.normal(0, np.sqrt(2 * diffusion), (frames, n, 2))
    steps[0] = 0
    pos = start[None] + np.cumsum(steps, axis=0) + np.arange(frames)[:, None, None] * np.array(drift)
    f, p = np.meshgrid(np.arange(frames), np.arange(n), indexing="ij")
    return pd.DataFrame({"frame": f.ravel(), "particle": p.ravel(), "x": pos[..., 0].ravel(), "y": pos[..., 1].ravel()})


def detections_from(truth, noise=0.3, drop=0.03, seed=1):
    """What a detector would give: localisation noise, a few missed detections, rows shuffled."""
    rng = np.random.default_rng(seed)
    det = truth[["frame", "x", "y"]].copy()
    det["x"] += rng.normal(0, noise, len(det))
    det["y"] += rng.normal(0, noise, len(det))
    det["score"] = 1.0
    det = det[rng.random(len(det)) > drop]
    return det.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two labellings of the same rows group the rows identically."""
    pairs = pd.DataFrame({"a": a, "b": b}).drop_duplicates()
    return pairs["a"].is_unique and pairs["b"].is_unique


# ------------------------------------------------------------------------------ linking


def test_links_random_walk_accurately_and_like_trackpy():
    truth = random_walk_truth()
    det = detections_from(truth)
    linked = link_detections(check_detections(det), 5.0, memory=3)
    score = link_accuracy(linked, truth, max_distance=2.0)
    assert score["link_accuracy"] >= 0.99
    assert score["purity"] >= 0.98
    assert score["n_links"] > 0.9 * (40 - 1) * 60 * 0.97**2
    direct = tp.link(det, 5.0, memory=3)
    merged = linked.merge(direct, on=["frame", "x", "y"], suffixes=("", "_tp"))
    assert len(merged) == len(det)
    assert same_partition(merged["particle"].to_numpy(), merged["particle_tp"].to_numpy())


def test_link_accuracy_counts_wrong_links():
    truth = random_walk_truth(n=10, frames=20)
    tracks = truth.copy()
    # Break every trajectory in the middle: exactly one wrong link per particle.
    tracks.loc[tracks["frame"] >= 10, "particle"] += 100
    score = link_accuracy(tracks, truth, max_distance=1.0)
    assert score["n_links"] == 10 * 19
    assert score["n_correct"] == 10 * 18
    assert score["purity"] == pytest.approx(1.0)
    # Swap halves of two trajectories: purity drops for them.
    merged = truth.copy()
    merged.loc[(merged["particle"] == 1) & (merged["frame"] >= 10), "particle"] = 0
    merged.loc[(merged["particle"] == 0) & (merged["frame"] < 10) & (merged.index % 2 == 0), "particle"] = 0
    score = link_accuracy(merged, truth, max_distance=1.0)
    assert score["purity"] < 1.0


def test_drift_predictor_follows_an_accelerating_flow():
    # The whole field speeds up from 1 to 7 px/frame: beyond search_range 4 without prediction.
    truth = random_walk_truth(n=20, frames=16, diffusion=0.02, box=150.0, seed=3)
    speed = np.minimum(1.0 + 0.5 * np.arange(16), 7.0)
    truth["x"] += np.concatenate([[0.0], np.cumsum(speed[1:])])[truth["frame"]]
    det = detections_from(truth, noise=0.1, drop=0.0)
    plain = link_detections(check_detections(det), 4.0)
    predicted = link_detections(check_detections(det), 4.0, predictor="drift")
    assert link_accuracy(plain, truth, 1.0)["link_accuracy"] < 0.6
    assert link_accuracy(predicted, truth, 1.0)["link_accuracy"] >= 0.99
    # Nearest-neighbour velocities work too, and a frame that links nothing does not break them.
    assert link_accuracy(link_detections(check_detections(det), 4.0, predictor="nearest_velocity"),
                         truth, 1.0)["link_accuracy"] >= 0.99
    jump = det.copy()
    jump.loc[jump["frame"] >= 8, "x"] += 50  # nothing can link across this jump
    linked = link_detections(check_detections(jump), 4.0, predictor="drift")
    assert len(linked) == len(jump)


def dense_lattice():
    """Two frames of a jittered square lattice far denser than search_range: trackpy's worst case."""
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(np.arange(21.0), np.arange(21.0)), -1).reshape(-1, 2)
    frames = [g + rng.normal(0, 0.05, g.shape), g + rng.normal(0, 0.05, g.shape)]
    return pd.DataFrame({"frame": np.repeat([0, 1], len(g)), "x": np.concatenate(frames)[:, 0],
                         "y": np.concatenate(frames)[:, 1]})


def test_oversize_subnetwork_falls_back_with_a_warning_naming_the_frame(caplog):
    det = dense_lattice()
    from trackpy.linking.utils import SubnetOversizeException

    with pytest.raises(SubnetOversizeException):
        tp.link(det, 1.5)
    events = []
    with caplog.at_level(logging.WARNING, logger="rvae_tools.track"):
        linked = link_detections(check_detections(det), 1.5, events=events)
    assert events and all(e.frame == 1 for e in events)
    assert "frame 1" in caplog.text
    assert len(linked) == len(det) and linked["particle"].notna().all()
    # The lattice barely moves, so the adaptive fallback links nearly everything correctly.
    truth = det.assign(particle=np.tile(np.arange(441), 2))
    assert link_accuracy(linked, truth, 0.3)["link_accuracy"] > 0.95


def test_hopeless_subnetwork_leaves_particles_unlinked_instead_of_crashing(caplog):
    det = dense_lattice()
    with caplog.at_level(logging.WARNING, logger="rvae_tools.track"):
        linked = link_detections(check_detections(det), 1.5, adaptive_stop=1.4, max_subnet_size=5)
    assert "start new trajectories" in caplog.text
    assert len(linked) == len(det)


# ------------------------------------------------------------------------------ filtering, drift, MSD


def test_filter_stubs_and_drift_match_trackpy():
    truth = random_walk_truth(n=40, frames=30, diffusion=0.02, drift=(0.3, -0.2), seed=5)
    det = detections_from(truth, drop=0.1)
    linked = link_detections(check_detections(det), 5.0, memory=2)
    ours = filter_short_tracks(linked, 20)
    theirs = tp.filter_stubs(linked, 20)
    assert len(ours) == len(theirs) and set(ours["particle"]) == set(theirs["particle"])
    drift = estimate_drift(ours)
    assert drift["frame"].tolist() == list(range(30)) and drift.loc[0, "x"] == 0.0
    # The drift is recovered to a fraction of a pixel over the whole movie.
    assert drift["x"].iloc[-1] == pytest.approx(0.3 * 29, abs=0.6)
    assert drift["y"].iloc[-1] == pytest.approx(-0.2 * 29, abs=0.6)
    corrected = subtract_drift(ours, drift)
    reference = tp.subtract_drift(ours.copy(), tp.compute_drift(ours)).reset_index(drop=True).sort_values(["particle", "frame"])
    mine = corrected.sort_values(["particle", "frame"])
    np.testing.assert_allclose(mine["x_corrected"].to_numpy(), reference["x"].to_numpy(), atol=1e-9)
    assert subtract_drift(ours, drift, subtract=False)["x_corrected"].equals(ours["x"].astype(float))


def test_ensemble_msd_equals_trackpy_emsd_with_gaps_and_gives_diffusion():
    truth = random_walk_truth(n=50, frames=60, diffusion=0.4, seed=7)
    det = detections_from(truth, noise=0.05, drop=0.15)
    linked = link_detections(check_detections(det), 5.0, memory=3)
    linked = subtract_drift(linked, estimate_drift(linked), subtract=False)
    ours = ensemble_msd(linked, pixel_size=0.5, frame_interval=0.1, max_lagtime=30)
    theirs = tp.emsd(linked[["particle", "frame", "x", "y"]], mpp=0.5, fps=10, max_lagtime=30)
    assert len(ours) == 30
    np.testing.assert_allclose(ours["msd"].to_numpy(), theirs.to_numpy()[: len(ours)], rtol=1e-9)
    np.testing.assert_allclose(ours["lag_time"].to_numpy(), theirs.index.to_numpy()[: len(ours)])
    fit = fit_power_law(ours)
    assert fit["n"] == pytest.approx(1.0, abs=0.15)
    # A = 4 D in um^2/s: D = 0.4 px^2/frame * 0.25 um^2/px^2 / 0.1 s = 1.0 um^2/s.
    assert fit["A"] == pytest.approx(4.0, rel=0.25)
    summary = trajectory_summary(linked, pixel_size=0.5, frame_interval=0.1)
    long = summary[summary["length"] >= 30]
    assert long["diffusion"].median() == pytest.approx(1.0, rel=0.2)
    assert (summary["last_frame"] - summary["first_frame"] + 1 >= summary["length"]).all()


# ------------------------------------------------------------------------------ the stage, CLI, bad input


def write_movie(path, frames=30, **attrs):
    attrs = {"pixel_size": 0.5, "pixel_unit": "um", "frame_interval": 0.1, **attrs}
    ds = xr.Dataset({"image": (("frame", "y", "x"), np.zeros((frames, 32, 32), np.float32))}, attrs=attrs)
    return write_zarr(ds, path, encoding={"image": {"chunks": (1, 32, 32)}})


def run_cli(tmp_path, detections_path, *extra, movie=True):
    outs = {k: tmp_path / f"{k}.parquet" for k in ("tracks", "drift", "trajectories", "msd")}
    args = ["track", str(detections_path), "--tracks", str(outs["tracks"]), "--drift", str(outs["drift"]),
            "--trajectories", str(outs["trajectories"]), "--msd", str(outs["msd"]), *extra]
    if movie:
        args += ["--movie-zarr", str(write_movie(tmp_path / "movie.zarr"))]
    return main(args), outs


def test_cli_writes_tracks_drift_summary_and_msd_with_units(tmp_path):
    truth = random_walk_truth(n=30, frames=30, drift=(0.2, 0.1), seed=11)
    det = detections_from(truth)
    det["cls"] = 0
    write_table(det, tmp_path / "detections.parquet")
    code, outs = run_cli(tmp_path, tmp_path / "detections.parquet",
                         "--settings", json.dumps({"min_length": 15, "search_range": 4}))
    assert code == 0
    tracks = read_table(outs["tracks"], required=["frame", "x", "y", "particle", "x_corrected", "y_corrected",
                                                  "score", "cls"])
    assert tracks["particle"].dtype == np.int64
    assert tracks.groupby("particle").size().min() >= 15
    meta = table_metadata(outs["tracks"])
    assert meta["stage"] == "track" and meta["tracking"]["pixel_size"] == 0.5
    assert meta["units"]["diffusion"] == "um^2/s"
    summary = read_table(outs["trajectories"])
    assert set(summary["particle"]) == set(tracks["particle"])
    drift = read_table(outs["drift"])
    assert drift["x"].iloc[-1] == pytest.approx(0.2 * 29, abs=0.6)
    msd = read_table(outs["msd"])
    assert msd["lag_time"].iloc[0] == pytest.approx(0.1)
    assert np.isfinite(table_metadata(outs["msd"])["power_law"]["n"])

    from rvae_tools.plots import tracking

    written = tracking.draw(tmp_path, tmp_path / "figures", formats=("png",), dpi=50)
    assert sorted(p.stem for p in written) == sorted(tracking.FIGURES)
    assert all(p.stat().st_size > 1000 for p in written)


@pytest.mark.parametrize(
    "table, message",
    [
        (pd.DataFrame({"frame": [0, 1], "x": [1.0, 2.0]}), "lacks column(s) y"),
        (pd.DataFrame({"frame": [0, 1], "x": [1.0, np.nan], "y": [1.0, 2.0]}), "column 'x' has 1 NaN"),
        (pd.DataFrame({"frame": [0.5, 1], "x": [1.0, 2.0], "y": [1.0, 2.0]}), "whole numbers"),
        (pd.DataFrame({"frame": [0, 1], "x": ["a", "b"], "y": [1.0, 2.0]}), "expected numbers"),
    ],
)
def test_bad_detections_give_one_clear_line_and_exit_code_2(tmp_path, capsys, table, message):
    write_table(table, tmp_path / "detections.parquet")
    code, outs = run_cli(tmp_path, tmp_path / "detections.parquet", movie=False)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "detections.parquet" in err
    assert "Traceback" not in err
    assert not outs["tracks"].exists()


def test_bad_settings_are_rejected(tmp_path, capsys):
    write_table(pd.DataFrame({"frame": [0], "x": [1.0], "y": [1.0]}), tmp_path / "d.parquet")
    code, _ = run_cli(tmp_path, tmp_path / "d.parquet", "--settings", '{"search_range": -1}', movie=False)
    assert code == 2 and "search_range" in capsys.readouterr().err
    with pytest.raises(InputError, match="select.*no column 'mass'"):
        track(pd.DataFrame({"frame": [0, 1], "x": [1.0, 1.1], "y": [1.0, 1.0]}),
              settings(min_length=1, select={"mass": {"above": 1}}))


def test_no_detections_and_a_single_frame_give_empty_well_formed_outputs(tmp_path):
    empty = pd.DataFrame({"frame": pd.Series(dtype=np.int64), "x": pd.Series(dtype=float),
                          "y": pd.Series(dtype=float)})
    write_table(empty, tmp_path / "empty.parquet")
    code, outs = run_cli(tmp_path, tmp_path / "empty.parquet")
    assert code == 0
    tracks = read_table(outs["tracks"], required=["particle", "x_corrected"])
    assert tracks.empty
    assert read_table(outs["trajectories"], required=["particle", "diffusion"]).empty
    assert read_table(outs["msd"], required=["lag_time", "msd"]).empty

    single = track(pd.DataFrame({"frame": [4, 4, 4], "x": [1.0, 10.0, 20.0], "y": [1.0, 5.0, 9.0]}),
                   settings(min_length=1))
    assert sorted(single.tracks["particle"]) == [0, 1, 2]
    assert single.drift["frame"].tolist() == [4]
    assert single.msd.empty and single.trajectories["diffusion"].isna().all()


def test_a_movie_shorter_than_the_default_min_length_keeps_its_trajectories(tmp_path, caplog):
    """trackpy's stuck.tif has 5 frames: the default min_length of 10 would drop every bead."""
    truth = random_walk_truth(n=12, frames=5, seed=3)
    write_table(detections_from(truth), tmp_path / "detections.parquet")
    with caplog.at_level(logging.INFO, logger="rvae_tools.track"):
        code, outs = run_cli(tmp_path, tmp_path / "detections.parquet", "--settings", json.dumps({"search_range": 4}))
    assert code == 0 and "track.min_length: auto -> 5 (the movie has only 5 frames)" in caplog.text
    tracks = read_table(outs["tracks"], required=["particle"])
    assert tracks["particle"].nunique() >= 10 and tracks.groupby("particle").size().min() == 5
    meta = table_metadata(outs["tracks"])
    assert json.loads(meta["config"])["min_length"] == 5 and meta["tracking"]["min_length"] == 5
    # A set value wins even when it leaves nothing, with a warning; a long movie keeps the default 10.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rvae_tools.track"):
        assert track(detections_from(truth), settings(min_length=8, search_range=4)).tracks.empty
    assert "longer than the movie's 5 frames" in caplog.text
    assert track(detections_from(random_walk_truth(n=5, frames=30, seed=4)),
                 settings(search_range=4)).stats["min_length"] == 10


# ------------------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def bulk_water_features():
    if not BULK_WATER.is_dir():
        pytest.skip(f"real data not found at {BULK_WATER} (trackpy's bulk_water movie, ../shared/data)")
    import imageio.v3 as iio

    files = sorted(BULK_WATER.glob("bulk_water_*.png"))[:30]
    frames = [iio.imread(f)[:, :, 1] for f in files]  # green channel, as in the walkthrough
    with warnings.catch_warnings():
        # trackpy plans to drop `invert`; the walkthrough's published numbers use it.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return tp.batch(frames, 11, minmass=20, invert=True, processes=1)


def test_bulk_water_subset_reproduces_trackpy_walkthrough(bulk_water_features):
    f = bulk_water_features
    # Published feature counts of the walkthrough for frames 19 and 29.
    assert (f["frame"] == 19).sum() == 576
    assert (f["frame"] == 29).sum() == 599
    walk = settings(search_range=5, memory=3, min_length=25,
                    select={"mass": {"above": 50}, "size": {"below": 2.6}, "ecc": {"below": 0.3}})
    result = track(f, walk, pixel_size=100 / 285, frame_interval=1 / 24)
    direct = tp.link(f, 5, memory=3)
    long = tp.filter_stubs(direct, 25)
    assert result.stats["n_trajectories_linked"] == direct["particle"].nunique()
    assert result.stats["n_trajectories_after_min_length"] == long["particle"].nunique()
    sel = long[(long["mass"] > 50) & (long["size"] < 2.6) & (long["ecc"] < 0.3)]
    sel = tp.subtract_drift(sel.copy(), tp.compute_drift(sel))
    em = tp.emsd(sel, 100 / 285, 24)
    np.testing.assert_allclose(result.msd["msd"].to_numpy(), em.to_numpy()[: len(result.msd)], rtol=1e-9)
    # 1 um spheres in water: D = kT / (6 pi eta a) ~ 0.4 um^2/s (the walkthrough's A/4 = 0.40).
    fit = result.stats["msd_power_law"]
    assert fit["n"] == pytest.approx(1.0, abs=0.2)
    assert fit["A"] / 4 == pytest.approx(0.4, rel=0.3)
    assert result.trajectories.loc[result.trajectories["length"] >= 20, "diffusion"].median() == pytest.approx(0.4, rel=0.3)

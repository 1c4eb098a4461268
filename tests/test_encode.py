"""Encode: latents on (particle, frame) with NaN where absent, provenance, mismatches; rVAE figures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.encode import encode_patches, majority_class
from rvae_tools.errors import InputError
from rvae_tools.io import open_zarr, write_table, write_zarr
from rvae_tools.provenance import file_sha256
from rvae_tools.windows import make_windows

H = W = 64
SIZE = 16
TINY = {"latent_dim": 2, "encoder": "mlp", "encoder_hidden": [32], "decoder_hidden": [32],
        "batch_size": 64, "seed": 0}


def rod(x, y, angle, length=5.0, width=1.5):
    yy, xx = np.mgrid[0:H, 0:W]
    u = (xx - x) * np.cos(angle) + (yy - y) * np.sin(angle)
    v = -(xx - x) * np.sin(angle) + (yy - y) * np.cos(angle)
    return np.exp(-(u / length) ** 2 - (v / width) ** 2)


@pytest.fixture(scope="module")
def movie_dir(tmp_path_factory):
    """results/demo with patches.zarr (particle 2 absent in frames 3-4, particle 3 from frame 5) and a model."""
    root = tmp_path_factory.mktemp("results")
    movie_dir = root / "demo"
    rng = np.random.default_rng(0)
    centres = np.array([[16.2, 15.7], [45.5, 20.3], [20.8, 46.1], [44.4, 44.9]])
    frames, rows = [], []
    for f in range(10):
        img = rng.normal(0.05, 0.01, (H, W))
        for p, (x, y) in enumerate(centres + rng.normal(0, 0.3, centres.shape)):
            if (p == 2 and f in (3, 4)) or (p == 3 and f < 5):
                continue
            img += rod(x, y, 0.4 * p + 0.1 * f)
            cls = "tadpole" if p == 1 and f >= 3 else "rod"  # particle 1: 3 x rod, 7 x tadpole
            rows.append((f, x, y, p, cls))
        frames.append(img)
    write_zarr(xr.Dataset({"image": (("frame", "y", "x"), np.asarray(frames, np.float32))},
                          attrs={"pixel_size": 2.0, "pixel_unit": "nm", "frame_interval": 0.5, "sha256": "1" * 64}),
               movie_dir / "movie.zarr")
    tracks = pd.DataFrame(rows, columns=["frame", "x", "y", "particle", "cls"])
    write_table(tracks, movie_dir / "tracks.parquet")
    make_windows(movie_dir / "movie.zarr", movie_dir / "tracks.parquet", movie_dir / "patches.zarr",
                 validate_section("windows", {"size": SIZE, "chunk_size": 8}), progress=False)

    from rvae_tools.rvae import RVAE

    model = RVAE(SIZE, **TINY)
    model.fit([str(movie_dir / "patches.zarr")], epochs=2, progress=False, device="cpu")
    model_path = root / "models" / "rvae" / "demo" / "model.pt"
    model_path.parent.mkdir(parents=True)
    model.save(model_path)
    return movie_dir, tracks, model_path


def test_latents_follow_the_contract(movie_dir, tmp_path):
    movie_dir, tracks, model_path = movie_dir
    out = tmp_path / "latents.zarr"
    encode_patches(movie_dir / "patches.zarr", model_path, out, device="cpu", batch_size=5, progress=False)
    ds = open_zarr(out, required=["angle", "angle_sd", "dx", "dy", "dx_sd", "dy_sd", "x", "y", "z", "z_sd"]).load()
    for name in ("angle", "angle_sd", "dx", "dy", "dx_sd", "dy_sd", "x", "y"):
        assert ds[name].dims == ("particle", "frame"), name
    assert ds.z.dims == ds.z_sd.dims == ("particle", "frame", "latent")
    assert ds.sizes == {"particle": 4, "frame": 10, "latent": 2}
    assert ds.angle.attrs["units"] == "rad" and ds.dx.attrs["units"] == "px" and ds.x.attrs["units"] == "px"
    assert np.allclose(ds.time.values, np.arange(10) * 0.5) and ds.time.attrs["units"] == "s"

    present = np.zeros((4, 10), dtype=bool)
    present[tracks.particle, tracks.frame] = True
    for name in ("angle", "dx", "x", "z_sd"):
        values = ds[name].values
        values = values if values.ndim == 2 else values[..., 0]
        assert np.isnan(values[~present]).all() and np.isfinite(values[present]).all(), name
    assert np.isnan(ds.angle.sel(particle=2, frame=[3, 4])).all()
    assert np.isnan(ds.z.sel(particle=3, frame=slice(0, 4))).all()

    # positions come from the tracks; latents equal a direct encoding of the same windows
    t = tracks.set_index(["particle", "frame"])
    assert ds.x.sel(particle=1, frame=6).item() == pytest.approx(t.loc[(1, 6), "x"])
    from rvae_tools.rvae import RVAE

    patches = xr.open_zarr(movie_dir / "patches.zarr")
    direct = RVAE.load(model_path).encode(patches.window.values, device="cpu")
    p, f = patches.particle.values, patches.frame.values
    got = ds.angle_raw.values[p, f]
    assert np.allclose(got, direct["angle"], atol=1e-5)
    assert np.allclose(ds.z.values[p, f], direct["z"], atol=1e-5)

    assert ds.cls.sel(particle=1).item() == "tadpole" and ds.cls.sel(particle=0).item() == "rod"
    # species from the two classes, each with a symmetry order and an angle calibration
    species = json.loads(ds.attrs["species"])
    assert [s["cls"] for s in species] == ["rod", "tadpole"] and ds.attrs["species_source"] == "cls"
    assert ds.species.sel(particle=1).item() == 1 and ds.species.sel(particle=0).item() == 0
    assert len(ds.attrs["species_symmetry"]) == 2 and all(n >= 0 for n in ds.attrs["species_symmetry"])
    assert len(ds.attrs["angle_offset"]) == len(ds.attrs["angle_sense"]) == len(ds.attrs["angle_residual"]) == 2
    assert "towards +y" in ds.angle.attrs["convention"] and ds.angle_raw.attrs["units"] == "rad"
    assert ds.track_length.values.tolist() == [10, 10, 8, 5]
    assert ds.attrs["model_checksum"] == file_sha256(model_path)
    assert ds.attrs["pixel_size"] == 2.0 and ds.attrs["pixel_unit"] == "nm" and ds.attrs["frame_interval"] == 0.5
    assert ds.attrs["stage"] == "encode" and ds.attrs["config_hash"] and "torch" in json.loads(ds.attrs["library_versions"])
    assert ds.attrs["seed"] == 0
    calibration = json.loads(ds.attrs["spread_calibration"])
    assert calibration["n_windows"] == ds.attrs["n_windows"] and calibration["angle"]["scale"] >= 0
    # Both species have fewer windows than a calibration of their own needs: the pooled one
    # applies to every window, z_sd included.
    assert calibration["species"] == [] and len(calibration["z"]) == ds.sizes["latent"]
    from rvae_tools.rvae.uncertainty import apply_calibration

    expected = apply_calibration(direct, calibration)
    for name in ("angle_sd", "dx_sd", "dy_sd", "z_sd"):
        assert np.allclose(ds[name].values[p, f], expected[name], rtol=1e-4), name


def test_cli_with_settings_and_mismatched_checkpoints(movie_dir, tmp_path, capsys):
    movie_dir, _, model_path = movie_dir
    patches = movie_dir / "patches.zarr"
    out = tmp_path / "cli.zarr"
    settings = json.dumps(validate_section("rvae", {**TINY, "seed": 7}))
    assert main(["encode", str(patches), str(model_path), "-o", str(out), "--device", "cpu",
                 "--no-progress", "--settings", settings]) == 0
    ds = xr.open_zarr(out)
    assert ds.attrs["seed"] == 7 and ds.sizes["latent"] == 2

    from rvae_tools.rvae import RVAE

    other = RVAE(12, **TINY)
    other.save(tmp_path / "w12.pt")
    with pytest.raises(InputError, match=r"trained on 12 x 12 px windows but .* holds 16 x 16 px windows"):
        encode_patches(patches, tmp_path / "w12.pt", tmp_path / "bad.zarr", progress=False)

    code = main(["encode", str(patches), str(model_path), "-o", str(tmp_path / "bad.zarr"),
                 "--settings", json.dumps({**TINY, "latent_dim": 3})])
    err = capsys.readouterr().err
    assert code == 2 and "the model has 2 content latent(s) but the config asks for rvae.latent_dim: 3" in err

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code = main(["encode", str(patches), str(tmp_path / "junk.pt"), "-o", str(tmp_path / "bad.zarr")])
    assert code == 2 and "junk.pt" in capsys.readouterr().err
    assert not (tmp_path / "bad.zarr").exists()


def test_interrupted_encoding_leaves_no_store(movie_dir, tmp_path):
    movie_dir, _, model_path = movie_dir
    from rvae_tools.rvae import RVAE

    model = RVAE.load(model_path)
    calls = []
    real = model.encode

    def interrupted(windows, **kwargs):
        calls.append(len(windows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(windows, **kwargs)

    model.encode = interrupted
    out = tmp_path / "latents.zarr"
    with pytest.raises(KeyboardInterrupt):
        encode_patches(movie_dir / "patches.zarr", model_path, out, model=model, batch_size=8, progress=False,
                       settings=validate_section("rvae", {**TINY, "calibration_windows": 0}))
    assert calls == [8, 8]  # one block per chunk of patches.zarr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _copy_with_nan(patches_path, out, obs, whole):
    ds = xr.open_zarr(patches_path).load()
    win = ds.window.values.copy()
    if whole:
        win[obs] = np.nan
    else:
        win[obs, 3, 4] = np.nan
    ds["window"] = (ds.window.dims, win)
    write_zarr(ds, out)
    return ds


@pytest.mark.parametrize("whole", [True, False])
def test_nan_windows_are_an_error_naming_the_file_and_observations(movie_dir, tmp_path, whole):
    movie_dir, _, model_path = movie_dir
    bad = tmp_path / "nan_patches.zarr"
    ds = _copy_with_nan(movie_dir / "patches.zarr", bad, [5], whole)
    p, f = int(ds.particle.values[5]), int(ds.frame.values[5])
    with pytest.raises(InputError, match=rf"nan_patches.zarr: .*NaN.* obs 5 \(particle {p}, frame {f}\)"):
        encode_patches(bad, model_path, tmp_path / "latents.zarr", progress=False)
    assert not (tmp_path / "latents.zarr").exists()


def test_majority_class_breaks_ties_by_smallest():
    got = majority_class(np.array([0, 0, 0, 1, 1, 2]), np.array(["b", "a", "b", "b", "a", "c"]))
    assert got.to_dict() == {0: "b", 1: "a", 2: "c"}


def test_figures(movie_dir, tmp_path):
    from rvae_tools.plots import rvae as plots

    movie_dir, _, model_path = movie_dir
    encode_patches(movie_dir / "patches.zarr", model_path, movie_dir / "latents.zarr", progress=False)
    # The model is given, never guessed: a stray pooled model beside the results is not read.
    with pytest.raises(InputError, match="no rVAE model given"):
        plots.draw(movie_dir, tmp_path / "f0", formats=("png",), dpi=60)
    written = plots.draw(movie_dir, tmp_path / "figures", formats=("png", "svg"), dpi=60, model_path=model_path)
    assert sorted(p.name for p in written) == sorted(f"{s}.{e}" for s in plots.FIGURES for e in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in written)
    svg = (tmp_path / "figures" / "rvae_latent_histograms.svg").read_text()
    assert "(px)" in svg and "(deg)" in svg
    with pytest.raises(InputError, match="checkpoint not found"):
        plots.draw(movie_dir, tmp_path / "f2", model_path=tmp_path / "none.pt")


def test_frame_axis_spans_the_movie():
    from rvae_tools.encode import _frame_axis

    attrs = {"n_frames": 5, "frame_first": 10, "frame_step": 2}
    assert _frame_axis(np.array([12, 16]), attrs).tolist() == [10, 12, 14, 16, 18]
    # without the numbering (or frames outside it) only the frames with windows are laid out
    assert _frame_axis(np.array([12, 17]), attrs).tolist() == [12, 17]
    assert _frame_axis(np.array([3, 1]), {}).tolist() == [1, 3]


def test_an_out_of_plane_model_stores_its_3d_pose_tilt_and_spreads(movie_dir, tmp_path):
    movie_dir, tracks, _ = movie_dir
    from rvae_tools.rvae.rvae3d import RVAE3D

    model = RVAE3D(SIZE, latent_dim=1, so3_grid=576, seed=0)
    model_path = tmp_path / "model3d.pt"
    model.save(model_path)
    out = tmp_path / "latents.zarr"
    encode_patches(movie_dir / "patches.zarr", model_path, out, device="cpu", batch_size=16, progress=False)
    ds = open_zarr(out, required=["quaternion", "quaternion_sd", "tilt", "tilt_sd", "in_plane_angle",
                                  "mirror_prob", "angle"]).load()
    assert ds.quaternion.dims == ("particle", "frame", "q") and list(ds.q.values) == [0, 1, 2, 3]
    assert ds.tilt.dims == ds.tilt_sd.dims == ds.in_plane_angle.dims == ("particle", "frame")
    assert ds.tilt.attrs["units"] == "rad" and ds.quaternion_sd.attrs["units"] == "rad"
    present = np.zeros((4, 10), dtype=bool)
    present[tracks.particle, tracks.frame] = True
    q = ds.quaternion.values
    assert np.isnan(q[~present]).all() and np.isnan(ds.tilt.values[~present]).all()
    qp = q[present]
    assert np.allclose(np.linalg.norm(qp, axis=1), 1.0, atol=1e-6) and (qp[:, 0] >= 0).all()
    # Tilt from the stored pose, written out here: the lab z component of the rotated body axis.
    w, x, y, z = qp.T
    third_row = np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 1)
    expected = np.arcsin(np.clip(np.abs(third_row @ model.body_axis()), 0, 1))
    assert np.allclose(ds.tilt.values[present], expected, atol=1e-4)
    assert (ds.tilt_sd.values[present] >= 0).all() and (ds.quaternion_sd.values[present] >= 0).all()
    patches = xr.open_zarr(movie_dir / "patches.zarr")
    direct = RVAE3D.load(model_path).encode(patches.window.values, device="cpu")
    p, f = patches.particle.values, patches.frame.values
    assert np.allclose(ds.quaternion.values[p, f], direct["quaternion"], atol=1e-6)
    assert np.allclose(ds.in_plane_angle.values[p, f], direct["in_plane_angle"], atol=1e-5)


def _latents(path):
    """The store as loaded, its provenance left out (it names the settings, which may differ)."""
    ds = open_zarr(path).load()
    for key in ("config", "config_hash", "git_commit", "library_versions", "inputs"):
        ds.attrs.pop(key, None)
    return ds


@pytest.mark.parametrize("species", ["cls", "latent"])
def test_chunks_of_trajectories_give_the_latents_of_one_chunk(movie_dir, tmp_path, species):
    movie_dir, _, model_path = movie_dir
    settings = validate_section("rvae", {**TINY, "species": species, "calibration_windows": 64})
    encode_patches(movie_dir / "patches.zarr", model_path, tmp_path / "one.zarr", device="cpu",
                   settings=settings, progress=False)
    code = main(["encode", str(movie_dir / "patches.zarr"), str(model_path), "-o", str(tmp_path / "chunked.zarr"),
                 "--device", "cpu", "--no-progress", "--chunk-trajectories", "1",
                 "--settings", json.dumps(settings)])
    assert code == 0
    whole, chunked = _latents(tmp_path / "one.zarr"), _latents(tmp_path / "chunked.zarr")
    assert whole.sizes == chunked.sizes and whole.sizes["particle"] == 4  # 4 chunks of one trajectory
    assert set(whole.variables) == set(chunked.variables)
    assert {"angle_raw", "species", "angle_shape_correction"} <= set(whole.variables)
    # Encoding and every per-trajectory step are the same; only the sums the angle calibration
    # is fitted on are added up in another order.
    xr.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-6)
    for name in ("species", "track_length", "x", "y", "z", "z_sd", "angle_raw", "angle_sd", "dx", "dy"):
        assert whole[name].identical(chunked[name]), name
    assert set(whole.attrs) == set(chunked.attrs)
    assert whole.attrs["species"] == chunked.attrs["species"]
    assert whole.attrs["spread_calibration"] == chunked.attrs["spread_calibration"]
    assert np.allclose(whole.attrs["angle_offset"], chunked.attrs["angle_offset"], atol=1e-9)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_a_chunk_of_no_trajectories_is_a_clear_error(movie_dir, tmp_path, capsys):
    movie_dir, _, model_path = movie_dir
    code = main(["encode", str(movie_dir / "patches.zarr"), str(model_path), "-o", str(tmp_path / "l.zarr"),
                 "--device", "cpu", "--no-progress", "--chunk-trajectories", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--chunk-trajectories must be a positive number of trajectories, got 0" in err
    assert "Traceback" not in err and not (tmp_path / "l.zarr").exists()


def _sparse_patches(path, n_trajectories=12, per_trajectory=4, n_frames=10000, seed=1):
    """A windows store written directly (not by make_windows): short trajectories of rods spread over a
    long movie, so the (particle, frame) grid is far larger than the windows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] - (SIZE - 1) / 2
    particle = np.repeat(np.arange(n_trajectories) * 3 + 7, per_trajectory)
    frame = np.concatenate([np.sort(rng.choice(n_frames, per_trajectory, replace=False)) for _ in range(n_trajectories)])
    angle = rng.uniform(-np.pi, np.pi, particle.size)
    u = xx * np.cos(angle)[:, None, None] + yy * np.sin(angle)[:, None, None]
    v = -xx * np.sin(angle)[:, None, None] + yy * np.cos(angle)[:, None, None]
    windows = np.exp(-(u / 5.0) ** 2 - (v / 1.5) ** 2) + rng.normal(0, 0.02, (particle.size, SIZE, SIZE))
    order = np.lexsort((particle, frame))  # the store's order: by frame
    obs = {"particle": particle[order], "frame": frame[order],
           "x": rng.uniform(0, 500, particle.size), "y": rng.uniform(0, 500, particle.size)}
    ds = xr.Dataset({"window": (("obs", "wy", "wx"), windows[order].astype(np.float32))},
                    coords={name: ("obs", value) for name, value in obs.items()},
                    attrs={"n_frames": n_frames, "frame_first": 0, "frame_step": 1})
    write_zarr(ds, path, encoding={"window": {"chunks": (32, SIZE, SIZE)}})
    return n_trajectories * n_frames


def test_encode_memory_is_bounded_by_a_chunk_of_trajectories(tmp_path):
    import tracemalloc

    from rvae_tools.rvae import RVAE

    cells = _sparse_patches(tmp_path / "patches.zarr")
    model = RVAE(SIZE, **TINY)
    settings = validate_section("rvae", {**TINY, "calibration_windows": 0, "species": "single"})
    # What the whole grid's latents alone take: 7 float32 scalars, z and z_sd, and x, y in float64.
    grid_bytes = cells * (4 * (7 + 2 * TINY["latent_dim"]) + 2 * 8)
    peaks = {}
    for size in (None, 3):
        out = tmp_path / f"latents_{size}.zarr"
        tracemalloc.start()
        try:
            encode_patches(tmp_path / "patches.zarr", "none.pt", out, model=model, settings=settings,
                           device="cpu", progress=False, chunk_trajectories=size)
            peaks[size] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        ds = open_zarr(out)
        assert ds.sizes["particle"] == 12 and ds.sizes["frame"] == 10000
        assert int(np.isfinite(ds.angle_raw.values).sum()) == 48
    # The check sees the grid: in one chunk (as encode held it before) the peak is above the
    # grid's latents alone ...
    assert peaks[None] > grid_bytes, (peaks, grid_bytes)
    # ... and it falls with the chunk: 3 of the 12 trajectories at a time (1/4 of the grid;
    # measured 4.4 against 24 MB).
    assert peaks[3] < peaks[None] / 3, (peaks, grid_bytes)

"""Windows: sub-pixel centring, edges, chunked writing, normalisation, reproducibility, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.io import open_zarr, write_table, write_zarr
from rvae_tools.windows import cut_windows, inside_frame, make_windows, normalise, window_offsets

H = W = 64


def blob(shape, x, y, sigma=2.0, amplitude=1.0):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return amplitude * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def settings(**over):
    return validate_section("windows", {"size": 16, **over})


def write_movie(path, frames, **attrs):
    attrs = {"pixel_size": 2.0, "pixel_unit": "nm", "frame_interval": 0.5, "sha256": "0" * 64, **attrs}
    ds = xr.Dataset({"image": (("frame", "y", "x"), np.asarray(frames, dtype=np.float32))}, attrs=attrs)
    return write_zarr(ds, path, encoding={"image": {"chunks": (1, *ds.image.shape[1:])}})


@pytest.fixture
def movie_and_tracks(tmp_path):
    """12 frames, 5 particles (one near the right edge) with sub-pixel positions and a class."""
    rng = np.random.default_rng(1)
    start = np.array([[12.3, 14.7], [30.6, 40.2], [50.1, 20.9], [20.4, 50.5], [60.5, 32.25]])
    frames, rows = [], []
    for f in range(12):
        img = rng.normal(0.1, 0.01, (H, W))
        for p, (x, y) in enumerate(start + 0.37 * f * np.array([1, -1]) * (np.arange(5) % 2 * 2 - 1)[:, None]):
            if p == 4:
                x = 60.5
            if p == 2 and f in (3, 4):
                continue  # particle 2 is absent in two frames
            img += blob((H, W), x, y, amplitude=1.0 + 0.2 * p)
            rows.append((f, x, y, p, "rod" if p % 2 else "L", 0.9))
        frames.append(img)
    movie = write_movie(tmp_path / "movie.zarr", frames)
    tracks = pd.DataFrame(rows, columns=["frame", "x", "y", "particle", "cls", "score"])
    write_table(tracks, tmp_path / "tracks.parquet")
    return movie, tmp_path / "tracks.parquet", tracks


def test_subpixel_blob_is_centred():
    size = 17
    for x, y in [(20.0, 25.0), (20.37, 25.81), (31.5, 18.25)]:
        frame = blob((H, W), x, y, sigma=2.0)
        for order in (1, 3):
            win = cut_windows(frame, [x], [y], size, order=order)[0].astype(np.float64)
            off = window_offsets(size)
            total = win.sum()
            cy = (win.sum(axis=1) * off).sum() / total
            cx = (win.sum(axis=0) * off).sum() / total
            # linear interpolation blurs symmetrically about the sample point, so the centroid holds
            assert abs(cx) < 0.02 and abs(cy) < 0.02, (x, y, order, cx, cy)
    # even sizes: the centre lies between the two middle pixels
    frame = blob((H, W), 30.3, 22.6)
    win = cut_windows(frame, [30.3], [22.6], 16)[0]
    assert np.allclose(win, win[::-1, ::-1], atol=1e-2)


def test_window_orientation_is_row_y_column_x():
    frame = np.zeros((H, W))
    frame[20, 30] = 1.0  # row 20 (y), column 30 (x)
    win = cut_windows(frame, [28.0], [20.0], 9)[0]  # centre 2 px left of the pixel
    assert win[4, 6] == pytest.approx(1.0)


def test_inside_frame_edges():
    size = 16  # samples reach 7.5 px either side of the centre
    x = np.array([7.5, 7.4, 55.5, 55.6, 30.0])
    y = np.array([30.0, 30.0, 30.0, 30.0, 7.49])
    assert inside_frame(x, y, size, (H, W)).tolist() == [True, False, True, False, False]


def test_normalise_maps_levels_and_clips():
    w = np.array([[-1.0, 0.0], [2.0, 4.0]])
    assert normalise(w, 0.0, 2.0, clip=True).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert normalise(w, 0.0, 2.0, clip=False).tolist() == [[-0.5, 0.0], [1.0, 2.0]]


def test_store_contract_and_edges(movie_and_tracks, tmp_path):
    movie, tracks_path, tracks = movie_and_tracks
    out = tmp_path / "patches.zarr"
    summary = make_windows(movie, tracks_path, out, settings(edge="drop"), progress=False)
    ds = open_zarr(out, required=["window", "particle", "frame", "x", "y", "cls"])
    assert ds.window.dims == ("obs", "wy", "wx") and ds.window.dtype == np.float32
    assert ds.window.shape[1:] == (16, 16)
    # particle 4 sits 3.5 px from the right edge: dropped with edge: drop
    assert 4 not in set(ds.particle.values)
    assert summary["n_dropped_edge"] == 12 and ds.sizes["obs"] == len(tracks) - 12
    assert ds.attrs["pixel_size"] == 2.0 and ds.attrs["pixel_unit"] == "nm" and ds.attrs["frame_interval"] == 0.5
    assert ds.attrs["stage"] == "windows" and "config_hash" in ds.attrs and ds.attrs["seed"] == 0
    assert set(ds.cls.values) == {"rod", "L"}
    # every (particle, frame, x, y) is a row of the tracks table
    got = pd.DataFrame({k: ds[k].values for k in ("particle", "frame", "x", "y")})
    merged = got.merge(tracks, on=["particle", "frame"], suffixes=("", "_t"))
    assert len(merged) == len(got)
    assert np.allclose(merged.x, merged.x_t) and np.allclose(merged.y, merged.y_t)

    # the default pads it and records which share of the window lies outside the frame
    padded = make_windows(movie, tracks_path, tmp_path / "padded.zarr", settings(), progress=False)
    pds = open_zarr(tmp_path / "padded.zarr")
    assert padded["n_padded"] == 12 and pds.sizes["obs"] == len(tracks)
    # its columns run 53 ... 68: the 5 past column 63 of the 16 are outside
    assert np.allclose(pds.padded_fraction.values[pds.padded.values], 5 / 16)
    assert np.all(pds.padded_fraction.values[~pds.padded.values] == 0)
    edge = pds.window.values[pds.padded.values]
    # samples beyond column 63 take the background level, which normalisation maps to 0
    assert np.all(edge[:, :, -4:] == 0.0)
    assert edge[:, :, :12].max() > 0.5


def test_chunked_writing_equals_one_shot_cutting(movie_and_tracks, tmp_path):
    movie, tracks_path, tracks = movie_and_tracks
    out = tmp_path / "chunked.zarr"
    make_windows(movie, tracks_path, out, settings(chunk_size=7, edge="pad"), progress=False)
    ds = xr.open_zarr(out)
    assert ds.window.encoding["chunks"][0] == 7
    frames = xr.open_zarr(movie).image.values
    low, high = ds.attrs["norm_low"], ds.attrs["norm_high"]
    order = tracks.sort_values(["frame", "particle"]).reset_index(drop=True)
    expected = np.concatenate([
        cut_windows(frames[f], g.x.to_numpy(), g.y.to_numpy(), 16, cval=ds.attrs["norm_low"])
        for f, g in order.groupby("frame")
    ])
    expected = normalise(expected, low, high, clip=True)
    assert np.array_equal(ds.particle.values, order.particle.values)
    assert np.array_equal(ds.window.values, expected)
    one = tmp_path / "one.zarr"
    make_windows(movie, tracks_path, one, settings(chunk_size=100000, edge="pad"), progress=False)
    assert np.array_equal(xr.open_zarr(one).window.values, ds.window.values)


def test_normalisation_levels_recorded(movie_and_tracks, tmp_path):
    movie, tracks_path, _ = movie_and_tracks
    make_windows(movie, tracks_path, tmp_path / "p.zarr", settings(percentiles=[5, 99]), progress=False)
    ds = xr.open_zarr(tmp_path / "p.zarr")
    w = ds.window.values
    assert w.min() == 0.0 and w.max() == 1.0
    # the background (about 0.1) is below the 5th percentile of pixels near the particles
    assert 0.05 < ds.attrs["norm_low"] < 0.2 and ds.attrs["norm_high"] > 0.8
    assert ds.attrs["percentiles"] == [5, 99]
    raw = tmp_path / "raw.zarr"
    make_windows(movie, tracks_path, raw, settings(normalize="none", clip=False), progress=False)
    rw = xr.open_zarr(raw)
    assert rw.attrs["norm_low"] == 0.0 and rw.attrs["norm_high"] == 1.0
    assert np.allclose(normalise(rw.window.values, ds.attrs["norm_low"], ds.attrs["norm_high"], True), w, atol=1e-6)


def test_same_inputs_give_bit_identical_windows(movie_and_tracks, tmp_path):
    movie, tracks_path, _ = movie_and_tracks
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    s = settings(interpolation="cubic", chunk_size=9)
    make_windows(movie, tracks_path, a, s, progress=False)
    make_windows(movie, tracks_path, b, s, progress=False)
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert da.window.values.tobytes() == db.window.values.tobytes()
    assert da.attrs["config_hash"] == db.attrs["config_hash"]


def test_probability_source(movie_and_tracks, tmp_path):
    movie, tracks_path, _ = movie_and_tracks
    image = xr.open_zarr(movie).image.values
    prob = 1 / (1 + np.exp(-(image - 0.5) * 10))
    write_zarr(xr.Dataset({"probability": (("frame", "y", "x"), prob.astype(np.float32))}), tmp_path / "prob.zarr")
    out = tmp_path / "p.zarr"
    make_windows(movie, tracks_path, out, settings(source="probability"), probability_path=tmp_path / "prob.zarr",
                 progress=False)
    ds = xr.open_zarr(out)
    assert ds.attrs["source"] == "probability" and ds.attrs["normalize"] == "none"
    first = ds.isel(obs=0)
    expected = cut_windows(prob[int(first.frame)], [float(first.x)], [float(first.y)], 16)[0]
    assert np.allclose(first.window.values, expected, atol=1e-6)
    with pytest.raises(InputError, match="probability"):
        make_windows(movie, tracks_path, tmp_path / "q.zarr", settings(source="probability"), progress=False)


def test_memory_is_bounded_by_chunks_not_movie(tmp_path, monkeypatch):
    """With a tiny block budget the movie is read one frame at a time."""
    import rvae_tools.windows as wmod

    frames = [blob((H, W), 32.2, 31.7) + 0.01 * i for i in range(6)]
    movie = write_movie(tmp_path / "m.zarr", frames)
    write_table(pd.DataFrame({"frame": range(6), "x": 32.2, "y": 31.7, "particle": 0}), tmp_path / "t.parquet")
    reads = []
    original = wmod._frame_blocks

    def spy(pos, frame_bytes):
        for block in original(pos, frame_bytes):
            reads.append(block[1] - block[0])
            yield block

    monkeypatch.setattr(wmod, "BLOCK_BYTES", 1)
    monkeypatch.setattr(wmod, "_frame_blocks", spy)
    make_windows(movie, tmp_path / "t.parquet", tmp_path / "p.zarr", settings(chunk_size=2), progress=False)
    assert reads == [1] * 6
    assert xr.open_zarr(tmp_path / "p.zarr").sizes["obs"] == 6


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_problem(movie_and_tracks, tmp_path):
    movie, tracks_path, tracks = movie_and_tracks
    out = tmp_path / "bad.zarr"
    with pytest.raises(InputError, match=r"windows.size 100 px is larger than the frame .* \(64 x 64 px\)"):
        make_windows(movie, tracks_path, out, settings(size=100), progress=False)

    write_table(tracks.iloc[:0], tmp_path / "empty.parquet")
    with pytest.raises(InputError, match="zero tracks"):
        make_windows(movie, tmp_path / "empty.parquet", out, settings(), progress=False)

    write_table(tracks.drop(columns=["particle"]), tmp_path / "noparticle.parquet")
    with pytest.raises(InputError, match="lacks column.*particle"):
        make_windows(movie, tmp_path / "noparticle.parquet", out, settings(), progress=False)

    write_table(pd.concat([tracks, tracks.iloc[:1]]), tmp_path / "dup.parquet")
    with pytest.raises(InputError, match="duplicate"):
        make_windows(movie, tmp_path / "dup.parquet", out, settings(), progress=False)

    late = tracks.copy()
    late.loc[0, "frame"] = 99
    write_table(late, tmp_path / "late.parquet")
    with pytest.raises(InputError, match="frame.*99"):
        make_windows(movie, tmp_path / "late.parquet", out, settings(), progress=False)

    write_table(tracks.assign(x=2.0), tmp_path / "edge.parquet")
    with pytest.raises(InputError, match="no 16 x 16 window fits"):
        make_windows(movie, tmp_path / "edge.parquet", out, settings(edge="drop"), progress=False)

    write_movie(tmp_path / "flat.zarr", np.full((12, H, W), 3.0))
    with pytest.raises(InputError, match="all windows are constant"):
        make_windows(tmp_path / "flat.zarr", tracks_path, out, settings(), progress=False)
    with pytest.raises(InputError, match="all .*windows are constant"):
        make_windows(tmp_path / "flat.zarr", tracks_path, out, settings(normalize="none"), progress=False)

    write_movie(tmp_path / "nan.zarr", np.full((12, H, W), np.nan))
    with pytest.raises(InputError, match="all windows are NaN"):
        make_windows(tmp_path / "nan.zarr", tracks_path, out, settings(), progress=False)

    with pytest.raises(InputError, match="percentile"):
        make_windows(movie, tracks_path, out, settings(percentiles=[90, 10]), progress=False)
    with pytest.raises(InputError, match="windows.edge"):
        settings(edge="wrap")
    assert not out.exists() and not list(tmp_path.glob(".bad.zarr*"))


def test_cli_exit_codes(movie_and_tracks, tmp_path, capsys):
    movie, tracks_path, _ = movie_and_tracks
    out = tmp_path / "cli.zarr"
    code = main(["windows", str(movie), str(tracks_path), "-o", str(out), "--no-progress",
                 "--settings", json.dumps({"size": 16, "edge": "pad"})])
    assert code == 0 and xr.open_zarr(out).sizes["obs"] > 0
    code = main(["windows", str(movie), str(tracks_path), "-o", str(tmp_path / "x.zarr"),
                 "--settings", json.dumps({"size": 65})])
    err = capsys.readouterr().err
    assert code == 2 and "rvae-tools windows: error: windows.size 65 px is larger" in err


def test_movie_frame_numbers_are_kept(tmp_path):
    """ingest keeps source frame numbers (frames: {start: 10, step: 2}); tracks refer to those."""
    frames = [blob((H, W), 20.0 + i, 30.0) for i in range(4)]
    ds = xr.Dataset({"image": (("frame", "y", "x"), np.asarray(frames, np.float32))},
                    coords={"frame": [10, 12, 14, 16]})
    write_zarr(ds, tmp_path / "m.zarr")
    write_table(pd.DataFrame({"frame": [12, 16], "x": [21.0, 23.0], "y": 30.0, "particle": 0}), tmp_path / "t.parquet")
    make_windows(tmp_path / "m.zarr", tmp_path / "t.parquet", tmp_path / "p.zarr", settings(), progress=False)
    out = xr.open_zarr(tmp_path / "p.zarr")
    assert out.frame.values.tolist() == [12, 16]
    assert (out.attrs["frame_first"], out.attrs["frame_step"], out.attrs["n_frames"]) == (10, 2, 4)
    # both windows hold a centred blob: the right frame was read for each frame number
    for w in out.window.values:
        assert np.unravel_index(np.argmax(w), w.shape) in {(7, 7), (7, 8), (8, 7), (8, 8)}
    write_table(pd.DataFrame({"frame": [11], "x": [21.0], "y": 30.0, "particle": 0}), tmp_path / "odd.parquet")
    with pytest.raises(InputError, match="frame.*11.*does not have"):
        make_windows(tmp_path / "m.zarr", tmp_path / "odd.parquet", tmp_path / "q.zarr", settings(), progress=False)


def _axis(win: np.ndarray) -> float:
    """Major axis (rad, from +x towards +y, modulo pi) of a window's intensity above its median."""
    w = np.clip(win - np.median(win), 0, None).astype(np.float64)
    yy, xx = np.mgrid[0:win.shape[0], 0:win.shape[1]]
    mx, my = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    sxx, syy = (w * (xx - mx) ** 2).sum(), (w * (yy - my) ** 2).sum()
    sxy = (w * (xx - mx) * (yy - my)).sum()
    return 0.5 * np.arctan2(2 * sxy, sxx - syy)


def test_the_aperture_keeps_a_brighter_touching_neighbour_out(tmp_path):
    """A dim rod at 20 deg touching a bright one at 110 deg: its window's axis is its own only with the aperture."""
    size, hh, ww = 32, 64, 64

    def rod(x, y, angle, amplitude):
        yy, xx = np.mgrid[0:hh, 0:ww]
        u = (xx - x) * np.cos(angle) + (yy - y) * np.sin(angle)
        v = -(xx - x) * np.sin(angle) + (yy - y) * np.cos(angle)
        return amplitude * np.exp(-(u / 6.0) ** 4 - (v / 2.0) ** 4)

    own, other = np.radians(20), np.radians(110)
    frame = rod(32, 32, own, 1.0) + rod(32 + 9 * np.cos(other + 1.2), 32 + 9 * np.sin(other + 1.2), other, 2.5)
    write_movie(tmp_path / "movie.zarr", [frame + 0.05])
    # The detector's segment of the dim rod: its axes (full lengths, px) and orientation.
    tracks = pd.DataFrame({"frame": [0], "x": [32.0], "y": [32.0], "particle": [0],
                           "major_axis": [12.0], "minor_axis": [4.0], "orientation": [own]})
    write_table(tracks, tmp_path / "tracks.parquet")
    raw = make_windows(tmp_path / "movie.zarr", tmp_path / "tracks.parquet", tmp_path / "raw.zarr",
                       settings(size=size, mask="none"), progress=False)
    masked = make_windows(tmp_path / "movie.zarr", tmp_path / "tracks.parquet", tmp_path / "masked.zarr",
                          settings(size=size), progress=False)
    assert raw["n_windows"] == masked["n_windows"] == 1
    w_raw = open_zarr(tmp_path / "raw.zarr").window.values[0]
    ds = open_zarr(tmp_path / "masked.zarr")
    assert ds.attrs["mask"] == "aperture" and ds.aperture_a.values[0] == pytest.approx(8.0)

    def off(a):
        return abs(np.degrees(np.angle(np.exp(2j * (a - own))) / 2))

    assert off(_axis(w_raw)) > 15  # the neighbour steers the raw window
    assert off(_axis(ds.window.values[0])) < 5


def test_aperture_windows_of_a_real_colony_follow_their_own_cell(tmp_path, shared_data):
    """Real phase-contrast E. coli colony (touching cells): each aperture window's axis is its cell's mask ellipse."""
    tifffile = pytest.importorskip("tifffile")
    from skimage.measure import regionprops

    folder = shared_data / "omnipose_rods"
    image = tifffile.imread(folder / "ec_5I_t141xy5c1.tif").astype(np.float64)
    labels = tifffile.imread(folder / "masks" / "ec_5I_t141xy5c1_cp_masks.tif")
    rows = []
    for r in regionprops(labels):
        if r.area < 20:
            continue
        cy, cx = r.centroid
        # skimage: angle of the major axis from the row axis; ours: from +x (columns) towards +y (rows)
        rows.append({"frame": 0, "x": cx, "y": cy, "particle": r.label, "orientation": np.pi / 2 - r.orientation,
                     "major_axis": r.axis_major_length, "minor_axis": r.axis_minor_length,
                     "eccentricity": r.eccentricity})
    tracks = pd.DataFrame(rows)
    write_movie(tmp_path / "movie.zarr", [image.max() - image])  # dark cells -> bright, as `invert` does
    write_table(tracks, tmp_path / "tracks.parquet")
    scores = {}
    for mask in ("none", "aperture"):
        out = tmp_path / f"{mask}.zarr"
        summary = make_windows(tmp_path / "movie.zarr", tmp_path / "tracks.parquet", out,
                               settings(size=48, mask=mask), progress=False)
        assert summary["n_windows"] == len(tracks)  # cells near the edge are padded, not dropped
        ds = open_zarr(out)
        axes = np.array([_axis(w) for w in ds.window.values])
        ref = ds.orientation.values
        elongated = ds.eccentricity.values >= 0.8
        scores[mask] = abs(np.mean(np.exp(2j * (axes - ref))[elongated]))
    assert scores["aperture"] >= 0.9 and scores["aperture"] > scores["none"] + 0.3, scores


def test_polarity_cuts_the_halo_and_keeps_the_particle(tmp_path):
    """A dark rod at 30 deg on a grey background with a bright blob (a neighbour's gap) beside it.

    With ``polarity: dark`` the window's axis is the rod's (the blob, brighter than the
    background, is set to it); with ``both`` the bright blob pulls the contrast's axis away.
    """
    size, hh, ww = 32, 64, 64
    yy, xx = np.mgrid[0:hh, 0:ww]
    own = np.radians(30)
    u = (xx - 32) * np.cos(own) + (yy - 32) * np.sin(own)
    v = -(xx - 32) * np.sin(own) + (yy - 32) * np.cos(own)
    rod = np.exp(-(u / 7.0) ** 4 - (v / 2.5) ** 4)
    gap = blob((hh, ww), 32 + 7 * np.cos(own + 1.2), 32 + 7 * np.sin(own + 1.2), sigma=2.5)
    rng = np.random.default_rng(0)
    frame = 0.5 - 0.4 * rod + 0.45 * gap + rng.normal(0, 0.005, (hh, ww))
    write_movie(tmp_path / "movie.zarr", [frame])
    write_table(pd.DataFrame({"frame": [0], "x": [32.0], "y": [32.0], "particle": [0]}), tmp_path / "tracks.parquet")
    axes = {}
    for polarity in ("dark", "both"):
        make_windows(tmp_path / "movie.zarr", tmp_path / "tracks.parquet", tmp_path / f"{polarity}.zarr",
                     settings(size=size, polarity=polarity), progress=False)
        ds = open_zarr(tmp_path / f"{polarity}.zarr")
        win = ds.window.values[0].astype(np.float64)
        assert ds.attrs["polarity"] == polarity
        level = ds.attrs["background_level"]
        contrast = np.abs(win - level)  # both sides of the background, as the rVAE's squared error sees them
        yy2, xx2 = np.mgrid[0:size, 0:size]
        c = (xx2 - xx2.mean()) + 1j * (yy2 - yy2.mean())
        axes[polarity] = float(np.angle((contrast * c ** 2).sum()) / 2)
        if polarity == "dark":
            assert win.max() <= level + 1e-6  # nothing brighter than the background is left
            assert win.min() == pytest.approx(0.0, abs=0.02)  # the rod keeps its full contrast

    def off(a):
        return abs(np.degrees(np.angle(np.exp(2j * (a - own))) / 2))

    assert off(axes["dark"]) < 5, np.degrees(axes["dark"])
    assert off(axes["both"]) > 10, np.degrees(axes["both"])


def test_inspected_polarity_reaches_the_windows():
    from rvae_tools.inspect import resolve_settings

    for polarity in ("dark", "bright"):
        resolved, notes = resolve_settings("windows", validate_section("windows", {}),
                                           {"suggested": {"windows": {"size": 24, "polarity": polarity}}})
        assert resolved["polarity"] == polarity and any("windows.polarity" in n for n in notes)
    assert resolve_settings("windows", validate_section("windows", {}))[0]["polarity"] == "both"  # simulated movie
    assert resolve_settings("windows", validate_section("windows", {"polarity": "both"}),
                            {"suggested": {"windows": {"polarity": "dark"}}})[0]["polarity"] == "both"  # set wins

"""Movie ingest: every reader, the processing options, the store contract and bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from rvae_tools.cli import main
from rvae_tools.errors import InputError
from rvae_tools.ingest import ingest, iter_frames, read_movie_info
from rvae_tools.io import open_zarr

BULK_WATER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bulk_water"


def _movie(n=6, h=20, w=24, seed=0):
    """A small uint16 movie whose frames all differ."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=(n, h, w), dtype=np.uint16)


def _open(path):
    ds = xr.open_zarr(path)
    assert open_zarr(path, required=["image"]).image.shape == ds.image.shape
    return ds


def _no_output(tmp_path, out):
    """Nothing at the output path and no temporary sibling left behind."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


# --------------------------------------------------------------------------- readers


def test_tiff_reader_contract_and_simulation_units(tmp_path):
    import tifffile

    movie = _movie()
    raw = tmp_path / "raw"
    raw.mkdir()
    tifffile.imwrite(raw / "movie.tif", movie.astype(np.float32), photometric="minisblack")
    (raw / "simulation.json").write_text(
        json.dumps({"pixel_size": 1.5, "pixel_unit": "nm", "frame_interval": 0.5})
    )
    out = ingest(raw / "movie.tif", tmp_path / "movie.zarr")
    ds = _open(out)
    assert ds.image.dtype == np.float32
    assert ds.image.dims == ("frame", "y", "x")
    assert ds.image.encoding["chunks"] == (1, 20, 24)
    np.testing.assert_array_equal(ds.image.values, movie.astype(np.float32))
    np.testing.assert_array_equal(ds.frame.values, np.arange(6))
    np.testing.assert_allclose(ds.time.values, np.arange(6) * 0.5)
    assert ds.time.attrs["units"] == "s"
    assert (ds.attrs["pixel_size"], ds.attrs["pixel_unit"], ds.attrs["frame_interval"]) == (
        1.5,
        "nm",
        0.5,
    )
    assert ds.attrs["defaults"] == []
    assert ds.attrs["reader"] == "tiff"
    assert ds.attrs["source"] == str(raw / "movie.tif")
    assert len(ds.attrs["sha256"]) == 64
    assert (
        ds.attrs["stage"] == "ingest"
        and "rvae_tools_version" in ds.attrs
        and "config_hash" in ds.attrs
    )
    # options win over the simulator's metadata
    info = read_movie_info(raw / "movie.tif", pixel_size=3.0)
    assert info["pixel_size"] == 3.0 and info["pixel_unit"] == "nm"


def test_compressed_imagej_tiff_units(tmp_path):
    import tifffile

    movie = _movie(n=4)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        movie,
        imagej=True,
        compression="zlib",
        resolution=(1 / 0.25, 1 / 0.25),
        metadata={"axes": "TYX", "unit": "micron", "finterval": 0.2},
    )
    info = read_movie_info(tmp_path / "ij.tif")
    assert info["n_frames"] == 4 and info["frame_shape"] == (20, 24)
    assert info["pixel_size"] == pytest.approx(0.25) and info["pixel_unit"] == "um"
    assert info["frame_interval"] == pytest.approx(0.2) and info["defaults"] == []
    frames = np.stack(list(iter_frames(tmp_path / "ij.tif")))
    np.testing.assert_array_equal(frames, movie)


def test_hyperstack_channels_and_ome_units(tmp_path):
    import tifffile

    stack = np.random.default_rng(3).integers(0, 1000, (5, 2, 16, 20)).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "tc.tif", stack, imagej=True, compression="zlib", metadata={"axes": "TCYX"}
    )
    with pytest.raises(InputError, match="2 channels"):
        read_movie_info(tmp_path / "tc.tif")
    np.testing.assert_array_equal(
        np.stack(list(iter_frames(tmp_path / "tc.tif", channel=1))), stack[:, 1]
    )
    tifffile.imwrite(
        tmp_path / "m.ome.tif",
        stack[:, 0],
        metadata={
            "axes": "TYX",
            "PhysicalSizeX": 0.2,
            "PhysicalSizeXUnit": "\u00b5m",
            "TimeIncrement": 50,
            "TimeIncrementUnit": "ms",
        },
    )
    info = read_movie_info(tmp_path / "m.ome.tif")
    assert info["n_frames"] == 5 and info["pixel_unit"] == "um"
    assert info["pixel_size"] == pytest.approx(0.2) and info["frame_interval"] == pytest.approx(
        0.05
    )


def test_rgb_tiff_takes_channel_or_luminance(tmp_path):
    import tifffile

    rgb = np.random.default_rng(1).integers(0, 255, size=(3, 16, 18, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    green = np.stack(list(iter_frames(tmp_path / "rgb.tif", channel=1)))
    np.testing.assert_array_equal(green, rgb[..., 1])
    luma = np.stack(list(iter_frames(tmp_path / "rgb.tif")))
    np.testing.assert_allclose(luma, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-3)


def test_png_folder_natural_sort_and_defaults(tmp_path):
    movie = (_movie(n=12) // 16).astype(np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(movie):
        _write_png(folder / f"frame_{i}.png", frame)  # frame_2 sorts before frame_10
    (folder / "notes.txt").write_text("not a frame")
    ds = _open(ingest(folder, tmp_path / "movie.zarr"))
    np.testing.assert_array_equal(ds.image.values, movie.astype(np.float32))
    assert ds.attrs["reader"] == "folder"
    assert (ds.attrs["pixel_size"], ds.attrs["pixel_unit"], ds.attrs["frame_interval"]) == (
        1.0,
        "px",
        1.0,
    )
    assert sorted(ds.attrs["defaults"]) == ["frame_interval", "pixel_size", "pixel_unit"]
    assert "time" not in ds.coords  # no time axis without a known frame interval


def test_tiff_folder(tmp_path):
    import tifffile

    movie = _movie(n=3)
    folder = tmp_path / "tiffs"
    folder.mkdir()
    for i, frame in enumerate(movie):
        tifffile.imwrite(folder / f"t{i:03d}.tif", frame)
    np.testing.assert_array_equal(np.stack(list(iter_frames(folder))), movie)


def test_npy_and_npz_readers(tmp_path):
    movie = _movie().astype(np.float64)
    np.save(tmp_path / "m.npy", movie)
    np.savez_compressed(tmp_path / "one.npz", movie=movie)
    np.savez(tmp_path / "two.npz", image=movie, mask=movie > 100)
    for path, options in [
        (tmp_path / "m.npy", {}),
        (tmp_path / "one.npz", {}),
        (tmp_path / "two.npz", {"dataset": "image"}),
    ]:
        ds = _open(ingest(path, tmp_path / f"{path.stem}.zarr", options))
        np.testing.assert_array_equal(ds.image.values, movie.astype(np.float32))
        assert ds.attrs["reader"] == path.suffix[1:]
    # stride and crop read frames out of a compressed archive member
    got = np.stack(
        list(iter_frames(tmp_path / "one.npz", frames={"start": 1, "step": 2}, crop=[2, 10, 3, 9]))
    )
    np.testing.assert_array_equal(got, movie[1::2, 2:10, 3:9].astype(np.float32))


def test_channels_first_and_last_arrays(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 255, size=(4, 12, 14, 3), dtype=np.uint8)
    np.save(tmp_path / "last.npy", rgb)
    np.save(tmp_path / "first.npy", np.moveaxis(rgb, -1, 1))
    for name in ("last.npy", "first.npy"):
        got = np.stack(list(iter_frames(tmp_path / name, channel=2)))
        np.testing.assert_array_equal(got, rgb[..., 2])


def test_video_reader(tmp_path):
    import imageio_ffmpeg

    n, h, w = 8, 32, 48
    xx = np.mgrid[:h, :w][1]
    frames = [
        np.repeat((((xx + 4 * i) % w) * 5).astype(np.uint8)[..., None], 3, axis=2) for i in range(n)
    ]
    writer = imageio_ffmpeg.write_frames(
        str(tmp_path / "m.avi"),
        (w, h),
        fps=10,
        codec="mjpeg",
        pix_fmt_out="yuvj444p",
        quality=10,
        macro_block_size=1,
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()
    info = read_movie_info(tmp_path / "m.avi")
    assert info["reader"] == "video" and info["n_frames"] == n and info["frame_shape"] == (h, w)
    assert info["frame_interval"] == pytest.approx(0.1)
    ds = _open(ingest(tmp_path / "m.avi", tmp_path / "movie.zarr", {"frames": {"step": 3}}))
    assert list(ds.frame.values) == [0, 3, 6]
    # lossy codec: the decoded frames match the written ones up to compression error
    for j, i in enumerate([0, 3, 6]):
        assert np.abs(ds.image.values[j] - frames[i][..., 0]).mean() < 6


def test_zarr_readers_and_round_trip(tmp_path):
    import zarr

    movie = _movie()
    arr = zarr.create_array(
        str(tmp_path / "plain.zarr"), shape=movie.shape, chunks=(1, 20, 24), dtype="uint16"
    )
    arr[:] = movie
    np.testing.assert_array_equal(np.stack(list(iter_frames(tmp_path / "plain.zarr"))), movie)

    # an xarray store with the frames under another name and channel dimension named
    rgb = np.stack([movie, movie // 2, movie // 4], axis=1)
    xr.Dataset({"stack": (("t", "c", "y", "x"), rgb)}).to_zarr(
        tmp_path / "xr.zarr", mode="w", consolidated=False
    )
    got = np.stack(list(iter_frames(tmp_path / "xr.zarr", dataset="stack", channel=1)))
    np.testing.assert_array_equal(got, movie // 2)

    # our own output is a valid input and keeps its units
    first = ingest(
        tmp_path / "plain.zarr", tmp_path / "a.zarr", {"pixel_size": 2.0, "pixel_unit": "nm"}
    )
    again = _open(ingest(first, tmp_path / "b.zarr"))
    np.testing.assert_array_equal(again.image.values, movie)
    assert (again.attrs["pixel_size"], again.attrs["pixel_unit"]) == (2.0, "nm")
    assert again.attrs["defaults"] == ["frame_interval"]


# --------------------------------------------------------------------------- options


def test_invert_crop_stride(tmp_path):
    movie = (_movie(n=10) // 16).astype(np.uint8)
    np.save(tmp_path / "m.npy", movie)
    options = {"invert": True, "crop": [2, 12, 5, 20], "frames": {"start": 1, "stop": 9, "step": 3}}
    ds = _open(ingest(tmp_path / "m.npy", tmp_path / "movie.zarr", options))
    np.testing.assert_array_equal(ds.frame.values, [1, 4, 7])
    np.testing.assert_array_equal(ds.image.values, 255.0 - movie[1:9:3, 2:12, 5:20])
    assert ds.attrs["invert_max"] == 255.0
    # float data invert around the maximum of the kept frames
    np.save(tmp_path / "f.npy", movie.astype(np.float32) / 10)
    got = np.stack(list(iter_frames(tmp_path / "f.npy", invert=True, frames={"stop": 2})))
    kept = movie[:2].astype(np.float32) / 10
    np.testing.assert_allclose(got, kept.max() - kept)


def test_sha256_stable_and_sensitive(tmp_path):
    movie = (_movie(n=3) // 16).astype(np.uint8)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(movie):
        _write_png(folder / f"f{i}.png", frame)
    a = _open(ingest(folder, tmp_path / "a.zarr")).attrs["sha256"]
    b = _open(ingest(folder, tmp_path / "b.zarr", {"invert": True})).attrs["sha256"]
    assert a == b  # checksum of the source, not of the options
    _write_png(folder / "f1.png", movie[1] + 1)
    assert _open(ingest(folder, tmp_path / "c.zarr")).attrs["sha256"] != a


def test_rerun_replaces_output(tmp_path):
    np.save(tmp_path / "m.npy", _movie())
    out = tmp_path / "movie.zarr"
    ingest(tmp_path / "m.npy", out)
    ingest(tmp_path / "m.npy", out, {"frames": {"stop": 2}})
    assert _open(out).sizes["frame"] == 2


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not BULK_WATER.is_dir(),
    reason=f"real data not found: {BULK_WATER} (the trackpy bulk_water frames)",
)
def test_bulk_water_green_channel(tmp_path):
    from PIL import Image

    info = read_movie_info(BULK_WATER, channel=1)
    assert info["reader"] == "folder"
    assert info["n_frames"] == 300 and info["frame_shape"] == (424, 640)
    # a stride through the whole movie keeps the test fast; the full ingest is benchmarked
    ds = _open(
        ingest(
            BULK_WATER,
            tmp_path / "movie.zarr",
            {
                "channel": 1,
                "frames": {"step": 37},
                "pixel_size": 100 / 285,
                "pixel_unit": "um",
                "frame_interval": 1 / 24,
            },
        )
    )
    assert ds.image.shape == (9, 424, 640)
    np.testing.assert_array_equal(ds.frame.values, np.arange(0, 300, 37))
    for j in (0, 8):
        frame = int(ds.frame.values[j])
        green = np.asarray(Image.open(BULK_WATER / f"bulk_water_{frame:03d}.png"))[..., 1]
        np.testing.assert_array_equal(ds.image.values[j], green.astype(np.float32))
    np.testing.assert_allclose(ds.time.values[-1], 296 / 24)


# --------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path):
    """(name, input path, options, words the message must contain)."""
    import tifffile

    cases = []
    movie = _movie(n=10)
    cases.append(("missing", tmp_path / "nope.tif", {}, ["nope.tif", "not found"]))

    tifffile.imwrite(tmp_path / "whole.tif", movie)
    data = (tmp_path / "whole.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    cases.append(("cut tiff", tmp_path / "cut.tif", {}, ["cut.tif", "truncated"]))
    tifffile.imwrite(tmp_path / "whole_z.tif", movie, compression="zlib")
    data = (tmp_path / "whole_z.tif").read_bytes()
    (tmp_path / "cut_z.tif").write_bytes(data[: len(data) // 2])
    cases.append(("cut compressed tiff", tmp_path / "cut_z.tif", {}, ["cut_z.tif"]))
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff at all" * 10)
    cases.append(("not a tiff", tmp_path / "junk.tif", {}, ["junk.tif", "TIFF"]))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        _write_png(corrupt / f"f{i}.png", (movie[i] // 16).astype(np.uint8))
    blob = (corrupt / "f1.png").read_bytes()
    (corrupt / "f1.png").write_bytes(blob[:40] + bytes(len(blob) - 40))
    cases.append(("corrupt png", corrupt, {}, ["f1.png"]))
    cut_png = tmp_path / "cut_png"
    cut_png.mkdir()
    for i in range(3):
        _write_png(
            cut_png / f"f{i}.png",
            np.random.default_rng(i).integers(0, 255, (40, 40), dtype=np.uint8),
        )
    blob = (cut_png / "f2.png").read_bytes()
    (cut_png / "f2.png").write_bytes(blob[: len(blob) // 2])
    cases.append(("truncated png", cut_png, {}, ["f2.png", "truncated"]))

    (tmp_path / "empty").mkdir()
    cases.append(("empty folder", tmp_path / "empty", {}, ["empty", "zero frames"]))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8), np.float32))
    cases.append(("empty array", tmp_path / "empty.npy", {}, ["empty.npy", "zero frames"]))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write_png(mixed / "a_1.png", np.zeros((10, 12), np.uint8))
    _write_png(mixed / "a_2.png", np.zeros((10, 12), np.uint8))
    _write_png(mixed / "a_10.png", np.zeros((11, 12), np.uint8))
    cases.append(("mixed shapes", mixed, {}, ["a_10.png", "(11, 12)", "(10, 12)", "a_1.png"]))

    nan = movie.astype(np.float32)
    nan[3, 4, 5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases.append(("nan", tmp_path / "nan.npy", {}, ["nan.npy", "frame 3", "NaN"]))
    inf = movie.astype(np.float32)
    inf[7, 0, 0] = np.inf
    np.save(tmp_path / "inf.npy", inf)
    cases.append(("inf", tmp_path / "inf.npy", {}, ["inf.npy", "frame 7", "infinite"]))

    np.save(tmp_path / "line.npy", np.arange(10.0))
    cases.append(("1-D", tmp_path / "line.npy", {}, ["line.npy", "1-D"]))
    np.save(tmp_path / "four.npy", np.zeros((3, 16, 16, 3), np.uint8))
    cases.append(("4-D without channel", tmp_path / "four.npy", {}, ["four.npy", "channel"]))
    np.save(tmp_path / "colour.npy", np.zeros((16, 16, 3), np.uint8))
    cases.append(("colour-looking 3-D", tmp_path / "colour.npy", {}, ["colour.npy", "channel"]))
    np.save(tmp_path / "grey.npy", movie)
    cases.append(
        ("channel on grey", tmp_path / "grey.npy", {"channel": 2}, ["grey.npy", "channel"])
    )

    np.save(tmp_path / "m.npy", movie)
    cases.append(
        (
            "start outside",
            tmp_path / "m.npy",
            {"frames": {"start": 10}},
            ["m.npy", "outside", "10 frames"],
        )
    )
    cases.append(
        ("stop outside", tmp_path / "m.npy", {"frames": {"stop": 11}}, ["m.npy", "outside"])
    )
    cases.append(
        ("crop outside", tmp_path / "m.npy", {"crop": [0, 21, 0, 10]}, ["m.npy", "crop", "20 x 24"])
    )
    cases.append(("empty crop", tmp_path / "m.npy", {"crop": [5, 5, 0, 10]}, ["m.npy", "crop"]))
    cases.append(("unknown option", tmp_path / "m.npy", {"chanel": 1}, ["chanel", "unknown key"]))
    cases.append(("wrong type", tmp_path / "m.npy", {"invert": "yes"}, ["invert", "boolean"]))
    cases.append(("stage key", tmp_path / "m.npy", {"track": {}}, ["track", "not a reader option"]))

    np.savez(tmp_path / "two.npz", a=movie, b=movie)
    cases.append(("npz without dataset", tmp_path / "two.npz", {}, ["two.npz", "dataset"]))
    cases.append(("npz wrong dataset", tmp_path / "two.npz", {"dataset": "c"}, ["two.npz", "'c'"]))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "two.npz").read_bytes()[:500])
    cases.append(("cut npz", tmp_path / "cut.npz", {"dataset": "a"}, ["cut.npz"]))
    blob = (tmp_path / "m.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(blob[: len(blob) // 2])
    cases.append(("cut npy", tmp_path / "cut.npy", {}, ["cut.npy"]))
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 2000)
    cases.append(("bad video", tmp_path / "bad.mp4", {}, ["bad.mp4", "video"]))
    (tmp_path / "movie.xyz").write_bytes(b"?")
    cases.append(("unknown format", tmp_path / "movie.xyz", {}, ["movie.xyz", "format"]))
    return cases


def test_bad_input_raises_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    failures = []
    for name, path, options, words in _bad_inputs(src):
        out = tmp_path / "out" / f"{name.replace(' ', '_')}.zarr"
        try:
            ingest(path, out, options)
        except InputError as exc:
            message = str(exc)
            missing = [w for w in words if w not in message]
            if missing or "\n" in message:
                failures.append(f"{name}: message {message!r} lacks {missing}")
        else:
            failures.append(f"{name}: no InputError")
        if out.exists() or (out.parent.exists() and any(out.parent.iterdir())):
            failures.append(
                f"{name}: left output behind: {sorted(p.name for p in out.parent.iterdir())}"
            )
    assert not failures, "\n".join(failures)


def test_iter_frames_checks_options_before_reading(tmp_path):
    np.save(tmp_path / "m.npy", _movie())
    with pytest.raises(InputError, match="outside"):
        iter_frames(tmp_path / "m.npy", frames={"start": 99})


# --------------------------------------------------------------------------- CLI


def test_cli_good_and_bad_input(tmp_path, capsys):
    np.save(tmp_path / "m.npy", _movie())
    out = tmp_path / "movie.zarr"
    code = main(
        [
            "ingest",
            str(tmp_path / "m.npy"),
            "-o",
            str(out),
            "--options",
            json.dumps({"crop": [0, 10, 0, 10], "frame_interval": 0.25}),
        ]
    )
    assert code == 0
    ds = _open(out)
    assert ds.image.shape == (6, 10, 10) and ds.attrs["frame_interval"] == 0.25

    capsys.readouterr()
    bad = tmp_path / "bad.zarr"
    for options in ({"crop": [0, 99, 0, 10]}, {"colour": 1}):
        code = main(
            ["ingest", str(tmp_path / "m.npy"), "-o", str(bad), "--options", json.dumps(options)]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1 and err[0].startswith("rvae-tools ingest: error: ")
        _no_output(tmp_path, bad)
    code = main(["ingest", str(tmp_path / "missing.npy"), "-o", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing.npy" in err[0]


def test_cli_config_movie_options(tmp_path, capsys):
    np.save(tmp_path / "m.npy", _movie())
    config = tmp_path / "config.yaml"
    config.write_text(
        "movies:\n"
        f"  mine: {{path: {tmp_path / 'm.npy'}, invert: true, frames: {{step: 2}}, pixel_unit: nm}}\n"
        "  other: {simulate: {}}\n"
    )
    out = tmp_path / "movie.zarr"
    assert (
        main(
            [
                "ingest",
                str(tmp_path / "m.npy"),
                "-o",
                str(out),
                "--config",
                str(config),
                "--movie",
                "mine",
            ]
        )
        == 0
    )
    ds = _open(out)
    assert ds.sizes["frame"] == 3 and ds.attrs["invert"] and ds.attrs["pixel_unit"] == "nm"
    # --options refine the config's entry
    assert (
        main(
            [
                "ingest",
                str(tmp_path / "m.npy"),
                "-o",
                str(out),
                "--config",
                str(config),
                "--movie",
                "mine",
                "--options",
                '{"invert": false}',
            ]
        )
        == 0
    )
    assert not _open(out).attrs["invert"]
    capsys.readouterr()
    assert (
        main(
            [
                "ingest",
                str(tmp_path / "m.npy"),
                "-o",
                str(out),
                "--config",
                str(config),
                "--movie",
                "nobody",
            ]
        )
        == 2
    )
    assert "nobody" in capsys.readouterr().err


def test_streaming_keeps_memory_bounded(tmp_path):
    """A movie far larger than one frame is never loaded whole (tracemalloc peak)."""
    import tracemalloc

    n, h, w = 200, 128, 128
    mm = np.lib.format.open_memmap(
        tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(n, h, w)
    )
    for i in range(n):
        mm[i] = i
    del mm
    movie_bytes = n * h * w * 4
    tracemalloc.start()
    start = time.perf_counter()
    ingest(tmp_path / "big.npy", tmp_path / "big.zarr")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < movie_bytes / 2, (
        f"peak {peak / 2**20:.1f} MiB for a {movie_bytes / 2**20:.1f} MiB movie"
    )
    assert time.perf_counter() - start < 30
    ds = _open(tmp_path / "big.zarr")
    assert float(ds.image[150].mean()) == 150.0

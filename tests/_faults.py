"""The fault-injection table shared by tests/test_faults.py and bench/faults.py.

Each case is one bad input (config, movie, table, store, checkpoint, settings, hostile string)
given to one ``rvae-tools`` command. The expected outcome is always the same: exit code 2, one
error line ``rvae-tools CMD: error: ...`` naming the file (or the option) and the field, no
traceback, and nothing at the output path. :func:`run_case` runs a case in this process
(``rvae_tools.cli.main``) and classifies what happened.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

HOSTILE = "x$(touch PWNED)`touch PWNED`;touch PWNED"


@dataclass
class Case:
    """One bad input: ``make(root, fixtures)`` writes it and returns (argv, expected
    substrings of the error line, output path or None)."""

    name: str
    make: Callable[[Path, dict[str, Path]], tuple[list[str], list[str], Path | None]]
    owner: str | None = None  # the slice (helper, issue item) that delivers this case, if not yet on main
    ok: bool = False  # an unusual but valid input: must succeed (exit 0, output written), never traceback
    tags: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Outcome:
    case: str
    exit_code: int | None
    error_line: str
    verdict: str  # clear, unclear, traceback, silent, data_loss
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case, "exit_code": self.exit_code, "verdict": self.verdict,
                "error": self.error_line, "detail": self.detail}


# --------------------------------------------------------------------------- fixtures


def build_fixtures(root: Path) -> dict[str, Path]:
    """Small valid inputs that the cases break one thing of (a movie, its store, detections,
    tracks, windows), made once per session."""
    from rvae_tools.cli import main
    from rvae_tools.io import write_table

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    frames, size = 12, 48
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(10, size - 10, (4, 2))
    movie = np.zeros((frames, size, size), np.float32)
    rows = []
    for t in range(frames):
        for p, (cx, cy) in enumerate(centres + 0.2 * t):
            movie[t] += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 4.0)
            rows.append({"frame": t, "x": cx, "y": cy, "score": 1.0, "area": 12.0, "orientation": 0.1,
                         "eccentricity": 0.5, "cls": 0, "particle": p})
    movie += rng.normal(0, 0.02, movie.shape).astype(np.float32)
    fx = {"root": root}
    fx["movie_npy"] = root / "movie.npy"
    np.save(fx["movie_npy"], movie)
    fx["movie"] = root / "movie.zarr"
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["ingest", str(fx["movie_npy"]), "-o", str(fx["movie"])]) == 0
    tracks = pd.DataFrame(rows)
    fx["detections"] = root / "detections.parquet"
    write_table(tracks.drop(columns="particle"), fx["detections"])
    fx["tracks"] = root / "tracks.parquet"
    write_table(tracks, fx["tracks"])
    fx["patches"] = root / "patches.zarr"
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["windows", str(fx["movie"]), str(fx["tracks"]), "-o", str(fx["patches"]),
                     "--no-progress", "--settings", json.dumps({"size": 16})]) == 0
    fx["config"] = root / "good.yaml"
    fx["config"].write_text(yaml.safe_dump({"movies": {"m": {"path": str(fx["movie_npy"])}}}))
    return fx


# --------------------------------------------------------------------------- helpers


def _text(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


def _bytes(root: Path, name: str, data: bytes) -> Path:
    path = root / name
    path.write_bytes(data)
    return path


def _yaml(root: Path, name: str, config: Any) -> Path:
    return _text(root, name, yaml.safe_dump(config))


def _npy(root: Path, name: str, array: np.ndarray) -> Path:
    path = root / name
    np.save(path, array, allow_pickle=False)
    return path


def _table(root: Path, name: str, df: pd.DataFrame) -> Path:
    path = root / name
    df.to_parquet(path, index=False)
    return path


def _tracks(fx) -> pd.DataFrame:
    return pd.read_parquet(fx["tracks"])


def _zarr(root: Path, name: str, ds) -> Path:
    import warnings

    path = root / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(path, mode="w")
    return path


def _pt(root: Path, name: str, obj: Any) -> Path:
    import torch

    path = root / name
    torch.save(obj, path)
    return path


def _validate(path: Path, *expect: str):
    return ["validate-config", str(path), "--no-device-check"], [str(path), *expect], None


def _ingest(root: Path, source: Path | str, *expect: str, options: dict | None = None):
    out = root / f"out-{Path(str(source)).name}.zarr"
    argv = ["ingest", str(source), "-o", str(out)]
    if options is not None:
        argv += ["--options", json.dumps(options)]
    return argv, list(expect), out


def _small_movie(t=6, h=32, w=32, dtype=np.float32):
    return np.random.default_rng(1).random((t, h, w)).astype(dtype)


# --------------------------------------------------------------------------- the table


def _config_cases() -> list[Case]:
    movie = {"path": "movie.npy"}
    cases = [
        ("config: empty file", lambda r, fx: _validate(_text(r, "empty.yaml", ""), "empty")),
        ("config: only comments", lambda r, fx: _validate(_text(r, "comments.yaml", "# nothing\n"), "empty")),
        ("config: duplicate top-level key", lambda r, fx: _validate(_text(r, "dup1.yaml", "seed: 1\nseed: 2\n"), "duplicate key 'seed'", "line 2")),
        ("config: duplicate nested key", lambda r, fx: _validate(_text(r, "dup2.yaml", "windows:\n  size: 16\n  size: 24\n"), "duplicate key 'size'", "line 3")),
        ("config: YAML syntax error", lambda r, fx: _validate(_text(r, "syntax.yaml", "seed: [1\n"), "line", "column")),
        ("config: tab indentation", lambda r, fx: _validate(_text(r, "tab.yaml", "windows:\n\tsize: 16\n"), "line 2", "column")),
        ("config: not UTF-8", lambda r, fx: _validate(_bytes(r, "binary.yaml", b"\xff\xfe\x00garbage"), "")),
        ("config: top level is a list", lambda r, fx: _validate(_text(r, "list.yaml", "- 1\n- 2\n"), "mapping")),
        ("config: top level is a scalar", lambda r, fx: _validate(_text(r, "scalar.yaml", "42\n"), "mapping")),
        ("config: unknown key", lambda r, fx: _validate(_yaml(r, "unknown.yaml", {"sed": 1}), "unknown key 'sed'")),
        ("config: seed is text", lambda r, fx: _validate(_yaml(r, "seedtext.yaml", {"seed": "one"}), "seed")),
        ("config: negative seed", lambda r, fx: _validate(_yaml(r, "seedneg.yaml", {"seed": -1}), "seed")),
        ("config: hostile device", lambda r, fx: _validate(_yaml(r, "dev.yaml", {"device": "$(touch PWNED)cpu"}), "device")),
        ("config: unknown device", lambda r, fx: _validate(_yaml(r, "dev2.yaml", {"device": "gpu"}), "device")),
        ("config: hostile results", lambda r, fx: _validate(_yaml(r, "res.yaml", {"results": "out$(touch PWNED)"}), "results")),
        ("config: results outside the working directory", lambda r, fx: _validate(_yaml(r, "res2.yaml", {"results": "../../elsewhere"}), "results", "results_outside_workdir")),
        ("config: no movies", lambda r, fx: _validate(_yaml(r, "nomovies.yaml", {"movies": {}}), "movies")),
        ("config: movie name with a blank", lambda r, fx: _validate(_yaml(r, "name.yaml", {"movies": {"my movie": movie}}), "movies")),
        ("config: movie named pooled", lambda r, fx: _validate(_yaml(r, "pooled.yaml", {"movies": {"pooled": movie}}), "movies")),
        ("config: movie with path and simulate", lambda r, fx: _validate(_yaml(r, "both.yaml", {"movies": {"m": {"path": "a.tif", "simulate": {}}}}), "movies.m")),
        ("config: movie with neither path nor simulate", lambda r, fx: _validate(_yaml(r, "neither.yaml", {"movies": {"m": {}}}), "movies.m")),
        ("config: movie file missing", lambda r, fx: _validate(_yaml(r, "missing.yaml", {"movies": {"m": {"path": str(r / "nope.tif")}}}), "movies.m.path", "not found")),
        ("config: crop of three numbers", lambda r, fx: _validate(_yaml(r, "crop3.yaml", {"movies": {"m": {"path": str(fx["movie_npy"]), "crop": [0, 1, 2]}}}), "movies.m.crop")),
        ("config: crop reversed", lambda r, fx: _validate(_yaml(r, "croprev.yaml", {"movies": {"m": {"path": str(fx["movie_npy"]), "crop": [30, 10, 0, 20]}}}), "movies.m.crop")),
        ("config: crop outside the frame", lambda r, fx: _validate(_yaml(r, "cropout.yaml", {"movies": {"m": {"path": str(fx["movie_npy"]), "crop": [0, 400, 0, 20]}}}), "movies.m", "crop")),
        ("config: frame step 0", lambda r, fx: _validate(_yaml(r, "step.yaml", {"movies": {"m": {"path": str(fx["movie_npy"]), "frames": {"step": 0}}}}), "frames.step")),
        ("config: frame range past the movie", lambda r, fx: _validate(_yaml(r, "range.yaml", {"movies": {"m": {"path": str(fx["movie_npy"]), "frames": {"start": 500}}}}), "movies.m", "frames.start")),
        ("config: window larger than the simulated frame", lambda r, fx: _validate(_yaml(r, "winsim.yaml", {"movies": {"m": {"simulate": {"height": 24, "width": 24}}}}), "windows.size")),
        ("config: window larger than the movie's frame", lambda r, fx: _validate(_yaml(r, "winreal.yaml", {"movies": {"m": {"path": str(fx["movie_npy"])}}, "windows": {"size": 64}}), "windows.size")),
        ("config: probability windows with locate", lambda r, fx: _validate(_yaml(r, "prob.yaml", {"windows": {"source": "probability"}, "segment": {"method": "locate"}}), "windows.source", "locate")),
        ("config: window size as text", lambda r, fx: _validate(_yaml(r, "wintext.yaml", {"windows": {"size": "big"}}), "windows.size")),
        ("config: misspelt nested key", lambda r, fx: _validate(_yaml(r, "nested.yaml", {"segment": {"modle": {}}}), "segment", "modle")),
        ("config: bad per-movie override", lambda r, fx: _validate(_yaml(r, "override.yaml", {"movies": {"m": {"simulate": {}, "figures": {"dpi": "high"}}}}), "movies.m", "dpi")),
        ("config: simulate with no frames", lambda r, fx: _validate(_yaml(r, "frames0.yaml", {"simulate": {"frames": 0}}), "simulate.frames")),
        ("config: unknown species shape", lambda r, fx: _validate(_yaml(r, "shape.yaml", {"simulate": {"species": [{"name": "a", "shape": "star"}]}}), "shape")),
        ("config: file is a folder", lambda r, fx: _validate(r, "not found")),
        ("config: file missing", lambda r, fx: _validate(r / "nothing.yaml", "not found")),
    ]
    return [Case(name, make, tags=("config",)) for name, make in cases]


def _device_case() -> Case:
    def make(r, fx):
        path = _yaml(r, "cuda.yaml", {"device": "cuda:7"})
        return ["validate-config", str(path)], [str(path), "device", "cuda:7"], None

    return Case("config: device not on this machine", make, tags=("config", "no-cuda"))


def _movie_cases() -> list[Case]:
    cases = [
        ("movie: file missing", lambda r, fx: _ingest(r, r / "missing.tif", "missing.tif", "not found")),
        ("movie: empty folder", lambda r, fx: _ingest(r, (r / "emptydir").mkdir() or r / "emptydir", "emptydir")),
        ("movie: garbage TIFF", lambda r, fx: _ingest(r, _bytes(r, "garbage.tif", b"II*\x00garbage" * 10), "garbage.tif")),
        ("movie: zero-byte TIFF", lambda r, fx: _ingest(r, _bytes(r, "zero.tif", b""), "zero.tif")),
        ("movie: truncated TIFF", lambda r, fx: _ingest(r, _truncated_tiff(r), "truncated.tif")),
        ("movie: NaN pixels", lambda r, fx: _ingest(r, _npy(r, "nan.npy", _with(_small_movie(), np.nan)), "nan.npy", "NaN")),
        ("movie: infinite pixels", lambda r, fx: _ingest(r, _npy(r, "inf.npy", _with(_small_movie(), np.inf)), "inf.npy")),
        ("movie: one-dimensional array", lambda r, fx: _ingest(r, _npy(r, "oned.npy", np.zeros(10, np.float32)), "oned.npy")),
        ("movie: text array", lambda r, fx: _ingest(r, _npy(r, "text.npy", np.array([["a", "b"], ["c", "d"]])), "text.npy")),
        ("movie: zero frames", lambda r, fx: _ingest(r, _npy(r, "noframes.npy", np.zeros((0, 8, 8), np.float32)), "noframes.npy")),
        ("movie: frames of different shapes", lambda r, fx: _ingest(r, _mixed_folder(r), "mixed")),
        ("movie: channel out of range", lambda r, fx: _ingest(r, _npy(r, "rgb.npy", np.zeros((3, 16, 16, 3), np.uint8)), "rgb.npy", "channel", options={"channel": 5})),
        ("movie: crop outside", lambda r, fx: _ingest(r, fx["movie_npy"], "crop", options={"crop": [0, 100, 0, 10]})),
        ("movie: frames.start past the end", lambda r, fx: _ingest(r, fx["movie_npy"], "frames.start", options={"frames": {"start": 99}})),
        ("movie: options not JSON", lambda r, fx: (["ingest", str(fx["movie_npy"]), "-o", str(r / "o1.zarr"), "--options", "{crop"], ["--options"], r / "o1.zarr")),
        ("movie: unknown option", lambda r, fx: _ingest(r, fx["movie_npy"], "colour", options={"colour": 1})),
        ("movie: unsupported extension", lambda r, fx: _ingest(r, _text(r, "movie.txt", "hello"), "movie.txt")),
        ("movie: npz without arrays", lambda r, fx: _ingest(r, _empty_npz(r), "empty.npz")),
        ("movie: hostile file name that is missing", lambda r, fx: _ingest(r, r / f"{HOSTILE}.tif", "not found")),
    ]
    return [Case(name, make, tags=("movie",)) for name, make in cases]


def _with(array, value):
    array = array.copy()
    array[1, 3, 4] = value
    return array


def _truncated_tiff(root: Path) -> Path:
    import tifffile

    path = root / "truncated.tif"
    tifffile.imwrite(path, _small_movie(8, 64, 64), photometric="minisblack")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _mixed_folder(root: Path) -> Path:
    import imageio.v3 as iio

    folder = root / "mixed"
    folder.mkdir()
    iio.imwrite(folder / "f_0.png", np.zeros((16, 16), np.uint8))
    iio.imwrite(folder / "f_1.png", np.zeros((20, 16), np.uint8))
    return folder


def _empty_npz(root: Path) -> Path:
    path = root / "empty.npz"
    np.savez(path)
    return path


def _store_cases() -> list[Case]:
    import xarray as xr

    def seg(source, *expect, name="det.parquet"):
        def make(r, fx):
            src = source(r, fx)
            out = r / name
            return ["segment", str(src), "-o", str(out), "--settings", json.dumps({"method": "locate"})], [*expect], out
        return make

    def track(table, *expect):
        def make(r, fx):
            src = table(r, fx)
            out = r / "trk"
            return (["track", str(src), "--tracks", str(out / "t.parquet"), "--drift", str(out / "d.parquet"),
                     "--trajectories", str(out / "j.parquet"), "--msd", str(out / "m.parquet")],
                    [str(src), *expect], out / "t.parquet")
        return make

    def win(tracks_table, *expect, settings=None, movie=None):
        def make(r, fx):
            src = tracks_table(r, fx)
            out = r / "win.zarr"
            argv = ["windows", str(movie(r, fx) if movie else fx["movie"]), str(src), "-o", str(out), "--no-progress"]
            if settings is not None:
                argv += ["--settings", json.dumps(settings)]
            return argv, [*expect], out
        return make

    det = lambda r, fx: pd.read_parquet(fx["detections"])
    cases = [
        ("store: segment on a missing store", seg(lambda r, fx: r / "none.zarr", "none.zarr", "not found")),
        ("store: segment on a store without image", seg(lambda r, fx: _zarr(r, "noimage.zarr", xr.Dataset({"other": ("a", np.zeros(3))})), "noimage.zarr", "image")),
        ("store: segment on a folder that is not Zarr", seg(lambda r, fx: (r / "plain.zarr").mkdir() or r / "plain.zarr", "plain.zarr")),
        ("store: segment on a text file", seg(lambda r, fx: _text(r, "text.zarr", "not a store"), "text.zarr")),
        ("store: image with the wrong dims", seg(lambda r, fx: _zarr(r, "dims.zarr", xr.Dataset({"image": (("y", "x"), np.zeros((8, 8), np.float32))})), "dims.zarr", "image")),
        ("table: track on a missing table", track(lambda r, fx: r / "none.parquet", "not found")),
        ("table: detections without x", track(lambda r, fx: _table(r, "nox.parquet", det(r, fx).drop(columns="x")), "x")),
        ("table: NaN coordinates", track(lambda r, fx: _table(r, "nanx.parquet", det(r, fx).assign(x=np.nan)), "x")),
        ("table: fractional frames", track(lambda r, fx: _table(r, "fracframe.parquet", det(r, fx).assign(frame=det(r, fx)["frame"] + 0.5)), "frame")),
        ("table: not Parquet", track(lambda r, fx: _text(r, "garbage.parquet", "a,b\n1,2\n"), "Parquet")),
        ("table: text coordinates", track(lambda r, fx: _table(r, "textx.parquet", det(r, fx).assign(x="left")), "x")),
        ("table: select on a column that does not exist", lambda r, fx: (
            ["track", str(fx["detections"]), "--tracks", str(r / "sel" / "t.parquet"), "--drift", str(r / "sel" / "d.parquet"),
             "--trajectories", str(r / "sel" / "j.parquet"), "--msd", str(r / "sel" / "m.parquet"),
             "--settings", json.dumps({"min_length": 1, "select": {"ecc": {"below": 0.3}}})],
            ["select", "ecc"], r / "sel" / "t.parquet")),
        ("table: windows from tracks without particle", win(lambda r, fx: _table(r, "nopart.parquet", _tracks(fx).drop(columns="particle")), "particle")),
        ("table: windows larger than the frame", win(lambda r, fx: fx["tracks"], "size", settings={"size": 128})),
        ("table: windows from probability without the map", win(lambda r, fx: fx["tracks"], "probability", settings={"source": "probability"})),
        ("store: windows on a movie without image", win(lambda r, fx: fx["tracks"], "image", movie=lambda r, fx: _zarr(r, "noimg2.zarr", xr.Dataset({"x": ("a", np.zeros(2))})))),
    ]
    return [Case(name, make, tags=("store",)) for name, make in cases]


def _model_cases() -> list[Case]:
    import xarray as xr

    def encode(ckpt, *expect, owner=None):
        def make(r, fx):
            path = ckpt(r, fx)
            out = r / "lat.zarr"
            return ["encode", str(fx["patches"]), str(path), "-o", str(out), "--no-progress", "--device", "cpu"], [str(path), *expect], out
        return make

    def train(patches, *expect, settings=None):
        def make(r, fx):
            src = patches(r, fx)
            out = r / "model.pt"
            argv = ["train", str(src), "-o", str(out), "--no-progress", "--device", "cpu", "--no-resume"]
            argv += ["--settings", json.dumps({"epochs": 1, **(settings or {})})]
            return argv, [*expect], out
        return make

    def nan_patches(r, fx):
        ds = xr.open_zarr(fx["patches"]).load()
        ds["window"] = ds["window"] * np.nan
        return _zarr(r, "nanpatches.zarr", ds)

    def seg_ckpt(ckpt, *expect):
        def make(r, fx):
            path = ckpt(r, fx)
            out = r / "segdet.parquet"
            return ["segment", str(fx["movie"]), "-o", str(out), "--checkpoint", str(path), "--device", "cpu"], [str(path), *expect], out
        return make

    cases = [
        Case("checkpoint: encode with a missing model", encode(lambda r, fx: r / "none.pt", "not found")),
        Case("checkpoint: encode with random bytes", encode(lambda r, fx: _bytes(r, "random.pt", os.urandom(256)))),
        Case("checkpoint: encode with a text file", encode(lambda r, fx: _text(r, "text.pt", "hello"))),
        Case("checkpoint: encode with a bare tensor", encode(lambda r, fx: _pt(r, "tensor.pt", __import__("torch").zeros(3))), owner="ckpt (issue 11 item 5)"),
        Case("checkpoint: encode with another tool's state dict", encode(lambda r, fx: _pt(r, "foreign.pt", __import__("torch").nn.Linear(2, 2).state_dict())), owner="ckpt (issue 11 item 5)"),
        Case("checkpoint: encode with our marker but no keys", encode(lambda r, fx: _pt(r, "marker.pt", _marker_only())), owner="ckpt (issue 11 item 5)"),
        Case("checkpoint: encode with a pickled object", encode(lambda r, fx: _pt(r, "pickled.pt", {"format": _Pickled()}))),
        Case("checkpoint: segment with random bytes", seg_ckpt(lambda r, fx: _bytes(r, "segrandom.pt", os.urandom(256)))),
        Case("checkpoint: segment with a bare tensor", seg_ckpt(lambda r, fx: _pt(r, "segtensor.pt", __import__("torch").zeros(3)))),
        Case("checkpoint: segment with another tool's state dict", seg_ckpt(lambda r, fx: _pt(r, "segforeign.pt", __import__("torch").nn.Linear(2, 2).state_dict()))),
        Case("windows: train on a store without windows", train(lambda r, fx: _zarr(r, "nowin.zarr", xr.Dataset({"other": ("obs", np.zeros(3))})), "window")),
        Case("windows: train on all-NaN windows", train(nan_patches, "nanpatches.zarr", "NaN")),
        Case("windows: encode all-NaN windows", lambda r, fx: (["encode", str(nan_patches(r, fx)), str(r / "missing-model.pt"), "-o", str(r / "nanlat.zarr"), "--no-progress"], ["NaN"], r / "nanlat.zarr"), owner="encodepath (issue 11 item 3)"),
        Case("settings: not JSON", lambda r, fx: (["train", str(fx["patches"]), "-o", str(r / "m2.pt"), "--settings", "{epochs"], ["--settings"], r / "m2.pt")),
        Case("settings: epochs as text", train(lambda r, fx: fx["patches"], "epochs", settings={"epochs": "ten"})),
        Case("settings: unknown rvae key", train(lambda r, fx: fx["patches"], "epoch", settings={"epoch": 3})),
        Case("settings: hostile string in an enum", train(lambda r, fx: fx["patches"], "encoder", settings={"encoder": HOSTILE})),
    ]
    for case in cases:
        case.tags = ("model",)
    return cases


class _Pickled:
    """An arbitrary object: loading a checkpoint must never unpickle it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _marker_only() -> dict:
    # The on-disk format marker of our rVAE checkpoints, without anything else.
    return {"format": "rvae-tools/rvae-checkpoint", "format_version": 1}


def _dynamics_cases() -> list[Case]:
    import xarray as xr

    def latents(extra=None, drop=()):
        def build(r, fx, name):
            n, t = 3, 12
            rng = np.random.default_rng(2)
            ds = xr.Dataset(
                {
                    "angle": (("particle", "frame"), rng.uniform(0, np.pi, (n, t))),
                    "angle_sd": (("particle", "frame"), np.full((n, t), 0.1)),
                    "x": (("particle", "frame"), rng.uniform(0, 40, (n, t))),
                    "y": (("particle", "frame"), rng.uniform(0, 40, (n, t))),
                    "z": (("particle", "frame", "latent"), rng.normal(size=(n, t, 2))),
                },
                coords={"particle": np.arange(n), "frame": np.arange(t)},
            )
            for name_ in drop:
                ds = ds.drop_vars(name_)
            if extra:
                ds = extra(ds)
            return _zarr(r, name, ds)
        return build

    def dyn(build, name, *expect, settings=None, owner=None):
        def make(r, fx):
            src = build(r, fx, name)
            out = r / f"dyn-{name}"
            argv = ["dynamics", str(src), "-o", str(out)]
            if settings is not None:
                argv += ["--settings", json.dumps(settings)]
            return argv, [*expect], out
        return Case(f"dynamics: {name}", make, owner=owner, tags=("dynamics",))

    return [
        dyn(lambda r, fx, name: r / name, "missing.zarr", "not found"),
        dyn(latents(drop=("angle",)), "noangle.zarr", "angle"),
        dyn(lambda r, fx, name: _text(r, name, "x"), "textfile.zarr"),
        dyn(latents(), "cls-unknown.zarr", "cls", settings={"species": [{"name": "rod", "symmetry": 2, "cls": 5}], "species_from": "cls"}),
        Case("figures: a folder without outputs", lambda r, fx: (["figures", str((r / "emptymovie").mkdir() or r / "emptymovie"), "-o", str(r / "figs")], ["emptymovie"], None), tags=("figures",)),
        Case("simulate: no particles (valid: an empty movie)", lambda r, fx: (["simulate", "--outdir", str(r / "sim0"), "--settings", json.dumps({"n_particles": 0, "frames": 3, "height": 32, "width": 32})], [], r / "sim0" / "truth.parquet"), ok=True, tags=("simulate",)),
        Case("simulate: settings not JSON", lambda r, fx: (["simulate", "--outdir", str(r / "sim1"), "--settings", "[1"], ["--settings"], r / "sim1" / "truth.parquet"), tags=("simulate",)),
        Case("provenance: missing file", lambda r, fx: (["provenance", str(r / "none.zarr")], ["none.zarr"], None), tags=("provenance",)),
        Case("provenance: garbage file", lambda r, fx: (["provenance", str(_bytes(r, "garbage.pt", os.urandom(64)))], ["garbage.pt"], None), tags=("provenance",)),
        Case("cli: unknown command", lambda r, fx: (["segmnt", "x"], ["segmnt"], None), tags=("cli",)),
    ]


def all_cases() -> list[Case]:
    """Every case of the table."""
    return [*_config_cases(), _device_case(), *_movie_cases(), *_store_cases(), *_model_cases(), *_dynamics_cases()]


# --------------------------------------------------------------------------- running


def run_case(case: Case, root: Path, fixtures: dict[str, Path]) -> Outcome:
    """Run one case with ``rvae_tools.cli.main`` in a fresh folder and classify it:
    ``clear`` (exit 2, one error line naming what was expected), ``unclear`` (exit 2 or 1
    without the expected names), ``traceback`` (an exception escaped), ``silent`` (exit 0:
    the bad input was accepted), ``data_loss`` (something appeared at the output path, or a
    temporary was left beside it)."""
    from rvae_tools.cli import main

    work = root / case.name.replace(" ", "_").replace(":", "").replace("'", "")
    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    stderr = io.StringIO()
    code: int | None = None
    escaped = ""
    try:
        argv, expect, output = case.make(work, fixtures)
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse errors exit 2 with a usage line
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # noqa: BLE001 - what the suite looks for
                escaped = traceback.format_exc()
    finally:
        os.chdir(cwd)
    command = argv[0]
    errors = [line for line in stderr.getvalue().splitlines() if f"{command}: error:" in line or line.startswith("rvae-tools: error")]
    error_line = errors[-1] if errors else ""
    pwned = list(work.rglob("PWNED")) + list(Path(cwd).glob("PWNED"))
    if escaped or "Traceback" in stderr.getvalue():
        return Outcome(case.name, code, error_line, "traceback", (escaped or stderr.getvalue()).strip().splitlines()[-1])
    if pwned:
        return Outcome(case.name, code, error_line, "injected", str(pwned))
    if case.ok:
        if code == 0 and (output is None or output.exists()):
            return Outcome(case.name, code, error_line, "clear")
        return Outcome(case.name, code, error_line, "unclear", f"a valid input failed with exit {code}")
    if code == 0:
        return Outcome(case.name, code, error_line, "silent", "exit 0 on a bad input")
    if output is not None:
        leftovers = [p for p in output.parent.glob(f".{output.name}.*")] if output.parent.exists() else []
        if output.exists() or leftovers:
            return Outcome(case.name, code, error_line, "data_loss", f"left {output if output.exists() else leftovers}")
    missing = [e for e in expect if e and e not in error_line]
    if code != 2 or not error_line or len(errors) != 1 or missing:
        detail = f"exit {code}; error line lacks {missing}" if missing else f"exit {code}; {len(errors)} error line(s)"
        return Outcome(case.name, code, error_line, "unclear", detail)
    return Outcome(case.name, code, error_line, "clear")

"""A movie segmented in frame chunks (``segment --frames``, joined by ``segment-gather``) gives
exactly the detections and probability map of one ``segment`` over the whole movie: what the
workflow's ``segment.frame_chunk`` relies on to spread one movie over cluster jobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from rvae_tools.cli import main
from rvae_tools.io import open_zarr, table_metadata, write_zarr

#: A tiny U-Net trained on the segmenter's own synthetic frames (a few seconds on one core).
TINY = {
    "seed": 3,
    "classes": 1,
    "model": {"depth": 2, "width": 6},
    "train": {
        "source": "synthetic",
        "frames": 4,
        "steps": 40,
        "batch_size": 6,
        "crop": 32,
        "lr": 0.01,
    },
    "synthetic": {"shape": [64, 64], "length": 12.0, "width": 5.0, "asymmetric_fraction": 0.0},
}
CLASSICAL = {
    "method": "classical",
    "invert": False,
    "classical": {"min_distance": 2.5, "min_area": 6},
}


def _blobs(frames: int, seed: int) -> np.ndarray:
    """Frames of Gaussian blobs on noise, drawn here rather than by the package's simulator,
    with an all-NaN frame (no rows) and a brightness that changes with the frame, so that a
    normalisation over the whole movie would show up as a difference."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:72]
    movie = rng.normal(0.0, 0.08, (frames, 64, 72))
    for t in range(frames):
        for _ in range(10):
            y, x = rng.uniform(6, 58), rng.uniform(6, 66)
            movie[t] += np.exp(-((yy - y) ** 2 + ((xx - x) / 1.6) ** 2) / (2 * 2.0**2))
        movie[t] = movie[t] * (1 + 0.5 * t) + 10 * t
    movie[2] = np.nan
    return movie.astype(np.float32)


def _movie(path: Path, frames: int = 7, seed: int = 0) -> Path:
    ds = xr.Dataset(
        {"image": (("frame", "y", "x"), _blobs(frames, seed))},
        attrs={"pixel_size": 2.0, "pixel_unit": "nm", "frame_interval": 0.5},
    )
    write_zarr(ds, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("unet") / "seg.pt"
    args = ["train-segmenter", "-o", str(path), "--device", "cpu", "--threads", "1"]
    assert main([*args, "--settings", json.dumps(TINY)]) == 0
    return path


def _segment(movie: Path, out: Path, settings: dict, ckpt: Path | None, frames=None) -> list[str]:
    args = ["segment", str(movie), "-o", str(out.with_suffix(".parquet")), "--threads", "1"]
    args += ["--device", "cpu", "--settings", json.dumps(settings)]
    if ckpt is not None:
        args += ["--checkpoint", str(ckpt), "--probability", str(out.with_suffix(".zarr"))]
    if frames is not None:
        args += ["--frames", str(frames[0]), str(frames[1])]
    assert main(args) == 0
    return args


def _gather(parts: list[Path], out: Path, probability: bool) -> int:
    args = ["segment-gather", "-o", str(out.with_suffix(".parquet"))]
    args += ["--parts", *(str(p.with_suffix(".parquet")) for p in parts)]
    if probability:
        args += ["--probability", str(out.with_suffix(".zarr"))]
        args += ["--probability-parts", *(str(p.with_suffix(".zarr")) for p in parts)]
    return main(args)


@pytest.mark.parametrize("method", ["unet", "classical"])
def test_chunks_joined_equal_the_whole_movie(tmp_path, checkpoint, method):
    movie = _movie(tmp_path / "movie.zarr")
    settings, ckpt = (TINY, checkpoint) if method == "unet" else (CLASSICAL, None)
    _segment(movie, tmp_path / "whole", settings, ckpt)
    # Uneven chunks; the one-frame chunk is the all-NaN frame (an empty table); given out of order.
    ranges = [(3, 7), (0, 2), (2, 3)]
    parts = [tmp_path / f"part{a}" for a, _ in ranges]
    for part, frames in zip(parts, ranges):
        _segment(movie, part, dict(settings, frame_chunk=3), ckpt, frames)
    assert len(pd.read_parquet(tmp_path / "part2.parquet")) == 0
    assert _gather(parts, tmp_path / "joined", probability=ckpt is not None) == 0

    whole = pd.read_parquet(tmp_path / "whole.parquet")
    joined = pd.read_parquet(tmp_path / "joined.parquet")
    assert len(whole) > 30 and sorted(set(whole["frame"])) == [0, 1, 3, 4, 5, 6]
    pd.testing.assert_frame_equal(joined, whole, check_exact=True)
    meta_whole, meta_joined = (
        table_metadata(tmp_path / "whole.parquet"),
        table_metadata(tmp_path / "joined.parquet"),
    )
    assert meta_joined["frame_chunks"] == [[0, 2], [2, 3], [3, 7]]
    assert meta_joined["frames"] == meta_whole["frames"] == 7
    # frame_chunk says how the work was split, not what was computed: same config hash.
    assert meta_joined["config_hash"] == meta_whole["config_hash"]
    if ckpt is not None:
        pw = open_zarr(tmp_path / "whole.zarr", required=["probability"])
        pj = open_zarr(tmp_path / "joined.zarr", required=["probability"])
        assert pj["probability"].shape == (7, 64, 72)
        np.testing.assert_array_equal(pj["probability"].values, pw["probability"].values)
        assert pj["probability"].encoding["chunks"] == pw["probability"].encoding["chunks"]
        for key in (
            "config_hash",
            "model_checksum",
            "pixel_size",
            "pixel_unit",
            "frame_interval",
            "ome",
        ):
            assert pj.attrs[key] == pw.attrs[key], key
        assert pj.attrs["frame_chunks"] == [[0, 2], [2, 3], [3, 7]]


def test_bad_ranges_and_parts_are_refused_in_one_line(tmp_path, capsys):
    movie = _movie(tmp_path / "movie.zarr", frames=4)
    for frames in ((0, 2), (2, 4), (1, 3)):
        _segment(movie, tmp_path / f"p{frames[0]}", CLASSICAL, None, frames)
    _segment(movie, tmp_path / "whole", CLASSICAL, None)
    capsys.readouterr()
    cases = {
        "gap": ([tmp_path / "p0"], "the chunks end at frame 2; expected 4"),
        "overlap": (
            [tmp_path / "p0", tmp_path / "p1", tmp_path / "p2"],
            "(an overlap between the chunks)",
        ),
        "not a chunk": ([tmp_path / "whole"], "no frame_range/movie_frames"),
    }
    for name, (parts, message) in cases.items():
        assert _gather(parts, tmp_path / "out", probability=False) == 2, name
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (name, err)
    assert not (tmp_path / "out.parquet").exists()

    args = [
        "segment",
        str(movie),
        "-o",
        str(tmp_path / "x.parquet"),
        "--settings",
        json.dumps(CLASSICAL),
    ]
    assert main([*args, "--frames", "3", "9"]) == 2
    assert "--frames: 3 9 is not a frame range" in capsys.readouterr().err

"""export-napari: the files match napari's documented layer data (points CSV of the built-in
reader, Tracks (N, 4) track_id/t/y/x, Vectors (N, 2, 3)), on results written here by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from rvae_tools.cli import main


def _results(folder):
    detections = pd.DataFrame({"frame": [0, 0, 1, 1, 2], "x": [10.0, 30.0, 11.0, 31.0, 12.0],
                               "y": [5.0, 20.0, 6.0, 21.0, 7.0], "score": [0.9, 0.8, 0.7, 0.6, 0.5],
                               "area": [50.0, 80.0, 50.0, 80.0, 50.0]})
    detections.to_parquet(folder / "detections.parquet")
    tracks = detections.assign(particle=[1, 2, 1, 2, 1]).iloc[[4, 1, 0, 3, 2]]  # unsorted on purpose
    tracks.to_parquet(folder / "tracks.parquet")
    angle = np.array([[0.0, np.pi / 2, np.nan], [np.pi / 4, np.nan, np.nan]])
    latents = xr.Dataset(
        {"angle": (("particle", "frame"), angle),
         "x": (("particle", "frame"), [[10.0, 11.0, 12.0], [30.0, 31.0, np.nan]]),
         "y": (("particle", "frame"), [[5.0, 6.0, 7.0], [20.0, 21.0, np.nan]]),
         "z": (("particle", "frame", "latent"), np.arange(12, dtype=float).reshape(2, 3, 2))},
        coords={"particle": [1, 2], "frame": [0, 1, 2], "latent": [0, 1]})
    latents.to_zarr(folder / "latents.zarr", zarr_format=3, consolidated=False)
    return detections


def test_export_writes_napari_layer_tables(tmp_path):
    detections = _results(tmp_path)
    assert main(["export-napari", str(tmp_path), "-o", str(tmp_path / "napari"), "--colour", "z2"]) == 0

    points = pd.read_csv(tmp_path / "napari" / "points.csv")
    # napari's built-in CSV reader: 'index' then 'axis-N' columns are coordinates, the rest features
    assert list(points.columns[:4]) == ["index", "axis-0", "axis-1", "axis-2"]
    np.testing.assert_array_equal(points[["axis-0", "axis-1", "axis-2"]].to_numpy(),
                                  detections[["frame", "y", "x"]].to_numpy())
    assert {"score", "area"} <= set(points.columns)

    tracks = pd.read_csv(tmp_path / "napari" / "tracks.csv")
    data = tracks[["track_id", "t", "y", "x"]].to_numpy()          # napari Tracks data: (N, 4)
    assert data.shape == (5, 4)
    assert data[:, :2].tolist() == [[1, 0], [1, 1], [1, 2], [2, 0], [2, 1]]
    assert tracks.loc[1, "angle"] == np.pi / 2 and np.isnan(tracks.loc[2, "angle"])
    assert tracks.loc[3, "z2"] == 7.0

    vectors = pd.read_csv(tmp_path / "napari" / "vectors.csv")
    array = np.stack([vectors[["t", "y", "x"]].to_numpy(), vectors[["v_t", "v_y", "v_x"]].to_numpy()], axis=1)
    assert array.shape == (3, 2, 3)                                  # napari Vectors data: (N, 2, D)
    assert (array[:, 1, 0] == 0).all()                               # no extent in time
    centre = array[:, 0] + array[:, 1] / 2
    np.testing.assert_allclose(centre[:, 1:], [[5.0, 10.0], [6.0, 11.0], [20.0, 30.0]])
    lengths = np.hypot(array[:, 1, 1], array[:, 1, 2])
    np.testing.assert_allclose(lengths, 2 * np.sqrt(np.array([50.0, 50.0, 80.0]) / np.pi))
    np.testing.assert_allclose(np.arctan2(array[:, 1, 1], array[:, 1, 2]), [0.0, np.pi / 2, np.pi / 4], atol=1e-12)
    assert vectors["colour"].tolist() == [1.0, 3.0, 7.0]             # z2 of each window


def test_export_names_a_missing_folder_and_an_unknown_latent(tmp_path, capsys):
    assert main(["export-napari", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")]) == 2
    assert "detections.parquet" in capsys.readouterr().err
    _results(tmp_path)
    assert main(["export-napari", str(tmp_path), "-o", str(tmp_path / "out"), "--colour", "z9"]) == 2
    assert "z9" in capsys.readouterr().err

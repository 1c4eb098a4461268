"""OME-Zarr (NGFF 0.5) metadata on movie.zarr and probability.zarr: valid, readable by an
OME-Zarr reader with the right axes, units and scale, and still the xarray contract."""

from __future__ import annotations

import json

import ngff_zarr
import numpy as np
import pytest
import xarray as xr

from rvae_tools.ingest import ingest
from rvae_tools.ngff import add_ngff, space_unit


def _ome(store) -> dict:
    # read the raw zarr.json, not through our code, so the test checks what is on disk
    return json.loads((store / "zarr.json").read_text())["attributes"]


def test_movie_store_is_valid_ome_zarr_and_still_the_xarray_contract(tmp_path):
    movie = np.random.default_rng(0).random((3, 40, 30)).astype(np.float32)
    np.save(tmp_path / "m.npy", movie)
    store = ingest(tmp_path / "m.npy", tmp_path / "movie.zarr",
                   {"pixel_size": 2.5, "pixel_unit": "nm", "frame_interval": 0.5})
    ngff_zarr.validate(_ome(store), version="0.5", model="image")  # the library's JSON schema

    multiscales = ngff_zarr.from_ngff_zarr(store, validate=True)   # the library's reader
    level = multiscales.images[0]
    assert level.dims == ("frame", "y", "x")
    assert level.scale == {"frame": 0.5, "y": 2.5, "x": 2.5}
    assert level.axes_units == {"frame": "second", "y": "nanometer", "x": "nanometer"}
    axes = multiscales.metadata.axes
    assert [a.type for a in axes] == ["time", "space", "space"]
    np.testing.assert_array_equal(np.asarray(level.data), movie)

    ds = xr.open_zarr(store)
    assert ds["image"].dims == ("frame", "y", "x")
    np.testing.assert_array_equal(ds["image"].values, movie)


def test_large_frames_get_a_pyramid_that_xarray_does_not_see(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.random((2, 1, 130, 101)).astype(np.float32)  # (frame, class, y, x) written by xarray
    ds = xr.Dataset({"probability": (("frame", "class", "y", "x"), data)})
    ds.to_zarr(tmp_path / "p.zarr", zarr_format=3, consolidated=False)
    add_ngff(tmp_path / "p.zarr", "probability", pixel_size=0.2, pixel_unit="um", frame_interval=None,
             pyramid_above=40)
    ngff_zarr.validate(_ome(tmp_path / "p.zarr"), version="0.5", model="image")
    images = ngff_zarr.from_ngff_zarr(tmp_path / "p.zarr", validate=True).images
    assert [im.data.shape[-2:] for im in images] == [(130, 101), (65, 50), (32, 25)]
    assert [a.type for a in ngff_zarr.from_ngff_zarr(tmp_path / "p.zarr").metadata.axes] == \
        ["time", "channel", "space", "space"]
    assert images[1].scale["x"] == pytest.approx(0.4) and images[2].scale["y"] == pytest.approx(0.8)
    # a level-1 pixel is the mean of its 2 x 2 block, centred between them
    expected = data[..., :130, :100].reshape(2, 1, 65, 2, 50, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(np.asarray(images[1].data), expected, rtol=1e-6)
    assert images[1].translation["x"] == pytest.approx(0.1)
    assert images[0].axes_units["y"] == "micrometer"
    assert "unit" not in _ome(tmp_path / "p.zarr")["ome"]["multiscales"][0]["axes"][0]  # unknown interval
    # the xarray view is unchanged: one variable, the full-resolution map
    opened = xr.open_zarr(tmp_path / "p.zarr", consolidated=False)
    assert list(opened.data_vars) == ["probability"] and opened["probability"].shape == data.shape


def test_pixel_units_map_to_ngff_names():
    assert space_unit("nm") == "nanometer" and space_unit("\u00b5m") == "micrometer"
    assert space_unit("px") is None and space_unit(None) is None

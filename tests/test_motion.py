"""The shared motion module: drift on (particle, frame) grids against trackpy, corrected positions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import trackpy as tp

from rvae_tools.motion import corrected_positions, drift_from_grid, mean_squared_displacement


def walkers(rng, p=50, f=30, drift=(0.2, -0.1), gaps=0.1):
    x = rng.uniform(0, 100, (p, 1)) + np.cumsum(rng.normal(drift[0], 0.5, (p, f)), 1)
    y = rng.uniform(0, 100, (p, 1)) + np.cumsum(rng.normal(drift[1], 0.5, (p, f)), 1)
    x[rng.random((p, f)) < gaps] = np.nan
    y[np.isnan(x)] = np.nan
    return x, y


@pytest.mark.parametrize("smoothing", [0, 3])
def test_grid_drift_equals_trackpy_compute_drift_with_gaps(smoothing):
    x, y = walkers(np.random.default_rng(0))
    p_idx, f_idx = np.nonzero(np.isfinite(x))
    table = pd.DataFrame({"frame": f_idx, "particle": p_idx, "x": x[p_idx, f_idx], "y": y[p_idx, f_idx]})
    reference = tp.compute_drift(table, smoothing=smoothing).reindex(np.arange(30)).ffill().fillna(0.0)
    dx, dy = drift_from_grid(x, y, smoothing, chunk=7)
    np.testing.assert_allclose(dx, reference["x"].to_numpy(), atol=1e-12)
    np.testing.assert_allclose(dy, reference["y"].to_numpy(), atol=1e-12)


def test_corrected_positions_take_the_tracking_stages_drift():
    rng = np.random.default_rng(1)
    x, y = walkers(rng, gaps=0.0)
    shift = np.linspace(0, 12, 30)  # what the tracking stage removed, per frame
    p_idx, f_idx = np.nonzero(np.isfinite(x))
    tracks = pd.DataFrame({"frame": f_idx, "particle": p_idx, "x": x[p_idx, f_idx], "y": y[p_idx, f_idx]})
    tracks["x_corrected"] = tracks["x"] - shift[tracks["frame"]]
    tracks["y_corrected"] = tracks["y"]
    xc, yc, source = corrected_positions(x, y, np.arange(50), np.arange(30), tracks)
    assert source == "tracks"
    np.testing.assert_allclose(xc, x - shift[None, :])
    np.testing.assert_allclose(yc, y)


def test_chunked_msd_equals_one_chunk():
    x, y = walkers(np.random.default_rng(2))
    xy = np.stack([x, y], axis=-1)
    a = mean_squared_displacement(xy, 10, chunk=3)
    b = mean_squared_displacement(xy, 10, chunk=10_000)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v)

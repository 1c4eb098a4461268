"""Encoded angles are continuous, not the rotation grid's: a real cell turned off the grid is recovered.

Cells of a real phase-contrast frame (../shared/data/omnipose_rods/ec_5I_t141xy5c1.tif, with its
label mask) are cut out with their own mask, turned with ``scipy.ndimage.rotate`` (cubic spline,
not the model's decoder) and cropped to 32 px windows. A small rVAE with 16 rotations (22.5 degree
bins) is trained on randomly turned cells; held-out cells turned by 7 and 31 degrees (off the grid)
must move the encoded angle by the turn, modulo pi (rods), within about 2 degrees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from rvae_tools.rvae import RVAE

RODS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omnipose_rods"
NAME = "ec_5I_t141xy5c1"
SIZE = 32
HELD_OUT = 8
pytestmark = pytest.mark.skipif(not RODS.exists(), reason="real data not available")


def _cells():
    """Each elongated cell away from the frame edge: a 48 px crop, the cell bright on 0 outside its mask."""
    import tifffile
    from skimage.measure import regionprops

    image = tifffile.imread(RODS / f"{NAME}.tif").astype(np.float64)
    masks = tifffile.imread(RODS / "masks" / f"{NAME}_cp_masks.tif")
    bg, fg = np.median(image[masks == 0]), np.median(image[masks > 0])
    out = []
    for p in regionprops(masks):
        cy, cx = (round(c) for c in p.centroid)
        if (
            not (24 <= cy <= image.shape[0] - 24 and 24 <= cx <= image.shape[1] - 24)
            or p.axis_major_length < 18
        ):
            continue
        sl = (slice(cy - 24, cy + 24), slice(cx - 24, cx + 24))
        own = ndimage.binary_dilation(masks[sl] == p.label)
        out.append(np.where(own, (bg - image[sl]) / (bg - fg), 0.0))  # dark cells made bright
    return out


def _turned(crop: np.ndarray, degrees: float, shift=(0.0, 0.0)) -> np.ndarray:
    """``crop`` turned by ``degrees`` (scipy's sense), shifted by ``shift`` px (rows, cols), central window."""
    r = ndimage.shift(
        ndimage.rotate(crop, degrees, reshape=False, order=3, cval=0.0), shift, order=3
    )
    o = (r.shape[0] - SIZE) // 2
    return r[o : o + SIZE, o : o + SIZE].astype(np.float32)


def _axis(window: np.ndarray) -> float:
    """Principal-axis angle (rad, from +x towards +y, y = row) of a window's intensity (second moments)."""
    yy, xx = np.mgrid[: window.shape[0], : window.shape[1]].astype(np.float64)
    w = np.clip(window, 0, None)
    xm, ym = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    cxx, cyy = (w * (xx - xm) ** 2).sum(), (w * (yy - ym) ** 2).sum()
    cxy = (w * (xx - xm) * (yy - ym)).sum()
    return 0.5 * np.arctan2(2 * cxy, cxx - cyy)


def _half_turn_gap(a, b) -> np.ndarray:
    """a - b modulo pi, in degrees within [-90, 90)."""
    return np.degrees(np.angle(np.exp(2j * (np.asarray(a) - np.asarray(b))))) / 2


@pytest.fixture(scope="module")
def cells_and_model():
    torch.set_num_threads(1)
    cells = _cells()
    rng = np.random.default_rng(0)
    train = np.stack(
        [
            _turned(cells[i], rng.uniform(0, 360), rng.uniform(-1, 1, 2))
            for i in rng.integers(0, len(cells) - HELD_OUT, 768)
        ]
    )
    train += rng.normal(0, 0.03, train.shape).astype(np.float32)
    model = RVAE(
        SIZE,
        latent_dim=1,
        seed=0,
        encoder_hidden=[32],
        encoder_channels=[8, 16],
        decoder_hidden=[32, 32],
        rotations=16,
        epochs=5,
        batch_size=32,
        kl_warmup_epochs=1,
        patience=0,
        lr=3e-3,
    )
    model.fit(train, device="cpu", progress=False)
    return cells[-HELD_OUT:], model


def test_scipy_turn_sense_from_the_moments():
    """The reference's own convention, without the model: scipy's positive turn is clockwise on screen
    (from +x towards -y with y = row), so the lab-frame turn is minus scipy's angle."""
    cell = _cells()[0]
    for phi in (7.0, 31.0):
        gap = _half_turn_gap(
            _axis(_turned(cell, phi)) - _axis(_turned(cell, 0.0)), np.radians(-phi)
        )
        assert abs(gap) < 1.5, gap


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_off_grid_turns_of_real_cells_are_recovered(cells_and_model, method):
    """``fast`` is scored on the cells where its rotation search found the bins ``exact`` found
    (it decodes only the encoder's top rotations, which a briefly trained encoder ranks wrongly
    for some windows; the refinement cannot mend a wrong bin)."""
    cells, model = cells_and_model
    errors = {True: [], False: []}
    for cell in cells:
        windows = np.stack([_turned(cell, 0.0), _turned(cell, 7.0), _turned(cell, 31.0)])
        grid = model.encode(windows, device="cpu", method=method, refine=False)["angle"]
        found = np.ones(3, bool)
        if method == "fast":
            exact = model.encode(windows, device="cpu", method="exact", refine=False)["angle"]
            found = np.isclose(grid, exact, atol=1e-4)
        fine = model.encode(windows, device="cpu", method=method, refine=True)["angle"]
        # The refinement stays near its bin: within one bin (22.5 degrees) of the grid's angle.
        assert np.max(np.abs(np.degrees(np.angle(np.exp(1j * (fine - grid)))))) < 22.5
        for k, phi in ((1, 7.0), (2, 31.0)):
            if found[0] and found[k]:
                errors[True].append(_half_turn_gap(fine[k] - fine[0], np.radians(-phi)))
                errors[False].append(_half_turn_gap(grid[k] - grid[0], np.radians(-phi)))
    assert len(errors[True]) >= 4  # exact: all 16 pairs; fast: measured 7
    fine, grid = np.abs(errors[True]), np.abs(errors[False])
    assert np.median(fine) < 1.0 and np.mean(fine < 2.0) >= 0.8, np.round(errors[True], 1)
    # The grid's angle alone is measurably worse on the same windows (what the refinement adds).
    assert np.median(grid) > 2 * np.median(fine), (np.median(grid), np.median(fine))


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_refined_angle_spread_covers_its_scatter_under_noise(cells_and_model, method):
    """``angle_sd`` stays consistent with the refined angle: under pixel noise the angle scatters by
    no more than about its reported spread, and the spread is well inside one rotation bin."""
    cells, model = cells_and_model
    rng = np.random.default_rng(3)
    for cell in cells[:4]:
        noisy = _turned(cell, 7.0)[None] + rng.normal(0, 0.05, (16, SIZE, SIZE)).astype(np.float32)
        out = model.encode(noisy, device="cpu", method=method, refine=True)
        scatter = np.degrees(np.std(np.angle(np.exp(2j * out["angle"])) / 2))
        sd = np.degrees(np.median(out["angle_sd"]))
        assert np.isfinite(out["angle_sd"]).all() and 0 < sd < 22.5 / 2, sd
        assert scatter < 2 * sd + 0.5, (scatter, sd)

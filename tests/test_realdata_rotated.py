"""A real colony turned and shifted by known amounts: the encoded angles follow the known rotation.

One real phase-contrast frame (../shared/data/omnipose_rods/ec_5I_t141xy5c1.tif, a dense E. coli
microcolony, 159 cells) is turned by 2.5 degrees more each frame about the frame centre and
shifted by about 1 px (10 frames, bench/realdata.py ``rotated_movie``); its label mask goes
along. The movie then goes through the whole chain as a user's movie with nothing but its path:
inspect, the detector, tracking, windows and the rVAE (3 epochs, the only setting given) and
encode. The references come from the turned masks (each window's cell is the label under its
centre), not from anything the chain computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _bench import load_bench

ROOT = Path(__file__).resolve().parents[1]
RODS = ROOT.parent / "shared" / "data" / "omnipose_rods"


def _bench():
    return load_bench("realdata")


def test_rotated_movie_turns_the_mask_with_the_frame():
    """The movie maker's own convention, on a drawn frame: a label's ellipse turns by the known angle."""
    bench = _bench()
    yy, xx = np.mgrid[0:80, 0:100]
    u, v = xx - 60.0, yy - 30.0
    labels = ((u / 12) ** 2 + (v / 4) ** 2 <= 1).astype(np.int64)  # along +x, off the frame centre
    image = np.where(labels > 0, 0.2, 1.0)
    movie, turned, phis = bench.rotated_movie(image, labels, frames=4, step=np.radians(20))
    assert movie.shape == (4, 80, 100) and np.allclose(phis, np.radians([0, 20, 40, 60]))
    for k in range(4):
        ref = bench.mask_reference(turned[k])
        assert len(ref) == 1
        gap = np.angle(np.exp(2j * (ref["orientation"].iloc[0] - phis[k]))) / 2
        assert abs(np.degrees(gap)) < 2.0
        # The image turns with its mask: the label's pixels are the dark ones.
        assert movie[k][turned[k] > 0].mean() < 0.5 < movie[k][turned[k] == 0].mean()


@pytest.mark.skipif(not RODS.exists(), reason="real data not available")
def test_encoded_angles_of_a_turned_real_colony_follow_the_known_rotation():
    """Measured (3 epochs, seed 0, detector of ea17f9b): lab-frame angle vs mask ellipse 0.874
    (the detector's image moments 0.972), angle change vs known turn 0.917, rods found two-fold.
    Before windows cut the halos and symmetry was read from the template's body: 0.61, 0.80
    and n = 1. Still short of the issue's 0.95: at CI epochs the equivariant encoder's
    within-bin offset is not learned yet, so 94 % of the raw angles sit on the 16-rotation grid
    (22.5 degree steps; 6 epochs: 0.867).
    """
    import tifffile
    import torch

    torch.set_num_threads(1)
    bench = _bench()
    name = "ec_5I_t141xy5c1"
    image = tifffile.imread(RODS / f"{name}.tif").astype(np.float64)
    masks = tifffile.imread(RODS / "masks" / f"{name}_cp_masks.tif")
    s = bench.score_rotated(image, masks, epochs=3)
    assert s["matched"] >= 0.9 * s["windows"] and s["windows"] >= 1000
    assert s["symmetry"] == 2  # rods: a half-turn maps them onto themselves
    assert s["rvae_follows_rotation"] >= 0.88
    assert s["rvae_vs_mask"] >= 0.85

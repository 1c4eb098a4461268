"""The playing-card benchmark's cards and its reduced run (bench/cards.py)."""

from __future__ import annotations

import math

import numpy as np
from _bench import load_bench

cards = load_bench("cards")


def test_quick_moves_the_defaults_and_given_options_still_win():
    args = cards.parse_args(["--quick", "--epochs", "2"])
    assert args.epochs == 2
    assert (args.size, args.labelled, args.unlabelled, args.test) == (24, 100, 200, 100)
    assert args.angles == [0, 90, 180] and args.peer_angles == [180]
    full = cards.parse_args([])
    assert full.angles == [0, 15, 30, 45, 60, 90, 120, 180] and full.peer_angles is None


def test_a_quarter_turned_card_is_the_upright_card_turned_by_numpy():
    # np.rot90 turns the array independently of render's own rotation code.
    paths = cards.glyph_paths()
    for path in paths.values():
        upright = cards.render(path, 24, 0.0, (0.0, 0.0), 0.0, 1.0, 13.0)
        turned = cards.render(path, 24, math.pi / 2, (0.0, 0.0), 0.0, 1.0, 13.0)
        assert upright.sum() > 20
        best = min(np.abs(np.rot90(upright, k) - turned).mean() for k in (1, -1))
        assert best < 0.02 * upright.mean() + 1e-3


def test_suits_differ_and_labelled_cards_are_centred():
    class A:
        size, glyph, shift, shear, scale, noise = 24, 0.55, 2.0, 0.15, 0.1, 0.0

    x, y = cards.card_set(5, 4.0, A, seed=1, disorder=False)
    assert x.shape == (20, 24, 24) and np.bincount(y).tolist() == [5] * 4
    means = np.stack([x[y == k].mean(0) for k in range(4)])
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).mean() > 0.02
    yy, xx = np.mgrid[:24, :24]
    cy = (x * yy).sum((1, 2)) / x.sum((1, 2))
    cx = (x * xx).sum((1, 2)) / x.sum((1, 2))
    # Bounding-box centred glyphs: their centre of mass sits within a pixel or two of the middle.
    assert np.abs(cy - 11.5).max() < 2.0 and np.abs(cx - 11.5).max() < 2.0

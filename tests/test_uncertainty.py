"""The spread calibration's pieces (rvae_tools.rvae.uncertainty), checked against independent constructions.

* ``angle_inside``: on errors drawn from the two-branch posterior it describes (the reported
  angle and its other end, weighted by ``flip_prob``), the c-interval holds a fraction c.
* ``transform_windows``: a Gaussian blob rotated and moved by known amounts lands where the
  rotation matrix puts it (its centroid and principal axis, measured by moments).
* ``fit_calibration``'s variance fit: misses drawn with a known spread model are covered at the
  nominal 68 % and 95 % after calibration, and ``apply_calibration`` applies that model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from rvae_tools.rvae.uncertainty import (
    _fit_variance,
    angle_inside,
    angle_interval_mass,
    apply_calibration,
    transform_windows,
)


@pytest.mark.parametrize("flip", [0.0, 0.03, 0.2, 0.5])
@pytest.mark.parametrize("level", [0.68, 0.95])
def test_angle_interval_covers_its_nominal_share_of_the_two_branch_posterior(flip, level):
    rng = np.random.default_rng(1)
    n = 40000
    sd = rng.uniform(0.02, 0.4, n)
    other_end = rng.random(n) < flip
    err = rng.normal(0.0, sd) + np.where(other_end, math.pi, 0.0)
    inside = angle_inside(err, sd, np.full(n, flip), level)
    assert abs(inside.mean() - level) < 0.01


def test_the_other_end_is_inside_when_the_ends_look_alike_and_outside_when_they_do_not():
    sd = np.array([0.1, 0.1])
    flip = np.array([0.5, 0.001])
    assert angle_inside(np.array([math.pi, math.pi]), sd, flip, 0.95).tolist() == [True, False]
    # Without a flip branch the interval is the normal one: +/- 1.96 sd holds 95 %.
    assert angle_interval_mass(np.array([1.959964 * 0.1]), np.array([0.1]), None)[0] == pytest.approx(0.95, abs=1e-4)
    with pytest.raises(ValueError):
        angle_inside(np.zeros(1), np.ones(1), None, 1.5)


def _moments(img):
    yy, xx = np.indices(img.shape, dtype=float)
    w = img / img.sum()
    cx, cy = (w * xx).sum(), (w * yy).sum()
    sxx, syy, sxy = (w * (xx - cx) ** 2).sum(), (w * (yy - cy) ** 2).sum(), (w * (xx - cx) * (yy - cy)).sum()
    return cx, cy, 0.5 * math.atan2(2 * sxy, sxx - syy)


def test_transformed_blob_moves_and_turns_by_the_known_amounts():
    size = 33
    c = (size - 1) / 2
    yy, xx = np.indices((size, size), dtype=float)
    # An elongated blob along +x, centred 2 px right of the centre.
    blob = np.exp(-(((xx - c - 2) / 4.0) ** 2 + ((yy - c) / 1.5) ** 2) / 2)
    phi, delta = 0.6, np.array([1.0, -0.5])
    out = transform_windows(blob[None].astype(np.float32), np.array([phi]), delta[None])[0]
    cx, cy, axis = _moments(out)
    # From +x towards +y: (2, 0) about the centre turns to 2 (cos phi, sin phi), then moves by delta.
    assert cx == pytest.approx(c + 2 * math.cos(phi) + delta[0], abs=0.05)
    assert cy == pytest.approx(c + 2 * math.sin(phi) + delta[1], abs=0.05)
    assert axis == pytest.approx(phi, abs=0.02)


def test_fitted_spread_model_covers_misses_drawn_from_it():
    rng = np.random.default_rng(2)
    n = 6000
    raw = rng.uniform(0.01, 0.1, n)                 # the model's own (too small) sds
    true_sd = np.sqrt((3.0 * raw) ** 2 + 0.05 ** 2)  # the actual error spread of one window
    miss = rng.normal(0.0, np.sqrt(2) * true_sd)     # a miss is the difference of two windows
    fit = _fit_variance(miss, 2 * raw ** 2)
    # (scale, floor) trade off against each other; what must hold is the coverage of fresh errors.
    assert fit["scale"] > 1.5 and fit["n"] == n
    out = apply_calibration({"angle_sd": raw, "dx_sd": raw, "dy_sd": raw},
                            {"angle": fit, "shift": {"scale": 1.0, "floor": 0.0}})
    err = rng.normal(0.0, true_sd)                   # fresh errors of single windows
    for level, z in ((0.68, 0.994458), (0.95, 1.959964)):
        assert abs(np.mean(np.abs(err) <= z * out["angle_sd"]) - level) < 0.03
    assert np.array_equal(out["dx_sd"], raw.astype(np.float32))


def test_pose_spread_matches_the_scatter_of_fits_to_correlated_noise():
    """Least-squares fits of a blob's position to windows whose noise is spatially correlated.

    The truth is the scatter of the fitted positions over many noise draws; the spread
    reported from one draw's residual must match it, where the independent-pixel form is
    several times too narrow.
    """
    torch = pytest.importorskip("torch")
    from scipy import ndimage

    from rvae_tools.rvae.uncertainty import pose_covariance

    rng = np.random.default_rng(3)
    h = w = 32
    yy, xx = np.mgrid[:h, :w] - 15.5
    blob = np.exp(-(xx ** 2 + (yy / 1.6) ** 2) / (2 * 2.5 ** 2))
    # Derivatives of the blob's image with respect to its x and y position (per px).
    jac = np.stack([xx / 2.5 ** 2 * blob, yy / (1.6 * 2.5) ** 2 * blob])
    n = 400
    white = rng.normal(0.0, 1.0, (n, h, w))
    noise = ndimage.gaussian_filter(white, (0, 1.2, 1.2), mode="wrap")
    noise *= 0.05 / noise.std()
    # The linear least-squares position estimate of each draw (the truth is 0).
    jtj = np.einsum("ihw,jhw->ij", jac, jac)
    est = np.linalg.solve(jtj, np.einsum("ihw,nhw->in", jac, noise)).T
    actual = est.var(0)
    j = torch.from_numpy(np.broadcast_to(jac, (n, 2, h, w)).copy()).float()
    r = torch.from_numpy(noise).float()
    m = torch.ones(n, h, w)
    reported = pose_covariance(j, r, m).numpy()
    independent = pose_covariance(j, r, m, max_lag=0).numpy()
    ratio = np.median(reported, 0) / actual
    assert np.all((ratio > 0.7) & (ratio < 1.4)), ratio
    assert np.all(np.median(independent, 0) / actual < 0.3)
    # Standardised errors of single draws: the nominal 95 % interval holds about 95 %.
    covered = np.abs(est) <= 1.96 * np.sqrt(reported)
    assert abs(covered.mean() - 0.95) < 0.04


def test_flip_temperature_recovers_an_overconfident_posterior():
    """Pairs that pick the wrong end independently with known rates; the reported flip_prob is
    the true rate made three times too confident (log-odds x 3); the fit must undo it."""
    from rvae_tools.rvae.uncertainty import POLARITY_DISAGREEMENT, _fit_flip_temperature

    rng = np.random.default_rng(4)
    n = 40000
    logit = rng.normal(-4.0, 1.0, n)
    p_true = 1 / (1 + np.exp(-logit))
    reported_a = 1 / (1 + np.exp(-3 * logit))
    reported_b = 1 / (1 + np.exp(-3 * (logit + rng.normal(0, 0.1, n))))
    disagree = (rng.random(n) < p_true) != (rng.random(n) < p_true)
    assert disagree.mean() < POLARITY_DISAGREEMENT       # the ends are told apart
    fit = _fit_flip_temperature(reported_a, reported_b, disagree)
    assert 2.4 < fit["temperature"] < 3.7 and fit["resolved"], fit
    ones = np.ones(n)
    unit = {"angle": {"scale": 1, "floor": 0}, "shift": {"scale": 1, "floor": 0}}
    out = apply_calibration({"flip_prob": reported_a, "angle_sd": ones, "dx_sd": ones, "dy_sd": ones}, {**unit, "flip": fit})
    assert abs(out["flip_prob"].mean() - p_true.mean()) < 0.2 * p_true.mean()
    assert reported_a.mean() < 0.5 * p_true.mean()     # the test's premise: visibly overconfident


def test_a_species_whose_ends_are_confused_gets_its_angle_modulo_pi():
    from rvae_tools.rvae.uncertainty import _fit_flip_temperature

    rng = np.random.default_rng(5)
    n = 2000
    reported = np.full(n, 0.01)                       # confident
    disagree = (rng.random(n) < 0.3) != (rng.random(n) < 0.3)   # but 30 % of the windows are flipped
    fit = _fit_flip_temperature(reported, reported, disagree)
    assert not fit["resolved"]
    ones = np.ones(n)
    out = apply_calibration({"flip_prob": reported, "angle_sd": ones, "dx_sd": ones, "dy_sd": ones},
                            {"angle": {"scale": 1, "floor": 0}, "shift": {"scale": 1, "floor": 0}, "flip": fit})
    assert np.all(out["flip_prob"] == 0.5)
    # With both ends equally weighted the true angle is inside as often at either end.
    assert angle_inside(np.array([0.1, math.pi + 0.1]), np.array([0.2, 0.2]), out["flip_prob"][:2], 0.68).all()


def test_interval_factor_is_the_normal_quantile_or_the_t_quantile():
    from rvae_tools.rvae.uncertainty import interval_factor

    assert interval_factor(0.95) == pytest.approx(1.959964, abs=1e-5)
    assert interval_factor(0.68) == pytest.approx(0.994458, abs=1e-5)
    # Cauchy (1 dof): the 95 % half-width is tan(0.475 pi).
    assert interval_factor(0.95, 1.0) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-6)
    assert np.allclose(interval_factor(0.95, np.array([np.inf, 1.0])), [1.959964, math.tan(0.475 * math.pi)], atol=1e-5)


@pytest.mark.parametrize("dof", [1.5, 3.0])
@pytest.mark.parametrize("flip", [0.0, 0.2, 0.5])
def test_t_branch_interval_covers_its_nominal_share(dof, flip):
    """Errors drawn from the two-branch posterior with Student-t branches (scipy's sampler)."""
    from scipy.stats import t as student_t

    rng = np.random.default_rng(5)
    n = 40000
    sd = rng.uniform(0.01, 0.1, n)
    err = student_t.rvs(dof, size=n, random_state=rng) * sd + np.where(rng.random(n) < flip, math.pi, 0.0)
    for level in (0.68, 0.95):
        inside = angle_inside(err, sd, np.full(n, flip), level, dof)
        assert abs(inside.mean() - level) < 0.012


def test_error_calibration_covers_heavy_tailed_errors_and_unseen_flips():
    """Known errors: a mixture of small ones (85 %) and occasional large ones (15 %, 8x), from
    spreads 3x too small, and 8 % of the polar particles on the wrong end while the model says 1 %.
    A normal spread cannot hold 68 % and 95 % at once here; the fitted map must, on fresh draws."""
    from rvae_tools.rvae.uncertainty import fit_error_calibration, interval_factor

    def draw(rng, n):
        raw = rng.uniform(0.01, 0.05, n)
        big = rng.random(n) < 0.15
        true_sd = 3.0 * raw * np.where(big, 8.0, 1.0)
        flipped = rng.random(n) < 0.08
        angle = rng.normal(0.0, true_sd) + np.where(flipped, math.pi, 0.0)
        shift = rng.normal(0.0, true_sd[None].repeat(2, 0))
        enc = {"angle_sd": raw, "flip_prob": np.full(n, 0.01), "dx_sd": raw, "dy_sd": raw}
        return {"angle": angle, "dx": shift[0], "dy": shift[1]}, enc

    rng = np.random.default_rng(6)
    err, enc = draw(rng, 1500)
    cal = fit_error_calibration(err, enc, order=1)
    assert cal["dx"]["dof"] < 10 and cal["dy"]["dof"] < 10 and cal["flip"]["flip_rate"] == pytest.approx(0.08, abs=0.02)
    # A normal (the self-consistency form) misses one of the two levels by more than 5 points here.
    normal = _fit_variance(np.concatenate([err["dx"], err["dy"]]), np.concatenate([enc["dx_sd"], enc["dy_sd"]]) ** 2,
                           copies=1)
    assert normal["pair_coverage_error"] > 0.05
    err, enc = draw(rng, 20000)
    out = apply_calibration(enc, cal)
    assert np.mean(out["flip_prob"]) == pytest.approx(0.08, abs=0.02)
    for level in (0.68, 0.95):
        assert abs(angle_inside(err["angle"], out["angle_sd"], out["flip_prob"], level, out["angle_dof"]).mean() - level) < 0.03
        k = interval_factor(level, out["dx_dof"])
        assert abs(np.mean(np.abs(err["dx"]) <= k * out["dx_sd"]) - level) < 0.03


def _rods(n: int, seed: int, size: int = 32):
    """Gaussian rods (length 4-6 px sd, width 1.3 px) at random angles, brightness 0.75 +/- 0.08 on 0.1, noise 0.03."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices((size, size), dtype=float) - (size - 1) / 2
    angles = rng.uniform(-math.pi, math.pi, n)
    length = rng.uniform(4.0, 6.0, n)
    bright = np.clip(rng.normal(0.75, 0.08, n), 0.4, 1.1)
    u = np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy
    v = -np.sin(angles)[:, None, None] * xx + np.cos(angles)[:, None, None] * yy
    clean = 0.1 + bright[:, None, None] * np.exp(-0.5 * (u / length[:, None, None]) ** 2 - 0.5 * (v / 1.3) ** 2)
    return (clean + rng.normal(0, 0.03, clean.shape)).astype(np.float32), angles


def _fake_encoder(shared_error: float):
    """An encoder that is consistent under rotation (the principal axis of the window's intensity
    squared above its median within 12 px: another weighting and radius than ``moment_axis``'s) plus
    an error that depends only on the rod's peak brightness (smoothed, so noise barely moves it),
    which a rotated copy shares: invisible to the self-consistency pairs (normal, sd ``shared_error``
    rad, as the brightness is). Claims a spread of 0.01 rad."""
    from scipy import ndimage

    def peak(w):
        return ndimage.gaussian_filter(np.asarray(w, dtype=np.float64), (0, 2, 2)).max(axis=(1, 2))

    ref = peak(_rods(400, 99)[0])
    centre, spread = np.median(ref), ref.std()

    def encode(w):
        w = np.asarray(w, dtype=np.float64)
        yy, xx = np.indices(w.shape[1:], dtype=float) - (w.shape[1] - 1) / 2
        weight = np.clip(w - np.median(w, axis=(1, 2), keepdims=True), 0, None) ** 2 * (xx**2 + yy**2 <= 144)
        mass = weight.sum((1, 2))
        sxx, syy, sxy = ((weight * a * b).sum((1, 2)) / mass for a, b in ((xx, xx), (yy, yy), (xx, yy)))
        axis = 0.5 * np.arctan2(2 * sxy, sxx - syy)
        angle = axis + shared_error * (peak(w) - centre) / spread
        n = len(w)
        zero, small = np.zeros(n), np.full(n, 0.01)
        return {"angle": np.remainder(angle + math.pi, 2 * math.pi) - math.pi, "angle_sd": small,
                "flip_prob": np.full(n, 0.5), "dx": zero, "dy": zero, "dx_sd": small, "dy_sd": small}

    return encode


@pytest.mark.parametrize("shared_error", [0.0, 0.3])
def test_moment_check_widens_an_angle_whose_error_the_pairs_share_and_leaves_a_good_one(shared_error):
    from scipy import ndimage

    from rvae_tools.rvae.uncertainty import fit_calibration

    encode = _fake_encoder(shared_error)
    cal_x, _ = _rods(400, 1)
    cal = fit_calibration(encode, cal_x, seed=0, order=2,
                          reconstruct=lambda w: ndimage.gaussian_filter(np.asarray(w, float), (0, 1.5, 1.5)))
    x, truth = _rods(400, 2)
    out = apply_calibration(encode(x), cal)
    err = np.remainder(out["angle"] - truth + math.pi / 2, math.pi) - math.pi / 2
    # The fake angle's origin is the image axis (no offset): the error modulo pi against the truth.
    err -= np.angle(np.mean(np.exp(2j * err))) / 2
    coverage = {c: float(np.mean(np.abs(err) <= k * out["angle_sd"])) for c, k in ((0.68, 0.994458), (0.95, 1.959964))}
    check = cal["moment_check"]
    if shared_error:
        assert check["worse_than_moments"], check
        assert abs(coverage[0.68] - 0.68) <= 0.10 and abs(coverage[0.95] - 0.95) <= 0.05, (coverage, check)
    else:
        # Right within its self-consistency spread: its disagreement with the moments is theirs.
        assert check["floor"] < 0.5 * check["disagreement_floor"] + 1e-9 or check["floor"] < 0.02, check
        assert np.median(out["angle_sd"]) < 0.1
    assert set(check) >= {"floor", "moment_sd", "consistency", "n"} and check["n"] == 400

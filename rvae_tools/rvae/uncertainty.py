"""Calibration of the per-window spreads (angle, dx, dy) by self-consistency under known transforms.

The model's own spreads (the rotation posterior plus the likelihood's curvature, see
:meth:`RVAE.encode`) count the pixel noise, but not how far the encoder's point estimates
stray from the best pose; that is most of the actual error. Truth is unknown on real data, but
a window rotated by a known angle ``phi`` and moved by a known ``delta`` (for refined angles
also given a fresh realisation of noise like its own residual, see :func:`fit_calibration`)
must encode to the angle + ``phi`` and to the shift rotated by ``phi`` plus ``delta``: the misses over
a sample of windows measure the encoding error. Per quantity a variance model

    sd^2 = (scale * sd_model)^2 + floor^2

is fitted so that the intervals of the misses (each has the variance of two windows) hold
68 % and 95 % of them.
Misses beyond pi/2 in angle are the other end of the particle (or a symmetry), counted by
``flip_prob``, and are left out of the angle fit; for a species whose ends differ they
calibrate ``flip_prob`` itself (a temperature on its log-odds; 0.5, the angle stated modulo pi, when
more than :data:`POLARITY_DISAGREEMENT` of the pairs disagree on the end). ``z`` must not change at all
under these transforms, so its misses calibrate ``z_sd`` the same way. Fitted per species
by ``encode`` (each species' windows have their own error). An error that a window and its copy
share (a template learned a little or much turned) is invisible to the pairs; for species of
order 1 or 2 :func:`fit_moment_check` compares the angle with each window's own principal axis
and widens ``angle_sd`` by what the disagreement holds beyond both estimates' errors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage
from scipy.stats import norm
from scipy.stats import t as student_t

if TYPE_CHECKING:  # torch is imported where the spreads are computed
    import torch

#: Largest known shift of a calibration window, px.
MAX_SHIFT = 1.0
#: The nominal coverages the calibration matches and their normal quantiles.
NOMINAL = ((0.68, 0.994458), (0.95, 1.959964))
#: Degrees of freedom of the Student t tried for a heavy-tailed error (see :func:`_fit_variance`).
TAIL_DOFS = (30.0, 10.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0)
#: Coverage error (a fraction) by which a t must beat the normal to be kept.
TAIL_MARGIN = 0.005
#: Largest share of (window, rotated copy) pairs that may disagree on a species' end for its
#: polarity to count as resolved. Above it (more than about 5 % of windows on the wrong end,
#: and flips that both copies share are not even seen) ``flip_prob`` is set to 0.5: the angle is
#: stated modulo pi, its interval holds both ends.
POLARITY_DISAGREEMENT = 0.10
#: Largest pixel lag (px, each axis) of the residual's autocovariance in :func:`pose_covariance`.
#: The misfit of a decoded template is smooth over about the blur of the particle's edge; on the
#: simulated demo the spreads stop growing beyond a lag of 3 px.
RESIDUAL_LAGS = 4
#: Fresh noise of the noisy copy that calibrates a refined angle, in units of the window's own
#: residual (see :func:`fit_calibration`). One residual's worth, though the miss ought to hold
#: two windows' noise errors: the residual holds the misfit beside the noise (L windows of
#: tests/test_rvae.py: 2.4 times the pixel noise's variance; the simulated AFM windows of
#: bench/uncertainty.py, with neighbours and scan-line offsets, 2.6 times), and the copy's
#: interpolation decorrelates part of the window's own noise from it. Measured, refined angles,
#: 68 % / 95 % coverage of the true angles: L windows with white, spatially correlated
#: (blurred 1 px) and shot (Poisson) noise 0.63 / 0.94, 0.65 / 0.94, 0.67 / 0.95 (400 windows,
#: mean of 4 calibration seeds; sqrt(2): up to 0.75 / 0.99; independent pixel noise of the
#: robust noise sd instead of the residual: 0.48 / 0.83 under correlated noise);
#: bench/uncertainty.py rod 0.76 / 0.95 (sqrt(2) times the residual scaled to its robust sd:
#: 0.81 / 0.98; independent pixel noise times sqrt(2): 0.66 / 0.89).
FRESH_NOISE = 1.0


def pose_covariance(jac: torch.Tensor, resid: torch.Tensor, mask: torch.Tensor,
                    max_lag: int = RESIDUAL_LAGS) -> torch.Tensor:
    """Variances (B, p) of the pose parameters from the likelihood's local curvature, with correlated residuals.

    The Gauss-Newton (Laplace) covariance ``s^2 (J^T J)^-1`` assumes independent pixel noise.
    The residual of a decoded template is not independent: where the template is a little too
    wide, too bright or off-centre, neighbouring pixels miss together, and the pose's actual
    error is several times that covariance. The sandwich form
    ``(J^T J)^-1 J^T S J (J^T J)^-1``, with ``S`` the residual's own autocovariance (stationary
    over the window, lags up to ``max_lag`` px), counts that; it is never taken narrower than
    the independent-noise form.

    Parameters
    ----------
    jac : Tensor (B, p, H, W)
        Derivative of the decoded window with respect to each of the p pose parameters
        (intensity per parameter unit).
    resid : Tensor (B, H, W)
        Window minus its decoding (intensity); any value where ``mask`` is 0.
    mask : Tensor (B, H, W)
        1 where the pixel counts, 0 where it is missing.
    max_lag : int
        Largest lag (px) of the autocovariance, per axis; 0 = independent pixels.

    Returns
    -------
    Tensor (B, p)
        Variances in squared parameter units (>= 0).
    """
    import torch
    import torch.nn.functional as F

    b, p, h, w = jac.shape
    mask = mask.float()
    jac = jac.float() * mask[:, None]
    resid = resid.float() * mask
    jtj = torch.einsum("bihw,bjhw->bij", jac, jac)
    jtj = jtj + 1e-6 * torch.eye(p, device=jac.device) * jtj.diagonal(dim1=1, dim2=2).mean(1)[:, None, None].clamp(min=1e-12)
    inv = torch.linalg.inv(jtj)
    dof = (mask.flatten(1).sum(1) - p).clamp(min=1)
    white = inv * ((resid ** 2).flatten(1).sum(1) / dof)[:, None, None]
    if max_lag <= 0:
        return white.diagonal(dim1=1, dim2=2).clamp(min=0)
    # autocov(lag) = sum_q r(q + lag) r(q) / (pixel pairs at that lag), every lag at once as one
    # grouped convolution of each zero-padded residual with itself (the per-lag sums it
    # replaces, (2 max_lag + 1)^2 small operations per batch, were a fifth of this function's
    # time; the same sums up to rounding).
    n_lags = 2 * max_lag + 1
    lags = (max_lag, max_lag, max_lag, max_lag)

    def lagged_products(a):    # (B, n_lags, n_lags): sum_q a(q + lag) a(q), zero outside the window
        return F.conv2d(F.pad(a, lags)[None], a[:, None], groups=b)[0]

    if bool((mask == 1).all()):
        offsets = torch.arange(-max_lag, max_lag + 1, device=jac.device, dtype=jac.dtype).abs()
        pairs = ((h - offsets)[:, None] * (w - offsets)[None]).clamp(min=1.0)[None]
    else:
        pairs = lagged_products(mask).round().clamp(min=1.0)
    autocov = lagged_products(resid) / pairs
    # middle_ij = sum_lag autocov(lag) sum_q J_i(q + lag) J_j(q) = sum_q J_j(q) K_i(q), with
    # K_i(q) = sum_lag autocov(lag) J_i(q + lag) (zero outside the window): a cross-correlation
    # of every J_i with its own window's autocovariance, i.e. a grouped conv2d.
    kernel = autocov[:, None].expand(b, p, n_lags, n_lags).reshape(b * p, 1, n_lags, n_lags)
    smoothed = F.conv2d(jac.reshape(1, b * p, h, w), kernel, padding=max_lag, groups=b * p).view(b, p, h, w)
    middle = torch.einsum("bihw,bjhw->bij", smoothed, jac)
    middle = 0.5 * (middle + middle.transpose(1, 2))
    sandwich = inv @ middle @ inv
    return torch.maximum(sandwich.diagonal(dim1=1, dim2=2), white.diagonal(dim1=1, dim2=2)).clamp(min=0)


def transform_windows(windows: np.ndarray, phi: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Each window rotated by ``phi`` (rad, from +x towards +y) about its centre, then moved by ``delta`` (px, (dx, dy))."""
    out = np.empty_like(windows)
    wy, wx = windows.shape[1:]
    centre = np.array([(wy - 1) / 2, (wx - 1) / 2])
    for i, (w, a, d) in enumerate(zip(windows, phi, delta)):
        c, s = math.cos(a), math.sin(a)
        # Output pixel (row, col) reads the input at R(-phi) (p - centre - delta) + centre.
        matrix = np.array([[c, -s], [s, c]])
        shift_rc = np.array([d[1], d[0]])
        offset = centre - matrix @ (centre + shift_rc)
        out[i] = ndimage.affine_transform(w, matrix, offset=offset, order=1, mode="nearest")
    return out


def interval_factor(level: float, dof: float | np.ndarray = math.inf) -> float | np.ndarray:
    """Half-width of the central ``level`` interval in units of the reported spread.

    The reported spread (``angle_sd``, ``dx_sd``, ...) is the scale of a Student t with ``dof``
    degrees of freedom (``inf``: a normal, whose scale is its sd): the interval is
    ``value +/- interval_factor(level, dof) * spread`` (0.994 and 1.960 for a normal at 68 %
    and 95 %; wider at 95 % for a heavy-tailed error).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = 0.5 + level / 2
    dof = np.asarray(dof, dtype=float)
    out = np.where(np.isfinite(dof), student_t.ppf(q, np.where(np.isfinite(dof), dof, 1.0)), norm.ppf(q))
    return float(out) if out.ndim == 0 else out


def _fit_variance(miss: np.ndarray, model_var: np.ndarray, tails: bool = False, copies: int = 2) -> dict[str, float]:
    """(scale, floor[, dof]) whose intervals cover the misses at the nominal 68 % and 95 %.

    Each miss has the spread ``sqrt(scale^2 model_var + copies floor^2)`` (``copies`` = 2 for
    the miss between a window and its transformed copy, 1 for a single window's error against
    the truth); the pair is chosen on a grid to minimise the larger of the two coverage
    errors. With ``tails``, the error's shape too: the spread is the scale of a Student t whose
    degrees of freedom (:data:`TAIL_DOFS`) are chosen with it (a mixture of small errors and
    occasional large ones has a 95 % interval more than 1.97 times its 68 % one, which no
    normal spread matches at both levels); the normal is kept unless a t does better by more
    than :data:`TAIL_MARGIN`.
    """
    miss, model_var = np.abs(np.asarray(miss, float)), np.asarray(model_var, float)
    ok = np.isfinite(miss) & np.isfinite(model_var)
    miss, model_var = miss[ok], model_var[ok]
    if miss.size < 10:
        return {"scale": 1.0, "floor": 0.0, "n": int(miss.size), **({"dof": math.inf} if tails else {})}
    rms = float(np.sqrt(np.mean(miss ** 2))) + 1e-12
    typical = float(np.sqrt(np.median(model_var))) + 1e-12
    scales = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61) * rms / typical])
    floors = np.concatenate([[0.0], np.geomspace(1e-3, 3.0, 61) * rms])
    best = (np.inf, 1.0, 0.0, math.inf)
    for dof in (math.inf, *TAIL_DOFS) if tails else (math.inf,):
        factors = [(c, interval_factor(c, dof)) for c, _ in NOMINAL]
        margin = 0.0 if math.isinf(dof) else TAIL_MARGIN
        for scale in scales:
            sd = np.sqrt(scale ** 2 * model_var[None] + copies * floors[:, None] ** 2)    # (floors, n)
            worst = np.max([np.abs((miss[None] <= k * sd).mean(1) - c) for c, k in factors], axis=0)
            i = int(np.argmin(worst))
            if worst[i] + margin < best[0]:
                best = (float(worst[i]), float(scale), float(floors[i]), float(dof))
    out = {"scale": best[1], "floor": best[2], "n": int(miss.size), "pair_coverage_error": best[0]}
    if tails:
        out["dof"] = best[3]
    return out


def _fit_flip_temperature(flip_a: np.ndarray, flip_b: np.ndarray, disagree: np.ndarray) -> dict[str, float]:
    """Temperature T of ``flip' = sigmoid(logit(flip) / T)`` that best predicts which pairs disagree on the end.

    A window and its rotated copy point opposite ways with probability
    ``f_a (1 - f_b) + f_b (1 - f_a)`` when each picks the wrong end independently with its
    ``flip_prob``; T (on a grid from 0.25 to 1000) maximises the likelihood of the observed
    disagreements. T > 1 softens an overconfident posterior. Flips that both copies share are
    invisible to this test, so the fitted flip_prob is a lower bound of the actual flip rate.
    """
    fa, fb = (np.clip(np.nan_to_num(np.asarray(f, float), nan=0.5), 1e-6, 1 - 1e-6) for f in (flip_a, flip_b))
    d = np.asarray(disagree, bool)
    if d.size < 10:
        return {"temperature": 1.0, "n": int(d.size)}
    la, lb = np.log(fa / (1 - fa)), np.log(fb / (1 - fb))
    best = (np.inf, 1.0)
    for t in np.geomspace(0.25, 1000.0, 121):
        pa, pb = 1 / (1 + np.exp(-la / t)), 1 / (1 + np.exp(-lb / t))
        p = np.clip(pa * (1 - pb) + pb * (1 - pa), 1e-9, 1 - 1e-9)
        nll = -np.sum(np.where(d, np.log(p), np.log(1 - p)))
        if nll < best[0]:
            best = (nll, float(t))
    return {"temperature": best[1], "n": int(d.size), "pair_disagreement": float(d.mean()),
            "resolved": bool(d.mean() <= POLARITY_DISAGREEMENT)}


def residual_surrogate(residual: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fresh noise image per window with the power spectrum of its ``residual`` (n, wy, wx).

    Phase randomisation (the surrogate-data method): each residual's Fourier amplitudes with
    the phases of white noise, so the surrogate has the residual's variance and spatial
    autocovariance (correlated camera noise, the blur of a misfit edge) but none of its
    placement; its mean is 0.
    """
    r = np.asarray(residual, dtype=np.float64)
    r = r - r.mean(axis=(1, 2), keepdims=True)
    amplitude = np.abs(np.fft.fft2(r))
    # The phases of white noise's transform are Hermitian-symmetric: the inverse is real.
    phase = np.exp(1j * np.angle(np.fft.fft2(rng.standard_normal(r.shape))))
    return np.fft.ifft2(amplitude * phase).real.astype(np.float32)


def fit_calibration(encode, windows: np.ndarray, seed: int = 0, flip: bool = False,
                    reconstruct=None, order: int | None = None) -> dict[str, Any]:
    """Fit the spread calibration on ``windows`` (n, wy, wx) with ``encode`` (windows -> RVAE.encode dict).

    Each window ``a`` is paired with its copy ``b`` rotated by a known angle and moved by a
    known shift; the misses of ``b``'s angle, shift and z calibrate their spreads. The copy
    shares ``a``'s noise pixels, moved. The encoder's outputs (the angle within its rotation
    bin, the shift, z) are not equivariant to sub-bin rotations and sub-pixel shifts, so
    their misses hold their noise error already. An angle refined to the likelihood's maximum
    (``refine`` in :meth:`RVAE.encode`) is equivariant up to the interpolation: it follows the
    shared noise into the copy and the pair looks almost exact (L windows of
    tests/test_rvae.py: a floor of 0.0026 rad, 68 % intervals holding 0.44 of the true
    angles). For such angles pass ``reconstruct``: the angle is then calibrated on a third
    encoding, of ``b`` plus a fresh realisation of noise, a phase-randomised copy of ``a``'s
    residual from its own decoding (:func:`residual_surrogate`: the residual's variance and
    spatial correlation, camera noise and misfit alike) times :data:`FRESH_NOISE`, with both
    errors modelled by ``a``'s spread (the noisy copy's own counts its extra noise).
    Fresh noise is not added for the shifts and z: on ``bench/uncertainty.py`` their 68 %
    intervals then held 0.78-0.86 of the true shifts instead of 0.68.

    Parameters
    ----------
    encode : callable
        Windows -> the dict of :meth:`RVAE.encode`.
    windows : ndarray (n, wy, wx)
        A sample of the windows to calibrate for (ideally of one species).
    seed : int
        Seed of the known rotations and shifts and of the fresh noise's phases.
    flip : bool
        Also fit the temperature of ``flip_prob`` (for a species whose two ends differ, odd
        symmetry order; an even order's other end is a symmetry, not an error).
    reconstruct : callable, optional
        Windows -> each decoded at its own encoded pose and content, background included
        (``model.reconstruct``): the residual whose surrogate is the angle's fresh noise.
        Give it when ``encode`` refines the angle; None = the angle from the shared-noise pairs.
    order : int, optional
        The species' symmetry order n. For n = 1 or 2, with ``reconstruct``, the calibrated
        angle is also checked against each window's own principal axis
        (:func:`fit_moment_check`), which sees errors that a window and its copy share.

    Returns
    -------
    dict
        JSON-able: ``angle`` and ``shift`` each ``{scale, floor (rad or px), n}``; ``z`` one
        ``{scale, floor, n}`` per content latent (z must not change under a rotation or a
        shift, so its misses measure its spread); ``flip_rate``: the share of transformed
        windows whose angle missed by more than pi/2; with ``reconstruct``, ``angle_noise``: how
        the angle's fresh noise was made, its factor and its median sd (intensity); with
        ``flip``, ``flip`` = ``{temperature, n}``; with ``order`` 1 or 2 and ``reconstruct``,
        ``moment_check`` (:func:`fit_moment_check`).
    """
    rng = np.random.default_rng(seed)
    windows = np.asarray(windows, dtype=np.float32)
    n = len(windows)
    phi = rng.uniform(-math.pi, math.pi, n)
    delta = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n, 2))
    a = encode(windows)
    moved = transform_windows(windows, phi, delta)
    b = encode(moved)
    miss = _angle_miss(a, b, phi)
    same_end = np.abs(miss) <= math.pi / 2
    flips = _fit_flip_temperature(a["flip_prob"], b["flip_prob"], ~same_end) if flip and "flip_prob" in a else None
    noise = None
    if reconstruct is None:
        angle_var = a["angle_sd"] ** 2 + b["angle_sd"] ** 2
    else:
        # Its own generator: the rotations, shifts and grid-angle fit stay those without it.
        noise = FRESH_NOISE * residual_surrogate(windows - np.asarray(reconstruct(windows), dtype=np.float32),
                                                 np.random.default_rng([int(seed), 1]))
        miss = _angle_miss(a, encode(moved + noise), phi)
        # The noisy copy's own spread counts its extra noise: both errors are modelled with a's.
        angle_var = 2 * a["angle_sd"] ** 2
    if flips is not None and not flips["resolved"]:
        # The ends are not told apart: the angle is known modulo pi, and so are its misses.
        near = np.remainder(miss + math.pi / 2, math.pi) - math.pi / 2
        angle = _fit_variance(near, angle_var)
    else:
        keep = np.abs(miss) <= math.pi / 2
        angle = _fit_variance(miss[keep], angle_var[keep])
    c, s = np.cos(phi), np.sin(phi)
    want_x = c * a["dx"] - s * a["dy"] + delta[:, 0]
    want_y = s * a["dx"] + c * a["dy"] + delta[:, 1]
    # A's shift error is rotated into B's frame; its variance is that of the rotated pair of sds.
    var_ax = (c * a["dx_sd"]) ** 2 + (s * a["dy_sd"]) ** 2
    var_ay = (s * a["dx_sd"]) ** 2 + (c * a["dy_sd"]) ** 2
    shift = _fit_variance(np.concatenate([b["dx"] - want_x, b["dy"] - want_y]),
                          np.concatenate([var_ax + b["dx_sd"] ** 2, var_ay + b["dy_sd"] ** 2]))
    out = {"method": "self-consistency under known rotations and shifts", "angle": angle, "shift": shift,
           "flip_rate": float(1 - same_end.mean()), "n_windows": int(n), "seed": int(seed)}
    if noise is not None:
        out["angle_noise"] = {"source": "phase-randomised residual of the window's own decoding",
                              "factor": FRESH_NOISE,
                              "median_sd": float(np.median(noise.reshape(n, -1).std(1))) if n else float("nan")}
    if "z" in a and np.ndim(a["z"]) == 2:
        out["z"] = [_fit_variance(b["z"][:, j] - a["z"][:, j], a["z_sd"][:, j] ** 2 + b["z_sd"][:, j] ** 2)
                    for j in range(np.shape(a["z"])[1])]
    if flips is not None:
        out["flip"] = flips
    if noise is not None and order in (1, 2):
        out["moment_check"] = fit_moment_check(windows, moved + noise, phi, a["angle"],
                                               apply_calibration({"angle_sd": a["angle_sd"]}, {"angle": angle})["angle_sd"])
    return out


#: Radius (px) about the window centre within which a window's own principal axis is measured
#: (:func:`moment_axis`): on the simulated windows of bench/uncertainty.py (32 px) the axis within
#: 8 px agrees with the true axis at 0.99 (rod) and 0.84-0.91 (tadpole), neighbours mostly outside.
MOMENT_RADIUS = 8.0


def moment_axis(windows: np.ndarray, radius: float = MOMENT_RADIUS) -> np.ndarray:
    """Principal axis (rad, modulo pi, from +x towards +y) of each window's second moments within ``radius`` px of its centre.

    The weights are ``|window - its median|`` (bright and dark particles alike).
    """
    w = np.asarray(windows, dtype=np.float64)
    n, h, v = w.shape
    yy, xx = np.mgrid[:h, :v]
    yy, xx = yy - (h - 1) / 2, xx - (v - 1) / 2
    weight = np.abs(w - np.median(w.reshape(n, -1), axis=1)[:, None, None]) * ((xx ** 2 + yy ** 2) <= radius ** 2)
    mass = weight.sum((1, 2)) + 1e-12
    cx, cy = (weight * xx).sum((1, 2)) / mass, (weight * yy).sum((1, 2)) / mass
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    sxx, syy = (weight * dx ** 2).sum((1, 2)) / mass, (weight * dy ** 2).sum((1, 2)) / mass
    sxy = (weight * dx * dy).sum((1, 2)) / mass
    return 0.5 * np.arctan2(2 * sxy, sxx - syy)


def fit_moment_check(windows: np.ndarray, copies: np.ndarray, phi: np.ndarray, angle: np.ndarray,
                     angle_sd: np.ndarray) -> dict[str, Any]:
    """Extra angle floor (rad) for a species whose angle disagrees with its windows' own principal axes.

    A window and its transformed copy share what decides a poorly learned template's angle, so
    the self-consistency pairs cannot see that error; the principal axis of the window's own
    second moments (:func:`moment_axis`) is an estimate that shares nothing with the model. Its
    disagreement ``d`` with the angle (modulo pi, after the best sense and offset between the
    two) has the variance of both errors, ``sd^2 + sd_moments^2``. The floor ``f_d`` that makes
    ``sqrt(angle_sd^2 + f_d^2)`` cover ``d`` at 68 % and 95 % is fitted, and the moment axis's
    own error variance, measured on the same windows and their rotated, freshly noised
    ``copies`` (half the variance of its misses), is taken off it:
    ``floor^2 = max(0, f_d^2 - sd_moments^2)``. A species whose angle is as good as its
    calibrated spread says gets no floor; ``worse_than_moments`` flags one whose angle
    disagrees with its moments by more than either's error explains.

    Parameters
    ----------
    windows, copies : ndarray (n, wy, wx)
        The calibration windows and their copies turned by ``phi`` (rad), moved and noised.
    angle : ndarray (n,)
        The windows' encoded angles (rad; any constant offset and sense).
    angle_sd : ndarray (n,)
        Their self-consistency spreads (rad).

    Returns
    -------
    dict
        ``floor`` (rad; added in quadrature to ``angle_sd`` by :func:`apply_calibration`),
        ``disagreement_floor`` (f_d), ``moment_sd`` (rad), ``consistency`` (resultant of
        ``2 d`` in [0, 1]), ``worse_than_moments``, ``n``.
    """
    axis = moment_axis(windows)
    angle = np.asarray(angle, dtype=np.float64)
    sd = np.asarray(angle_sd, dtype=np.float64)
    best = max(((np.mean(np.exp(2j * (axis - s * angle))), s) for s in (1, -1)), key=lambda m: abs(m[0]))
    m, sense = best
    d = np.remainder(axis - sense * angle - np.angle(m) / 2 + math.pi / 2, math.pi) - math.pi / 2
    own = np.remainder(moment_axis(copies) - axis - phi + math.pi / 2, math.pi) - math.pi / 2
    moment_sd = float(np.sqrt(np.mean(own ** 2) / 2)) if own.size else 0.0
    ok = np.isfinite(d) & np.isfinite(sd)
    floors = np.concatenate([[0.0], np.geomspace(1e-3, math.pi / 2, 121)])
    spread = np.sqrt(sd[ok][None] ** 2 + floors[:, None] ** 2)
    worst = np.max([np.abs((np.abs(d[ok])[None] <= k * spread).mean(1) - c) for c, k in NOMINAL], axis=0)
    f_d = float(floors[int(np.argmin(worst))]) if ok.sum() >= 10 else 0.0
    floor = math.sqrt(max(0.0, f_d ** 2 - moment_sd ** 2))
    return {"floor": floor, "disagreement_floor": f_d, "moment_sd": moment_sd, "consistency": float(abs(m)),
            "worse_than_moments": bool(floor > 0), "n": int(ok.sum()), "radius_px": MOMENT_RADIUS}


def _angle_miss(a: dict[str, np.ndarray], b: dict[str, np.ndarray], phi: np.ndarray) -> np.ndarray:
    """How far (rad, in [-pi, pi)) copy b's angle is from a's turned by the known ``phi``."""
    return np.remainder(b["angle"] - a["angle"] - phi + math.pi, 2 * math.pi) - math.pi


def _fit_flip_platt(flip: np.ndarray, flipped: np.ndarray) -> dict[str, Any]:
    """Temperature and bias of ``flip' = sigmoid(logit(flip) / T + bias)`` that best predict the observed flips.

    Platt scaling of the reported ``flip_prob`` against windows whose end is known (truth):
    the two parameters maximise the likelihood of ``flipped`` (error beyond pi/2). The bias
    carries a flip rate the model does not see at all (a posterior sure of the wrong end).
    """
    from scipy.optimize import minimize

    f = np.clip(np.nan_to_num(np.asarray(flip, float), nan=0.5), 1e-6, 1 - 1e-6)
    y = np.asarray(flipped, bool)
    if y.size < 10:
        return {"temperature": 1.0, "bias": 0.0, "n": int(y.size), "resolved": True}
    logit = np.log(f / (1 - f))

    def nll(p):
        u = logit * p[0] + p[1]
        return float(np.sum(np.logaddexp(0.0, u) - y * u))

    fit = minimize(nll, x0=np.array([1.0, 0.0]), method="Nelder-Mead")
    slope = float(np.clip(fit.x[0], 1e-3, 1e3))
    return {"temperature": 1.0 / slope, "bias": float(fit.x[1]), "n": int(y.size), "flip_rate": float(y.mean()),
            "resolved": True}


def fit_error_calibration(errors: dict[str, np.ndarray], encoded: dict[str, np.ndarray], order: int) -> dict[str, Any]:
    """Calibration of one species fitted on windows whose true pose is known (held-out simulated windows).

    Unlike :func:`fit_calibration` (self-consistency, no truth), this sees every error,
    including those a window and its rotated copy share (a template that fits the particle a
    little turned or off-centre). Per quantity (angle, dx, dy) a quantile map ``(scale, floor, dof)`` is fitted
    (:func:`_fit_variance` with ``tails``, ``copies`` = 1) so that the intervals of the
    calibrated spreads hold 68 % and 95 % of the errors; for a species whose ends differ
    (odd ``order``) ``flip_prob`` is first Platt-scaled to the observed flips
    (:func:`_fit_flip_platt`) and the angle's quantile map is fitted to the two-branch interval
    (:func:`angle_inside`), so a flip the calibrated ``flip_prob`` expects counts as covered.

    Parameters
    ----------
    errors : dict
        ``angle`` (true - reported, rad, in the lab frame of the reported angle), ``dx``,
        ``dy`` (true - reported, px), per window.
    encoded : dict
        The windows' :meth:`RVAE.encode` outputs (``angle_sd``, ``flip_prob``, ``dx_sd``, ``dy_sd``).
    order : int
        Symmetry order n of the species: the angle error is taken modulo ``2 pi / n``.

    Returns
    -------
    dict
        In the layout of :func:`fit_calibration` (``angle``, optional ``flip``), with ``dx``
        and ``dy`` each their own map in place of the shared ``shift``, ``dof`` in each,
        and ``method`` naming the fit. :func:`apply_calibration` then also writes
        ``angle_dof``, ``dx_dof``, ``dy_dof``.
    """
    n = max(int(order), 1)
    period = 2 * math.pi / n
    err = np.remainder(np.asarray(errors["angle"], float) + period / 2, period) - period / 2
    sd = np.asarray(encoded["angle_sd"], float)
    out: dict[str, Any] = {"method": "quantile map fitted to known errors (held-out simulated windows)",
                           "n_windows": int(err.size)}
    if n % 2 == 1 and "flip_prob" in encoded:
        flipped = np.abs(err) > math.pi / 2
        out["flip"] = _fit_flip_platt(encoded["flip_prob"], flipped)
        flip = apply_calibration({"flip_prob": encoded["flip_prob"]}, {"flip": out["flip"]})["flip_prob"]
        out["angle"] = _fit_angle_branches(err, sd, flip)
    else:
        out["angle"] = _fit_variance(err, sd ** 2, tails=True, copies=1)
    # Each axis its own map: a scanning microscope's line artefacts move rows, not columns.
    for axis in ("dx", "dy"):
        out[axis] = _fit_variance(errors[axis], np.asarray(encoded[f"{axis}_sd"], float) ** 2, tails=True, copies=1)
    return out


def _fit_angle_branches(err: np.ndarray, sd: np.ndarray, flip: np.ndarray) -> dict[str, float]:
    """(scale, floor, dof) of the two-branch angle interval (:func:`angle_inside`) that covers ``err`` at 68 % and 95 %."""
    ok = np.isfinite(err) & np.isfinite(sd)
    err, sd, flip = err[ok], sd[ok], np.asarray(flip, float)[ok]
    if err.size < 10:
        return {"scale": 1.0, "floor": 0.0, "dof": math.inf, "n": int(err.size)}
    # The spread's size from the errors on the reported end (the flips are the other branch).
    near = np.abs(err) <= math.pi / 2
    rms = float(np.sqrt(np.mean(err[near] ** 2))) + 1e-12 if near.any() else 1.0
    typical = float(np.median(sd)) + 1e-12
    scales = np.concatenate([[0.0], np.geomspace(1e-2, 1e2, 31) * rms / typical])
    floors = np.concatenate([[0.0], np.geomspace(1e-2, 3.0, 31) * rms])
    best = (np.inf, 1.0, 0.0, math.inf)
    for dof in (math.inf, *TAIL_DOFS):
        margin = 0.0 if math.isinf(dof) else TAIL_MARGIN
        for scale in scales:
            spread = np.sqrt((scale * sd[None]) ** 2 + floors[:, None] ** 2)     # (floors, n)
            mass = angle_interval_mass(np.broadcast_to(err, spread.shape), spread, np.broadcast_to(flip, spread.shape), dof)
            worst = np.max([np.abs((mass <= c).mean(1) - c) for c, _ in NOMINAL], axis=0)
            i = int(np.argmin(worst))
            if worst[i] + margin < best[0]:
                best = (float(worst[i]), float(scale), float(floors[i]), float(dof))
    return {"scale": best[1], "floor": best[2], "dof": best[3], "n": int(err.size), "coverage_error": best[0]}


def apply_calibration(out: dict[str, np.ndarray], calibration: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """``out`` (an encode dict) with ``angle_sd``, ``dx_sd``, ``dy_sd``, ``z_sd`` (and ``flip_prob``) calibrated."""
    if not calibration:
        return out
    out = dict(out)

    def scaled(raw, p):
        raw = np.asarray(raw, dtype=np.float64)
        return np.sqrt((p["scale"] * raw) ** 2 + p["floor"] ** 2).astype(np.float32)

    for quantity, keys in (("angle", ("angle",)), ("dx", ("dx", "shift")), ("dy", ("dy", "shift"))):
        # A map of its own (dx, dy of fit_error_calibration) or the shared one (shift).
        p = next((calibration[k] for k in keys if k in calibration), None)
        if p is None or f"{quantity}_sd" not in out:
            continue
        out[f"{quantity}_sd"] = scaled(out[f"{quantity}_sd"], p)
        if "dof" in p:
            # The spread is the scale of a Student t: intervals are +/- interval_factor(c, dof) * sd.
            out[f"{quantity}_dof"] = np.full(np.shape(out[f"{quantity}_sd"]), p["dof"], dtype=np.float32)
    if "moment_check" in calibration and "angle_sd" in out:
        # The error the pairs share and the window's own principal axis sees (fit_moment_check).
        extra = float(calibration["moment_check"]["floor"])
        out["angle_sd"] = np.sqrt(np.asarray(out["angle_sd"], np.float64) ** 2 + extra ** 2).astype(np.float32)
    if "z" in calibration and "z_sd" in out:
        z_sd = np.array(out["z_sd"], dtype=np.float32, copy=True)
        for j, p in enumerate(calibration["z"]):
            z_sd[..., j] = scaled(z_sd[..., j], p)
        out["z_sd"] = z_sd
    if "flip" in calibration and "flip_prob" in out:
        f = np.clip(np.asarray(out["flip_prob"], dtype=np.float64), 1e-6, 1 - 1e-6)
        t = float(calibration["flip"]["temperature"])
        bias = float(calibration["flip"].get("bias", 0.0))
        tempered = (1 / (1 + np.exp(-(np.log(f / (1 - f)) / t + bias)))
                    if calibration["flip"].get("resolved", True) else 0.5)
        out["flip_prob"] = np.where(np.isfinite(f), tempered, np.nan).astype(np.float32)
    return out


def _branch(dof: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per window: whether its branch is a t (finite dof), the dof used by scipy, and the standard density at 0."""
    dof = np.asarray(dof, dtype=float)
    is_t = np.isfinite(dof)
    nu = np.where(is_t, dof, 1.0)
    return is_t, nu, np.where(is_t, student_t.pdf(0.0, nu), norm.pdf(0.0))


def angle_interval_mass(err: np.ndarray, sd: np.ndarray, flip: np.ndarray | None = None,
                        dof: float | np.ndarray = math.inf) -> np.ndarray:
    """Posterior mass of the smallest angle interval that reaches the error ``err`` (rad).

    The angle's posterior is read as the mixture ``(1 - flip) T(angle, sd) + flip T(angle + pi, sd)``
    (the reported angle and its other end), T a Student t of ``dof`` degrees of freedom and
    scale ``sd`` (a normal when ``dof`` is inf). The true angle lies inside the reported
    c-interval (the highest-density set of mass c, which holds the flip branch once ``flip``
    is large enough) exactly when this mass is at most c. The two branches are treated as
    separate (valid while ``sd`` is well below pi/2).

    Parameters
    ----------
    err : ndarray
        True angle minus reported angle, rad (any wrapping; it is wrapped to [-pi, pi)).
    sd : ndarray
        ``angle_sd``, rad (> 0).
    flip : ndarray, optional
        ``flip_prob`` in [0, 1]; None or NaN = 0 (no flip branch, e.g. an n-fold species whose
        error is already taken modulo 2 pi / n).
    dof : float or ndarray
        Degrees of freedom of the error's t (``angle_dof`` of the calibration; inf = normal).

    Returns
    -------
    ndarray
        Mass in [0, 1] per window.
    """
    err = np.remainder(np.asarray(err, float) + math.pi, 2 * math.pi) - math.pi
    sd = np.maximum(np.asarray(sd, float), 1e-12)
    f = np.zeros_like(err) if flip is None else np.clip(np.nan_to_num(np.asarray(flip, float)), 0.0, 1.0)
    is_t, nu, peak = (np.broadcast_to(v, err.shape) for v in _branch(dof))

    def pdf(x):
        return np.where(is_t, student_t.pdf(x, nu), norm.pdf(x))

    def cdf(x):
        return np.where(is_t, student_t.cdf(x, nu), norm.cdf(x))

    other = np.remainder(err, 2 * math.pi) - math.pi            # distance from angle + pi
    weights = (1.0 - f, f)
    density = sum(w * pdf(u / sd) / sd for w, u in zip(weights, (err, other)))
    mass = np.zeros_like(err)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for w in weights:
            # Where this branch alone is denser than at the error: |u| <= k sd, with
            # pdf(k) = pdf(0) / ratio (normal: k^2 = 2 log ratio; t: k^2 = nu (ratio^(2/(nu+1)) - 1)).
            ratio = np.maximum(np.divide(w * peak, sd * density, out=np.zeros_like(err), where=density > 0), 1.0)
            k = np.where(is_t, np.sqrt(nu * (ratio ** (2.0 / (nu + 1.0)) - 1.0)), np.sqrt(2 * np.log(ratio)))
            k = np.nan_to_num(k, nan=0.0, posinf=np.inf)
            mass += w * (2 * cdf(k) - 1)
    return np.where(density > 0, mass, 1.0)


def angle_inside(err: np.ndarray, sd: np.ndarray, flip: np.ndarray | None, level: float,
                 dof: float | np.ndarray = math.inf) -> np.ndarray:
    """Whether the true angle lies in the reported ``level`` interval (see :func:`angle_interval_mass`)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return angle_interval_mass(err, sd, flip, dof) <= level

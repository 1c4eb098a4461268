"""Calibration of the per-window spreads (angle, dx, dy) by self-consistency under known transforms.

The model's own spreads (the rotation posterior plus the likelihood's curvature, see
:meth:`RVAE.encode`) count the pixel noise, but not how far the encoder's point estimates
stray from the best pose; that is most of the actual error. Truth is unknown on real data, but
a window rotated by a known angle ``phi`` and moved by a known ``delta`` must encode to the
angle + ``phi`` and to the shift rotated by ``phi`` plus ``delta``: the misses over a sample of
windows measure the encoding error. Per quantity a variance model

    sd^2 = (scale * sd_model)^2 + floor^2

is fitted so that the intervals of the misses (each has the variance of two windows) hold
68 % and 95 % of them.
Misses beyond pi/2 in angle are the other end of the particle (or a symmetry), counted by
``flip_prob``, and are left out of the angle fit; for a species whose ends differ they
calibrate ``flip_prob`` itself (a temperature on its log-odds; 0.5, the angle stated modulo pi, when
more than :data:`POLARITY_DISAGREEMENT` of the pairs disagree on the end). ``z`` must not change at all
under these transforms, so its misses calibrate ``z_sd`` the same way. Fitted per species
by ``encode`` (each species' windows have their own error).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage
from scipy.stats import norm

if TYPE_CHECKING:  # torch is imported where the spreads are computed
    import torch

#: Largest known shift of a calibration window, px.
MAX_SHIFT = 1.0
#: The nominal coverages the calibration matches and their normal quantiles.
NOMINAL = ((0.68, 0.994458), (0.95, 1.959964))
#: Largest share of (window, rotated copy) pairs that may disagree on a species' end for its
#: polarity to count as resolved. Above it (more than about 5 % of windows on the wrong end,
#: and flips that both copies share are not even seen) ``flip_prob`` is set to 0.5: the angle is
#: stated modulo pi, its interval holds both ends.
POLARITY_DISAGREEMENT = 0.10
#: Largest pixel lag (px, each axis) of the residual's autocovariance in :func:`pose_covariance`.
#: The misfit of a decoded template is smooth over about the blur of the particle's edge; on the
#: simulated demo the spreads stop growing beyond a lag of 3 px.
RESIDUAL_LAGS = 4


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
    # Direct sums over the (2 max_lag + 1)^2 lags and one depthwise convolution: about a fifth
    # of the time of the zero-padded FFTs of every Jacobian pair they replace (which were two
    # thirds of the encoding time), the same sums up to rounding.
    def overlap(lag, size):   # rows q with q + lag inside the window, and those q + lag
        return slice(max(0, -lag), min(size, size - lag)), slice(max(0, lag), min(size, size + lag))

    n_lags = 2 * max_lag + 1
    full = bool((mask == 1).all())
    autocov = torch.empty(b, n_lags, n_lags, device=jac.device, dtype=jac.dtype)
    for i, dr in enumerate(range(-max_lag, max_lag + 1)):
        q_r, s_r = overlap(dr, h)
        for k, dc in enumerate(range(-max_lag, max_lag + 1)):
            q_c, s_c = overlap(dc, w)
            if full:
                pairs = float(max(1, (h - abs(dr)) * (w - abs(dc))))
            else:
                pairs = (mask[:, s_r, s_c] * mask[:, q_r, q_c]).sum((1, 2)).clamp(min=1.0)
            autocov[:, i, k] = (resid[:, s_r, s_c] * resid[:, q_r, q_c]).sum((1, 2)) / pairs
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


def _fit_variance(miss: np.ndarray, model_var: np.ndarray) -> dict[str, float]:
    """(scale, floor) whose intervals cover the misses at the nominal 68 % and 95 %.

    Each miss has the variance ``scale^2 model_var + 2 floor^2`` (two windows); the pair is
    chosen on a grid to minimise the larger of the two coverage errors (the misses have
    heavier tails than a normal, so a likelihood fit under-covers at 68 %).
    """
    miss, model_var = np.abs(np.asarray(miss, float)), np.asarray(model_var, float)
    ok = np.isfinite(miss) & np.isfinite(model_var)
    miss, model_var = miss[ok], model_var[ok]
    if miss.size < 10:
        return {"scale": 1.0, "floor": 0.0, "n": int(miss.size)}
    rms = float(np.sqrt(np.mean(miss ** 2))) + 1e-12
    typical = float(np.sqrt(np.median(model_var))) + 1e-12
    scales = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 61) * rms / typical])
    floors = np.concatenate([[0.0], np.geomspace(1e-3, 3.0, 61) * rms])
    best = (np.inf, 1.0, 0.0)
    for scale in scales:
        sd = np.sqrt(scale ** 2 * model_var[None] + 2 * floors[:, None] ** 2)    # (floors, n)
        worst = np.max([np.abs((miss[None] <= z * sd).mean(1) - c) for c, z in NOMINAL], axis=0)
        i = int(np.argmin(worst))
        if worst[i] < best[0]:
            best = (float(worst[i]), float(scale), float(floors[i]))
    return {"scale": best[1], "floor": best[2], "n": int(miss.size), "pair_coverage_error": best[0]}


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


def fit_calibration(encode, windows: np.ndarray, seed: int = 0, flip: bool = False) -> dict[str, Any]:
    """Fit the spread calibration on ``windows`` (n, wy, wx) with ``encode`` (windows -> RVAE.encode dict).

    Parameters
    ----------
    encode : callable
        Windows -> the dict of :meth:`RVAE.encode`.
    windows : ndarray (n, wy, wx)
        A sample of the windows to calibrate for (ideally of one species).
    seed : int
        Seed of the known rotations and shifts.
    flip : bool
        Also fit the temperature of ``flip_prob`` (for a species whose two ends differ, odd
        symmetry order; an even order's other end is a symmetry, not an error).

    Returns
    -------
    dict
        JSON-able: ``angle`` and ``shift`` each ``{scale, floor (rad or px), n}``; ``z`` one
        ``{scale, floor, n}`` per content latent (z must not change under a rotation or a
        shift, so its misses measure its spread); ``flip_rate``: the share of transformed
        windows whose angle missed by more than pi/2; with ``flip``, ``flip`` =
        ``{temperature, n}``.
    """
    rng = np.random.default_rng(seed)
    n = len(windows)
    phi = rng.uniform(-math.pi, math.pi, n)
    delta = rng.uniform(-MAX_SHIFT, MAX_SHIFT, (n, 2))
    a = encode(windows)
    b = encode(transform_windows(windows, phi, delta))
    miss = np.remainder(b["angle"] - a["angle"] - phi + math.pi, 2 * math.pi) - math.pi
    same_end = np.abs(miss) <= math.pi / 2
    flips = _fit_flip_temperature(a["flip_prob"], b["flip_prob"], ~same_end) if flip and "flip_prob" in a else None
    if flips is not None and not flips["resolved"]:
        # The ends are not told apart: the angle is known modulo pi, and so are its misses.
        near = np.remainder(miss + math.pi / 2, math.pi) - math.pi / 2
        angle = _fit_variance(near, a["angle_sd"] ** 2 + b["angle_sd"] ** 2)
    else:
        angle = _fit_variance(miss[same_end], a["angle_sd"][same_end] ** 2 + b["angle_sd"][same_end] ** 2)
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
    if "z" in a and np.ndim(a["z"]) == 2:
        out["z"] = [_fit_variance(b["z"][:, j] - a["z"][:, j], a["z_sd"][:, j] ** 2 + b["z_sd"][:, j] ** 2)
                    for j in range(np.shape(a["z"])[1])]
    if flips is not None:
        out["flip"] = flips
    return out


def apply_calibration(out: dict[str, np.ndarray], calibration: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """``out`` (an encode dict) with ``angle_sd``, ``dx_sd``, ``dy_sd``, ``z_sd`` (and ``flip_prob``) calibrated."""
    if not calibration:
        return out
    out = dict(out)

    def scaled(raw, p):
        raw = np.asarray(raw, dtype=np.float64)
        return np.sqrt((p["scale"] * raw) ** 2 + p["floor"] ** 2).astype(np.float32)

    for names, key in ((("angle_sd",), "angle"), (("dx_sd", "dy_sd"), "shift")):
        for name in names:
            if name in out:
                out[name] = scaled(out[name], calibration[key])
    if "z" in calibration and "z_sd" in out:
        z_sd = np.array(out["z_sd"], dtype=np.float32, copy=True)
        for j, p in enumerate(calibration["z"]):
            z_sd[..., j] = scaled(z_sd[..., j], p)
        out["z_sd"] = z_sd
    if "flip" in calibration and "flip_prob" in out:
        f = np.clip(np.asarray(out["flip_prob"], dtype=np.float64), 1e-6, 1 - 1e-6)
        t = float(calibration["flip"]["temperature"])
        tempered = 1 / (1 + np.exp(-np.log(f / (1 - f)) / t)) if calibration["flip"].get("resolved", True) else 0.5
        out["flip_prob"] = np.where(np.isfinite(f), tempered, np.nan).astype(np.float32)
    return out


def angle_interval_mass(err: np.ndarray, sd: np.ndarray, flip: np.ndarray | None = None) -> np.ndarray:
    """Posterior mass of the smallest angle interval that reaches the error ``err`` (rad).

    The angle's posterior is read as the mixture ``(1 - flip) N(angle, sd) + flip N(angle + pi, sd)``
    (the reported angle and its other end). The true angle lies inside the reported c-interval
    (the highest-density set of mass c, which holds the flip branch once ``flip`` is large
    enough) exactly when this mass is at most c. The two branches are treated as separate
    (valid while ``sd`` is well below pi/2).

    Parameters
    ----------
    err : ndarray
        True angle minus reported angle, rad (any wrapping; it is wrapped to [-pi, pi)).
    sd : ndarray
        ``angle_sd``, rad (> 0).
    flip : ndarray, optional
        ``flip_prob`` in [0, 1]; None or NaN = 0 (no flip branch, e.g. an n-fold species whose
        error is already taken modulo 2 pi / n).

    Returns
    -------
    ndarray
        Mass in [0, 1] per window.
    """
    err = np.remainder(np.asarray(err, float) + math.pi, 2 * math.pi) - math.pi
    sd = np.maximum(np.asarray(sd, float), 1e-12)
    f = np.zeros_like(err) if flip is None else np.clip(np.nan_to_num(np.asarray(flip, float)), 0.0, 1.0)
    other = np.remainder(err, 2 * math.pi) - math.pi            # distance from angle + pi
    weights = (1.0 - f, f)
    density = sum(w * norm.pdf(u / sd) / sd for w, u in zip(weights, (err, other)))
    mass = np.zeros_like(err)
    for w in weights:
        # Where this branch alone is denser than at the error: |u| <= k sd.
        ratio = np.divide(w, sd * math.sqrt(2 * math.pi) * density, out=np.zeros_like(err), where=density > 0)
        k = np.sqrt(2 * np.log(np.maximum(ratio, 1.0)))
        mass += w * (2 * norm.cdf(k) - 1)
    return np.where(density > 0, mass, 1.0)


def angle_inside(err: np.ndarray, sd: np.ndarray, flip: np.ndarray | None, level: float) -> np.ndarray:
    """Whether the true angle lies in the reported ``level`` interval (see :func:`angle_interval_mass`)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return angle_interval_mass(err, sd, flip) <= level

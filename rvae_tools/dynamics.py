"""Ensemble time dynamics, order parameters, rotational dynamics and the ordering transition.

Reads the per-trajectory latents (``latents.zarr``) and the trajectories
(``tracks.parquet``) of one movie and writes ``dynamics.zarr``: per-frame ensemble
statistics on a ``frame`` dimension (with a ``time`` coordinate in seconds), per-trajectory
rotational and translational dynamics, and the estimated ordering-transition frame with its
bootstrap interval in the store's attributes.

Angles
------
The rVAE's angle has an arbitrary constant offset (and possibly a sign flip) relative to the
lab frame, and a particle with ``n``-fold symmetry has an angle defined only modulo
``2*pi/n``. Every quantity that is fitted here is invariant to both: order parameters
``S_m = |<exp(i m theta)>|``, local ``S_m``, rotational MSD (differences of unwrapped angles),
jump sizes (absolute values). The mean direction is reported but is only defined up to that
offset.

Species
-------
Each trajectory belongs to one species with a symmetry order ``n`` (2 for rods). With one
species (``dynamics.species`` empty) every particle has ``n = dynamics.symmetry``. With
several, the species of a trajectory is taken from a ``cls(particle)`` variable of the latents
(or the majority ``cls`` of its rows in ``tracks.parquet``), matching a species' ``cls`` value
or else its position in the list; without any class information the trajectories are
clustered on their mean content latent ``z`` by a Gaussian mixture with one component per
species, and components are matched to the listed species in order of increasing mean
``z[0]`` (list species in that order).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from scipy import optimize, spatial
from scipy.special import expit

from .config import add_settings_arguments, settings_from_args
from .errors import InputError
from .io import open_zarr, read_table, write_zarr
from .provenance import provenance_attrs

log = logging.getLogger(__name__)

#: Per-frame signals a transition can be fitted to (``dynamics.transition_signal``).
SIGNALS = ("S_n", "S_6", "local_S_n", "psi_6", "local_psi_6", "S_n_moments", "S_6_moments")

#: Angle-derived signals among which ``transition_signal: auto`` picks the clearest step.
AUTO_SIGNALS = ("S_n", "S_6")

#: Classical signals among which ``classical_signal: auto`` picks: the image-moment
#: orientation of the detections, else the bond order of the centroids.
CLASSICAL_SIGNALS = ("S_n_moments", "S_6_moments", "psi_6")


# --------------------------------------------------------------------------- angle statistics


def order_parameter(theta: np.ndarray, m: int | np.ndarray, axis: int | None = None) -> np.ndarray:
    """Orientational order ``S_m = |<exp(i m theta)>|``, ignoring NaN.

    Parameters
    ----------
    theta : array
        Angles in radians (NaN = absent).
    m : int or array broadcastable to ``theta``
        Order (2 = nematic, 3 = triatic, 6 = hexatic/registry).
    axis : int, optional
        Axis to average over (all by default).

    Returns
    -------
    array
        Dimensionless, in [0, 1]; NaN where no angle is present. Invariant to a constant
        offset and a sign flip of ``theta``. For N independent uniform angles its expectation
        is about ``sqrt(pi / (4 N))``.
    """
    u = np.exp(1j * np.asarray(m) * np.asarray(theta, dtype=float))
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(theta)
        total = np.where(valid, u, 0).sum(axis=axis)
        count = valid.sum(axis=axis)
        return np.where(count > 0, np.abs(total) / np.maximum(count, 1), np.nan)


def mean_direction(theta: np.ndarray, n: int, axis: int | None = None) -> np.ndarray:
    """Circular mean direction of ``n``-fold symmetric axes, in [0, 2*pi/n) radians (NaN-aware)."""
    u = np.exp(1j * n * np.asarray(theta, dtype=float))
    total = np.where(np.isfinite(theta), u, 0).sum(axis=axis)
    return np.mod(np.angle(total), 2 * np.pi) / n


def wrap_symmetric(dtheta: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Wrap angle differences into ``[-pi/n, pi/n)`` (the smallest rotation between n-fold axes)."""
    period = 2 * np.pi / np.asarray(n, dtype=float)
    return np.mod(dtheta + period / 2, period) - period / 2


def unwrap_angles(theta: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Unwrap angle series along the last axis, respecting n-fold symmetry.

    A jump of a multiple of ``2*pi/n`` between consecutive observations is the same
    orientation and is removed; absent frames (NaN) are skipped, so a step across a gap is
    taken as the smallest equivalent rotation.

    Parameters
    ----------
    theta : array (..., frame)
        Angles in radians, NaN where absent.
    n : int or array of shape ``theta.shape[:-1]``
        Symmetry order of each series.

    Returns
    -------
    array
        Continuous angles (radians), NaN where ``theta`` is NaN; the first valid value of
        each series is kept as is.
    """
    theta = np.asarray(theta, dtype=float)
    flat = theta.reshape(-1, theta.shape[-1])
    ns = np.broadcast_to(np.asarray(n), theta.shape[:-1]).reshape(-1)
    out = np.full_like(flat, np.nan)
    for k, row in enumerate(flat):
        valid = np.isfinite(row)
        if not valid.any():
            continue
        vals = row[valid]
        steps = wrap_symmetric(np.diff(vals), ns[k])
        out[k, valid] = vals[0] + np.concatenate([[0.0], np.cumsum(steps)])
    return out.reshape(theta.shape)


# --------------------------------------------------------------------------- neighbours, psi_k, g(r)


def delaunay_bonds(xy: np.ndarray, cutoff_factor: float = 1.5) -> np.ndarray:
    """Neighbour bonds of one frame from the Delaunay triangulation (the Voronoi dual).

    Bonds longer than ``cutoff_factor`` times the median bond length are dropped: they
    span the concave border of the field of view or holes, not real neighbours.

    Parameters
    ----------
    xy : array (N, 2)
        Positions in pixels.
    cutoff_factor : float
        Maximum bond length as a multiple of the median Delaunay bond length.

    Returns
    -------
    array (B, 2) of int
        Index pairs ``i < j``; empty when fewer than 3 non-collinear points.
    """
    xy = np.asarray(xy, dtype=float)
    if len(xy) < 3:
        return np.empty((0, 2), dtype=int)
    try:
        tri = spatial.Delaunay(xy)
    except (spatial.QhullError, ValueError):
        return np.empty((0, 2), dtype=int)
    s = tri.simplices
    edges = np.concatenate([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]])
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    length = np.linalg.norm(xy[edges[:, 0]] - xy[edges[:, 1]], axis=1)
    return edges[length <= cutoff_factor * np.median(length)]


def bond_order(xy: np.ndarray, bonds: np.ndarray, k: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Local bond-orientational order ``psi_k(i) = <exp(i k phi_ij)>_j`` over the bonded neighbours.

    Returns
    -------
    psi : complex array (N,)
        NaN for particles without neighbours. ``|psi|`` is the local order; the global order
        is ``|mean_i psi(i)|``. A perfect triangular lattice gives 1 for k = 6.
    count : int array (N,)
        Number of neighbours of each particle.
    """
    n = len(xy)
    i, j = bonds[:, 0], bonds[:, 1]
    d = xy[j] - xy[i]
    phi = np.arctan2(d[:, 1], d[:, 0])
    u = np.exp(1j * k * phi)  # the reverse bond has phi + pi: same value for even k
    u_rev = np.exp(1j * k * (phi + np.pi))
    total = np.zeros(n, dtype=complex)
    np.add.at(total, i, u)
    np.add.at(total, j, u_rev)
    count = np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        psi = np.where(count > 0, total / np.maximum(count, 1), np.nan + 0j)
    return psi, count


def local_order(theta: np.ndarray, m: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """Local orientational order ``|<exp(i m theta)>|`` over each particle and its bonded neighbours.

    Each particle uses its own order ``m`` for itself and its neighbours' angles.
    """
    n = len(theta)
    i, j = bonds[:, 0], bonds[:, 1]
    total = np.exp(1j * m * theta)
    np.add.at(total, i, np.exp(1j * m[i] * theta[j]))
    np.add.at(total, j, np.exp(1j * m[j] * theta[i]))
    count = 1 + np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    return np.abs(total) / count


def _circle_fraction_inside(xy: np.ndarray, r: np.ndarray, box: tuple[float, float, float, float],
                            n_angles: int = 72) -> np.ndarray:
    """Fraction of each circle (centre xy[i], radius r[k]) inside the box: shape (N, K)."""
    x0, x1, y0, y1 = box
    a = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    px = xy[:, 0, None, None] + r[None, :, None] * np.cos(a)
    py = xy[:, 1, None, None] + r[None, :, None] * np.sin(a)
    inside = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
    return inside.mean(axis=2)


def pair_correlation(xy: np.ndarray, r_edges: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Radial distribution function g(r) of one frame in a bounded (non-periodic) field.

    Edge-corrected: each particle's shell is normalised by the fraction of the shell's
    circle that lies inside the field of view.

    Parameters
    ----------
    xy : array (N, 2)
        Positions in pixels.
    r_edges : array (K + 1,)
        Bin edges in pixels.
    box : (x0, x1, y0, y1)
        Field of view in pixels.

    Returns
    -------
    array (K,)
        g(r), dimensionless; 1 for an ideal gas, NaN when fewer than 2 particles.
    """
    xy = np.asarray(xy, dtype=float)
    n = len(xy)
    if n < 2:
        return np.full(len(r_edges) - 1, np.nan)
    area = (box[1] - box[0]) * (box[3] - box[2])
    tree = spatial.cKDTree(xy)
    pairs = tree.query_pairs(r_edges[-1], output_type="ndarray")
    centres = 0.5 * (r_edges[1:] + r_edges[:-1])
    frac = _circle_fraction_inside(xy, centres, box)
    counts = np.zeros((n, len(centres)))
    if len(pairs):
        d = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
        b = np.searchsorted(r_edges, d, side="right") - 1
        ok = (b >= 0) & (b < len(centres))
        np.add.at(counts, (pairs[ok, 0], b[ok]), 1)
        np.add.at(counts, (pairs[ok, 1], b[ok]), 1)
    shell = np.pi * (r_edges[1:] ** 2 - r_edges[:-1] ** 2)
    density = (n - 1) / area
    expected = (frac * shell * density).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected > 0, counts.sum(axis=0) / expected, np.nan)


# --------------------------------------------------------------------------- MSD and diffusion


def mean_squared_displacement(values: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time-averaged MSD of series sampled every frame (NaN = absent).

    Parameters
    ----------
    values : array (particle, frame) or (particle, frame, dim)
        Unwrapped angles (rad) or positions (px).
    max_lag : int
        Largest lag in frames.

    Returns
    -------
    lags : int array (L,)
        1 .. max_lag (limited by the number of frames).
    ensemble : array (L,)
        MSD pooled over every pair of observations of every particle (units squared).
    per_particle : array (particle, L)
        Each particle's MSD (NaN where it has no pair at that lag).
    """
    v = np.asarray(values, dtype=float)
    if v.ndim == 2:
        v = v[..., None]
    n_frames = v.shape[1]
    lags = np.arange(1, max(1, min(max_lag, n_frames - 1)) + 1)
    per = np.full((v.shape[0], len(lags)), np.nan)
    ens = np.full(len(lags), np.nan)
    for k, lag in enumerate(lags):
        if lag >= n_frames:
            break
        d2 = ((v[:, lag:] - v[:, :-lag]) ** 2).sum(axis=2)
        valid = np.isfinite(d2)
        cnt = valid.sum(axis=1)
        tot = np.where(valid, d2, 0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per[:, k] = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
        if cnt.sum():
            ens[k] = tot.sum() / cnt.sum()
    return lags, ens, per


def fit_diffusion(lags: np.ndarray, msd: np.ndarray, dim: int, n_fit: int) -> tuple[float, float]:
    """Diffusion coefficient from ``MSD = 2 dim D lag + c`` over the first ``n_fit`` lags.

    The intercept ``c`` absorbs localisation / angle noise (2 sigma^2 per coordinate), so
    noisy angles do not inflate D.

    Returns
    -------
    (D, c)
        D in units^2 per frame; NaN when fewer than 3 usable lags.
    """
    lags = np.asarray(lags[:n_fit], dtype=float)
    y = np.asarray(msd[:n_fit], dtype=float)
    ok = np.isfinite(y)
    if ok.sum() < 3:
        return math.nan, math.nan
    slope, intercept = np.polyfit(lags[ok], y[ok], 1)
    return float(slope / (2 * dim)), float(intercept)


# --------------------------------------------------------------------------- transition


def _response_exact(kappa: np.ndarray) -> np.ndarray:
    from scipy.special import i0e, i1e

    return i1e(kappa) / i0e(kappa)


_KAPPA_TABLE = np.linspace(0.0, 64.0, 6401)
_RESPONSE_TABLE = _response_exact(_KAPPA_TABLE)


def _response(kappa: np.ndarray) -> np.ndarray:
    """Equilibrium order ``I1(kappa) / I0(kappa)`` of an m-fold axis in a potential of depth kappa (kT).

    Interpolated from a table (error < 1e-5): the fits evaluate it millions of times.
    """
    return np.interp(kappa, _KAPPA_TABLE, _RESPONSE_TABLE)


def ramp(t: np.ndarray, t_c: float, width: float, saturation: float = 0.0) -> np.ndarray:
    """Shape of the ordering step, from 0 (before) to 1 (after).

    ``s = 1 / (1 + exp(-(t - t_c) / width))`` is a logistic ramp of the ordering field. With
    ``saturation = 0`` the order parameter follows it linearly (the plain logistic); with
    ``saturation = K > 0`` it follows the equilibrium response of an m-fold axis to a
    potential of depth ``K s`` (kT), ``I1(K s) / I0(K s)`` normalised to 1 at ``s = 1``: a
    strong field orders the particles well before it reaches half strength, so the order
    parameter's own midpoint comes earlier than ``t_c``, the midpoint of the field.
    """
    s = expit((np.asarray(t, dtype=float) - t_c) / width)
    saturation = np.asarray(saturation, dtype=float)
    if np.all(saturation == 0):
        return s
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = _response(saturation * s) / _response(saturation)
    return np.where(saturation > 0, scaled, s)


def logistic(t: np.ndarray, low: float, high: float, t_c: float, width: float, saturation: float = 0.0) -> np.ndarray:
    """``low + (high - low) * ramp(t, t_c, width, saturation)``; ``saturation = 0`` is the plain logistic
    ``low + (high - low) / (1 + exp(-(t - t_c) / width))``."""
    return low + (high - low) * ramp(t, t_c, width, saturation)


@dataclass
class LogisticFit:
    """A fit of a signal versus frame: parameters in frames, goodness of fit."""

    low: float
    high: float
    t_c: float
    width: float
    saturation: float
    rss: float
    n: int
    delta_bic: float  #: BIC(constant) - BIC(step) over the effective number of frames: > 10 is strong evidence
    params: tuple = field(default=())
    grid_t_c: float = math.nan  #: t_c of the grid search before polishing (the bootstrap's reference)


#: Field depths K (kT) of the "saturating" model's grid; 0 = the plain logistic.
def _saturation_of_level(level):
    """Field depth K (kT) whose equilibrium order I1(K)/I0(K) is ``level`` (0 below 0, 64 near 1)."""
    return np.interp(level, _RESPONSE_TABLE, _KAPPA_TABLE)


# Evenly spaced in the order they produce, which is what the data resolve.
SATURATIONS = tuple(float(np.round(_saturation_of_level(v), 3)) for v in
                    (0.0, 0.15, 0.3, 0.4, 0.5, 0.57, 0.63, 0.69, 0.74, 0.78, 0.82, 0.85, 0.88, 0.91, 0.93, 0.95))


def _profile_grid(t: np.ndarray, Y: np.ndarray, tcs: np.ndarray, widths: np.ndarray, sats: np.ndarray,
                  consistent: bool = False):
    """Best (t_c, width, saturation) of a step for each row of Y over a grid, levels solved exactly.

    For fixed shape parameters the model is linear in (low, high), so the residual sum of
    squares is a closed-form function of the grid point; NaN entries of Y carry no weight.
    ``tcs``, ``widths`` and ``sats`` are (B, G) (one grid per row) or (G,) (shared).
    Returns (t_c, width, saturation, low, high, rss) arrays of shape (B,).
    """
    W = np.isfinite(Y).astype(float)
    Yz = np.where(W > 0, Y, 0.0)
    shared = tcs.ndim == 1
    tc_g = tcs[None, :] if shared else tcs
    w_g = widths[None, :] if shared else widths
    k_g = sats[None, :] if shared else sats
    S = ramp(t[None, None, :], tc_g[..., None], w_g[..., None], k_g[..., None])  # (1|B, G, F)
    n = W.sum(1)[:, None]
    if shared:
        S2 = S[0]
        ss, sss, sys_ = W @ S2.T, W @ (S2 ** 2).T, Yz @ S2.T
    else:
        ss = np.einsum("bf,bgf->bg", W, S)
        sss = np.einsum("bf,bgf->bg", W, S ** 2)
        sys_ = np.einsum("bf,bgf->bg", Yz, S)
    sy = Yz.sum(1)[:, None]
    syy = (Yz ** 2).sum(1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        sbar, ybar = ss / n, sy / n
        sxx = sss - n * sbar ** 2
        sxy = sys_ - n * sbar * ybar
        rss = (syy - n * ybar ** 2) - sxy ** 2 / sxx
    rss = np.where(sxx > 1e-9 * np.maximum(n, 1), rss, np.inf)
    if consistent:
        # The saturation is not free: the order reached at full field, ``high``, is the
        # equilibrium order I1(K)/I0(K) of that field, so only the grid K nearest to the one
        # implied by ``high`` is admitted (a free K trades off against t_c and width).
        with np.errstate(invalid="ignore", divide="ignore"):
            high = ybar + (sxy / sxx) * (1 - sbar)
        grid = np.asarray(SATURATIONS)
        # Nearest grid K in K-space: the boundaries between grid points, mapped to levels.
        bounds = np.concatenate([[-np.inf], _response(0.5 * (grid[1:] + grid[:-1])), [np.inf]])
        used = np.searchsorted(grid, k_g)
        rss = np.where((high >= bounds[used]) & (high < bounds[used + 1]), rss, np.inf)
    best = np.argmin(rss, axis=1)
    rows = np.arange(len(Y))
    pick = 0 if shared else rows
    b = sxy[rows, best] / sxx[rows, best]
    a = ybar[rows, 0] - b * sbar[rows, best]
    return tc_g[pick, best], w_g[pick, best], k_g[pick, best], a, a + b, rss[rows, best]


def fit_logistic_many(t: np.ndarray, Y: np.ndarray, model: str = "logistic"):
    """Least-squares step fits of many series at once (grid search, coarse then fine).

    Parameters
    ----------
    t : array (F,)
        Frames.
    Y : array (B, F)
        Signals (NaN = no data at that frame).
    model : {"logistic", "saturating"}
        See :func:`ramp`.

    Returns
    -------
    t_c, width, saturation, low, high, rss : arrays (B,)
        t_c within the observed frames (to 1/20 of max(0.5, span/120) frames), width in [0.1, span] frames.
    """
    t = np.asarray(t, dtype=float)
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    span = max(float(t.max() - t.min()), 0.2)
    saturating = model == "saturating"
    k0 = np.array(SATURATIONS if saturating else (0.0,))
    # The coarse grid is bounded (about 120 x 14 x 16 points) whatever the movie length; the
    # fine stage then resolves t_c to 1/20 of the coarse step.
    step = max(0.5, span / 120)
    tc0 = np.arange(t.min(), t.max() + 1e-9, step)
    w0 = np.geomspace(0.1, span, 14)
    g_tc, g_w, g_k = (a.ravel() for a in np.meshgrid(tc0, w0, k0, indexing="ij"))
    tc, w, k, *_ = _profile_grid(t, Y, g_tc, g_w, g_k, consistent=saturating)
    k = np.where(np.isfinite(k), k, 0.0)
    dtc = np.linspace(-step, step, 41)
    fw = np.geomspace(0.85, 1 / 0.85, 7)
    d_tc, f_w = (a.ravel() for a in np.meshgrid(dtc, fw, indexing="ij"))
    tcs2 = np.clip(tc[:, None] + d_tc[None, :], t.min(), t.max())
    ws2 = np.clip(w[:, None] * f_w[None, :], 0.1, span)
    ks2 = np.repeat(k[:, None], len(d_tc), axis=1)
    return _profile_grid(t, Y, tcs2, ws2, ks2)


def fit_logistic(t: np.ndarray, y: np.ndarray, model: str = "logistic") -> LogisticFit | None:
    """Least-squares step fit of ``y(t)`` (t in frames); None when it cannot be fitted.

    A grid search over (t_c, width[, saturation]) with the levels solved exactly finds the
    global optimum; a local least-squares step then polishes (low, high, t_c, width). ``t_c``
    stays within the observed frames and the width within [0.1, span] frames (a step sharper
    than 0.1 frame is not resolved by one sample per frame).
    """
    t = np.asarray(t, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y) & np.isfinite(t)
    t, y = t[ok], y[ok]
    if len(t) < 6 or float(t.max() - t.min()) <= 0:
        return None
    span = float(t.max() - t.min())
    tc, w, k, lo, hi, rss = (float(v[0]) for v in fit_logistic_many(t, y[None, :], model))
    if not np.isfinite(rss):
        return None
    params = (lo, hi, tc, w)
    grid_tc = tc

    def model_fn(tt, a, b, c, d):
        # The saturating model's K follows the fitted plateau continuously (the grid had steps).
        kk = float(_saturation_of_level(b)) if model == "saturating" else 0.0
        return logistic(tt, a, b, c, d, kk)

    try:
        with np.errstate(all="ignore"), _quiet():
            polished, _ = optimize.curve_fit(model_fn, t, y, p0=params, maxfev=400)
        new_rss = float(np.sum((model_fn(t, *polished) - y) ** 2))
        if new_rss < rss and t.min() <= polished[2] <= t.max() and 0.1 <= polished[3] <= span:
            params, rss = tuple(float(v) for v in polished), new_rss
            k = float(_saturation_of_level(params[1])) if model == "saturating" else 0.0
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        pass
    n = len(y)
    rss0 = float(np.sum((y - y.mean()) ** 2))
    tiny = 1e-12 * max(rss0, 1e-300)
    # Successive frames of an order parameter are correlated (particles turn slowly), which
    # an i.i.d. BIC would count as independent evidence: the likelihood is scaled down to the
    # effective number of frames from the lag-1 autocorrelation of the residuals.
    resid = y - logistic(t, *params, k)
    rho = float(np.corrcoef(resid[:-1], resid[1:])[0, 1]) if n > 3 and np.std(resid) > 0 else 0.0
    rho = min(max(rho if np.isfinite(rho) else 0.0, 0.0), 0.95)
    n_eff = n * (1 - rho) / (1 + rho)
    n_par = 4
    bic = n_eff * np.log(max(rss, tiny) / n) + n_par * np.log(n_eff)
    bic0 = n_eff * np.log(max(rss0, tiny) / n) + 1 * np.log(n_eff)
    return LogisticFit(low=params[0], high=params[1], t_c=params[2], width=params[3], saturation=k, rss=rss,
                       n=n, delta_bic=float(bic0 - bic), params=params + (k,), grid_t_c=grid_tc)


def change_point(t: np.ndarray, y: np.ndarray, min_size: int = 3) -> float:
    """Single change point in the mean of ``y(t)`` (least squares); NaN when too short.

    Returns the time halfway between the last frame before and the first frame after the
    change (frames), the natural estimate of a logistic's centre.
    """
    t = np.asarray(t, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y)
    t, y = t[ok], y[ok]
    n = len(y)
    if n < 2 * min_size:
        return math.nan
    c1 = np.cumsum(y)
    c2 = np.cumsum(y ** 2)
    k = np.arange(min_size, n - min_size + 1)  # first segment = y[:k]
    left = c2[k - 1] - c1[k - 1] ** 2 / k
    right = (c2[-1] - c2[k - 1]) - (c1[-1] - c1[k - 1]) ** 2 / (n - k)
    best = int(k[np.argmin(left + right)])
    return float(0.5 * (t[best - 1] + t[best]))


def _resultant_signal(u: np.ndarray, species: np.ndarray) -> np.ndarray:
    """Per-frame ``|<u>|`` of unit phasors u (particle, frame), species-wise, weighted by counts."""
    valid = np.isfinite(u)
    out = np.zeros(u.shape[1])
    weight = np.zeros(u.shape[1])
    for s in np.unique(species):
        rows = species == s
        v = valid[rows]
        cnt = v.sum(axis=0)
        tot = np.abs(np.where(v, u[rows], 0).sum(axis=0))
        out += tot  # |sum| = count * S, so the count-weighted mean of S is sum(|sum|) / sum(count)
        weight += cnt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, out / np.maximum(weight, 1), np.nan)


def _mean_signal(a: np.ndarray, species: np.ndarray) -> np.ndarray:
    valid = np.isfinite(a)
    cnt = valid.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(valid, a, 0).sum(axis=0) / np.maximum(cnt, 1), np.nan)


@dataclass
class Signal:
    """A per-frame signal built from per-particle values, so it can be bootstrapped over particles."""

    name: str
    values: np.ndarray  #: (particle, frame): complex phasors for "resultant", real for "mean"
    kind: str  #: "resultant" (|mean phasor|, species-wise) or "mean"
    species: np.ndarray
    groups: np.ndarray | None = None  #: bootstrap unit of each particle (spatial tile); None = each particle

    def series(self, rows: np.ndarray | None = None) -> np.ndarray:
        v = self.values if rows is None else self.values[rows]
        s = self.species if rows is None else self.species[rows]
        return _resultant_signal(v, s) if self.kind == "resultant" else _mean_signal(v, s)


def estimate_transition(
    signal: Signal,
    frames: np.ndarray,
    *,
    n_boot: int = 200,
    confidence: float = 0.95,
    min_frames: int = 10,
    min_particles: int = 5,
    min_delta_bic: float = 10.0,
    model: str = "saturating",
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Fit a logistic step to a per-frame signal, with a bootstrap interval over particles.

    Parameters
    ----------
    signal : Signal
        The order parameter, built from per-particle values.
    frames : array (frame,)
        Frame numbers.
    n_boot : int
        Bootstrap resamples of whole trajectories (0 = no interval), grouped by
        ``signal.groups`` (spatial tiles) when given: neighbours order together, so
        resampling single particles would understate the uncertainty.
    confidence : float
        Coverage of the percentile interval.
    min_frames, min_particles : int
        Below these the fit is skipped and ``note`` says why.
    min_delta_bic : float
        A step counts as a transition when the logistic beats a constant by this much BIC
        and ``t_c`` lies strictly inside the movie.

    Returns
    -------
    dict
        ``frame`` (t_c in frames, NaN when none), ``low``/``high`` (interval, frames),
        ``width`` (frames), ``level_before``/``level_after``, ``delta_bic``,
        ``changepoint_frame``, ``detected`` (bool), ``n_boot`` (successful resamples),
        ``note`` ('' when all went well).
    """
    rng = rng or np.random.default_rng(0)
    frames = np.asarray(frames, dtype=float)
    y = signal.series()
    out: dict[str, Any] = {"signal": signal.name, "frame": math.nan, "low": math.nan, "high": math.nan,
                           "width": math.nan, "level_before": math.nan, "level_after": math.nan,
                           "delta_bic": math.nan, "changepoint_frame": math.nan, "detected": False,
                           "n_boot": 0, "note": ""}
    n_valid_frames = int(np.isfinite(y).sum())
    n_particles = int(np.isfinite(signal.values).any(axis=1).sum())
    if n_valid_frames < min_frames or n_particles < min_particles:
        out["note"] = (f"{signal.name}: no transition fit: {n_valid_frames} frame(s) with data and "
                       f"{n_particles} particle(s); need at least {min_frames} frames and {min_particles} particles")
        return out
    out["changepoint_frame"] = change_point(frames, y)
    fit = fit_logistic(frames, y, model)
    if fit is None:
        out["note"] = f"{signal.name}: the logistic fit did not converge"
        return out
    out.update(frame=fit.t_c, width=fit.width, saturation=fit.saturation, level_before=fit.low,
               level_after=fit.high, delta_bic=fit.delta_bic, model=model)
    edge = fit.t_c - frames.min() < 0.5 or frames.max() - fit.t_c < 0.5
    rising = fit.high > fit.low
    out["detected"] = bool(fit.delta_bic >= min_delta_bic and not edge and rising)
    if not rising:
        out["note"] = f"{signal.name}: no ordering transition detected (the best step lowers the order)"
    elif fit.delta_bic < min_delta_bic:
        out["note"] = (f"{signal.name}: no transition detected (a logistic step beats a constant by "
                       f"delta BIC {fit.delta_bic:.1f} < {min_delta_bic:g})")
    elif edge:
        out["note"] = f"{signal.name}: no transition detected (the fitted step lies at the edge of the movie)"
    rows_all = np.flatnonzero(np.isfinite(signal.values).any(axis=1))
    t_boot = np.array([])
    if n_boot > 0:
        if signal.groups is None:
            groups = [np.array([r]) for r in rows_all]
        else:
            groups = [rows_all[signal.groups[rows_all] == g] for g in np.unique(signal.groups[rows_all])]
        if len(groups) < 4:  # too few tiles to resample: fall back to single trajectories
            groups = [np.array([r]) for r in rows_all]

        def resample():
            picks = rng.integers(0, len(groups), len(groups))
            return np.concatenate([groups[g] for g in picks])

        Y = np.stack([signal.series(resample()) for _ in range(n_boot)])
        tcb, *_, rssb = fit_logistic_many(frames, Y, model)
        t_boot = tcb[np.isfinite(rssb)]
    out["n_boot"] = len(t_boot)
    if len(t_boot) >= 10:
        a = (1 - confidence) / 2
        # Basic-shift percentile interval: the resamples are fitted on the grid only, so their
        # spread is taken relative to the grid fit of the full data and centred on the polished
        # estimate (the grid's discreteness then shifts neither end).
        lo, hi = fit.t_c + np.quantile(t_boot - fit.grid_t_c, [a, 1 - a])
        # Frames are sampled once per frame: an interval narrower than the sampling cannot be
        # resolved, so it is widened to at least +-0.5 frame around the estimate.
        out["low"] = float(min(lo, fit.t_c - 0.5))
        out["high"] = float(max(hi, fit.t_c + 0.5))
    if not out["detected"]:
        out["frame"] = math.nan
    return out


# --------------------------------------------------------------------------- species


def assign_species(latents: xr.Dataset, tracks: pd.DataFrame | None, settings: dict[str, Any]
                   ) -> tuple[np.ndarray, list[dict[str, Any]], str]:
    """Species index of every trajectory, the species table, and how it was assigned.

    Returns
    -------
    species : int array (particle,)
    table : list of {"name", "symmetry"}
    method : str
        "single", "cls" or "gmm".
    """
    listed = settings.get("species") or []
    n_particles = latents.sizes["particle"]
    if not listed:
        return np.zeros(n_particles, dtype=int), [{"name": "particle", "symmetry": int(settings["symmetry"])}], "single"
    table = [{"name": s.get("name", f"species{k}"), "symmetry": int(s["symmetry"])} for k, s in enumerate(listed)]
    if len(listed) == 1:
        return np.zeros(n_particles, dtype=int), table, "single"
    cls = None
    if settings["species_from"] in ("auto", "cls"):
        if "cls" in latents.variables and latents["cls"].dims == ("particle",):
            cls = np.asarray(latents["cls"].values)
        elif tracks is not None and "cls" in tracks.columns and "particle" in tracks.columns:
            majority = tracks.groupby("particle")["cls"].agg(lambda s: s.mode().iloc[0] if len(s.mode()) else np.nan)
            cls = majority.reindex(latents["particle"].values).to_numpy()
        elif settings["species_from"] == "cls":
            raise InputError("latents.zarr / tracks.parquet: dynamics.species_from is 'cls' but neither has a "
                             "'cls' variable/column giving each particle's class")
    if cls is not None:
        species = np.zeros(n_particles, dtype=int)
        keys = [s.get("cls", k) for k, s in enumerate(listed)]
        lookup = {str(k): idx for idx, k in enumerate(keys)}
        unknown = set()
        for p, c in enumerate(cls):
            key = str(int(c)) if isinstance(c, (int, float, np.integer, np.floating)) and np.isfinite(c) else str(c)
            if key in lookup:
                species[p] = lookup[key]
            else:
                unknown.add(key)
        if unknown:
            log.warning("cls value(s) %s match no listed species; those particles are counted as %s",
                        ", ".join(sorted(unknown)), table[0]["name"])
        return species, table, "cls"
    if "z" not in latents.variables:
        raise InputError("latents.zarr: several species are configured but there is no 'cls' and no 'z' "
                         "to tell them apart")
    from sklearn.mixture import GaussianMixture

    z = np.asarray(latents["z"].values, dtype=float)
    with np.errstate(invalid="ignore"):
        zmean = np.nanmean(z, axis=1)
    ok = np.isfinite(zmean).all(axis=1)
    species = np.zeros(n_particles, dtype=int)
    if ok.sum() < len(table):
        return species, table, "gmm"
    gmm = GaussianMixture(n_components=len(table), random_state=int(settings["seed"]), n_init=3)
    labels = gmm.fit_predict(zmean[ok])
    order = np.argsort(gmm.means_[:, 0])  # component with the smallest mean z[0] -> first species
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    species[ok] = rank[labels]
    return species, table, "gmm"


# --------------------------------------------------------------------------- the stage


def _attr_number(attrs: dict[str, Any], key: str) -> float | None:
    value = attrs.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _tiles(mean_x: np.ndarray, mean_y: np.ndarray, per_side: int) -> np.ndarray | None:
    """Spatial tile (per_side x per_side over the bounding box) of each trajectory's mean position."""
    if per_side <= 0:
        return None
    ok = np.isfinite(mean_x) & np.isfinite(mean_y)
    if not ok.any():
        return None
    def index(v):
        lo, hi = np.nanmin(v[ok]), np.nanmax(v[ok])
        return np.clip(((v - lo) / max(hi - lo, 1e-9) * per_side).astype(int, copy=False), 0, per_side - 1)
    with np.errstate(invalid="ignore"):
        tiles = index(np.where(ok, mean_x, 0.0)) * per_side + index(np.where(ok, mean_y, 0.0))
    return np.where(ok, tiles, -1)


def _tracks_matrix(tracks: pd.DataFrame, column: str, particles: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(particle, frame) matrix of a tracks column (NaN where absent; mean of duplicates)."""
    pivot = tracks.pivot_table(index="particle", columns="frame", values=column, aggfunc="mean")
    return pivot.reindex(index=particles, columns=frames).to_numpy(dtype=float)


def compute_dynamics(latents: xr.Dataset, tracks: pd.DataFrame | None, settings: dict[str, Any]) -> xr.Dataset:
    """Ensemble statistics, order parameters, rotational dynamics and the transition of one movie.

    Parameters
    ----------
    latents : xarray.Dataset
        ``angle`` (rad), ``x``, ``y`` (px) on (particle, frame); optionally ``z`` (particle,
        frame, latent), ``dx``, ``dy`` (px), ``cls(particle)``; attrs ``frame_interval`` (s),
        ``pixel_size``, ``pixel_unit``.
    tracks : pandas.DataFrame, optional
        Trajectories (``frame``, ``x``, ``y``, ``particle``); an ``orientation`` column (rad,
        image-moment angle) gives the classical orientational order for comparison.
    settings : dict
        The validated ``dynamics`` config section.

    Returns
    -------
    xarray.Dataset
        On ``frame`` (with ``time`` in s): counts, latent means/spreads/quantiles, circular
        statistics, order parameters, histograms; on ``particle``: species, unwrapped angle,
        angular velocity, local order, diffusion coefficients; on ``lag``: MSDs; on ``r``:
        g(r) at early/middle/late frames. The transition estimate is in ``attrs``.
    """
    notes: list[str] = []
    rng = np.random.default_rng(int(settings["seed"]))
    frames = np.asarray(latents["frame"].values) if "frame" in latents.coords else np.arange(latents.sizes["frame"])
    particles = np.asarray(latents["particle"].values) if "particle" in latents.coords else np.arange(latents.sizes["particle"])
    theta = np.asarray(latents["angle"].transpose("particle", "frame").values, dtype=float)
    x = np.asarray(latents["x"].transpose("particle", "frame").values, dtype=float)
    y = np.asarray(latents["y"].transpose("particle", "frame").values, dtype=float)
    present = np.isfinite(theta) & np.isfinite(x) & np.isfinite(y)
    theta = np.where(present, theta, np.nan)
    n_p, n_f = theta.shape

    frame_interval = _attr_number(latents.attrs, "frame_interval")
    pixel_size = _attr_number(latents.attrs, "pixel_size")
    pixel_unit = latents.attrs.get("pixel_unit") or "px"
    if pixel_size is None:
        pixel_size, pixel_unit = 1.0, "px"
    dt = frame_interval or 1.0
    time_unit = "s" if frame_interval else "frame"
    if not frame_interval:
        notes.append("frame_interval unknown: times and rates are per frame")

    species, table, species_method = assign_species(latents, tracks, settings)
    n_sym = np.array([table[s]["symmetry"] for s in species], dtype=int)
    reg = int(settings["registry_order"])
    m_reg = np.array([reg * n // math.gcd(reg, n) for n in n_sym], dtype=int)  # lcm: defined for n-fold axes

    ds = xr.Dataset(coords={"frame": frames, "particle": particles})
    ds = ds.assign_coords(time=("frame", frames * dt))
    ds["time"].attrs.update(units=time_unit, long_name="time since frame 0")
    ds["species"] = ("particle", species)
    ds["species"].attrs["description"] = "species index (see attrs species)"
    ds["symmetry"] = ("particle", n_sym)
    ds["n_particles"] = ("frame", present.sum(axis=0).astype(int))
    ds["track_length"] = ("particle", present.sum(axis=1).astype(int))

    # ---- latents: mean, spread, quantiles, histograms
    quantiles = np.asarray(settings["quantiles"], dtype=float)
    bins = int(settings["histogram_bins"])
    if "z" in latents.variables:
        z = np.asarray(latents["z"].transpose("particle", "frame", "latent").values, dtype=float)
        z = np.where(present[..., None], z, np.nan)
        n_lat = z.shape[2]
        lat_coord = np.asarray(latents["latent"].values) if "latent" in latents.coords else np.arange(n_lat)
        ds = ds.assign_coords(latent=lat_coord, quantile=quantiles)
        with np.errstate(invalid="ignore"), _quiet():
            ds["z_mean"] = (("frame", "latent"), np.nanmean(z, axis=0))
            ds["z_sd"] = (("frame", "latent"), np.nanstd(z, axis=0, ddof=1) if n_p > 1 else np.full((n_f, n_lat), np.nan))
            ds["z_quantile"] = (("frame", "latent", "quantile"), np.moveaxis(np.nanquantile(z, quantiles, axis=0), 0, -1))
        edges = np.empty((n_lat, bins + 1))
        hist = np.zeros((n_f, n_lat, bins), dtype=np.int32)
        for k in range(n_lat):
            vals = z[..., k][np.isfinite(z[..., k])]
            lo, hi = (np.quantile(vals, [0.005, 0.995]) if vals.size else (0.0, 1.0))
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges[k] = np.linspace(lo, hi, bins + 1)
            for f in range(n_f):
                col = z[:, f, k]
                hist[f, k] = np.histogram(col[np.isfinite(col)], edges[k])[0]
        ds["z_hist"] = (("frame", "latent", "z_bin"), hist)
        ds["z_hist_edges"] = (("latent", "z_edge"), edges)
    for name in ("dx", "dy"):
        if name in latents.variables:
            v = np.where(present, np.asarray(latents[name].transpose("particle", "frame").values, dtype=float), np.nan)
            with _quiet():
                ds[f"{name}_mean"] = ("frame", np.nanmean(v, axis=0))
                ds[f"{name}_sd"] = ("frame", np.nanstd(v, axis=0))
            ds[f"{name}_mean"].attrs["units"] = "px"

    # ---- circular statistics per species
    sp_names = [s["name"] for s in table]
    ds = ds.assign_coords(species_name=("species_index", np.array(sp_names, dtype=object)))
    phase_edges = np.linspace(0, 2 * np.pi, bins + 1)
    ds = ds.assign_coords(phase=("phase_bin", 0.5 * (phase_edges[1:] + phase_edges[:-1])))
    ds["phase"].attrs.update(units="rad", description="n*angle mod 2 pi (bin centre); canonical angle = phase / n")
    mean_dir = np.full((n_f, len(table)), np.nan)
    resultant = np.full((n_f, len(table)), np.nan)
    counts = np.zeros((n_f, len(table)), dtype=int)
    angle_hist = np.zeros((n_f, len(table), bins), dtype=np.int32)
    for s, spec in enumerate(table):
        rows = species == s
        if not rows.any():
            continue
        th = theta[rows]
        n = spec["symmetry"]
        mean_dir[:, s] = mean_direction(th, n, axis=0)
        resultant[:, s] = order_parameter(th, n, axis=0)
        counts[:, s] = np.isfinite(th).sum(axis=0)
        ph = np.mod(n * th, 2 * np.pi)
        for f in range(n_f):
            col = ph[:, f]
            angle_hist[f, s] = np.histogram(col[np.isfinite(col)], phase_edges)[0]
    mean_dir[counts == 0] = np.nan
    ds["angle_mean"] = (("frame", "species_index"), mean_dir)
    ds["angle_mean"].attrs.update(units="rad", description="circular mean direction of the n-fold axes, in [0, 2 pi/n); "
                                  "relative to the rVAE's arbitrary angle offset")
    ds["angle_resultant"] = (("frame", "species_index"), resultant)
    ds["angle_resultant"].attrs["description"] = "mean resultant length of n*angle (= S_n of the species)"
    ds["species_count"] = (("frame", "species_index"), counts)
    ds["angle_hist"] = (("frame", "species_index", "phase_bin"), angle_hist)

    # ---- global orientational order
    u_n = np.exp(1j * n_sym[:, None] * theta)
    u_reg = np.exp(1j * m_reg[:, None] * theta)
    n_tiles = int(settings["bootstrap_tiles"])
    with _quiet():
        mean_x, mean_y = np.nanmean(np.where(present, x, np.nan), axis=1), np.nanmean(np.where(present, y, np.nan), axis=1)
    tiles = _tiles(mean_x, mean_y, n_tiles)
    sig_sn = Signal("S_n", u_n, "resultant", species, tiles)
    sig_s6 = Signal("S_6", u_reg, "resultant", species, tiles)
    ds["S_n"] = ("frame", sig_sn.series())
    ds["S_n"].attrs["description"] = "orientational order |<exp(i n angle)>| with each species' symmetry order n (count-weighted over species)"
    ds["S_6"] = ("frame", sig_s6.series())
    ds["S_6"].attrs["description"] = (f"substrate-registry order |<exp(i m angle)>|, m = lcm(n, {reg}) "
                                      f"({reg} for rods and triangles)")

    # ---- neighbours: local S_n, psi_k, counts
    k_bond = int(settings["bond_order"])
    cutoff = float(settings["bond_cutoff"])
    local_sn = np.full((n_p, n_f), np.nan)
    psi = np.full((n_p, n_f), np.nan + 0j)
    n_neigh = np.full((n_p, n_f), np.nan)
    for f in range(n_f):
        idx = np.flatnonzero(present[:, f])
        if len(idx) < 3:
            continue
        xy = np.column_stack([x[idx, f], y[idx, f]])
        bonds = delaunay_bonds(xy, cutoff)
        p, c = bond_order(xy, bonds, k_bond)
        psi[idx, f] = p
        n_neigh[idx, f] = c
        local_sn[idx, f] = local_order(theta[idx, f], n_sym[idx], bonds)
    sig_local = Signal("local_S_n", local_sn, "mean", species, tiles)
    sig_psi = Signal("psi_6", psi, "resultant", np.zeros(n_p, dtype=int), tiles)
    sig_lpsi = Signal("local_psi_6", np.abs(psi), "mean", species, tiles)
    with _quiet():
        ds["local_S_n"] = ("frame", sig_local.series())
        ds["psi_6"] = ("frame", sig_psi.series())
        ds["local_psi_6"] = ("frame", sig_lpsi.series())
        ds["neighbours_mean"] = ("frame", np.nanmean(n_neigh, axis=0))
    ds["psi_6"].attrs["description"] = f"global bond-orientational order |<psi_{k_bond}(i)>| (Delaunay neighbours)"
    ds["local_psi_6"].attrs["description"] = f"mean local bond-orientational order <|psi_{k_bond}(i)|>"
    ds["local_S_n"].attrs["description"] = "mean local orientational order over each particle and its Delaunay neighbours"
    ds["local_S_n_particle"] = (("particle", "frame"), local_sn)
    ds["psi_6_particle"] = (("particle", "frame"), np.abs(psi))
    ds["neighbours"] = (("particle", "frame"), n_neigh)
    ds["neighbours"].attrs["description"] = "number of Delaunay neighbours (bonds longer than bond_cutoff x median dropped)"

    # ---- classical orientation measure (image moments from segmentation)
    signals = {"S_n": sig_sn, "S_6": sig_s6, "local_S_n": sig_local, "psi_6": sig_psi, "local_psi_6": sig_lpsi}
    if tracks is not None and "orientation" in tracks.columns and tracks["orientation"].notna().any():
        t_particles = np.unique(tracks["particle"].to_numpy())
        t_theta = _tracks_matrix(tracks, "orientation", t_particles, frames)
        sp_map = pd.Series(species, index=particles)
        t_species = sp_map.reindex(t_particles).fillna(0).to_numpy(dtype=int)
        t_n = np.array([table[s]["symmetry"] for s in t_species], dtype=int)
        # Image moments give an axis (mod pi) whatever the particle: at least 2-fold.
        t_n = np.lcm(t_n, 2)
        t_m = np.array([reg * n // math.gcd(reg, n) for n in t_n], dtype=int)
        t_mean = tracks.groupby("particle")[["x", "y"]].mean().reindex(t_particles)
        t_tiles = _tiles(t_mean["x"].to_numpy(float), t_mean["y"].to_numpy(float), n_tiles)
        sig_mom = Signal("S_n_moments", np.exp(1j * t_n[:, None] * t_theta), "resultant", t_species, t_tiles)
        sig_mom6 = Signal("S_6_moments", np.exp(1j * t_m[:, None] * t_theta), "resultant", t_species, t_tiles)
        signals["S_n_moments"], signals["S_6_moments"] = sig_mom, sig_mom6
        ds["S_n_moments"] = ("frame", sig_mom.series())
        ds["S_n_moments"].attrs["description"] = ("S_n of the image-moment orientation of the detections "
                                                  "(classical measure; n at least 2: moments give an axis)")
        ds["S_6_moments"] = ("frame", sig_mom6.series())
        ds["S_6_moments"].attrs["description"] = "registry order S_6 of the image-moment orientation"
    else:
        notes.append("tracks have no 'orientation' column: no classical (image-moment) order parameter")

    # ---- g(r) at early, middle and late frames
    all_x, all_y = x[present], y[present]
    if all_x.size:
        box = (float(all_x.min()), float(all_x.max()), float(all_y.min()), float(all_y.max()))
        side = min(box[1] - box[0], box[3] - box[2])
        rmax = float(settings["gr_rmax"] or side / 4)
        r_edges = np.linspace(0, max(rmax, 1e-6), int(settings["gr_bins"]) + 1)
        width = int(settings["gr_frames"])
        picks = {"early": 0, "middle": n_f // 2, "late": n_f - 1}
        gr = np.full((3, len(r_edges) - 1), np.nan)
        gr_frame = np.zeros(3)
        for k, centre in enumerate(picks.values()):
            lo = int(np.clip(centre - width // 2, 0, max(0, n_f - width)))
            sel = range(lo, min(n_f, lo + width))
            vals = [pair_correlation(np.column_stack([x[present[:, f], f], y[present[:, f], f]]), r_edges, box)
                    for f in sel]
            with _quiet():
                gr[k] = np.nanmean(vals, axis=0)
            gr_frame[k] = float(np.mean([frames[f] for f in sel]))
        ds = ds.assign_coords(stage=np.array(list(picks), dtype=object), r=0.5 * (r_edges[1:] + r_edges[:-1]))
        ds["r"].attrs["units"] = "px"
        ds["gr"] = (("stage", "r"), gr)
        ds["gr"].attrs["description"] = "radial distribution function (edge-corrected, bounding box of all positions)"
        ds["gr_frame"] = ("stage", gr_frame)

    # ---- per trajectory: unwrapped angle, angular velocity, jumps, MSDs, diffusion
    unwrapped = unwrap_angles(theta, n_sym)
    ds["angle_unwrapped"] = (("particle", "frame"), unwrapped)
    ds["angle_unwrapped"].attrs.update(units="rad", description="angle unwrapped along the trajectory modulo 2 pi/n")
    omega = np.full_like(unwrapped, np.nan)
    omega[:, 1:] = np.diff(unwrapped, axis=1) / dt
    ds["angular_velocity"] = (("particle", "frame"), omega)
    ds["angular_velocity"].attrs["units"] = f"rad/{time_unit}"
    jumps = np.abs(wrap_symmetric(np.diff(theta, axis=1), n_sym[:, None]))
    jump_edges = np.logspace(-3, np.log10(np.pi), bins + 1)
    jh = np.zeros((len(table), bins), dtype=np.int64)
    for s in range(len(table)):
        v = jumps[species == s]
        jh[s] = np.histogram(v[np.isfinite(v)], jump_edges)[0]
    ds = ds.assign_coords(jump=("jump_bin", np.sqrt(jump_edges[1:] * jump_edges[:-1])))
    ds["jump"].attrs.update(units="rad", description="orientation change between consecutive frames (geometric bin centre)")
    ds["jump_hist"] = (("species_index", "jump_bin"), jh)
    ds["jump_edges"] = ("jump_edge", jump_edges)

    max_lag = int(settings["msd_max_lag"])
    n_fit = int(settings["msd_fit_lags"])
    lags, msd_rot, msd_rot_p = mean_squared_displacement(unwrapped, max_lag)
    xyp = np.stack([np.where(present, x, np.nan), np.where(present, y, np.nan)], axis=-1)
    _, msd_tr, msd_tr_p = mean_squared_displacement(xyp, max_lag)
    ds = ds.assign_coords(lag=lags, lag_time=("lag", lags * dt))
    ds["lag_time"].attrs["units"] = time_unit
    ds["msd_rot"] = ("lag", msd_rot)
    ds["msd_rot"].attrs["units"] = "rad^2"
    ds["msd_trans"] = ("lag", msd_tr * pixel_size ** 2)
    ds["msd_trans"].attrs["units"] = f"{pixel_unit}^2"
    d_rot, c_rot = fit_diffusion(lags, msd_rot, 1, n_fit)
    d_tr, c_tr = fit_diffusion(lags, msd_tr, 2, n_fit)
    d_rot_p = np.array([fit_diffusion(lags, row, 1, n_fit)[0] for row in msd_rot_p])
    d_tr_p = np.array([fit_diffusion(lags, row, 2, n_fit)[0] for row in msd_tr_p])
    ds["D_rot"] = ("particle", d_rot_p / dt)
    ds["D_rot"].attrs.update(units=f"rad^2/{time_unit}", description="rotational diffusion: MSD = 2 D lag + c over the first msd_fit_lags lags")
    ds["D_trans"] = ("particle", d_tr_p * pixel_size ** 2 / dt)
    ds["D_trans"].attrs.update(units=f"{pixel_unit}^2/{time_unit}", description="translational diffusion: MSD = 4 D lag + c")
    if not np.isfinite(d_rot):
        notes.append(f"too few frames for a diffusion fit (need {n_fit} lags of at least 3 usable)")

    # ---- the transition
    boot_kw = {"n_boot": int(settings["bootstrap"]), "confidence": float(settings["confidence"]),
               "min_frames": int(settings["min_frames"]), "min_particles": int(settings["min_particles"]),
               "min_delta_bic": float(settings["min_delta_bic"]), "model": settings["transition_model"]}
    fits: dict[str, dict[str, Any]] = {}
    quick: dict[str, dict[str, Any]] = {}

    def kwargs(name: str, n_boot: int | None = None) -> dict[str, Any]:
        kw = dict(boot_kw)
        if name.startswith(("psi", "local_psi")):
            kw["model"] = "logistic"  # the saturating response describes particle orientations only
        if n_boot is not None:
            kw["n_boot"] = n_boot
        return kw

    def fit(name: str) -> dict[str, Any]:
        if name not in fits:
            fits[name] = estimate_transition(signals[name], frames, rng=rng, **kwargs(name))
        return fits[name]

    def fit_quick(name: str) -> dict[str, Any]:
        if name not in quick:
            quick[name] = estimate_transition(signals[name], frames, rng=rng, **kwargs(name, 0))
        return quick[name]

    def choose(requested: str, candidates: tuple[str, ...], key: str) -> str | None:
        if requested != "auto":
            if requested not in signals:
                raise InputError(f"dynamics.{key}: {requested!r} cannot be computed for this movie "
                                 f"(available: {', '.join(signals)})")
            return requested
        available = [c for c in candidates if c in signals]
        if not available:
            return None
        # The order parameter that shows the ordering most clearly: rods locking into three
        # substrate directions raise S_6 but not the global S_2, a single nematic domain
        # raises S_2. Local order is left out: domains coarsen after the transition and drag
        # its step late.
        detected = [c for c in available if fit_quick(c)["detected"]]
        return max(detected or available,
                   key=lambda c: fit_quick(c)["delta_bic"] if np.isfinite(fit_quick(c)["delta_bic"]) else -np.inf)

    main_name = choose(settings["transition_signal"], AUTO_SIGNALS, "transition_signal")
    classical_name = choose(settings["classical_signal"], CLASSICAL_SIGNALS, "classical_signal")
    main = fit(main_name)
    classical = fit(classical_name) if classical_name else {}
    if main["note"]:
        notes.append(main["note"])
    if classical_name is None:
        notes.append("no classical order parameter could be computed")
    elif classical.get("note"):
        notes.append(classical["note"])
    # The order parameter's own half-way point, for readers who define the transition that way.
    plain = fit_logistic(frames, ds[main_name].values, "logistic") if main["detected"] else None
    ds["transition_curve"] = ("frame", logistic(frames, main["level_before"], main["level_after"], main["frame"],
                                                main["width"], main.get("saturation", 0.0)) if main["detected"]
                              else np.full(n_f, np.nan))
    ds["transition_curve"].attrs["description"] = f"fitted {settings['transition_model']} step of {main_name}"

    attrs: dict[str, Any] = {
        "transition_signal": main_name,
        "transition_frame": main["frame"],
        "transition_frame_low": main["low"],
        "transition_frame_high": main["high"],
        "transition_interval": [main["low"], main["high"]],
        "transition_confidence": float(settings["confidence"]),
        "transition_width": main["width"],
        "transition_time": main["frame"] * dt if np.isfinite(main["frame"]) else math.nan,
        "transition_detected": main["detected"],
        "transition_frame_changepoint": main["changepoint_frame"],
        "transition_frame_logistic": plain.t_c if plain is not None else math.nan,
        "transition_model": settings["transition_model"],
        "transition_saturation": main.get("saturation", math.nan),
        "transition_delta_bic": main["delta_bic"],
        "transition_note": main["note"],
        "classical_signal": classical_name or "",
        "transition_frame_classical": fits.get(classical_name, {}).get("frame", math.nan),
        "transition_interval_classical": [fits.get(classical_name, {}).get("low", math.nan),
                                          fits.get(classical_name, {}).get("high", math.nan)],
        "transition_fits": json.dumps({**{k: v for k, v in quick.items()}, **fits}, default=float),
        "rotational_diffusion": d_rot / dt,
        "rotational_diffusion_per_frame": d_rot,
        "rotational_diffusion_units": f"rad^2/{time_unit}",
        "rotational_msd_intercept": c_rot,
        "translational_diffusion": d_tr * pixel_size ** 2 / dt,
        "translational_diffusion_units": f"{pixel_unit}^2/{time_unit}",
        "translational_msd_intercept": c_tr * pixel_size ** 2,
        "species": json.dumps(table),
        "species_method": species_method,
        "frame_interval": frame_interval or "",
        "time_unit": time_unit,
        "pixel_size": pixel_size,
        "pixel_unit": pixel_unit,
        "notes": "; ".join(notes),
    }
    # JSON has no NaN: missing values become None (written as "") by the store writer.
    ds.attrs = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in attrs.items()}
    ds.attrs["transition_interval"] = [None if not np.isfinite(v) else v for v in attrs["transition_interval"]]
    ds.attrs["transition_interval_classical"] = [None if not np.isfinite(v) else v
                                                 for v in attrs["transition_interval_classical"]]
    for note in notes:
        log.warning("%s", note)
    return ds


class _quiet:
    """Silence 'mean of empty slice' warnings (empty frames are expected and give NaN) and curve_fit's covariance warning."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)
        # curve_fit warns when it cannot estimate a covariance, which the polish step never uses.
        warnings.simplefilter("ignore", category=optimize.OptimizeWarning)
        return self

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def read_inputs(latents_path: str | Path, tracks_path: str | Path | None) -> tuple[xr.Dataset, pd.DataFrame | None]:
    """Open ``latents.zarr`` (loaded into memory) and ``tracks.parquet``, checking the contracts."""
    latents = open_zarr(latents_path, required=["angle", "x", "y"], what="latents store")
    for name in ("angle", "x", "y"):
        if set(latents[name].dims) != {"particle", "frame"}:
            raise InputError(f"{latents_path}: variable {name!r} has dims {latents[name].dims}; expected (particle, frame)")
    if "z" in latents.variables and set(latents["z"].dims) != {"particle", "frame", "latent"}:
        raise InputError(f"{latents_path}: variable 'z' has dims {latents['z'].dims}; expected (particle, frame, latent)")
    latents = latents.load()
    tracks = None
    if tracks_path is not None:
        tracks = read_table(tracks_path, required=["frame", "x", "y", "particle"], what="tracks table")
    return latents, tracks


def run_dynamics_files(latents_path, tracks_path, output, settings: dict[str, Any]) -> xr.Dataset:
    """Read the inputs, compute the dynamics and write ``dynamics.zarr`` atomically."""
    latents, tracks = read_inputs(latents_path, tracks_path)
    ds = compute_dynamics(latents, tracks, settings)
    inputs = {"latents": str(latents_path)}
    if tracks_path is not None:
        inputs["tracks"] = str(tracks_path)
    write_zarr(ds, output, provenance=provenance_attrs(settings=settings, seed=settings["seed"],
                                                       inputs=inputs, stage="dynamics"))
    return ds


# --------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("latents", help="latents.zarr of the movie")
    parser.add_argument("--tracks", help="tracks.parquet of the movie (gives the classical orientation measure)")
    parser.add_argument("-o", "--output", required=True, help="dynamics.zarr to write")
    add_settings_arguments(parser, "dynamics")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, "dynamics")
    ds = run_dynamics_files(args.latents, args.tracks, args.output, settings)
    a = ds.attrs
    if a.get("transition_detected"):
        log.info("transition (%s): frame %.2f, %.0f%% interval [%.2f, %.2f], width %.2f frames; change point %.1f",
                 a["transition_signal"], a["transition_frame"], 100 * a["transition_confidence"],
                 a["transition_frame_low"] or math.nan, a["transition_frame_high"] or math.nan,
                 a["transition_width"], a["transition_frame_changepoint"] or math.nan)
    else:
        log.info("no ordering transition detected from %s", a["transition_signal"])
    log.info("rotational diffusion %.4g %s", a["rotational_diffusion"] or math.nan, a["rotational_diffusion_units"])
    log.info("wrote %s", args.output)
    return 0


COMMANDS = {"dynamics": (configure, run)}

"""Ensemble time dynamics, order parameters, rotational dynamics and the ordering transition.

Reads the per-trajectory latents (``latents.zarr``) and the trajectories
(``tracks.parquet``) of one movie and writes ``dynamics.zarr``: per-frame ensemble
statistics on a ``frame`` dimension (with a ``time`` coordinate in seconds), per-trajectory
rotational and translational dynamics, and the ordering transition in the store's attributes.

:func:`compute_dynamics` reads as its table of contents: :func:`prepare_movie`, then one step
per section, each returning an ``xarray.Dataset`` on named dims (:func:`frame_counts`,
:func:`latent_statistics`, :func:`circular_statistics`, :func:`orientational_order`,
:func:`neighbour_order`, :func:`classical_order`, :func:`pair_correlations`,
:func:`rotational_dynamics`, :func:`translational_dynamics`, :func:`ordering_transition`),
merged at the end. No (particle, frame) grid of the movie is ever whole in memory:
``latents.zarr`` is read a chunk of trajectories (``dynamics.chunk``) or a block of frames of
as many values at a time (:class:`LatentGrids`), per-trajectory dynamics are computed chunk by
chunk, the order parameters are kept as sums per bootstrap unit, species and frame (all the
transition's bootstrap needs), and the (particle, frame) outputs are dask arrays computed
block by block as the store is written (:func:`_lazy_grids`). Results equal a single chunk's
to float rounding.

Angles
------
The rVAE's angle may carry a constant offset and sign relative to the lab frame, and a
particle with ``n``-fold symmetry has an angle defined only modulo ``2*pi/n``. Every quantity
fitted here is invariant to both: order parameters ``S_m = |<exp(i m theta)>|``, local
``S_m``, rotational MSD (differences of unwrapped angles), jump sizes. Angles that are all NaN
or all one value (pose-less models) are "no angles": nothing angle-based is reported.

Species and symmetry
--------------------
Each trajectory belongs to one species with a symmetry order ``n`` (2 for rods, 0 for
isotropic particles such as spheres, which have no orientation: no angle-based order
parameter and no rotational diffusion for them). The species table is ``dynamics.species``,
else the one the encode stage records in the latents' attrs, else one species of order
``dynamics.symmetry``, else of the order recorded in the latents, else n = 2 with a note. With
several species, a trajectory's species is its class (``cls(particle)`` of the latents or the
majority ``cls`` of its rows in ``tracks.parquet``) matched to a species' ``cls`` value or
its position in the list (a class matching no species is an error naming it); without class
information trajectories are clustered on their mean content latent ``z`` by a Gaussian
mixture, components matched to the listed species in order of increasing mean ``z[0]``.

Transition
----------
The default signal is ``S_n`` (each species' own symmetry); with a substrate registry named
(``dynamics.registry_order``, 6 for mica) ``S_6`` is a candidate too and ``auto`` picks the
clearer step. The default model is a logistic step of the order parameter, accepted only when
it beats a constant by ``min_delta_bic`` and a change point in the mean lies at its midpoint;
``saturating`` is the AFM-on-mica model (a logistic ramp of the substrate field seen through
the equilibrium response of the axes). The interval resamples spatial tiles of trajectories
and redraws every angle within its posterior (``angle_sd``). Without a transition the store
says ``transition_detected: False`` with ``transition_frame`` and its interval NaN.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from .motion import (
    fit_diffusion,
    fit_diffusion_many,
    frame_drift,
    mean_squared_displacement,
)
from .provenance import provenance_attrs

log = logging.getLogger(__name__)

#: Per-frame signals a transition can be fitted to (``dynamics.transition_signal``).
SIGNALS = ("S_n", "S_6", "local_S_n", "psi_6", "local_psi_6", "S_n_moments", "S_6_moments")

#: Angle-derived signals among which ``transition_signal: auto`` picks the clearest step (S_6 only
#: exists when a substrate registry is named, ``dynamics.registry_order``).
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
    edges = np.sort(np.concatenate([s[:, [0, 1]], s[:, [1, 2]], s[:, [0, 2]]]), axis=1)
    # Unique on one integer key per bond (i * N + j, the same lexicographic order as unique rows),
    # many times faster than np.unique(axis=0) on large frames.
    key = np.unique(edges[:, 0].astype(np.int64) * len(xy) + edges[:, 1])
    edges = np.column_stack([key // len(xy), key % len(xy)]).astype(s.dtype)
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
    # Ordered pairs (both directions, self pairs at r = 0 cancel in the difference) per shell,
    # counted by the tree without listing the pairs: memory stays O(N) for any r_max.
    counts = np.diff(tree.count_neighbors(tree, np.asarray(r_edges, dtype=float))).astype(float)
    centres = 0.5 * (r_edges[1:] + r_edges[:-1])
    frac = np.zeros(len(centres))
    for lo in range(0, n, 128):
        frac += _circle_fraction_inside(xy[lo:lo + 128], centres, box).sum(axis=0)
    shell = np.pi * (r_edges[1:] ** 2 - r_edges[:-1] ** 2)
    density = (n - 1) / area
    expected = frac * shell * density
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected > 0, counts / expected, np.nan)


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
    n = W.sum(1)[:, None]
    if shared:
        S2 = ramp(t[None, None, :], tc_g[..., None], w_g[..., None], k_g[..., None])[0]  # (G, F)
        ss, sss, sys_ = W @ S2.T, W @ (S2 ** 2).T, Yz @ S2.T
    else:
        # One grid per row (the bootstrap's resamples): the (rows, G, F) ramps are made a block
        # of rows at a time, at most about 2 million values (200 resamples x 287 grid points
        # x 1000 frames would be 460 MB at once).
        ss, sss, sys_ = (np.empty(tc_g.shape) for _ in range(3))
        for b in _row_chunks(len(Y), max(1, 2_000_000 // max(tc_g.shape[1] * len(t), 1))):
            S = ramp(t[None, None, :], tc_g[b, :, None], w_g[b, :, None], k_g[b, :, None])  # (rows, G, F)
            ss[b] = np.einsum("bf,bgf->bg", W[b], S)
            sss[b] = np.einsum("bf,bgf->bg", W[b], S ** 2)
            sys_[b] = np.einsum("bf,bgf->bg", Yz[b], S)
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

def _unit_matrix(index: np.ndarray, n_rows: int):
    """Sparse (n_rows, len(index)) one-hot matrix summing rows of a chunk into their unit x species row."""
    from scipy import sparse

    return sparse.csr_matrix((np.ones(len(index)), (index, np.arange(len(index)))), shape=(n_rows, len(index)))


def _complex_normal(variance: np.ndarray, pseudo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Complex Gaussian noise with ``E|D|^2 = variance`` and ``E D^2 = pseudo`` (elementwise)."""
    v_rr = np.maximum(0.5 * (variance + pseudo.real), 0.0)
    v_ii = np.maximum(0.5 * (variance - pseudo.real), 0.0)
    v_ri = 0.5 * pseudo.imag
    z1 = rng.standard_normal(variance.shape)
    z2 = rng.standard_normal(variance.shape)
    s_rr = np.sqrt(v_rr)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(s_rr > 0, v_ri / s_rr, 0.0)
    return s_rr * z1 + 1j * (c * z1 + np.sqrt(np.maximum(v_ii - c ** 2, 0.0)) * z2)


@dataclass
class Signal:
    """A per-frame order parameter kept as sums per bootstrap unit, species and frame.

    The bootstrap resamples whole units (spatial tiles of trajectories, or single
    trajectories) and, for angles with a posterior spread, redraws every angle within it;
    both need only these sums, so memory is units x species x frames whatever the number of
    trajectories.

    Attributes
    ----------
    total : array (unit, species, frame)
        Sum of unit phasors ``exp(i m angle)`` ("resultant") or of values ("mean").
    count : array (unit, species, frame)
        Number of values summed.
    shrunk, variance, pseudo : arrays (unit, species, frame), optional
        For angles ``a`` with posterior sd ``s``: the sums of ``u * A``, ``1 - A^2`` and
        ``u^2 (A^4 - A^2)`` with ``u = exp(i m a)`` and ``A = exp(-(m s)^2 / 2)``: mean, variance
        and pseudo-variance of the phasor sum when each angle is redrawn from N(a, s^2). The
        sum over many particles is Gaussian, so a redraw of a unit's sum is drawn from them.
    """

    name: str
    kind: str  #: "resultant" (species-wise |mean phasor|, count-weighted) or "mean" (species pooled)
    total: np.ndarray
    count: np.ndarray
    n_trajectories: int
    shrunk: np.ndarray | None = None
    variance: np.ndarray | None = None
    pseudo: np.ndarray | None = None

    @property
    def n_units(self) -> int:
        return self.total.shape[0]

    debias: bool = False  #: fit |<u>| without its noise floor: sqrt(max(0, |sum u|^2 - count)) per species

    def _combine(self, total: np.ndarray, count: np.ndarray) -> np.ndarray:
        if self.kind == "resultant" and self.debias:
            # N random phasors have |sum|^2 = N on average: the floor sqrt(pi / 4N) of |<u>|
            # hides the start of an ordering and drags a fitted step late.
            num = np.sqrt(np.maximum(np.abs(total) ** 2 - count, 0.0)).sum(axis=-2)
        elif self.kind == "resultant":
            num = np.abs(total).sum(axis=-2)
        else:
            num = np.real(total).sum(axis=-2)
        den = count.sum(axis=-2)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    def series(self) -> np.ndarray:
        """The signal of all trajectories, (frame,)."""
        return self._combine(self.total.sum(axis=0), self.count.sum(axis=0))

    def expected_series(self) -> np.ndarray:
        """The signal's mean over redraws of the angles within their posterior (= :meth:`series` without spreads)."""
        if self.shrunk is None:
            return self.series()
        return self._combine(self.shrunk.sum(axis=0), self.count.sum(axis=0))

    def resampled(self, weights: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The signal of resampled units, (resample, frame).

        ``weights`` (resample, unit) are the multiplicities of each unit in each resample;
        with ``rng`` (and spreads) every angle is also redrawn within its posterior.
        """
        w = np.asarray(weights, dtype=float)
        count = np.einsum("bg,gsf->bsf", w, self.count)
        if rng is None or self.shrunk is None:
            return self._combine(np.einsum("bg,gsf->bsf", w, self.total), count)
        total = np.einsum("bg,gsf->bsf", w, self.shrunk)
        total = total + _complex_normal(np.einsum("bg,gsf->bsf", w, self.variance),
                                        np.einsum("bg,gsf->bsf", w, self.pseudo), rng)
        return self._combine(total, count)


def phasor_signal(name: str, theta: np.ndarray, order: np.ndarray, species: np.ndarray, units: np.ndarray,
                  n_units: int, n_species: int, *, angle_sd: np.ndarray | None = None,
                  flip_prob: np.ndarray | None = None, chunk: int = 4096) -> Signal:
    """Signal ``S = |<exp(i m angle)>|`` (species-wise, count-weighted) built in chunks of trajectories.

    Parameters
    ----------
    theta : array (particle, frame), or a :class:`RowView` of one
        Angles, rad (NaN = absent); read ``chunk`` trajectories at a time.
    order : int array (particle,)
        Order ``m`` of each trajectory; 0 leaves it out (isotropic particles have no angle).
    species, units : int arrays (particle,)
        Species index and bootstrap unit of each trajectory.
    angle_sd : array (particle, frame), optional
        Posterior sd of each angle, rad (NaN = not known: that angle is not redrawn).
    flip_prob : array (particle, frame), optional
        Posterior probability that the particle points the other way (angle + pi): redrawn
        too; it matters for odd orders only (an even order cannot tell the two ends apart).
    chunk : int
        Trajectories processed at once (memory ``chunk x frames``).
    """
    n_p, n_f = theta.shape
    shape = (n_units * n_species, n_f)
    total = np.zeros(shape, dtype=complex)
    count = np.zeros(shape)
    spread = angle_sd is not None
    shrunk = np.zeros(shape, dtype=complex) if spread else None
    variance = np.zeros(shape) if spread else None
    pseudo = np.zeros(shape, dtype=complex) if spread else None
    m_all = np.asarray(order, dtype=float)
    n_traj = 0
    for lo in range(0, n_p, chunk):
        hi = min(n_p, lo + chunk)
        m = m_all[lo:hi, None]
        th = np.asarray(theta[lo:hi], dtype=float)
        valid = np.isfinite(th) & (m > 0)
        n_traj += int(valid.any(axis=1).sum())
        u = np.where(valid, np.exp(1j * m * np.where(valid, th, 0.0)), 0.0)
        S = _unit_matrix(units[lo:hi] * n_species + species[lo:hi], shape[0])
        total += S @ u
        count += S @ valid.astype(float)
        if spread:
            sd = np.asarray(angle_sd[lo:hi], dtype=float)
            a = np.where(valid & np.isfinite(sd), np.exp(-0.5 * (m * np.nan_to_num(sd)) ** 2), 1.0)
            a = np.where(valid, a, 0.0)
            # E exp(i m d) and E exp(2 i m d) of the redrawn offset d: Gaussian within the
            # half-circle, and a flip by pi (probability q) turns the phasor over for odd m.
            a1 = a
            if flip_prob is not None:
                q = np.clip(np.nan_to_num(np.asarray(flip_prob[lo:hi], dtype=float)), 0.0, 1.0)
                a1 = np.where(np.mod(m, 2) == 1, a * (1.0 - 2.0 * q), a)
            shrunk += S @ (u * a1)
            variance += S @ np.where(valid, 1.0 - a1 ** 2, 0.0)
            pseudo += S @ (u ** 2 * (a ** 4 - a1 ** 2))

    def cube(v):
        return None if v is None else v.reshape(n_units, n_species, n_f)

    return Signal(name, "resultant", cube(total), cube(count), n_traj, cube(shrunk), cube(variance), cube(pseudo))


def bootstrap_units(tiles: np.ndarray | None, n_particles: int) -> tuple[np.ndarray, int]:
    """Bootstrap unit of every trajectory: its spatial tile, or itself when fewer than 4 tiles are occupied.

    Trajectories without a position (tile -1) form a unit of their own.
    """
    if tiles is not None:
        occupied, units = np.unique(tiles, return_inverse=True)
        if (occupied >= 0).sum() >= 4:
            return units.astype(int), len(occupied)
    return np.arange(n_particles), n_particles


def estimate_transition(
    signal: Signal,
    frames: np.ndarray,
    *,
    n_boot: int = 200,
    confidence: float = 0.95,
    min_frames: int = 10,
    min_particles: int = 5,
    min_delta_bic: float = 10.0,
    model: str = "logistic",
    changepoint_tolerance: float = 3.0,
    resample_angles: bool = True,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Fit a step to a per-frame signal, cross-check it with a change point, and bootstrap an interval.

    Parameters
    ----------
    signal : Signal
        The order parameter, as sums per bootstrap unit.
    frames : array (frame,)
        Frame numbers.
    n_boot : int
        Resamples (0 = no interval). Each draws the units (spatial tiles of trajectories, or
        single trajectories) with replacement and, with ``resample_angles``, redraws every angle
        within its posterior sd, so the interval holds both the sampling of particles and the
        uncertainty of each angle.
    confidence : float
        Coverage of the interval.
    min_frames, min_particles : int
        Below these the fit is skipped and ``note`` says why.
    min_delta_bic : float
        Evidence (BIC over the effective number of frames) a step needs over a constant.
    model : {"logistic", "saturating"}
        The step fitted (see :func:`ramp`); ``saturating`` is the AFM-on-mica model.
    changepoint_tolerance : float
        A step counts as a transition only when the single change point in the mean lies
        within ``max(changepoint_tolerance, 2 width)`` frames of the order parameter's own
        (logistic) midpoint: a drift or a lone outlier frame fits a step but has no abrupt
        change at its centre.

    Returns
    -------
    dict
        ``frame`` (t_c in frames; NaN when no transition), ``low``/``high`` (interval, frames;
        NaN when no transition), ``width`` (frames), ``level_before``/``level_after``,
        ``delta_bic``, ``changepoint_frame``, ``logistic_frame`` (the order parameter's own
        midpoint), ``changepoint_agrees`` (bool), ``detected`` (bool), ``n_boot`` (successful
        resamples), ``note`` ('' when a transition was found).
    """
    rng = rng or np.random.default_rng(0)
    frames = np.asarray(frames, dtype=float)
    if signal.kind == "resultant":
        signal = dataclasses.replace(signal, debias=True)
    y = signal.series()
    out: dict[str, Any] = {"signal": signal.name, "model": model, "frame": math.nan, "low": math.nan,
                           "high": math.nan, "width": math.nan, "saturation": math.nan, "level_before": math.nan,
                           "level_after": math.nan, "delta_bic": math.nan, "changepoint_frame": math.nan,
                           "logistic_frame": math.nan, "changepoint_agrees": False, "detected": False,
                           "n_boot": 0, "note": ""}
    n_valid_frames = int(np.isfinite(y).sum())
    if n_valid_frames < min_frames or signal.n_trajectories < min_particles:
        out["note"] = (f"{signal.name}: no transition fit: {n_valid_frames} frame(s) with data and "
                       f"{signal.n_trajectories} particle(s); need at least {min_frames} frames and "
                       f"{min_particles} particles")
        return out
    out["changepoint_frame"] = change_point(frames, y)
    fit = fit_logistic(frames, y, model)
    if fit is None:
        out["note"] = f"{signal.name}: the step fit did not converge"
        return out
    plain = fit if model == "logistic" else fit_logistic(frames, y, "logistic")
    out.update(frame=fit.t_c, width=fit.width, saturation=fit.saturation, level_before=fit.low,
               level_after=fit.high, delta_bic=fit.delta_bic,
               logistic_frame=plain.t_c if plain is not None else math.nan)
    edge = fit.t_c - frames.min() < 0.5 or frames.max() - fit.t_c < 0.5
    rising = fit.high > fit.low
    if plain is not None and np.isfinite(out["changepoint_frame"]):
        tolerance = max(float(changepoint_tolerance), 2.0 * plain.width)
        out["changepoint_agrees"] = bool(abs(out["changepoint_frame"] - plain.t_c) <= tolerance)
    out["detected"] = bool(fit.delta_bic >= min_delta_bic and not edge and rising and out["changepoint_agrees"])
    if not rising:
        out["note"] = f"{signal.name}: no ordering transition detected (the best step lowers the order)"
    elif fit.delta_bic < min_delta_bic:
        out["note"] = (f"{signal.name}: no transition detected (a step beats a constant by "
                       f"delta BIC {fit.delta_bic:.1f} < {min_delta_bic:g})")
    elif edge:
        out["note"] = f"{signal.name}: no transition detected (the fitted step lies at the edge of the movie)"
    elif not out["changepoint_agrees"]:
        out["note"] = (f"{signal.name}: no transition detected (the change point, frame "
                       f"{out['changepoint_frame']:.1f}, disagrees with the step's midpoint "
                       f"{out['logistic_frame']:.1f})")
    if not out["detected"]:
        out["frame"] = math.nan
        return out
    if n_boot > 0:
        picks = rng.integers(0, signal.n_units, (n_boot, signal.n_units))
        weights = np.stack([np.bincount(p, minlength=signal.n_units) for p in picks])
        Y = signal.resampled(weights, rng if resample_angles else None)
        tcb, *_, rssb = fit_logistic_many(frames, Y, model)
        t_boot = tcb[np.isfinite(rssb)]
        # The resamples are fitted on the grid only, so their spread is taken relative to the
        # grid fit of the signal they scatter around (with the angles' posterior shrinkage when
        # they are redrawn) and centred on the polished estimate: the grid's discreteness and
        # the shrinkage then shift neither end.
        reference = signal.expected_series() if resample_angles else y
        ref_tc = float(fit_logistic_many(frames, reference[None, :], model)[0][0]) if resample_angles \
            else fit.grid_t_c
        out["n_boot"] = len(t_boot)
        if len(t_boot) >= 10:
            a = (1 - confidence) / 2
            # Resampling G units with replacement gives a spread (G-1)/G of the true variance and
            # normal rather than Student-t tails: with the 16 tiles of the default that narrows the
            # interval by about 11 %, so the deviations are scaled back (factor -> 1 for large G).
            from scipy import stats

            g = signal.n_units
            factor = math.sqrt(g / (g - 1)) * stats.t.ppf(1 - a, g - 1) / stats.norm.ppf(1 - a) if g > 2 else 1.0
            # Symmetric about the estimate: the resamples' |deviation| from the reference, so a
            # skewed or shifted bootstrap distribution widens both ends instead of moving one.
            half = factor * float(np.quantile(np.abs(t_boot - ref_tc), confidence))
            lo, hi = fit.t_c - half, fit.t_c + half
            # One sample per frame cannot resolve an interval narrower than the sampling.
            out["low"] = float(min(lo, fit.t_c - 0.5))
            out["high"] = float(max(hi, fit.t_c + 0.5))
    return out


# --------------------------------------------------------------------------- species


#: Symmetry order assumed (with a note) when neither the config nor the latents give one.
ASSUMED_SYMMETRY = 2


def _as_order(value) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 0 and float(value) == n else None


def species_from_attrs(attrs: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The species table the encode stage records in ``latents.zarr`` attrs, read defensively.

    Accepts ``species`` (a list, or JSON text of a list, of ``{"name", "symmetry", "cls"}``;
    symmetry 0 = isotropic), ``species_symmetry`` (``{name: n}`` or a list of n) or a plain
    ``symmetry`` (one n, or a list). Returns None when none is present or readable.
    """
    def load(value):
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return None
        return value

    for key in ("species", "species_symmetry", "symmetry"):
        value = load(attrs.get(key))
        if value is None or value == "" or value == []:
            continue
        if isinstance(value, dict):
            value = [{"name": str(k), "symmetry": v} for k, v in value.items()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        table = []
        for k, entry in enumerate(value):
            if isinstance(entry, dict):
                n = _as_order(entry.get("symmetry", entry.get("symmetry_order", entry.get("n"))))
                row = {"name": str(entry.get("name", f"species{k}")), "symmetry": n}
                cls = entry.get("cls", entry.get("label"))
                if cls is not None and cls != "":
                    row["cls"] = cls
            else:
                row = {"name": f"species{k}" if len(value) > 1 else "particle", "symmetry": _as_order(entry)}
            if row["symmetry"] is None:
                break
            table.append(row)
        else:
            if table:
                return table
    return None


def _particle_classes(latents: xr.Dataset, tracks: pd.DataFrame | None) -> np.ndarray | None:
    """The class of every trajectory: ``cls(particle)`` of the latents, else the majority ``cls`` in the tracks."""
    if "cls" in latents.variables and latents["cls"].dims == ("particle",):
        return np.asarray(latents["cls"].values)
    if tracks is not None and "cls" in tracks.columns and "particle" in tracks.columns:
        majority = tracks.groupby("particle")["cls"].agg(lambda s: s.mode().iloc[0] if len(s.mode()) else np.nan)
        return majority.reindex(latents["particle"].values).to_numpy()
    return None


def _class_key(value) -> str:
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def _rows_with_values(latents: xr.Dataset, name: str, chunk: int) -> np.ndarray:
    """(particle,) bool: the trajectory has a finite value of ``name`` in some frame (read in chunks)."""
    grids = LatentGrids(latents, chunk)
    return np.concatenate([np.isfinite(grids.raw(name, rows)).any(axis=1)
                           for rows in _row_chunks(grids.shape[0], chunk)] or [np.zeros(0, dtype=bool)])


def _trajectory_means(latents: xr.Dataset, name: str, chunk: int) -> np.ndarray:
    """(particle, ...) mean over frames of a variable, NaN-aware (read in chunks of trajectories)."""
    grids = LatentGrids(latents, chunk)
    with np.errstate(invalid="ignore"), _quiet():
        return np.concatenate([np.nanmean(grids.raw(name, rows), axis=1)
                               for rows in _row_chunks(grids.shape[0], chunk)])


def assign_species(latents: xr.Dataset, tracks: pd.DataFrame | None, settings: dict[str, Any],
                   notes: list[str] | None = None) -> tuple[np.ndarray, list[dict[str, Any]], str]:
    """Species index of every trajectory, the species table, and how it was assigned.

    The table is, in order of precedence: ``dynamics.species`` of the config; the species the
    encode stage recorded in the latents' attrs (:func:`species_from_attrs`); one species of
    order ``dynamics.symmetry``, else of the order recorded in the latents, else of order
    :data:`ASSUMED_SYMMETRY` with a note saying so. Symmetry 0 means isotropic (no angle).

    A class value (``cls``) that matches no species is an error naming it: counting it as
    some species would mix particles silently.

    Returns
    -------
    species : int array (particle,)
    table : list of {"name", "symmetry", "source"}
    method : str
        "single", "latents" (the encode stage's ``species(particle)``), "cls" or "gmm".
    """
    notes = notes if notes is not None else []
    n_particles = latents.sizes["particle"]
    listed, source = settings.get("species") or [], "config"
    if not listed:
        recorded = species_from_attrs(latents.attrs)
        if settings.get("symmetry") is not None:
            listed, source = [{"name": "particle", "symmetry": int(settings["symmetry"])}], "config"
        elif recorded:
            listed, source = recorded, "latents"
        else:
            listed, source = [{"name": "particle", "symmetry": ASSUMED_SYMMETRY}], "assumed"
            notes.append(f"symmetry order unknown (no dynamics.symmetry and none recorded in the latents): "
                         f"n = {ASSUMED_SYMMETRY} assumed, angles compared modulo pi; set dynamics.symmetry")
    table = [{"name": str(s.get("name", f"species{k}")), "symmetry": int(s["symmetry"]), "source": source}
             for k, s in enumerate(listed)]
    if len(table) == 1 and settings["species_from"] != "cls":
        return np.zeros(n_particles, dtype=int), table, "single"
    chunk = int(settings.get("chunk", 4096))
    # Trajectories without any window carry no data: their class (often a placeholder) is moot.
    has_data = _rows_with_values(latents, "x", chunk)
    recorded_index = latents.variables.get("species")
    if source == "latents" and recorded_index is not None and recorded_index.dims == ("particle",):
        # The encode stage's own species index of every trajectory (-1 = none found).
        index = np.asarray(recorded_index.values)
        if np.issubdtype(index.dtype, np.number):
            index = np.where(np.isfinite(index), index, -1).astype(int)
            # -1 marks trajectories the encode stage could not place (no finite z): without an
            # angle they add to no species' statistic, so only those with angles must be placed.
            has_angle = _rows_with_values(latents, "angle", chunk)
            bad = has_angle & ((index < 0) | (index >= len(table)))
            if bad.any():
                raise InputError(f"latents.zarr: species index of {int(bad.sum())} trajectories with windows is "
                                 f"{', '.join(map(str, sorted(set(index[bad].tolist()))))}; expected 0..{len(table) - 1} "
                                 "(the species recorded in the attrs)")
            return np.where(bad | (index < 0) | (index >= len(table)), 0, index), table, "latents"
    cls = _particle_classes(latents, tracks) if settings["species_from"] in ("auto", "cls") else None
    if cls is None and settings["species_from"] == "cls":
        raise InputError("latents.zarr / tracks.parquet: dynamics.species_from is 'cls' but neither has a "
                         "'cls' variable/column giving each particle's class")
    if cls is not None:
        keys = [_class_key(s.get("cls", k)) for k, s in enumerate(listed)]
        # A class may also carry the species' name (classifiers store class names).
        lookup = {str(s.get("name")): idx for idx, s in enumerate(listed) if s.get("name")}
        lookup.update({key: idx for idx, key in enumerate(keys)})
        labels = np.array([_class_key(c) for c in cls], dtype=object)
        labels = np.where(has_data, labels, keys[0])
        labels = np.where(np.isin(labels, ["", "nan", "None"]), "(none)", labels)
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            where = "dynamics.species" if source == "config" else "the species recorded in latents.zarr"
            raise InputError(f"latents.zarr / tracks.parquet: cls value(s) {', '.join(unknown)} of "
                             f"{int(np.isin(labels, unknown).sum())} trajectories match no species of {where} "
                             f"(cls values {', '.join(keys)}); list a species for each class")
        return np.array([lookup[c] for c in labels], dtype=int), table, "cls"
    if "z" not in latents.variables:
        raise InputError("latents.zarr: several species are configured but there is no 'cls' and no 'z' "
                         "to tell them apart")
    from sklearn.mixture import GaussianMixture

    zmean = _trajectory_means(latents, "z", chunk)
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


def _tracks_rows(tracks: pd.DataFrame, column: str, particles: np.ndarray, frames: np.ndarray) -> RowView:
    """(particle, frame) grid of a tracks column, read by trajectory chunks (NaN where absent; mean of duplicates)."""
    ids = tracks["particle"].to_numpy()

    def read(rows: slice) -> np.ndarray:
        wanted = particles[rows]
        part = tracks[np.isin(ids, wanted)]
        pivot = part.pivot_table(index="particle", columns="frame", values=column, aggfunc="mean")
        return pivot.reindex(index=wanted, columns=frames).to_numpy(dtype=float)

    return RowView((len(particles), len(frames)), read)


def _lcm_orders(symmetry: np.ndarray, order: int) -> np.ndarray:
    """``lcm(n, order)`` of every n, 0 where n is 0 (isotropic: no angle to take an order of)."""
    n = np.asarray(symmetry, dtype=int)
    return np.where(n > 0, np.lcm(np.maximum(n, 1), int(order)), 0)


def _frame_chunks(n_frames: int, per_frame: int, budget: int = 4_000_000):
    """Slices of frames holding at most about ``budget`` values when each frame holds ``per_frame``."""
    step = max(1, budget // max(per_frame, 1))
    for lo in range(0, n_frames, step):
        yield slice(lo, min(n_frames, lo + step))


# --------------------------------------------------------------------------- reading in blocks


def _row_chunks(n_rows: int, chunk: int, start: int = 0):
    """Slices of at most ``chunk`` trajectories covering ``start`` .. ``n_rows``."""
    for lo in range(start, n_rows, chunk):
        yield slice(lo, min(n_rows, lo + chunk))


@dataclass
class RowView:
    """A (particle, frame[, ...]) grid read by trajectory chunks: ``view[lo:hi]`` is a numpy array.

    Steps that work trajectory by trajectory take one instead of a whole grid, so only the
    chunk they work on is ever in memory.
    """

    shape: tuple[int, ...]
    read: Any  #: callable(rows: slice) -> numpy array of those trajectories

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.read(rows)


@dataclass
class LatentGrids:
    """The (particle, frame) variables of ``latents.zarr``, read a block at a time, never whole.

    :meth:`read` masks as the stage counts values: only where the trajectory has a position
    (``x`` and ``y`` finite) and, for ``angle``, only for trajectories whose angle means
    something (``angle_rows``, set once the species are known).
    """

    latents: xr.Dataset
    chunk: int = 1024  #: trajectories read at once
    angle_rows: np.ndarray | None = None  #: (particle,) bool
    _positions: tuple = ()  #: ((rows, frames), x, y) of the last block read: steps read several variables of one block

    @property
    def shape(self) -> tuple[int, int]:
        return self.latents.sizes["particle"], self.latents.sizes["frame"]

    def raw(self, name: str, rows: slice = slice(None), frames: slice = slice(None)) -> np.ndarray:
        """One variable on (particle, frame[, latent]) for those trajectories and frames, unmasked (float).

        Read ``chunk`` trajectories (or one store chunk of them, if larger) at a time: Zarr
        decodes every store chunk a selection touches at once, and the store's chunks span
        many frames, so a block of frames of all trajectories read in one go would decode the
        whole grid.
        """
        v = self.latents[name]
        stored = v.encoding.get("chunks") or ()
        along = dict(zip(v.dims, stored)).get("particle", 1)
        v = v.transpose("particle", "frame", ...)
        start, stop, _ = rows.indices(self.shape[0])
        parts = [np.asarray(v.isel(particle=piece, frame=frames).values, dtype=float)
                 for piece in _row_chunks(stop, max(self.chunk, int(along)), start)]
        if not parts:  # no trajectory selected: an empty block of the right shape
            return np.asarray(v.isel(particle=rows, frame=frames).values, dtype=float)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def read(self, name: str, rows: slice = slice(None), frames: slice = slice(None)) -> np.ndarray:
        """One variable (or ``present``) for those trajectories and frames, NaN where it does not count."""
        x, y = self.positions(rows, frames)
        present = np.isfinite(x) & np.isfinite(y)
        if name == "present":
            return present
        v = {"x": x, "y": y}.get(name)
        v = self.raw(name, rows, frames) if v is None else v
        v = np.where(present.reshape(present.shape + (1,) * (v.ndim - 2)), v, np.nan)
        if name == "angle" and self.angle_rows is not None:
            v = np.where(self.angle_rows[rows][:, None], v, np.nan)
        return v

    def positions(self, rows: slice, frames: slice) -> tuple[np.ndarray, np.ndarray]:
        """``x`` and ``y`` of one block (px, unmasked), kept until another block is read."""
        key = (rows.start, rows.stop, rows.step, frames.start, frames.stop, frames.step)
        cached = self._positions  # one reference: blocks may be computed in threads
        if not cached or cached[0] != key:
            cached = (key, self.raw("x", rows, frames), self.raw("y", rows, frames))
            self._positions = cached
        return cached[1], cached[2]

    def rows(self, name: str) -> RowView:
        """A :class:`RowView` of :meth:`read` of one variable."""
        return RowView(self.shape, lambda rows: self.read(name, rows))


@dataclass
class TrajectoryScan:
    """What one pass over the trajectories learns before any step: per trajectory and per frame."""

    track_length: np.ndarray  #: (particle,) frames with a position
    n_present: np.ndarray  #: (frame,) trajectories with a position
    mean_x: np.ndarray  #: (particle,) px, NaN without a position
    mean_y: np.ndarray
    box: tuple[float, float, float, float] | None  #: (x0, x1, y0, y1) of every position, px
    n_angles: int  #: finite angles where a position is
    angle_range: tuple[float, float]  #: smallest and largest of them, rad


def scan_trajectories(grids: LatentGrids, chunk: int) -> TrajectoryScan:
    """Counts, mean positions, field of view and the range of the angles, in one pass of trajectory chunks."""
    n_p, n_f = grids.shape
    length = np.zeros(n_p, dtype=int)
    n_present = np.zeros(n_f, dtype=int)
    mean_x, mean_y = np.full(n_p, np.nan), np.full(n_p, np.nan)
    lo_hi = [np.inf, -np.inf, np.inf, -np.inf]
    n_angles, a_lo, a_hi = 0, np.inf, -np.inf
    for rows in _row_chunks(n_p, chunk):
        x, y, theta = grids.read("x", rows), grids.read("y", rows), grids.read("angle", rows)
        present = np.isfinite(x) & np.isfinite(y)
        length[rows] = present.sum(axis=1)
        n_present += present.sum(axis=0)
        with _quiet():
            mean_x[rows], mean_y[rows] = np.nanmean(x, axis=1), np.nanmean(y, axis=1)
        if present.any():
            lo_hi = [min(lo_hi[0], x[present].min()), max(lo_hi[1], x[present].max()),
                     min(lo_hi[2], y[present].min()), max(lo_hi[3], y[present].max())]
        finite = theta[np.isfinite(theta)]
        if finite.size:
            n_angles += finite.size
            a_lo, a_hi = min(a_lo, finite.min()), max(a_hi, finite.max())
    box = tuple(float(v) for v in lo_hi) if np.isfinite(lo_hi[0]) else None
    return TrajectoryScan(length, n_present, mean_x, mean_y, box, n_angles, (float(a_lo), float(a_hi)))


@dataclass
class Movie:
    """One movie's trajectories and what every step needs to know about them.

    The (particle, frame) grids stay in ``latents.zarr``: ``theta``, ``angle_sd``,
    ``flip_prob``, ``x`` and ``y`` are :class:`RowView` s read ``chunk`` trajectories at a
    time, and :meth:`frame_blocks` / :meth:`read` give all trajectories over a few frames.
    """

    frames: np.ndarray
    particles: np.ndarray
    grids: LatentGrids
    theta: RowView  #: (particle, frame) rad; NaN where absent, for isotropic species and without angles
    angle_sd: RowView | None  #: posterior sd of theta, rad (None = not recorded)
    flip_prob: RowView | None  #: posterior probability of theta + pi (None = not recorded)
    x: RowView  #: (particle, frame) px, NaN where absent
    y: RowView
    track_length: np.ndarray  #: (particle,) frames with a position
    n_present: np.ndarray  #: (frame,) trajectories with a position
    box: tuple[float, float, float, float] | None  #: field of view of every position (x0, x1, y0, y1), px
    species: np.ndarray  #: (particle,) index into ``table``
    table: list[dict[str, Any]]  #: {"name", "symmetry" (0 = isotropic), "source"}
    species_method: str
    symmetry: np.ndarray  #: (particle,) n of the particle's species
    units: np.ndarray  #: (particle,) bootstrap unit
    n_units: int
    angles: str  #: "rVAE", "absent" (all NaN) or "constant" (one value: no pose)
    dt: float
    time_unit: str
    frame_interval: float | None
    pixel_size: float
    pixel_unit: str
    chunk: int
    notes: list[str] = field(default_factory=list)

    @property
    def oriented(self) -> np.ndarray:
        """(particle,) bool: the particle has an angle that means something (species not isotropic, angles present)."""
        return (self.symmetry > 0) & (self.angles == "rVAE")

    @property
    def n_species(self) -> int:
        return len(self.table)

    def row_chunks(self):
        """Slices of at most ``chunk`` trajectories."""
        return _row_chunks(len(self.particles), self.chunk)

    def frame_blocks(self):
        """Slices of frames holding about as many values as ``chunk`` whole trajectories (one when the movie has fewer)."""
        n_p, n_f = len(self.particles), len(self.frames)
        return _frame_chunks(n_f, n_p, budget=self.chunk * n_f)

    def read(self, name: str, frames: slice) -> np.ndarray:
        """All trajectories' values of one variable (or ``present``) over a slice of frames."""
        return self.grids.read(name, frames=frames)


def prepare_movie(latents: xr.Dataset, tracks: pd.DataFrame | None, settings: dict[str, Any]) -> Movie:
    """Units, species, symmetry orders and bootstrap units of one movie, with lazy views of its grids.

    A trajectory is present in a frame when it has a position there. Angles that are all NaN
    (a pose-less model) or all one value (a model that stores no pose) are "no angles": the
    angle-based order parameters, rotational dynamics and the angle-based transition fit are
    then skipped with a note, never reported as order.
    """
    notes: list[str] = []
    frames = np.asarray(latents["frame"].values) if "frame" in latents.coords else np.arange(latents.sizes["frame"])
    particles = (np.asarray(latents["particle"].values) if "particle" in latents.coords
                 else np.arange(latents.sizes["particle"]))
    chunk = int(settings["chunk"])
    grids = LatentGrids(latents, chunk)
    scan = scan_trajectories(grids, chunk)
    angles = "rVAE"
    if scan.n_angles == 0:
        angles = "absent"
        raw = "angle_raw" in latents.variables and np.isfinite(latents["angle_raw"].values).any()
        why = "every species is isotropic, so encode stored no lab-frame angle" if raw else "a pose-less model"
        notes.append(f"no angles: the latents hold no finite angle ({why}); angle-based order "
                     "parameters, rotational diffusion and the angle-based transition fit are skipped")
    elif scan.n_angles > 1 and scan.angle_range[0] == scan.angle_range[1]:
        angles = "constant"
        notes.append(f"no angles: every angle in the latents is {scan.angle_range[0]:g} (a model without pose); "
                     "angle-based order parameters, rotational diffusion and the angle-based transition fit are skipped")
    angle_sd = flip_prob = None
    if "angle_sd" in latents.variables and settings.get("resample_angles", True):
        angle_sd = grids.rows("angle_sd")
        if "flip_prob" in latents.variables:
            flip_prob = grids.rows("flip_prob")

    frame_interval = _attr_number(latents.attrs, "frame_interval")
    pixel_size = _attr_number(latents.attrs, "pixel_size")
    pixel_unit = latents.attrs.get("pixel_unit") or "px"
    if pixel_size is None:
        pixel_size, pixel_unit = 1.0, "px"
    if not frame_interval:
        notes.append("frame_interval unknown: times and rates are per frame")

    species, table, method = assign_species(latents, tracks, settings, notes)
    symmetry = np.array([table[s]["symmetry"] for s in species], dtype=int)
    for spec in table:
        if spec["symmetry"] == 0:
            notes.append(f"{spec['name']}: isotropic (symmetry 0): no orientation, so no angle-based order "
                         "parameter and no rotational diffusion")
    grids.angle_rows = (symmetry > 0) & (angles == "rVAE")
    units, n_units = bootstrap_units(_tiles(scan.mean_x, scan.mean_y, int(settings["bootstrap_tiles"])), len(particles))
    return Movie(frames=frames, particles=particles, grids=grids, theta=grids.rows("angle"), angle_sd=angle_sd,
                 flip_prob=flip_prob, x=grids.rows("x"), y=grids.rows("y"), track_length=scan.track_length,
                 n_present=scan.n_present, box=scan.box, species=species, table=table, species_method=method,
                 symmetry=symmetry, units=units, n_units=n_units, angles=angles, dt=frame_interval or 1.0,
                 time_unit="s" if frame_interval else "frame", frame_interval=frame_interval,
                 pixel_size=pixel_size, pixel_unit=pixel_unit, chunk=chunk, notes=notes)


def frame_counts(movie: Movie) -> xr.Dataset:
    """Coordinates (``frame``, ``time``, ``particle``), species and symmetry per trajectory, counts."""
    ds = xr.Dataset(coords={"frame": movie.frames, "particle": movie.particles})
    ds = ds.assign_coords(time=("frame", movie.frames * movie.dt))
    ds["time"].attrs.update(units=movie.time_unit, long_name="time since frame 0")
    ds["species"] = ("particle", movie.species)
    ds["species"].attrs["description"] = "species index (see attrs species)"
    ds["symmetry"] = ("particle", movie.symmetry)
    ds["symmetry"].attrs["description"] = "rotational symmetry order n of the trajectory's species (0 = isotropic)"
    ds["n_particles"] = ("frame", movie.n_present.astype(int))
    ds["track_length"] = ("particle", movie.track_length.astype(int))
    return ds


def latent_statistics(movie: Movie, latents: xr.Dataset, settings: dict[str, Any]) -> xr.Dataset:
    """Per-frame mean, spread, quantiles and histograms of every content latent, means of ``dx``, ``dy``.

    Computed in chunks of frames (all trajectories of a frame are needed for its quantiles).
    """
    ds = xr.Dataset(coords={"frame": movie.frames})
    n_p, n_f = len(movie.particles), len(movie.frames)
    quantiles = np.asarray(settings["quantiles"], dtype=float)
    bins = int(settings["histogram_bins"])
    if "z" in latents.variables:
        z_all = latents["z"].transpose("particle", "frame", "latent")
        n_lat = z_all.sizes["latent"]
        lat_coord = np.asarray(latents["latent"].values) if "latent" in latents.coords else np.arange(n_lat)
        ds = ds.assign_coords(latent=lat_coord, quantile=quantiles)
        edges = np.empty((n_lat, bins + 1))
        for k in range(n_lat):
            # Histogram edges from a subsample of the values: the range, not the exact extremes.
            sample = np.asarray(z_all.isel(latent=k, frame=slice(None, None, max(1, n_f // 64))).values, dtype=float)
            vals = sample[np.isfinite(sample)]
            lo, hi = (np.quantile(vals, [0.005, 0.995]) if vals.size else (0.0, 1.0))
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
            edges[k] = np.linspace(lo, hi, bins + 1)
        mean = np.full((n_f, n_lat), np.nan)
        sd = np.full((n_f, n_lat), np.nan)
        quant = np.full((n_f, n_lat, len(quantiles)), np.nan)
        hist = np.zeros((n_f, n_lat, bins), dtype=np.int32)
        # Blocks of frames as large as the trajectory chunks (the quantiles need all trajectories of a frame).
        for sl in _frame_chunks(n_f, n_p * n_lat, budget=movie.chunk * n_f):
            z = movie.read("z", sl)
            with np.errstate(invalid="ignore"), _quiet():
                mean[sl] = np.nanmean(z, axis=0)
                if n_p > 1:
                    sd[sl] = np.nanstd(z, axis=0, ddof=1)
                quant[sl] = np.moveaxis(np.nanquantile(z, quantiles, axis=0), 0, -1)
            for j, f in enumerate(range(sl.start, sl.stop)):
                for k in range(n_lat):
                    col = z[:, j, k]
                    hist[f, k] = np.histogram(col[np.isfinite(col)], edges[k])[0]
        ds["z_mean"] = (("frame", "latent"), mean)
        ds["z_sd"] = (("frame", "latent"), sd)
        ds["z_quantile"] = (("frame", "latent", "quantile"), quant)
        ds["z_hist"] = (("frame", "latent", "z_bin"), hist)
        ds["z_hist_edges"] = (("latent", "z_edge"), edges)
    for name in ("dx", "dy"):
        if name in latents.variables:
            mean, sd = np.full(n_f, np.nan), np.full(n_f, np.nan)
            for sl in movie.frame_blocks():
                v = movie.read(name, sl)
                with _quiet():
                    mean[sl], sd[sl] = np.nanmean(v, axis=0), np.nanstd(v, axis=0)
            ds[f"{name}_mean"] = ("frame", mean)
            ds[f"{name}_sd"] = ("frame", sd)
            ds[f"{name}_mean"].attrs["units"] = "px"
    return ds


def circular_statistics(movie: Movie, settings: dict[str, Any]) -> xr.Dataset:
    """Per frame and species: mean direction, resultant length (S_n), count and histogram of ``n * angle``."""
    bins = int(settings["histogram_bins"])
    n_f, n_s = len(movie.frames), movie.n_species
    ds = xr.Dataset(coords={"frame": movie.frames})
    ds = ds.assign_coords(species_name=("species_index", np.array([s["name"] for s in movie.table], dtype=object)))
    phase_edges = np.linspace(0, 2 * np.pi, bins + 1)
    ds = ds.assign_coords(phase=("phase_bin", 0.5 * (phase_edges[1:] + phase_edges[:-1])))
    ds["phase"].attrs.update(units="rad", description="n*angle mod 2 pi (bin centre); canonical angle = phase / n")
    sig = phasor_signal("S_n", movie.theta, movie.symmetry, movie.species, np.zeros(len(movie.particles), dtype=int),
                        1, n_s, chunk=movie.chunk)
    total, counts = sig.total[0].T, sig.count[0].T.astype(int)  # (frame, species)
    n_of = np.array([max(s["symmetry"], 1) for s in movie.table], dtype=float)
    oriented = np.array([s["symmetry"] > 0 for s in movie.table])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_dir = np.mod(np.angle(total), 2 * np.pi) / n_of[None, :]
        resultant = np.abs(total) / counts
    mean_dir[(counts == 0) | ~oriented[None, :]] = np.nan
    resultant[(counts == 0) | ~oriented[None, :]] = np.nan
    angle_hist = np.zeros((n_f, n_s, bins), dtype=np.int32)
    for rows in movie.row_chunks():
        theta = movie.theta[rows]
        for s, spec in enumerate(movie.table):
            mine = movie.species[rows] == s
            if spec["symmetry"] == 0 or not mine.any():
                continue
            ph = np.mod(spec["symmetry"] * theta[mine], 2 * np.pi)
            for f in range(n_f):
                col = ph[:, f]
                angle_hist[f, s] += np.histogram(col[np.isfinite(col)], phase_edges)[0].astype(np.int32)
    ds["angle_mean"] = (("frame", "species_index"), mean_dir)
    ds["angle_mean"].attrs.update(units="rad", description="circular mean direction of the n-fold axes, in [0, 2 pi/n); "
                                  "relative to the rVAE's angle offset; NaN for isotropic species")
    ds["angle_resultant"] = (("frame", "species_index"), resultant)
    ds["angle_resultant"].attrs["description"] = "mean resultant length of n*angle (= S_n of the species)"
    ds["species_count"] = (("frame", "species_index"), counts)
    ds["angle_hist"] = (("frame", "species_index", "phase_bin"), angle_hist)
    return ds


def orientational_order(movie: Movie, settings: dict[str, Any], signals: dict[str, Signal]) -> xr.Dataset:
    """Global order ``S_n`` of each species' own symmetry and, when a substrate registry is named, ``S_6``.

    Adds the signals (with the angles' posterior spread, for the bootstrap) to ``signals``.
    """
    ds = xr.Dataset(coords={"frame": movie.frames})
    kw = {"angle_sd": movie.angle_sd, "flip_prob": movie.flip_prob, "chunk": movie.chunk}
    sig = phasor_signal("S_n", movie.theta, movie.symmetry, movie.species, movie.units, movie.n_units,
                        movie.n_species, **kw)
    ds["S_n"] = ("frame", sig.series())
    ds["S_n"].attrs["description"] = ("orientational order |<exp(i n angle)>| with each species' symmetry order n "
                                      "(count-weighted over species); NaN without angles or for isotropic particles")
    if sig.n_trajectories:
        signals["S_n"] = sig
    reg = settings.get("registry_order")
    if reg:
        m_reg = _lcm_orders(movie.symmetry, int(reg))
        sig6 = phasor_signal("S_6", movie.theta, m_reg, movie.species, movie.units, movie.n_units,
                             movie.n_species, **kw)
        ds["S_6"] = ("frame", sig6.series())
        ds["S_6"].attrs["description"] = (f"substrate-registry order |<exp(i m angle)>|, m = lcm(n, {int(reg)}) "
                                          f"(dynamics.registry_order; 6 = the three directions of mica)")
        if sig6.n_trajectories:
            signals["S_6"] = sig6
    return ds


def _lazy_grids(blocks, compute, names: tuple[str, ...], shape: tuple[int, int], axis: int, dtype) -> dict[str, Any]:
    """(particle, frame) output grids as dask arrays, computed block by block when they are written or read.

    ``compute(block)`` returns a dict holding each of ``names`` over one slice of ``blocks``
    (of trajectories for ``axis`` 0, of frames for ``axis`` 1); the grids of one block come
    from one call, and no grid is ever whole in memory while the store is written.
    """
    import dask
    import dask.array as da

    parts: dict[str, list] = {name: [] for name in names}
    for sl in blocks:
        part_shape = (sl.stop - sl.start, shape[1]) if axis == 0 else (shape[0], sl.stop - sl.start)
        block = dask.delayed(compute, pure=False)(sl)
        for name in names:
            parts[name].append(da.from_delayed(block[name], part_shape, dtype=dtype))
    return {name: da.concatenate(p, axis=axis) if p else np.zeros(shape, dtype=dtype) for name, p in parts.items()}


def _neighbours_of_frames(movie: Movie, frames: slice, k_bond: int, cutoff: float) -> dict[str, np.ndarray]:
    """Delaunay neighbours of every frame of a slice: per-trajectory grids and sums per bootstrap unit.

    Returns ``psi_abs``, ``local_S_n``, ``neighbours`` on (particle, frame of the slice), float32;
    ``psi``, ``psi_count``, ``lpsi``, ``local``, ``local_count`` on (unit, frame of the slice).
    """
    x, y, theta = movie.read("x", frames), movie.read("y", frames), movie.read("angle", frames)
    present = np.isfinite(x) & np.isfinite(y)
    n_p, n_f = present.shape
    G = movie.n_units
    out = {k: np.full((n_p, n_f), np.nan, dtype=np.float32) for k in ("psi_abs", "local_S_n", "neighbours")}
    out.update({k: np.zeros((G, n_f), dtype=complex if k == "psi" else float)
                for k in ("psi", "psi_count", "lpsi", "local", "local_count")})
    oriented = movie.symmetry > 0
    for f in range(n_f):
        idx = np.flatnonzero(present[:, f])
        if len(idx) < 3:
            continue
        xy = np.column_stack([x[idx, f], y[idx, f]])
        bonds = delaunay_bonds(xy, cutoff)
        p, c = bond_order(xy, bonds, k_bond)
        g = movie.units[idx]
        ok = np.isfinite(p)
        out["psi"][:, f] = (np.bincount(g[ok], p[ok].real, G) + 1j * np.bincount(g[ok], p[ok].imag, G))
        out["psi_count"][:, f] = np.bincount(g[ok], minlength=G)
        out["lpsi"][:, f] = np.bincount(g[ok], np.abs(p[ok]), G)
        out["psi_abs"][idx, f] = np.abs(p)
        out["neighbours"][idx, f] = c
        th = theta[idx, f]
        if np.isfinite(th).any():
            # Isotropic neighbours and absent angles carry no orientation: left out of the average.
            has = np.isfinite(th) & oriented[idx]
            keep = has[bonds[:, 0]] & has[bonds[:, 1]] if len(bonds) else np.zeros(0, dtype=bool)
            sub = np.flatnonzero(has)
            remap = np.full(len(idx), -1)
            remap[sub] = np.arange(len(sub))
            lo = local_order(th[sub], movie.symmetry[idx][sub], remap[bonds[keep]])
            out["local_S_n"][idx[sub], f] = lo
            out["local"][:, f] = np.bincount(g[sub], lo, G)
            out["local_count"][:, f] = np.bincount(g[sub], minlength=G)
    return out


def neighbour_order(movie: Movie, settings: dict[str, Any], signals: dict[str, Signal]) -> xr.Dataset:
    """Delaunay neighbours of every frame: local S_n, bond order psi_k of the centroids, neighbour counts.

    Computed in blocks of frames (:func:`_neighbours_of_frames`): the per-frame signals are
    summed per bootstrap unit as they come, the per-trajectory grids are recomputed block by
    block when the store is written (:func:`_lazy_grid`).
    """
    n_p, n_f = len(movie.particles), len(movie.frames)
    k_bond = int(settings["bond_order"])
    cutoff = float(settings["bond_cutoff"])
    G = movie.n_units
    sums = {k: np.zeros((G, 1, n_f), dtype=complex if k == "psi" else float)
            for k in ("psi", "psi_count", "local", "local_count", "lpsi")}
    neighbours_mean = np.full(n_f, np.nan, dtype=np.float32)
    for sl in movie.frame_blocks():
        block = _neighbours_of_frames(movie, sl, k_bond, cutoff)
        for k, total in sums.items():
            total[:, 0, sl] = block[k]
        with _quiet():
            neighbours_mean[sl] = np.nanmean(block["neighbours"], axis=0)
    n_traj = int((movie.track_length > 0).sum())
    n_oriented = int(((movie.track_length > 0) & movie.oriented).sum())
    sig_psi = Signal("psi_6", "resultant", sums["psi"], sums["psi_count"], n_traj)
    sig_lpsi = Signal("local_psi_6", "mean", sums["lpsi"], sums["psi_count"].copy(), n_traj)
    sig_local = Signal("local_S_n", "mean", sums["local"], sums["local_count"], n_oriented)
    signals.update({"psi_6": sig_psi, "local_psi_6": sig_lpsi})
    if n_oriented:
        signals["local_S_n"] = sig_local
    ds = xr.Dataset(coords={"frame": movie.frames, "particle": movie.particles})
    with _quiet():
        ds["local_S_n"] = ("frame", sig_local.series())
        ds["psi_6"] = ("frame", sig_psi.series())
        ds["local_psi_6"] = ("frame", sig_lpsi.series())
    ds["neighbours_mean"] = ("frame", neighbours_mean)
    ds["psi_6"].attrs["description"] = f"global bond-orientational order |<psi_{k_bond}(i)>| (Delaunay neighbours)"
    ds["local_psi_6"].attrs["description"] = f"mean local bond-orientational order <|psi_{k_bond}(i)|>"
    ds["local_S_n"].attrs["description"] = "mean local orientational order over each particle and its Delaunay neighbours"

    grids = _lazy_grids(movie.frame_blocks(), lambda sl: _neighbours_of_frames(movie, sl, k_bond, cutoff),
                        ("local_S_n", "psi_abs", "neighbours"), (n_p, n_f), 1, np.float32)
    ds["local_S_n_particle"] = (("particle", "frame"), grids["local_S_n"])
    ds["psi_6_particle"] = (("particle", "frame"), grids["psi_abs"])
    ds["neighbours"] = (("particle", "frame"), grids["neighbours"])
    ds["neighbours"].attrs["description"] = "number of Delaunay neighbours (bonds longer than bond_cutoff x median dropped)"
    return ds


def classical_order(movie: Movie, tracks: pd.DataFrame | None, settings: dict[str, Any],
                    signals: dict[str, Signal]) -> xr.Dataset:
    """S_n (and registry S_6) of the image-moment ``orientation`` column of the tracks, for comparison."""
    ds = xr.Dataset(coords={"frame": movie.frames})
    if tracks is None or "orientation" not in tracks.columns or not tracks["orientation"].notna().any():
        movie.notes.append("tracks have no 'orientation' column: no classical (image-moment) order parameter")
        return ds
    t_particles = np.unique(tracks["particle"].to_numpy())
    sp_map = pd.Series(movie.species, index=movie.particles)
    t_species = sp_map.reindex(t_particles).fillna(0).to_numpy(dtype=int)
    sym = np.array([movie.table[s]["symmetry"] for s in t_species], dtype=int)
    # Image moments give an axis (mod pi) whatever the particle: at least 2-fold; none for isotropic ones.
    t_n = _lcm_orders(sym, 2)
    if not (t_n > 0).any():
        movie.notes.append("isotropic particles: no classical (image-moment) orientational order")
        return ds
    with _quiet():
        mean_xy = tracks.groupby("particle")[["x", "y"]].mean().reindex(t_particles)
    t_units, t_n_units = bootstrap_units(_tiles(mean_xy["x"].to_numpy(float), mean_xy["y"].to_numpy(float),
                                                int(settings["bootstrap_tiles"])), len(t_particles))
    t_theta = _tracks_rows(tracks, "orientation", t_particles, movie.frames)
    kw = {"chunk": movie.chunk}
    sig = phasor_signal("S_n_moments", t_theta, t_n, t_species, t_units, t_n_units, movie.n_species, **kw)
    signals["S_n_moments"] = sig
    ds["S_n_moments"] = ("frame", sig.series())
    ds["S_n_moments"].attrs["description"] = ("S_n of the image-moment orientation of the detections "
                                              "(classical measure; n at least 2: moments give an axis)")
    reg = settings.get("registry_order")
    if reg:
        sig6 = phasor_signal("S_6_moments", t_theta, _lcm_orders(t_n, int(reg)), t_species, t_units, t_n_units,
                             movie.n_species, **kw)
        signals["S_6_moments"] = sig6
        ds["S_6_moments"] = ("frame", sig6.series())
        ds["S_6_moments"].attrs["description"] = "registry order S_6 of the image-moment orientation"
    return ds


def pair_correlations(movie: Movie, settings: dict[str, Any]) -> xr.Dataset:
    """g(r) averaged over a few frames at the start, middle and end of the movie."""
    ds = xr.Dataset(coords={"frame": movie.frames})
    n_f = len(movie.frames)
    if movie.box is None:
        return ds
    box = movie.box
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
        x, y = movie.read("x", slice(sel.start, sel.stop)), movie.read("y", slice(sel.start, sel.stop))
        present = np.isfinite(x) & np.isfinite(y)
        vals = [pair_correlation(np.column_stack([x[present[:, j], j], y[present[:, j], j]]), r_edges, box)
                for j in range(len(sel))]
        with _quiet():
            gr[k] = np.nanmean(vals, axis=0)
        gr_frame[k] = float(np.mean([movie.frames[f] for f in sel]))
    ds = ds.assign_coords(stage=np.array(list(picks), dtype=object), r=0.5 * (r_edges[1:] + r_edges[:-1]))
    ds["r"].attrs["units"] = "px"
    ds["gr"] = (("stage", "r"), gr)
    ds["gr"].attrs["description"] = "radial distribution function (edge-corrected, bounding box of all positions)"
    ds["gr_frame"] = ("stage", gr_frame)
    return ds


def rotational_dynamics(movie: Movie, settings: dict[str, Any]) -> xr.Dataset:
    """Unwrapped angle, angular velocity, jump histogram, rotational MSD and diffusion of oriented trajectories."""
    bins = int(settings["histogram_bins"])
    n_sym = np.maximum(movie.symmetry, 1)  # isotropic rows are all NaN: any n unwraps them to NaN
    shape = (len(movie.particles), len(movie.frames))
    unwrapped = RowView(shape, lambda rows: unwrap_angles(movie.theta[rows], n_sym[rows]))

    def trajectory_grids(rows: slice) -> dict[str, np.ndarray]:
        angle = unwrapped[rows]
        omega = np.full_like(angle, np.nan)
        omega[:, 1:] = np.diff(angle, axis=1) / movie.dt
        return {"angle_unwrapped": angle, "angular_velocity": omega}

    grids = _lazy_grids(movie.row_chunks(), trajectory_grids, ("angle_unwrapped", "angular_velocity"), shape, 0,
                        np.float64)
    ds = xr.Dataset(coords={"frame": movie.frames, "particle": movie.particles})
    ds["angle_unwrapped"] = (("particle", "frame"), grids["angle_unwrapped"])
    ds["angle_unwrapped"].attrs.update(units="rad", description="angle unwrapped along the trajectory modulo 2 pi/n")
    ds["angular_velocity"] = (("particle", "frame"), grids["angular_velocity"])
    ds["angular_velocity"].attrs["units"] = f"rad/{movie.time_unit}"
    jump_edges = np.logspace(-3, np.log10(np.pi), bins + 1)
    jh = np.zeros((movie.n_species, bins), dtype=np.int64)
    for rows in movie.row_chunks():
        jumps = np.abs(wrap_symmetric(np.diff(movie.theta[rows], axis=1), n_sym[rows, None]))
        for s in range(movie.n_species):
            v = jumps[movie.species[rows] == s]
            jh[s] += np.histogram(v[np.isfinite(v)], jump_edges)[0]
    ds = ds.assign_coords(jump=("jump_bin", np.sqrt(jump_edges[1:] * jump_edges[:-1])))
    ds["jump"].attrs.update(units="rad", description="orientation change between consecutive frames (geometric bin centre)")
    ds["jump_hist"] = (("species_index", "jump_bin"), jh)
    ds["jump_edges"] = ("jump_edge", jump_edges)
    n_fit = int(settings["msd_fit_lags"])
    lags, msd_rot, msd_rot_p = mean_squared_displacement(unwrapped, int(settings["msd_max_lag"]), movie.chunk)
    ds = ds.assign_coords(lag=lags, lag_time=("lag", lags * movie.dt))
    ds["lag_time"].attrs["units"] = movie.time_unit
    ds["msd_rot"] = ("lag", msd_rot)
    ds["msd_rot"].attrs["units"] = "rad^2"
    d_rot, c_rot = fit_diffusion(lags, msd_rot, 1, n_fit)
    ds["D_rot"] = ("particle", fit_diffusion_many(lags, msd_rot_p, 1, n_fit) / movie.dt)
    ds["D_rot"].attrs.update(units=f"rad^2/{movie.time_unit}",
                             description="rotational diffusion: MSD = 2 D lag + c over the first msd_fit_lags lags")
    if not movie.oriented.any():
        movie.notes.append("no rotational diffusion: no trajectory has a meaningful angle")
    elif not np.isfinite(d_rot):
        movie.notes.append(f"too few frames for a diffusion fit (need {n_fit} lags of at least 3 usable)")
    ds.attrs.update(rotational_diffusion=d_rot / movie.dt, rotational_diffusion_per_frame=d_rot,
                    rotational_diffusion_units=f"rad^2/{movie.time_unit}", rotational_msd_intercept=c_rot)
    return ds


def translational_dynamics(movie: Movie, tracks: pd.DataFrame | None, settings: dict[str, Any]) -> xr.Dataset:
    """Translational MSD and diffusion of the drift-corrected positions (the tracking stage's correction)."""
    drift_x, drift_y, drift_source = frame_drift(movie.x, movie.y, movie.frames, tracks, chunk=movie.chunk)
    xy = RowView((len(movie.particles), len(movie.frames), 2),
                 lambda rows: np.stack([movie.x[rows] - drift_x, movie.y[rows] - drift_y], axis=-1))
    n_fit = int(settings["msd_fit_lags"])
    lags, msd_tr, msd_tr_p = mean_squared_displacement(xy, int(settings["msd_max_lag"]), movie.chunk)
    ds = xr.Dataset(coords={"particle": movie.particles, "lag": lags})
    area = movie.pixel_size ** 2
    ds["msd_trans"] = ("lag", msd_tr * area)
    ds["msd_trans"].attrs.update(units=f"{movie.pixel_unit}^2", description="MSD of the drift-corrected positions")
    d_tr, c_tr = fit_diffusion(lags, msd_tr, 2, n_fit)
    ds["D_trans"] = ("particle", fit_diffusion_many(lags, msd_tr_p, 2, n_fit) * area / movie.dt)
    ds["D_trans"].attrs.update(units=f"{movie.pixel_unit}^2/{movie.time_unit}",
                               description="translational diffusion: MSD = 4 D lag + c (drift-corrected positions)")
    ds.attrs.update(translational_diffusion=d_tr * area / movie.dt,
                    translational_diffusion_units=f"{movie.pixel_unit}^2/{movie.time_unit}",
                    translational_msd_intercept=c_tr * area, translational_drift=drift_source)
    return ds


def ordering_transition(movie: Movie, signals: dict[str, Signal], settings: dict[str, Any],
                        rng: np.random.Generator) -> xr.Dataset:
    """The ordering transition: which signal, the step fit, its interval, the classical comparison.

    Returns the fitted curve on ``frame`` and every transition attribute. Without a
    transition (or without any angle-based signal) the outcome is ``transition_detected:
    False`` with every number NaN: each attribute keeps its type whatever the outcome.
    """
    boot_kw = {"n_boot": int(settings["bootstrap"]), "confidence": float(settings["confidence"]),
               "min_frames": int(settings["min_frames"]), "min_particles": int(settings["min_particles"]),
               "min_delta_bic": float(settings["min_delta_bic"]), "model": settings["transition_model"],
               "changepoint_tolerance": float(settings["changepoint_tolerance"]),
               "resample_angles": bool(settings["resample_angles"])}
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
            fits[name] = estimate_transition(signals[name], movie.frames, rng=rng, **kwargs(name))
        return fits[name]

    def fit_quick(name: str) -> dict[str, Any]:
        if name not in quick:
            quick[name] = estimate_transition(signals[name], movie.frames, rng=rng, **kwargs(name, 0))
        return quick[name]

    def choose(requested: str, candidates: tuple[str, ...], key: str) -> str | None:
        if requested != "auto":
            if requested not in signals:
                why = (" (S_6 needs dynamics.registry_order)" if requested.startswith("S_6") and
                       not settings.get("registry_order") else "")
                raise InputError(f"dynamics.{key}: {requested!r} cannot be computed for this movie{why} "
                                 f"(available: {', '.join(signals) or 'none'})")
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

    notes = movie.notes
    main_name = choose(settings["transition_signal"], AUTO_SIGNALS, "transition_signal")
    classical_name = choose(settings["classical_signal"], CLASSICAL_SIGNALS, "classical_signal")
    nan2 = [math.nan, math.nan]
    if main_name is None:
        notes.append("no angle-based order parameter (no angles, or isotropic particles): no ordering "
                     "transition is reported")
        main = {"frame": math.nan, "low": math.nan, "high": math.nan, "width": math.nan, "saturation": math.nan,
                "level_before": math.nan, "level_after": math.nan, "delta_bic": math.nan,
                "changepoint_frame": math.nan, "logistic_frame": math.nan, "changepoint_agrees": False,
                "detected": False, "note": ""}
    else:
        main = fit(main_name)
        if main["note"]:
            notes.append(main["note"])
    classical = fit(classical_name) if classical_name else {}
    if classical_name is None:
        notes.append("no classical order parameter could be computed")
    elif classical.get("note"):
        notes.append(classical["note"])
    n_f = len(movie.frames)
    out = xr.Dataset(coords={"frame": movie.frames})
    out["transition_curve"] = ("frame", logistic(movie.frames, main["level_before"], main["level_after"],
                                                 main["frame"], main["width"], main["saturation"] or 0.0)
                               if main["detected"] else np.full(n_f, np.nan))
    out["transition_curve"].attrs["description"] = f"fitted {settings['transition_model']} step of {main_name}"
    out.attrs = {
        "transition_signal": main_name or "",
        "transition_detected": bool(main["detected"]),
        "transition_frame": float(main["frame"]),
        "transition_frame_low": float(main["low"]),
        "transition_frame_high": float(main["high"]),
        "transition_interval": [float(main["low"]), float(main["high"])] if main["detected"] else nan2,
        "transition_confidence": float(settings["confidence"]),
        "transition_interval_includes": ("trajectories (spatial tiles) resampled" +
                                         (" and angles redrawn within angle_sd (and flip_prob)" if settings["resample_angles"]
                                          and movie.angle_sd is not None else "")),
        "transition_width": float(main["width"]) if main["detected"] else math.nan,
        "transition_time": float(main["frame"]) * movie.dt,
        "transition_frame_changepoint": float(main["changepoint_frame"]),
        "transition_changepoint_agrees": bool(main["changepoint_agrees"]),
        "transition_frame_logistic": float(main["logistic_frame"]) if main["detected"] else math.nan,
        "transition_model": settings["transition_model"],
        "transition_saturation": float(main["saturation"]) if main["detected"] else math.nan,
        "transition_delta_bic": float(main["delta_bic"]),
        "transition_note": main["note"] if main_name else "no angle-based order parameter",
        "classical_signal": classical_name or "",
        "transition_frame_classical": float(classical.get("frame", math.nan)),
        "transition_interval_classical": [float(classical.get("low", math.nan)), float(classical.get("high", math.nan))],
        "transition_fits": json.dumps({**quick, **fits}, default=float),
    }
    return out


def tilt_autocorrelation(tilt: np.ndarray, max_lag: int) -> np.ndarray:
    """Normalised autocorrelation of each trajectory's tilt fluctuation over lag frames.

    Parameters
    ----------
    tilt : numpy.ndarray
        Tilt (rad) on (particle, frame); NaN where the trajectory is absent.
    max_lag : int
        Largest lag (frames).

    Returns
    -------
    numpy.ndarray
        (particle, lag) with lag 0..max_lag: C(lag) = <d(t) d(t+lag)> / <d^2>, d the tilt minus
        the trajectory's mean; pairs with a missing frame are left out. NaN where no pair exists
        or the tilt does not vary.
    """
    n_p, n_f = tilt.shape
    acf = np.full((n_p, max_lag + 1), np.nan)
    with _quiet(), np.errstate(invalid="ignore", divide="ignore"):
        d = tilt - np.nanmean(tilt, axis=1, keepdims=True)
        var = np.nanmean(d * d, axis=1)
        for lag in range(min(max_lag, n_f - 1) + 1):
            acf[:, lag] = np.nanmean(d[:, :n_f - lag] * d[:, lag:], axis=1) / var
    acf[~(var > 0)] = np.nan
    return acf


def tilt_dynamics(movie: Movie, latents: xr.Dataset, settings: dict[str, Any]) -> xr.Dataset:
    """Per frame and species: mean, median and spread of the out-of-plane tilt; per trajectory its autocorrelation.

    Only for latents with a ``tilt`` variable (the ``rvae3d`` model); otherwise an empty dataset.
    The autocorrelation runs to half the movie's length (at most ``msd_max_lag`` frames when set).
    """
    ds = xr.Dataset()
    if "tilt" not in latents.variables:
        return ds
    n_f, n_s = len(movie.frames), movie.n_species
    mean, median, sd = (np.full((n_f, n_s), np.nan) for _ in range(3))
    # The median needs every trajectory of a frame: blocks of frames.
    for sl in movie.frame_blocks():
        tilt = movie.read("tilt", sl)
        with _quiet(), np.errstate(invalid="ignore"):
            for s in range(n_s):
                rows = tilt[movie.species == s]
                if not len(rows):
                    continue
                mean[sl, s] = np.nanmean(rows, axis=0)
                median[sl, s] = np.nanmedian(rows, axis=0)
                if len(rows) > 1:
                    sd[sl, s] = np.nanstd(rows, axis=0, ddof=1)
    ds = ds.assign_coords(frame=movie.frames,
                          species_name=("species_index", np.array([s["name"] for s in movie.table], dtype=object)))
    for name, values, text in (("tilt_mean", mean, "mean"), ("tilt_median", median, "median"),
                               ("tilt_sd", sd, "standard deviation (ddof 1) over trajectories of")):
        ds[name] = (("frame", "species_index"), values)
        ds[name].attrs.update(units="rad", description=f"{text} the out-of-plane tilt per frame and species")
    max_lag = max(1, n_f // 2)
    if settings.get("msd_max_lag"):
        max_lag = min(max_lag, int(settings["msd_max_lag"]))
    ds = ds.assign_coords(particle=movie.particles, tilt_lag=np.arange(max_lag + 1))
    ds["tilt_lag"].attrs["units"] = "frame"
    acf = np.concatenate([tilt_autocorrelation(movie.grids.read("tilt", rows), max_lag) for rows in movie.row_chunks()])
    ds["tilt_acf"] = (("particle", "tilt_lag"), acf)
    ds["tilt_acf"].attrs.update(units="1", description="autocorrelation of the trajectory's tilt fluctuation over lag frames")
    return ds


def compute_dynamics(latents: xr.Dataset, tracks: pd.DataFrame | None, settings: dict[str, Any]) -> xr.Dataset:
    """Ensemble statistics, order parameters, rotational dynamics and the transition of one movie.

    Parameters
    ----------
    latents : xarray.Dataset
        ``angle`` (rad), ``x``, ``y`` (px) on (particle, frame); optionally ``angle_sd`` (rad),
        ``z`` (particle, frame, latent), ``dx``, ``dy`` (px), ``cls(particle)``; attrs
        ``frame_interval`` (s), ``pixel_size``, ``pixel_unit`` and the species with their
        symmetry orders (see :func:`species_from_attrs`).
    tracks : pandas.DataFrame, optional
        Trajectories (``frame``, ``x``, ``y``, ``particle``); ``x_corrected``/``y_corrected``
        give the drift the translational MSD removes, an ``orientation`` column (rad,
        image-moment angle) the classical orientational order for comparison.
    settings : dict
        The validated ``dynamics`` config section.

    Returns
    -------
    xarray.Dataset
        On ``frame`` (with ``time`` in s): counts, latent means/spreads/quantiles, circular
        statistics, order parameters, histograms; on ``particle``: species, unwrapped angle,
        angular velocity, local order, diffusion coefficients; on ``lag``: MSDs; on ``r``:
        g(r) at early/middle/late frames; with a ``tilt`` latent (``rvae3d``) its per-frame
        mean/median/spread (rad) and per-trajectory autocorrelation on ``tilt_lag``. The
        transition estimate is in ``attrs``.
    """
    rng = np.random.default_rng(int(settings["seed"]))
    movie = prepare_movie(latents, tracks, settings)
    signals: dict[str, Signal] = {}
    parts = [
        frame_counts(movie),
        latent_statistics(movie, latents, settings),
        circular_statistics(movie, settings),
        orientational_order(movie, settings, signals),
        neighbour_order(movie, settings, signals),
        classical_order(movie, tracks, settings, signals),
        pair_correlations(movie, settings),
        rotational_dynamics(movie, settings),
        translational_dynamics(movie, tracks, settings),
        tilt_dynamics(movie, latents, settings),
    ]
    parts.append(ordering_transition(movie, signals, settings, rng))
    ds = xr.merge(parts, combine_attrs="no_conflicts", join="outer")
    ds.attrs.update({
        "species": json.dumps([{k: s[k] for k in ("name", "symmetry")} for s in movie.table]),
        "species_method": movie.species_method,
        "symmetry_source": movie.table[0]["source"],
        "angles": movie.angles,
        "frame_interval": float(movie.frame_interval or math.nan),
        "time_unit": movie.time_unit,
        "pixel_size": movie.pixel_size,
        "pixel_unit": movie.pixel_unit,
        "notes": "; ".join(movie.notes),
    })
    for note in movie.notes:
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
    """Open ``latents.zarr`` (lazily: the stage reads it a block at a time) and ``tracks.parquet``, checking the contracts."""
    latents = open_zarr(latents_path, required=["angle", "x", "y"], what="latents store", chunks=None)
    for name in ("angle", "x", "y"):
        if set(latents[name].dims) != {"particle", "frame"}:
            raise InputError(f"{latents_path}: variable {name!r} has dims {latents[name].dims}; expected (particle, frame)")
    if "z" in latents.variables and set(latents["z"].dims) != {"particle", "frame", "latent"}:
        raise InputError(f"{latents_path}: variable 'z' has dims {latents['z'].dims}; expected (particle, frame, latent)")
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
    import dask

    # One block at a time: the per-trajectory grids are computed as they are written.
    with dask.config.set(scheduler="synchronous"):
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

"""Figures of the dynamics stage: latents over time, maps, order parameters, rotational dynamics.

Reads ``latents.zarr`` and ``dynamics.zarr`` (and ``movie.zarr`` for the map background when
present) from ``results/{movie}``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import InputError
from ..io import open_zarr
from .style import new_figure, sample_trajectories, save_figure

#: Inputs under results/{movie} that :func:`draw` needs.
INPUTS = ("latents.zarr", "dynamics.zarr")

FIGURES = {
    "dynamics_latent_density": "Latent versus frame: per-frame histograms of the angle (n-fold phase n*angle, so n-fold "
                      "symmetric particles are not split) and of each content latent z; darker = more particles.",
    "dynamics_latent_maps": "Real-space maps of the particles at the first, middle and last frames, each drawn as a stick "
                   "along its rVAE angle and coloured by the angle (top; canonical angle in [0, 360/n) degrees, "
                   "relative to the rVAE's arbitrary offset) and by z1 (bottom).",
    "dynamics_latent_means": "Ensemble means of the content latents and the translations versus time, with 95% confidence "
                    "bands of the mean (1.96 standard errors), and the particle count.",
    "dynamics_trajectories": "Single-particle trajectories of the longest tracks: angle unwrapped modulo 2 pi/n, z1 and z2 "
                    "versus time.",
    "dynamics_latent_scatter": "Latent space (z1, z2) of every window, coloured by time.",
    "dynamics_orientation": "Orientation distribution P(theta) (canonical angle modulo 2 pi/n, early and late thirds of the "
                   "movie), the orientational free energy -ln P(theta) in kT, and the distribution of orientation "
                   "jumps between consecutive frames (log-log).",
    "dynamics_order_parameters": "Order parameters versus time: S_n (modulus of <exp(i n theta)>), registry S_6, local S_n, bond order "
                        "psi_6 and the classical image-moment order, with the fitted transition (curve), its frame "
                        "(line) and bootstrap interval (band), and the change point (dotted).",
    "dynamics_msd": "Rotational (unwrapped angle) and translational mean-squared displacement versus lag time, log-log, with "
           "the diffusion fits MSD = 2 d D t + c over the first lags.",
    "dynamics_pair_correlation": "Radial distribution function g(r) (edge-corrected) at early, middle and late frames.",
}


def _symmetry_table(dyn: xr.Dataset) -> list[dict]:
    try:
        return json.loads(dyn.attrs.get("species") or "[]") or [{"name": "particle", "symmetry": 2}]
    except json.JSONDecodeError:
        return [{"name": "particle", "symmetry": 2}]


def _time(dyn: xr.Dataset) -> tuple[np.ndarray, str]:
    unit = dyn.attrs.get("time_unit") or "frame"
    return np.asarray(dyn["time"].values, dtype=float), unit


def _frame_to_time(dyn: xr.Dataset, frame):
    # Missing values are stored as "" (Zarr attributes are JSON without NaN).
    try:
        frame = float(frame)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(frame):
        return None
    interval = dyn.attrs.get("frame_interval")
    try:
        interval = float(interval)
    except (TypeError, ValueError):
        interval = 1.0
    if not math.isfinite(interval):
        interval = 1.0  # unknown frame interval: times are frames
    return float(frame) * interval


def _latent_density(lat, dyn, out, **kw):
    table = _symmetry_table(dyn)
    n_lat = dyn.sizes.get("latent", 0)
    rows = 1 + min(n_lat, 2)
    t, unit = _time(dyn)
    fig, axes = new_figure(rows, 1, figsize=(7, 2.2 * rows), sharex=True, squeeze=False)
    axes = axes[:, 0]
    hist = dyn["angle_hist"].sum("species_index").values.T.astype(float)
    n = max(int(table[0]["symmetry"]), 1) if len(table) == 1 else 1  # 0 = isotropic: an empty histogram
    label = "n·angle (rad)" if len(table) > 1 else f"angle mod {360 // n}° (deg)"
    ext_y = (0, 2 * np.pi) if len(table) > 1 else (0, 360 / n)
    extent = (t[0], t[-1] if len(t) > 1 else t[0] + 1, *ext_y)
    axes[0].imshow(hist, origin="lower", aspect="auto", extent=extent, cmap="Greys", interpolation="nearest")
    axes[0].set_ylabel(label)
    for k in range(rows - 1):
        edges = dyn["z_hist_edges"].values[k]
        h = dyn["z_hist"].isel(latent=k).values.T.astype(float)
        axes[k + 1].imshow(h, origin="lower", aspect="auto", extent=(extent[0], extent[1], edges[0], edges[-1]),
                           cmap="Greys", interpolation="nearest")
        axes[k + 1].set_ylabel(f"z{k + 1}")
    axes[-1].set_xlabel(f"time ({unit})")
    return fig


def _movie_frame(movie_dir: Path, frame: int):
    path = movie_dir / "movie.zarr"
    if not path.exists():
        return None
    try:
        mov = open_zarr(path, required=["image"], what="movie store")
        image = mov["image"]
        picked = image.sel(frame=frame) if "frame" in image.coords else image.isel(frame=int(frame))
        return np.asarray(picked.values)
    except (InputError, KeyError, IndexError, ValueError):
        # The background is decoration: a map without it is still correct.
        return None


def _latent_maps(lat, dyn, out, movie_dir=None, **kw):
    frames = np.asarray(lat["frame"].values)
    picks = sorted({0, len(frames) // 2, len(frames) - 1})
    sym = dyn["symmetry"].values if "symmetry" in dyn else np.full(lat.sizes["particle"], 2)
    # Isotropic particles (symmetry 0) and pose-less angles have no orientation: dots, no sticks.
    oriented = (sym > 0) & (dyn.attrs.get("angles", "rVAE") == "rVAE")
    sym = np.maximum(sym, 1)
    fig, axes = new_figure(2, len(picks), figsize=(3.6 * len(picks), 6.6), squeeze=False)
    has_z = "z" in lat.variables
    for col, fi in enumerate(picks):
        x = lat["x"].isel(frame=fi).values
        y = lat["y"].isel(frame=fi).values
        th = lat["angle"].isel(frame=fi).values
        ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(th) & oriented
        dots = np.isfinite(x) & np.isfinite(y) & ~ok
        canon = np.degrees(np.mod(th, 2 * np.pi / sym)) * sym / 360.0  # fraction of the symmetry period
        z1 = lat["z"].isel(frame=fi, latent=0).values if has_z else np.full_like(x, np.nan)
        img = _movie_frame(movie_dir, frames[fi]) if movie_dir is not None else None
        for row, (values, cmap, name) in enumerate([(canon, "twilight", "angle (fraction of 360°/n)"),
                                                    (z1, "viridis", "z1")]):
            ax = axes[row, col]
            if img is not None:
                ax.imshow(img, cmap="gray", origin="upper", alpha=0.6)
            if dots.any():
                ax.plot(x[dots], y[dots], ".", color="0.3", ms=3)
            length = 6.0
            u, v = np.cos(th[ok]) * length, np.sin(th[ok]) * length
            q = ax.quiver(x[ok], y[ok], u, v, values[ok], cmap=cmap, pivot="middle", headwidth=0, headlength=0,
                          headaxislength=0, angles="xy", scale_units="xy", scale=1, width=0.006)
            if row == 0:
                q.set_clim(0, 1)
            ax.set_aspect("equal")
            if img is None:
                ax.invert_yaxis()
            ax.set_title(f"frame {frames[fi]}")
            ax.set_xlabel("x (px)")
            ax.set_ylabel("y (px)")
            if col == len(picks) - 1:
                fig.colorbar(q, ax=ax, label=name, shrink=0.8)
    return fig


def _latent_means(lat, dyn, out, **kw):
    t, unit = _time(dyn)
    names = []
    if "z_mean" in dyn:
        names += [(f"z{k + 1}", dyn["z_mean"].isel(latent=k).values, dyn["z_sd"].isel(latent=k).values)
                  for k in range(dyn.sizes["latent"])]
    for v in ("dx", "dy"):
        if f"{v}_mean" in dyn:
            names.append((f"{v} (px)", dyn[f"{v}_mean"].values, dyn[f"{v}_sd"].values))
    fig, axes = new_figure(len(names) + 1, 1, figsize=(7, 1.8 * (len(names) + 1)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    count = dyn["n_particles"].values.astype(float)
    for ax, (name, mean, sd) in zip(axes, names):
        half = 1.96 * sd / np.sqrt(np.maximum(count, 1))
        ax.plot(t, mean, color="C0")
        ax.fill_between(t, mean - half, mean + half, color="C0", alpha=0.3, linewidth=0)
        ax.set_ylabel(f"<{name}>")
    axes[-1].plot(t, count, color="k")
    axes[-1].set_ylabel("particles")
    axes[-1].set_xlabel(f"time ({unit})")
    return fig


def _trajectories(lat, dyn, out, n_tracks=8, **kw):
    t, unit = _time(dyn)
    length = dyn["track_length"].values
    order = np.argsort(-length, kind="stable")[:n_tracks]
    rows = 1 + min(dyn.sizes.get("latent", 0), 2)
    fig, axes = new_figure(rows, 1, figsize=(7, 2.2 * rows), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for i in order:
        pid = dyn["particle"].values[i]
        axes[0].plot(t, np.degrees(dyn["angle_unwrapped"].isel(particle=i).values), lw=1, label=str(pid))
        for k in range(rows - 1):
            axes[k + 1].plot(t, lat["z"].isel(particle=i, latent=k).values, lw=1)
    axes[0].set_ylabel("angle, unwrapped (deg)")
    for k in range(rows - 1):
        axes[k + 1].set_ylabel(f"z{k + 1}")
    axes[-1].set_xlabel(f"time ({unit})")
    axes[0].legend(title="particle", fontsize="x-small", ncol=4)
    return fig


def _latent_scatter(lat, dyn, out, max_points=20000, seed=0, max_windows=1_000_000, **kw):
    fig, ax = new_figure(figsize=(5.5, 4.5))
    if "z" not in lat.variables or lat.sizes.get("latent", 0) < 2:
        ax.text(0.5, 0.5, "fewer than 2 content latents", ha="center", transform=ax.transAxes)
        return fig
    lat = lat.isel(particle=sample_trajectories(lat.sizes["particle"], lat.sizes["frame"], max_windows, seed))
    z1 = lat["z"].isel(latent=0).values.ravel()
    z2 = lat["z"].isel(latent=1).values.ravel()
    t, unit = _time(dyn)
    tt = np.broadcast_to(t[None, :], lat["z"].isel(latent=0).shape).ravel() if lat["z"].dims[:2] == ("particle", "frame") \
        else np.broadcast_to(t[:, None], lat["z"].isel(latent=0).shape).ravel()
    ok = np.flatnonzero(np.isfinite(z1) & np.isfinite(z2))
    if len(ok) > max_points:
        ok = np.random.default_rng(seed).choice(ok, max_points, replace=False)
    sc = ax.scatter(z1[ok], z2[ok], c=tt[ok], s=4, cmap="viridis", rasterized=True, linewidths=0)
    fig.colorbar(sc, ax=ax, label=f"time ({unit})")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    return fig


def _orientation(lat, dyn, out, **kw):
    table = _symmetry_table(dyn)
    fig, axes = new_figure(1, 3, figsize=(12, 3.6), squeeze=False)
    axes = axes[0]
    n_f = dyn.sizes["frame"]
    thirds = {"first third": slice(0, max(1, n_f // 3)), "last third": slice(n_f - max(1, n_f // 3), n_f)}
    phase = dyn["phase"].values
    width = phase[1] - phase[0] if len(phase) > 1 else 2 * np.pi
    for s, spec in enumerate(table):
        n = spec["symmetry"]
        if n == 0:
            continue  # isotropic: no orientation to histogram
        deg = np.degrees(phase / n)
        for k, (name, sl) in enumerate(thirds.items()):
            h = dyn["angle_hist"].isel(species_index=s, frame=sl).sum("frame").values.astype(float)
            if h.sum() == 0:
                continue
            p = h / (h.sum() * np.degrees(width / n))
            ls = "-" if k else "--"
            axes[0].step(deg, p, where="mid", ls=ls, label=f"{spec['name']}, {name}")
            with np.errstate(divide="ignore"):
                axes[1].plot(deg, -np.log(p), ls=ls, marker=".", label=f"{spec['name']}, {name}")
        jh = dyn["jump_hist"].isel(species_index=s).values.astype(float)
        edges = dyn["jump_edges"].values
        if jh.sum():
            dens = jh / (jh.sum() * np.diff(edges))
            keep = dens > 0
            axes[2].loglog(np.degrees(dyn["jump"].values[keep]), dens[keep] * np.pi / 180, marker=".", label=spec["name"])
    axes[0].set_xlabel("canonical angle (deg, mod 360/n)")
    axes[0].set_ylabel("P(θ) (1/deg)")
    axes[1].set_xlabel("canonical angle (deg, mod 360/n)")
    axes[1].set_ylabel("-ln P(θ) (kT)")
    axes[2].set_xlabel("|Δθ| per frame (deg)")
    axes[2].set_ylabel("density (1/deg)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    return fig


def _order_parameters(lat, dyn, out, **kw):
    t, unit = _time(dyn)
    fig, ax = new_figure(figsize=(7.5, 4))
    styles = [("S_n", "S_n (rVAE angle)"), ("S_6", "S_6 registry (rVAE angle)"), ("local_S_n", "local S_n"),
              ("psi_6", "ψ_6 (centroids)"), ("S_6_moments", "S_6 (image moments)"), ("S_n_moments", "S_n (image moments)")]
    for k, (name, label) in enumerate(styles):
        if name in dyn:
            ax.plot(t, dyn[name].values, marker=".", lw=1, label=label, color=f"C{k}")
    a = dyn.attrs
    if "transition_curve" in dyn and np.isfinite(dyn["transition_curve"].values).any():
        ax.plot(t, dyn["transition_curve"].values, color="k", lw=2, label=f"fit ({a.get('transition_signal')})")
    tc = _frame_to_time(dyn, a.get("transition_frame"))
    lo = _frame_to_time(dyn, a.get("transition_frame_low"))
    hi = _frame_to_time(dyn, a.get("transition_frame_high"))
    if tc is not None:
        ax.axvline(tc, color="k", ls="--", lw=1, label=f"transition {tc:.1f} {unit}")
        if lo is not None and hi is not None:
            ax.axvspan(lo, hi, color="k", alpha=0.12, lw=0,
                       label=f"{100 * float(a.get('transition_confidence', 0.95)):.0f}% interval")
    cp = _frame_to_time(dyn, a.get("transition_frame_changepoint"))
    if cp is not None and tc is not None:
        ax.axvline(cp, color="gray", ls=":", lw=1, label="change point")
    if "S_n" in dyn and not np.isfinite(dyn["S_n"].values).any():
        # Never drawn as order: pose-less angles or isotropic particles have none.
        why = "no angles" if a.get("angles") in ("absent", "constant") else "isotropic particles: no orientation"
        ax.set_title(f"{why}; no angle-based order parameter", fontsize="small")
    elif tc is None:
        ax.set_title("no ordering transition detected", fontsize="small")
    ax.set_xlabel(f"time ({unit})")
    ax.set_ylabel("order parameter")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize="x-small", ncol=2)
    return fig


def _msd(lat, dyn, out, **kw):
    a = dyn.attrs
    unit = a.get("time_unit") or "frame"
    lag_t = dyn["lag_time"].values
    fig, axes = new_figure(1, 2, figsize=(10, 3.8), squeeze=False)
    axes = axes[0]
    for ax, var, dim, dkey, ikey, ylabel in (
        (axes[0], "msd_rot", 1, "rotational_diffusion", "rotational_msd_intercept", "rotational MSD (rad²)"),
        (axes[1], "msd_trans", 2, "translational_diffusion", "translational_msd_intercept",
         f"translational MSD ({a.get('pixel_unit') or 'px'}²)"),
    ):
        y = dyn[var].values
        ok = np.isfinite(y) & (y > 0)
        ax.loglog(lag_t[ok], y[ok], "o", ms=4, label="measured")
        d, c = a.get(dkey), a.get(ikey)
        if d not in (None, "") and c not in (None, "") and np.isfinite(float(d)):
            fit = 2 * dim * float(d) * lag_t + float(c)
            good = fit > 0
            ax.loglog(lag_t[good], fit[good], "-", color="k", label=f"D = {float(d):.3g} {a.get(dkey + '_units', '')}")
        ax.set_xlabel(f"lag time ({unit})")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="small")
    return fig


def _pair_correlation(lat, dyn, out, **kw):
    fig, ax = new_figure(figsize=(6, 3.8))
    if "gr" not in dyn:
        ax.text(0.5, 0.5, "no positions", ha="center", transform=ax.transAxes)
        return fig
    r = dyn["r"].values
    for k, stage in enumerate(dyn["stage"].values):
        ax.plot(r, dyn["gr"].isel(stage=k).values, label=f"{stage} (frame {dyn['gr_frame'].values[k]:.0f})")
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xlabel("r (px)")
    ax.set_ylabel("g(r)")
    ax.legend(fontsize="small")
    return fig


_DRAWERS = {
    "dynamics_latent_density": _latent_density, "dynamics_latent_maps": _latent_maps, "dynamics_latent_means": _latent_means,
    "dynamics_trajectories": _trajectories, "dynamics_latent_scatter": _latent_scatter, "dynamics_orientation": _orientation,
    "dynamics_order_parameters": _order_parameters, "dynamics_msd": _msd, "dynamics_pair_correlation": _pair_correlation,
}


def draw(movie_dir: str | os.PathLike, figures_dir: str | os.PathLike, *, formats=("png", "svg"), dpi: int = 150,
         trajectories: int = 8, max_points: int = 20000, seed: int = 0, max_windows: int = 1_000_000) -> list[Path]:
    """Draw every figure of :data:`FIGURES` from ``movie_dir``'s latents and dynamics.

    Parameters
    ----------
    movie_dir : path
        ``results/{movie}`` holding ``latents.zarr`` and ``dynamics.zarr`` (``movie.zarr`` optional).
    figures_dir : path
        Where ``<stem>.<format>`` files are written.
    formats, dpi
        Output formats and raster resolution (dots per inch).
    trajectories : int
        Number of the longest tracks in the single-particle figure.
    max_points : int
        Points drawn at most in the latent scatter.
    max_windows : int
        (trajectory, frame) values the latent scatter reads at most (whole trajectories are
        sampled beyond it, see :func:`~rvae_tools.plots.style.sample_trajectories`).

    Returns
    -------
    list of Path
        The files written.
    """
    movie_dir = Path(movie_dir)
    # Opened lazily: each figure reads only the frames, trajectories and variables it draws.
    lat = open_zarr(movie_dir / "latents.zarr", required=["angle", "x", "y"], what="latents store", chunks=None)
    dyn = open_zarr(movie_dir / "dynamics.zarr", required=["S_n", "n_particles"], what="dynamics store", chunks=None)
    written: list[Path] = []
    for stem, drawer in _DRAWERS.items():
        fig = drawer(lat, dyn, figures_dir, movie_dir=movie_dir, n_tracks=trajectories, max_points=max_points,
                     seed=seed, max_windows=max_windows)
        written += save_figure(fig, figures_dir, stem, formats=formats, dpi=dpi)
    return written

"""Figures of the rVAE stage: latent manifold, reconstructions, and angle/shift histograms.

Reads ``results/{movie}/patches.zarr``, ``results/{movie}/latents.zarr`` and the trained model
the movie was encoded with, given explicitly (``rvae-tools figures --model``; the workflow
declares it as an input of the ``figures`` rule), never guessed from the folder layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import open_zarr
from .style import new_figure, sample_trajectories, save_figure

FIGURES = {
    "rvae_manifold": (
        "Latent manifold of the rVAE: windows decoded on a grid of the first two content latents "
        "z1, z2 (spanning the 2nd-98th percentiles of the encoded values) at zero angle and zero shift. "
        "Shape varies across the grid; orientation and position do not, because the decoder takes "
        "them from the angle and shift latents."
    ),
    "rvae_reconstructions": (
        "Input windows (top row) and their rVAE reconstructions (bottom row) for windows spread "
        "evenly over the movie; intensities are the normalised window values."
    ),
    "rvae_latent_histograms": (
        "Distributions of the encoded angle (degrees) and of the encoded shifts dx (along x, columns) "
        "and dy (along y, rows) in pixels, over all windows of the movie (by class when known)."
    ),
}

GRID = 9
N_RECON = 8


def _mosaic(images: np.ndarray) -> np.ndarray:
    """(rows, cols, h, w) tiles -> one image with a 1-pixel NaN gutter between tiles."""
    rows, cols, h, w = images.shape
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan, dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            out[i * (h + 1): i * (h + 1) + h, j * (w + 1): j * (w + 1) + w] = images[i, j]
    return out


def _manifold(model, latents, figures_dir, formats, dpi) -> list[Path]:
    k = int(model.latent_dim)
    if k == 0:
        # No content latents: the "manifold" is the single learned template.
        image = np.asarray(model.decode(np.zeros((1, 0), np.float32)), dtype=np.float32)[0]
        fig, ax = new_figure(figsize=(4, 3.6))
        h, w = image.shape
        im = ax.imshow(image, cmap="gray", interpolation="nearest",
                       extent=(-(w - 1) / 2 - 0.5, (w - 1) / 2 + 0.5, (h - 1) / 2 + 0.5, -(h - 1) / 2 - 0.5))
        ax.set_xlabel("x offset (px)")
        ax.set_ylabel("y offset (px)")
        ax.set_title("decoded at angle 0 rad, shift (0, 0) px (latent_dim 0)")
        fig.colorbar(im, ax=ax, label="decoded intensity (normalised)")
        return save_figure(fig, figures_dir, "rvae_manifold", formats=formats, dpi=dpi)
    z = latents["z"].values.reshape(-1, k) if latents is not None else np.zeros((0, k))
    z = z[np.isfinite(z).all(axis=1)]
    if z.shape[0] >= 10:
        lo, hi = np.percentile(z, 2, axis=0), np.percentile(z, 98, axis=0)
        centre = np.median(z, axis=0)
    else:
        lo, hi, centre = np.full(k, -2.0), np.full(k, 2.0), np.zeros(k)
    hi = np.where(hi > lo, hi, lo + 1.0)
    ax0 = np.linspace(lo[0], hi[0], GRID)
    ax1 = np.linspace(lo[1], hi[1], GRID) if k > 1 else np.zeros(1)
    codes = np.tile(centre, (ax1.size * ax0.size, 1)).astype(np.float32)
    # rows run from high z2 (top) to low z2 (bottom), like a y axis
    g1, g0 = np.meshgrid(ax1[::-1], ax0, indexing="ij")
    codes[:, 0] = g0.ravel()
    if k > 1:
        codes[:, 1] = g1.ravel()
    images = np.asarray(model.decode(codes), dtype=np.float32)
    h, w = images.shape[1:]
    mosaic = _mosaic(images.reshape(ax1.size, ax0.size, h, w))
    fig, ax = new_figure(figsize=(6, 5.4) if k > 1 else (8, 1.8))
    extent = (lo[0] - (ax0[1] - ax0[0]) / 2, hi[0] + (ax0[1] - ax0[0]) / 2,
              (lo[1] - (ax1[1] - ax1[0]) / 2) if k > 1 else -0.5, (hi[1] + (ax1[1] - ax1[0]) / 2) if k > 1 else 0.5)
    im = ax.imshow(mosaic, extent=extent, aspect="auto", cmap="gray", interpolation="nearest")
    ax.set_xlabel("content latent z1 (dimensionless)")
    if k > 1:
        ax.set_ylabel("content latent z2 (dimensionless)")
    else:
        ax.set_yticks([])
    title = "decoded at angle 0 rad, shift (0, 0) px"
    if k > 2:
        title += f"; z3..z{k} at their medians"
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="decoded intensity (normalised)", shrink=0.8)
    return save_figure(fig, figures_dir, "rvae_manifold", formats=formats, dpi=dpi)


def _reconstructions(model, patches, figures_dir, formats, dpi) -> list[Path]:
    n_obs = patches.sizes["obs"]
    idx = np.unique(np.linspace(0, n_obs - 1, min(N_RECON, n_obs)).round().astype(int))
    windows = np.asarray(patches["window"].isel(obs=idx).values, dtype=np.float32)
    recon = np.asarray(model.reconstruct(windows), dtype=np.float32)
    size = windows.shape[1:]
    fig, axes = new_figure(2, idx.size, figsize=(1.3 * idx.size + 0.8, 3.2), squeeze=False)
    vmin, vmax = float(np.nanmin(windows)), float(np.nanmax(windows))
    half_y, half_x = (size[0] - 1) / 2, (size[1] - 1) / 2
    extent = (-half_x - 0.5, half_x + 0.5, half_y + 0.5, -half_y - 0.5)
    for j, i in enumerate(idx):
        for row, img in enumerate((windows[j], recon[j])):
            ax = axes[row, j]
            im = ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, extent=extent, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        p, f = int(patches["particle"].values[i]), int(patches["frame"].values[i])
        axes[0, j].set_title(f"particle {p}\nframe {f}", fontsize="small")
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("reconstruction")
    axes[1, 0].set_xticks([-half_x, 0, half_x])
    axes[1, 0].set_xticklabels([f"{-half_x:g}", "0", f"{half_x:g}"], fontsize="x-small")
    axes[1, 0].set_xlabel("x offset (px)", fontsize="small")
    fig.colorbar(im, ax=axes, label="intensity (normalised)", shrink=0.8)
    return save_figure(fig, figures_dir, "rvae_reconstructions", formats=formats, dpi=dpi)


def _histograms(latents, figures_dir, formats, dpi) -> list[Path]:
    fig, axes = new_figure(1, 3, figsize=(11, 3.4))
    # Zarr's variable-length strings come back as numpy StringDType, which will not cast to "<U"
    cls = np.array([str(c) for c in latents["cls"].values], dtype=object) if "cls" in latents.coords else None
    groups = [(None, np.ones(latents.sizes["particle"], dtype=bool))]
    if cls is not None:
        labels = sorted({c for c in cls if c not in ("", "nan", "None")})
        if 1 < len(labels) <= 8:
            groups = [(c, cls == c) for c in labels]
    specs = [
        ("angle", "encoded angle (deg)", lambda v: np.degrees(v)),
        ("dx", "encoded shift dx along x (px)", lambda v: v),
        ("dy", "encoded shift dy along y (px)", lambda v: v),
    ]
    for ax, (name, label, scale) in zip(axes, specs):
        values_all = scale(latents[name].values)
        finite = values_all[np.isfinite(values_all)]
        if finite.size == 0:
            ax.text(0.5, 0.5, "no finite values", transform=ax.transAxes, ha="center")
            ax.set_xlabel(label)
            continue
        lo, hi = np.percentile(finite, [0, 100])
        if hi <= lo:
            hi = lo + 1.0
        bins = np.linspace(lo, hi, 49)
        for group, mask in groups:
            v = values_all[mask].ravel()
            v = v[np.isfinite(v)]
            ax.hist(v, bins=bins, histtype="step" if group is not None else "stepfilled",
                    alpha=1.0 if group is not None else 0.7, label=None if group is None else f"class {group}")
        ax.set_xlabel(label)
        ax.set_ylabel("windows (count)")
    if len(groups) > 1:
        axes[0].legend(fontsize="small")
    return save_figure(fig, figures_dir, "rvae_latent_histograms", formats=formats, dpi=dpi)


def draw(
    movie_dir: str | os.PathLike,
    figures_dir: str | os.PathLike,
    *,
    formats=("png", "svg"),
    dpi: int = 150,
    model_path: str | os.PathLike | None = None,
    max_windows: int = 1_000_000,
    seed: int = 0,
) -> list[Path]:
    """Write every figure of :data:`FIGURES` for one movie; returns the written paths.

    Parameters
    ----------
    movie_dir : path
        ``results/{movie}`` holding ``patches.zarr`` and ``latents.zarr``.
    figures_dir : path
        Where the figures go (``results/{movie}/figures``).
    model_path : path
        The model the movie's latents were encoded with (required for these figures).
    max_windows, seed
        (trajectory, frame) values of the latents read at most, and the seed of the whole
        trajectories sampled beyond (see :func:`~rvae_tools.plots.style.sample_trajectories`).
    """
    from ..rvae import load_model

    movie_dir = Path(movie_dir)
    patches = open_zarr(movie_dir / "patches.zarr", required=["window", "particle", "frame"], what="patches store")
    latents = open_zarr(movie_dir / "latents.zarr", required=["angle", "dx", "dy", "z"], what="latents store")
    latents = latents.isel(particle=sample_trajectories(latents.sizes["particle"], latents.sizes["frame"],
                                                        max_windows, seed))
    if model_path is None:
        raise InputError(f"{movie_dir}: no rVAE model given for the latent-manifold figures; pass --model MODEL.pt")
    model = load_model(model_path)
    paths: list[Path] = []
    paths += _manifold(model, latents, figures_dir, formats, dpi)
    paths += _reconstructions(model, patches, figures_dir, formats, dpi)
    paths += _histograms(latents, figures_dir, formats, dpi)
    return paths

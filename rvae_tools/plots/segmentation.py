"""Segmentation QC: frames, the U-Net probability map and the detections overlaid."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .style import new_figure, save_figure

FIGURES = {
    "segmentation_qc": (
        "Segmentation quality control. Rows: three frames (first, middle, last). Columns: the "
        "frame; the per-pixel particle probability of the U-Net (when the movie was segmented "
        "with it); the frame with every detection marked (colour = class). Axes in pixels."
    ),
    "segmentation_counts": (
        "Detections per frame (left) and the distribution of detected blob areas in px^2 (right). "
        "A sudden change in the count points to a frame the detector struggled with."
    ),
}


def _pick_frames(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1}) if n else []


def draw(movie_dir: str | os.PathLike, figures_dir: str | os.PathLike, *,
         formats=("png", "svg"), dpi: int = 150) -> list[Path]:
    """Draw the segmentation figures of one movie.

    Parameters
    ----------
    movie_dir : path-like
        ``results/{movie}``: reads ``movie.zarr``, ``detections.parquet`` and, when present,
        ``probability.zarr``.
    figures_dir : path-like
        Where the figures go.

    Returns
    -------
    list of Path
    """
    from ..io import open_zarr, read_table

    movie_dir = Path(movie_dir)
    movie = open_zarr(movie_dir / "movie.zarr", required=["image"], what="movie store")
    det = read_table(movie_dir / "detections.parquet", required=["frame", "x", "y"], what="detections table")
    prob_path = movie_dir / "probability.zarr"
    prob = open_zarr(prob_path, required=["probability"], what="probability map") if prob_path.exists() else None
    n = movie.sizes["frame"]
    frames = _pick_frames(n)
    ncol = 3 if prob is not None else 2
    fig, axes = new_figure(len(frames), ncol, figsize=(3.2 * ncol, 3.0 * len(frames)), squeeze=False)
    for r, f in enumerate(frames):
        img = np.asarray(movie["image"][f].values, float)
        lo, hi = np.nanpercentile(img, [1, 99.5]) if np.isfinite(img).any() else (0, 1)
        axes[r, 0].imshow(img, cmap="gray", vmin=lo, vmax=hi)
        axes[r, 0].set_title(f"frame {f}")
        c = 1
        if prob is not None:
            im = axes[r, 1].imshow(prob["probability"][f].values, cmap="magma", vmin=0, vmax=1)
            axes[r, 1].set_title("particle probability")
            fig.colorbar(im, ax=axes[r, 1], shrink=0.8)
            c = 2
        d = det[det["frame"] == f]
        axes[r, c].imshow(img, cmap="gray", vmin=lo, vmax=hi)
        cls = d["cls"].to_numpy() if "cls" in d else np.zeros(len(d))
        colours = plt.get_cmap("tab10")(np.asarray(cls, int) % 10)
        axes[r, c].scatter(d["x"], d["y"], s=14, edgecolors=colours, facecolors="none", marker="o", linewidths=0.8)
        axes[r, c].set_title(f"{len(d)} detections")
        for ax in axes[r]:
            ax.set_xlabel("x (px)")
            ax.set_ylabel("y (px)")
    out = save_figure(fig, figures_dir, "segmentation_qc", formats=formats, dpi=dpi)

    fig, (a, b) = new_figure(1, 2, figsize=(8, 3))
    counts = det.groupby("frame").size().reindex(range(n), fill_value=0)
    a.plot(counts.index, counts.to_numpy(), lw=1)
    a.set_xlabel("frame")
    a.set_ylabel("detections per frame")
    if "area" in det and len(det):
        b.hist(det["area"].to_numpy(), bins=40)
    b.set_xlabel("blob area (px$^2$)")
    b.set_ylabel("detections")
    out += save_figure(fig, figures_dir, "segmentation_counts", formats=formats, dpi=dpi)
    return out

"""Figures of a model with classes: upright templates, the latent manifold of each class, confusion
matrix, class fractions over time.

Drawn by ``rvae-tools classify --figures DIR`` (the confusion matrix needs ``--labels`` or ``--truth``; the
manifold spans each class's windows' z with ``--latents``, else the prior's +-2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .style import new_figure, save_figure

FIGURES = {
    "class_templates": "Decoded template of every class, upright (angle 0) and centred, at z = 0.",
    "class_manifold": "Latent manifold of every class: decodings upright and centred over a grid of the content "
                      "latents z1 (and z2), spanning the 2nd to 98th percentiles of the z of the windows assigned "
                      "to the class (the prior's -2..2 without them); further latents at the class's medians.",
    "class_confusion": "Confusion matrix of the classifier on the windows with a known class (rows: the label, or "
                       "the simulated species of the particle nearest the window's centre; columns: predicted).",
    "class_fractions": "Fraction of the windows of each frame assigned to each class (most probable class).",
}


def templates(model, figures_dir, formats=("png", "svg"), dpi=150) -> list[Path]:
    """One panel per class: the model's upright decoding at z = 0."""
    images = model.templates()
    k = len(images)
    fig, axes = new_figure(1, k, figsize=(1.6 * k + 0.6, 2.0), squeeze=False)
    vmin, vmax = float(images.min()), float(images.max())
    for i, ax in enumerate(axes[0]):
        ax.imshow(images[i], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(str(model.class_names[i]), fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, figures_dir, "class_templates", formats=formats, dpi=dpi)


def confusion(true: np.ndarray, predicted: np.ndarray, class_names, figures_dir, formats=("png", "svg"),
              dpi=150, reference_names=None, reference: str = "labelled class") -> list[Path]:
    """Counts of (reference, predicted) class indices over the windows with a reference class, with the accuracy.

    ``true`` indexes ``class_names`` (labels of the model's own classes) or, with
    ``reference_names``, those (e.g. the simulated species, whose order a model without labels
    need not share); the accuracy is then that of the best one-to-one matching of classes to
    reference classes (:func:`rvae_tools.classify.matched_accuracy`). ``reference`` names the
    rows ("labelled class", "true species").
    """
    from ..classify import matched_accuracy

    names = [str(c) for c in class_names]
    rows = names if reference_names is None else [str(c) for c in reference_names]
    counts = np.zeros((len(rows), len(names)), dtype=np.int64)
    np.add.at(counts, (np.asarray(true), np.asarray(predicted)), 1)
    fig, ax = new_figure(figsize=(1.0 * len(names) + 2.0, 0.9 * len(rows) + 1.5))
    im = ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize="small",
                color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted class")
    ax.set_ylabel(reference)
    if reference_names is None:
        ax.set_title(f"accuracy {np.trace(counts) / max(counts.sum(), 1):.3f} on {counts.sum()} windows")
    else:
        ax.set_title(f"accuracy {matched_accuracy(counts):.3f} on {counts.sum()} windows\n"
                     "(classes matched one-to-one to the rows)", fontsize="small")
    fig.colorbar(im, ax=ax, label="windows", shrink=0.8)
    return save_figure(fig, figures_dir, "class_confusion", formats=formats, dpi=dpi)


def fractions(table: pd.DataFrame, class_names, figures_dir, formats=("png", "svg"), dpi=150) -> list[Path]:
    """Per frame, the share of windows whose most probable class is each class."""
    counts = pd.crosstab(table["frame"], table["cls_index"]).reindex(columns=range(len(class_names)), fill_value=0)
    share = counts.div(counts.sum(axis=1), axis=0)
    fig, ax = new_figure(figsize=(6.0, 3.2))
    for i, name in enumerate(class_names):
        ax.plot(share.index, share[i], label=str(name))
    ax.set_xlabel("frame")
    ax.set_ylabel("fraction of windows")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    return save_figure(fig, figures_dir, "class_fractions", formats=formats, dpi=dpi)


def manifold(model, figures_dir, z: np.ndarray | None = None, cls_index: np.ndarray | None = None,
             formats=("png", "svg"), dpi=150, grid: int = 7) -> list[Path]:
    """One panel per class: decodings (angle 0 rad, shift 0 px) as that class over a grid of z.

    Parameters
    ----------
    z : ndarray (n, k), optional
        Content latents of windows (posterior means); with ``cls_index`` (n,), the most probable
        class of each, the grid of a class spans the 2nd..98th percentiles of its windows' z1
        (and z2) and holds z3.. at their medians. Classes with fewer than 10 windows, or no
        ``z``, take the prior's range -2..2 (z ~ N(0, I)) at 0.
    """
    from .rvae import _mosaic

    k, names = int(model.latent_dim), [str(c) for c in model.class_names]
    n_cls = len(names)
    fig, axes = new_figure(1, n_cls, figsize=(2.6 * n_cls + 0.8, 3.0 if k > 1 else 1.6), squeeze=False)
    vmin, vmax = np.inf, -np.inf
    panels = []
    for c in range(n_cls):
        zc = None
        if z is not None and cls_index is not None and k:
            zc = np.asarray(z)[np.asarray(cls_index) == c]
            zc = zc[np.isfinite(zc).all(axis=1)]
        if zc is not None and len(zc) >= 10:
            lo, hi, centre = np.percentile(zc, 2, axis=0), np.percentile(zc, 98, axis=0), np.median(zc, axis=0)
        else:
            lo, hi, centre = np.full(k, -2.0), np.full(k, 2.0), np.zeros(k)
        hi = np.where(hi > lo, hi, lo + 1.0)
        ax0 = np.linspace(lo[0], hi[0], grid) if k else np.zeros(1)
        ax1 = np.linspace(lo[1], hi[1], grid) if k > 1 else np.zeros(1)
        codes = np.tile(centre, (ax1.size * ax0.size, 1)).astype(np.float32)
        g1, g0 = np.meshgrid(ax1[::-1], ax0, indexing="ij")  # rows from high z2 (top) to low
        if k:
            codes[:, 0] = g0.ravel()
        if k > 1:
            codes[:, 1] = g1.ravel()
        images = np.asarray(model.decode(codes, cls=c), dtype=np.float32)
        h, w = images.shape[1:]
        panels.append((_mosaic(images.reshape(ax1.size, ax0.size, h, w)), lo, hi, zc))
        vmin, vmax = min(vmin, float(images.min())), max(vmax, float(images.max()))
    for c, (ax, (mosaic, lo, hi, zc)) in enumerate(zip(axes[0], panels)):
        extent = (lo[0], hi[0], lo[1] if k > 1 else 0, hi[1] if k > 1 else 1) if k else None
        ax.imshow(mosaic, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest", aspect="auto", extent=extent)
        count = f", {len(zc)} windows" if zc is not None else ""
        ax.set_title(f"{names[c]}{count}", fontsize="small")
        ax.set_xlabel("z1 (dimensionless)" if k else "")
        if k > 1 and c == 0:
            ax.set_ylabel("z2 (dimensionless)")
        if k < 2:
            ax.set_yticks([])
        if not k:
            ax.set_xticks([])
    return save_figure(fig, figures_dir, "class_manifold", formats=formats, dpi=dpi)

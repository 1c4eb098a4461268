"""Figures of a model with classes: upright templates, confusion matrix, class fractions over time.

Drawn by ``rvae-tools classify --figures DIR`` (the confusion matrix needs ``--labels``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .style import new_figure, save_figure

FIGURES = {
    "class_templates": "Decoded template of every class, upright (angle 0) and centred, at z = 0.",
    "class_confusion": "Confusion matrix of the classifier on the labelled windows (rows: label, columns: predicted).",
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
              dpi=150) -> list[Path]:
    """Counts of (label, predicted) class indices over labelled windows, with per-row accuracy."""
    k = len(class_names)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (np.asarray(true), np.asarray(predicted)), 1)
    fig, ax = new_figure(figsize=(1.0 * k + 2.0, 0.9 * k + 1.5))
    im = ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize="small",
                color="white" if n > counts.max() / 2 else "black")
    names = [str(c) for c in class_names]
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("labelled class")
    acc = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"accuracy {acc:.3f} on {counts.sum()} labelled windows")
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

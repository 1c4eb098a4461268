"""From per-pixel probabilities to particles: threshold, components, watershed, centroids.

Centres are probability-weighted centroids of each blob, so they are sub-pixel without any
model of the particle shape; orientation and eccentricity come from the weighted second
moments of the same blob.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

#: Columns of a detections table, in order (see the data contract in CONTRIBUTING.md).
DETECTION_COLUMNS = ["frame", "x", "y", "score", "area", "orientation", "eccentricity", "cls"]


def empty_detections() -> pd.DataFrame:
    """A detections table with no rows and the contract's columns and dtypes."""
    return pd.DataFrame({
        "frame": pd.Series([], dtype="int64"), "x": pd.Series([], dtype="float64"),
        "y": pd.Series([], dtype="float64"), "score": pd.Series([], dtype="float64"),
        "area": pd.Series([], dtype="float64"), "orientation": pd.Series([], dtype="float64"),
        "eccentricity": pd.Series([], dtype="float64"), "cls": pd.Series([], dtype="int64"),
    })


def _split_touching(fg: np.ndarray, labels: np.ndarray, prob: np.ndarray, min_distance: float, h: float,
                    split_area: float) -> np.ndarray:
    """Watershed the oversized components on their distance transform, seeded by h-maxima.

    Only components larger than ``split_area`` times the median component area of the frame
    are candidates (a single particle is never cut because of noise on its ridge). A marker
    is a regional maximum of the distance transform (plus a little of the probability, to
    break ties on flat ridges) that rises at least ``h`` px above the saddle to its
    neighbours, so only a real neck between two particles produces two markers.
    """
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    areas = np.bincount(labels.ravel())[1:]
    if len(areas) == 0:
        return labels
    limit = split_area * float(np.median(areas))
    big_ids = np.flatnonzero(areas > limit) + 1
    if len(big_ids) == 0:
        return labels
    big = np.isin(labels, big_ids)
    dist = ndimage.distance_transform_edt(big)
    relief = dist + 0.5 * prob * big
    if min_distance > 0:
        relief = ndimage.gaussian_filter(relief, min_distance / 4.0) * big
    markers, n = ndimage.label(h_maxima(relief, h) & big)
    if n == 0:
        return labels
    split = watershed(-relief, markers, mask=big)
    out = labels.copy()
    out[big] = 0
    nxt = labels.max() + 1
    out = np.where(split > 0, split + nxt, out)
    # Pixels of a big component that no marker reached keep their original label.
    leftover = big & (split == 0)
    out[leftover] = labels[leftover]
    return out


def blobs_to_detections(
    prob: np.ndarray,
    *,
    threshold: float = 0.5,
    min_area: float = 4.0,
    max_area: float | None = None,
    edge: float = 0.0,
    split: bool = True,
    split_h: float = 1.0,
    split_area: float = 1.6,
    min_distance: float = 3.0,
    border_fraction: float = 0.5,
    class_prob: np.ndarray | None = None,
    frame: int = 0,
) -> pd.DataFrame:
    """Detect particles in one probability map.

    Parameters
    ----------
    prob : ndarray (y, x)
        Probability that a pixel belongs to any particle, in [0, 1].
    threshold : float
        Pixels with ``prob > threshold`` form the blobs.
    min_area, max_area : float
        Blob area limits in pixels (``max_area`` None = no limit).
    edge : float
        Drop detections whose centre lies closer than this to the frame border (px).
    split : bool
        Split touching particles by watershed.
    split_h : float
        Minimum depth (px of distance transform) of the neck between two particles.
    split_area : float
        Only blobs larger than this multiple of the frame's median blob area are split.
    min_distance : float
        Smoothing scale (px) of the watershed relief; about the particle width.
    border_fraction : float
        Blobs that touch the frame border and are smaller than this share of the frame's
        median whole blob are dropped (their particle is centred outside the frame); 0 keeps them.
    class_prob : ndarray (classes, y, x), optional
        Per-class probabilities; each blob takes the class with the largest summed probability.
    frame : int
        Frame index written into the table.

    Returns
    -------
    DataFrame
        ``frame, x, y`` (px, x = column, y = row), ``score`` (mean probability in the blob),
        ``area`` (px), ``orientation`` (rad, major axis counter-clockwise from +x towards +y,
        in [-pi/2, pi/2)), ``eccentricity`` (0 = round), ``cls`` (class index, 0 with one class).
    """
    prob = np.nan_to_num(np.asarray(prob, np.float64), nan=0.0)
    fg = prob > threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return empty_detections()
    if split:
        labels = _split_touching(fg, labels, prob, min_distance, split_h, split_area)
    # The centroid weights extend past the threshold down to a floor (threshold / 4) and
    # fall continuously to zero there, so where the blob is cut off does not bias the centre.
    from skimage.segmentation import expand_labels

    ids = np.unique(labels[labels > 0])
    floor = threshold / 4
    support = np.where(prob > floor, expand_labels(labels, 2), 0)
    weights = np.clip(prob - floor, 0, None)
    index = ids
    sw = ndimage.sum(weights, support, index)
    yy, xx = np.indices(prob.shape, dtype=np.float64)
    mx = ndimage.sum(weights * xx, support, index) / sw
    my = ndimage.sum(weights * yy, support, index) / sw
    sxx = ndimage.sum(weights * xx * xx, support, index) / sw - mx**2
    syy = ndimage.sum(weights * yy * yy, support, index) / sw - my**2
    sxy = ndimage.sum(weights * xx * yy, support, index) / sw - mx * my
    area = ndimage.sum(np.ones_like(prob), labels, index)
    score = ndimage.mean(prob, labels, index)
    tr, det = sxx + syy, sxx * syy - sxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0)
    ecc = np.sqrt(np.clip(1 - l2 / np.maximum(l1, 1e-12), 0, 1))
    orientation = 0.5 * np.arctan2(2 * sxy, sxx - syy)
    if class_prob is not None and class_prob.shape[0] > 1:
        sums = np.stack([ndimage.sum(c, labels, index) for c in class_prob])
        cls = np.argmax(sums, axis=0)
    else:
        cls = np.zeros(len(index), int)
    df = pd.DataFrame({
        "frame": np.full(len(index), frame, dtype="int64"), "x": mx, "y": my, "score": score,
        "area": area, "orientation": (orientation + np.pi / 2) % np.pi - np.pi / 2,
        "eccentricity": ecc, "cls": cls.astype("int64"),
    })
    keep = df["area"] >= min_area
    if border_fraction > 0 and len(df):
        # A blob cut by the frame border whose visible part is less than this share of a
        # whole one belongs to a particle centred outside the frame: its centre is unknown.
        h, w = prob.shape
        edge_ids = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        touches = np.isin(index, edge_ids[edge_ids > 0])
        whole = df["area"].to_numpy()[~touches]
        if len(whole):
            keep &= ~(touches & (df["area"].to_numpy() < border_fraction * np.median(whole)))
    if max_area is not None:
        keep &= df["area"] <= max_area
    if edge > 0:
        h, w = prob.shape
        keep &= (df["x"] >= edge) & (df["x"] <= w - 1 - edge) & (df["y"] >= edge) & (df["y"] <= h - 1 - edge)
    return df[keep].reset_index(drop=True)

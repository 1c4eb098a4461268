"""Detection metrics: one-to-one matching within a radius, precision, recall, F1, RMSE.

Matching is done per frame by minimum total distance (Hungarian algorithm) among pairs
closer than the radius, so a detection can explain at most one true particle and the score
does not depend on the order of either table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree


def match_points(true_xy: np.ndarray, pred_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Pair true and predicted points one to one, minimising the summed distance.

    Parameters
    ----------
    true_xy, pred_xy : ndarray (n, 2), (m, 2)
        Positions in pixels.
    radius : float
        Largest distance (px) of a valid pair.

    Returns
    -------
    ti, pi : ndarray of int
        Indices of matched pairs (``true_xy[ti[k]]`` with ``pred_xy[pi[k]]``).
    """
    true_xy = np.asarray(true_xy, float).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, float).reshape(-1, 2)
    if len(true_xy) == 0 or len(pred_xy) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    pairs = cKDTree(true_xy).sparse_distance_matrix(cKDTree(pred_xy), radius, output_type="coo_matrix")
    if pairs.nnz == 0:
        return np.zeros(0, int), np.zeros(0, int)
    rows, cols = np.unique(pairs.row), np.unique(pairs.col)
    # A dense cost on the points that have any neighbour; forbidden pairs cost more than
    # any set of valid ones, so they are chosen only when nothing else is left, then dropped.
    big = radius * (len(rows) + len(cols) + 1) + 1.0
    cost = np.full((len(rows), len(cols)), big)
    cost[np.searchsorted(rows, pairs.row), np.searchsorted(cols, pairs.col)] = pairs.data
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] <= radius
    return rows[r[ok]], cols[c[ok]]


def detection_scores(
    truth: pd.DataFrame,
    detections: pd.DataFrame,
    radius: float,
    *,
    shape: tuple[int, int] | None = None,
    margin: float = 0.0,
) -> dict[str, float]:
    """Precision, recall, F1 and localisation error of detections against the truth.

    Parameters
    ----------
    truth, detections : DataFrame
        Columns ``frame``, ``x``, ``y`` (px).
    radius : float
        Match radius in pixels (half a particle diameter is customary).
    shape : (int, int), optional
        Frame height and width; needed when ``margin`` > 0.
    margin : float
        Border zone (px) that is not scored: true particles centred there are neither
        misses nor hits, and unmatched detections there are not false positives (particles
        cut by the border have no well-defined visible centre).

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``, ``rmse`` (px, over
        matched pairs), ``bias_x``, ``bias_y`` (px, mean detection minus truth).
    """
    tp = fp = fn = 0
    dx_all, dy_all = [], []

    def inside(df: pd.DataFrame) -> np.ndarray:
        if margin <= 0 or shape is None:
            return np.ones(len(df), bool)
        h, w = shape
        x, y = df["x"].to_numpy(), df["y"].to_numpy()
        return (x >= margin) & (x <= w - 1 - margin) & (y >= margin) & (y <= h - 1 - margin)

    frames = np.union1d(truth["frame"].unique(), detections["frame"].unique())
    t_groups = dict(tuple(truth.groupby("frame")))
    d_groups = dict(tuple(detections.groupby("frame")))
    for frame in frames:
        t = t_groups.get(frame, truth.iloc[:0])
        d = d_groups.get(frame, detections.iloc[:0])
        t_in, d_in = inside(t), inside(d)
        ti, pi = match_points(t[["x", "y"]].to_numpy(), d[["x", "y"]].to_numpy(), radius)
        scored = t_in[ti]
        tp += int(scored.sum())
        matched_t = np.zeros(len(t), bool)
        matched_t[ti] = True
        matched_d = np.zeros(len(d), bool)
        matched_d[pi] = True
        fn += int((~matched_t & t_in).sum())
        fp += int((~matched_d & d_in).sum())
        dx_all.append(d["x"].to_numpy()[pi[scored]] - t["x"].to_numpy()[ti[scored]])
        dy_all.append(d["y"].to_numpy()[pi[scored]] - t["y"].to_numpy()[ti[scored]])
    dx = np.concatenate(dx_all) if dx_all else np.zeros(0)
    dy = np.concatenate(dy_all) if dy_all else np.zeros(0)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    rmse = float(np.sqrt(np.mean(dx**2 + dy**2))) if len(dx) else float("nan")
    return {
        "tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1, "rmse": rmse,
        "bias_x": float(dx.mean()) if len(dx) else float("nan"),
        "bias_y": float(dy.mean()) if len(dy) else float("nan"),
    }

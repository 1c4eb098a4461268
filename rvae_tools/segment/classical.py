"""A classical, shape-aware detector that assumes nothing about the particles' shape.

Steps per frame (:func:`classical_frame`): flatten the background (a robust quadratic
surface, optionally followed by a masked Gaussian of a scale larger than the particles),
make the particles bright (``invert``), threshold, split touching particles by a watershed,
and measure every region: intensity-weighted centre, orientation and major/minor axis from
the region's second moments, length and width as the region's extent along those axes, area.

With a particle ``width`` (the inspected one for a user movie) the threshold and the split
are scale-aware (:func:`width_foreground`, :func:`tree_markers`): a difference of Gaussians
(sigma ``width / 8``, at least 1 px, and ``1.5 width``) takes out the halos and the uneven background of phase
contrast, half the Otsu level of its positive part is the foreground, an opening of a
quarter width removes thin structures (stalks, fibrils, scratches), and touching particles
are told apart by the component tree of the signal: a region is split where it falls
apart into pieces that each keep a particle's area and rise a tenth of the frame's contrast
above the saddle between them, so a dim septum or a bright gap separates two cells but the
texture inside one does not. Without a width, the Otsu threshold and the distance-transform
watershed of :func:`rvae_tools.segment.postprocess._split_touching` are used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from .postprocess import DETECTION_COLUMNS, _split_touching, empty_detections

#: Extra columns of the classical detector, after the detections contract's.
SHAPE_COLUMNS = ["major_axis", "minor_axis", "length", "width"]


def _quadratic_background(frame: np.ndarray, iterations: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Fit a quadratic surface to the background, rejecting particles as outliers.

    Returns the fitted surface and the mask of pixels the last fit kept (the background).
    """
    h, w = frame.shape
    step = max(1, min(h, w) // 128)
    yy, xx = np.mgrid[0:h:step, 0:w:step]
    v = frame[::step, ::step].ravel()
    u, t = (xx.ravel() / w - 0.5), (yy.ravel() / h - 0.5)
    design = np.stack([np.ones_like(u), u, t, u * u, u * t, t * t], axis=1)
    keep = np.isfinite(v)
    coef = np.zeros(6)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(design[keep], v[keep], rcond=None)
        resid = v - design @ coef
        sigma = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep]))) + 1e-12
        keep = np.abs(resid) < 2.5 * sigma
    U, T = np.meshgrid(np.arange(w) / w - 0.5, np.arange(h) / h - 0.5)
    full = np.stack([np.ones_like(U), U, T, U * U, U * T, T * T], axis=-1) @ coef
    resid = frame - full
    sigma = 1.4826 * np.median(np.abs(resid - np.median(resid))) + 1e-12
    return full, np.abs(resid) < 2.5 * sigma


def flatten_background(frame: np.ndarray, *, scale: float | None = None) -> np.ndarray:
    """The frame minus its background level (intensity units; background about 0).

    Parameters
    ----------
    frame : ndarray (y, x)
        Raw intensities; NaNs become the frame's median.
    scale : float, optional
        Sigma (px) of a second, masked Gaussian background (uneven illumination at scales
        above this). Must be well above the particle length; None = quadratic surface only.
    """
    f = np.asarray(frame, np.float64)
    if np.isnan(f).any():
        f = np.where(np.isnan(f), np.nanmedian(f), f)
    surface, background = _quadratic_background(f)
    r = f - surface
    if scale:
        # Normalised convolution over background pixels only, so particles do not leak
        # into their own background estimate.
        m = background.astype(np.float64)
        num = ndimage.gaussian_filter(r * m, scale)
        den = ndimage.gaussian_filter(m, scale)
        r = r - np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
    return r - background_level(ndimage.gaussian_filter(r, 1.0))


def noise_sigma(residual: np.ndarray) -> float:
    """Pixel noise (intensity units) from the differences of neighbouring pixels (robust to particles)."""
    d = np.diff(residual, axis=1).ravel()
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def background_level(residual: np.ndarray) -> float:
    """The most common value of a (smoothed) frame: the background, even where particles or
    their halos cover a large share of it (a median would move towards them)."""
    v = residual[np.isfinite(residual)]
    lo, hi = np.percentile(v, [1, 99])
    if hi <= lo:
        return float(np.median(v))
    counts, edges = np.histogram(v, 512, (lo, hi))
    counts = ndimage.gaussian_filter1d(counts.astype(np.float64), 3)
    return float(0.5 * (edges[:-1] + edges[1:])[counts.argmax()])


def polarity_counts(residual: np.ndarray) -> tuple[float, float]:
    """Pixels clearly brighter and clearly darker than the background.

    The frame is smoothed (Gaussian, 1 px) and compared with its background level
    (:func:`background_level`) against 3 sigma of the smoothed noise; isolated pixels are
    removed by a morphological opening.

    Returns
    -------
    bright, dark : float
        Pixel counts.
    """
    sm = ndimage.gaussian_filter(residual, 1.0)
    level = background_level(sm)
    sigma = noise_sigma(sm) * np.sqrt(2) + 1e-12
    bright = ndimage.binary_opening(sm - level > 3 * sigma)
    dark = ndimage.binary_opening(sm - level < -3 * sigma)
    return float(bright.sum()), float(dark.sum())


def _otsu(values: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values)) if values.size and np.ptp(values) > 0 else float("inf")


def foreground(signal: np.ndarray, *, method: str = "otsu", block: float | None = None) -> tuple[np.ndarray, float]:
    """A soft foreground map in [0, 1] with 0.5 at the threshold, and the threshold.

    Parameters
    ----------
    signal : ndarray (y, x)
        Flattened frame with bright particles (background about 0).
    method : {"otsu", "local"}
        One threshold for the frame (Otsu, at least 3 noise sigma), or a local threshold (Gaussian-weighted mean over
        ``block`` px, floored at half the Otsu threshold so empty background stays empty).
    block : float, optional
        Neighbourhood (px) of the local threshold; about three particle lengths.
    """
    smooth = ndimage.gaussian_filter(signal, 1.0)
    # Otsu over the whole frame separates background from particles; the floor of 3 noise
    # sigma keeps it out of the noise where particles cover little of the frame.
    t = max(_otsu(smooth.ravel()), 3 * np.sqrt(2) * noise_sigma(smooth))
    if not np.isfinite(t) or t <= 0:
        return np.zeros_like(signal), float("inf")
    if method == "local" and block:
        local = ndimage.gaussian_filter(smooth, block / 6.0)
        thresh = np.maximum(local, 0.5 * t)
    else:
        thresh = np.full_like(smooth, t)
    return np.clip(0.5 * smooth / thresh, 0.0, 1.0), t


def measure_regions(labels: np.ndarray, weights: np.ndarray, score: np.ndarray, frame: int = 0) -> pd.DataFrame:
    """Centre, orientation, axes, extent and area of every labelled region.

    Parameters
    ----------
    labels : ndarray (y, x) int
        0 = background, one id per particle.
    weights : ndarray (y, x)
        Non-negative intensities for the centre (intensity-weighted centroid).
    score : ndarray (y, x)
        Per-pixel confidence; its mean over the region is the ``score`` column.

    Returns
    -------
    DataFrame
        The detections contract plus ``major_axis``, ``minor_axis`` (px, 4 sqrt of the
        eigenvalues of the region's second moments: the axes of the ellipse with the same
        moments), ``length`` (px, tip to tip: the extent along the major axis of the region's
        pixels at or above a third of its peak weight), ``width`` (px, the extent across it
        at half the peak).
    """
    index = np.unique(labels[labels > 0])
    if len(index) == 0:
        out = empty_detections()
        for c in SHAPE_COLUMNS:
            out[c] = pd.Series([], dtype="float64")
        return out
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    ones = np.ones(labels.shape)
    area = ndimage.sum(ones, labels, index)
    mx0 = ndimage.sum(xx, labels, index) / area
    my0 = ndimage.sum(yy, labels, index) / area
    sxx = ndimage.sum(xx * xx, labels, index) / area - mx0**2 + 1 / 12
    syy = ndimage.sum(yy * yy, labels, index) / area - my0**2 + 1 / 12
    sxy = ndimage.sum(xx * yy, labels, index) / area - mx0 * my0
    tr, det = sxx + syy, sxx * syy - sxy**2
    disc = np.sqrt(np.maximum(tr**2 / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 0)
    theta = 0.5 * np.arctan2(2 * sxy, sxx - syy)
    w = np.clip(weights, 0, None) * (labels > 0)
    sw = ndimage.sum(w, labels, index)
    mx = np.where(sw > 0, ndimage.sum(w * xx, labels, index) / np.maximum(sw, 1e-300), mx0)
    my = np.where(sw > 0, ndimage.sum(w * yy, labels, index) / np.maximum(sw, 1e-300), my0)
    # Extent along the axes: project every pixel of a region on its own axes.
    lut = np.zeros(int(labels.max()) + 1, int)
    lut[index] = np.arange(len(index))
    # Width at half the region's own peak (a full width at half maximum), so neither the
    # blur nor where the threshold sits widens it. Length at a third of the peak: a tip is
    # blurred from three sides, so at half maximum it would read short.
    peak = ndimage.maximum(weights, labels, index)

    def extent(level: float, axis: str) -> np.ndarray:
        inside = (labels > 0) & (weights >= level * peak[lut[labels]])
        k = lut[labels[inside]]
        px, py = xx[inside] - mx0[k], yy[inside] - my0[k]
        if axis == "along":
            proj = px * np.cos(theta[k]) + py * np.sin(theta[k])
        else:
            proj = -px * np.sin(theta[k]) + py * np.cos(theta[k])
        lab = labels[inside]
        return ndimage.maximum(proj, lab, index) - ndimage.minimum(proj, lab, index) + 1.0

    length = extent(1 / 3, "along")
    width = extent(0.5, "across")
    df = pd.DataFrame({
        "frame": np.full(len(index), frame, dtype="int64"), "x": mx, "y": my,
        "score": ndimage.mean(score, labels, index), "area": area,
        "orientation": (theta + np.pi / 2) % np.pi - np.pi / 2,
        "eccentricity": np.sqrt(np.clip(1 - l2 / np.maximum(l1, 1e-12), 0, 1)),
        "cls": np.zeros(len(index), dtype="int64"),
        "major_axis": 4 * np.sqrt(l1), "minor_axis": 4 * np.sqrt(l2), "length": length, "width": width,
    })
    return df


def classical_frame(frame: np.ndarray, settings: dict[str, Any], *, invert: bool, index: int = 0) -> pd.DataFrame:
    """Detect particles of any shape in one frame.

    Parameters
    ----------
    frame : ndarray (y, x)
        Raw intensities.
    settings : dict
        ``segment.classical``: ``threshold`` (otsu or local), ``background`` (sigma px of the
        masked Gaussian background, null = quadratic surface only), ``block`` (px, local
        threshold neighbourhood), ``min_area``, ``max_area`` (px), ``split`` (bool),
        ``split_h`` (px), ``split_area``, ``min_distance`` (px, about the particle width),
        ``border_fraction``, ``edge`` (px), ``width`` (px, the particles' width: the
        scale-aware threshold and split of :func:`width_foreground` and
        :func:`tree_markers`; null or absent = Otsu and the distance-transform watershed).
    invert : bool
        Particles darker than the background.
    index : int
        Frame index written into the table.

    Returns
    -------
    DataFrame
        The detections contract (``orientation`` in rad of the major axis from +x towards +y,
        ``score`` the mean soft-foreground value of the region) plus :data:`SHAPE_COLUMNS`.
    """
    residual = flatten_background(frame, scale=settings["background"])
    signal = -residual if invert else residual
    width = settings.get("width")
    if width:
        return _filter_regions(_scale_aware_regions(signal, float(width), index), settings)
    fgmap, _ = foreground(signal, method=settings["threshold"], block=settings["block"])
    fg = fgmap > 0.5
    fg = ndimage.binary_opening(fg, structure=np.ones((2, 2))) if fg.sum() > 0 else fg
    labels, n = ndimage.label(fg)
    if n == 0:
        return measure_regions(labels, signal, fgmap, frame=index)[DETECTION_COLUMNS + SHAPE_COLUMNS]
    if settings["split"]:
        labels = _split_touching(fg, labels, fgmap, settings["min_distance"], settings["split_h"], settings["split_area"])
    # Smoothed weights: a noisy peak pixel would raise the half-maximum level of the extents.
    df = measure_regions(labels, ndimage.gaussian_filter(signal, 0.5), fgmap, frame=index)
    return _filter_regions((df, labels), settings)


def _filter_regions(found: tuple[pd.DataFrame, np.ndarray], settings: dict[str, Any]) -> pd.DataFrame:
    """Drop regions outside the area limits, cut by the frame border, or centred near it."""
    df, labels = found
    if len(df) == 0:
        return df[DETECTION_COLUMNS + SHAPE_COLUMNS]
    keep = df["area"] >= settings["min_area"]
    if settings["max_area"] is not None:
        keep &= df["area"] <= settings["max_area"]
    h, w = labels.shape
    if settings["border_fraction"] > 0 and len(df):
        # A region cut by the border and smaller than this share of a whole one belongs to a
        # particle centred outside the frame: its centre is unknown.
        ids = np.unique(labels[labels > 0])
        edge_ids = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        touches = np.isin(ids, edge_ids[edge_ids > 0])
        whole = df["area"].to_numpy()[~touches & keep.to_numpy()]
        if len(whole):
            keep &= ~(touches & (df["area"].to_numpy() < settings["border_fraction"] * np.median(whole)))
    e = settings["edge"]
    if e > 0:
        keep &= (df["x"] >= e) & (df["x"] <= w - 1 - e) & (df["y"] >= e) & (df["y"] <= h - 1 - e)
    df = df[keep].reset_index(drop=True)
    return df[DETECTION_COLUMNS + SHAPE_COLUMNS]


#: Smallest sigma (px) of the fine Gaussian of the scale-aware foreground: below 1 px the
#: noise floor of the threshold rises above half the contrast of small particles (3 px wide
#: rods in shot noise are then not found at all).
FG_SMOOTH_MIN = 1.0
#: Noise floor of its threshold (noise sigma of the fine signal, times sqrt 2).
FG_NOISE = 3.0
#: Sigma (in widths) of the wide Gaussian, the local background of the foreground.
FG_BACKGROUND = 1.5
#: Levels of the component tree between the foreground's 1st and 99th signal percentiles.
TREE_LEVELS = 16
#: A split must rise this share of the foreground's signal range above the saddle.
TREE_DEPTH = 0.1
#: A piece of a split keeps at least this many squared widths of area.
TREE_AREA = 0.3
#: Smoothing (sigma, in widths) of the signal the component tree is built on.
TREE_SMOOTH = 0.125
#: ... and this many standard deviations of the smoothed pixel noise.
TREE_NOISE = 6.0


def width_foreground(signal: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Scale-aware foreground of bright particles about ``width`` px wide.

    Parameters
    ----------
    signal : ndarray (y, x)
        Flattened frame with bright particles (background about 0).
    width : float
        Particle width (px).

    Returns
    -------
    fg : ndarray (y, x) bool
        Difference of Gaussians (sigma ``width / 8``, at least :data:`FG_SMOOTH_MIN`, minus sigma :data:`FG_BACKGROUND` ``* width``) above half the
        Otsu level of its positive values (at least 3 noise sigma), opened by a disc of a
        quarter width.
    dog : ndarray (y, x)
        The difference of Gaussians (intensity units).
    threshold : float
        Its threshold (intensity units; inf when nothing stands out).
    """
    from skimage.morphology import disk

    fine = ndimage.gaussian_filter(signal, max(FG_SMOOTH_MIN, width / 8))
    # The wide Gaussian is the local background: halos and illumination at the particle
    # scale go, and in a dense colony each cell is compared with its neighbourhood. At one
    # width it still holds much of the cell itself, so a packed colony (e1t1_crop) fell below
    # the threshold; at one and a half it stays in while a sphere's bright-field ring still goes.
    dog = fine - ndimage.gaussian_filter(signal, FG_BACKGROUND * width)
    positive = dog[dog > 0]
    if positive.size < 2:
        return np.zeros(signal.shape, bool), dog, float("inf")
    # Half the Otsu level of the positive part: Otsu over all values would split the dark
    # halos from the rest instead of the particles from the background.
    t = max(0.5 * _otsu(positive), FG_NOISE * np.sqrt(2) * noise_sigma(fine))
    fg = dog > t
    radius = int(np.round(width / 4))
    if radius >= 1 and fg.any():
        fg = ndimage.binary_opening(fg, structure=disk(radius))
    return fg, dog, float(t)


def tree_markers(signal: np.ndarray, fg: np.ndarray, *, min_area: float, depth: float,
                 levels: int = TREE_LEVELS) -> np.ndarray:
    """One marker per particle from the component tree of ``signal`` inside ``fg``.

    Each connected region of ``fg`` is thresholded at rising levels (``levels`` steps
    between the 1st and 99th percentile of ``signal`` over ``fg``). Where a region falls
    apart into two or more pieces that each keep ``min_area`` px and whose peaks rise
    ``depth`` (signal units) above the level of the split, every piece is resolved on its
    own; otherwise the region is one particle and is its own marker.

    Returns
    -------
    ndarray (y, x) int
        Markers (0 = none).
    """
    markers = np.zeros(signal.shape, np.int64)
    if not fg.any():
        return markers
    values = signal[fg]
    lv = np.linspace(np.percentile(values, 1), np.percentile(values, 99), levels)
    base, _ = ndimage.label(fg)
    count = 0
    for k, sl in enumerate(ndimage.find_objects(base)):
        if sl is None:
            continue
        node = base[sl] == k + 1
        if node.sum() < min_area:
            continue
        sub = signal[sl]

        def resolve(level: int, mask: np.ndarray, sub: np.ndarray = sub) -> list[np.ndarray]:
            if level + 1 >= levels:
                return [mask]
            lab, n = ndimage.label((sub > lv[level + 1]) & mask)
            if n == 0:
                return [mask]
            ids = np.arange(1, n + 1)
            big = ids[np.bincount(lab.ravel(), minlength=n + 1)[1:] >= min_area]
            if len(big) >= 2:
                peaks = ndimage.maximum(sub, lab, big)
                big = big[np.asarray(peaks) - lv[level + 1] >= depth]
            if len(big) == 0:
                return [mask]
            if len(big) == 1:
                deeper = resolve(level + 1, lab == big[0])
                return deeper if len(deeper) >= 2 else [mask]
            return [piece for i in big for piece in resolve(level + 1, lab == i)]

        for piece in resolve(0, node):
            count += 1
            markers[sl][piece] = count
    return markers


def _scale_aware_regions(signal: np.ndarray, width: float, index: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Regions of :func:`width_foreground` split by :func:`tree_markers` and a watershed."""
    from skimage.segmentation import watershed

    fg, dog, t = width_foreground(signal, width)
    labels = np.zeros(signal.shape, np.int64)
    score = np.clip(0.5 * dog / t, 0.0, 1.0) if np.isfinite(t) else np.zeros(signal.shape)
    if fg.any():
        sigma = max(0.5, TREE_SMOOTH * width)
        fine = ndimage.gaussian_filter(signal, sigma)
        values = fine[fg]
        # White pixel noise smoothed by a Gaussian of sigma s keeps a standard deviation of
        # noise / (2 sqrt(pi) s); a split must stand TREE_NOISE of those above the saddle,
        # so noise on the plateau of one long particle does not cut it.
        noise = noise_sigma(signal) / (2 * np.sqrt(np.pi) * sigma)
        depth = max(TREE_DEPTH * float(np.percentile(values, 99) - np.percentile(values, 1)), TREE_NOISE * noise)
        markers = tree_markers(fine, fg, min_area=TREE_AREA * width**2, depth=depth)
        labels = watershed(-fine, markers, mask=fg)
    return measure_regions(labels, np.clip(dog, 0, None), score, frame=index), labels

"""A classical, shape-aware detector that assumes nothing about the particles' shape.

Steps per frame (:func:`classical_frame`): flatten the background (a robust quadratic
surface, optionally followed by a masked Gaussian of a scale larger than the particles),
make the particles bright (``invert``), threshold, split touching particles by a watershed,
and measure every region: intensity-weighted centre, orientation and major/minor axis from
the region's second moments, length and width as the region's extent along those axes, area.

With a particle ``width`` (the inspected one for a user movie) the threshold and the split
are scale-aware (:func:`width_foreground`, :func:`valley_map`): a difference of Gaussians
(sigma ``width / 8``, at least 1 px, and ``1.5 width``) takes out the halos and the uneven background of phase
contrast, half the Otsu level of its positive part is the foreground, an opening of a
quarter width removes thin structures (stalks, fibrils, scratches). Touching particles are
told apart by the valleys between them (where the signal curves up across a line: the bright
halo between two dark cells, a dim septum): the foreground outside the valleys falls into
cores (:func:`valley_markers`) that a watershed grows back over the foreground, and touching
pieces that line up across a shallow valley are joined again (:func:`merge_fragments`), so
the texture inside a curved cell does not cut it. Without a width, the Otsu threshold and the
distance-transform watershed of :func:`rvae_tools.segment.postprocess._split_touching` are used.
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
    # Smoothing correlates neighbours, so their differences under-read white noise (stuck.tif:
    # 0.9 against 1.5); the raw noise times the kernel's L2 norm, 1 / (2 sqrt(pi) sigma), is
    # right for white noise. Without it, noise wins over sparse small spots on both sides and
    # a fluorescence movie read as two-sided.
    sigma = max(noise_sigma(sm) * np.sqrt(2), noise_sigma(residual) / (2 * np.sqrt(np.pi))) + 1e-12
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
        :func:`valley_markers`; null or absent = Otsu and the distance-transform watershed).
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
#: Sigma (in widths, at least :data:`VALLEY_SMOOTH_MIN` px) of the Hessian that finds the
#: valleys between touching particles: a quarter width resolves a gap of a few px between two
#: cells without answering to the texture inside one.
VALLEY_SCALE = 0.25
VALLEY_SMOOTH_MIN = 1.0
#: A pixel is in a valley where the signal curves up (largest Hessian eigenvalue) by more than
#: this share of how much the foreground typically curves down across a particle (median of
#: minus the smallest eigenvalue over the foreground): a unit-free level, whatever the contrast.
VALLEY_CUT = 0.2
#: ... and at least this many standard deviations of what pixel noise alone gives the
#: Hessian, so shot noise on a small particle does not cut it.
VALLEY_NOISE = 3.0
#: A core (one marker) keeps at least this many squared widths of area.
CORE_AREA = 0.3
#: The finer look for valleys (:func:`refine_markers`): Hessian sigma in widths (at least
#: :data:`VALLEY_SMOOTH_MIN` px), cut in units of the across-particle curvature, and the area of
#: its cores in squared widths. A narrow gap between two cells pressed side by side (a few px in
#: e1t1_crop's 16 px wide rods) is smoothed away at a quarter width; at an eighth it shows. Its
#: cores must hold more than half a squared width, so a round particle (0.8 squared widths) is
#: not cut into halves; where they are smaller, the coarse cores stay.
FINE_VALLEY_SCALE = 0.125
FINE_VALLEY_CUT = 0.45
FINE_CORE_AREA = 0.6
#: Two neighbouring pieces are one particle when the valley between them is shallower than
#: this many cuts (median over their shared boundary) ...
MERGE_VALLEY = 2.0
#: ... and together they are no wider (ellipse minor axis) than this times the wider piece: two
#: pieces of one rod line up, two cells side by side make a wider region.
MERGE_WIDEN = 1.25
#: Smoothing (sigma, in widths, at least 0.5 px) of the signal the watershed floods.
FLOOD_SMOOTH = 0.125


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


def valley_map(signal: np.ndarray, fg: np.ndarray, width: float, *, scale: float = VALLEY_SCALE,
               cut: float = VALLEY_CUT) -> np.ndarray:
    """Valley strength (unit-free): the largest Hessian eigenvalue of ``signal`` in units of
    ``cut`` (default :data:`VALLEY_CUT`) times the median across-particle curvature of the
    foreground ``fg`` (or :data:`VALLEY_NOISE` noise standard deviations of it, whichever is
    larger), at Hessian sigma ``scale`` widths (default :data:`VALLEY_SCALE`, at least
    :data:`VALLEY_SMOOTH_MIN` px).

    Values above 1 are valleys: the bright gap or halo line between touching dark cells, the
    dim septum between two bright ones. Zero everywhere when ``fg`` is empty or flat.
    """
    from skimage.feature import hessian_matrix, hessian_matrix_eigvals

    sigma = max(VALLEY_SMOOTH_MIN, scale * width)
    h = hessian_matrix(signal, sigma=sigma, order="rc", use_gaussian_derivatives=True)
    largest, smallest = hessian_matrix_eigvals(h)
    across = float(np.median(-smallest[fg])) if fg.any() else 0.0
    # White noise of sigma n gives a second Gaussian derivative of scale s a standard deviation
    # of n sqrt(3 / (16 pi)) / s^3.
    noise = noise_sigma(signal) * np.sqrt(3 / (16 * np.pi)) / sigma**3
    unit = max(cut * across, VALLEY_NOISE * noise)
    if not unit > 0:
        return np.zeros(signal.shape)
    return largest / unit


def valley_markers(valley: np.ndarray, fg: np.ndarray, *, min_area: float) -> np.ndarray:
    """One marker per core: the connected parts of ``fg`` outside the valleys (``valley`` <= 1)
    of at least ``min_area`` px, numbered from 1 (0 = none)."""
    cores, n = ndimage.label(fg & (valley <= 1.0))
    if n == 0:
        return cores.astype(np.int64)
    area = np.bincount(cores.ravel(), minlength=n + 1)
    keep = area >= min_area
    keep[0] = False
    lut = np.zeros(n + 1, np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[cores]


def refine_markers(coarse: np.ndarray, fine: np.ndarray) -> np.ndarray:
    """The cores of the finer look (``fine``, ids from 1) where they are, and every coarse core
    that no fine core overlaps (a particle whose fine cores all fell under their area limit
    is still found). Returns markers numbered from 1 (0 = none)."""
    covered = np.zeros(int(coarse.max()) + 1, bool)
    covered[np.unique(coarse[fine > 0])] = True
    covered[0] = True
    return np.where(covered[coarse], fine, np.where(coarse > 0, coarse + int(fine.max()), 0)).astype(np.int64)


def _boundary_valleys(labels: np.ndarray, valley: np.ndarray) -> pd.DataFrame:
    """Median valley strength along the shared boundary of every pair of touching regions.

    Columns ``a`` < ``b`` (region ids) and ``valley``; a boundary pixel pair (4-neighbours with
    different non-zero ids) scores the larger valley of its two pixels.
    """
    parts = []
    for axis in (0, 1):
        lo = labels.take(np.arange(labels.shape[axis] - 1), axis=axis)
        hi = labels.take(np.arange(1, labels.shape[axis]), axis=axis)
        vlo = valley.take(np.arange(valley.shape[axis] - 1), axis=axis)
        vhi = valley.take(np.arange(1, valley.shape[axis]), axis=axis)
        edge = (lo != hi) & (lo > 0) & (hi > 0)
        parts.append(pd.DataFrame({"a": np.minimum(lo[edge], hi[edge]), "b": np.maximum(lo[edge], hi[edge]),
                                   "valley": np.maximum(vlo[edge], vhi[edge])}))
    pairs = pd.concat(parts, ignore_index=True)
    return pairs.groupby(["a", "b"], as_index=False)["valley"].median()


def _minor_axes(moments: np.ndarray) -> np.ndarray:
    """Ellipse minor axes (px) from rows of pixel sums ``(n, sx, sy, sxx, syy, sxy)``."""
    n, sx, sy, sxx, syy, sxy = moments.T
    cxx = sxx / n - (sx / n) ** 2 + 1 / 12
    cyy = syy / n - (sy / n) ** 2 + 1 / 12
    cxy = sxy / n - sx * sy / n**2
    small = (cxx + cyy) / 2 - np.sqrt(np.maximum(((cxx - cyy) / 2) ** 2 + cxy**2, 0))
    return 4 * np.sqrt(np.maximum(small, 0))


def merge_fragments(labels: np.ndarray, valley: np.ndarray) -> np.ndarray:
    """Join touching regions that are pieces of one particle (see :data:`MERGE_VALLEY`,
    :data:`MERGE_WIDEN`), shallowest valley first, until no pair qualifies.

    A weak valley inside a particle (texture, a constriction of a curved cell) cuts it in
    pieces that line up; a weak valley between two cells side by side does not, because the
    two make a region wider than either. Returns the relabelled image (ids 1..n).
    """
    labels = labels.copy()
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    while True:
        ids = np.arange(int(labels.max()) + 1)
        ones = np.ones(labels.shape)
        moments = np.stack([ndimage.sum(v, labels, ids) for v in (ones, xx, yy, xx * xx, yy * yy, xx * yy)], axis=1)
        moments[moments[:, 0] == 0, 0] = 1.0  # the background and unused ids: never merged, kept finite
        pairs = _boundary_valleys(labels, valley)
        if len(pairs) == 0:
            break
        a, b = pairs["a"].to_numpy(), pairs["b"].to_numpy()
        own = _minor_axes(moments)
        union = _minor_axes(moments[a] + moments[b])
        ok = (pairs["valley"].to_numpy() < MERGE_VALLEY) & (union <= MERGE_WIDEN * np.maximum(own[a], own[b]))
        if not ok.any():
            break
        lut = ids.copy()
        taken: set[int] = set()
        for k in np.flatnonzero(ok)[np.argsort(pairs["valley"].to_numpy()[ok])]:
            if a[k] in taken or b[k] in taken:
                continue  # one merge per region a round: the pair's measures are then still its own
            lut[b[k]] = a[k]
            taken.update((int(a[k]), int(b[k])))
        labels = lut[labels]
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def _scale_aware_regions(signal: np.ndarray, width: float, index: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Regions of :func:`width_foreground`: cores between the valleys (:func:`valley_markers`,
    refined by a narrower look, :func:`refine_markers`) flooded over the foreground by a
    watershed, then pieces of one particle joined across the shallow valleys of the coarse
    look (:func:`merge_fragments`)."""
    from skimage.segmentation import watershed

    fg, dog, t = width_foreground(signal, width)
    labels = np.zeros(signal.shape, np.int64)
    score = np.clip(0.5 * dog / t, 0.0, 1.0) if np.isfinite(t) else np.zeros(signal.shape)
    if fg.any():
        valley = valley_map(signal, fg, width)
        markers = valley_markers(valley, fg, min_area=CORE_AREA * width**2)
        narrow = valley_map(signal, fg, width, scale=FINE_VALLEY_SCALE, cut=FINE_VALLEY_CUT)
        markers = refine_markers(markers, valley_markers(narrow, fg, min_area=FINE_CORE_AREA * width**2))
        fine = ndimage.gaussian_filter(signal, max(0.5, FLOOD_SMOOTH * width))
        labels = merge_fragments(watershed(-fine, markers, mask=fg), valley)
    return measure_regions(labels, np.clip(dog, 0, None), score, frame=index), labels

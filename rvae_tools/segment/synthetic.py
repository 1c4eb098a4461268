"""Synthetic training frames for the segmenter, with exact footprint masks.

Used when a movie has no simulator of its own (a real movie): the ``segment.synthetic``
settings describe what the particles look like (length and width in pixels, density, blur,
noise, scan-line artefacts) and :func:`render_frames` draws independent frames with those
statistics. Also used by the tests, which must not depend on the full assembly simulator.

Particles are rods (stadium shapes: a segment of ``length - width`` with round caps of
diameter ``width``); the optional second species is the same rod with a round head of
diameter ``head * width`` on one end, so it has no mirror symmetry along its axis.
Positions are the footprint centroids, angles are counter-clockwise from +x towards +y in
(x, y) pixel coordinates, as in ``truth.parquet``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

#: Supersampling of the footprint along each axis (anti-aliased edges).
_SUPERSAMPLE = 4


def _segment_distance(px, py, half, cx=0.0):
    """Distance (px) from points to the segment from (cx - half, 0) to (cx + half, 0)."""
    qx = np.clip(px - cx, -half, half)
    return np.hypot(px - cx - qx, py)


def particle_sdf(u: np.ndarray, v: np.ndarray, length: float, width: float, head: float = 0.0) -> np.ndarray:
    """Signed distance (px) to a particle's outline in its own frame (u along the axis).

    Parameters
    ----------
    u, v : ndarray
        Coordinates in pixels, relative to the particle's reference point, u along its axis.
    length, width : float
        Rod length (tip to tip) and width in pixels.
    head : float
        Diameter of the head disc on the +u end as a multiple of ``width`` (0 = plain rod).
    """
    radius = width / 2.0
    half = max(length / 2.0 - radius, 0.0)
    d = _segment_distance(u, v, half) - radius
    if head > 0:
        r_head = head * width / 2.0
        d = np.minimum(d, np.hypot(u - (half + radius - r_head), v) - r_head)
    return d


def _centroid_offset(length: float, width: float, head: float) -> float:
    """Offset along the axis (px) of the footprint centroid from the rod's centre."""
    if head <= 0:
        return 0.0
    extent = length / 2.0 + head * width
    u, v = np.meshgrid(np.arange(-extent, extent, 0.05), np.arange(-extent, extent, 0.05))
    inside = particle_sdf(u, v, length, width, head) <= 0
    return float(u[inside].mean())


def render_frame(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n_particles: int,
    species: list[dict[str, float]],
    *,
    blur: float = 1.0,
    noise: float = 0.1,
    poisson: float = 0.0,
    background: float = 0.2,
    gradient: float = 0.1,
    scan_lines: float = 0.0,
    min_gap: float = 0.0,
    size_jitter: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Draw one frame of non-overlapping particles with its class and instance masks.

    Parameters
    ----------
    rng : numpy.random.Generator
    shape : (int, int)
        Frame height and width in pixels.
    n_particles : int
        Particles to place (fewer when the frame is full).
    species : list of dict
        Per species: ``length``, ``width`` (px), ``head`` (head diameter / width, 0 for a
        rod), ``contrast`` (peak intensity above background), ``fraction`` (share of particles).
    blur : float
        Gaussian point-spread sigma in pixels.
    noise : float
        Gaussian noise sigma, in units of the contrast of species 0.
    poisson : float
        Photon count at the brightest level (0 = no shot noise).
    background, gradient : float
        Background level and the amplitude of a random linear gradient across the frame.
    scan_lines : float
        Scan-line artefacts (AFM/STEM): sigma of a random per-row offset, in intensity units,
        and of a random horizontal per-row shift, in pixels.
    min_gap : float
        Minimum distance between footprints in pixels (0 lets particles touch).
    size_jitter : float
        Relative sigma of the per-particle size.

    Returns
    -------
    image : ndarray (y, x) float32
    mask : ndarray (y, x) uint8, 0 background, k+1 inside a particle of species k
    truth : DataFrame with x, y (px, footprint centroid), angle (rad), cls, particle
    """
    h, w = shape
    ss = _SUPERSAMPLE
    fractions = np.array([s.get("fraction", 1.0) for s in species], float)
    fractions = fractions / fractions.sum()
    occupied = np.zeros(shape, bool)
    mask = np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.int32)
    signal = np.zeros(shape, np.float64)
    rows = []
    attempts = 0
    while len(rows) < n_particles and attempts < 40 * n_particles:
        attempts += 1
        k = int(rng.choice(len(species), p=fractions))
        sp = species[k]
        scale = float(np.exp(rng.normal(0.0, size_jitter)))
        length, width, head = sp["length"] * scale, sp["width"] * scale, sp.get("head", 0.0)
        angle = float(rng.uniform(-np.pi, np.pi))
        cx, cy = rng.uniform(-2, w + 1), rng.uniform(-2, h + 1)
        reach = length / 2.0 + head * width + 2.0 + min_gap
        x0, x1 = int(max(np.floor(cx - reach), 0)), int(min(np.ceil(cx + reach) + 1, w))
        y0, y1 = int(max(np.floor(cy - reach), 0)), int(min(np.ceil(cy + reach) + 1, h))
        if x1 <= x0 or y1 <= y0:
            continue
        # Supersampled pixel grid of the bounding box, in the particle's frame.
        sub = (np.arange(ss) + 0.5) / ss - 0.5
        gy = (np.arange(y0, y1)[:, None] + sub[None, :]).ravel()
        gx = (np.arange(x0, x1)[:, None] + sub[None, :]).ravel()
        yy, xx = np.meshgrid(gy - cy, gx - cx, indexing="ij")
        c, s = np.cos(angle), np.sin(angle)
        offset = _centroid_offset(sp["length"], sp["width"], head) * scale
        u = c * xx + s * yy + offset
        v = -s * xx + c * yy
        sdf = particle_sdf(u, v, length, width, head)
        cover = (sdf <= 0).reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
        inside = cover >= 0.5
        if not inside.any():
            continue
        grown = ndimage.binary_dilation(inside, iterations=int(np.ceil(min_gap))) if min_gap > 0 else inside
        if (occupied[y0:y1, x0:x1] & grown).any():
            continue
        occupied[y0:y1, x0:x1] |= inside
        mask[y0:y1, x0:x1][inside] = k + 1
        instances[y0:y1, x0:x1][inside] = len(rows) + 1
        contrast = sp.get("contrast", 1.0) * float(np.exp(rng.normal(0.0, 0.1)))
        signal[y0:y1, x0:x1] += contrast * cover
        rows.append({"particle": len(rows), "x": cx, "y": cy, "angle": angle, "cls": k})
    if blur > 0:
        signal = ndimage.gaussian_filter(signal, blur)
    yy, xx = np.mgrid[0:h, 0:w]
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(theta) * (xx - w / 2) + np.sin(theta) * (yy - h / 2)) / max(h, w)
    image = background + gradient * ramp + signal
    if poisson > 0:
        image = rng.poisson(np.clip(image, 0, None) * poisson) / poisson
    if scan_lines > 0:
        shifts = rng.normal(0.0, scan_lines, size=h)
        image = np.stack([ndimage.shift(row, shift, order=1, mode="nearest") for row, shift in zip(image, shifts)])
        image = image + rng.normal(0.0, scan_lines * 0.3, size=(h, 1))
    image = image + rng.normal(0.0, noise * species[0].get("contrast", 1.0), size=shape)
    truth = pd.DataFrame(rows, columns=["particle", "x", "y", "angle", "cls"])
    return image.astype(np.float32), mask, truth


def species_from_settings(synthetic: dict[str, Any]) -> list[dict[str, float]]:
    """The species list of :func:`render_frame` from the ``segment.synthetic`` settings."""
    species = [{
        "length": synthetic["length"], "width": synthetic["width"], "head": 0.0,
        "contrast": 1.0, "fraction": 1.0 - synthetic["asymmetric_fraction"],
    }]
    if synthetic["asymmetric_fraction"] > 0:
        species.append({
            "length": synthetic["length"], "width": synthetic["width"], "head": synthetic["head"],
            "contrast": 1.0, "fraction": synthetic["asymmetric_fraction"],
        })
    return species


def render_frames(synthetic: dict[str, Any], n_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Independent synthetic frames drawn from the ``segment.synthetic`` settings.

    Parameters
    ----------
    synthetic : dict
        ``shape`` [h, w] px, ``length``, ``width`` (px), ``head``, ``asymmetric_fraction``,
        ``density`` (particles per 10,000 px^2), ``blur`` (px), ``noise`` (fraction of the
        particle contrast), ``poisson`` (photons at full contrast; 0 = none), ``scan_lines``,
        ``gradient``, ``min_gap`` (px).
    n_frames : int
    seed : int

    Returns
    -------
    images : ndarray (frame, y, x) float32
    masks : ndarray (frame, y, x) uint8
    truth : DataFrame (frame, particle, x, y, angle, cls)
    """
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in synthetic["shape"])
    species = species_from_settings(synthetic)
    n = max(1, round(synthetic["density"] * shape[0] * shape[1] / 1e4))
    images, masks, tables = [], [], []
    for frame in range(n_frames):
        image, mask, truth = render_frame(
            rng, shape, n, species, blur=synthetic["blur"], noise=synthetic["noise"],
            poisson=synthetic["poisson"], gradient=synthetic["gradient"],
            scan_lines=synthetic["scan_lines"], min_gap=synthetic["min_gap"],
        )
        images.append(image)
        masks.append(mask)
        tables.append(truth.assign(frame=frame))
    truth = pd.concat(tables, ignore_index=True)[["frame", "particle", "x", "y", "angle", "cls"]]
    return np.stack(images), np.stack(masks), truth


def core_masks(
    truth: pd.DataFrame,
    n_frames: int,
    shape: tuple[int, int],
    dims: dict[int, tuple[float, float]],
    core: float,
) -> np.ndarray:
    """Label masks of particle cores: shrunken rods centred on the true centres.

    Training on cores rather than whole footprints keeps touching particles apart in the
    prediction (two cores never touch), and the centroid of a core is the particle's
    reference point even for shapes whose footprint centroid lies elsewhere.

    Parameters
    ----------
    truth : DataFrame
        ``frame, x, y`` (px), ``angle`` (rad), ``cls``.
    n_frames : int
    shape : (int, int)
        Frame height and width (px).
    dims : dict
        cls -> (length, width) of the particle in pixels.
    core : float
        Core size as a fraction of the particle's length and width (rounded so the core is
        at least 2 px wide).

    Returns
    -------
    ndarray (frame, y, x) uint8
        0 background, cls+1 inside a core.
    """
    h, w = shape
    masks = np.zeros((n_frames, h, w), np.uint8)
    for row in truth.itertuples(index=False):
        length, width = dims[int(row.cls)]
        cw = max(core * width, 2.0)
        cl = max(core * length, cw)
        reach = cl / 2 + 1
        x0, x1 = int(max(np.floor(row.x - reach), 0)), int(min(np.ceil(row.x + reach) + 1, w))
        y0, y1 = int(max(np.floor(row.y - reach), 0)), int(min(np.ceil(row.y + reach) + 1, h))
        if x1 <= x0 or y1 <= y0 or not (0 <= row.frame < n_frames):
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        c, s = np.cos(row.angle), np.sin(row.angle)
        u = c * (xx - row.x) + s * (yy - row.y)
        v = -s * (xx - row.x) + c * (yy - row.y)
        inside = particle_sdf(u, v, cl, cw) <= 0
        masks[int(row.frame), y0:y1, x0:x1][inside] = int(row.cls) + 1
    return masks

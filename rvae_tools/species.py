"""Species and their rotational symmetry, found from what the rVAE learned.

A *species* is a group of trajectories with one shape. When the config does not list the
species and the segmenter gives no classes, they are found as the components of a Gaussian
mixture over each trajectory's mean content latent ``z``, with the number of components
chosen by the Bayesian information criterion (:func:`find_species`).

The rotational symmetry order ``n`` of a species is read from its decoded *upright template*
(the decoder's image of the species' mean ``z`` at angle 0 and no shift). The template is
resampled on a polar grid about the window centre; its anisotropic part ``A(r, phi)`` (the
template minus its average over ``phi`` on each ring) has the angular power ``P_m`` in
harmonic ``m`` (weighted by ``r``, the polar area element). The self-similarity of the
template under a rotation by ``delta`` is then::

    C(delta) = sum_m P_m cos(m delta) / sum_m P_m       (1 = identical, exact for any delta)

and ``n`` is the largest order up to ``max_order`` with ``C(2 pi / n) >= threshold``
(:func:`symmetry_order`), computed on the template's *particle body* (:func:`particle_body`:
the part of the particle's polarity, its halo and surroundings left out, centred on its own
centroid), since a template learned from real windows also holds the particle's surroundings. A template whose anisotropic energy is below ``isotropy`` of its
total contrast energy is *isotropic* (spheres, discs): it gets ``n = 0``, meaning "no
orientation", and downstream stages skip angle-based order parameters for it.

A mixture over ``z`` splits one shape into several components when ``z`` also tracks
something else (background tilt, contrast, focus). Components are therefore merged when their
decoded templates show the same shape (:func:`merge_by_template`): the similarity of two
templates is the correlation of their anisotropic parts (each ring minus its mean, weighted by
``sqrt(r)`` so that the product carries the polar area element), maximised over a rotation of
one against the other (:func:`template_similarity`); components are joined by average linkage
on ``1 - similarity`` and cut at similarity :data:`SAME_SHAPE`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

#: Highest symmetry order tested.
MAX_ORDER = 12
#: Self-similarity C(2 pi / n) needed to call a template n-fold symmetric.
THRESHOLD = 0.8
#: Anisotropic share of the contrast energy below which a template is isotropic (n = 0).
ISOTROPY = 0.03
#: Most species looked for by the mixture.
MAX_SPECIES = 6
#: Template similarity above which two mixture components are one species (same-shape
#: components of the demo score 0.96-0.98, a rod against a tadpole 0.68-0.78).
SAME_SHAPE = 0.9
#: Share of the body's maximum below which a template pixel is not the particle's (see :func:`particle_body`).
BODY_FLOOR = 0.2
#: Angular samples of the polar grid (the power spectrum then reaches harmonic ANGLES / 2).
ANGLES = 256


# --------------------------------------------------------------------------- symmetry


def polar_template(template: np.ndarray, n_angles: int = ANGLES) -> tuple[np.ndarray, np.ndarray]:
    """The template resampled on rings about the window centre, background (median) removed.

    Parameters
    ----------
    template : ndarray (wy, wx)
        Image whose centre ``((wy - 1) / 2, (wx - 1) / 2)`` is the rotation centre.
    n_angles : int
        Samples per ring; angle ``phi`` runs from +x towards +y (rows).

    Returns
    -------
    polar : ndarray (n_radii, n_angles)
        ``polar[i, j]`` = template at radius ``radii[i]`` px, angle ``2 pi j / n_angles``.
    radii : ndarray (n_radii,) px
        1 px spacing up to the inscribed circle.
    """
    t = np.asarray(template, dtype=np.float64)
    wy, wx = t.shape
    cy, cx = (wy - 1) / 2.0, (wx - 1) / 2.0
    radii = np.arange(0.5, min(cy, cx) + 1e-9, 1.0)
    phi = 2 * np.pi * np.arange(n_angles) / n_angles
    rows = cy + radii[:, None] * np.sin(phi)[None, :]
    cols = cx + radii[:, None] * np.cos(phi)[None, :]
    polar = ndimage.map_coordinates(t, [rows.ravel(), cols.ravel()], order=1, mode="nearest")
    return polar.reshape(radii.size, n_angles) - np.median(t), radii


def angular_power(template: np.ndarray, n_angles: int = ANGLES) -> tuple[np.ndarray, float]:
    """Angular power ``P_m`` (m = 0 .. n_angles / 2) of a template and its total contrast energy.

    ``P_0`` is the isotropic part; ``sum_{m >= 1} P_m`` the anisotropic energy. Both are
    weighted by the radius (area element of the polar grid).
    """
    polar, radii = polar_template(template, n_angles)
    coeff = np.fft.rfft(polar, axis=1) / n_angles
    power = np.abs(coeff) ** 2
    power[:, 1:] *= 2  # the negative harmonics carry the same power
    weights = radii[:, None]
    return (weights * power).sum(0), float((weights * polar ** 2).mean(1).sum())


def self_similarity(template: np.ndarray, delta: float | np.ndarray, n_angles: int = ANGLES) -> np.ndarray:
    """Correlation ``C(delta)`` of the template's anisotropic part with itself rotated by ``delta`` (rad)."""
    power, _ = angular_power(template, n_angles)
    m = np.arange(power.size)[1:]
    p = power[1:]
    delta = np.atleast_1d(np.asarray(delta, dtype=np.float64))
    total = p.sum()
    if total <= 0:
        return np.ones_like(delta)
    return (p[None, :] * np.cos(np.outer(delta, m))).sum(1) / total


def anisotropy(template: np.ndarray, n_angles: int = ANGLES) -> float:
    """Share of the template's contrast energy that depends on the angle (0 = rotationally invariant)."""
    power, _ = angular_power(template, n_angles)
    total = power.sum()
    return float(power[1:].sum() / total) if total > 0 else 0.0


def symmetry_order(
    template: np.ndarray, *, max_order: int = MAX_ORDER, threshold: float = THRESHOLD, isotropy: float = ISOTROPY,
) -> int:
    """Rotational symmetry order of a template: the largest ``n`` with ``C(2 pi / n) >= threshold``.

    Parameters
    ----------
    template : ndarray (wy, wx)
        A particle image centred on the window centre (a decoded upright template).
    max_order : int
        Highest order tested.
    threshold : float
        Self-similarity needed for an ``n``-fold rotation to map the template onto itself.
    isotropy : float
        Anisotropic energy share below which the template is isotropic.

    Returns
    -------
    int
        ``n >= 1``, or 0 for an isotropic template (no orientation).
    """
    if anisotropy(template) < isotropy:
        return 0
    body = particle_body(template)
    orders = np.arange(2, max_order + 1)
    similar = self_similarity(body, 2 * np.pi / orders) >= threshold
    return int(orders[similar].max()) if similar.any() else 1


def particle_body(template: np.ndarray) -> np.ndarray:
    """The particle's own part of a template, centred on the window centre (what its symmetry is read from).

    The part of the particle's polarity, ``max(s (template - median), 0)`` less a floor of
    :data:`BODY_FLOOR` of its maximum, with ``s`` (+1 bright, -1 dark) the sign whose part has
    the smaller mean square radius about the window centre (the window is centred on its
    particle; a halo lies around it, noise all over), moved (linear interpolation) so that its
    centroid sits on the window centre.

    Why: a decoded template of real windows also holds the particle's surroundings, and the
    rVAE's free half-turn lets it line up whatever distinguishes them. In a real phase-contrast
    colony the template of dark rods kept a bright halo on one side only (the side of the
    brighter gap to a neighbour): the whole template's ``C(pi)`` was -0.31 (n = 1), its dark
    body's 0.99. The template is also only centred up to the mean of the encoded shifts.

    Parameters
    ----------
    template : ndarray (wy, wx)
        A decoded template; its centre ``((wy - 1) / 2, (wx - 1) / 2)`` lies on the particle.

    Returns
    -------
    ndarray (wy, wx)
        Non-negative image of the body (zeros where the template holds no particle part).
    """
    t = np.asarray(template, dtype=np.float64)
    wy, wx = t.shape
    contrast = t - np.median(t)
    yy, xx = np.mgrid[0:wy, 0:wx]
    r2 = (yy - (wy - 1) / 2.0) ** 2 + (xx - (wx - 1) / 2.0) ** 2
    parts = []
    for sign in (1.0, -1.0):
        part = np.clip(sign * contrast, 0, None)
        part = np.clip(part - BODY_FLOOR * part.max(), 0, None)
        total = part.sum()
        parts.append((float((part * r2).sum() / total) if total > 0 else np.inf, part))
    # A halo lies around its particle and noise all over the window: the body is the part
    # held closest about the window centre (smallest mean square radius).
    body = min(parts, key=lambda p: p[0])[1]
    if body.sum() <= 0:
        return body
    cy, cx = ndimage.center_of_mass(body)
    return ndimage.shift(body, ((wy - 1) / 2.0 - cy, (wx - 1) / 2.0 - cx), order=1, mode="constant", cval=0.0)


# --------------------------------------------------------------------------- species


def _anisotropic_rings(template: np.ndarray, n_angles: int = ANGLES) -> tuple[np.ndarray, np.ndarray]:
    """Each ring of the polar template minus its mean, weighted by ``sqrt(r)``, and the weighted ring means."""
    polar, radii = polar_template(template, n_angles)
    mean = polar.mean(1, keepdims=True)
    w = np.sqrt(radii)[:, None]
    return (polar - mean) * w, (mean * w).ravel()


def template_similarity(a: np.ndarray, b: np.ndarray, n_angles: int = ANGLES) -> float:
    """Shape similarity of two centred templates, in [-1, 1] (1 = one shape, at any rotation).

    The correlation of their anisotropic parts (rings minus their means, weight ``sqrt(r)``),
    maximised over the rotation of ``b`` against ``a`` (all ``n_angles`` rotations, by FFT
    along the angle). Contrast and brightness do not count; polarity does (a dark particle on a
    bright background is not a bright one). Two isotropic templates (anisotropic share below
    :data:`ISOTROPY`) are compared by their radial profiles instead; an isotropic template
    against an anisotropic one scores 0.

    Parameters
    ----------
    a, b : ndarray (wy, wx)
        Templates of one window size, centred on the window centre.
    n_angles : int
        Angular samples of the polar grid (rotation step ``2 pi / n_angles``).
    """
    iso_a, iso_b = anisotropy(a, n_angles) < ISOTROPY, anisotropy(b, n_angles) < ISOTROPY
    if iso_a != iso_b:
        return 0.0
    ra, ma = _anisotropic_rings(a, n_angles)
    rb, mb = _anisotropic_rings(b, n_angles)
    if iso_a:
        ma, mb = ma - ma.mean(), mb - mb.mean()
        norm = np.linalg.norm(ma) * np.linalg.norm(mb)
        return float(ma @ mb / norm) if norm > 0 else 1.0
    norm = np.linalg.norm(ra) * np.linalg.norm(rb)
    if norm <= 0:
        return 0.0
    # circular cross-correlation over the rotation, summed over the rings
    corr = np.fft.irfft((np.fft.rfft(ra, axis=1).conj() * np.fft.rfft(rb, axis=1)).sum(0), n=n_angles)
    return float(corr.max() / norm)


def merge_by_template(templates: np.ndarray, *, same_shape: float = SAME_SHAPE) -> np.ndarray:
    """Groups of templates of one shape: average linkage on ``1 - similarity``, cut at ``same_shape``.

    Parameters
    ----------
    templates : ndarray (components, wy, wx)
        Decoded upright template of every mixture component.
    same_shape : float
        Similarity (see :func:`template_similarity`) above which two groups are one species.

    Returns
    -------
    int ndarray (components,)
        Group of every component, numbered 0.. in order of each group's first component.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    n = len(templates)
    if n < 2:
        return np.zeros(n, dtype=np.int64)
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            dist[i, j] = dist[j, i] = 1.0 - template_similarity(templates[i], templates[j])
    groups = fcluster(linkage(squareform(np.clip(dist, 0, None), checks=False), method="average"),
                      t=1.0 - same_shape, criterion="distance")
    first = {g: k for k, g in reversed(list(enumerate(groups)))}
    order = sorted(first, key=first.get)
    return np.array([order.index(g) for g in groups], dtype=np.int64)


def merge_species(species: np.ndarray, templates: np.ndarray, *, same_shape: float = SAME_SHAPE) -> np.ndarray:
    """Trajectory species after merging the mixture components whose templates show one shape.

    Parameters
    ----------
    species : int ndarray (particle,)
        Component of every trajectory (-1 = unknown, kept).
    templates : ndarray (components, wy, wx)
        Decoded upright template of every component.
    same_shape : float
        See :func:`merge_by_template`.

    Returns
    -------
    int ndarray (particle,)
        Species index; merged species keep the order of their first component.
    """
    species = np.asarray(species, dtype=np.int64)
    groups = merge_by_template(templates, same_shape=same_shape)
    out = np.full_like(species, -1)
    known = species >= 0
    out[known] = groups[species[known]]
    return out


def find_species(
    zmean: np.ndarray, *, max_species: int = MAX_SPECIES, seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Species of every trajectory from its mean content latent, the number of them by BIC.

    Parameters
    ----------
    zmean : ndarray (particle, k)
        Mean ``z`` of each trajectory; rows with NaN get species -1.
    max_species : int
        Most mixture components tried.
    seed : int
        Seed of the mixture's initialisation.

    Returns
    -------
    species : int ndarray (particle,)
        Species index, ordered by increasing mean ``z[0]`` of the component (-1 = unknown).
    info : dict
        ``n_species``, ``bic`` (one value per number of components tried) and ``means`` (k per species).
    """
    from sklearn.mixture import GaussianMixture

    zmean = np.asarray(zmean, dtype=np.float64)
    if zmean.ndim != 2:
        raise ValueError(f"zmean must be (particle, k), got shape {zmean.shape}")
    ok = np.isfinite(zmean).all(axis=1)
    species = np.full(zmean.shape[0], -1, dtype=np.int64)
    data = zmean[ok]
    if zmean.shape[1] == 0 or data.shape[0] < 4:
        species[ok] = 0
        means = data.mean(0, keepdims=True) if data.size else np.zeros((1, zmean.shape[1]))
        return species, {"n_species": 1, "bic": [], "means": means.tolist()}
    # Components of fewer than two trajectories are not species; cap the search accordingly.
    top = int(max(1, min(max_species, data.shape[0] // 2)))
    fits, bic = [], []
    for n in range(1, top + 1):
        gmm = GaussianMixture(n_components=n, covariance_type="full", reg_covar=1e-4, n_init=2, random_state=seed)
        gmm.fit(data)
        fits.append(gmm)
        bic.append(float(gmm.bic(data)))
    best = fits[int(np.argmin(bic))]
    labels = best.predict(data)
    order = np.argsort(best.means_[:, 0], kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    used = np.unique(rank[labels])
    # A component no trajectory falls into is dropped and the rest renumbered 0..n-1.
    renumber = {int(old): new for new, old in enumerate(used)}
    species[ok] = [renumber[int(r)] for r in rank[labels]]
    means = best.means_[order][used]
    return species, {"n_species": int(used.size), "bic": bic, "means": means.tolist()}


def species_templates(model: Any, means: np.ndarray) -> np.ndarray:
    """Decoded upright templates (species, wy, wx): each species' mean ``z`` at angle 0, no shift."""
    means = np.atleast_2d(np.asarray(means, dtype=np.float32))
    return np.asarray(model.decode(means, angle=np.zeros(means.shape[0]), dx=None, dy=None))


def species_means(zmean: np.ndarray, species: np.ndarray, n_species: int) -> np.ndarray:
    """Mean ``z`` (n_species, k) over the trajectories of each species (NaN rows left out)."""
    zmean = np.asarray(zmean, dtype=np.float64)
    out = np.zeros((n_species, zmean.shape[1]))
    for s in range(n_species):
        rows = (species == s) & np.isfinite(zmean).all(axis=1)
        if rows.any():
            out[s] = zmean[rows].mean(0)
    return out

"""Species and symmetry from the data: the symmetry order of drawn shapes, species from z by BIC."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import polygon

from rvae_tools.species import (
    SAME_SHAPE,
    find_species,
    merge_by_template,
    merge_species,
    symmetry_order,
    template_similarity,
)

S = 33  # template side, px


def drawn(points, angle: float, ss: int = 4) -> np.ndarray:
    """A filled polygon (vertices in px about the centre) turned by ``angle``, drawn anti-aliased with skimage."""
    pts = np.asarray(points, dtype=np.float64)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    xy = (pts @ rot.T + (S - 1) / 2 + 0.5) * ss - 0.5
    img = np.zeros((S * ss, S * ss))
    rr, cc = polygon(xy[:, 1], xy[:, 0], img.shape)
    img[rr, cc] = 1.0
    return img.reshape(S, ss, S, ss).mean((1, 3))


def regular(n: int, radius: float, start: float = 0.0) -> np.ndarray:
    a = start + 2 * np.pi * np.arange(n) / n
    return np.c_[radius * np.cos(a), radius * np.sin(a)]


def shape(name: str, angle: float) -> np.ndarray:
    if name == "tadpole":  # n = 1: a wedge
        return drawn([(-6, -4.5), (-6, 4.5), (9, 0)], angle)
    if name == "rod":  # n = 2
        return drawn([(-8, -2.5), (8, -2.5), (8, 2.5), (-8, 2.5)], angle)
    if name == "triangle":  # n = 3
        return drawn(regular(3, 9), angle)
    if name == "star":  # n = 6: two interpenetrating triangles
        return np.maximum(drawn(regular(3, 10), angle), drawn(regular(3, 10, np.pi / 3), angle))
    raise ValueError(name)


@pytest.mark.parametrize(("name", "n"), [("tadpole", 1), ("rod", 2), ("triangle", 3), ("star", 6)])
def test_symmetry_order_of_drawn_species(name, n):
    rng = np.random.default_rng(n)
    for angle in (0.0, 0.37, 2.1):
        # blurred and noisy, as a decoded template of real windows would be
        img = ndimage.gaussian_filter(shape(name, angle), 1.0) * 0.8 + 0.1 + rng.normal(0, 0.02, (S, S))
        assert symmetry_order(img) == n, (name, angle)
        assert symmetry_order(1.0 - img) == n, (name, angle)  # dark particles on a bright background


def _with_one_sided_halo(name: str, angle: float, offset: tuple[float, float]) -> np.ndarray:
    """A dark particle on a bright background, off the window centre, with a bright halo along one side only.

    As a decoded template of a real phase-contrast colony looks: the rVAE's free half-turn lines
    up the brighter gap to a neighbour on one side, and the template is centred only up to the
    mean encoded shift.
    """
    body = ndimage.shift(shape(name, angle), offset[::-1], order=1)
    gap = {"rod": 4.5, "tadpole": 7.0, "triangle": 10.0}[name]  # px from the centre to the halo, just off the body
    side = np.array([-np.sin(angle), np.cos(angle)]) * gap  # (x, y), perpendicular to the axis
    halo = ndimage.shift(ndimage.gaussian_filter(shape("rod", angle), 1.5), (offset[1] + side[1], offset[0] + side[0]))
    return 0.7 - 0.5 * ndimage.gaussian_filter(body, 1.0) + 0.6 * halo


@pytest.mark.parametrize(("name", "n"), [("rod", 2), ("tadpole", 1), ("triangle", 3)])
def test_symmetry_is_the_particles_not_its_surroundings(name, n):
    for angle, offset in ((0.3, (1.2, -0.8)), (2.0, (-1.5, 0.6))):
        img = _with_one_sided_halo(name, angle, offset)
        assert symmetry_order(img) == n, (name, angle)


def test_a_sphere_has_no_orientation():
    yy, xx = np.mgrid[0:S, 0:S] - (S - 1) / 2
    rng = np.random.default_rng(0)
    sphere = np.exp(-(xx ** 2 + yy ** 2) / (2 * 4.0 ** 2)) + rng.normal(0, 0.02, (S, S))
    ring = (np.abs(np.hypot(xx, yy) - 8) < 2).astype(float)
    assert symmetry_order(sphere) == 0
    assert symmetry_order(ndimage.gaussian_filter(ring, 1.0)) == 0


def test_species_from_z_by_bic():
    rng = np.random.default_rng(3)
    centres = np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, 4.0]])
    z = np.concatenate([c + rng.normal(0, 0.3, (40, 2)) for c in centres])
    z[5] = np.nan  # a trajectory without windows
    species, info = find_species(z, seed=0)
    assert info["n_species"] == 3 and species[5] == -1
    truth = np.repeat([0, 1, 2], 40)  # ordered by mean z[0]: -2, 0, 2 -> components 0, 2, 1
    expected = np.array([0, 2, 1])[truth]
    ok = species >= 0
    assert np.mean(species[ok] == expected[ok]) > 0.97
    one, info1 = find_species(rng.normal(0, 1, (60, 2)), seed=0)
    assert info1["n_species"] == 1 and set(one) == {0}


def _seen(name: str, rng: np.random.Generator) -> np.ndarray:
    """The shape at a random angle, contrast and brightness, on a slightly tilted background, noisy."""
    yy, xx = np.mgrid[0:S, 0:S] - (S - 1) / 2
    tilt = rng.uniform(-0.002, 0.002, 2)  # up to 6 % of the window's contrast across it
    img = ndimage.gaussian_filter(shape(name, rng.uniform(-np.pi, np.pi)), 1.0)
    return img * rng.uniform(0.6, 1.0) + rng.uniform(0, 0.3) + tilt[0] * xx + tilt[1] * yy + rng.normal(0, 0.02, (S, S))


def test_template_similarity_sees_the_shape_not_its_angle_or_contrast():
    rng = np.random.default_rng(11)
    names = ["tadpole", "rod", "triangle", "star"]
    seen = {name: [_seen(name, rng) for _ in range(3)] for name in names}
    for i, a in enumerate(names):
        for b in names[i:]:
            sims = [template_similarity(x, y) for x in seen[a] for y in seen[b] if x is not y]
            if a == b:
                assert min(sims) > SAME_SHAPE, (a, np.round(sims, 3))
            else:
                assert max(sims) < 0.8, (a, b, np.round(sims, 3))


@pytest.mark.parametrize("names", [["rod"], ["rod", "tadpole"], ["tadpole", "rod", "triangle"],
                                   ["star", "triangle", "rod", "tadpole"]])
def test_components_of_one_shape_merge_into_one_species(names):
    """Each true species split over 2-3 mixture components (as z tracking a tilt would split it)."""
    rng = np.random.default_rng(len(names))
    templates, truth = [], []
    for k, name in enumerate(names):
        for _ in range(rng.integers(2, 4)):
            templates.append(_seen(name, rng))
            truth.append(k)
    perm = rng.permutation(len(templates))  # components come in the mixture's order, not by species
    templates, truth = np.asarray(templates)[perm], np.asarray(truth)[perm]
    groups = merge_by_template(templates)
    assert groups.max() + 1 == len(names)
    assert all(len(set(groups[truth == k])) == 1 for k in range(len(names)))  # one group per species
    component = np.r_[rng.integers(0, len(templates), 50), -1]
    species = merge_species(component, templates)
    assert species[-1] == -1 and np.array_equal(species[:-1], groups[component[:-1]])


def test_spheres_of_two_sizes_and_an_ellipse_drawn_otherwise_stay_apart():
    """Templates made another way (skimage's ellipse, Gaussian spheres): sizes and shapes kept apart."""
    from skimage.draw import ellipse

    rng = np.random.default_rng(5)

    def sphere(sigma):
        yy, xx = np.mgrid[0:S, 0:S] - (S - 1) / 2
        return np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2)) + rng.normal(0, 0.01, (S, S))

    def rod(angle):
        img = np.zeros((S, S))
        rr, cc = ellipse(S // 2, S // 2, 3, 10, img.shape, rotation=angle)
        img[rr, cc] = 1.0
        return ndimage.gaussian_filter(img, 1.0) + rng.normal(0, 0.01, (S, S))

    templates = np.array([sphere(3.0), sphere(3.2), sphere(7.0), sphere(7.3), rod(0.2), rod(1.4)])
    groups = merge_by_template(templates)
    assert list(groups) == [0, 0, 1, 1, 2, 2], groups

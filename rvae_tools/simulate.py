"""Simulated in-situ AFM movies of designed protein nanorods assembling on mica, with ground truth.

The built-in demo movie of the workflow, and the source of training frames for the segmenter.
``simulate(settings)`` returns a :class:`SimulatedMovie`; ``write_simulation`` writes it as
``raw/movie.tif``, ``truth.parquet`` and ``raw/simulation.json``.

Coordinates and angle convention
--------------------------------
Positions are in pixels with pixel centres at integer coordinates: ``x`` is the column,
``y`` the row (``movie[frame, round(y), round(x)]`` is the pixel under a particle). Truth
``x, y`` are where the particle appears in the movie, drift included, and are the particle's
reference point: the centre of a rod, the area centroid of a triangle or tadpole.

The angle of a particle is the direction of its reference axis, ``(cos angle, sin angle)`` in
``(x, y)`` pixel coordinates: measured from +x towards +y, which is *clockwise on screen*
because y points down. The reference axis is

* ``rod`` (spherocylinder, symmetry order n = 2): the long axis;
* ``tadpole`` (isosceles triangle, n = 1): from the midpoint of the base towards the apex;
* ``triangle`` (equilateral, n = 3): from the centroid towards one vertex.

A particle looks the same at ``angle`` and ``angle + 2*pi/n``, so truth ``angle`` is given
in ``[0, 2*pi/n)``; ``angle_unwrapped`` is the continuous simulated angle (no wrapping), whose
increments are the rotational steps.

Physics (one time step = one frame)
-----------------------------------
* Translation: Brownian, displacement per axis ~ N(0, 2 D_t) with D_t in px^2/frame.
  Excluded volume: a move is rejected when it brings two centres closer than
  ``exclusion_scale * (r_i + r_j)``, with r the radius of the disc about the reference point
  that holds the footprint (with the default 1, footprints never overlap). Rotation never
  changes these discs, so rotation is never rejected.
* Rotation: overdamped Langevin with D_r in rad^2/frame,
  ``d angle = -D_r s(t) dU/d angle dt + sqrt(2 D_r dt) xi``. Without a transition
  (``transition.frame`` null) the drift is exactly zero and the angle is a pure Brownian
  motion with ``<(d angle)^2> = 2 D_r`` per frame.
* Ordering: ``U_i = -strength cos(m_i (angle_i - phi0)) - coupling * sum_j cos(p_ij (angle_i - angle_j))``
  over neighbours j within ``neighbour_radius``; ``m_i = lcm(6, n_i)`` makes the three
  substrate directions ``phi0 + k * 60 deg`` (as lines) minima while respecting the
  particle's symmetry, ``p_ij = lcm(n_i, n_j)`` (rods align nematically, mod pi).
  ``s(t) = 1 / (1 + exp(-(t - frame) / width))`` is the logistic ramp of the aligning
  strength (a step for width 0). Rods then lock to one of three directions, chosen locally
  by their neighbours: domains.
* Adsorption and desorption: each particle leaves with probability ``desorption_rate`` per
  frame; new particles land at uniformly random free spots (uniform orientation) at
  ``adsorption_rate`` per frame per image area. The steady state is Poisson with mean
  ``adsorption_rate / desorption_rate``, hence the default ``adsorption_rate`` of
  ``desorption_rate * n_particles``.

The scene lives on a periodic patch of substrate a little larger than the field of view,
so drifting keeps the density constant; a particle is in the truth of a frame when its
reference point lies on a pixel of the image (``-0.5 <= x < width - 0.5``, same for y), so
``movie[frame, round(y), round(x)]`` always exists. Particles
whose footprint reaches into the image from outside are rendered but are not in the truth.

Image formation (AFM)
---------------------
heights (sub-pixel, ``render.supersample``^2 samples per pixel; a smooth dome across rods
and a rounded rim on triangles; the topmost surface where footprints overlap)
-> Gaussian blur (``render.blur``, the tip) -> + mica level ``render.background`` + plane
tilt + per-row scan-line offsets -> noise. Particles are bright on dark mica.

Noise and SNR: ``snr = C / sigma``, where C is the fraction-weighted mean species contrast
(peak height above the mica before blurring) and sigma the standard deviation of the pixel
noise on bare mica (shot and read noise together; tilt and scan-line offsets are artefacts,
not noise). A fraction ``read_fraction`` of sigma^2 is Gaussian read noise; the rest is shot
noise: the noise-free image I becomes ``Poisson(I * k) / k`` with
``k = background / ((1 - read_fraction) sigma^2)``. Both are recorded in the metadata.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from . import __version__
from .config import add_settings_arguments, settings_from_args, validate_section
from .errors import InputError
from .io import atomic_output, write_json, write_table

log = logging.getLogger(__name__)

#: Rotational symmetry order of each shape.
SHAPE_SYMMETRY = {"rod": 2, "tadpole": 1, "triangle": 3}

#: Substrate (mica) symmetry: three preferred directions 60 degrees apart, as lines.
SUBSTRATE_ORDER = 6

#: Clearance (px) between the footprints of two particles at exclusion_scale 1: more than a
#: pixel diagonal, so no two particles' mask pixels touch, not even diagonally.
_GAP = 1.5

_AXIS = {
    "rod": "long axis",
    "tadpole": "from the base midpoint towards the apex",
    "triangle": "from the centroid towards a vertex",
}


@dataclass
class SimulatedMovie:
    """A simulated movie and its ground truth.

    Attributes
    ----------
    movie : numpy.ndarray
        ``(frame, y, x)`` float32 image intensities.
    truth : pandas.DataFrame
        One row per particle in view per frame: ``frame`` (int), ``particle`` (int),
        ``x``, ``y`` (float px, x = column, y = row, drift included), ``angle`` (rad, in
        ``[0, 2 pi / n)``, convention in the module docstring), ``cls`` (int species index),
        ``angle_unwrapped`` (rad, continuous). Movies with a ``body_3d`` species also have
        ``qw, qx, qy, qz`` (the pose, :func:`pose_quaternions`; flat species: a turn about
        z) and ``tilt`` (rad, angle between the body x axis and the image plane).
    masks : numpy.ndarray or None
        ``(frame, y, x)`` uint8: 0 background, ``k + 1`` where a pixel centre lies inside a
        particle of species k (None unless asked for).
    metadata : dict
        JSON-able description (transition, species, sizes, units, diffusion, noise, seed, ...).
    """

    movie: np.ndarray
    truth: pd.DataFrame
    masks: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- species geometry


@dataclass(frozen=True)
class _Species:
    name: str
    shape: str
    symmetry: int
    length: float
    width: float
    contrast: float
    fraction: float
    radius: float  # exclusion disc about the reference point: footprint + _GAP / 2, px
    rim: float  # width of the rounded edge of the height profile, px
    vertices: tuple[tuple[float, float], ...] | None  # polygon in body coordinates (u along axis)
    body3d: dict[str, Any] | None = None  # kind, tilt_concentration, tilt_diffusion when tilting out of plane


def _species_from_settings(entries: list[dict[str, Any]]) -> list[_Species]:
    out = []
    total = sum(float(e["fraction"]) for e in entries)
    for k, e in enumerate(entries):
        shape, length, width = e["shape"], float(e["length"]), float(e["width"])
        n = SHAPE_SYMMETRY[shape]
        if e.get("symmetry") is not None and int(e["symmetry"]) != n:
            raise InputError(
                f"simulate.species.{k}.symmetry: {e['symmetry']} does not match shape {shape!r}; "
                f"expected {n} (or null)"
            )
        if shape == "rod":
            if width > length:
                raise InputError(
                    f"simulate.species.{k}.width: {width} is larger than length {length}; "
                    "expected a rod no wider than it is long"
                )
            vertices, radius, rim = None, length / 2 + _GAP / 2, width / 2
        elif shape == "tadpole":
            # Reference point at the area centroid, a third of the height above the base.
            vertices = ((2 * length / 3, 0.0), (-length / 3, width / 2), (-length / 3, -width / 2))
            radius = max(2 * length / 3, math.hypot(length / 3, width / 2)) + _GAP / 2
            inradius = length * width / (width + 2 * math.hypot(length, width / 2))
            rim = 0.5 * inradius
        else:  # equilateral triangle of side `length`
            circ = length / math.sqrt(3)
            vertices = tuple((circ * math.cos(a), circ * math.sin(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3))
            radius, rim = circ + _GAP / 2, 0.5 * circ / 2
        body3d = _body3d_from_settings(e.get("body_3d"), k, shape, length)
        if body3d is not None:
            # The blobs reach half_length + 2.5 sd from the centre at any pose.
            radius = length / 2 * (1.0 + 2.5 * max(BODIES_3D[body3d["kind"]]["sd"])) + _GAP / 2
        out.append(_Species(
            name=str(e["name"]), shape=shape, symmetry=n, length=length, width=width,
            contrast=float(e["contrast"]), fraction=float(e["fraction"]) / total,
            radius=radius, rim=rim, vertices=vertices, body3d=body3d,
        ))
    return out


#: Shape whose in-plane symmetry each 3D body shares (the truth ``angle`` is wrapped by it).
_BODY3D_SHAPE = {"rod": "rod", "asymmetric": "tadpole"}


def _body3d_from_settings(entry: Any, k: int, shape: str, length: float) -> dict[str, Any] | None:
    """Checked ``species[k].body_3d`` option (None when the species stays flat).

    The schema has already checked its keys, ``kind`` and the signs; what it cannot say is
    left here: the kind must match the shape, and NaN passes a JSON-schema minimum.
    """
    if entry is None:
        return None
    field_ = f"simulate.species.{k}.body_3d"
    kind = entry["kind"]
    if _BODY3D_SHAPE[kind] != shape:
        raise InputError(f"{field_}.kind: {kind!r} does not match shape {shape!r}; expected shape "
                         f"{_BODY3D_SHAPE[kind]!r} (same in-plane symmetry)")
    out = {"kind": str(kind), "half_length": length / 2}
    for key in ("tilt_concentration", "tilt_diffusion"):
        v = entry[key]
        if not math.isfinite(v):
            raise InputError(f"{field_}.{key}: {v!r}; expected a finite number > 0")
        out[key] = float(v)
    return out


def _depth(sp: _Species, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How far (px) body-frame points lie inside the footprint (negative outside)."""
    if sp.shape == "rod":
        half = max(sp.length / 2 - sp.width / 2, 0.0)
        return sp.width / 2 - np.hypot(np.maximum(np.abs(u) - half, 0.0), v)
    verts = sp.vertices  # Python floats keep float32 inputs in float32 (NEP 50)
    inside = np.ones(u.shape, dtype=bool)
    dist = np.full(u.shape, np.inf, dtype=u.dtype)
    for i in range(len(verts)):
        (ax, ay), (bx, by) = verts[i], verts[(i + 1) % len(verts)]
        ex, ey = bx - ax, by - ay
        px, py = u - ax, v - ay
        # Vertices run counter-clockwise in (u, v), so the inside is left of every edge.
        inside &= (ex * py - ey * px) >= 0
        t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(px - t * ex, py - t * ey))
    return np.where(inside, dist, -dist)


def _height(sp: _Species, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Height profile: a circular dome across the rim, flat on top, zero outside."""
    q = np.clip(_depth(sp, u, v) / sp.rim, 0.0, 1.0)
    return sp.contrast * np.sqrt(1.0 - (1.0 - q) ** 2)


# --------------------------------------------------------------------------- dynamics


def _ramp(t: float, frame: int | None, width: float) -> float:
    """Aligning strength s(t) in [0, 1]: logistic in frames, a step for width 0."""
    if frame is None:
        return 0.0
    if width <= 0:
        return 1.0 if t >= frame else 0.0
    z = (t - frame) / width
    return float(0.5 * (1.0 + math.tanh(0.5 * z)))  # logistic, without overflow


def _wrap(pos: np.ndarray, box: np.ndarray) -> np.ndarray:
    pos = np.mod(pos, box)
    # np.mod can return exactly `box` for tiny negative inputs; cKDTree wants [0, box).
    return np.where(pos >= box, 0.0, pos)


def _close_pairs(pos: np.ndarray, radius: np.ndarray, scale: float, box: np.ndarray) -> np.ndarray:
    """Index pairs (k, 2) whose centres are closer than scale * (r_i + r_j) (periodic)."""
    if len(pos) < 2 or scale <= 0:
        return np.empty((0, 2), dtype=np.intp)
    tree = cKDTree(pos, boxsize=box)
    pairs = tree.query_pairs(scale * 2 * radius.max(), output_type="ndarray")
    if len(pairs) == 0:
        return pairs
    d = pos[pairs[:, 0]] - pos[pairs[:, 1]]
    d -= box * np.round(d / box)
    close = np.hypot(d[:, 0], d[:, 1]) < scale * (radius[pairs[:, 0]] + radius[pairs[:, 1]])
    return pairs[close]


class _Scene:
    """Particles on a periodic patch of substrate (substrate coordinates, px)."""

    def __init__(self, species: list[_Species], box: np.ndarray, scale: float, rng: np.random.Generator):
        self.species = species
        self.box = box
        self.scale = scale
        self.rng = rng
        self.radius_of = np.array([s.radius for s in species])
        self.fractions = np.array([s.fraction for s in species])
        self.pos = np.empty((0, 2))
        self.theta = np.empty(0)
        self.cls = np.empty(0, dtype=np.int64)
        self.pid = np.empty(0, dtype=np.int64)
        # Elevation (rad) of the body axis above the image plane; stays 0 for flat species.
        self.elevation = np.empty(0)
        self.next_id = 0

    @property
    def radius(self) -> np.ndarray:
        return self.radius_of[self.cls]

    def adsorb(self, count: int, tries: int = 4096, batch: int = 256, stop_when_full: bool = False) -> int:
        """Land ``count`` particles at random free spots; returns how many found room.

        Each particle tries up to ``tries`` uniformly random spots (in batches) and lands on
        the first where it overlaps no one: random sequential adsorption, which fills the
        surface up to its jamming limit instead of giving up early. With ``stop_when_full``
        the first particle without room ends the call (the surface is jammed).
        """
        placed = 0
        r_max = self.radius_of.max()
        tree, n_tree = None, 0  # a KD-tree over the first n_tree particles; the rest checked directly
        for _ in range(count):
            k = int(self.rng.choice(len(self.species), p=self.fractions))
            r = self.radius_of[k]
            if self.scale > 0 and len(self.pos) - n_tree > 64:
                tree, n_tree = cKDTree(self.pos, boxsize=self.box), len(self.pos)
            spot = None
            for _ in range(max(1, tries // batch)):
                cand = _wrap(self.rng.uniform(0, 1, (batch, 2)) * self.box, self.box)
                ok = np.ones(batch, dtype=bool)
                if self.scale > 0 and tree is not None:
                    kk = min(n_tree, 32)
                    d, idx = tree.query(cand, k=kk, distance_upper_bound=self.scale * (r + r_max))
                    d, idx = d.reshape(batch, kk), idx.reshape(batch, kk)
                    found = np.isfinite(d)
                    need = self.scale * (r + self.radius_of[self.cls[np.where(found, idx, 0)]])
                    ok &= ~np.any(found & (d < need), axis=1)
                recent = slice(n_tree, len(self.pos))
                if self.scale > 0 and len(self.pos) > n_tree:
                    diff = cand[:, None, :] - self.pos[None, recent, :]
                    diff -= self.box * np.round(diff / self.box)
                    need = self.scale * (r + self.radius_of[self.cls[recent]])
                    ok &= ~np.any(np.hypot(diff[..., 0], diff[..., 1]) < need[None, :], axis=1)
                if ok.any():
                    spot = cand[np.argmax(ok)]
                    break
            if spot is None:
                if stop_when_full:
                    break
                continue
            self.pos = np.vstack([self.pos, spot])
            self.theta = np.append(self.theta, self.rng.uniform(0, 2 * np.pi))
            self.cls = np.append(self.cls, k)
            b3 = self.species[k].body3d
            # Drawn from the stationary tilt distribution; flat species draw nothing, so
            # movies without a 3D species keep their random stream.
            lift = self.rng.normal(0.0, 1.0 / math.sqrt(b3["tilt_concentration"])) if b3 else 0.0
            self.elevation = np.append(self.elevation, lift)
            self.pid = np.append(self.pid, self.next_id)
            self.next_id += 1
            placed += 1
        return placed

    def desorb(self, probability: float) -> None:
        if len(self.pos) == 0 or probability <= 0:
            return
        keep = self.rng.uniform(size=len(self.pos)) >= probability
        self.pos, self.theta, self.cls, self.pid = self.pos[keep], self.theta[keep], self.cls[keep], self.pid[keep]
        self.elevation = self.elevation[keep]

    def tilt(self) -> None:
        """One frame of tilt diffusion for the 3D species: an exact Ornstein-Uhlenbeck step.

        The elevation e of the body axis turns about the in-plane axis perpendicular to it,
        ``de = -D kappa e dt + sqrt(2 D) dW`` (D = tilt_diffusion rad^2/frame, kappa =
        tilt_concentration rad^-2), whose stationary law is N(0, 1/kappa): kappa pulls the
        particle back towards lying flat.
        """
        for k, sp in enumerate(self.species):
            sel = np.flatnonzero(self.cls == k)
            if sp.body3d is None or len(sel) == 0:
                continue
            kappa, d = sp.body3d["tilt_concentration"], sp.body3d["tilt_diffusion"]
            decay = math.exp(-d * kappa)
            sd = math.sqrt((1.0 - decay**2) / kappa)
            self.elevation[sel] = self.elevation[sel] * decay + self.rng.normal(0.0, sd, len(sel))

    def translate(self, d_trans: float) -> None:
        """One Brownian step; moves that break the excluded volume are undone."""
        n = len(self.pos)
        if n == 0 or d_trans <= 0:
            return
        old = self.pos
        new = _wrap(old + self.rng.normal(0.0, math.sqrt(2 * d_trans), (n, 2)), self.box)
        moved = np.ones(n, dtype=bool)
        radius = self.radius
        # Undo the moves of particles in violating pairs until none is left; the old
        # configuration was valid, so this terminates.
        while True:
            pairs = _close_pairs(new, radius, self.scale, self.box)
            if len(pairs) == 0:
                break
            culprits = np.unique(pairs.ravel())
            culprits = culprits[moved[culprits]]
            if len(culprits) == 0:  # only possible when the start was already invalid
                break
            new[culprits] = old[culprits]
            moved[culprits] = False
        self.pos = new

    def rotate(self, d_rot: float, t0: float, transition: dict[str, Any]) -> None:
        """Advance the angles by one frame, from time t0 to t0 + 1."""
        n = len(self.theta)
        if n == 0 or d_rot <= 0:
            return
        frame, width = transition["frame"], float(transition["width"])
        s_max = max(_ramp(t0, frame, width), _ramp(t0 + 1, frame, width))
        if s_max < 1e-9:
            # Free rotational diffusion: exactly Gaussian steps of variance 2 D_r.
            self.theta = self.theta + self.rng.normal(0.0, math.sqrt(2 * d_rot), n)
            return
        sym = np.array([s.symmetry for s in self.species])[self.cls]
        m = np.lcm(SUBSTRATE_ORDER, sym).astype(float)
        phi0 = math.radians(float(transition["substrate_angle"]))
        strength, coupling = float(transition["strength"]), float(transition["neighbour_coupling"])
        pairs = np.empty((0, 2), dtype=np.intp)
        if coupling > 0 and transition["neighbour_radius"] > 0 and n > 1:
            pairs = cKDTree(self.pos, boxsize=self.box).query_pairs(float(transition["neighbour_radius"]),
                                                                     output_type="ndarray")
        p = np.lcm(sym[pairs[:, 0]], sym[pairs[:, 1]]).astype(float) if len(pairs) else np.empty(0)
        # Explicit Euler is stable while D_r * s * stiffness * dt < 2; keep it well below.
        stiffness = strength * m**2
        if len(pairs):
            stiffness = stiffness + coupling * (np.bincount(pairs[:, 0], p**2, n) + np.bincount(pairs[:, 1], p**2, n))
        n_sub = int(min(200, max(1, math.ceil(d_rot * s_max * stiffness.max() / 0.3))))
        dt = 1.0 / n_sub
        theta = self.theta.copy()
        for k in range(n_sub):
            s = _ramp(t0 + (k + 0.5) * dt, frame, width)
            grad = strength * m * np.sin(m * (theta - phi0))
            if len(pairs):
                g = coupling * p * np.sin(p * (theta[pairs[:, 0]] - theta[pairs[:, 1]]))
                grad = grad + np.bincount(pairs[:, 0], g, n) - np.bincount(pairs[:, 1], g, n)
            theta = theta - d_rot * s * grad * dt + self.rng.normal(0.0, math.sqrt(2 * d_rot * dt), n)
        self.theta = theta


# --------------------------------------------------------------------------- rendering


def _render_frame(
    species: list[_Species],
    xs: np.ndarray,
    ys: np.ndarray,
    theta: np.ndarray,
    cls: np.ndarray,
    shape: tuple[int, int],
    supersample: int,
    want_mask: bool,
    elevation: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Height map (and class mask) of one frame from particles at image coordinates.

    Species with a ``body_3d`` are drawn as the projection of their 3D body at the pose
    ``pose_quaternions(theta, elevation)`` times their contrast; their mask is where that
    projection exceeds ``MASK_LEVEL_3D`` of the contrast.
    """
    height, width = shape
    pad = math.ceil(max(s.radius for s in species)) + 2
    canvas = np.zeros((height + 2 * pad, width + 2 * pad), dtype=np.float32)
    mask = np.zeros(canvas.shape, dtype=np.uint8) if want_mask else None
    sub = (np.arange(supersample) + 0.5) / supersample - 0.5
    for k, sp in enumerate(species):
        sel = cls == k
        if not np.any(sel):
            continue
        x, y, a = xs[sel], ys[sel], theta[sel]
        half = math.ceil(sp.radius) + 1
        offs = np.arange(-half, half + 1)
        ix0 = np.rint(x).astype(np.int64)
        iy0 = np.rint(y).astype(np.int64)
        if sp.body3d is not None:
            _paste_body3d(sp, x, y, a, elevation[sel], ix0, iy0, offs, pad, k, canvas, mask)
            continue
        # Sample points of each particle's patch, relative to its centre: (particle, row, col);
        # float32 halves the cost, and offsets of a few px lose nothing in it.
        grid = (offs[:, None] + sub[None, :]).ravel()[None, :]
        fy = ((iy0 - y)[:, None] + grid).astype(np.float32)
        fx = ((ix0 - x)[:, None] + grid).astype(np.float32)
        c, s = np.cos(a).astype(np.float32)[:, None, None], np.sin(a).astype(np.float32)[:, None, None]
        dx, dy = fx[:, None, :], fy[:, :, None]
        h = _height(sp, dx * c + dy * s, -dx * s + dy * c)
        npx = len(offs)
        h = h.reshape(len(x), npx, supersample, npx, supersample).mean(axis=(2, 4))
        rows = (iy0[:, None] + offs[None, :] + pad)[:, :, None]
        cols = (ix0[:, None] + offs[None, :] + pad)[:, None, :]
        rows, cols = np.broadcast_to(rows, h.shape), np.broadcast_to(cols, h.shape)
        ok = (rows >= 0) & (rows < canvas.shape[0]) & (cols >= 0) & (cols < canvas.shape[1]) & (h > 0)
        np.maximum.at(canvas, (rows[ok], cols[ok]), h[ok])
        if want_mask:
            px = ((ix0 - x)[:, None] + offs[None, :]).astype(np.float32)
            py = ((iy0 - y)[:, None] + offs[None, :]).astype(np.float32)
            dx, dy = px[:, None, :], py[:, :, None]
            inside = _depth(sp, dx * c + dy * s, -dx * s + dy * c) > 0
            ok = inside & (rows >= 0) & (rows < canvas.shape[0]) & (cols >= 0) & (cols < canvas.shape[1])
            np.maximum.at(mask, (rows[ok], cols[ok]), np.uint8(k + 1))
    crop = (slice(pad, pad + height), slice(pad, pad + width))
    return canvas[crop], (mask[crop] if want_mask else None)


#: Fraction of the contrast above which a pixel of a projected 3D body is in its mask.
MASK_LEVEL_3D = 0.3


def pose_quaternions(angle: np.ndarray, elevation: np.ndarray) -> np.ndarray:
    """Unit quaternions (n, 4) (w, x, y, z) of particles turned by ``angle`` in the plane and tilted.

    The pose is ``R_z(angle) R_y(-elevation)``: the body x axis is lifted by ``elevation``
    (rad) out of the image plane, then turned by ``angle`` (rad, from +x towards +y), so
    ``R (1, 0, 0) = (cos e cos a, cos e sin a, sin e)`` and the tilt is ``arcsin |sin e|``.
    """
    from .rvae import so3

    a, e = np.asarray(angle, dtype=np.float64), np.asarray(elevation, dtype=np.float64)
    zero = np.zeros_like(a)
    qz = np.stack([np.cos(a / 2), zero, zero, np.sin(a / 2)], -1)
    qy = np.stack([np.cos(-e / 2), zero, np.sin(-e / 2), zero], -1)
    return so3.multiply(qz, qy)


def _paste_body3d(sp: _Species, x, y, a, elevation, ix0, iy0, offs, pad, k, canvas, mask) -> None:
    """Paste the projections of a 3D species' particles into the canvas (topmost wins)."""
    body = body_3d(sp.body3d["kind"], sp.body3d["half_length"])
    # The window centre pixel sits on (ix0, iy0); the sub-pixel rest is the shift.
    h = sp.contrast * project_body_3d(body, pose_quaternions(a, elevation), len(offs),
                                      np.stack([x - ix0, y - iy0], -1))
    rows = np.broadcast_to((iy0[:, None] + offs[None, :] + pad)[:, :, None], h.shape)
    cols = np.broadcast_to((ix0[:, None] + offs[None, :] + pad)[:, None, :], h.shape)
    ok = (rows >= 0) & (rows < canvas.shape[0]) & (cols >= 0) & (cols < canvas.shape[1])
    np.maximum.at(canvas, (rows[ok & (h > 0)], cols[ok & (h > 0)]), h[ok & (h > 0)])
    if mask is not None:
        inside = ok & (h > MASK_LEVEL_3D * sp.contrast)
        np.maximum.at(mask, (rows[inside], cols[inside]), np.uint8(k + 1))


# --------------------------------------------------------------------------- the simulator


def _box_geometry(height: int, width: int, frames: int, drift: tuple[float, float], margin: float):
    """Periodic substrate patch covering the field of view at every frame, plus a margin."""
    span = np.abs(np.array(drift)) * (frames - 1)
    box = np.array([width, height], dtype=float) + 2 * margin + span
    # Image coordinate of substrate coordinate 0 at frame 0.
    origin = -margin - np.maximum(np.array(drift) * (frames - 1), 0.0)
    return box, origin


def simulate(settings: dict[str, Any], *, masks: bool = False) -> SimulatedMovie:
    """Simulate an AFM movie of protein nanorods (and other species) assembling on mica.

    Parameters
    ----------
    settings : dict
        The ``simulate`` config section, validated (defaults filled in) and with ``seed``
        set, e.g. ``rvae_tools.config.validate_section("simulate", {"frames": 20}) | {"seed": 1}``.
        It is validated again here, so a partial dict of overrides works too.
        Lengths in px, times in frames, D_t in px^2/frame, D_r in rad^2/frame; see the
        module docstring and ``config/README.md``.
    masks : bool
        Also return per-pixel class masks (0 background, species index + 1 inside).

    Returns
    -------
    SimulatedMovie
        ``movie`` (frame, y, x) float32, ``truth`` table, ``masks`` (or None), ``metadata``.

    Raises
    ------
    InputError
        A setting out of range or inconsistent (e.g. a species' symmetry that does not match
        its shape).
    """
    seed = settings.get("seed") if isinstance(settings, dict) else None
    cfg = validate_section("simulate", settings, source="simulate settings")
    cfg["seed"] = int(seed if seed is not None else (cfg.get("seed") or 0))
    species = _species_from_settings(cfg["species"])
    rng = np.random.default_rng(cfg["seed"])

    frames, height, width = int(cfg["frames"]), int(cfg["height"]), int(cfg["width"])
    render, noise = cfg["render"], cfg["noise"]
    d_trans, d_rot = float(cfg["diffusion"]["translation"]), float(cfg["diffusion"]["rotation"])
    transition = cfg["transition"]
    drift = (float(render["drift"][0]), float(render["drift"][1]))
    r_max = max(s.radius for s in species)
    box, origin = _box_geometry(height, width, frames, drift, margin=2 * r_max + 2)
    area_ratio = float(box[0] * box[1]) / (height * width)
    desorption = float(cfg["desorption_rate"])
    adsorption = cfg["adsorption_rate"]
    adsorption = desorption * cfg["n_particles"] if adsorption is None else float(adsorption)

    scene = _Scene(species, box, float(cfg["exclusion_scale"]), rng)
    tilting = any(s.body3d is not None for s in species)
    wanted = round(cfg["n_particles"] * area_ratio)
    placed = scene.adsorb(wanted, stop_when_full=True)
    if placed < wanted:
        raise InputError(
            f"simulate.n_particles: {cfg['n_particles']} particles do not fit in view (excluded volume "
            f"leaves room for about {placed / area_ratio:.0f}); expected fewer particles, a larger "
            f"image or a smaller exclusion_scale"
        )

    movie = np.empty((frames, height, width), dtype=np.float32)
    mask_stack = np.empty((frames, height, width), dtype=np.uint8) if masks else None
    rows: list[pd.DataFrame] = []
    reach = r_max + 1
    t_start = time.perf_counter()
    for t in range(frames):
        if t > 0:
            scene.desorb(desorption)
            scene.adsorb(int(rng.poisson(adsorption * area_ratio)))
            scene.translate(d_trans)
            scene.rotate(d_rot, t - 1, transition)
            if tilting:
                scene.tilt()
        shift = origin + np.array(drift) * t
        # The periodic patch covers the view plus a margin at every frame, so one periodic
        # image of each particle is all the view can show.
        img = scene.pos + shift
        x, y = img[:, 0], img[:, 1]
        near = (x > -reach) & (x < width + reach) & (y > -reach) & (y < height + reach)
        heights, mask = _render_frame(species, x[near], y[near], scene.theta[near], scene.cls[near],
                                      (height, width), int(render["supersample"]), masks,
                                      scene.elevation[near])
        movie[t] = heights
        if masks:
            mask_stack[t] = mask
        inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
        sym = np.array([s.symmetry for s in species])[scene.cls[inside]]
        table = pd.DataFrame({
            "frame": np.full(int(inside.sum()), t, dtype=np.int64),
            "particle": scene.pid[inside].astype(np.int64),
            "x": x[inside], "y": y[inside],
            "angle": np.mod(scene.theta[inside], 2 * np.pi / sym),
            "cls": scene.cls[inside].astype(np.int64),
            "angle_unwrapped": scene.theta[inside],
        })
        if tilting:  # only movies with a 3D species carry the pose columns
            q = pose_quaternions(scene.theta[inside], scene.elevation[inside])
            table[["qw", "qx", "qy", "qz"]] = q
            table["tilt"] = np.arcsin(np.clip(np.abs(np.sin(scene.elevation[inside])), 0.0, 1.0))
        rows.append(table)
    truth = pd.concat(rows, ignore_index=True).sort_values(["frame", "particle"], ignore_index=True)

    noise_info = _afm_artefacts_and_noise(movie, species, render, noise, rng)
    log.info("simulated %d frames of %dx%d px with %d particle views in %.2f s", frames, height, width,
             len(truth), time.perf_counter() - t_start)
    metadata = _metadata(cfg, species, box, adsorption, noise_info, truth)
    return SimulatedMovie(movie=movie, truth=truth, masks=mask_stack, metadata=metadata)


def _afm_artefacts_and_noise(movie: np.ndarray, species: list[_Species], render: dict[str, Any],
                             noise: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Blur, mica level, tilt, scan-line offsets and noise, in place; returns the noise figures."""
    frames, height, width = movie.shape
    if render["blur"] > 0:
        for t in range(frames):
            movie[t] = ndimage.gaussian_filter(movie[t], float(render["blur"]), mode="constant")
    yy = (np.arange(height) - (height - 1) / 2)[:, None]
    xx = (np.arange(width) - (width - 1) / 2)[None, :]
    direction = rng.uniform(0, 2 * np.pi)
    for t in range(frames):
        slope = float(render["tilt"]) * (1.0 + 0.2 * rng.standard_normal())
        plane = slope * (np.cos(direction) * xx + np.sin(direction) * yy)
        lines = rng.normal(0.0, float(render["scan_line_offset"]), (height, 1)) if render["scan_line_offset"] > 0 else 0.0
        movie[t] += (float(render["background"]) + plane + lines).astype(np.float32)
    contrast = float(sum(s.fraction * s.contrast for s in species))
    info: dict[str, Any] = {"snr": noise["snr"], "read_fraction": float(noise["read_fraction"]),
                            "signal": contrast, "sigma": 0.0, "read_sigma": 0.0, "shot_scale": None}
    if noise["snr"] is None:
        return info
    sigma = contrast / float(noise["snr"])
    read_sigma = math.sqrt(noise["read_fraction"]) * sigma
    info.update(sigma=sigma, read_sigma=read_sigma)
    shot_var = (1.0 - float(noise["read_fraction"])) * sigma**2
    if shot_var > 0:
        k = float(render["background"]) / shot_var
        info["shot_scale"] = k
        for t in range(frames):
            movie[t] = rng.poisson(np.clip(movie[t], 0.0, None) * k) / k
    if read_sigma > 0:
        for t in range(frames):
            movie[t] += rng.normal(0.0, read_sigma, (height, width)).astype(np.float32)
    return info


def registry_order(truth: pd.DataFrame, symmetry: list[int], substrate_angle: float) -> np.ndarray:
    """Substrate-registry order of the truth per frame.

    ``|<exp(i m_k (angle - phi0))>|`` over the particles of a frame, ``m_k = lcm(6, n_k)``:
    about ``1/sqrt(N)`` for uniform orientations, near 1 when every particle sits in one of
    the three substrate directions.

    Parameters
    ----------
    truth : DataFrame
        ``frame``, ``angle`` (rad), ``cls``.
    symmetry : list of int
        Symmetry order of each species (by class index).
    substrate_angle : float
        Offset phi0 of the substrate directions, degrees.

    Returns
    -------
    numpy.ndarray
        One value per frame ``0 .. truth.frame.max()`` (NaN for an empty frame).
    """
    m = np.lcm(SUBSTRATE_ORDER, np.asarray(symmetry))[truth["cls"].to_numpy()]
    z = np.exp(1j * m * (truth["angle"].to_numpy() - math.radians(substrate_angle)))
    frames = truth["frame"].to_numpy()
    n = int(frames.max()) + 1 if len(frames) else 0
    count = np.bincount(frames, minlength=n)
    total = np.bincount(frames, z.real, n) + 1j * np.bincount(frames, z.imag, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(total / count)


def _half_rise_frame(order: np.ndarray, frame: int | None, width: float) -> float | None:
    """Frame (interpolated) where the order first reaches halfway from its level well before the
    ramp to its level at the end; None when the movie does not hold both plateaus."""
    if frame is None:
        return None
    early = order[: max(0, math.floor(frame - 4 * max(width, 1.0)))]
    late = order[math.ceil(frame + 4 * max(width, 1.0)):]
    if len(early) < 3 or len(late) < 3:
        return None
    half = 0.5 * (np.nanmedian(early) + np.nanmedian(late))
    for t in range(len(early), len(order)):
        if order[t] >= half:
            prev = order[t - 1]
            return float(t - 1 + (half - prev) / (order[t] - prev)) if order[t] > prev else float(t)
    return None


def _metadata(cfg: dict[str, Any], species: list[_Species], box: np.ndarray, adsorption: float,
              noise_info: dict[str, Any], truth: pd.DataFrame) -> dict[str, Any]:
    transition = dict(cfg["transition"])
    phi0 = float(transition["substrate_angle"])
    transition["substrate_directions_deg"] = [phi0 + 60.0 * k for k in range(3)]
    particle_size = float(sum(s.fraction * s.length for s in species))
    counts = truth.groupby("frame").size().reindex(range(cfg["frames"]), fill_value=0)
    order = registry_order(truth, [s.symmetry for s in species], phi0)
    order = np.concatenate([order, np.full(cfg["frames"] - len(order), np.nan)])
    return {
        "generator": f"rvae_tools.simulate {__version__}",
        "seed": int(cfg["seed"]),
        "frames": int(cfg["frames"]),
        "height": int(cfg["height"]),
        "width": int(cfg["width"]),
        "transition_frame": transition["frame"],
        "transition_width": float(transition["width"]),
        "transition": transition,
        # The truth's own order responds before the ramp midpoint (it needs only a few kT),
        # so benchmarks of transition estimates may want this figure beside transition_frame.
        "registry_order": [None if not np.isfinite(v) else round(float(v), 6) for v in order],
        "registry_order_half_rise_frame": _half_rise_frame(order, transition["frame"], float(transition["width"])),
        "species": [
            {"name": s.name, "cls": k, "shape": s.shape, "symmetry": s.symmetry, "length": s.length,
             "width": s.width, "contrast": s.contrast, "fraction": s.fraction,
             "exclusion_radius": s.radius, "reference_axis": _AXIS[s.shape]}
            | ({"body_3d": dict(s.body3d)} if s.body3d is not None else {})
            for k, s in enumerate(species)
        ],
        "particle_size": particle_size,
        "particle_size_definition": "fraction-weighted mean species length (largest extent), px",
        "pixel_size": float(cfg["pixel_size"]),
        "pixel_unit": cfg["pixel_unit"],
        "frame_interval": float(cfg["frame_interval"]),
        "diffusion": {"translation": float(cfg["diffusion"]["translation"]),
                      "rotation": float(cfg["diffusion"]["rotation"]),
                      "translation_unit": "px^2/frame", "rotation_unit": "rad^2/frame",
                      "definition": "<dx^2> = <dy^2> = 2 D_t and <dangle^2> = 2 D_r per frame (free motion)"},
        "drift": [float(v) for v in cfg["render"]["drift"]],
        "drift_unit": "px/frame",
        "snr": noise_info["snr"],
        "noise": {**noise_info,
                  "definition": "snr = fraction-weighted mean species contrast / std of the pixel noise on bare "
                                "mica (shot + read); read_sigma^2 = read_fraction * sigma^2; shot noise = "
                                "Poisson(I * shot_scale) / shot_scale"},
        "render": dict(cfg["render"]),
        "n_particles_target": int(cfg["n_particles"]),
        "n_particles_mean": float(counts.mean()),
        "adsorption_rate": float(adsorption),
        "desorption_rate": float(cfg["desorption_rate"]),
        "exclusion_scale": float(cfg["exclusion_scale"]),
        "substrate_box": [float(b) for b in box],
        "angle_convention": "axis direction (cos angle, sin angle) in (x, y) px: from +x towards +y "
                            "(clockwise on screen); truth angle in [0, 2 pi / symmetry)",
        "settings": cfg,
    }


# --------------------------------------------------------------------------- output and CLI


def write_simulation(sim: SimulatedMovie, outdir: str | Path) -> dict[str, Path]:
    """Write ``outdir/raw/movie.tif``, ``outdir/truth.parquet`` and ``outdir/raw/simulation.json``.

    The TIFF is a float32 multi-page file (one page per frame); the metadata is also stored
    in the Parquet footer (:func:`rvae_tools.io.table_metadata`). With masks, they go to
    ``outdir/raw/masks.tif`` (uint8). Returns the written paths by name.
    """
    import tifffile

    outdir = Path(outdir)
    paths = {
        "movie": outdir / "raw" / "movie.tif",
        "truth": outdir / "truth.parquet",
        "metadata": outdir / "raw" / "simulation.json",
    }
    movie = sim.movie.astype(np.float32, copy=False)
    md = sim.metadata
    with atomic_output(paths["movie"]) as tmp:
        if movie.nbytes < 3 * 2**30:
            # ImageJ hyperstack metadata makes the TIFF self-describing (pixel size, unit,
            # frame interval) for ingest and for Fiji; ImageJ TIFFs cannot exceed 4 GB.
            size = float(md.get("pixel_size", 1.0))
            tifffile.imwrite(tmp, movie, imagej=True, resolution=(1.0 / size, 1.0 / size),
                             metadata={"axes": "TYX", "unit": str(md.get("pixel_unit", "pixel")),
                                       "finterval": float(md.get("frame_interval", 1.0))})
        else:
            tifffile.imwrite(tmp, movie, photometric="minisblack", bigtiff=True, metadata=None)
    if sim.masks is not None:
        paths["masks"] = outdir / "raw" / "masks.tif"
        with atomic_output(paths["masks"]) as tmp:
            tifffile.imwrite(tmp, sim.masks, photometric="minisblack", metadata=None)
    write_table(sim.truth, paths["truth"], metadata=sim.metadata)
    write_json(sim.metadata, paths["metadata"])
    return paths


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rvae-tools simulate``."""
    parser.add_argument("--outdir", required=True, metavar="DIR",
                        help="writes DIR/raw/movie.tif, DIR/truth.parquet and DIR/raw/simulation.json")
    parser.add_argument("--masks", action="store_true",
                        help="also write per-pixel class masks to DIR/raw/masks.tif (0 background, class + 1)")
    add_settings_arguments(parser, "simulate")


def run(args: argparse.Namespace) -> int:
    """Run ``rvae-tools simulate``."""
    settings = settings_from_args(args, "simulate")
    start = time.perf_counter()
    sim = simulate(settings, masks=args.masks)
    paths = write_simulation(sim, args.outdir)
    # Frames without particles are not in the truth table; a movie with none at all is valid.
    counts = sim.truth.groupby("frame").size().reindex(range(sim.movie.shape[0]), fill_value=0)
    log.info("wrote %s (%d frames, %d-%d particles per frame, transition at %s) in %.2f s",
             ", ".join(str(p) for p in paths.values()), sim.movie.shape[0], int(counts.min()), int(counts.max()),
             sim.metadata["transition_frame"], time.perf_counter() - start)
    return 0


COMMANDS = {"simulate": (configure_parser, run)}


# --------------------------------------------------------------------------- 3D bodies in projection
#
# Particles that tilt out of the image plane: a 3D body made of isotropic Gaussian blobs,
# seen along the viewing axis. The projection of a blob (amplitude a, sd s, centre c) is the
# 2D Gaussian a s sqrt(2 pi) exp(-|p - c_xy|^2 / (2 s^2)), so windows are exact (no voxels).
# Quaternion conventions: rvae_tools.rvae.so3 (w, x, y, z; body -> lab; lab z = viewing axis).

#: Blob bodies (centre x, y, z in units of the body's half length; sd and amplitude).
BODIES_3D: dict[str, dict[str, list]] = {
    # A 3D "F": a long stem along body x, two unequal arms along +y and one knob along +z, so
    # it has no rotational symmetry and is chiral (its mirror image is not a rotation of it).
    "asymmetric": {
        "centres": [[-1.0, 0, 0], [-0.6, 0, 0], [-0.2, 0, 0], [0.2, 0, 0], [0.6, 0, 0], [1.0, 0, 0],
                    [1.0, 0.4, 0], [1.0, 0.8, 0], [0.2, 0.4, 0], [-0.6, 0, 0.45]],
        "sd": [0.16] * 6 + [0.16, 0.16, 0.16, 0.2],
        "amplitude": [1.0] * 6 + [1.0, 1.0, 1.0, 1.2],
    },
    # A rod along body x, the same at both ends.
    "rod": {
        "centres": [[u, 0, 0] for u in np.linspace(-1, 1, 11)],
        "sd": [0.14] * 11,
        "amplitude": [1.0] * 11,
    },
}
#: The body axis whose tilt out of the image plane is reported (body x for both bodies).
BODY_AXIS_3D = (1.0, 0.0, 0.0)


def body_3d(kind: str, half_length: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blob centres (m, 3) px, sds (m,) px and amplitudes (m,) of a 3D body of ``half_length`` px."""
    if kind not in BODIES_3D:
        raise InputError(f"3D body {kind!r} is unknown; expected one of {', '.join(BODIES_3D)}")
    if not half_length > 0:
        raise InputError(f"3D body half length {half_length!r} px; expected > 0")
    b = BODIES_3D[kind]
    centres = np.asarray(b["centres"], dtype=np.float64)
    centres = centres - centres.mean(0)
    return centres * half_length, np.asarray(b["sd"]) * half_length, np.asarray(b["amplitude"], dtype=np.float64)


def project_body_3d(body: tuple[np.ndarray, np.ndarray, np.ndarray], quaternions: np.ndarray, window: int,
                    shifts: np.ndarray | None = None) -> np.ndarray:
    """Windows (n, window, window) of a 3D body at poses ``quaternions`` (n, 4), projected along z.

    The body's origin lands on the window centre (pixel ``(window - 1) / 2``) plus ``shifts``
    (n, 2) px (dx along columns, dy along rows). Peak intensity is about 1 for a flat body.
    """
    from .rvae import so3

    centres, sd, amp = body
    rot = so3.to_matrix(np.atleast_2d(quaternions))
    n = rot.shape[0]
    shifts = np.zeros((n, 2)) if shifts is None else np.asarray(shifts, dtype=np.float64).reshape(n, 2)
    px = np.arange(window) - (window - 1) / 2
    lab = np.einsum("nij,mj->nmi", rot, centres)                                  # (n, m, 3)
    cx = lab[..., 0] + shifts[:, None, 0]
    cy = lab[..., 1] + shifts[:, None, 1]
    weight = amp * sd * np.sqrt(2 * np.pi)
    norm = 1.0 / weight.max()
    gx = np.exp(-(px[None, None, :] - cx[..., None]) ** 2 / (2 * sd[None, :, None] ** 2))   # (n, m, W)
    gy = np.exp(-(px[None, None, :] - cy[..., None]) ** 2 / (2 * sd[None, :, None] ** 2))
    return np.einsum("m,nmy,nmx->nyx", weight * norm, gy, gx).astype(np.float32)

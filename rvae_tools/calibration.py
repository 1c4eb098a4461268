"""Lab-frame angles: the rVAE's angle mapped onto the image axes, species by species.

The rVAE's angle is the rotation of a learned template whose own upright orientation is
arbitrary, and whose sense of rotation is a property of the network, so the raw angle
(``angle_raw``) differs from an orientation one could measure with a protractor by a constant
offset and possibly a sign, for each species (each has its own template). This module fits
both, per species, and stores

    angle = wrap(sense * (angle_raw + angle_shape_correction) + offset)   in [-pi, pi)

**Convention.** ``angle`` is measured from the image +x axis (increasing column) towards the
image +y axis (increasing row): counter-clockwise in (x, y) pixel coordinates, which on a
screen where y points down (row 0 at the top, as ``imshow`` draws it) turns *clockwise*. It is
the convention of the detections' ``orientation`` column and of ``truth.parquet``, so a stick
drawn from ``(x, y)`` towards ``(x + cos angle, y + sin angle)`` on the image lies along the
particle. For an ``n``-fold symmetric species only ``angle`` modulo ``2 pi / n`` means
something; for a polar species (n = 1) the angle points along the template's third angular
moment (towards the end whose intensity reaches further from the centre). Isotropic species
(n = 0) have no orientation: their ``angle`` is NaN (``angle_raw`` keeps the encoder's value).

**Fit.** Two references, in this order of preference:

1. *image moments* (``method: moments``): the detections' ``orientation`` (the major axis,
   modulo pi) of elongated windows (eccentricity >= :data:`ELONGATED`) of species with
   n <= 2. Sense and offset maximise the resultant ``|mean exp(2i (orientation - s angle_raw))|``;
   for n = 1 the offset's remaining pi is taken from the template fit;
2. *decoded template* (``method: template``): the species' template decoded at
   :data:`TEMPLATE_ANGLES` raw angles; its orientation modulo ``2 pi / n`` (the phase of its
   n-th angular moment; n = 2 is the principal axis of the second moments) against the raw
   angle it was decoded at. For n = 1 an elongated template's axis gives the offset and its
   third moment only which end is the head.

**Each window's own shape.** A window's ``z`` bends or tilts its upright template a little
against the species' template (a rod seen a little curved, a neighbour's halo), so its raw angle
rotates *its* template, not the species'. For two-fold species the raw angle is therefore first
moved by the principal axis of the window's own upright template (decoded at angle 0) less that
of the species' template (:func:`shape_correction`), so that every raw angle is the angle at
which the *species'* template lies as the window's particle does; the calibration then fits
these corrected angles. The correction is kept as ``angle_shape_correction``; a model told
each window's angle (``condition: angle``) is not corrected.

The residual is the circular spread (rad) of ``reference - (s angle_raw + offset)`` modulo the
fit's period, ``sqrt(-2 ln R) / k`` with ``R`` the resultant and ``k`` = 2 (moments) or n.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import numpy as np
import xarray as xr

from . import species as species_mod

log = logging.getLogger(__name__)

CONVENTION = (
    "rad in [-pi, pi), from the image +x axis (columns) towards +y (rows): counter-clockwise in (x, y) "
    "pixel coordinates, clockwise on a screen where y points down; modulo 2 pi / n for an n-fold species"
)
#: Eccentricity of the detection above which its moment orientation is a usable reference.
ELONGATED = 0.8
#: Fewest reference windows for a moment fit.
MIN_WINDOWS = 10
#: Raw angles the template is decoded at for the template fit.
TEMPLATE_ANGLES = 24


def wrap(angle: np.ndarray, period: float = 2 * np.pi) -> np.ndarray:
    """Angles reduced to ``[-period / 2, period / 2)``."""
    return np.remainder(np.asarray(angle, dtype=np.float64) + period / 2, period) - period / 2


def fit_sense_offset(raw: np.ndarray, reference: np.ndarray, order: int) -> dict[str, Any]:
    """Sense s (+1/-1) and offset c (rad) with ``reference = s raw + c`` modulo ``2 pi / order``.

    Parameters
    ----------
    raw, reference : array of float (rad)
        Paired angles; NaN pairs are left out.
    order : int
        Symmetry order k of the reference (2 for a major axis known modulo pi).

    Returns
    -------
    dict
        ``sense``, ``offset`` (rad, in ``[-pi / k, pi / k)``), ``residual`` (rad, circular
        spread), ``consistency`` (the resultant R in [0, 1]), ``n`` (pairs used).
    """
    moments = AxisMoments(order)
    moments.add(raw, reference)
    return moments.fit()


class AxisMoments:
    """Running sums of :func:`fit_sense_offset` over paired angles seen a part at a time.

    The fit needs only ``sum exp(i k (reference - s raw))`` for both senses ``s`` and the
    number of pairs, so the windows of a species can be added trajectory chunk by trajectory
    chunk (:meth:`add`) and fitted at the end (:meth:`fit`) without holding them all.

    Parameters
    ----------
    order : int
        Symmetry order k of the reference (2 for a major axis known modulo pi).
    """

    def __init__(self, order: int) -> None:
        self.order = max(int(order), 1)
        self.sums = {1: 0j, -1: 0j}
        self.n = 0

    def add(self, raw: np.ndarray, reference: np.ndarray, eccentricity: np.ndarray | None = None) -> None:
        """Add pairs of angles (rad); NaN pairs, and those below :data:`ELONGATED` eccentricity when given, are left out."""
        raw = np.asarray(raw, dtype=np.float64)
        reference = np.asarray(reference, dtype=np.float64)
        ok = np.isfinite(raw) & np.isfinite(reference)
        if eccentricity is not None:
            ok &= np.nan_to_num(np.asarray(eccentricity, dtype=np.float64), nan=0.0) >= ELONGATED
        for sense in self.sums:
            self.sums[sense] += np.sum(np.exp(1j * self.order * (reference[ok] - sense * raw[ok])))
        self.n += int(ok.sum())

    def fit(self) -> dict[str, Any]:
        """The fit of :func:`fit_sense_offset` over every pair added."""
        k = self.order
        best: dict[str, Any] = {"sense": 1, "offset": float("nan"), "residual": float("nan"), "consistency": 0.0,
                                "n": self.n}
        if self.n == 0:
            return best
        for sense in (1, -1):
            m = self.sums[sense] / self.n
            r = float(np.abs(m))
            if r > best["consistency"] + 1e-12:
                best.update(sense=sense, offset=float(wrap(np.angle(m) / k, 2 * np.pi / k)), consistency=r,
                            residual=float(np.sqrt(-2 * np.log(max(r, 1e-12))) / k))
        return best


def template_orientation(image: np.ndarray, order: int) -> float:
    """Orientation (rad, modulo ``2 pi / order``) of a centred particle image.

    The phase of its ``order``-th angular moment ``sum w (x + iy)^n`` divided by n, with weights
    ``w = |image - median|`` (bright or dark particles alike; less a floor of 0.2 of its maximum,
    inside the inscribed disc) and (x, y) from the window centre;
    n = 2 is the major axis of the second moments. For n = 1 the moment is weighted by ``r^2``
    more (a third moment), so it points towards the end reaching further from the centre.
    """
    t = np.asarray(image, dtype=np.float64)
    wy, wx = t.shape
    yy, xx = np.mgrid[0:wy, 0:wx]
    c = (xx - (wx - 1) / 2.0) + 1j * (yy - (wy - 1) / 2.0)
    w = np.abs(t - np.median(t))
    # Only the particle: a floor removes the background's ripples, the inscribed disc the
    # corners, which enter and leave the window as a template turns.
    w = np.clip(w - 0.2 * w.max(), 0, None) * (np.abs(c) <= min(wy, wx) / 2.0)
    n = max(int(order), 1)
    moment = (w * c ** n * (np.abs(c) ** 2 if n == 1 else 1.0)).sum()
    return float(wrap(np.angle(moment) / n, 2 * np.pi / n))


def _principal_axes(images: np.ndarray) -> np.ndarray:
    """Major axis (rad, modulo pi) of each centred image of a stack, weighted as :func:`template_orientation`."""
    t = np.asarray(images, dtype=np.float64)
    _, wy, wx = t.shape
    yy, xx = np.mgrid[0:wy, 0:wx]
    c = (xx - (wx - 1) / 2.0) + 1j * (yy - (wy - 1) / 2.0)
    w = np.abs(t - np.median(t.reshape(t.shape[0], -1), axis=1)[:, None, None])
    w = np.clip(w - 0.2 * w.max(axis=(1, 2), keepdims=True), 0, None) * (np.abs(c) <= min(wy, wx) / 2.0)
    return wrap(np.angle((w * c ** 2).sum(axis=(1, 2))) / 2, np.pi)


def shape_correction(model: Any, z: np.ndarray, zmean: np.ndarray) -> np.ndarray:
    """Principal axis of each window's upright template less the species template's (rad, modulo pi).

    Parameters
    ----------
    model : RVAE
        Decodes the templates.
    z : ndarray (windows, k)
        Each window's content latent.
    zmean : ndarray (k,)
        The species' mean content latent.

    Returns
    -------
    ndarray (windows,) rad in ``[-pi / 2, pi / 2)``
        Add to the window's raw angle to get the raw angle at which the species' template has
        the window template's axis (the decoder turns every template by the same raw angle).
    """
    z = np.atleast_2d(np.asarray(z, dtype=np.float32))
    reference = _principal_axes(model.decode(np.atleast_2d(np.asarray(zmean, dtype=np.float32)), angle=np.zeros(1)))
    out = np.empty(z.shape[0])
    for start in range(0, z.shape[0], 1024):  # decoded windows stay a few MB at a time
        part = z[start:start + 1024]
        out[start:start + part.shape[0]] = _principal_axes(model.decode(part, angle=np.zeros(part.shape[0])))
    return wrap(out - reference[0], np.pi)


def fit_template(model: Any, zmean: np.ndarray, order: int, n_angles: int = TEMPLATE_ANGLES) -> dict[str, Any]:
    """Sense and offset from the species' template decoded at known raw angles (see module doc)."""
    raw = wrap(np.linspace(-np.pi, np.pi, n_angles, endpoint=False))
    z = np.repeat(np.atleast_2d(np.asarray(zmean, dtype=np.float32)), n_angles, axis=0)
    images = np.asarray(model.decode(z, angle=raw))
    reference = np.array([template_orientation(img, order) for img in images])
    return fit_sense_offset(raw, reference, order)


def to_lab(raw: np.ndarray, sense: int, offset: float) -> np.ndarray:
    """Lab-frame angle ``wrap(sense * raw + offset)`` in [-pi, pi)."""
    return wrap(sense * np.asarray(raw, dtype=np.float64) + offset)


def calibrate_species(
    model: Any, zmean: np.ndarray, order: int, raw: np.ndarray | None = None,
    orientation: np.ndarray | None = None, eccentricity: np.ndarray | None = None, *,
    moments: AxisMoments | None = None,
) -> dict[str, Any]:
    """Calibration of one species: the fit used and both fits' figures.

    Parameters
    ----------
    model : RVAE
        Decodes the species' template.
    zmean : array (k,)
        The species' mean content latent.
    order : int
        Symmetry order n of the species (0 = isotropic: no calibration).
    raw, orientation, eccentricity : array (windows,), optional
        The species' raw rVAE angles and their detections' moment orientation (rad, modulo pi)
        and eccentricity.
    moments : AxisMoments, optional
        The same pairs already summed (order 2), in place of ``raw``, ``orientation`` and
        ``eccentricity``.

    Returns
    -------
    dict
        ``method`` (moments, template or none), ``sense``, ``offset``, ``residual`` (rad),
        ``consistency``, ``n_windows``, and ``template_*`` figures of the template fit.
    """
    out: dict[str, Any] = {"method": "none", "sense": 1, "offset": float("nan"), "residual": float("nan"),
                           "consistency": float("nan"), "n_windows": 0}
    if order < 1:
        return out
    tpl = fit_template(model, zmean, order)
    if order == 1:
        # A third moment wobbles with the pixel grid as the template turns; an elongated polar
        # template's axis (second moments) does not, so the axis gives the offset and the third
        # moment only which end of it is the head.
        axis = fit_template(model, zmean, 2)
        if axis["consistency"] >= 0.99 and axis["sense"] == tpl["sense"] and np.isfinite(tpl["offset"]):
            cands = np.array([axis["offset"], axis["offset"] + np.pi])
            tpl = {**axis, "offset": float(wrap(cands[np.argmin(np.abs(wrap(cands - tpl["offset"])))]))}
    out.update({f"template_{key}": tpl[key] for key in ("sense", "offset", "residual", "consistency")})
    if moments is None and raw is not None and orientation is not None:
        moments = AxisMoments(2)
        moments.add(raw, orientation, eccentricity)
    use_moments = moments is not None and order <= 2 and moments.n >= MIN_WINDOWS
    if use_moments:
        fit = moments.fit()
        offset = fit["offset"]
        if order == 1 and np.isfinite(tpl["offset"]) and tpl["sense"] == fit["sense"]:
            # Moments know the axis modulo pi; the template knows which end is which.
            cands = np.array([offset, offset + np.pi])
            offset = float(cands[np.argmin(np.abs(wrap(cands - tpl["offset"])))])
        out.update(method="moments", sense=fit["sense"], offset=float(wrap(offset)), residual=fit["residual"],
                   consistency=fit["consistency"], n_windows=fit["n"])
    elif np.isfinite(tpl["offset"]):
        out.update(method="template", sense=tpl["sense"], offset=tpl["offset"], residual=tpl["residual"],
                   consistency=tpl["consistency"], n_windows=0)
    return out


# --------------------------------------------------------------------------- the encode hook


def trajectory_means(z: np.ndarray) -> np.ndarray:
    """Mean z (particle, k) over each trajectory's frames (NaN where a trajectory has none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for absent trajectories
        return np.nanmean(z, axis=1)


def _species_from_cls(cls: np.ndarray) -> tuple[np.ndarray, list[Any]] | None:
    labels = np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in cls], dtype=object)
    values = sorted({v for v in labels if v != ""}, key=lambda v: (str(type(v)), v))
    if len(values) < 2:
        return None
    lookup = {v: k for k, v in enumerate(values)}
    return np.array([lookup.get(v, -1) for v in labels], dtype=np.int64), values


def _moment_grids(patches: xr.Dataset | None, index: tuple[np.ndarray, np.ndarray] | None,
                  shape: tuple[int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The detections' orientation and eccentricity carried by the patches, on (particle, frame)."""
    grids = []
    for name in ("orientation", "eccentricity"):
        if patches is None or index is None or name not in patches.variables:
            grids.append(None)
            continue
        grid = np.full(shape, np.nan)
        grid[index] = np.asarray(patches[name].values, dtype=np.float64)
        grids.append(grid)
    return grids[0], grids[1]


class LabFrameFit:
    """Species, their symmetry and lab-frame angle calibration, fitted a trajectory chunk at a time.

    The steps of :func:`lab_frame`, apart so that ``encode`` can run them over chunks of
    trajectories without holding the whole (particle, frame) grid:

    1. :meth:`from_trajectories`: the species of every trajectory from its mean ``z`` (or its
       class), their decoded templates and symmetry orders;
    2. :meth:`observe`, on each chunk: its windows' shape corrections (returned: keep them for
       step 4) and the moment sums of every species (:class:`AxisMoments`);
    3. :meth:`finish`: every species' sense and offset (:func:`calibrate_species`);
    4. :meth:`apply`, on each chunk: the lab-frame angles; :meth:`attrs` for the store.

    Parameters
    ----------
    model : RVAE
        Decodes the species templates (and the windows' own, for the shape correction).
    labels : int ndarray (particle,)
        Species index of every trajectory (-1 = unknown).
    table : list of dict
        Per species: ``name``, ``source``, ``symmetry``, ``symmetry_from`` (and ``cls``).
    source : str
        Where the species came from: cls, latent or single.
    means : ndarray (species, k)
        Each species' mean content latent.
    given_angles : bool
        The model is told each window's angle (``condition: angle``): no shape correction.
    """

    def __init__(self, model: Any, labels: np.ndarray, table: list[dict[str, Any]], source: str,
                 means: np.ndarray, given_angles: bool) -> None:
        self.model, self.labels, self.table, self.source = model, labels, table, source
        self.means, self.given_angles = means, given_angles
        self.moments = [AxisMoments(2) for _ in table]
        self.referenced = False  # whether any chunk brought the detections' orientation
        self.squares = [[0.0, 0] for _ in table]  # sum of squared shape corrections (rad^2), count
        self.calibrations: list[dict[str, Any]] = []

    @classmethod
    def from_trajectories(cls, model: Any, settings: dict[str, Any] | None, zmean: np.ndarray,
                          classes: np.ndarray | None = None) -> LabFrameFit:
        """Species of every trajectory and their symmetry orders.

        Parameters
        ----------
        model : RVAE
            Decodes the species templates.
        settings : dict, optional
            The ``rvae`` section: ``species``, ``symmetry`` and ``seed`` (see :func:`lab_frame`).
        zmean : ndarray (particle, k)
            Each trajectory's mean content latent (NaN rows: no window with a finite z).
        classes : ndarray (particle,), optional
            Each trajectory's class (``cls``), used when ``species`` is auto or cls.
        """
        settings = settings or {}
        how = settings.get("species", "auto")
        symmetry = settings.get("symmetry", "auto")
        n_particles, k = zmean.shape
        found = _species_from_cls(np.asarray(classes)) if how in ("auto", "cls") and classes is not None else None
        if found is not None:
            labels, values = found
            table = [{"name": str(v), "cls": v.item() if hasattr(v, "item") else v, "source": "cls"} for v in values]
            source = "cls"
        elif how in ("auto", "latent") and k > 0:
            labels, info = species_mod.find_species(zmean, seed=int(settings.get("seed") or 0))
            components = info["n_species"]
            # z also tracks what is not shape (background tilt, contrast), so the mixture may split
            # one shape; components whose decoded templates show one shape are one species.
            labels = species_mod.merge_species(labels, species_mod.species_templates(model, np.asarray(info["means"])))
            n_species = int(labels.max()) + 1 if (labels >= 0).any() else 1
            table = [{"name": f"species{k}", "source": "latent"} for k in range(n_species)]
            source = "latent"
            log.info("species from a Gaussian mixture over the trajectories' mean z: %d components (BIC %s), "
                     "%d species after merging components of one template shape (similarity >= %.2f)",
                     components, ", ".join(f"{b:.1f}" for b in info["bic"]), n_species, species_mod.SAME_SHAPE)
        else:
            labels = np.where(np.isfinite(zmean).all(axis=1), 0, -1) if k else np.zeros(n_particles, np.int64)
            table = [{"name": "particle", "source": "single"}]
            source = "single"
        means = species_mod.species_means(zmean, labels, len(table))
        templates = species_mod.species_templates(model, means)
        for entry, template in zip(table, templates):
            if symmetry == "auto" or symmetry is None:
                entry["symmetry"] = species_mod.symmetry_order(template)
                entry["symmetry_from"] = "template"
            else:
                entry["symmetry"] = int(symmetry)
                entry["symmetry_from"] = "config"
        # A model told each window's angle (condition: angle) keeps it: that angle is the user's.
        given_angles = (getattr(model, "settings", None) or {}).get("condition") == "angle"
        return cls(model, np.asarray(labels, dtype=np.int64), table, source, means, given_angles)

    def observe(self, raw: np.ndarray, z: np.ndarray, labels: np.ndarray, orientation: np.ndarray | None = None,
                eccentricity: np.ndarray | None = None) -> np.ndarray:
        """Shape corrections of a chunk's windows; the chunk is added to every species' moment sums.

        Parameters
        ----------
        raw : ndarray (particle, frame) rad
            The rVAE's own angle of the chunk's windows (NaN = no window).
        z : ndarray (particle, frame, k)
            Their content latents.
        labels : int ndarray (particle,)
            The chunk's trajectories' species.
        orientation, eccentricity : ndarray (particle, frame), optional
            The detections' moment orientation (rad, modulo pi) and eccentricity.

        Returns
        -------
        ndarray (particle, frame) rad
            Each window's shape correction (two-fold species; NaN elsewhere).
        """
        correction = np.full_like(raw, np.nan)
        for k, entry in enumerate(self.table):
            sel = (labels == k)[:, None] & np.isfinite(raw)
            if entry["symmetry"] == 2 and z.shape[2] > 0 and not self.given_angles:
                # Two-fold species: each window's raw angle turns its own template (see module doc).
                sel &= np.isfinite(z).all(axis=2)
                correction[sel] = shape_correction(self.model, z[sel], self.means[k])
            if orientation is not None:
                self.referenced = True
                turned = raw[sel] + np.nan_to_num(correction[sel])
                self.moments[k].add(turned, orientation[sel], None if eccentricity is None else eccentricity[sel])
            done = correction[sel][np.isfinite(correction[sel])]
            self.squares[k][0] += np.sum(done ** 2)
            self.squares[k][1] += done.size
        return correction

    def finish(self) -> list[dict[str, Any]]:
        """Every species' calibration (see :func:`calibrate_species`), once every chunk was observed."""
        self.calibrations = []
        for k, entry in enumerate(self.table):
            cal = calibrate_species(self.model, self.means[k], entry["symmetry"],
                                    moments=self.moments[k] if self.referenced else None)
            total, count = self.squares[k]
            cal["shape_correction_rms"] = float(np.sqrt(total / count)) if count else float("nan")
            self.calibrations.append({"species": entry["name"], **cal})
            log.info("species %s: symmetry %d (%s), angle calibration %s: sense %+d, offset %.1f deg, residual "
                     "%.1f deg (%d windows), per-window shape correction rms %.1f deg", entry["name"],
                     entry["symmetry"], entry["symmetry_from"], cal["method"], cal["sense"],
                     np.degrees(cal["offset"]), np.degrees(cal["residual"]), cal["n_windows"],
                     np.degrees(cal["shape_correction_rms"]))
        return self.calibrations

    def apply(self, ds: xr.Dataset, labels: np.ndarray, correction: np.ndarray) -> xr.Dataset:
        """A chunk of latents with ``angle`` in the lab frame, ``angle_raw``, ``angle_shape_correction`` and ``species``.

        Parameters
        ----------
        ds : xarray.Dataset
            The chunk's latents, ``angle`` still the rVAE's own.
        labels : int ndarray (particle,)
            The chunk's trajectories' species.
        correction : ndarray (particle, frame) rad
            What :meth:`observe` returned for the chunk.
        """
        raw = np.asarray(ds["angle"].values, dtype=np.float64)
        turned = raw + np.nan_to_num(correction)
        lab = np.full_like(raw, np.nan)
        for k, (entry, cal) in enumerate(zip(self.table, self.calibrations)):
            if entry["symmetry"] >= 1 and np.isfinite(cal["offset"]):
                rows = labels == k
                lab[rows] = to_lab(turned[rows], cal["sense"], cal["offset"])
        out = ds.copy()
        out["angle_raw"] = (("particle", "frame"), raw.astype(np.float32),
                            {"units": "rad", "description": "the rVAE's own angle (arbitrary offset and sense per species)"})
        out["angle"] = (("particle", "frame"), lab.astype(np.float32), {
            **dict(ds["angle"].attrs), "units": "rad", "convention": CONVENTION,
            "description": "orientation in the lab frame (calibrated angle_raw); NaN for isotropic species"})
        out["angle_shape_correction"] = (("particle", "frame"), correction.astype(np.float32), {
            "units": "rad", "description": "principal axis of the window's own upright template less its species' "
            "template's, added to angle_raw before calibration (two-fold species; NaN elsewhere)"})
        return out.assign_coords(species=("particle", np.asarray(labels, dtype=np.int64), {
            "description": "species index of the trajectory (into the 'species' attribute; -1 = unknown)"}))

    def attrs(self) -> dict[str, Any]:
        """The store's attributes of the species and their calibration (after :meth:`finish`)."""
        return {
            "species": json.dumps(self.table, default=str),
            "species_source": self.source,
            "species_symmetry": [int(e["symmetry"]) for e in self.table],
            "angle_convention": CONVENTION,
            "angle_offset": [float(c["offset"]) for c in self.calibrations],
            "angle_sense": [int(c["sense"]) for c in self.calibrations],
            "angle_residual": [float(c["residual"]) for c in self.calibrations],
            "angle_calibration": json.dumps(self.calibrations, default=float),
        }


def lab_frame(ds: xr.Dataset, model: Any, settings: dict[str, Any] | None = None, *,
              patches: xr.Dataset | None = None,
              index: tuple[np.ndarray, np.ndarray] | None = None) -> xr.Dataset:
    """Species, their symmetry and lab-frame angles added to the latents, all in memory (see :class:`LabFrameFit`).

    Parameters
    ----------
    ds : xarray.Dataset
        Latents on (particle, frame) with ``angle`` (the raw rVAE angle), ``z`` and optionally
        ``cls(particle)``.
    model : RVAE
        The model that encoded them (decodes the species templates).
    settings : dict, optional
        The ``rvae`` section: ``species`` (auto, cls, latent, single) and ``symmetry``
        (auto or an order, 0 = isotropic).
    patches : xarray.Dataset, optional
        The windows store; its ``orientation`` (rad, modulo pi) and ``eccentricity`` on ``obs``,
        when present, are the moment reference of the fit.
    index : (particle index, frame index) of every ``obs``, optional
        Where each window sits on the latents' grid.

    Returns
    -------
    xarray.Dataset
        With ``angle`` in the lab frame, ``angle_raw``, ``species(particle)`` and attrs
        ``species`` (JSON list of ``{"name", "symmetry", "source"[, "cls"]}``),
        ``species_symmetry`` (list, 0 = isotropic), ``angle_convention``, ``angle_offset``,
        ``angle_sense``, ``angle_residual``, ``angle_calibration`` (JSON, per species).
    """
    raw = np.asarray(ds["angle"].values, dtype=np.float64)
    if not np.isfinite(raw).any():
        log.info("no angles (a model without pose latents): no species symmetry or lab-frame calibration")
        return ds
    z = np.asarray(ds["z"].transpose("particle", "frame", "latent").values, dtype=np.float64)
    classes = ds["cls"].values if "cls" in ds.variables and ds["cls"].dims == ("particle",) else None
    fit = LabFrameFit.from_trajectories(model, settings, trajectory_means(z), classes)
    orientation, eccentricity = _moment_grids(patches, index, raw.shape)
    correction = fit.observe(raw, z, fit.labels, orientation, eccentricity)
    fit.finish()
    out = fit.apply(ds, fit.labels, correction)
    out.attrs.update(fit.attrs())
    return out

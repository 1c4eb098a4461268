"""Inspect a movie before analysing it: what the particles look like and how they move.

``rvae-tools inspect MOVIE`` samples frames (pairs of consecutive frames, so motion can be
measured) and estimates, with the classical detector of :mod:`rvae_tools.segment.classical`:

- **polarity**: bright or dark particles (pixels beyond 3 noise sigma of the background level
  on either side; with two-sided contrast, e.g. phase-contrast halos, dark particles on a
  bright background are assumed and the choice is flagged as uncertain);
- **size**: particle length and width (px, the extent of each detected region along and
  across its major axis, median over particles, or the area-weighted median over the
  scale-aware detector's regions where that is longer, so thin debris does not shorten it;
  the width is cross-checked against the distance-transform ridge of the thresholded frame,
  which touching particles do not bias);
- **elongation**: median ratio of the major and minor axes of the second moments, and whether an orientation from the particle's
  outline is meaningful (elongation >= :data:`ELONGATED`);
- **density** (particles per 10 000 px^2 and covered area fraction), **SNR** (median particle
  contrast / pixel noise), **drift** (px/frame, phase correlation of consecutive frames) and
  the 95th percentile of the frame-to-frame step of matched particles (px).

It writes ``inspect.json`` with these figures and ``suggested``: the values that settings
left at ``auto`` take (:func:`resolve_settings`, called by every stage's CLI with
``--inspect``). A value the user set always wins; one that contradicts the inspection (a
window smaller than the particles) is kept and warned about.

Bad input (an ``InputError``, one line): no particles (nothing :data:`MIN_SNR` noise sigma
above the background), particles shorter than :data:`MIN_SIZE` px, or longer than a third of
the frame.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

AUTO = "auto"
#: Smallest particle length (px) the tools can measure.
MIN_SIZE = 3.0
#: Largest particle length as a share of the smaller frame side.
MAX_FRACTION = 1 / 3
#: Smallest particle contrast / pixel noise: below it the "particles" are noise peaks.
MIN_SNR = 2.0
#: Elongation (major / minor axis of the second moments) above which an outline gives a meaningful orientation.
ELONGATED = 1.3
#: The scale-aware detector runs at this share of the measured width for elongated particles
#: (its Gaussians, opening, core areas and valley Hessian are in units of its width). At the
#: full width, the local background (1.5 widths) and the valley Hessian blur the narrow bright
#: gaps between rods packed side by side or touching end to end, so touching cells merge.
#: Chosen leave-one-image-out on the three omnipose_rods images (each fold's best share of
#: 0.5-1.0 on the other two: 0.7, 0.8, 0.7); round particles keep the full width, where a
#: smaller one cuts spheres (bulk_water frame 299: 631 -> 694 detections at 0.7).
ROD_WIDTH_SHARE = 0.7
#: Smallest region the detector keeps, as a share of the typical particle area. Pieces below
#: it are debris, stalk pieces and cell tips cut off by a halo (caulo_15: 45-53 px against
#: cells of about 160; ec_5I_t141xy5c1: specks of 30-37 px outside the colony), not
#: particles. Chosen leave-one-image-out on the three omnipose_rods images from 0.25-0.45
#: (each fold's best on the other two: 0.4, 0.4, 0.45; pooled F1 0.857 at 0.25, 0.872 left
#: out, 0.875 at 0.4).
MIN_AREA_SHARE = 0.4

#: What an ``auto`` setting becomes without an inspection (a simulated movie, or a stage run
#: without ``--inspect``): the values the demo was tuned with.
FALLBACKS: dict[str, dict[str, Any]] = {
    "segment": {
        "method": "unet", "invert": False, "train.source": "simulate",
        "classical.min_distance": 3.0, "classical.min_area": 4.0, "classical.max_area": None,
        "classical.background": None, "classical.block": None, "classical.width": None, "locate.diameter": 9,
    },
    "track": {"search_range": 5.0},
    "windows": {"size": 32, "polarity": "both"},
}


# --------------------------------------------------------------------------- settings


def _get(settings: dict[str, Any], dotted: str) -> Any:
    node = settings
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(settings: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = settings
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def contradictions(section: str, settings: dict[str, Any], inspection: dict[str, Any]) -> list[str]:
    """Warnings for values the user set that contradict the inspection (the value is kept)."""
    out = []
    need = inspection.get("minimum", {})
    if (section == "windows" and settings.get("size") not in (None, AUTO) and "windows.size" in need
            and int(settings["size"]) < need["windows.size"]):
            out.append(f"windows.size: {settings['size']} px is smaller than the particles need "
                       f"({need['windows.size']} px = longest particle {inspection['length_p95']:.1f} px plus "
                       f"centring jitter); kept as set, but windows will cut particles")
    if section == "segment" and settings.get("method") == "unet" and _get(settings, "train.source") == "synthetic":
        syn = settings.get("synthetic") or {}
        length, width = syn.get("length"), syn.get("width")
        if length and width and not (0.75 <= length / inspection["length"] <= 1.33
                                     and 0.75 <= width / inspection["width"] <= 1.33):
            out.append(f"segment.train.source: synthetic particles of {length:g} x {width:g} px do not match the "
                       f"inspected {inspection['length']:.1f} x {inspection['width']:.1f} px; the U-Net will look for "
                       f"the wrong size (set segment.synthetic.length/width, or train.source: pseudo)")
    if (section == "segment" and isinstance(settings.get("invert"), bool) and inspection.get("polarity_certain")
            and settings["invert"] != (inspection["polarity"] == "dark")):
            out.append(f"segment.invert: {settings['invert']} but the particles look {inspection['polarity']}; kept as set")
    return out


def resolve_settings(
    section: str, settings: dict[str, Any], inspection: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Give every ``auto`` setting of a section its inspected value (or its fallback).

    Parameters
    ----------
    section : str
        Config section (``segment``, ``track``, ``windows``; others pass through).
    settings : dict
        Validated settings of that section.
    inspection : dict, optional
        The contents of ``inspect.json`` (:func:`inspect_movie`); None = no inspection
        (a simulated movie): the :data:`FALLBACKS` apply.

    Returns
    -------
    settings : dict
        A copy without ``auto`` values.
    notes : list of str
        One line per decision (``key: auto -> value (why)``) and per contradiction
        (``... kept as set``); also logged (decisions at INFO, contradictions as WARNING).
    """
    out = copy.deepcopy(settings)
    notes: list[str] = []
    suggested = (inspection or {}).get("suggested", {}).get(section, {})
    for key, fallback in FALLBACKS.get(section, {}).items():
        if _get(out, key) != AUTO:
            continue
        if inspection is not None and key in suggested:
            value, why = suggested[key], "inspected"
        else:
            value, why = fallback, "default, no inspection"
        _set(out, key, value)
        note = f"{section}.{key}: auto -> {value!r} ({why})"
        notes.append(note)
        log.info("%s", note)
    if inspection is not None:
        for warning in contradictions(section, out, inspection):
            notes.append(warning)
            log.warning("%s", warning)
    return out, notes


def read_inspection(path: str | Path) -> dict[str, Any]:
    """Read ``inspect.json``, checking that it holds the suggested settings."""
    from .io import read_json

    data = read_json(path, what="inspection")
    if not isinstance(data, dict) or not isinstance(data.get("suggested"), dict):
        raise InputError(f"{path}: not an inspection (expected a JSON object with 'suggested'; run rvae-tools inspect)")
    return data


# --------------------------------------------------------------------------- measuring


def _sample_pairs(n: int, pairs: int) -> list[int]:
    """Frame indices: up to ``pairs`` pairs of consecutive frames spread over the movie."""
    if n <= 1:
        return list(range(n))
    starts = np.unique(np.linspace(0, n - 2, min(pairs, n - 1)).round().astype(int))
    return sorted({int(i) for s in starts for i in (s, s + 1)})


def _ridge_width(signal: np.ndarray) -> float:
    """Particle width (px) from the distance transform along the skeleton of the thresholded frame."""
    from scipy import ndimage
    from skimage.morphology import skeletonize

    from .segment.classical import foreground

    fgmap, _ = foreground(signal)
    fg = ndimage.binary_opening(fgmap > 0.5)
    if not fg.any():
        return float("nan")
    dist = ndimage.distance_transform_edt(fg)
    ridge = dist[skeletonize(fg)]
    return float(2 * np.median(ridge) - 1) if ridge.size else float("nan")


def _area_weighted_median(values, area) -> float:
    """The value below which half of the regions' total area lies (``values`` in their units)."""
    v, a = np.asarray(values, np.float64), np.asarray(area, np.float64)
    order = np.argsort(v)
    cum = np.cumsum(a[order])
    return float(v[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _particle_width(det) -> float:
    """Width (px, ellipse minor axis, at least 2) of the regions that hold most of the area.

    Thin debris (stalks, fibrils, texture) breaks into many small regions that outvote the
    particles in a plain median but hold little area; unsplit clumps hold much area in few
    regions. So the typical area is the area-weighted median, regions from 0.3 to 2.5 times
    it are the particles, and their area-weighted median minor axis is the width.
    """
    own = _particles(det)
    return max(_area_weighted_median(own["minor_axis"], own["area"]), 2.0)


def _particles(det):
    """The regions from 0.3 to 2.5 times the area-weighted median area (see :func:`_particle_width`)."""
    typical_area = _area_weighted_median(det["area"], det["area"])
    keep = (det["area"] >= 0.3 * typical_area) & (det["area"] <= 2.5 * typical_area)
    return det[keep] if keep.any() else det


def mean_spot_length(signals: dict[int, np.ndarray], found: dict, *, radius: int = 8, spots: int = 300) -> float:
    """Length (px) of the mean spot: 4 sqrt of the largest second moment of its intensity.

    For a region's outline, ``length`` is the same second-moment length of its pixels (the
    major axis of the ellipse with the region's moments; a disc's diameter, 4 sigma of a
    Gaussian). Averaging the spots (each shifted to its sub-pixel centre, its outer ring taken
    as zero) beats the noise down, so the faint wings a threshold cuts off still count.

    Parameters
    ----------
    signals : dict
        Frame index -> background-flattened frame, particles positive (intensity units).
    found : dict
        Frame index -> that frame's detections (``x``, ``y`` px; ``area`` px^2 picks the
        largest ``spots`` of all frames).
    radius : int
        Half size (px) of the patch averaged around each spot.

    Returns
    -------
    float
        NaN when no detection lies ``radius`` px inside the frame.
    """
    from scipy import ndimage

    patches = []
    for i, det in found.items():
        sig = signals[i]
        h, w = sig.shape
        for y0, x0 in det.nlargest(spots, "area")[["y", "x"]].to_numpy():
            yi, xi = round(y0), round(x0)
            if radius <= yi < h - radius and radius <= xi < w - radius:
                patch = sig[yi - radius:yi + radius + 1, xi - radius:xi + radius + 1]
                patches.append(ndimage.shift(patch, (yi - y0, xi - x0), order=1, mode="nearest"))
    if not patches:
        return float("nan")
    mean = np.mean(patches, axis=0)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    rr = np.hypot(yy, xx)
    mean = mean - np.median(mean[(rr >= radius - 1.5) & (rr <= radius)])
    # Moments within 1.5 lengths of the centre: wide enough for the wings, narrow enough that
    # the residual background of the patch does not dominate; a few rounds settle it.
    reach, length = 3.0, float("nan")
    for _ in range(5):
        wgt = mean * (rr <= reach)
        total = wgt.sum()
        if not total > 0:
            return float("nan")
        cov = np.array([[(wgt * yy * yy).sum(), (wgt * yy * xx).sum()],
                        [(wgt * yy * xx).sum(), (wgt * xx * xx).sum()]]) / total
        length = 4.0 * float(np.sqrt(max(np.linalg.eigvalsh(cov)[-1], 0.0)))
        reach = min(radius - 1.5, max(3.0, 1.5 * length))
    return length


def _displacements(d0, d1, radius: float) -> np.ndarray:
    """Frame-to-frame displacements (dx, dy) px of particles matched one to one within ``radius``."""
    from .segment.metrics import match_points

    if len(d0) == 0 or len(d1) == 0:
        return np.zeros((0, 2))
    a = d0[["x", "y"]].to_numpy()
    b = d1[["x", "y"]].to_numpy()
    ia, ib = match_points(a, b, radius)
    return (b[ib] - a[ia]) if len(ia) else np.zeros((0, 2))


def _spacing(det) -> float:
    from scipy.spatial import cKDTree

    if len(det) < 2:
        return float("nan")
    xy = det[["x", "y"]].to_numpy()
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def inspect_frames(frames: dict[int, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Measure particles in sampled frames.

    Parameters
    ----------
    frames : dict
        Frame index -> frame (y, x), ideally pairs of consecutive frames.

    Returns
    -------
    inspection : dict
        The figures (see the module docstring) and ``suggested`` settings.
    qc : dict
        What the QC figure draws: the first frame, its detections, all lengths and widths.

    Raises
    ------
    InputError
        No particles, particles below :data:`MIN_SIZE` px or above a third of the frame.
    """
    import pandas as pd

    from .segment.classical import classical_frame, flatten_background, noise_sigma, polarity_counts

    if not frames:
        raise InputError("inspect: the movie has no frames")
    order = sorted(frames)
    first = np.asarray(frames[order[0]], np.float64)
    h, w = first.shape
    residuals = {i: flatten_background(frames[i]) for i in order}
    noise = float(np.median([noise_sigma(r) for r in residuals.values()]))
    bright_px = dark_px = 0.0
    for r in residuals.values():
        b, d = polarity_counts(r)
        bright_px, dark_px = bright_px + b, dark_px + d
    if bright_px + dark_px == 0:
        raise InputError("inspect: no particles found (no pixel stands out of the noise in the sampled frames)")
    two_sided = min(bright_px, dark_px) > 0.25 * max(bright_px, dark_px)
    # Two-sided contrast (phase-contrast halos, bright-field rings) is ambiguous by intensity
    # alone; cells and colloids in transmitted light are dark on a bright background.
    dark = True if two_sided else dark_px > bright_px
    certain = not two_sided

    width0 = _ridge_width(-residuals[order[0]] if dark else residuals[order[0]])
    if not np.isfinite(width0):
        raise InputError("inspect: no particles found in the sampled frames")
    settings = {"threshold": "otsu", "background": None, "block": None, "min_area": max(4.0, 0.5 * max(width0, 1) ** 2),
                "max_area": None, "split": True, "split_h": 1.0, "split_area": 1.6,
                "min_distance": max(width0, 2.0), "border_fraction": 0.5, "edge": 0}
    def detect(settings: dict[str, Any]):
        found = {i: classical_frame(frames[i], settings, invert=dark, index=i) for i in order}
        det = pd.concat([d for d in found.values()], ignore_index=True)
        if len(det) == 0:
            raise InputError("inspect: no particles found in the sampled frames")
        # Regions far above the typical area are clumps the watershed did not split; they
        # would inflate the size, so the size comes from the typical ones.
        typical = det[(det["area"] <= 2.5 * det["area"].median()) & (det["area"] >= 0.3 * det["area"].median())]
        return found, det, typical if len(typical) else det

    found, det, typical = detect(settings)
    area = float(typical["area"].median())
    length = float(typical["length"].median())
    width = float(typical["width"].median())
    length_p95 = float(np.percentile(typical["length"], 95))
    size_source = "outline"
    if length < MIN_SIZE:
        # A threshold cuts a blurred spot (a fluorescent bead, a diffraction-limited emitter)
        # near its peak, so its outline is smaller than the spot: measure the mean spot instead.
        signed = {i: -residuals[i] if dark else residuals[i] for i in order}
        spot = mean_spot_length(signed, found)
        if not spot >= MIN_SIZE:
            raise InputError(f"inspect: particles are {max(length, spot if np.isfinite(spot) else 0):.1f} px long, "
                             f"smaller than {MIN_SIZE:g} px; the movie needs a finer pixel size "
                             "(or these are noise, not particles)")
        # Smoothing at the spot's scale separates the spots from the noise peaks the plain
        # threshold also let through (stuck.tif: 864 regions at 1.6 sigma -> 44 beads at 9).
        settings = {**settings, "width": spot}
        found, det, typical = detect(settings)
        area = float(typical["area"].median())
        length = width = length_p95 = spot
        size_source = "spot profile"
    # The scale-aware detector needs the width it measures: start from the plain threshold's
    # typical regions and take the width of the regions the scale-aware detector finds there,
    # once. Those count by their area (see _particle_width): thin debris breaks into many small
    # regions that would outvote the particles in a plain median. Starting from the area-weighted
    # width instead, or iterating further, lets unsplit side-by-side clumps widen it each round.
    scale = max(float(typical["minor_axis"].median()), 2.0)
    try:
        scaled = detect({**settings, "width": scale})[1]
    except InputError:
        scaled = None  # nothing at this scale: keep the plain threshold's
    if scaled is not None:
        scale = _particle_width(scaled)
        # The length too comes from the regions holding most of the area: a plain median over
        # the first regions read the stalk pieces of caulo_15 (7 px against cells of 32 px).
        own = _particles(scaled)
        length = max(length, _area_weighted_median(own["length"], own["area"]))
        length_p95 = max(length_p95, float(np.percentile(own["length"], 95)))
        # And so does the area the detector's area limits follow from: caulo_15's stalk pieces
        # (23 px) set a ceiling of 184 px that dropped every cell (about 250 px).
        area = max(area, _area_weighted_median(own["area"], own["area"]))
    if length > MAX_FRACTION * min(h, w):
        raise InputError(f"inspect: particles are {length:.0f} px long, larger than a third of the {h} x {w} px frame; "
                         "crop less or bin the movie less")
    # From the second moments (one level for both axes), so a round particle reads 1.
    elongation = float((typical["major_axis"] / typical["minor_axis"].clip(lower=0.5)).median())
    signal = np.concatenate([(-residuals[i] if dark else residuals[i])[
        np.clip(found[i]["y"].round().astype(int), 0, h - 1), np.clip(found[i]["x"].round().astype(int), 0, w - 1)]
        for i in order if len(found[i])])
    snr = float(np.median(signal) / noise) if noise > 0 else float("inf")
    if snr < MIN_SNR:
        raise InputError(f"inspect: no particles found (what the detector finds stands only {snr:.1f} noise sigma "
                         f"above the background; particles need at least {MIN_SNR:g})")
    per_frame = float(np.mean([len(found[i]) for i in order]))
    coverage = float(np.mean([found[i]["area"].sum() / (h * w) for i in order]))
    spacing = _spacing(found[order[0]])

    # Drift: the median displacement of matched particles (uniform translation, as trackpy's
    # compute_drift); steps: what is left of each particle's displacement after it.
    moves = []
    for a, b in itertools.pairwise(order):
        if b == a + 1:
            radius = 0.5 * spacing if np.isfinite(spacing) else width
            moves.append(_displacements(found[a], found[b], radius))
    moves = np.concatenate(moves) if moves else np.zeros((0, 2))
    drift = np.median(moves, axis=0) if len(moves) >= 5 else np.array([np.nan, np.nan])
    step_p95 = float(np.percentile(np.hypot(*(moves - drift).T), 95)) if len(moves) >= 5 else float("nan")

    # Settings that follow from these figures.
    jitter = 4.0  # px of centring error either way that a window still holds the particle with
    need = int(2 * math.ceil((length_p95 + 2 * jitter) / 2))
    size = max(16, need)
    if np.isfinite(step_p95):
        search = max(2.0, 2.0 * step_p95 + float(np.hypot(*drift)))
    else:
        search = max(2.0, 0.5 * width)
    if np.isfinite(spacing):
        search = min(search, max(2.0, 0.5 * spacing))
    diameter = int(2 * math.floor(max(width, 3.0) / 2) + 1)
    suggested = {
        "segment": {
            "method": "classical", "invert": bool(dark), "train.source": "pseudo",
            # Relief smoothing of half a width: a whole width would blur the neck between touching ends.
            "classical.min_distance": round(max(2.0, 0.5 * width), 2),
            "classical.min_area": round(max(4.0, MIN_AREA_SHARE * area), 1),
            "classical.max_area": round(8.0 * area, 1),
            # A background scale several particle lengths wide never eats a particle.
            "classical.background": round(4.0 * length_p95, 1),
            "classical.block": round(6.0 * length_p95, 1),
            "classical.width": round(scale * (ROD_WIDTH_SHARE if elongation >= ELONGATED else 1.0), 2),
            "locate.diameter": diameter + (2 if diameter < length else 0),
        },
        "track": {"search_range": round(search, 2)},
        "windows": {"size": int(size), "polarity": "dark" if dark else "bright"},
    }
    inspection = {
        "frame_shape": [int(h), int(w)], "frames_sampled": [int(i) for i in order],
        "polarity": "dark" if dark else "bright", "polarity_certain": bool(certain),
        "polarity_pixels": {"bright": bright_px, "dark": dark_px},
        "length": length, "width": width, "length_p95": length_p95, "width_ridge": width0, "width_scale": scale,
        "size_source": size_source,
        "elongation": elongation, "orientation_meaningful": bool(elongation >= ELONGATED),
        "particles_per_frame": per_frame, "density_per_10k_px2": per_frame / (h * w) * 1e4,
        "coverage": coverage, "spacing": spacing, "snr": snr, "noise": noise,
        "drift": [float(drift[0]), float(drift[1])], "step_p95": step_p95,
        "minimum": {"windows.size": int(need)},
        "suggested": suggested,
    }
    qc = {"frame": first, "detections": found[order[0]], "all": det, "dark": dark}
    return inspection, qc


def suggested_yaml(inspection: dict[str, Any]) -> str:
    """The suggested settings as a config block (YAML), with the figures they follow from."""
    import yaml

    nested: dict[str, Any] = {}
    for section, values in inspection["suggested"].items():
        block = nested.setdefault(section, {})
        for key, value in values.items():
            _set(block, key, value)
    polarity = inspection["polarity"] + ("" if inspection["polarity_certain"]
                                         else " (uncertain: two-sided contrast; set segment.invert)")
    shape = "orientation meaningful" if inspection["orientation_meaningful"] else "round: outlines give no orientation"
    dx, dy = inspection["drift"]
    head = "".join(f"# {line}\n" for line in (
        f"rvae-tools inspect: {polarity} particles",
        f"size {inspection['length']:.1f} x {inspection['width']:.1f} px (longest {inspection['length_p95']:.1f} px)",
        f"elongation {inspection['elongation']:.2f} ({shape})",
        f"{inspection['particles_per_frame']:.0f} particles per frame, SNR {inspection['snr']:.1f}",
        (f"drift ({dx:.2f}, {dy:.2f}) px/frame, 95 % of steps below {inspection['step_p95']:.2f} px"
         if np.isfinite(inspection["step_p95"]) else "drift and motion not measured (no consecutive frames)"),
    ))
    return head + yaml.safe_dump(nested, sort_keys=True, default_flow_style=False)


def _read_frames(path: Path, pairs: int) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Sampled frames of a movie.zarr (from ingest) or of any movie file ingest reads."""
    if path.suffix == ".zarr" or (path.is_dir() and (path / "zarr.json").exists()):
        from .io import open_zarr

        ds = open_zarr(path, required=["image"], what="movie store")
        image = ds["image"]
        if image.ndim != 3:
            raise InputError(f"{path}: image has dims {image.dims}; expected (frame, y, x)")
        picks = _sample_pairs(image.shape[0], pairs)
        return {i: np.asarray(image[i].values, np.float64) for i in picks}, dict(ds.attrs)
    from .ingest import iter_frames, read_movie_info

    info = read_movie_info(path)
    picks = set(_sample_pairs(int(info["shape"][0]), pairs))
    frames = {}
    for i, frame in enumerate(iter_frames(path)):
        if i in picks:
            frames[i] = np.asarray(frame, np.float64)
        if len(frames) == len(picks):
            break
    return frames, info


def inspect_movie(path: str | Path, *, pairs: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inspect a movie file or ``movie.zarr``: :func:`inspect_frames` on ``pairs`` frame pairs."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: movie not found")
    frames, meta = _read_frames(path, pairs)
    try:
        inspection, qc = inspect_frames(frames)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    inspection["movie"] = str(path)
    for key in ("pixel_size", "pixel_unit", "frame_interval"):
        if key in meta:
            inspection[key] = meta[key]
    return inspection, qc


# --------------------------------------------------------------------------- figure


def qc_figure(inspection: dict[str, Any], qc: dict[str, Any], notes: list[str] | None = None):
    """Frame with detected particles, size and orientation histograms, and the decisions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    fig, axes = plt.subplots(1, 3, figsize=(15, 5), gridspec_kw={"width_ratios": [1.3, 1, 1.2]})
    ax = axes[0]
    ax.imshow(qc["frame"], cmap="gray")
    for row in qc["detections"].itertuples():
        ax.add_patch(Ellipse((row.x, row.y), row.length, row.width, angle=np.degrees(row.orientation),
                             fill=False, color="tab:orange", lw=0.8))
    ax.set_title(f"frame {inspection['frames_sampled'][0]}: {len(qc['detections'])} particles "
                 f"({inspection['polarity']})")
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    ax = axes[1]
    det = qc["all"]
    top = float(np.percentile(det["length"], 99)) + 2
    bins = np.linspace(0, top, 40)
    ax.hist(det["length"], bins=bins, alpha=0.6, label=f"length (median {inspection['length']:.1f} px)")
    ax.hist(det["width"], bins=bins, alpha=0.6, label=f"width (median {inspection['width']:.1f} px)")
    ax.axvline(inspection["suggested"]["windows"]["size"], color="k", ls="--", label="suggested window")
    ax.set_xlabel("px")
    ax.set_ylabel("particles")
    ax.legend(fontsize=8)
    ax.set_title(f"elongation {inspection['elongation']:.2f}, SNR {inspection['snr']:.1f}")
    ax = axes[2]
    ax.axis("off")
    text = suggested_yaml(inspection)
    if notes:
        text += "\n# decisions and warnings:\n" + "\n".join(f"# {n}" for n in notes)
    ax.text(0, 1, text, va="top", ha="left", family="monospace", fontsize=7, transform=ax.transAxes)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("movie", help="a movie file or folder (any format ingest reads) or a movie.zarr")
    parser.add_argument("-o", "--output", help="inspect.json to write (default: print the suggested config only)")
    parser.add_argument("--figure", help="QC figure to write (.png or .svg)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of consecutive frames to sample (default 3)")
    parser.add_argument("--settings", metavar="JSON",
                        help="the movie's segment/track/windows sections as one JSON object (as the workflow "
                             "passes them): the decisions and contradictions are recorded too")


def run(args: argparse.Namespace) -> int:
    import json

    from .config import validate_section
    from .io import atomic_output, write_json
    from .provenance import provenance_attrs

    inspection, qc = inspect_movie(args.movie, pairs=args.pairs)
    notes: list[str] = []
    if args.settings:
        try:
            given = json.loads(args.settings)
        except json.JSONDecodeError as exc:
            raise InputError(f"--settings: not valid JSON ({exc})") from None
        if not isinstance(given, dict):
            raise InputError("--settings: expected a JSON object of sections (segment, track, windows)")
        for section in ("segment", "track", "windows"):
            if section in given:
                settings = validate_section(section, given[section], source="--settings")
                notes += resolve_settings(section, settings, inspection)[1]
    inspection["decisions"] = notes
    inspection.update(provenance_attrs(stage="inspect", inputs={"movie": str(args.movie)}))
    if args.output:
        write_json(inspection, args.output)
    if args.figure:
        fig = qc_figure(inspection, qc, notes)
        suffix = Path(args.figure).suffix or ".png"
        with atomic_output(args.figure) as tmp:
            fig.savefig(tmp, format=suffix.lstrip("."), dpi=110)
    # Printed last: a reader that closes the pipe early (| head) must not cost the outputs.
    print(suggested_yaml(inspection), end="")
    return 0


COMMANDS = {"inspect": (configure_parser, run)}

#!/usr/bin/env python
"""Coverage of the rVAE's per-window intervals (angle, dx, dy) on simulated windows with known truth.

Two simulated movies (two species: a 2-fold rod and a 1-fold tadpole, uniformly random
orientations), the second made another way (:data:`OTHER_MOVIE`: another seed, an ordering
transition a third of the way in, noisier frames), go through the detector as a user's movie
would (``rvae_tools.segment`` with every setting at ``auto``, as ``bench/realdata.py`` runs it);
each detection is paired with the nearest true particle (one to one, within 3 px; unpaired
detections have no truth and are counted, not scored) and its window is cut at the DETECTED
position, so the shift to be found is the detector's own error. The rVAE is trained (default
settings) on 75 % of movie 1's windows.

Spreads scored (on the half of movie 2 that nothing was fitted on):

* ``uncalibrated``: the model's own (rotation posterior plus the likelihood's curvature);
* ``self_consistency``: what ``encode`` reports (``rvae_tools.rvae.uncertainty.fit_calibration``:
  windows rotated and moved by known amounts, no truth), fitted on the other half of movie 2,
  as encode fits it on the movie's own windows;
* ``self_consistency_plus_truth_map`` (the target): those spreads, then a per-species quantile
  map fitted on movie 1's held-out windows against their truth
  (``fit_error_calibration``: scale, floor and the degrees of freedom of a Student t, and
  ``flip_prob`` Platt-scaled to the observed wrong ends): what a window and its transformed
  copy share (a template that fits the particle a little turned or off-centre) is invisible to
  the pairs, and the errors are a mixture of small and occasional large ones, which no normal
  spread covers at both 68 % and 95 %;
* ``truth_map_alone``: the quantile map fitted on the model's own spreads of movie 1 (it cannot
  follow movie 2's noisier frames: the self-consistency step does).

Truth: the true angle (``truth.parquet``) and the true shift = true position - window centre
(the detection; px). The model's angle (plus encode's per-window shape correction for the
two-fold rod) has an arbitrary origin and sense relative to the truth (its canonical template
is learned), so per species the sense s = +/-1 and one constant offset are fitted first (on
movie 1's held-out windows), as the lab-frame calibration does; so is the template's centre in
the particle's frame (a polar template's need not be the simulator's position; :func:`centre_offset`).

The c-interval (c = 0.68, 0.95) of a 1-fold species is the highest-density set of mass c of
the two-branch posterior ``(1 - flip_prob) T(angle, angle_sd) + flip_prob T(angle + pi, angle_sd)``
(``rvae_tools.rvae.uncertainty.angle_inside``; T a Student t of ``angle_dof`` degrees of
freedom, a normal without), so it holds the other end once ``flip_prob`` is large enough; for
an n-fold species it is ``angle +/- k angle_sd`` (k = ``interval_factor(c, dof)``, the normal
quantile without a dof) with the error counted modulo 2 pi / n. ``dx +/- k dx_sd`` likewise.
Printed per species and interval: the fraction of scored windows whose truth is inside; for the
1-fold species also the observed flip rate against the mean ``flip_prob``; z (no truth): the
share of windows whose z moved under a known rotation and shift by less than its interval. The
last line is one JSON object with every figure.

Before any coverage, per species: its decoded template's anisotropy (``rvae_tools.species.anisotropy``,
no truth) and the consistency of the aligned angles with the truth (:func:`consistency`, at n and
2 n). They tell what an "observed flip rate" is: a polar species whose angles are right but for a
share f on the wrong end has consistency 1 - 2 f at n = 1 and near 1 at n = 2; a model that has not
learned the species' orientation has a low consistency at both. Measured (``--frames 30 --epochs
15 --threads 1``, movie 1 held out): rod anisotropy 0.275, consistency 0.988 (n = 2); tadpole
anisotropy 0.044 (ISOTROPY is 0.03: its template is a nearly round blob), consistency 0.25 (n = 1)
and 0.40 (n = 2), so its 0.27 "flip rate" is not a wrong end of a good angle (the simulator's
tadpole, an isosceles triangle 13 x 9 px, is plainly polar) but errors spread over the circle
(median 49 degrees): at that training size the model has not learned the tadpole's orientation,
and a self-consistency calibration cannot see it (the window and its rotated copy share the
template that decides the angle).

    python bench/uncertainty.py                   # default run (~10-15 min on 2 cores)
    python bench/uncertainty.py --frames 10 --epochs 3   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import norm

from rvae_tools.rvae.uncertainty import angle_inside, interval_factor

LEVELS = (0.68, 0.95)


def detected_windows(
    frames: int, particles: int, size: int, seed: int, overrides: dict | None = None
) -> dict:
    """Windows cut at the detector's positions in a simulated movie, with the paired truth.

    ``overrides``: ``simulate`` settings of the movie (default: no transition).

    Returns the windows (normalised as ``bench/rvae.py``'s: movie percentiles 1 and 99.9 to 0
    and 1), the true class, angle and shift (true position - window centre, px) of each, the
    species' names and symmetry orders, and the detection counts.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from realdata import detect_as_user

    from rvae_tools.config import validate_section
    from rvae_tools.segment.metrics import match_points
    from rvae_tools.simulate import simulate
    from rvae_tools.windows import cut_windows, inside_frame

    settings = validate_section(
        "simulate",
        {
            "frames": frames,
            "n_particles": particles,
            "transition": {"frame": None},
            **(overrides or {}),
        },
    )
    settings["seed"] = seed
    sim = simulate(settings)
    truth = sim.truth
    _, det = detect_as_user({i: sim.movie[i] for i in range(sim.movie.shape[0])})
    true_xy = truth[["x", "y"]].to_numpy()
    wins, rows, centres = [], [], []
    n_edge = 0
    for f in range(sim.movie.shape[0]):
        here = np.nonzero(truth["frame"].to_numpy() == f)[0]
        found = det[det["frame"] == f]
        ti, di = match_points(true_xy[here], found[["x", "y"]].to_numpy(), 3.0)
        cx, cy = found["x"].to_numpy()[di], found["y"].to_numpy()[di]
        keep = inside_frame(cx, cy, size, sim.movie.shape[1:])
        n_edge += int((~keep).sum())
        wins.append(cut_windows(sim.movie[f], cx[keep], cy[keep], size))
        rows.append(here[ti[keep]])
        centres.append(np.stack([cx[keep], cy[keep]], 1))
    rows = np.concatenate(rows)
    x = np.concatenate(wins)
    lo, hi = np.percentile(sim.movie, [1.0, 99.9])
    species = sim.metadata["species"]
    return {
        "windows": ((x - lo) / (hi - lo)).astype(np.float32),
        "cls": truth["cls"].to_numpy()[rows],
        "angle": truth["angle"].to_numpy()[rows],
        "shift": true_xy[rows] - np.concatenate(centres),
        "symmetry": [int(s["symmetry"]) for s in species],
        "names": [s["name"] for s in species],
        "n_true": len(truth),
        "n_detected": len(det),
        "n_paired": len(rows) + n_edge,
        "n_at_edge": n_edge,
    }


def wrap(a: np.ndarray, period: float) -> np.ndarray:
    return np.remainder(a + period / 2, period) - period / 2


def align(true: np.ndarray, enc: np.ndarray, n: int) -> tuple[int, float]:
    """Sense s and offset o with true ~ s * enc + o (modulo 2 pi / n)."""
    best = max((abs(np.mean(np.exp(1j * n * (true - s * enc)))), s) for s in (1, -1))
    s = best[1]
    return s, float(np.angle(np.mean(np.exp(1j * n * (true - s * enc)))) / n)


def consistency(true: np.ndarray, enc: np.ndarray, sense: int, offset: float, n: int) -> float:
    """Resultant ``|mean exp(i n (true - sense enc - offset))|`` in [0, 1] of the aligned angles (1 = every angle right).

    Tells a wrong end from an angle that is not learned: a polar species whose windows are right
    but for a share f on the wrong end has a resultant 1 - 2 f at n = 1 and about 1 at n = 2; a
    model that has not learned the species' orientation (its template nearly round) has a low
    resultant at both, and its "flip rate" is only the share of errors beyond 90 degrees.
    """
    n = max(int(n), 1)
    return float(np.abs(np.mean(np.exp(1j * n * (true - sense * enc - offset)))))


def lab_angles(model, data: dict, enc: dict, zmean: dict[int, np.ndarray]) -> np.ndarray:
    """Raw angle plus the per-window shape correction encode adds for two-fold species (rad).

    ``zmean``: each species' mean z (of movie 1's training windows), the species template.
    """
    from rvae_tools.calibration import shape_correction

    angle = np.asarray(enc["angle"], float).copy()
    for k, n in enumerate(data["symmetry"]):
        rows = data["cls"] == k
        if n == 2 and rows.any():
            angle[rows] += shape_correction(model, enc["z"][rows], zmean[k])
    return angle


def lab_shift_of_centre(
    angle: np.ndarray, sense: int, offset: float, centre: np.ndarray
) -> np.ndarray:
    """(windows, 2) px: the body-frame point ``centre`` turned by each window's reported lab angle."""
    lab = sense * angle + offset
    c, s = np.cos(lab), np.sin(lab)
    return np.stack([c * centre[0] - s * centre[1], s * centre[0] + c * centre[1]], 1)


def centre_offset(
    data: dict, enc: dict, angle: np.ndarray, rows: np.ndarray, sense: int, offset: float
) -> np.ndarray:
    """Mean of ``true shift - reported shift`` in each window's body frame (px, (along, across) the reported angle).

    The model's template centre is as arbitrary as its angle's origin: for a polar particle it
    need not be the point the simulator calls the particle's position (the tadpole's lies
    about 0.3 px along its axis), so, like the angle's offset, it is fitted once per species.
    """
    lab = sense * angle[rows] + offset
    miss = data["shift"][rows] - np.stack([enc["dx"][rows], enc["dy"][rows]], 1)
    c, s = np.cos(lab), np.sin(lab)
    return np.array(
        [np.mean(c * miss[:, 0] + s * miss[:, 1]), np.mean(-s * miss[:, 0] + c * miss[:, 1])]
    )


def errors(
    data: dict,
    enc: dict,
    angle: np.ndarray,
    rows: np.ndarray,
    sense: int,
    offset: float,
    n: int,
    centre: np.ndarray | None = None,
) -> dict:
    """True minus reported angle (rad, modulo 2 pi / n, in the frame of the reported angle) and shift (px).

    ``centre``: the species' template centre in the body frame (:func:`centre_offset`), moved
    by the reported angle and taken off the shift's error.
    """
    moved = (
        np.zeros((len(rows), 2))
        if centre is None
        else lab_shift_of_centre(angle[rows], sense, offset, centre)
    )
    return {
        "angle": wrap(sense * (data["angle"][rows] - offset) - angle[rows], 2 * np.pi / max(n, 1)),
        "dx": data["shift"][rows, 0] - enc["dx"][rows] - moved[:, 0],
        "dy": data["shift"][rows, 1] - enc["dy"][rows] - moved[:, 1],
    }


def coverage(err: dict, enc: dict, n: int) -> dict[str, float]:
    """Share of windows whose truth lies in the reported 68 % and 95 % intervals, and error figures.

    Angle: the two-branch interval of :func:`angle_inside` for a species whose ends differ
    (``flip_prob``), else ``angle +/- k angle_sd`` modulo 2 pi / n; shift ``dx +/- k dx_sd``;
    k = ``interval_factor(c, dof)`` with the calibration's degrees of freedom (a normal without).
    """
    out: dict[str, float] = {}
    inf = np.full(len(err["angle"]), np.inf)
    for c in LEVELS:
        out[f"angle_coverage_{int(c * 100)}"] = float(
            angle_inside(
                err["angle"],
                enc["angle_sd"],
                enc["flip_prob"] if n % 2 == 1 else None,
                c,
                enc.get("angle_dof", inf),
            ).mean()
        )
        for axis in ("dx", "dy"):
            k = interval_factor(c, enc.get(f"{axis}_dof", inf))
            out[f"{axis}_coverage_{int(c * 100)}"] = float(
                (np.abs(err[axis]) <= k * enc[f"{axis}_sd"]).mean()
            )
    out["angle_median_abs_error_deg"] = float(np.degrees(np.median(np.abs(err["angle"]))))
    out["angle_median_sd_deg"] = float(np.degrees(np.median(enc["angle_sd"])))
    out["shift_median_abs_error_px"] = float(
        np.median(np.abs(np.concatenate([err["dx"], err["dy"]])))
    )
    out["shift_median_sd_px"] = float(np.median(np.concatenate([enc["dx_sd"], enc["dy_sd"]])))
    if n % 2 == 1:
        out["mean_flip_prob"] = float(np.nanmean(enc["flip_prob"]))
        out["observed_flip_rate"] = float(np.mean(np.abs(err["angle"]) > np.pi / 2))
    return out


def z_pair_coverage(
    encode,
    windows: np.ndarray,
    cls: np.ndarray,
    names: list[str],
    calibration: dict | None,
    seed: int,
) -> dict[str, float]:
    """Share of held-out windows whose z moved, under a known rotation and shift, by less than its interval.

    z has no truth, but a rotated and moved copy of a window shows the same particle, so its z
    must not change: the miss ``z_b - z_a`` has the variance ``z_sd_a^2 + z_sd_b^2``. The
    transforms are drawn afresh (``seed``), not those of the calibration.
    """
    from rvae_tools.rvae.uncertainty import apply_calibration, transform_windows

    rng = np.random.default_rng(seed)
    phi = rng.uniform(-np.pi, np.pi, len(windows))
    delta = rng.uniform(-1.0, 1.0, (len(windows), 2))
    a, b = encode(windows), encode(transform_windows(windows, phi, delta))
    out = {}
    for k, name in enumerate(names):
        rows = cls == k
        if rows.sum() < 5:
            continue
        ea = {n: v[rows] for n, v in a.items()}
        eb = {n: v[rows] for n, v in b.items()}
        if calibration and name in calibration:
            ea, eb = (
                apply_calibration(ea, calibration[name]),
                apply_calibration(eb, calibration[name]),
            )
        spread = np.sqrt(ea["z_sd"] ** 2 + eb["z_sd"] ** 2)
        for c in LEVELS:
            out[f"z_pair_coverage_{int(c * 100)}_{name}"] = float(
                (np.abs(eb["z"] - ea["z"]) <= norm.ppf(0.5 + c / 2) * spread).mean()
            )
    return out


#: The second movie, made another way: another seed, an ordering transition a third of the way
#: in (the first has none) and noisier frames (SNR 4 instead of 5).
OTHER_MOVIE = {"transition": {"frame": None, "width": 3.0}, "noise": {"snr": 4.0}}


def calibrated(enc: dict, cls: np.ndarray, names: list[str], calibration: dict) -> dict:
    """``enc`` with each species' windows calibrated by its own fit."""
    from rvae_tools.rvae.uncertainty import apply_calibration

    out = {name: np.array(value, copy=True) for name, value in enc.items()}
    for k, name in enumerate(names):
        rows = cls == k
        if name not in calibration or not rows.any():
            continue
        for key, value in apply_calibration(
            {n: v[rows] for n, v in enc.items()}, calibration[name]
        ).items():
            if key not in out:
                out[key] = np.full(len(cls), np.inf, dtype=np.float32)
            out[key][rows] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--frames", type=int, default=40, help="simulated frames of each movie (default 40)"
    )
    parser.add_argument("--particles", type=int, default=80, help="particles in view (default 80)")
    parser.add_argument("--window", type=int, default=32, help="window side, px (default 32)")
    parser.add_argument(
        "--epochs", type=int, default=15, help="training epochs (default 15, the config default)"
    )
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=512,
        help="training windows the self-consistency calibration is fitted on (default 512, the config default)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help="encode methods, comma-separated (default: the config's encode_method and refine_angle; "
        "exact, fast, encoder, each optionally +refine (angle refined continuously) or +grid (not))",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint to reuse: loaded when it exists, else trained and saved there (default: train)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch

    from rvae_tools.rvae import RVAE
    from rvae_tools.rvae.trainer import split_indices
    from rvae_tools.rvae.uncertainty import fit_calibration, fit_error_calibration
    from rvae_tools.species import anisotropy, species_templates

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    first = detected_windows(args.frames, args.particles, args.window, args.seed)
    other = dict(OTHER_MOVIE, transition={**OTHER_MOVIE["transition"], "frame": args.frames // 3})
    second = detected_windows(args.frames, args.particles, args.window, args.seed + 1, other)
    x = first["windows"]
    train, held = split_indices(len(x), 0.75, args.seed)
    for label, data in (("movie 1", first), ("movie 2", second)):
        print(
            f"{label}: {data['n_detected']} detections of {data['n_true']} true particles, {data['n_paired']} paired "
            f"({data['n_at_edge']} too close to the edge for a window); {len(data['windows'])} windows at the "
            f"detected positions",
            flush=True,
        )
    print(
        f"movie 1: {len(train)} windows trained on, {len(held)} held out; data in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    if args.model and Path(args.model).exists():
        model = RVAE.load(args.model)
    else:
        model = RVAE(x.shape[1], latent_dim=2, seed=args.seed)
        model.fit(x[train], epochs=args.epochs, device="cpu", progress=False)
        if args.model:
            model.save(args.model)
    figures: dict = {
        "n_windows_movie1": len(x),
        "n_held_out_movie1": len(held),
        "n_windows_movie2": len(second["windows"]),
        "epochs": args.epochs,
        "movie2": other,
    }
    names, symmetry = first["names"], first["symmetry"]
    ok = True
    rng = np.random.default_rng(args.seed)
    # Per species, as encode calibrates (the species here are the true classes: species
    # assignment has its own benchmark), on training windows of that species only.
    cal_idx = {
        k: np.sort(rng.choice(rows, size=min(args.calibration_windows, len(rows)), replace=False))
        for k in range(len(names))
        if len(rows := train[first["cls"][train] == k])
    }
    # Movie 2: half its windows calibrate (self-consistency needs no truth, so encode fits it on
    # the movie's own windows), the other half is scored.
    cal2, score2 = split_indices(len(second["windows"]), 0.5, args.seed + 1)
    cal2_idx = {
        k: np.sort(rng.choice(rows, size=min(args.calibration_windows, len(rows)), replace=False))
        for k in range(len(names))
        if len(rows := cal2[second["cls"][cal2] == k])
    }
    pair_idx = score2[rng.permutation(len(score2))[:256]]
    from rvae_tools.config import validate_section

    defaults = validate_section("rvae", {})
    methods = args.methods or defaults["encode_method"] + (
        "+refine" if defaults["refine_angle"] else "+grid"
    )
    for method in [m.strip() for m in methods.split(",") if m.strip()]:
        how, _, variant = method.partition("+")
        refine = defaults["refine_angle"] if not variant else variant == "refine"

        def encode(w, how=how, refine=refine):
            return model.encode(w, device="cpu", method=how, refine=refine)

        def reconstruct(w):
            return model.reconstruct(w, device="cpu")

        # Refined angles are calibrated on copies with fresh noise (as encode calibrates them).
        if not (refine and how != "encoder"):
            reconstruct = None

        t1 = time.perf_counter()
        self1 = {
            names[k]: fit_calibration(
                encode,
                x[rows],
                seed=args.seed,
                flip=symmetry[k] % 2 == 1,
                reconstruct=reconstruct,
                order=symmetry[k],
            )
            for k, rows in cal_idx.items()
        }
        self2 = {
            names[k]: fit_calibration(
                encode,
                second["windows"][rows],
                seed=args.seed,
                flip=symmetry[k] % 2 == 1,
                reconstruct=reconstruct,
                order=symmetry[k],
            )
            for k, rows in cal2_idx.items()
        }
        figures[f"{method}_calibration_seconds"] = time.perf_counter() - t1
        enc1, enc2 = encode(x), encode(second["windows"])
        zmean = {
            k: np.mean(enc1["z"][train[first["cls"][train] == k]], axis=0)
            for k in range(len(names))
        }
        ang1, ang2 = lab_angles(model, first, enc1, zmean), lab_angles(model, second, enc2, zmean)
        self_enc1 = calibrated(enc1, first["cls"], names, self1)
        # The correction fitted on known errors: movie 1's held-out windows (never trained on),
        # on top of their self-consistency spreads, for what a window and its transformed copy
        # share and the pairs cannot see.
        truth_map, aligned, centres = {}, {}, {}
        for k, (name, n) in enumerate(zip(names, symmetry)):
            rows = held[first["cls"][held] == k]
            if len(rows) < 10:
                continue
            aligned[k] = align(first["angle"][rows], ang1[rows], n)
            tpl = species_templates(model, zmean[k][None])[0]
            figures[f"{method}_template_anisotropy_{name}"] = float(anisotropy(tpl))
            for m in sorted({max(n, 1), 2 * max(n, 1)}):
                figures[f"{method}_movie1_angle_consistency_n{m}_{name}"] = consistency(
                    first["angle"][rows], ang1[rows], *aligned[k], m
                )
            print(
                f"  {name}: template anisotropy {anisotropy(tpl):.3f} (truth-free); aligned angle consistency "
                + ", ".join(
                    f"n={m} {figures[f'{method}_movie1_angle_consistency_n{m}_{name}']:.3f}"
                    for m in sorted({max(n, 1), 2 * max(n, 1)})
                )
                + " (movie 1 held out; 1 = every angle right, 1 - 2 f at n = 1 for a share f on the wrong end)"
            )
            centres[k] = centre_offset(first, enc1, ang1, rows, *aligned[k])
            err = errors(first, enc1, ang1, rows, *aligned[k], n, centres[k])
            truth_map[name] = fit_error_calibration(
                err, {key: v[rows] for key, v in self_enc1.items()}, n
            )
        self_enc2 = calibrated(enc2, second["cls"], names, self2)
        scored = {
            "uncalibrated": enc2,
            "self_consistency": self_enc2,
            "self_consistency_plus_truth_map": calibrated(
                self_enc2, second["cls"], names, truth_map
            ),
            "truth_map_alone": calibrated(
                enc2,
                second["cls"],
                names,
                {
                    name: fit_error_calibration(
                        errors(
                            first,
                            enc1,
                            ang1,
                            rows := held[first["cls"][held] == k],
                            *aligned[k],
                            n,
                            centres[k],
                        ),
                        {key: v[rows] for key, v in enc1.items()},
                        n,
                    )
                    for k, (name, n) in enumerate(zip(names, symmetry))
                    if k in aligned
                },
            ),
        }
        for label, enc in scored.items():
            print(
                f"--- encode_method {method}, {label} spreads, scored on movie 2's scored half "
                f"({len(score2)} windows; never trained or calibrated on)"
            )
            for k, (name, n) in enumerate(zip(names, symmetry)):
                rows = score2[second["cls"][score2] == k]
                if k not in aligned or len(rows) < 10:
                    continue
                cov = coverage(
                    errors(second, enc2, ang2, rows, *aligned[k], n, centres[k]),
                    {key: v[rows] for key, v in enc.items()},
                    n,
                )
                for key, value in cov.items():
                    print(f"  {key + '_' + name:44s} {value:.4g}", flush=True)
                    figures[f"{method}_{label}_movie2_{key}_{name}"] = value
                    if label == "self_consistency_plus_truth_map" and "_coverage_" in key:
                        ok &= abs(value - int(key.split("_coverage_")[1]) / 100) <= 0.05
        print(
            f"--- encode_method {method}, self_consistency spreads (movie 1's own), scored on movie 1's held-out windows"
        )
        for k, (name, n) in enumerate(zip(names, symmetry)):
            rows = held[first["cls"][held] == k]
            if k in aligned:
                cov = coverage(
                    errors(first, enc1, ang1, rows, *aligned[k], n, centres[k]),
                    {key: v[rows] for key, v in self_enc1.items()},
                    n,
                )
                for key, value in cov.items():
                    if "_coverage_" in key:
                        print(f"  {key + '_' + name:44s} {value:.4g}", flush=True)
                        figures[f"{method}_self_consistency_movie1_held_out_{key}_{name}"] = value
        zc = z_pair_coverage(
            encode,
            second["windows"][pair_idx],
            second["cls"][pair_idx],
            names,
            self2,
            args.seed + 1,
        )
        for key, value in zc.items():
            print(f"  {key:44s} {value:.4g} (movie 2, self-consistency z_sd)")
            figures[f"{method}_self_consistency_movie2_{key}"] = value
        for label, cal in (
            ("self-consistency, movie 2", self2),
            ("truth map (movie 1 held out)", truth_map),
        ):
            print(f"  {label}: {json.dumps(cal)}")
        figures[f"{method}_self_consistency_movie2_calibration"] = self2
        figures[f"{method}_truth_map"] = truth_map
    figures["coverage_within_5_points"] = bool(ok)
    figures["wall_seconds"] = time.perf_counter() - t0
    print(
        "--- target (every coverage on movie 2 with self-consistency plus truth map within 5 points of nominal): "
        f"{'yes' if ok else 'no'}"
    )
    print(json.dumps(figures, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the dynamics stage on simulated movies with known truth, and the coverage of its interval.

Chain measured (the dynamics stage alone): truth angles and positions of a simulated movie
-> latents in the ``latents.zarr`` layout (angles with Gaussian noise of sd ``--angle-noise``,
reported as ``angle_sd``, a random constant offset and sign flip, as an rVAE gives them;
content latents that separate the species) -> ``compute_dynamics`` -> transition frame and
its 95 % interval. Not measured here: segmentation, tracking and the rVAE encoder (their own
benchmarks), so the coverage is that of the dynamics stage given calibrated angle spreads.

Movies:

* the simulator (AFM on mica: substrate field ramp plus neighbour alignment), analysed with the
  demo's dynamics settings (``registry_order: 6``, ``transition_model: saturating``):
  ``demo`` (transition at frame 30, ramp width 3), ``sharp_late`` (40, 1.5), ``broad_early``
  (22, 6), ``quench`` (40, 1; reported, not a target: kinetic lag), ``free`` (no transition);
* ``switching``: other physics, analysed with the default settings (logistic model, S_n of
  the species' own symmetry, no substrate): polar particles switch one by one, at times
  drawn from a logistic distribution around t_c, from free rotation to a common direction
  (no substrate directions, no equilibrium response);
* ``neighbour``: the simulator with other physics (no substrate, a neighbour alignment reaching
  every particle), analysed with the defaults, scored against the midpoint of the true angles'
  own S_n (ordering starts when the ramped coupling passes its critical value, after the ramp's
  midpoint);
* ``static``: a static sample (fixed random orientations plus noise), defaults: no transition.

Coverage: the fraction of repeated movies (different seeds) whose 95 % interval holds the true
transition frame, for ``switching`` (``--coverage-switching`` seeds, defaults), for the
simulator's demo physics (``--coverage-demo`` seeds, demo settings) and for the demo physics
with encoder-like angle errors (``--coverage-encoder`` seeds: a mixture of small errors and
occasional large ones, and polar particles on the wrong end, as ``bench/uncertainty.py``
measures them for the rVAE; reported as their sd and ``flip_prob``). Target >= 0.90.
``--only-coverage`` runs the coverage runs alone.

Run: ``python bench/dynamics.py`` (about 3 minutes on 2 cores; ``--quick`` for fewer seeds).
The last line is one JSON object with every figure printed.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import xarray as xr

from rvae_tools.config import validate_section
from rvae_tools.dynamics import compute_dynamics, fit_logistic
from rvae_tools.simulate import simulate

MOVIES = {
    "demo": {},
    "sharp_late": {"transition": {"frame": 40, "width": 1.5}},
    "broad_early": {"transition": {"frame": 22, "width": 6.0}},
    # Not a target: after a near-instant quench the rods order with a kinetic lag (trapped
    # domains) that an equilibrium-response model does not describe; printed to show it.
    "quench": {"transition": {"frame": 40, "width": 1.0}},
    "free": {"transition": {"frame": None}},
}


#: Encoder-like angle errors (``--angle-errors encoder``): a share of large errors (this many
#: times the core's sd), and of polar particles (odd symmetry) reported on the wrong end, as
#: bench/uncertainty.py measures them for the rVAE (rod |error|/sd quantiles 68/95 of 2.3/5.0,
#: against the normal's 1.0/2.0; tadpoles on the wrong end).
LARGE_ERRORS, LARGE_FACTOR, WRONG_END = 0.15, 6.0, 0.05


def latents_from_truth(truth: pd.DataFrame, metadata: dict, *, angle_noise: float, rng: np.random.Generator,
                       with_cls: bool = False, errors: str = "normal") -> tuple[xr.Dataset, pd.DataFrame]:
    """A latents Dataset (particle, frame) and a tracks table made from simulator truth.

    ``errors``: ``normal`` (angle errors N(0, angle_noise), reported as ``angle_sd``) or
    ``encoder`` (a mixture: :data:`LARGE_ERRORS` of the errors :data:`LARGE_FACTOR` times
    larger, and :data:`WRONG_END` of the polar species' angles turned by pi; reported as
    ``angle_sd`` = the mixture's own sd and ``flip_prob`` = :data:`WRONG_END`).
    """
    offset = rng.uniform(0, 2 * np.pi)
    sign = rng.choice([-1.0, 1.0])
    frames = np.arange(metadata["frames"])
    particles = np.unique(truth["particle"])

    def grid(col):
        return truth.pivot(index="particle", columns="frame", values=col).reindex(index=particles, columns=frames).to_numpy(float)

    angle = grid("angle")
    cls = truth.groupby("particle")["cls"].first().reindex(particles).to_numpy()
    present = np.isfinite(angle)
    reported_sd, extra = angle_noise, {}
    if errors == "encoder":
        large = rng.random(angle.shape) < LARGE_ERRORS
        error = rng.normal(0, angle_noise, angle.shape) * np.where(large, LARGE_FACTOR, 1.0)
        polar = np.array([int(s["symmetry"]) % 2 == 1 for s in metadata["species"]])[cls.astype(int)]
        error += np.where(polar[:, None] & (rng.random(angle.shape) < WRONG_END), np.pi, 0.0)
        reported_sd = angle_noise * np.sqrt(1 - LARGE_ERRORS + LARGE_ERRORS * LARGE_FACTOR ** 2)
        extra["flip_prob"] = (("particle", "frame"), np.where(present & polar[:, None], WRONG_END, np.nan))
    elif errors == "normal":
        error = rng.normal(0, angle_noise, angle.shape)
    else:
        raise ValueError(f"errors must be normal or encoder, got {errors!r}")
    noisy = sign * (angle + error) + offset
    z = np.stack([np.where(cls[:, None] == 0, -1.0, 1.0) + rng.normal(0, 0.4, angle.shape),
                  rng.normal(0, 1, angle.shape)], axis=-1)
    z[~present] = np.nan
    ds = xr.Dataset(
        {"angle": (("particle", "frame"), noisy), "angle_sd": (("particle", "frame"), np.where(present, reported_sd, np.nan)),
         **extra,
         "x": (("particle", "frame"), grid("x")), "y": (("particle", "frame"), grid("y")),
         "dx": (("particle", "frame"), np.where(present, rng.normal(0, 0.3, angle.shape), np.nan)),
         "dy": (("particle", "frame"), np.where(present, rng.normal(0, 0.3, angle.shape), np.nan)),
         "z": (("particle", "frame", "latent"), z)},
        coords={"particle": particles, "frame": frames, "latent": [0, 1]},
        attrs={"pixel_size": metadata["pixel_size"], "pixel_unit": metadata["pixel_unit"],
               "frame_interval": metadata["frame_interval"]},
    )
    if with_cls:
        ds["cls"] = ("particle", cls)
    tracks = truth[["frame", "particle", "x", "y", "cls"]].copy()
    # Image-moment orientations: axes only (mod pi) and noisier than the rVAE's.
    tracks["orientation"] = np.mod(truth["angle"] + rng.normal(0, 0.15, len(truth)), np.pi)
    return ds, tracks


def switching_movie(seed: int, *, n_particles: int = 150, frames: int = 60, t_c: float | None = None,
                    scale: float = 2.0, angle_noise: float = 0.1) -> tuple[xr.Dataset, float]:
    """Latents of a movie whose polar particles (n = 1) switch one by one to a common direction.

    Each particle rotates freely (D_r = 0.01 rad^2/frame) until its switching time, drawn
    from a logistic distribution (centre ``t_c``, scale ``scale`` frames), then fluctuates
    about the director (von Mises, kappa = 8); positions diffuse (0.3 px per axis per frame)
    and drift. Returns the latents and the true transition frame t_c (drawn in [20, 40] when
    not given). The polar order S_1 rises as a logistic centred on t_c.
    """
    rng = np.random.default_rng(seed)
    t_c = float(rng.uniform(20, 40)) if t_c is None else float(t_c)
    t = np.arange(frames)
    u = rng.uniform(1e-9, 1 - 1e-9, n_particles)
    switch = t_c + scale * np.log(u / (1 - u))
    free = rng.uniform(0, 2 * np.pi, (n_particles, 1)) + np.cumsum(rng.normal(0, np.sqrt(0.02), (n_particles, frames)), 1)
    aligned = rng.uniform(0, 2 * np.pi) + rng.vonmises(0.0, 8.0, (n_particles, frames))
    theta = np.where(t[None, :] >= switch[:, None], aligned, free) + rng.normal(0, angle_noise, (n_particles, frames))
    x = rng.uniform(0, 256, (n_particles, 1)) + np.cumsum(rng.normal(0, 0.3, (n_particles, frames)), 1) + 0.05 * t
    y = rng.uniform(0, 256, (n_particles, 1)) + np.cumsum(rng.normal(0, 0.3, (n_particles, frames)), 1) - 0.03 * t
    ds = xr.Dataset(
        {"angle": (("particle", "frame"), theta), "angle_sd": (("particle", "frame"), np.full(theta.shape, angle_noise)),
         "x": (("particle", "frame"), x), "y": (("particle", "frame"), y),
         "z": (("particle", "frame", "latent"), rng.normal(size=(n_particles, frames, 2)))},
        coords={"particle": np.arange(n_particles), "frame": t, "latent": [0, 1]},
        attrs={"pixel_size": 1.0, "pixel_unit": "px", "frame_interval": 1.0,
               "species": json.dumps([{"name": "polar", "symmetry": 1}])},
    )
    return ds, t_c


def static_movie(seed: int, n_particles: int = 120, frames: int = 60) -> xr.Dataset:
    """Latents of a static sample: fixed random orientations and positions, measurement noise only."""
    rng = np.random.default_rng(seed)
    shape = (n_particles, frames)
    theta = rng.uniform(0, 2 * np.pi, (n_particles, 1)) + rng.normal(0, 0.05, shape)
    ds = xr.Dataset(
        {"angle": (("particle", "frame"), theta), "angle_sd": (("particle", "frame"), np.full(shape, 0.05)),
         "x": (("particle", "frame"), rng.uniform(0, 256, (n_particles, 1)) + rng.normal(0, 0.1, shape)),
         "y": (("particle", "frame"), rng.uniform(0, 256, (n_particles, 1)) + rng.normal(0, 0.1, shape))},
        coords={"particle": np.arange(n_particles), "frame": np.arange(frames)},
        attrs={"species": json.dumps([{"name": "bead", "symmetry": 2}])},
    )
    return ds


def demo_settings(meta: dict, seed: int, **extra) -> dict:
    """The demo's dynamics settings (config/config.yaml, movies.demo.dynamics) for a simulated movie."""
    settings = validate_section("dynamics", {"species": [{"name": s["name"], "symmetry": int(s["symmetry"]), "cls": k}
                                                         for k, s in enumerate(meta["species"])],
                                             "registry_order": 6, "transition_model": "saturating", **extra})
    settings["seed"] = seed
    return settings


def memory_at(n_particles: int, frames: int, seed: int = 0) -> dict[str, float]:
    """Peak Python memory (tracemalloc) of the stage (read ``latents.zarr``, compute, write) on random latents.

    The latents are written to a store first and read by the stage as the workflow runs it
    (lazily, a chunk at a time); the (particle, frame) outputs are computed as they are written.
    """
    import tempfile
    import tracemalloc

    import dask.array  # noqa: F401 - imported before measuring: an import is no memory of the stage

    from rvae_tools.dynamics import run_dynamics_files
    from rvae_tools.io import write_zarr

    rng = np.random.default_rng(seed)
    shape = (n_particles, frames)
    side = 40.0 * np.sqrt(n_particles)  # constant density
    ds = xr.Dataset(
        {"angle": (("particle", "frame"), rng.uniform(0, np.pi, shape)),
         "angle_sd": (("particle", "frame"), np.full(shape, 0.05)),
         "x": (("particle", "frame"), rng.uniform(0, side, (n_particles, 1)) + rng.normal(0, 0.3, shape).cumsum(1)),
         "y": (("particle", "frame"), rng.uniform(0, side, (n_particles, 1)) + rng.normal(0, 0.3, shape).cumsum(1)),
         "z": (("particle", "frame", "latent"), rng.normal(size=(*shape, 2)))},
        coords={"particle": np.arange(n_particles), "frame": np.arange(frames), "latent": [0, 1]},
        attrs={"species": json.dumps([{"name": "rod", "symmetry": 2}])},
    )
    settings = dict(validate_section("dynamics", {"bootstrap": 50}), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_zarr(ds, f"{tmp}/latents.zarr")
        del ds
        tracemalloc.start()
        t0 = time.perf_counter()
        run_dynamics_files(f"{tmp}/latents.zarr", None, f"{tmp}/dynamics.zarr", settings)
        wall = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    grid = n_particles * frames * 8  # one float64 (particle, frame) array
    return {"peak_mb": peak / 1e6, "grid_mb": grid / 1e6, "peak_in_grids": peak / grid, "seconds": wall}


def coverage(rows: list[dict]) -> dict[str, float]:
    """Coverage, detection rate, mean absolute error and mean width of intervals over repeated movies."""
    detected = [r for r in rows if r["detected"]]
    covers = [r["low"] <= r["truth"] <= r["high"] for r in detected]
    return {"n": len(rows), "detected": len(detected) / max(len(rows), 1),
            "coverage": float(np.sum(covers)) / max(len(rows), 1),
            "mean_abs_error": float(np.mean([abs(r["est"] - r["truth"]) for r in detected])) if detected else float("nan"),
            "mean_width": float(np.mean([r["high"] - r["low"] for r in detected])) if detected else float("nan")}


def truth_order(truth: pd.DataFrame, symmetry: np.ndarray, m_of_n) -> np.ndarray:
    """Species-weighted |<exp(i m theta)>| per frame of the truth angles."""
    n = symmetry[truth["cls"].to_numpy()]
    m = np.array([m_of_n(k) for k in n])
    u = np.exp(1j * m * truth["angle"].to_numpy())
    df = pd.DataFrame({"frame": truth["frame"], "cls": truth["cls"], "re": u.real, "im": u.imag})
    g = df.groupby(["frame", "cls"])[["re", "im"]].sum()
    g["abs"] = np.hypot(g["re"], g["im"])
    per = g["abs"].groupby(level="frame").sum() / df.groupby("frame").size()
    return per.to_numpy()


def coverage_run(label: str, key: str, run_one, n: int) -> dict[str, float]:
    """Coverage of ``n`` movies, ``run_one(k)`` giving each one's :func:`outcome`; printed as one line.

    Returns the figures keyed ``{key}_{figure}`` for the JSON summary.
    """
    t0 = time.perf_counter()
    cov = coverage([run_one(k) for k in range(n)])
    print(f"coverage, {label}: {cov['coverage']:.3f} of {cov['n']} movies inside the 95% interval; detected "
          f"{cov['detected']:.3f}; mean |error| {cov['mean_abs_error']:.2f} frames, mean width "
          f"{cov['mean_width']:.2f} frames ({time.perf_counter() - t0:.0f} s)")
    return {f"{key}_{k}": round(v, 4) for k, v in cov.items()}


def simulated_movie(overrides: dict, seed: int, angle_noise: float, rng: np.random.Generator, errors: str = "normal"):
    sim_settings = validate_section("simulate", overrides)
    sim_settings["seed"] = seed
    sim = simulate(sim_settings)
    latents, tracks = latents_from_truth(sim.truth, sim.metadata, angle_noise=angle_noise, rng=rng, errors=errors)
    return sim, latents, tracks


def outcome(attrs: dict, truth: float | None) -> dict:
    return {"truth": truth, "detected": bool(attrs["transition_detected"]), "est": attrs["transition_frame"],
            "low": attrs["transition_frame_low"], "high": attrs["transition_frame_high"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--angle-noise", type=float, default=0.05, help="sd of the angle noise (rad), reported as angle_sd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--coverage-switching", type=int, default=40, help="seeds of the switching movie")
    parser.add_argument("--coverage-demo", type=int, default=12, help="seeds of the simulator's demo physics")
    parser.add_argument("--coverage-encoder", type=int, default=12,
                        help="seeds of the demo physics with encoder-like angle errors (heavy tails, wrong ends)")
    parser.add_argument("--only-coverage", action="store_true", help="only the coverage runs (skip the single movies and memory)")
    parser.add_argument("--quick", action="store_true", help="10 + 4 + 4 seeds")
    args = parser.parse_args()
    if args.quick:
        args.coverage_switching, args.coverage_demo, args.coverage_encoder = 10, 4, 4
    rng = np.random.default_rng(args.seed)
    result: dict[str, float] = {}
    start = time.perf_counter()
    defaults = validate_section("dynamics", {})
    if not args.only_coverage:
        for name, overrides in MOVIES.items():
            t0 = time.perf_counter()
            sim, latents, tracks = simulated_movie(overrides, args.seed, args.angle_noise, rng)
            t_sim = time.perf_counter() - t0
            meta = sim.metadata
            symmetry = np.array([s["symmetry"] for s in meta["species"]])
            settings = demo_settings(meta, args.seed)
            t0 = time.perf_counter()
            ds = compute_dynamics(latents, tracks, settings)
            t_dyn = time.perf_counter() - t0
            a = ds.attrs
            latents_cls = sim.truth.groupby("particle")["cls"].first().reindex(ds["particle"].values).to_numpy()
            species_acc = float(np.mean(ds["species"].values == latents_cls))
            if name == "demo":
                # Without class labels the species come from a Gaussian mixture on the mean z.
                gmm = compute_dynamics(latents, tracks.drop(columns="cls"), dict(settings, bootstrap=0))
                gmm_acc = float(np.mean(gmm["species"].values == latents_cls))
                result["demo_species_accuracy_gmm"] = round(gmm_acc, 4)
            s_n_truth = truth_order(sim.truth, symmetry, lambda n: n)
            s_6_truth = truth_order(sim.truth, symmetry, lambda n: 6 * n // np.gcd(6, n))
            r_sn = float(np.corrcoef(ds["S_n"].values, s_n_truth)[0, 1])
            r_s6 = float(np.corrcoef(ds["S_6"].values, s_6_truth)[0, 1])
            print(f"{name}: simulated in {t_sim:.1f} s, dynamics in {t_dyn:.2f} s; "
                  f"{ds.sizes['particle']} trajectories, species assigned by {a['species_method']} "
                  f"(accuracy {species_acc:.3f})")
            if name == "demo":
                print(f"  species by {gmm.attrs['species_method']} on z without cls: accuracy {gmm_acc:.3f}")
            print(f"  r(S_n, truth) = {r_sn:.4f}   r(S_6, truth) = {r_s6:.4f}")
            row = {f"{name}_dynamics_s": round(t_dyn, 3), f"{name}_species_accuracy": round(species_acc, 4),
                   f"{name}_r_S_n": round(r_sn, 4), f"{name}_r_S_6": round(r_s6, 4)}
            true_tc = meta["transition_frame"]
            if true_tc is not None:
                est, lo, hi = a["transition_frame"], a["transition_frame_low"], a["transition_frame_high"]
                err = abs(est - true_tc)
                covers = bool(lo <= true_tc <= hi)
                default = compute_dynamics(latents, tracks, dict(validate_section("dynamics", {"species": settings["species"]}),
                                                                 seed=args.seed, bootstrap=0)).attrs
                print(f"  transition: truth frame {true_tc} (width {meta['transition_width']}); "
                      f"estimate {est:.2f} from {a['transition_signal']} ({a['transition_model']}), "
                      f"interval [{lo:.2f}, {hi:.2f}] -> error {err:.2f} frames, covers truth: {covers}; "
                      f"change point {a['transition_frame_changepoint']}; classical ({a['classical_signal']}) "
                      f"{a['transition_frame_classical']:.2f}; with the generic defaults (logistic, S_n, no registry): "
                      f"{default['transition_frame']:.2f} (detected {default['transition_detected']})")
                row.update({f"{name}_transition_true": true_tc, f"{name}_transition_est": est,
                            f"{name}_transition_low": lo, f"{name}_transition_high": hi,
                            f"{name}_transition_error": round(err, 3), f"{name}_interval_covers": covers,
                            f"{name}_transition_signal": a["transition_signal"],
                            f"{name}_changepoint": a["transition_frame_changepoint"],
                            f"{name}_transition_classical": a["transition_frame_classical"],
                            f"{name}_transition_generic_defaults": default["transition_frame"]})
            else:
                d_true = meta["diffusion"]["rotation"] / meta["frame_interval"]
                d_est = a["rotational_diffusion"]
                rel = (d_est - d_true) / d_true
                default = compute_dynamics(latents, tracks, dict(validate_section("dynamics", {"species": settings["species"]}),
                                                                 seed=args.seed, bootstrap=0)).attrs
                print(f"  no transition in truth; detected: {a['transition_detected']} (generic defaults: "
                      f"{default['transition_detected']}); rotational diffusion {d_est:.5f} vs truth {d_true:.5f} "
                      f"rad^2/s (relative error {rel:+.3f})")
                row.update({f"{name}_transition_detected": a["transition_detected"],
                            f"{name}_transition_detected_defaults": default["transition_detected"],
                            f"{name}_D_rot_est": d_est, f"{name}_D_rot_true": d_true, f"{name}_D_rot_rel_error": round(rel, 4)})
            result.update(row)

        # The simulator with other physics: no substrate (strength 0) and a neighbour alignment
        # reaching every particle (a mean field), ramped by the same logistic. Ordering starts when
        # the ramped coupling passes its critical value, after the ramp's midpoint: the reference is
        # the midpoint of the true angles' own S_n (a logistic fit to the noise-free truth).
        sim, latents, tracks = simulated_movie({"transition": {"strength": 0.0, "neighbour_coupling": 0.1,
                                                               "neighbour_radius": 400.0}}, args.seed, args.angle_noise, rng)
        meta = sim.metadata
        symmetry = np.array([s["symmetry"] for s in meta["species"]])
        truth_sn = truth_order(sim.truth, symmetry, lambda n: n)
        reference = fit_logistic(np.arange(len(truth_sn)), truth_sn, "logistic").t_c
        species = [{"name": s["name"], "symmetry": int(s["symmetry"]), "cls": k} for k, s in enumerate(meta["species"])]
        a = compute_dynamics(latents, tracks, dict(validate_section("dynamics", {"species": species}), seed=args.seed)).attrs
        err = abs(a["transition_frame"] - reference)
        print(f"neighbour (simulator, no substrate, mean-field neighbour alignment; defaults): coupling ramp midpoint "
              f"{meta['transition_frame']}, true S_n midpoint {reference:.2f}; estimate {a['transition_frame']:.2f} "
              f"[{a['transition_frame_low']:.2f}, {a['transition_frame_high']:.2f}] -> error {err:.2f} frames "
              f"against the true S_n midpoint")
        result.update({"neighbour_ramp_midpoint": meta["transition_frame"], "neighbour_true_S_n_midpoint": round(reference, 3),
                       "neighbour_transition_est": a["transition_frame"], "neighbour_transition_error": round(err, 3),
                       "neighbour_interval_covers": bool(a["transition_frame_low"] <= reference <= a["transition_frame_high"])})

        static_detected = []
        for k in range(5):
            a = compute_dynamics(static_movie(1000 + k), None, dict(defaults, seed=k)).attrs
            static_detected.append(bool(a["transition_detected"]))
        print(f"static sample (5 seeds, defaults): transition detected in {sum(static_detected)} of 5")
        result["static_transitions_detected"] = int(sum(static_detected))

    def switching(k):
        latents, t_c = switching_movie(2000 + k, angle_noise=2 * args.angle_noise)
        return outcome(compute_dynamics(latents, None, dict(defaults, seed=k)).attrs, t_c)

    def demo_physics(k, seed0=3000, **kw):
        sim, latents, tracks = simulated_movie({}, seed0 + k, args.angle_noise, rng, **kw)
        a = compute_dynamics(latents, tracks, demo_settings(sim.metadata, k)).attrs
        return outcome(a, float(sim.metadata["transition_frame"]))

    result.update(coverage_run(
        "switching movies (other physics, defaults: logistic S_n, trajectories + angles resampled)",
        "switching", switching, args.coverage_switching))
    result.update(coverage_run(
        "simulator demo physics (demo settings: saturating, S_n/S_6)",
        "demo_coverage", demo_physics, args.coverage_demo))
    result.update(coverage_run(
        f"simulator demo physics with encoder-like angle errors ({LARGE_ERRORS:.0%} of them {LARGE_FACTOR:g}x "
        f"larger, {WRONG_END:.0%} of the polar species on the wrong end; demo settings)",
        "encoder_errors_coverage", lambda k: demo_physics(k, seed0=4000, errors="encoder"), args.coverage_encoder))
    for n_particles in () if args.only_coverage else (1000, 4000):
        mem = memory_at(n_particles, 100)
        print(f"memory, {n_particles} trajectories x 100 frames: peak {mem['peak_mb']:.0f} MB = "
              f"{mem['peak_in_grids']:.1f} (particle, frame) float64 arrays of {mem['grid_mb']:.1f} MB; "
              f"{mem['seconds']:.1f} s")
        result.update({f"memory_{n_particles}_{k}": round(v, 3) for k, v in mem.items()})
    result["total_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()

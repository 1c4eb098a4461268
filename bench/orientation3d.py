"""Out-of-plane orientation benchmark: rvae3d on projections of 3D bodies at poses uniform over SO(3).

Data: an asymmetric, chiral 3D body (``simulate.BODIES_3D["asymmetric"]``, a 3D "F") and a 3D
rod, projected exactly (sums of Gaussians) into 32 x 32 windows at rotations uniform over SO(3)
with shifts of ~1 px, plus Gaussian noise at the given SNRs (peak / noise sd).

Figures (per SNR for the body, one for the rod): median geodesic error between encoded and
true rotations after the best global alignment, mirror branch allowed (``so3.align``), the
fraction within 15 deg, the rod's median tilt error (deg; tilt needs no alignment: it is the
angle between the learned volume's long axis and the image plane), reconstruction RMSE (in
units of the noise sd) and training windows/s. Rod diagnostics: the mean signed tilt error
below 20 deg true tilt (a bias there: estimated tilts cannot go below 0), and the tilt error
with the body axis that fits the truth best (``best_tilt_axis``) with that axis's angle to
the volume's long axis: poses consistent with some axis to a few degrees while the long axis
is off it mean the tilt error comes from the axis, not from the poses.

Flat particles (``--flat``, per body): windows of the body lying flat (turned about the viewing
axis only, uniform angle; same size, shifts and SNR), on which rvae3d (uniform prior over SO(3),
as above) and our 2D rVAE (its defaults, its own epochs unless ``--rvae2d-epochs``) each train and encode: the in-plane
angle consistency of both, ``|mean exp(i n (true - s encoded))|`` maximised over ``s = +1/-1``
(n = the body's symmetry order flat: 1 for the asymmetric body, 2 for the rod; as
bench/rvae.py), and rvae3d's loss to the 2D rVAE (target: at most 0.02).

References on the tumbling bodies (same windows as rvae3d, per body; ``--no-references``: null):

- ``conditional_vae_reference``: the poster's conditional VAE in 3D (``PoseConditionedVAE``):
  rvae3d's encoder, projection decoder, priors and trainer, but the decoder is given each
  window's TRUE rotation and only the shift is inferred. Its reconstruction RMSE (units of
  the noise sd; shift refined as rvae3d refines its own) beside rvae3d's, and their ratio.
  An upper reference for pose-aware decoding once trained to convergence; at few epochs or
  windows rvae3d can fit better, because it picks each window's pose to fit a still blurred
  volume while the conditional VAE must use the true one.
- ``rvae2d_reference``: our plain 2D rVAE (its defaults; ``--rvae2d-epochs``) trained on the
  same windows: the median in-plane angle error (deg) of the projected body axis vs truth and
  the fraction within 15 deg, after the best global offset and sense, modulo 360/n deg (n = 2
  for the rod, whose ends look alike; 1 for the asymmetric body), and its reconstruction RMSE;
  beside rvae3d's in-plane error, scored twice: its reported ``in_plane_angle`` (its volume's
  long axis) with the same offset and sense freedom, and from its aligned poses (the true body
  axis carried into the model's frame by ``so3.align``'s ``G``). All windows count, including
  those whose axis points nearly along the viewing direction (in-plane angle ill-defined).
- Rod row: ``tilt_within_1sd`` / ``tilt_within_2sd``, the fraction of windows whose true tilt
  lies within 1 / 2 of rvae3d's posterior ``tilt_sd`` of its ``tilt`` (68 / 95 % if the spread
  is calibrated), and the median ``tilt_sd`` (deg). Reported, not tuned.

End to end (``--movie RUN``): scores the ``tilt`` of a finished run's ``latents.zarr`` (the
stage CLIs on a simulated movie with a ``body_3d`` species: simulate, ingest, segment, track,
windows, train with ``rvae.model: rvae3d``, encode) against ``RUN/truth.parquet``: each
encoded (particle, frame) is matched to the nearest true particle of its frame within 3 px;
prints the median tilt error (deg), the fraction within 15 deg and, as the peer measured in
the same run, the same figures for a constant guess (the truth's median tilt) and their ratio.
Nothing is trained in this mode.

Usage: ``python bench/orientation3d.py [--windows 1500] [--epochs 6] [--grid 1152] [--snr 5]
[--no-asymmetric] [--no-rod] [--flat asymmetric rod] [--no-references] [--threads 1]``.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from rvae_tools.rvae import losses, so3
from rvae_tools.rvae.data import AnnotatedWindows
from rvae_tools.rvae.rvae3d import RVAE3D
from rvae_tools.simulate import BODY_AXIS_3D, body_3d, project_body_3d

#: Rotational symmetry order in the image plane of each body lying flat (the rod: a half turn).
FLAT_SYMMETRY = {"asymmetric": 1, "rod": 2}


def make_windows(kind: str, n: int, snr: float, seed: int, size: int = 32):
    """Noisy windows (n, size, size), true quaternions (n, 4) and the clean windows."""
    rng = np.random.default_rng(seed)
    q = so3.random_rotations(n, rng)
    clean = project_body_3d(body_3d(kind, 10.0), q, size, rng.normal(0, 1.0, (n, 2)))
    sd = float(clean.max(axis=(1, 2)).mean()) / snr
    return (clean + rng.normal(0, sd, clean.shape)).astype(np.float32), q, clean, sd


def make_flat_windows(kind: str, n: int, snr: float, seed: int, size: int = 32):
    """Windows of a body lying flat (turned about the viewing axis only, uniform angle), as :func:`make_windows`."""
    rng = np.random.default_rng(seed + 7)
    q = so3.from_axis_angle([0.0, 0.0, 1.0], rng.uniform(-np.pi, np.pi, n))
    clean = project_body_3d(body_3d(kind, 10.0), q, size, rng.normal(0, 1.0, (n, 2)))
    sd = float(clean.max(axis=(1, 2)).mean()) / snr
    return (clean + rng.normal(0, sd, clean.shape)).astype(np.float32), q, clean, sd


def angle_consistency(true: np.ndarray, encoded: np.ndarray, order: int) -> float:
    """|mean exp(i n (true - s encoded))| maximised over s = +1/-1 (as bench/rvae.py; 1 = exact up to an offset)."""
    return float(max(abs(np.mean(np.exp(1j * order * (true - s * encoded)))) for s in (1, -1)))


def rvae3d_model(sd: float, args) -> RVAE3D:
    return RVAE3D(32, latent_dim=0, so3_grid=args.grid, epochs=args.epochs, batch_size=64, lr=0.01,
                  kl_warmup_epochs=0, likelihood_sd=max(sd, 0.05), patience=0, seed=args.seed)


def rvae2d_angles(x: np.ndarray, m: int, args) -> np.ndarray:
    """In-plane angles (rad) of the first ``m`` windows from our 2D rVAE trained on all of ``x`` (its defaults; epochs as --rvae2d-epochs gives)."""
    from rvae_tools.rvae import RVAE

    epochs = {} if args.rvae2d_epochs is None else {"epochs": args.rvae2d_epochs}
    model = RVAE(x.shape[1], seed=args.seed, batch_size=64, max_windows=None, **epochs)
    model.fit(x, device="cpu", progress=False)
    return model.encode(x[:m], device="cpu")["angle"]


def run_flat(kind: str, snr: float, args) -> dict:
    """In-plane angle consistency of rvae3d and the 2D rVAE on the same windows of a body that stays flat."""
    x, q, _, sd = make_flat_windows(kind, args.windows, snr, args.seed)
    m = min(args.encode, len(x))
    true = so3.in_plane_angle(q[:m], BODY_AXIS_3D)
    order = FLAT_SYMMETRY[kind]
    model = rvae3d_model(sd, args)
    model.fit(x, progress=False)
    ours = angle_consistency(true, model.encode(x[:m])["in_plane_angle"], order)
    ref = angle_consistency(true, rvae2d_angles(x, m, args), order)
    return {"body": kind, "snr": snr, "windows": len(x), "symmetry": order,
            "angle_consistency_rvae3d": round(ours, 4), "angle_consistency_rvae2d": round(ref, 4),
            "loss_to_rvae2d": round(ref - ours, 4)}


def hemisphere(n: int) -> np.ndarray:
    """``n`` near-uniform unit directions (n, 3) on the half sphere z >= 0 (a Fibonacci spiral)."""
    i = np.arange(n) + 0.5
    polar, turn = np.arccos(1 - i / n), np.pi * (1 + 5 ** 0.5) * i
    return np.stack([np.cos(turn) * np.sin(polar), np.sin(turn) * np.sin(polar), np.cos(polar)], 1)


def best_tilt_axis(q: np.ndarray, true_tilt: np.ndarray, directions: int = 20000) -> tuple[np.ndarray, float]:
    """The body axis (3,) whose tilts at the encoded poses ``q`` best match the true tilts (rad), and that median error.

    A diagnostic, not a figure of the model: it separates the error of the encoded poses
    from the error of the axis the model reads its tilt from (its volume's long axis).
    """
    axes = hemisphere(directions)
    lab_z = so3.to_matrix(q)[:, 2, :]                                   # row 2 of R: z of R a
    tilts = np.arcsin(np.clip(np.abs(lab_z @ axes.T), 0.0, 1.0))
    err = np.median(np.abs(tilts - true_tilt[:, None]), 0)
    return axes[err.argmin()], float(err.min())


# --------------------------------------------------------------------- references on the tumbling bodies


class _PosedWindows(AnnotatedWindows):
    """Windows with their true pose (unit quaternion, one per window); ``batch_q`` holds the last batch's."""

    def __init__(self, windows, quaternions: np.ndarray):
        super().__init__(windows)
        self.q = np.asarray(quaternions, dtype=np.float64)
        self.batch_q: np.ndarray | None = None

    def iter_batches(self, index, batch_size, rng=None, buffer_batches: int = 32):
        for sel, block in super().iter_batches(index, batch_size, rng, buffer_batches):
            self.batch_q = self.q[sel]
            yield sel, block


class PoseConditionedVAE(RVAE3D):
    """The poster's conditional VAE in 3D: rvae3d's projection decoder given each window's TRUE rotation.

    Nothing about the pose is inferred: the encoder infers only the shift (and content, if any),
    the decoder renders its learned volume at the given rotation. Same encoder, decoder, noise
    model, priors and trainer as rvae3d, so its reconstruction error bounds from below what
    inferring the pose can reach with this decoder.
    """

    _source: _PosedWindows | None = None

    def loss(self, x: torch.Tensor, beta: float = 1.0, sample: bool = True):
        """Negative ELBO per window (nats) at the batch's true rotations, batch mean, and its parts."""
        if self._source is None or self._source.batch_q is None or len(self._source.batch_q) != x.shape[0]:
            raise RuntimeError("PoseConditionedVAE.loss needs the batch's true rotations (train through fit)")
        xc, mask, _ = self._centred(x.float())
        enc = {key: v.float() for key, v in self.encoder(xc).items()}
        eps = (lambda t: torch.randn_like(t)) if sample else (lambda t: torch.zeros_like(t))
        z = enc["z_mu"] + enc["z_logsd"].exp() * eps(enc["z_mu"])
        t = enc["t_mu"] + enc["t_logsd"].exp() * eps(enc["t_mu"])
        rot = torch.from_numpy(so3.to_matrix(self._source.batch_q).astype(np.float32)).to(x.device)[:, None]
        decoded = self.decoder.render(self.decoder.spectrum(), rot, (t / self.pixel)[:, None], z)
        rec = self._nll(xc, decoded, mask)[:, 0]
        kl_t = losses.kl_normal(enc["t_mu"], enc["t_logsd"], 0.0, float(self.settings["translation_prior"]) * self.pixel).sum(-1)
        kl_z = losses.kl_normal(enc["z_mu"], enc["z_logsd"]).sum(-1)
        parts = {"rec": rec, "kl_z": kl_z, "kl_angle": torch.zeros_like(rec), "kl_shift": kl_t}
        return (rec + beta * (kl_t + kl_z)).mean(), parts

    def fit_posed(self, windows: np.ndarray, quaternions: np.ndarray, **kwargs):
        """Train on ``windows`` (n, wy, wx) with their true rotations ``quaternions`` (n, 4); keywords as ``fit``."""
        from rvae_tools.rvae.trainer import fit

        self._source = _PosedWindows(windows, quaternions)
        try:
            return fit(self, self._source, **kwargs)
        finally:
            self._source = None

    def reconstruct_posed(self, windows: np.ndarray, quaternions: np.ndarray, levels: int = 5) -> np.ndarray:
        """Each window decoded at its true rotation, its encoded content and its refined shift (plus its background).

        The encoder's shift is refined by a pattern search on the residual (the shift and its 8
        neighbours at 0.5 px, then halved ``levels`` times), as rvae3d refines its own shifts
        when it encodes; the rotation stays the true one.
        """
        self._prepare("cpu")
        rot = torch.from_numpy(so3.to_matrix(np.asarray(quaternions, np.float64)).astype(np.float32))[:, None]
        steps = torch.tensor([[i, j] for i in (-1.0, 0.0, 1.0) for j in (-1.0, 0.0, 1.0)])
        with torch.inference_mode():
            xc, _, background = self._centred(torch.from_numpy(np.ascontiguousarray(windows)).float())
            enc = self.encoder(xc)
            spec, z = self.decoder.spectrum(), enc["z_mu"]
            shift, h = enc["t_mu"] / self.pixel, 0.5
            for _ in range(levels):
                trial = shift[:, None] + h * steps[None]                                       # (B, 9, 2)
                img = self.decoder.render(spec, rot.expand(-1, len(steps), -1, -1), trial, z)
                best = ((img - xc[:, None]) ** 2).flatten(2).sum(-1).argmin(1)
                shift, h = trial[torch.arange(len(best)), best], 0.5 * h
            images = self.decoder.render(spec, rot, shift[:, None], z)[:, 0]
        return (images + background[:, None, None]).numpy()


def in_plane_errors(true: np.ndarray, estimated: np.ndarray, order: int) -> np.ndarray:
    """In-plane angle errors (deg, n) after the best global offset and sense (s = +1/-1), modulo 360/order deg.

    A model's angle is defined up to an offset (its frame) and a sense (a mirror image
    turns the other way); ``order`` is the body's in-plane symmetry (2 for the rod: its
    two ends look alike).
    """
    best = None
    for s in (1, -1):
        d = order * (np.asarray(true, np.float64) - s * np.asarray(estimated, np.float64))
        offset = np.angle(np.mean(np.exp(1j * d)))
        err = np.degrees(np.abs(np.angle(np.exp(1j * (d - offset))))) / order
        if best is None or np.median(err) < np.median(best):
            best = err
    return best


def rmse_vs_clean(rec: np.ndarray, clean: np.ndarray, sd: float) -> float:
    """Reconstruction RMSE against the noise-free windows, in units of the noise sd."""
    return round(float(np.sqrt(np.mean((rec - clean) ** 2)) / sd), 3)


def tilt_coverage(true_tilt: np.ndarray, tilt: np.ndarray, tilt_sd: np.ndarray) -> dict:
    """Fractions of windows whose true tilt lies within 1 and 2 posterior sd of the encoded tilt (68 / 95 % nominal)."""
    z = np.abs(np.asarray(tilt, np.float64) - true_tilt) / np.maximum(np.asarray(tilt_sd, np.float64), 1e-12)
    return {"tilt_within_1sd": round(float((z <= 1).mean()), 3), "tilt_within_2sd": round(float((z <= 2).mean()), 3),
            "median_tilt_sd_deg": round(float(np.degrees(np.median(tilt_sd))), 2)}


def conditional_reference(kind: str, snr: float, x, q, clean, sd, m: int, ours_rmse: float, args) -> dict:
    """The conditional VAE given the true rotations, trained on the same windows as rvae3d; its reconstruction error."""
    model = PoseConditionedVAE(32, latent_dim=0, so3_grid=args.grid, epochs=args.epochs, batch_size=64, lr=0.01,
                               kl_warmup_epochs=0, likelihood_sd=max(sd, 0.05), patience=0, seed=args.seed)
    t0 = time.perf_counter()
    hist = model.fit_posed(x, q, progress=False)
    train_s = time.perf_counter() - t0
    rmse = rmse_vs_clean(model.reconstruct_posed(x[:m], q[:m]), clean[:m], sd)
    return {"body": kind, "snr": snr, "train_s": round(train_s, 1),
            "windows_per_s": round(float(hist["windows_per_s"].median()), 1),
            "reconstruction_rmse_vs_clean_conditional": rmse, "reconstruction_rmse_vs_clean_rvae3d": ours_rmse,
            "rvae3d_over_conditional": round(ours_rmse / max(rmse, 1e-12), 3)}


def rvae2d_reference(kind: str, snr: float, x, q, clean, sd, m: int, enc: dict, model3d: RVAE3D, align: dict,
                     ours_rmse: float, args) -> dict:
    """Our 2D rVAE trained on the same tumbling windows: in-plane angle error and reconstruction error beside rvae3d's.

    rvae3d's in-plane angle is scored twice: as it reports it (the projected long axis of its
    volume, ``in_plane_angle``), with the same offset and sense freedom as the 2D rVAE; and
    from its aligned poses (the true body axis carried into the model's frame by the global
    alignment ``G``, through the mirror when that branch fitted), which needs no freedom.
    """
    from rvae_tools.rvae import RVAE

    order = FLAT_SYMMETRY[kind]
    true = so3.in_plane_angle(q[:m], BODY_AXIS_3D)
    epochs = {} if args.rvae2d_epochs is None else {"epochs": args.rvae2d_epochs}
    model = RVAE(x.shape[1], seed=args.seed, batch_size=64, max_windows=None, **epochs)
    model.fit(x, device="cpu", progress=False)
    enc2 = model.encode(x[:m], device="cpu")
    err2 = in_plane_errors(true, enc2["angle"], order)
    err3 = in_plane_errors(true, enc["in_plane_angle"], order)
    # R_est = R_true G (or M R_true M G): the body axis a sits at G^T a (or G^T M a) in the model's frame.
    axis = np.asarray(BODY_AXIS_3D, np.float64) * (np.array([1.0, 1.0, -1.0]) if align["mirror"] else 1.0)
    axis_model = so3.to_matrix(align["G"][None])[0].T @ axis
    err3a = in_plane_errors(true, so3.in_plane_angle(enc["quaternion"], axis_model), order)
    rec2 = model.decode(enc2["z"], enc2["angle"], enc2["dx"], enc2["dy"]) + enc2["background"][:, None, None]
    return {"body": kind, "snr": snr, "symmetry": order,
            "in_plane_median_deg_rvae2d": round(float(np.median(err2)), 2),
            "in_plane_within_15deg_rvae2d": round(float((err2 < 15).mean()), 3),
            "in_plane_median_deg_rvae3d": round(float(np.median(err3)), 2),
            "in_plane_within_15deg_rvae3d": round(float((err3 < 15).mean()), 3),
            "in_plane_median_deg_rvae3d_aligned_poses": round(float(np.median(err3a)), 2),
            "in_plane_within_15deg_rvae3d_aligned_poses": round(float((err3a < 15).mean()), 3),
            "reconstruction_rmse_vs_clean_rvae2d": rmse_vs_clean(rec2, clean[:m], sd),
            "reconstruction_rmse_vs_clean_rvae3d": ours_rmse}


def run_one(kind: str, snr: float, args, refs: dict | None = None) -> dict:
    x, q, clean, sd = make_windows(kind, args.windows, snr, args.seed)
    model = rvae3d_model(sd, args)
    t0 = time.perf_counter()
    hist = model.fit(x, progress=False)
    train_s = time.perf_counter() - t0
    m = min(args.encode, len(x))
    enc = model.encode(x[:m])
    out = {"body": kind, "snr": snr, "windows": len(x), "epochs": args.epochs, "grid": args.grid,
           "train_s": round(train_s, 1), "windows_per_s": round(float(hist["windows_per_s"].median()), 1)}
    al = so3.align(enc["quaternion"], q[:m])
    err = np.degrees(al["errors"])
    out.update({"median_geodesic_deg": round(float(np.median(err)), 2), "within_15deg": round(float((err < 15).mean()), 3),
                "mirror_branch": bool(al["mirror"])})
    if kind == "rod":
        true_tilt = np.degrees(so3.tilt(q[:m], BODY_AXIS_3D))
        tilt_err = np.abs(np.degrees(enc["tilt"]) - true_tilt)
        out["median_tilt_error_deg"] = round(float(np.median(tilt_err)), 2)
        out["mean_signed_tilt_error_below_20deg"] = round(float((np.degrees(enc["tilt"]) - true_tilt)[true_tilt < 20].mean()), 2)
        best, best_err = best_tilt_axis(enc["quaternion"], np.radians(true_tilt))
        out["median_tilt_error_best_axis_deg"] = round(math.degrees(best_err), 2)
        out["body_axis_to_best_axis_deg"] = round(math.degrees(math.acos(min(1.0, abs(float(model.body_axis() @ best))))), 2)
    rec = model.decode(enc["z"], enc["quaternion"], enc["dx"], enc["dy"]) + enc["background"][:, None, None]
    out["reconstruction_rmse_vs_clean"] = rmse_vs_clean(rec, clean[:m], sd)
    out.update(tilt_coverage(so3.tilt(q[:m], BODY_AXIS_3D), enc["tilt"], enc["tilt_sd"]) if kind == "rod" else {})
    if refs is not None:
        ours = out["reconstruction_rmse_vs_clean"]
        refs["conditional"].append(conditional_reference(kind, snr, x, q, clean, sd, m, ours, args))
        refs["rvae2d"].append(rvae2d_reference(kind, snr, x, q, clean, sd, m, enc, model, al, ours, args))
    return out


def score_movie(run) -> dict:
    """Tilt error (deg) of a finished run's latents.zarr against its truth.parquet (see the docstring)."""
    import sys
    from pathlib import Path

    import pandas as pd
    import xarray as xr
    from scipy.spatial import cKDTree

    run = Path(run)
    for need in ("latents.zarr", "truth.parquet"):
        if not (run / need).exists():
            print(f"orientation3d: {run / need} is missing; expected a finished run of a simulated movie",
                  file=sys.stderr)
            raise SystemExit(2)
    truth = pd.read_parquet(run / "truth.parquet")
    if "tilt" not in truth.columns:
        print(f"orientation3d: {run / 'truth.parquet'} has no tilt column; expected a movie simulated "
              "with a species body_3d", file=sys.stderr)
        raise SystemExit(2)
    lat = xr.open_zarr(run / "latents.zarr")
    if "tilt" not in lat:
        print(f"orientation3d: {run / 'latents.zarr'} has no tilt; expected an encode of an rvae3d model",
              file=sys.stderr)
        raise SystemExit(2)
    enc = lat[["x", "y", "tilt"]].to_dataframe().reset_index().dropna(subset=["x", "y", "tilt"])
    est, true = [], []
    for frame, g in enc.groupby("frame"):
        t = truth[truth.frame == frame]
        if len(t) == 0:
            continue
        d, i = cKDTree(t[["x", "y"]].to_numpy()).query(g[["x", "y"]].to_numpy())
        ok = d <= 3.0
        est.append(g.tilt.to_numpy()[ok])
        true.append(t.tilt.to_numpy()[i[ok]])
    est, true = np.degrees(np.concatenate(est)), np.degrees(np.concatenate(true))
    err = np.abs(est - true)
    const = np.abs(np.median(true) - true)
    return {
        "run": str(run), "windows_encoded": len(enc), "windows_matched": len(err),
        "median_tilt_error_deg": round(float(np.median(err)), 3),
        "tilt_within_15deg": round(float(np.mean(err <= 15)), 4),
        "constant_guess_median_tilt_error_deg": round(float(np.median(const)), 3),
        "constant_guess_within_15deg": round(float(np.mean(const <= 15)), 4),
        "error_ratio_vs_constant_guess": round(float(np.median(err) / max(np.median(const), 1e-9)), 4),
        "tilt_spearman": round(float(pd.Series(est).corr(pd.Series(true), method="spearman")), 4),
        "true_median_tilt_deg": round(float(np.median(true)), 3),
        "target_rod_tilt_le_5deg": bool(np.median(err) <= 5),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--movie", default=None, metavar="RUN",
                    help="score the tilt of a finished run RUN (latents.zarr, truth.parquet) and stop")
    ap.add_argument("--windows", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--grid", type=int, default=1152)
    ap.add_argument("--encode", type=int, default=500, help="windows encoded and scored")
    ap.add_argument("--snr", type=float, nargs="+", default=[5.0])
    ap.add_argument("--no-asymmetric", action="store_true", help="skip the asymmetric body at poses over SO(3)")
    ap.add_argument("--no-rod", action="store_true", help="skip the rod at poses over SO(3)")
    ap.add_argument("--flat", nargs="*", default=["asymmetric", "rod"], choices=sorted(FLAT_SYMMETRY),
                    help="bodies of the flat-particle comparison with the 2D rVAE (none: skip it)")
    ap.add_argument("--rvae2d-epochs", type=int, default=None,
                    help="epochs of the 2D rVAE in the flat comparison (default: its own default, rvae.epochs)")
    ap.add_argument("--no-references", action="store_true",
                    help="skip the conditional-VAE and 2D-rVAE references on the tumbling bodies (JSON: null)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.movie is not None:
        res = score_movie(args.movie)
        print(f"movie {res['run']}: {res['windows_matched']} of {res['windows_encoded']} encoded windows matched; "
              f"median tilt error {res['median_tilt_error_deg']:.2f} deg, within 15 deg {res['tilt_within_15deg']:.3f}; "
              f"constant guess {res['constant_guess_median_tilt_error_deg']:.2f} deg, "
              f"{res['constant_guess_within_15deg']:.3f}; Spearman {res['tilt_spearman']:.3f}")
        print(json.dumps({"bench": "orientation3d_movie", **res}))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    refs = None if args.no_references else {"conditional": [], "rvae2d": []}
    rows = [] if args.no_asymmetric else [run_one("asymmetric", snr, args, refs) for snr in args.snr]
    if not args.no_rod:
        rows.append(run_one("rod", args.snr[0], args, refs))
    flat = [run_flat(kind, args.snr[0], args) for kind in args.flat]
    for row in rows + flat + ([] if refs is None else refs["conditional"] + refs["rvae2d"]):
        print(row)
    body5 = next((r for r in rows if r["body"] == "asymmetric" and math.isclose(r["snr"], 5.0)), None)
    rod = next((r for r in rows if r["body"] == "rod"), None)
    summary = {
        "bench": "orientation3d", "runs": rows,
        "target_median_le_10deg_snr5": None if body5 is None else body5["median_geodesic_deg"] <= 10,
        "target_within15_ge_0.8_snr5": None if body5 is None else body5["within_15deg"] >= 0.8,
        "target_rod_tilt_le_5deg": None if rod is None else rod["median_tilt_error_deg"] <= 5,
        "flat": flat,
        "target_flat_within_0.02_of_rvae2d": (all(r["loss_to_rvae2d"] <= 0.02 for r in flat) if flat else None),
        "conditional_vae_reference": None if refs is None else refs["conditional"],
        "rvae2d_reference": None if refs is None else refs["rvae2d"],
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

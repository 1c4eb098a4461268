"""The rotationally invariant VAE: build, fit, encode, decode, save and load.

Units at the API: angles in radians (counter-clockwise from +x towards +y in (x, y) pixel
coordinates, the convention of ``truth.parquet``), shifts in pixels (``dx`` along x = column,
``dy`` along y = row).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from . import losses
from .checkpoint import FORMAT, FORMAT_VERSION, check_compatible, read_checkpoint
from .networks import NoPoseEncoder, TemplateDecoder, build_decoder, build_encoder, row_median
from .trainer import fit as _fit
from .uncertainty import pose_covariance

__all__ = ["FORMAT", "FORMAT_VERSION", "RVAE", "check_compatible", "read_checkpoint", "wrap_angle"]
#: nats per squared pixel of template-centroid offset (see RVAE.loss).
CENTRE_WEIGHT = 10.0
#: How ``encode`` finds the rotation posterior (see :meth:`RVAE.encode`); ``encoder`` decodes nothing.
ENCODE_METHODS = ("exact", "fast", "encoder")
#: Encoder's most probable rotations decoded by ``encode(method="fast")`` (each with its half-turn).
#: With 3, a briefly trained encoder missed the best rotation often enough to put a rotated
#: L 4-7 degrees off (tests/test_rvae.py lab-frame test); 4 kept it within 2 degrees.
FAST_CANDIDATES = 4
#: Half-widths, in rotation bins, of the successive three-point parabolic refinements of the
#: encoded angle around the best bin (see :meth:`RVAE._refine_angle`). The first spans the
#: bin (its edges are half a bin away); the second, a quarter of that, sits near enough to the
#: optimum for the log-likelihood to be quadratic there (measured: a real rod turned by 7 and 31
#: degrees recovered within 1 degree, against up to 11 degrees on the 22.5-degree grid).
REFINE_STEPS = (0.5, 0.125)


def _position(keep: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Where (B, 1) in each row of the decoded rotations ``keep`` (B, c) the rotation ``best`` (B, 1) first is."""
    return (keep == best).int().argmax(1, keepdim=True)


def _default_settings(overrides: dict[str, Any]) -> dict[str, Any]:
    from ..config import validate_section

    settings = validate_section("rvae", overrides, source="RVAE")
    if settings.get("seed") is None:
        settings["seed"] = 0
    return settings


def wrap_angle(angle: np.ndarray, symmetry: int = 1) -> np.ndarray:
    """Angles reduced to [-pi/n, pi/n) for an n-fold symmetric particle (n = 1: [-pi, pi))."""
    period = 2 * np.pi / max(int(symmetry), 1)
    return np.remainder(np.asarray(angle) + period / 2, period) - period / 2


class RVAE:
    """Rotationally invariant VAE with a coordinate decoder.

    Parameters
    ----------
    window_size : int or (int, int)
        Window height and width in pixels.
    latent_dim : int
        Number of content latents k.
    encoder : {"equivariant", "conv", "mlp"}
    rotations : int
        Discrete rotations r of the equivariant encoder.
    **settings
        Any other key of the config's ``rvae`` section (see the schema); missing keys take the
        schema's defaults.
    """

    def __init__(self, window_size: int | tuple[int, int] = 32, latent_dim: int | None = None,
                 encoder: str | None = None, rotations: int | None = None, **settings: Any):
        overrides = dict(settings)
        for key, value in (("latent_dim", latent_dim), ("encoder", encoder), ("rotations", rotations)):
            if value is not None:
                overrides[key] = value
        overrides.pop("window_size", None)
        self.settings = _default_settings(overrides)
        if isinstance(window_size, (int, np.integer)):
            window_size = (int(window_size), int(window_size))
        self.window_size: tuple[int, int] = (int(window_size[0]), int(window_size[1]))
        if min(self.window_size) < 4:
            raise InputError(f"window_size {self.window_size} is too small; expected at least 4x4 pixels")
        self.checksum: str | None = None
        self.normalisation: dict[str, float] = {}
        self.device = torch.device("cpu")
        torch.manual_seed(int(self.settings["seed"]))
        self._build()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, rvae_settings: dict[str, Any], window_size: int | tuple[int, int]) -> RVAE:
        """A model from the config's (validated) ``rvae`` section."""
        return cls(window_size, **{k: v for k, v in rvae_settings.items()})

    def _build(self) -> None:
        s = self.settings
        k = int(s["latent_dim"])
        pose = s["model"] == "rvae"
        #: Whether the model infers a pose (angle and shifts); class models set their own.
        self.pose = pose
        rotations = int(s["rotations"]) if s["encoder"] == "equivariant" and pose else 1
        enc = build_encoder(s["encoder"] if pose or s["encoder"] != "equivariant" else "conv",
                            self.window_size, k, hidden=s["encoder_hidden"], channels=s["encoder_channels"],
                            rotations=rotations)
        self.encoder = enc if pose else NoPoseEncoder(enc)
        self.decoder = build_decoder(s["decoder"], self.window_size, k, s["decoder_hidden"])
        self.rotations = rotations
        self.pixel = 2.0 / (max(self.window_size[1], 2) - 1)
        self.noise = torch.nn.Parameter(torch.zeros(()))  # log sd of a learned Gaussian likelihood
        self.net = torch.nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder})
        self.net.register_parameter("log_noise", self.noise)
        if s["likelihood_sd"] is not None:
            self.noise.requires_grad_(False)  # a fixed likelihood sd: the trainer leaves it alone
        self.log_rotation_prior = losses.rotation_log_prior(rotations, s["angle_prior"], float(s["angle_prior_width"]))

    @property
    def latent_dim(self) -> int:
        return int(self.settings["latent_dim"])

    @property
    def config(self) -> dict[str, Any]:
        """JSON-able description of the model (its settings and window size)."""
        return {**self.settings, "window_size": list(self.window_size)}

    def to(self, device: torch.device) -> RVAE:
        self.device = torch.device(device)
        self.net.to(self.device)
        self.log_rotation_prior = self.log_rotation_prior.to(self.device)
        return self

    # ------------------------------------------------------------------ objective

    def _noise_sd(self) -> torch.Tensor:
        fixed = self.settings["likelihood_sd"]
        if fixed is None:
            return self.noise.exp().clamp(min=1e-3)
        return torch.tensor(float(fixed), device=self.noise.device)

    def loss(self, x: torch.Tensor, beta: float = 1.0, sample: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Negative ELBO per window, averaged over the batch, and its parts (per window).

        ``x`` (B, wy, wx); NaN pixels are left out of the likelihood.
        """
        mask = torch.isfinite(x)
        x = torch.nan_to_num(x, nan=0.0)
        has_missing = not bool(mask.all())
        enc = self.encoder(x)
        enc = {key: value.float() for key, value in enc.items()}
        s = self.settings
        top = int(s["decode_components"])
        marginal = self.rotations > 1 and s["rotation_inference"] == "marginal"
        if marginal:
            top = 0
        if 0 < top < enc["logits"].shape[1]:
            # Truncated categorical posterior: only its `top` most probable rotations carry mass.
            # Still a valid ELBO (a different variational family) and r/top times less decoding.
            keep = enc["logits"].detach().topk(top, dim=1).indices
            full_logits = enc["logits"]
            enc = {**enc, "logits": full_logits.gather(1, keep), "theta_mu": enc["theta_mu"].gather(1, keep),
                   "theta_logsd": enc["theta_logsd"].gather(1, keep)}
            log_prior = self.log_rotation_prior[keep]
            centres = keep.float() * (2 * math.pi / self.rotations)
        else:
            log_prior = self.log_rotation_prior[None].expand_as(enc["logits"])
            centres = torch.arange(enc["logits"].shape[1], device=x.device, dtype=torch.float32)[None] * (2 * math.pi / max(self.rotations, 1))
        background = self._background(x, mask)
        eps = (lambda t: torch.randn_like(t)) if sample else (lambda t: torch.zeros_like(t))
        z = enc["z_mu"] + enc["z_logsd"].exp() * eps(enc["z_mu"])
        t = enc["t_mu"] + enc["t_logsd"].exp() * eps(enc["t_mu"])
        if self.rotations > 1:
            # The equivariant encoder's angle is a discrete rotation (categorical, marginalised)
            # plus a point-estimated offset within it: sampling the offset with a spread as wide
            # as the bin blurs the template and the offset is never learned (measured: angles
            # stay quantised to the bins).
            theta = enc["theta_mu"]
        else:
            theta = enc["theta_mu"] + enc["theta_logsd"].exp() * eps(enc["theta_mu"])
        centre_penalty = torch.zeros_like(z[:, 0])
        if isinstance(self.decoder, TemplateDecoder):
            tpl = self.decoder.template(z)
            decoded = self.decoder(z, theta, t, tpl=tpl).float()           # (B, m, H, W)
            if s["model"] == "rvae":
                # The template's origin is otherwise arbitrary; pinning it to the particle's
                # centroid makes (dx, dy) the particle's position, for every species alike.
                c = self.decoder.centroid(tpl.float()) / self.pixel
                centre_penalty = CENTRE_WEIGHT * (c ** 2).sum(-1)
        else:
            decoded = self.decoder(z, theta, t).float()
        decoded = decoded + background[:, None, None, None]
        xm = x[:, None]
        mm = mask[:, None].float() if has_missing else None
        if self.settings["likelihood"] == "bernoulli":
            rec = losses.bernoulli_nll(xm, decoded, mm)
        else:
            rec = losses.gaussian_nll(xm, decoded, self._noise_sd(), mm)
        q = torch.softmax(enc["logits"], dim=1)
        pose = s["model"] == "rvae"
        if not pose:
            kl_theta = torch.zeros_like(rec)
        elif self.rotations > 1:
            r = self.rotations
            width = math.pi / r if s["angle_prior"] == "uniform" else min(float(s["angle_prior_width"]), math.pi / r)
            # Point offset: only the prior's log-density term N(offset; 0, width) remains.
            kl_theta = 0.5 * ((enc["theta_mu"] - centres) / width) ** 2
        elif s["angle_prior"] == "uniform":
            kl_theta = losses.kl_uniform_angle(enc["theta_logsd"])
        else:
            kl_theta = losses.kl_normal(enc["theta_mu"], enc["theta_logsd"], 0.0, float(s["angle_prior_width"]))
        kl_rot = losses.kl_categorical(enc["logits"], log_prior) if self.rotations > 1 else torch.zeros_like(rec[:, 0])
        if pose:
            kl_t = losses.kl_normal(enc["t_mu"], enc["t_logsd"], 0.0, float(s["translation_prior"]) * self.pixel).sum(-1)
        else:
            kl_t = torch.zeros_like(kl_rot)
        kl_z = losses.kl_normal(enc["z_mu"], enc["z_logsd"]).sum(-1)
        if marginal:
            # The discrete rotation is summed out exactly: -log sum_k p(k) p(x | k, z, d). Its
            # posterior (the responsibilities) weighs every rotation by how well it explains the
            # window, so a rotation the encoder missed still wins when it fits; the encoder's
            # categorical is trained to predict the responsibilities (it aligns z's features).
            log_w = log_prior - rec - beta * kl_theta
            total_rot = -torch.logsumexp(log_w, dim=1)
            resp = torch.softmax(log_w.detach(), dim=1)
            distill = -(resp * torch.log_softmax(enc["logits"], dim=1)).sum(1)
            rec_w = (resp * rec).sum(1)
            kl_angle = (resp * kl_theta).sum(1)
            total = total_rot + distill + beta * (kl_t + kl_z) + centre_penalty
        else:
            rec_w = (q * rec).sum(1)
            kl_angle = (q * kl_theta).sum(1) + kl_rot
            total = rec_w + beta * (kl_angle + kl_t + kl_z) + centre_penalty
        parts = {"rec": rec_w, "centre": centre_penalty, "kl_z": kl_z, "kl_angle": kl_angle, "kl_shift": kl_t}
        return total.mean(), parts

    def _all_responsibilities(self, x: torch.Tensor, enc: dict[str, torch.Tensor],
                              **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior (B, r) over the discrete rotations given the posterior means of z and the shift, the
        rotations decoded (B, r: all) and their decodings (B, r, H, W)."""
        loglik, decoded = self._fit_angles(x, enc, enc["theta_mu"], **kw)
        keep = torch.arange(loglik.shape[1], device=x.device).expand(x.shape[0], -1)
        return torch.softmax(self.log_rotation_prior[None] + loglik, dim=1), keep, decoded

    def _log_likelihood(self, x: torch.Tensor, enc: dict[str, torch.Tensor], theta: torch.Tensor, *,
                        background: torch.Tensor | None = None, tpl: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | z, theta_j, d) (B, m) at the posterior means of z and the shift, for angles ``theta`` (B, m).

        ``background`` (B,) and the decoder's template ``tpl``, when the caller already has them,
        are not computed again.
        """
        return self._fit_angles(x, enc, theta, background=background, tpl=tpl)[0]

    def _fit_angles(self, x: torch.Tensor, enc: dict[str, torch.Tensor], theta: torch.Tensor, *,
                    background: torch.Tensor | None = None,
                    tpl: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_log_likelihood` (B, m) and the decodings (B, m, H, W) it compared (background not added)."""
        kw = {"tpl": tpl} if tpl is not None else {}
        raw = self.decoder(self._decoder_z(enc), theta, enc["t_mu"], **kw).float()
        if background is None:
            background = self._background(torch.nan_to_num(x, nan=0.0), torch.isfinite(x))
        return self._window_log_likelihood(x, raw, background), raw

    def _decoder_z(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's input at the posterior mean (class models add their most probable class)."""
        if "class_logits" in enc and hasattr(self, "_with_class"):
            return self._with_class(enc["z_mu"], enc["class_logits"].argmax(1))
        return enc["z_mu"]

    def _background(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-window background level added to the decoding (0 unless ``background: median``).

        Scan lines and uneven substrates shift whole windows up or down; taking that out of
        the decoder keeps the content latents for the particle's shape.
        """
        if self.settings["background"] != "median" or self.settings["likelihood"] == "bernoulli":
            return torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
        if bool(mask.all()):
            return row_median(x.flatten(1).float())
        flat = torch.where(mask, x, torch.nan).flatten(1).float()
        return torch.nan_to_num(flat.nanmedian(dim=1).values, nan=0.0)

    # ------------------------------------------------------------------ training

    def fit(self, windows, *, epochs: int | None = None, batch_size: int | None = None,
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, device: str = "auto",
            progress: bool = True, history_path: str | os.PathLike | None = None, callback=None):
        """Train on ``windows`` (array (n, wy, wx) or patches.zarr paths); returns the history.

        See :func:`rvae_tools.rvae.trainer.fit` for the parameters.
        """
        return _fit(self, windows, epochs=epochs, batch_size=batch_size, checkpoint_dir=checkpoint_dir,
                   resume=resume, device=device, progress=progress, history_path=history_path,
                   callback=callback)

    # ------------------------------------------------------------------ inference

    def _batches(self, windows, batch_size: int):
        from .data import WindowSource

        source = windows if hasattr(windows, "iter_batches") else WindowSource(windows)
        if tuple(source.window_size) != self.window_size:
            raise InputError(f"windows are {source.window_size[0]}x{source.window_size[1]} pixels but the model "
                             f"was trained on {self.window_size[0]}x{self.window_size[1]}")
        return source, source.iter_batches(np.arange(len(source)), batch_size)

    def _prepare(self, device: str | torch.device):
        from ..device import select_device

        dev = device if isinstance(device, torch.device) else select_device(device)
        self.to(dev)
        self.net.eval()
        return dev

    def encode(self, windows, batch_size: int | None = None, device: str | torch.device = "auto",
               method: str | None = None, refine: bool = False) -> dict[str, np.ndarray]:
        """Posterior means and spreads of every window.

        Parameters
        ----------
        refine : bool
            For ``exact`` and ``fast`` with an equivariant encoder: refine the angle
            continuously around the best rotation bin (:meth:`_refine_angle`), so angles are
            not quantised to the r rotations' grid; ``False`` (default here) reports the best
            bin's angle. ``rvae-tools encode`` takes it from the ``refine_angle`` setting
            (default true). The spread calibration
            (:func:`.uncertainty.fit_calibration`) gives each window's transformed copy fresh
            noise: with copies that shared their noise the refined angles of a pair agreed so
            closely that the fitted floor shrank (L windows, tests/test_rvae.py: 0.023 to
            0.0026 rad) while the error against the truth dropped less (median 1.36 to 1.10
            degrees), and 68 % intervals covered 0.44. On the real rotated colony of tests/test_realdata_rotated.py (3 epochs, seed 0)
            it raised the angle's agreement with the mask ellipses from 0.955 to 0.979 (the
            detector's image moments: 0.972) and its following of the known turn from 0.942 to
            0.990; encode speed (default architecture, one thread) exact 1.0x, fast 0.8x.
        method : {"exact", "fast", "encoder"}, optional
            How the posterior over the equivariant encoder's discrete rotations is found
            (default: the ``encode_method`` setting). ``exact``: every one of the r rotations is
            decoded and the responsibilities computed; ``fast``: only the encoder's most
            probable rotations and their half-turns are decoded (at most 8 of the r) and the
            exact responsibilities computed among them (see :meth:`_candidate_responsibilities`);
            ``encoder``: nothing is decoded: the encoder's own rotation posterior (trained to
            match the exact responsibilities) and its own posterior spreads of the angle and
            the shift (no likelihood curvature), the cheapest and least exact.

        Returns
        -------
        dict of ndarray
            ``angle`` (n,) rad in [-pi, pi): the most probable rotation component's angle,
            refined to the likelihood's maximum near it (``refine``);
            ``angle_sd`` (rad): spread of the angle about it within its half-circle: the
            rotation posterior's spread there plus the continuous offset's spread (local
            curvature of the likelihood, see :meth:`_laplace`);
            ``flip_prob``: posterior probability that the particle points the other way (its
            angle more than pi/2 from ``angle``; 0.5 for a rod whose ends look alike; NaN for
            encoders without a rotation posterior);
            ``rotation_prob``: the probability of the most probable component;
            ``dx``, ``dy``, ``dx_sd``, ``dy_sd`` in pixels (spreads from the likelihood's
            curvature); ``z``, ``z_sd`` (n, k) (the encoder's posterior);
            ``background``: the level added to the decoding (``background: median``).
        """
        method = method or self.settings.get("encode_method", "exact")
        if method not in ENCODE_METHODS:
            raise InputError(f"encode method {method!r} is unknown; expected one of {', '.join(ENCODE_METHODS)}")
        batch_size = int(batch_size or self.settings["encode_batch_size"])
        source, batches = self._batches(windows, batch_size)
        dev = self._prepare(device)
        out = self._encode_buffers(len(source))
        # The pose's spreads come from the likelihood's curvature for every model with a pose:
        # the plain rVAE and the class models (ssrvae, jrvae) alike, whose decoder also takes
        # the class (see _decoder_z).
        pose = bool(getattr(self, "pose", self.settings["model"] == "rvae"))
        with torch.inference_mode():
            for idx, block in batches:
                x, enc = self._encode_block(block, dev)
                q = torch.softmax(enc["logits"], dim=1)
                background = self._background(torch.nan_to_num(x), torch.isfinite(x))
                # One template per window, shared by every decoding below (rotations and Laplace).
                zdec = self._decoder_z(enc)
                decode = method != "encoder"
                tpl = (self.decoder.template(zdec)
                       if isinstance(self.decoder, TemplateDecoder) and pose and decode else None)
                fitted = None   # the decoding at the reported pose, when the rotations were decoded
                if self.rotations > 1 and method != "encoder":
                    if method == "exact":
                        q, keep, decoded = self._all_responsibilities(x, enc, background=background, tpl=tpl)
                    else:
                        q, keep, decoded = self._candidate_responsibilities(x, enc, q, background=background, tpl=tpl)
                best = q.argmax(1, keepdim=True)
                if self.rotations > 1 and method != "encoder":
                    fitted = decoded.gather(1, _position(keep, best)[:, :, None, None].expand(
                        -1, 1, *decoded.shape[2:]))[:, 0]
                theta = enc["theta_mu"].gather(1, best)[:, 0]
                refined = refine and self.rotations > 1 and pose and decode
                if refined:
                    # The rotation search is on a grid of 2 pi / r; the likelihood is continuous
                    # in the angle, so the reported angle is its maximum near the best bin.
                    theta = self._refine_angle(x, enc, theta, fitted, background, tpl=tpl)
                    fitted = None   # the Laplace step decodes at the refined angle itself
                theta = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi
                if pose and decode:
                    var = self._laplace(x, zdec, theta, enc["t_mu"], background, tpl=tpl, fitted=fitted)
                elif pose:
                    var = torch.cat([enc["theta_logsd"].gather(1, best) if self.rotations > 1
                                     else enc["theta_logsd"][:, :1], enc["t_logsd"]], 1).exp() ** 2
                else:
                    var = torch.full((x.shape[0], 3), math.nan, device=x.device)
                if self.rotations > 1:
                    diff = torch.remainder(enc["theta_mu"] - theta[:, None] + math.pi, 2 * math.pi) - math.pi
                    if refined:
                        # The best bin's mass sits at the refined angle; its spread about it is
                        # the Laplace term below, not the bin's offset from the refined angle.
                        diff = diff.scatter(1, best, 0.0)
                    near = diff.abs() <= math.pi / 2
                    mass = (q * near).sum(1).clamp(min=1e-12)
                    # The rotation posterior's spread within the reported angle's half-circle;
                    # the other half is the flip, reported as its own probability.
                    angle_var = (q * near * diff ** 2).sum(1) / mass + var[:, 0]
                    flip = 1.0 - (q * near).sum(1)
                else:
                    angle_var = enc["theta_logsd"][:, 0].exp() ** 2 if not pose else var[:, 0]
                    flip = torch.full_like(theta, math.nan)
                res = {
                    "angle": theta,
                    "angle_sd": angle_var.sqrt(),
                    "flip_prob": flip.clamp(0, 1),
                    "rotation_prob": q.gather(1, best)[:, 0],
                    "dx": enc["t_mu"][:, 0] / self.pixel,
                    "dy": enc["t_mu"][:, 1] / self.pixel,
                    "dx_sd": var[:, 1].sqrt() / self.pixel,
                    "dy_sd": var[:, 2].sqrt() / self.pixel,
                    "z": enc["z_mu"],
                    "z_sd": enc["z_logsd"].exp(),
                    "background": background,
                }
                for name, value in res.items():
                    out[name][idx] = value.cpu().numpy()
        return out

    def _encode_buffers(self, n: int) -> dict[str, np.ndarray]:
        """Empty outputs of :meth:`encode` for ``n`` windows (filled batch by batch)."""
        out = {name: np.empty(n, dtype=np.float32) for name in
               ("angle", "angle_sd", "flip_prob", "rotation_prob", "dx", "dy", "dx_sd", "dy_sd", "background")}
        out["z"] = np.empty((n, self.latent_dim), dtype=np.float32)
        out["z_sd"] = np.empty((n, self.latent_dim), dtype=np.float32)
        return out

    def _encode_block(self, block: np.ndarray, dev: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One batch of windows on ``dev`` and the encoder's posterior for it (float32, NaN pixels read as 0)."""
        from ..device import autocast, to_device

        x = to_device(torch.from_numpy(block), dev)
        with autocast(dev):
            enc = self.encoder(torch.nan_to_num(x, nan=0.0))
        return x, {key: value.float() for key, value in enc.items()}

    def _candidate_responsibilities(self, x: torch.Tensor, enc: dict[str, torch.Tensor], q: torch.Tensor,
                                    top: int = FAST_CANDIDATES,
                                    **kw) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact responsibilities (B, r) among a few candidate rotations, 0 elsewhere; the candidates
        (B, c) and their decodings (B, c, H, W).

        The candidates are the encoder's ``top`` most probable rotations and their half-turns
        (at most ``2 top`` of the r rotations are decoded). The half-turns are there because
        the encoder's categorical tells a polar particle's ends apart worse than decoding does
        (measured: with the top two alone the tadpole's angle consistency fell from 0.99 to
        0.72), and the answer for a particle whose ends look alike is a posterior split
        between the two (its ``flip_prob``).
        """
        r = q.shape[1]
        top = min(top, r)
        keep = q.topk(top, dim=1).indices
        if r % 2 == 0:
            flips = (keep + r // 2) % r
            dup = (flips[:, :, None] == keep[:, None, :]).any(-1)
            keep = torch.cat([keep, flips], 1)
            dup = torch.cat([torch.zeros_like(dup), dup], 1)
        else:
            dup = torch.zeros_like(keep, dtype=torch.bool)
        loglik, decoded = self._fit_angles(x, enc, enc["theta_mu"].gather(1, keep), **kw)
        # A rotation listed twice (the half-turn of another candidate) counts once.
        log_w = (self.log_rotation_prior[keep] + loglik).masked_fill(dup, -math.inf)
        return torch.zeros_like(q).scatter_add(1, keep, torch.softmax(log_w, dim=1)), keep, decoded

    def _refine_angle(self, x: torch.Tensor, enc: dict[str, torch.Tensor], theta: torch.Tensor,
                      fitted: torch.Tensor, background: torch.Tensor,
                      tpl: torch.Tensor | None = None) -> torch.Tensor:
        """The angle (B,) rad maximising log p(x | z, angle, d) near the best bin's angle ``theta`` (B,).

        Successive three-point parabolic interpolation of the log-likelihood (at the posterior
        means of z and the shift), with half-widths :data:`REFINE_STEPS` bins: each step moves
        to the parabola's vertex, clipped to the three points' span, or to the best of the
        three where the log-likelihood is not concave there. ``fitted`` (B, H, W), the decoding
        at ``theta`` without the background, gives the first step's middle point. Costs
        ``3 len(REFINE_STEPS) - 1`` decodings of one rotation per window.
        """
        bin_width = 2 * math.pi / self.rotations
        mid = self._window_log_likelihood(x, fitted[:, None], background)[:, 0]
        for step in REFINE_STEPS:
            h = step * bin_width
            if mid is None:
                pts = torch.stack([theta - h, theta, theta + h], 1)
                lo, mid, hi = self._fit_angles(x, enc, pts, background=background, tpl=tpl)[0].unbind(1)
            else:
                pts = torch.stack([theta - h, theta + h], 1)
                lo, hi = self._fit_angles(x, enc, pts, background=background, tpl=tpl)[0].unbind(1)
            curve = lo - 2 * mid + hi
            concave = curve < 0
            vertex = 0.5 * h * (lo - hi) / torch.where(concave, curve, torch.full_like(curve, -1.0))
            # Not concave: step to the better of the outer points when it beats the middle.
            edge = torch.where(hi >= lo, h, -h) * (torch.maximum(lo, hi) > mid)
            theta = theta + torch.where(concave, vertex.clamp(-h, h), edge)
            mid = None
        return theta

    def _window_log_likelihood(self, x: torch.Tensor, raw: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """log p(x | decoding) (B, m) of decodings ``raw`` (B, m, H, W) without the background."""
        mask = torch.isfinite(x)
        x0 = torch.nan_to_num(x, nan=0.0)
        mm = mask[:, None].float() if not bool(mask.all()) else None
        if self.settings["likelihood"] == "bernoulli":
            return -losses.bernoulli_nll(x0[:, None], raw.float() + background[:, None, None, None], mm)
        # The background taken off the window (B pixels) rather than added to every
        # decoding (B m pixels): the same residual, one pass over the decodings fewer.
        return -losses.gaussian_nll((x0 - background[:, None, None])[:, None], raw.float(), self._noise_sd(), mm)

    def _laplace(self, x: torch.Tensor, z: torch.Tensor, theta: torch.Tensor, shift: torch.Tensor,
                 background: torch.Tensor, tpl: torch.Tensor | None = None,
                 fitted: torch.Tensor | None = None) -> torch.Tensor:
        """Variances (B, 3) of (angle rad, dx, dy grid units) from the likelihood's local curvature.

        A Gauss-Newton (Laplace) approximation at the reported pose with ``J`` the derivative
        of the decoded window with respect to (angle, dx, dy) (forward differences) and the
        window's own residual, whose spatial correlation is counted
        (:func:`.uncertainty.pose_covariance`), so a window the model fits badly gets wide
        intervals. Costs three decodings of one rotation per window, in one decoder call, and a
        fourth at the pose itself unless ``fitted`` (B, H, W), the decoding there without the
        background, is given.
        """
        eps_a, eps_t = 1e-2, 0.05 * self.pixel
        th = theta[:, None]
        kw = {}
        if isinstance(self.decoder, TemplateDecoder):
            kw["tpl"] = self.decoder.template(z) if tpl is None else tpl
        ex = torch.tensor([eps_t, 0.0], device=x.device)
        ey = torch.tensor([0.0, eps_t], device=x.device)
        # (angle + eps, shift), (angle, shift + ex), (angle, shift + ey) [and (angle, shift)].
        angles = [th + eps_a, th, th] + ([th] if fitted is None else [])
        shifts = [shift, shift + ex, shift + ey] + ([shift] if fitted is None else [])
        moved = self.decoder(z, torch.cat(angles, 1), torch.stack(shifts, 1), **kw).float()
        centre = moved[:, 3] if fitted is None else fitted.float()
        images = [centre, moved[:, 0], moved[:, 1], moved[:, 2]]
        if self.settings["likelihood"] == "bernoulli":
            images = [torch.sigmoid(im) for im in images]
        mean = images[0] + background[:, None, None]
        jac = torch.stack([(images[1] - images[0]) / eps_a, (images[2] - images[0]) / eps_t,
                           (images[3] - images[0]) / eps_t], 1)                      # (B, 3, H, W)
        mask = torch.isfinite(x).float()
        return pose_covariance(jac, (torch.nan_to_num(x) - mean) * mask, mask)

    def decode(self, z, angle=None, dx=None, dy=None, device: str | torch.device = "cpu") -> np.ndarray:
        """Images (n, wy, wx) of content ``z`` (n, k) at ``angle`` (rad) and shifts (px); None = 0."""
        z = self._content(z)
        return self._decode_at(lambda zt: zt, z, angle, dx, dy, device)

    def _content(self, z) -> np.ndarray:
        """``z`` as a float32 (n, latent_dim) array; InputError when its width is not the model's."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        if self.latent_dim == 0:
            z = z.reshape(-1, 0)
        if z.shape[1] != self.latent_dim:
            raise InputError(f"z has {z.shape[1]} columns but the model has latent_dim {self.latent_dim}")
        return z

    def _decode_at(self, decoder_input, z: np.ndarray, angle, dx, dy, device) -> np.ndarray:
        """Decode content ``z`` at the given poses, 1024 windows at a time.

        ``decoder_input`` maps the content tensor to what the decoder takes (a subclass adds
        its class one-hot there), so every model shares this one batched loop.
        """
        n = z.shape[0]

        def column(v):
            if v is None:
                return np.zeros(n, dtype=np.float32)
            return np.broadcast_to(np.asarray(v, dtype=np.float32).reshape(-1), (n,)).copy()

        dev = self._prepare(device)
        with torch.inference_mode():
            zt = decoder_input(torch.from_numpy(z).to(dev))
            theta = torch.from_numpy(column(angle)).to(dev)[:, None]
            shift = torch.from_numpy(np.stack([column(dx), column(dy)], 1) * self.pixel).to(dev)
            images = []
            for start in range(0, n, 1024):
                sl = slice(start, start + 1024)
                out = self.decoder(zt[sl], theta[sl], shift[sl])[:, 0].float()
                if self.settings["likelihood"] == "bernoulli":
                    out = torch.sigmoid(out)
                images.append(out.cpu().numpy())
        return np.concatenate(images) if images else np.empty((0, *self.window_size), np.float32)

    def reconstruct(self, windows, batch_size: int | None = None, device: str | torch.device = "auto") -> np.ndarray:
        """Each window decoded at its own encoded pose and content (posterior means)."""
        enc = self.encode(windows, batch_size=batch_size, device=device)
        images = self.decode(enc["z"], enc["angle"], enc["dx"], enc["dy"])
        return images + enc["background"][:, None, None]

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds about the model (tensors and JSON-able values only)."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.settings["model"],
            "config": self.config,
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "normalisation": dict(self.normalisation),
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write the model atomically to ``path``; returns (and stores) its SHA-256."""
        from ..io import atomic_output
        from ..provenance import file_sha256, provenance_attrs

        payload = self.state()
        payload["provenance"] = provenance_attrs(settings=self.settings, seed=int(self.settings["seed"]), stage="train")
        with atomic_output(path) as tmp:
            torch.save(payload, tmp)
        self.checksum = file_sha256(path)
        return self.checksum

    @classmethod
    def from_state(cls, payload: dict[str, Any], source: str = "checkpoint") -> RVAE:
        """A model from checkpoint contents checked by :func:`.checkpoint.read_checkpoint`."""
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise InputError(f"{source}: not an rvae-tools model checkpoint (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})")
        if payload.get("kind") == "gmm":
            raise InputError(f"{source}: checkpoint holds a Gaussian mixture, not a neural model (use load_model)")
        if payload.get("kind") == "rvae3d" and getattr(cls, "KIND", None) != "rvae3d":
            raise InputError(f"{source}: checkpoint holds an rvae3d model (3D rotation latent), not a "
                             f"{payload['config'].get('model', 'rvae')!r}-style in-plane model; load it with rvae.model: rvae3d")
        config = dict(payload["config"])
        window_size = tuple(config.pop("window_size"))
        try:
            model = cls(window_size, **config)
        except (InputError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: its configuration is not valid here ({str(exc).splitlines()[0]})") from None
        try:
            model.net.load_state_dict(payload["state_dict"])
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: weights do not fit the model its config describes ({str(exc).splitlines()[0]})") from None
        model.normalisation = dict(payload.get("normalisation") or {})
        return model

    @classmethod
    def load(cls, path: str | os.PathLike, *, window_size: int | tuple[int, int] | None = None,
             latent_dim: int | None = None) -> RVAE:
        """Load a model saved by :meth:`save` (without unpickling arbitrary objects).

        ``window_size`` / ``latent_dim``, when given, must match the checkpoint.
        """
        from ..provenance import file_sha256

        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: model checkpoint not found")
        payload = read_checkpoint(path)
        model = cls.from_state(payload, str(path))
        check_compatible(model.config, str(path), window_size=window_size, latent_dim=latent_dim)
        model.checksum = file_sha256(path)
        return model


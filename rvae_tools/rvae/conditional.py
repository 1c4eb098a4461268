"""The angle-conditional rVAE (``rvae.condition: angle``): the decoder is given each window's known angle.

As in the conditional VAE of the orientation poster, the particle's angle is not inferred but
known for every window, and the decoder draws the canonical particle ``T_z`` rotated by it;
the encoder infers only the shift and the content ``z`` (with the equivariant encoder, ``z``
does not depend on the orientation). Where the angle comes from:

- in the workflow and from ``patches.zarr`` paths: the windows' ``orientation`` coordinate,
  the segmenter's major axis (rad, counter-clockwise from +x towards +y, the convention of
  ``truth.parquet``);
- through the API: ``angles=`` (rad, one per window) to :meth:`AngleConditionedRVAE.fit`,
  :meth:`~AngleConditionedRVAE.encode` and :meth:`~AngleConditionedRVAE.reconstruct`.

``known_angle: axis`` (the default) says the angle is known only up to a half turn, as an axis
from the moments of a mask is: the two senses ``a`` and ``a + pi`` are the two components of a
discrete latent with a uniform prior, summed out exactly (the same marginal rotation inference
as :meth:`RVAE.loss`, over two fixed angles instead of r learned ones). ``known_angle: full``
takes the angle as it is.

Objective per window, in nats (``s`` the sense, ``m`` = 2 senses for ``axis``, 1 for ``full``):

    -log sum_s (1/m) p(x | z, a + s pi, d) + beta * (KL(q(z) || N(0, I)) + KL(q(d) || p(d))) + centre

(the reconstruction term at one sample of ``z`` and ``d``, as in the rVAE), reported as the
parts ``rec`` (expected under the exact sense posterior), ``kl_angle`` (its KL to the uniform
prior over the senses), ``kl_z``, ``kl_shift``, ``centre``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from . import losses
from .data import AnnotatedWindows, WindowSource
from .model import CENTRE_WEIGHT, RVAE
from .networks import TemplateDecoder


class AngledWindows(AnnotatedWindows):
    """Windows with their known angle (rad, one per window) for training the angle-conditional model.

    While batches are drawn, ``batch_angles`` holds the angles of the batch last yielded; the
    model reads them in :meth:`AngleConditionedRVAE.loss` (the trainer passes windows only).
    """

    def __init__(self, windows, angles: np.ndarray | None, memory_mb: float = 2048.0):
        super().__init__(windows, memory_mb=memory_mb)
        self.angles = known_angles(self, angles)
        self.batch_angles: np.ndarray | None = None

    def iter_batches(self, index, batch_size, rng=None, buffer_batches: int = 32):
        for sel, block in super().iter_batches(index, batch_size, rng, buffer_batches):
            self.batch_angles = self.angles[sel]
            yield sel, block


def known_angles(source: WindowSource, angles=None) -> np.ndarray:
    """The known angle (n,) rad of every window of ``source``: ``angles`` when given, else the stores' ``orientation``.

    Raises
    ------
    InputError
        No angles and no patches stores (array windows), a store without ``orientation``, a
        count that differs from the windows', or a non-finite angle (named by store and obs).
    """
    if angles is not None:
        a = np.asarray(angles, dtype=np.float64).reshape(-1)
        if a.shape != (len(source),):
            raise InputError(f"angles: {a.size} known angles for {len(source)} windows; expected one per window (rad)")
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise InputError(f"angles: window(s) {', '.join(map(str, bad[:5]))}{' ...' if bad.size > 5 else ''} have "
                             f"no finite angle ({bad.size} of {a.size}); rvae.condition: angle needs a known angle "
                             "(rad) for every window")
        return a.astype(np.float32)
    if not source.paths:
        raise InputError("angles: rvae.condition: angle needs the known angle of every window; expected angles= "
                         "(rad, one per window) or patches.zarr stores with an orientation coordinate")
    if int(source.counts[:len(source.paths)].sum()) != len(source):
        raise InputError(f"{', '.join(source.names[len(source.paths):])}: windows without a patches store have no "
                         "known angle; rvae.condition: angle expected angles= (rad, one per window)")
    import zarr

    parts = []
    for path, count in zip(source.paths, source.counts):
        group = zarr.open_group(str(path), mode="r")
        if "orientation" not in group:
            raise InputError(f"{path}: no orientation coordinate; rvae.condition: angle takes each window's known angle "
                             "from it (the segmenter's major axis); expected windows cut from detections with an "
                             "orientation (segment.method unet or classical, not locate)")
        a = np.asarray(group["orientation"][:], dtype=np.float64)
        if a.shape != (int(count),):
            raise InputError(f"{path}: orientation has {a.size} values for {int(count)} windows; expected one per window")
        bad = np.flatnonzero(~np.isfinite(a))
        if bad.size:
            raise InputError(f"{path}: orientation is NaN at obs {', '.join(map(str, bad[:5]))}"
                             f"{' ...' if bad.size > 5 else ''} ({bad.size} of {a.size} windows); rvae.condition: "
                             "angle needs a known angle for every window (use condition: none for these windows)")
        parts.append(a)
    return np.concatenate(parts).astype(np.float32)


class AngleConditionedRVAE(RVAE):
    """The rVAE whose decoder is given each window's known angle (``rvae.condition: angle``).

    Parameters are those of :class:`RVAE`; only ``model: rvae`` can be conditioned on the angle.
    """

    def _build(self) -> None:
        if self.settings["model"] != "rvae" or self.settings.get("condition") != "angle":
            raise InputError(f"rvae.condition: angle is a variant of rvae.model rvae; got model "
                             f"{self.settings['model']!r} with condition {self.settings.get('condition')!r}")
        super()._build()
        self.senses = 2 if self.settings["known_angle"] == "axis" else 1
        self._angle_source: AngledWindows | None = None

    def candidates(self, angles: torch.Tensor) -> torch.Tensor:
        """The angles (B, m) rad the window may have given its known angle (B,): ``a`` and, for an axis, ``a + pi``."""
        return angles.float()[:, None] + math.pi * torch.arange(self.senses, device=angles.device, dtype=torch.float32)

    def _batch_angles(self, n: int) -> torch.Tensor:
        src = self._angle_source
        if src is None or src.batch_angles is None or len(src.batch_angles) != n:
            raise InputError("rvae.condition: angle: the loss needs the windows' known angles; expected angles= "
                             f"({n} values, rad)")
        return torch.from_numpy(src.batch_angles)

    def loss(self, x: torch.Tensor, beta: float = 1.0, sample: bool = True,
             angles: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Negative ELBO per window given its known angle (module docstring), batch mean, and its parts.

        ``x`` (B, wy, wx), NaN pixels left out of the likelihood; ``angles`` (B,) rad, None = the
        angles of the batch being trained on (see :class:`AngledWindows`).
        """
        mask = torch.isfinite(x)
        x = torch.nan_to_num(x, nan=0.0)
        angles = (self._batch_angles(x.shape[0]) if angles is None else torch.as_tensor(angles)).to(x.device)
        enc = {key: value.float() for key, value in self.encoder(x).items()}
        s = self.settings
        eps = (lambda t: torch.randn_like(t)) if sample else (lambda t: torch.zeros_like(t))
        z = enc["z_mu"] + enc["z_logsd"].exp() * eps(enc["z_mu"])
        t = enc["t_mu"] + enc["t_logsd"].exp() * eps(enc["t_mu"])
        theta = self.candidates(angles)
        centre = torch.zeros_like(z[:, 0])
        if isinstance(self.decoder, TemplateDecoder):
            tpl = self.decoder.template(z)
            decoded = self.decoder(z, theta, t, tpl=tpl).float()
            # As in RVAE.loss: the template's centroid is the particle's position.
            centre = CENTRE_WEIGHT * ((self.decoder.centroid(tpl.float()) / self.pixel) ** 2).sum(-1)
        else:
            decoded = self.decoder(z, theta, t).float()
        decoded = decoded + self._background(x, mask)[:, None, None, None]
        mm = mask[:, None].float() if not bool(mask.all()) else None
        if s["likelihood"] == "bernoulli":
            rec = losses.bernoulli_nll(x[:, None], decoded, mm)
        else:
            rec = losses.gaussian_nll(x[:, None], decoded, self._noise_sd(), mm)
        log_w = -rec - math.log(self.senses)
        resp = torch.softmax(log_w.detach(), 1)
        kl_t = losses.kl_normal(enc["t_mu"], enc["t_logsd"], 0.0, float(s["translation_prior"]) * self.pixel).sum(-1)
        kl_z = losses.kl_normal(enc["z_mu"], enc["z_logsd"]).sum(-1)
        total = -torch.logsumexp(log_w, 1) + beta * (kl_t + kl_z) + centre
        kl_sense = (resp * (resp.clamp(min=1e-12).log() + math.log(self.senses))).sum(1)
        parts = {"rec": (resp * rec).sum(1), "centre": centre, "kl_z": kl_z, "kl_angle": kl_sense, "kl_shift": kl_t}
        return total.mean(), parts

    # ------------------------------------------------------------------ training

    def fit(self, windows, *, angles: np.ndarray | None = None, **kwargs):
        """Train on ``windows`` with their known ``angles`` (rad, one per window; default: the stores' orientation).

        Other keywords as :meth:`RVAE.fit`.
        """
        from .trainer import fit

        source = AngledWindows(windows, angles, memory_mb=float(self.settings["memory_mb"]))
        self._angle_source = source
        try:
            return fit(self, source, **kwargs)
        finally:
            self._angle_source = None

    # ------------------------------------------------------------------ inference

    def encode(self, windows, batch_size: int | None = None, device: str | torch.device = "auto",
               method: str | None = None, angles: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Posterior means and spreads of every window given its known angle.

        ``angles`` (n,) rad, default: the stores' ``orientation`` (see :func:`known_angles`);
        ``method`` is accepted for the encode stage's sake and has no effect (the angle is not
        inferred). Returns the keys of :meth:`RVAE.encode`: ``angle`` is the more probable of the
        candidates (rad in [-pi, pi)), ``angle_sd`` 0 (the angle is given), ``flip_prob`` the
        posterior probability of the other sense (0 for ``known_angle: full``),
        ``rotation_prob`` that of the reported one.
        """
        source = windows if isinstance(windows, WindowSource) else WindowSource(windows)
        known = known_angles(source, angles)
        batch_size = int(batch_size or self.settings["encode_batch_size"])
        source, batches = self._batches(source, batch_size)
        dev = self._prepare(device)
        out = self._encode_buffers(len(source))
        with torch.inference_mode():
            for idx, block in batches:
                x, enc = self._encode_block(block, dev)
                theta = self.candidates(torch.from_numpy(known[idx]).to(dev))
                q = torch.softmax(self._log_likelihood(x, enc, theta), 1)
                best = q.argmax(1, keepdim=True)
                angle = theta.gather(1, best)[:, 0]
                angle = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
                background = self._background(torch.nan_to_num(x), torch.isfinite(x))
                var = self._laplace(x, enc["z_mu"], angle, enc["t_mu"], background)
                res = {"angle": angle, "angle_sd": torch.zeros_like(angle),
                       "flip_prob": 1.0 - q.gather(1, best)[:, 0], "rotation_prob": q.gather(1, best)[:, 0],
                       "dx": enc["t_mu"][:, 0] / self.pixel, "dy": enc["t_mu"][:, 1] / self.pixel,
                       "dx_sd": var[:, 1].sqrt() / self.pixel, "dy_sd": var[:, 2].sqrt() / self.pixel,
                       "z": enc["z_mu"], "z_sd": enc["z_logsd"].exp(), "background": background}
                for name, value in res.items():
                    out[name][idx] = value.cpu().numpy()
        return out

    def reconstruct(self, windows, batch_size: int | None = None, device: str | torch.device = "auto",
                    angles: np.ndarray | None = None) -> np.ndarray:
        """Each window decoded at its known angle (the more probable sense), encoded shift and content."""
        enc = self.encode(windows, batch_size=batch_size, device=device, angles=angles)
        images = self.decode(enc["z"], enc["angle"], enc["dx"], enc["dy"])
        return images + enc["background"][:, None, None]


def is_angle_conditioned(settings: dict[str, Any]) -> bool:
    """Whether the (validated) ``rvae`` settings describe the angle-conditional model."""
    return settings.get("model", "rvae") == "rvae" and settings.get("condition") == "angle"

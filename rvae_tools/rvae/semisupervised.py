"""Class latents for the rVAE: semi-supervised (ssrvae), joint without labels (jrvae),
conditional (``condition: class``) and the pose-less semi-supervised baseline (ssvae), on one
code path.

Generative model: a class ``y ~ Cat(1/K)`` next to the rVAE's rotation, shift and content
``z ~ N(0, I)``; the decoder is given ``[z, onehot(y)]``. Inference: the rVAE encoder for
``q(theta, d, z | x)`` and a classifier head ``q(y | x)``. With the equivariant encoder the head
sees the window only through rotation-invariant summaries of the polar-grid features (their
mean, maximum and angular Fourier magnitudes, all unchanged by a cyclic shift along the angle
axis, i.e. by a rotation of the window), on a grid centred on the estimated particle centre, so
its output does not depend on the particle's orientation or position by construction.

Objective per window, in nats (``L(x, y)`` is the rVAE's negative ELBO given the class, with
the discrete rotation summed out exactly as in :meth:`RVAE.loss`):

    labelled (x, y):  L(x, y) + log K + class_weight * (N / N_labelled) * (-log q(y | x))
    unlabelled x:     sum_y q(y | x) L(x, y) + KL(q(y | x) || Cat(1/K))

The unlabelled class is summed out exactly over all K classes (no sampling). ``condition:
class`` is the same model with every window labelled (the classifier is still trained, so the
model can classify windows without labels).

jrvae is the same model with every window unlabelled. The ELBO alone does not make the class
informative (the decoder can carry the classes in z, and every window drifts into one class),
so two terms are added during training (:meth:`ClassRVAE._guide_terms`): a pull towards initial
classes (a Gaussian mixture on rotation-invariant descriptors of the windows,
:func:`initial_classes`; the classifier is fitted to them before training and the pull fades
over ``class_init_epochs``), and ``class_balance * KL(batch mean of q || initial fractions)``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLASS_MODELS
from ..errors import InputError
from . import losses
from .data import AnnotatedWindows
from .model import CENTRE_WEIGHT, RVAE
from .networks import (
    EquivariantEncoder,
    NoPoseEncoder,
    TemplateDecoder,
    _ConvTrunk,
    _mlp,
    build_decoder,
    build_encoder,
)

log = logging.getLogger(__name__)

#: Class models trained without labels: the classes are found by the model.
UNSUPERVISED_MODELS = ("jrvae",)
#: jrvae: encoder steps fitting the classifier to the initial classes before training (see
#: ClassRVAE._fit_classifier_to_guide).
CLASS_INIT_STEPS = 200
#: Angular Fourier magnitudes (beyond the mean) the classifier sees per feature channel.
HARMONICS = 4


def invariant_features(feats: torch.Tensor, harmonics: int = HARMONICS) -> torch.Tensor:
    """Rotation-invariant summaries (B, C * (2 + h)) of polar features (B, C, A).

    A rotation of the window by a multiple of the angular sampling step is a cyclic shift of
    the last axis; the mean, the maximum and the magnitudes of the Fourier coefficients along
    it do not change under such a shift.
    """
    f = feats.float()
    a = f.shape[-1]
    h = max(0, min(int(harmonics), a // 2))
    parts = [f.mean(-1), f.amax(-1)]
    if h:
        parts.append((torch.fft.rfft(f, dim=-1)[..., 1:h + 1].abs() / a).flatten(1))
    return torch.cat(parts, 1)


def polar_descriptors(windows: np.ndarray, radius: float | None = None, rings: int = 10, angles: int = 32,
                      harmonics: int = HARMONICS) -> np.ndarray:
    """Rotation-invariant descriptors (n, rings * (harmonics + 1)) of windows (n, wy, wx), computed without a network.

    Each window minus its median is sampled bilinearly on ``rings`` circles of radius 0 ..
    ``radius`` px (default 0.28 of the smaller side: the particle, not its neighbours at the
    window's edge) about the window's centre, ``angles`` points each; per ring the magnitudes of
    the angular Fourier coefficients 0 .. ``harmonics`` (intensity units) are kept. Turning the
    window about its centre shifts each ring cyclically, which leaves them unchanged.
    """
    x = np.asarray(windows, dtype=np.float32)
    n, h, w = x.shape
    radius = 0.28 * min(h, w) if radius is None else float(radius)
    r = np.linspace(0.0, radius, rings)
    a = np.arange(angles) * (2 * np.pi / angles)
    py = ((h - 1) / 2 + r[:, None] * np.sin(a)[None]).ravel()
    px = ((w - 1) / 2 + r[:, None] * np.cos(a)[None]).ravel()
    # Bilinear sampling as one (points, pixels) matrix, shared by every window.
    sampling = np.zeros((py.size, h * w), dtype=np.float32)
    y0, x0 = np.floor(py).astype(int), np.floor(px).astype(int)
    for dy in (0, 1):
        for dx in (0, 1):
            wt = (1 - np.abs(py - (y0 + dy))) * (1 - np.abs(px - (x0 + dx)))
            yy, xx = np.clip(y0 + dy, 0, h - 1), np.clip(x0 + dx, 0, w - 1)
            np.add.at(sampling, (np.arange(py.size), yy * w + xx), wt.astype(np.float32))
    flat = x.reshape(n, -1)
    med = np.nanmedian(flat, axis=1, keepdims=True) if n else np.zeros((0, 1), np.float32)
    flat = np.nan_to_num(flat - np.nan_to_num(med), nan=0.0)
    polar = (flat @ sampling.T).reshape(n, rings, angles)
    k = max(0, min(int(harmonics), angles // 2))
    return (np.abs(np.fft.rfft(polar, axis=-1))[..., :k + 1] / angles).reshape(n, -1).astype(np.float32)


def initial_classes(descriptors: np.ndarray, classes: int, seed: int, max_fit: int = 20000) -> np.ndarray:
    """Soft initial classes (n, K) of windows: a Gaussian mixture on their standardised invariant descriptors.

    The descriptors (:func:`polar_descriptors`) are standardised and reduced to at most six
    principal components; a full-covariance mixture of ``classes`` components (3 seeded
    starts, fitted on at most ``max_fit`` windows) gives each window's posterior. Components are
    ordered by weight, largest first.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    d = np.asarray(descriptors, dtype=np.float64)
    if len(d) < 2 * classes:
        raise InputError(f"jrvae: {len(d)} windows cannot be split into {classes} classes; expected at least "
                         f"{2 * classes}")
    d = (d - d.mean(0)) / (d.std(0) + 1e-9)
    rng = np.random.default_rng([int(seed), 3571])
    fit_rows = np.sort(rng.choice(len(d), size=min(len(d), max_fit), replace=False))
    pca = PCA(min(6, d.shape[1], len(fit_rows) - 1), random_state=int(seed)).fit(d[fit_rows])
    p = pca.transform(d)
    gmm = GaussianMixture(classes, covariance_type="full", n_init=3, reg_covar=1e-4,
                          random_state=int(seed)).fit(p[fit_rows])
    return gmm.predict_proba(p)[:, np.argsort(-gmm.weights_, kind="stable")].astype(np.float32)


class ClassEncoder(nn.Module):
    """An rVAE encoder plus the classifier ``q(y | x)`` (``class_logits`` (B, K) in its output).

    With an :class:`EquivariantEncoder` inside, the classifier shares its polar-grid features
    through :func:`invariant_features`; with any other encoder (the ssvae baseline) it is a
    separate small CNN on the window, which has no built-in invariance.
    """

    def __init__(self, inner: nn.Module, classes: int, window_size: tuple[int, int], hidden: int = 128):
        super().__init__()
        self.inner = inner
        self.equivariant = isinstance(inner, EquivariantEncoder)
        if self.equivariant:
            self.harmonics = max(0, min(HARMONICS, inner.angles // 2))
            n_features = inner.features * (2 + self.harmonics)
        else:
            self.trunk = _ConvTrunk(window_size, (16, 32, 32))
            n_features = self.trunk.features
        self.classifier = nn.Sequential(nn.LayerNorm(n_features), _mlp([n_features, hidden], nn.SiLU),
                                        nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.equivariant:
            feats, t_mu, t_logsd = self.inner.polar_features(x)
            out = self.inner.heads(x, feats, t_mu, t_logsd)
            summary = invariant_features(feats, self.harmonics).to(feats.dtype)
        else:
            out = self.inner(x)
            summary = self.trunk(x)
        return {**out, "class_logits": self.classifier(summary)}


class LabelledWindows(AnnotatedWindows):
    """Windows with one class index per window (-1 = unlabelled) for training a class model.

    While batches are drawn, ``batch_labels`` holds the classes of the batch last yielded; the
    model reads them in :meth:`ClassRVAE.loss` (the trainer passes windows only).
    """

    def __init__(self, windows, labels: np.ndarray | None, memory_mb: float = 2048.0):
        super().__init__(windows, memory_mb=memory_mb)
        labels = np.full(self.n, -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        if labels.shape != (self.n,):
            raise InputError(f"labels: {labels.shape[0] if labels.ndim else 0} class labels for {self.n} windows; "
                             "expected one per window (-1 = unlabelled)")
        self.labels = labels
        self.batch_labels: np.ndarray | None = None
        #: jrvae: initial class probabilities (n, K) the classifier is guided towards early on.
        self.guide: np.ndarray | None = None
        self.batch_guide: np.ndarray | None = None

    def iter_batches(self, index, batch_size, rng=None, buffer_batches: int = 32):
        for sel, block in super().iter_batches(index, batch_size, rng, buffer_batches):
            self.batch_labels = self.labels[sel]
            self.batch_guide = self.guide[sel] if self.guide is not None else None
            yield sel, block

    def descriptors(self, chunk: int = 4096) -> np.ndarray:
        """:func:`polar_descriptors` of every window, read ``chunk`` windows at a time."""
        parts = [polar_descriptors(self.read(np.arange(i, min(i + chunk, self.n)))) for i in range(0, self.n, chunk)]
        return np.concatenate(parts)


class ClassRVAE(RVAE):
    """The rVAE with a discrete class latent (``rvae.model`` ssrvae or ssvae).

    Parameters are those of :class:`RVAE`; ``classes`` (the number K) is required.
    ``class_names`` maps class indices to the user's class values (default ``0 .. K-1``).
    """

    def _build(self) -> None:
        s = self.settings
        if s["model"] not in CLASS_MODELS:
            raise InputError(f"rvae.model {s['model']!r} has no class latent; expected one of {', '.join(CLASS_MODELS)}")
        if s["classes"] is None:
            raise InputError(f"rvae.classes: model {s['model']} needs a number of classes (or a labels file that names them)")
        self.classes = K = int(s["classes"])
        k = int(s["latent_dim"])
        self.pose = s["model"] != "ssvae"
        rotations = int(s["rotations"]) if s["encoder"] == "equivariant" and self.pose else 1
        enc = build_encoder(s["encoder"] if self.pose or s["encoder"] != "equivariant" else "conv",
                            self.window_size, k, hidden=s["encoder_hidden"], channels=s["encoder_channels"],
                            rotations=rotations)
        self.encoder = ClassEncoder(enc if self.pose else NoPoseEncoder(enc), K, self.window_size,
                                    hidden=int(s["encoder_hidden"][-1]))
        self.decoder = build_decoder(s["decoder"], self.window_size, k + K, s["decoder_hidden"])
        self.rotations = rotations
        self.pixel = 2.0 / (max(self.window_size[1], 2) - 1)
        self.noise = torch.nn.Parameter(torch.zeros(()))
        self.net = torch.nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder})
        self.net.register_parameter("log_noise", self.noise)
        if s["likelihood_sd"] is not None:
            self.noise.requires_grad_(False)  # a fixed likelihood sd: the trainer leaves it alone
        self.log_rotation_prior = losses.rotation_log_prior(rotations, s["angle_prior"], float(s["angle_prior_width"]))
        self.class_names: list = list(range(K))
        self._label_source: LabelledWindows | None = None
        self._class_prior = torch.full((K,), 1.0 / K)
        # windows / labelled windows of the training set (see fit)
        self._label_scale = 1.0

    # ------------------------------------------------------------------ objective

    def _with_class(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Decoder input [z, onehot(y)] for content ``z`` (n, k) and class indices ``y`` (n,)."""
        return torch.cat([z, F.one_hot(y.long(), self.classes).to(z.dtype)], 1)

    def _batch_labels(self, n: int, device) -> torch.Tensor:
        src = self._label_source
        if src is not None and src.batch_labels is not None and len(src.batch_labels) == n:
            return torch.from_numpy(src.batch_labels).to(device)
        return torch.full((n,), -1, dtype=torch.long, device=device)

    def class_terms(self, x: torch.Tensor, enc: dict[str, torch.Tensor], beta: float = 1.0,
                    sample: bool = True, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The rVAE's negative ELBO given each class: ``per_class`` (B, K) and its parts.

        ``x`` has no NaN (``mask`` marks the valid pixels); ``enc`` is the encoder's output.
        Also returns ``resp`` (B, K, m), the rotation posterior given each class (marginal
        rotation inference), else None.
        """
        s = self.settings
        b, K = x.shape[0], self.classes
        eps = (lambda t: torch.randn_like(t)) if sample else (lambda t: torch.zeros_like(t))
        z = enc["z_mu"] + enc["z_logsd"].exp() * eps(enc["z_mu"])
        t = enc["t_mu"] + enc["t_logsd"].exp() * eps(enc["t_mu"])
        theta = enc["theta_mu"] if self.rotations > 1 else enc["theta_mu"] + enc["theta_logsd"].exp() * eps(enc["theta_mu"])
        m = theta.shape[1]
        # Row b * K + y of the flattened batch is window b decoded as class y.
        zy = torch.cat([z[:, None].expand(b, K, z.shape[1]),
                        torch.eye(K, device=x.device, dtype=z.dtype)[None].expand(b, K, K)], -1).reshape(b * K, -1)
        theta_y, t_y = theta.repeat_interleave(K, 0), t.repeat_interleave(K, 0)
        centre = torch.zeros(b * K, device=x.device)
        if isinstance(self.decoder, TemplateDecoder):
            tpl = self.decoder.template(zy)
            decoded = self.decoder(zy, theta_y, t_y, tpl=tpl).float()
            if self.pose:
                c = self.decoder.centroid(tpl.float()) / self.pixel
                centre = CENTRE_WEIGHT * (c ** 2).sum(-1)
        else:
            decoded = self.decoder(zy, theta_y, t_y).float()
        valid = mask if mask is not None else torch.ones_like(x, dtype=torch.bool)
        background = self._background(x, valid).repeat_interleave(K)
        decoded = decoded + background[:, None, None, None]
        xm = x.repeat_interleave(K, 0)[:, None]
        mm = valid.repeat_interleave(K, 0)[:, None].float() if not bool(valid.all()) else None
        if s["likelihood"] == "bernoulli":
            rec = losses.bernoulli_nll(xm, decoded, mm)
        else:
            rec = losses.gaussian_nll(xm, decoded, self._noise_sd(), mm)
        rec = rec.view(b, K, m)
        centre = centre.view(b, K)
        centres = torch.arange(m, device=x.device, dtype=torch.float32)[None] * (2 * math.pi / max(self.rotations, 1))
        if not self.pose:
            kl_theta = torch.zeros(b, m, device=x.device)
        elif self.rotations > 1:
            r = self.rotations
            width = math.pi / r if s["angle_prior"] == "uniform" else min(float(s["angle_prior_width"]), math.pi / r)
            kl_theta = 0.5 * ((enc["theta_mu"] - centres) / width) ** 2
        elif s["angle_prior"] == "uniform":
            kl_theta = losses.kl_uniform_angle(enc["theta_logsd"])
        else:
            kl_theta = losses.kl_normal(enc["theta_mu"], enc["theta_logsd"], 0.0, float(s["angle_prior_width"]))
        if self.pose:
            kl_t = losses.kl_normal(enc["t_mu"], enc["t_logsd"], 0.0, float(s["translation_prior"]) * self.pixel).sum(-1)
        else:
            kl_t = torch.zeros(b, device=x.device)
        kl_z = losses.kl_normal(enc["z_mu"], enc["z_logsd"]).sum(-1)
        log_prior = self.log_rotation_prior[None, None]
        if self.rotations > 1 and s["rotation_inference"] == "marginal":
            log_w = log_prior - rec - beta * kl_theta[:, None]
            resp = torch.softmax(log_w.detach(), -1)
            per_class = -torch.logsumexp(log_w, -1) + beta * (kl_t + kl_z)[:, None] + centre
            rec_y = (resp * rec).sum(-1)
            kl_angle_y = (resp * kl_theta[:, None]).sum(-1)
        else:
            # Amortised: the encoder's rotation posterior, every component decoded.
            q_rot = torch.softmax(enc["logits"], 1)
            kl_rot = losses.kl_categorical(enc["logits"], self.log_rotation_prior) if self.rotations > 1 else torch.zeros_like(kl_z)
            kl_angle = (q_rot * kl_theta).sum(1) + kl_rot
            rec_y = (q_rot[:, None] * rec).sum(-1)
            kl_angle_y = kl_angle[:, None].expand(b, K)
            per_class = rec_y + beta * (kl_angle + kl_t + kl_z)[:, None] + centre
            resp = None
        return {"per_class": per_class, "rec": rec_y, "kl_angle": kl_angle_y, "kl_z": kl_z, "kl_shift": kl_t,
                "centre": centre, "resp": resp}

    def loss(self, x: torch.Tensor, beta: float = 1.0, sample: bool = True,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Semi-supervised negative ELBO (plus the weighted classification loss) per window, batch mean.

        ``labels`` (B,) class indices, -1 for unlabelled windows; None = the labels of the batch
        being trained on (see :class:`LabelledWindows`), else all unlabelled.
        """
        mask = torch.isfinite(x)
        x = torch.nan_to_num(x, nan=0.0)
        if labels is None:
            labels = self._batch_labels(x.shape[0], x.device)
        labels = labels.to(x.device).long()
        enc = {key: value.float() for key, value in self.encoder(x).items()}
        terms = self.class_terms(x, enc, beta=beta, sample=sample, mask=mask)
        per_class = terms["per_class"]
        K = self.classes
        logq = torch.log_softmax(enc["class_logits"], 1)
        q = logq.exp()
        known = labels >= 0
        y = labels.clamp(min=0)
        ce = -logq.gather(1, y[:, None])[:, 0]
        alpha = float(self.settings["class_weight"]) * self._label_scale
        labelled = per_class.gather(1, y[:, None])[:, 0] + math.log(K) + alpha * ce
        unlabelled = (q * per_class).sum(1) + (q * logq).sum(1) + math.log(K)
        total = torch.where(known, labelled, unlabelled)
        total = total + self._guide_terms(logq, x.shape[0])
        # Weights of the classes in the reported parts (and the rotation target): the label, else q.
        w = torch.where(known[:, None], F.one_hot(y, K).float(), q.detach())
        if terms["resp"] is not None:
            # As in RVAE.loss: the encoder's rotation categorical learns the responsibilities.
            target = (w[:, :, None] * terms["resp"]).sum(1)
            total = total - (target * torch.log_softmax(enc["logits"], 1)).sum(1)
        parts = {"rec": (w * terms["rec"]).sum(1), "kl_angle": (w * terms["kl_angle"]).sum(1),
                 "kl_z": terms["kl_z"], "kl_shift": terms["kl_shift"], "centre": (w * terms["centre"]).sum(1),
                 "class_loss": torch.where(known, ce, torch.zeros_like(ce))}
        return total.mean(), parts

    def _guide_weight(self) -> float:
        """Weight (nats per window) of the jrvae's pull towards its initial classes at this point of training.

        ``class_weight`` at the start, falling linearly to 0 after ``class_init_epochs`` epochs
        (the trainer sets ``train_progress``, epochs done); 0 outside training.
        """
        span = float(self.settings["class_init_epochs"])
        progress = getattr(self, "train_progress", None)
        if not self.net.training or progress is None or span <= 0:
            return 0.0
        return float(self.settings["class_weight"]) * max(0.0, 1.0 - float(progress) / span)

    def _guide_terms(self, logq: torch.Tensor, n: int) -> torch.Tensor:
        """Per-window jrvae terms (B,) during training: the fading guide plus the batch balance term.

        Guide: ``w(t) * H(p_init, q(y | x))``, the cross-entropy to the initial classes (see
        :func:`initial_classes`). Balance: ``class_balance * KL(mean_batch q || pi)`` with ``pi``
        the initial class fractions, spread over the batch's windows: without it nothing stops
        every window drifting into one class whose decoding fits all (measured: accuracy 0.33
        on three shapes). Zero for the other models and outside training.
        """
        src = self._label_source
        zero = torch.zeros(logq.shape[0], device=logq.device)
        if self.settings["model"] not in UNSUPERVISED_MODELS or src is None or src.batch_guide is None \
                or len(src.batch_guide) != n or not self.net.training:
            return zero
        guide = torch.from_numpy(src.batch_guide).to(logq.device)
        terms = self._guide_weight() * -(guide * logq).sum(1)
        lam = float(self.settings["class_balance"])
        if lam > 0:
            mean_q = logq.exp().mean(0).clamp(min=1e-8)
            prior = self._class_prior.to(logq.device)
            terms = terms + lam * (mean_q * (mean_q.log() - prior.log())).sum()
        return terms

    # ------------------------------------------------------------------ training

    def fit(self, windows, *, labels: np.ndarray | None = None, **kwargs):
        """Train on ``windows`` with class indices ``labels`` (one per window, -1 = unlabelled).

        ssrvae / ssvae need at least one labelled window of every class; ``condition: class``
        needs every window labelled. Other keywords as :meth:`RVAE.fit`.
        """
        from .trainer import fit

        source = LabelledWindows(windows, labels, memory_mb=float(self.settings["memory_mb"]))
        check_label_coverage(source.labels, self.classes, self.settings, self.class_names)
        if self.settings["model"] in UNSUPERVISED_MODELS and float(self.settings["class_init_epochs"]) > 0:
            # Without labels, where the classifier starts decides what it finds: a mixture on
            # rotation-invariant descriptors of the windows themselves is the starting point.
            source.guide = initial_classes(source.descriptors(), self.classes, int(self.settings["seed"]))
            self._class_prior = torch.from_numpy(source.guide.mean(0).clip(1e-3)).float()
            agree = self._fit_classifier_to_guide(source, device=kwargs.get("device", "auto"))
            log.info(
                "jrvae: initial classes from a mixture on invariant window descriptors (fractions %s); "
                "the classifier agrees with them on %.3f of the windows before training",
                ", ".join(f"{v:.3f}" for v in source.guide.mean(0)), agree)
        n_labelled = int((source.labels >= 0).sum())
        # As in Kingma et al. (2014), the classification loss grows with the share of unlabelled
        # windows; otherwise their reconstruction term, which also trains the classifier, drowns
        # a few labels and every window drifts to the class whose decoding fits best early on.
        self._label_scale = len(source) / n_labelled if n_labelled else 1.0
        self._label_source = source
        try:
            return fit(self, source, **kwargs)
        finally:
            self._label_source = None
            self._label_scale = 1.0

    def _fit_classifier_to_guide(self, source: LabelledWindows, device="auto", steps: int = CLASS_INIT_STEPS,
                                 batch_size: int = 64) -> float:
        """Train the encoder and classifier alone to predict ``source.guide`` (the initial classes); returns the agreement.

        Without this, the classifier is near uniform in the first epochs, the decoder learns to
        carry the classes in z instead of y, and the class latent never becomes informative
        (measured: every window in one class once the guide fades). A classifier that starts
        right gives the decoder an informative y from its first step. Seeded; costs ``steps``
        encoder passes of ``batch_size`` windows (no decoding).
        """
        from ..device import select_device, to_device

        dev = device if isinstance(device, torch.device) else select_device(device)
        self.to(dev)
        rng = np.random.default_rng([int(self.settings["seed"]), 4409])
        guide = torch.from_numpy(source.guide)
        opt = torch.optim.Adam(self.encoder.parameters(), lr=float(self.settings["lr"]))
        self.net.train()
        for _ in range(int(steps)):
            idx = np.sort(rng.choice(len(source), size=min(batch_size, len(source)), replace=False))
            x = to_device(torch.from_numpy(source.read(idx)), dev)
            logq = torch.log_softmax(self.encoder(torch.nan_to_num(x, nan=0.0))["class_logits"].float(), 1)
            loss = -(to_device(guide[idx], dev) * logq).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        probe = np.sort(rng.choice(len(source), size=min(1024, len(source)), replace=False))
        with torch.no_grad():
            x = to_device(torch.from_numpy(source.read(probe)), dev)
            found = self.encoder(torch.nan_to_num(x, nan=0.0))["class_logits"].argmax(1).cpu().numpy()
        return float((found == source.guide[probe].argmax(1)).mean())

    # ------------------------------------------------------------------ inference

    def class_probabilities(self, windows, batch_size: int | None = None,
                            device: str | torch.device = "auto") -> np.ndarray:
        """``q(y | x)`` (n, K) of every window."""
        from ..device import autocast, to_device

        batch_size = int(batch_size or self.settings["encode_batch_size"])
        source, batches = self._batches(windows, batch_size)
        dev = self._prepare(device)
        out = np.empty((len(source), self.classes), dtype=np.float32)
        with torch.inference_mode():
            for idx, block in batches:
                x = to_device(torch.from_numpy(block), dev)
                with autocast(dev):
                    logits = self.encoder(torch.nan_to_num(x, nan=0.0))["class_logits"]
                out[idx] = torch.softmax(logits.float(), 1).cpu().numpy()
        return out

    def encode(self, windows, batch_size: int | None = None, device: str | torch.device = "auto",
               method: str | None = None, refine: bool = False) -> dict[str, np.ndarray]:
        """As :meth:`RVAE.encode` (the pose's spreads included), plus ``cls_prob`` (n, K): the probability of every class."""
        out = super().encode(windows, batch_size=batch_size, device=device, method=method, refine=refine)
        out["cls_prob"] = self.class_probabilities(windows, batch_size=batch_size, device=device)
        return out

    def decode(self, z, angle=None, dx=None, dy=None, device: str | torch.device = "cpu", cls=0) -> np.ndarray:
        """Images (n, wy, wx) of content ``z`` (n, k) and class index ``cls`` at ``angle`` (rad), shifts (px)."""
        z = self._content(z)
        n = z.shape[0]
        y = np.broadcast_to(np.asarray(cls, dtype=np.int64).reshape(-1), (n,))
        if n and (y.min() < 0 or y.max() >= self.classes):
            raise InputError(f"cls must be class indices 0..{self.classes - 1}; got {sorted(set(y.tolist()))[:5]}")
        labels = torch.from_numpy(y.copy())
        return self._decode_at(lambda zt: self._with_class(zt, labels.to(zt.device)), z, angle, dx, dy, device)

    def reconstruct(self, windows, batch_size: int | None = None, device: str | torch.device = "auto") -> np.ndarray:
        """Each window decoded at its own pose, content and most probable class."""
        enc = self.encode(windows, batch_size=batch_size, device=device)
        images = self.decode(enc["z"], enc["angle"], enc["dx"], enc["dy"], cls=enc["cls_prob"].argmax(1))
        return images + enc["background"][:, None, None]

    def templates(self) -> np.ndarray:
        """The upright, centred decoding (K, wy, wx) of every class at z = 0."""
        return self.decode(np.zeros((self.classes, self.latent_dim), np.float32), cls=np.arange(self.classes))

    # ------------------------------------------------------------------ persistence

    def state(self) -> dict[str, Any]:
        return {**super().state(), "class_names": list(self.class_names)}

    @classmethod
    def from_state(cls, payload: dict[str, Any], source: str = "checkpoint") -> ClassRVAE:
        model = super().from_state(payload, source)
        names = payload.get("class_names")
        if names is not None:
            if len(names) != model.classes:
                raise InputError(f"{source}: {len(names)} class names for {model.classes} classes")
            model.class_names = list(names)
        return model


def check_label_coverage(labels: np.ndarray, classes: int, settings: dict[str, Any], class_names=None) -> None:
    """Raise InputError when the labels cannot train the model the settings describe."""
    model = settings["model"]
    if model in UNSUPERVISED_MODELS:
        if (labels >= 0).any():
            raise InputError(f"labels: {model} finds its {classes} classes without labels but {int((labels >= 0).sum())} "
                             "windows are labelled; expected none (use ssrvae to learn from labels)")
        return
    names = list(class_names) if class_names is not None else list(range(classes))
    if labels.size and labels.max() >= classes:
        raise InputError(f"labels: class index {int(labels.max())} but rvae.classes is {classes}; "
                         f"expected indices 0..{classes - 1}")
    counts = np.bincount(labels[labels >= 0], minlength=classes)
    empty = [str(names[i]) for i in np.flatnonzero(counts == 0)]
    if empty:
        raise InputError(f"labels: class(es) {', '.join(empty)} have no labelled window; {model} needs at least "
                         f"one labelled window of each of its {classes} classes (or lower rvae.classes)")
    if settings.get("condition") == "class" and (labels < 0).any():
        raise InputError(f"labels: {int((labels < 0).sum())} of {labels.size} windows have no class; "
                         "rvae.condition: class needs a class for every window")

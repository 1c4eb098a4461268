"""Encoders and coordinate decoders of the rotationally invariant VAE.

Coordinates
-----------
A window of ``wy x wx`` pixels has the grid ``g = (gx, gy)`` with the origin at the window's
centre (pixel index ``(w - 1) / 2``) and ``gx`` (column), ``gy`` (row) in [-1, 1]; one pixel is
``h = 2 / (w - 1)`` grid units. A window is generated from a canonical, upright particle
``T_z(u)`` as ``x(g) = T_z(R(-theta) (g - d))``: the particle is rotated by ``theta`` (from +x
towards +y, the convention of ``truth.parquet``) and then moved by ``d = (dx, dy)``.

Every encoder returns a dict of tensors:

``logits`` (B, m)
    unnormalised log-probabilities of m rotation components (m = 1 for the plain encoders).
``theta_mu``, ``theta_logsd`` (B, m)
    angle posterior per component (rad).
``t_mu``, ``t_logsd`` (B, 2)
    translation (dx, dy) in grid units.
``z_mu``, ``z_logsd`` (B, k)
    content latents.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def row_median(flat: torch.Tensor) -> torch.Tensor:
    """The lower median of every row of ``flat`` (B, n), as ``torch.median(dim=1)`` gives it.

    On the CPU, outside autograd, a partial sort (``numpy.partition``) finds it in about half
    the time of torch's full sort; window medians were a fifth of the encoder-only encoding
    time. Rows with NaN give NaN either way.
    """
    if flat.device.type != "cpu" or flat.requires_grad or flat.shape[1] == 0:
        return flat.median(dim=1).values
    k = (flat.shape[1] - 1) // 2
    values = flat.detach().numpy() if flat.dtype in (torch.float32, torch.float64) else None
    if values is None:
        return flat.median(dim=1).values
    out = torch.from_numpy(np.partition(values, k, axis=1)[:, k].copy())
    # numpy sorts NaN last, torch's median propagates it: keep torch's answer for such rows.
    return torch.where(torch.isnan(flat).any(1), torch.full_like(out, math.nan), out)


def pixel_grid(wy: int, wx: int) -> torch.Tensor:
    """Window coordinates (wy, wx, 2) as (x, y) in [-1, 1], origin at the centre.

    The spacing is one pixel along both axes in units of ``2 / (wx - 1)`` so that rotations
    act on a square metric even for non-square windows.
    """
    h = 2.0 / (max(wx, 2) - 1)
    xs = (torch.arange(wx, dtype=torch.float32) - (wx - 1) / 2) * h
    ys = (torch.arange(wy, dtype=torch.float32) - (wy - 1) / 2) * h
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def transform_grid(grid: torch.Tensor, theta: torch.Tensor, shift: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Canonical coordinates ``u = scale R(-theta) (g - d)`` of every pixel.

    Parameters
    ----------
    grid : (H, W, 2) tensor
        Pixel coordinates as :func:`pixel_grid` gives them (x constant down a column, y along a row).
    theta : (B, m) tensor, rad
    shift : (B, 2) or (B, m, 2) tensor, grid units (one per window or one per component)
    scale : float
        Factor applied to the result (e.g. to grid_sample's normalised coordinates).

    Returns
    -------
    (B, m, H, W, 2) tensor
    """
    c, s = torch.cos(theta), torch.sin(theta)
    if shift.dim() == 2:
        shift = shift[:, None]
    dx, dy = shift[..., 0], shift[..., 1]
    # One affine map per (window, component). The pixel grid is a meshgrid (x varies along
    # columns only, y along rows only), so u = (A0 x + A2) + A1 y is the sum of a per-column
    # and a per-row part: the (B, m, H, W, 2) result is written once by one broadcast add,
    # where a matrix product with the homogeneous coordinates and its reordering to this
    # layout took five times as long (a fifth of an exact encoding).
    affine = torch.stack([torch.stack([c, s, -(c * dx + s * dy)], -1),
                          torch.stack([-s, c, s * dx - c * dy], -1)], -2) * scale  # (B, m, 2, 3)
    if torch.is_grad_enabled() and (theta.requires_grad or shift.requires_grad):
        # Training keeps the matrix product, whose rounding the trained models (and the
        # demo's figures) were tuned with: the broadcast sum differs in the last bit, enough
        # to move a short training run's trajectory.
        flat = grid.reshape(-1, 2)
        homogeneous = torch.cat([flat, torch.ones_like(flat[:, :1])], 1).to(affine.dtype)  # (P, 3)
        b, m = theta.shape
        u = torch.matmul(affine.reshape(b * m, 2, 3), homogeneous.T)  # (B m, 2, P)
        return u.transpose(1, 2).reshape(b, m, grid.shape[0], grid.shape[1], 2)
    xs = grid[0, :, 0].to(affine.dtype)   # (W,)
    ys = grid[:, 0, 1].to(affine.dtype)   # (H,)
    # Both parts contiguous (they are small), so the sum comes out contiguous as well.
    per_column = (affine[..., 0:1] * xs + affine[..., 2:3]).transpose(-1, -2).contiguous()  # (B, m, W, 2)
    per_row = (affine[..., 1:2] * ys).transpose(-1, -2).contiguous()                        # (B, m, H, 2)
    return per_column[:, :, None] + per_row[:, :, :, None]


def _mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- decoders


class TemplateDecoder(nn.Module):
    """A z-dependent canonical image sampled at the transformed coordinates.

    An MLP maps ``z`` to a canonical template on a grid that covers the rotated window
    (|u| up to ``extent``), at the window's own pixel spacing; the value at a transformed
    coordinate is read by bilinear interpolation. The cost per pixel is four taps instead of a
    per-pixel MLP, and the template is shared by all rotation components of a window.
    """

    def __init__(self, window_size: tuple[int, int], latent_dim: int, hidden: Sequence[int] = (128, 128),
                 extent: float = 1.25):
        super().__init__()
        wy, wx = window_size
        self.register_buffer("grid", pixel_grid(wy, wx), persistent=False)
        h = 2.0 / (max(wx, 2) - 1)
        half = math.ceil(extent / h)
        self.size = 2 * half + 1
        self.half_extent = half * h
        self.latent_dim = latent_dim
        self.body = _mlp([max(latent_dim, 1), *hidden])
        self.out = nn.Linear(hidden[-1] if hidden else max(latent_dim, 1), self.size * self.size)

    def template(self, z: torch.Tensor) -> torch.Tensor:
        """(B, S, S) canonical image(s) of ``z`` (B, k)."""
        if self.latent_dim == 0:
            z = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
        return self.out(self.body(z)).view(-1, self.size, self.size)

    def centroid(self, tpl: torch.Tensor) -> torch.Tensor:
        """Intensity centroid (B, 2) of templates (B, S, S) in grid units (background = median)."""
        background = tpl.flatten(1).median(dim=1).values[:, None, None]
        w = (tpl - background).clamp(min=0)
        total = w.sum((1, 2)).clamp(min=1e-6)
        coords = torch.linspace(-self.half_extent, self.half_extent, self.size, device=tpl.device, dtype=tpl.dtype)
        return torch.stack([(w.sum(1) * coords).sum(1) / total, (w.sum(2) * coords).sum(1) / total], 1)

    def forward(self, z: torch.Tensor, theta: torch.Tensor, shift: torch.Tensor,
                tpl: torch.Tensor | None = None) -> torch.Tensor:
        """(B, m, H, W) decoded values (logits for a Bernoulli likelihood).

        ``theta`` (B, m) rad; ``shift`` (B, 2) or one per component (B, m, 2), grid units.
        """
        b, m = theta.shape
        u = transform_grid(self.grid, theta, shift, 1.0 / self.half_extent)
        hh, ww = u.shape[2], u.shape[3]
        tpl = (self.template(z) if tpl is None else tpl)[:, None]
        out = F.grid_sample(tpl, u.reshape(b, m * hh, ww, 2).to(tpl.dtype), mode="bilinear",
                            padding_mode="border", align_corners=True)
        return out.view(b, m, hh, ww)


class CoordinateMLPDecoder(nn.Module):
    """The original spatial decoder: an MLP of (transformed coordinate, z) for every pixel.

    The first layer is split into a coordinate part (per pixel) and a z part computed once per
    window, which is the same function as one linear layer on the concatenation.
    """

    def __init__(self, window_size: tuple[int, int], latent_dim: int, hidden: Sequence[int] = (128, 128)):
        super().__init__()
        wy, wx = window_size
        self.register_buffer("grid", pixel_grid(wy, wx), persistent=False)
        self.latent_dim = latent_dim
        self.coord = nn.Linear(2, hidden[0])
        self.zpart = nn.Linear(max(latent_dim, 1), hidden[0], bias=False)
        self.body = _mlp(hidden)
        self.out = nn.Linear(hidden[-1], 1)

    def forward(self, z: torch.Tensor, theta: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        b, _m = theta.shape
        if self.latent_dim == 0:
            z = torch.zeros(b, 1, dtype=z.dtype, device=z.device)
        u = transform_grid(self.grid, theta, shift)
        hid = torch.tanh(self.coord(u) + self.zpart(z)[:, None, None, None, :])
        return self.out(self.body(hid)).squeeze(-1)


def build_decoder(kind: str, window_size: tuple[int, int], latent_dim: int, hidden: Sequence[int]) -> nn.Module:
    if kind == "template":
        return TemplateDecoder(window_size, latent_dim, hidden)
    if kind == "mlp":
        return CoordinateMLPDecoder(window_size, latent_dim, hidden)
    raise ValueError(f"unknown decoder kind {kind!r}")


# --------------------------------------------------------------------------- encoders


def _split(out: torch.Tensor, latent_dim: int) -> dict[str, torch.Tensor]:
    """Heads of the plain encoders: [theta mu, theta logsd, t mu (2), t logsd (2), z mu, z logsd]."""
    k = latent_dim
    return {
        "logits": torch.zeros_like(out[:, :1]),
        "theta_mu": out[:, 0:1],
        "theta_logsd": out[:, 1:2],
        "t_mu": out[:, 2:4],
        "t_logsd": out[:, 4:6],
        "z_mu": out[:, 6:6 + k],
        "z_logsd": out[:, 6 + k:6 + 2 * k],
    }


class MLPEncoder(nn.Module):
    """The original encoder: fully connected layers (two of 128 tanh units by default)."""

    def __init__(self, window_size: tuple[int, int], latent_dim: int, hidden: Sequence[int] = (128, 128)):
        super().__init__()
        wy, wx = window_size
        self.latent_dim = latent_dim
        self.body = _mlp([wy * wx, *hidden])
        self.head = nn.Linear(hidden[-1], 6 + 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return _split(self.head(self.body(x.flatten(1))), self.latent_dim)


class _ConvTrunk(nn.Module):
    """Strided convolutions to a flat feature vector."""

    def __init__(self, window_size: tuple[int, int], channels: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for c in channels:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), nn.SiLU()]
            cin = c
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            self.features = int(self.body(torch.zeros(1, 1, *window_size)).numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x[:, None]).flatten(1)


class ConvEncoder(nn.Module):
    """A convolutional encoder with one Gaussian angle (works better than the MLP on raw data)."""

    def __init__(self, window_size: tuple[int, int], latent_dim: int, hidden: Sequence[int] = (128,),
                 channels: Sequence[int] = (16, 32, 32)):
        super().__init__()
        self.latent_dim = latent_dim
        self.trunk = _ConvTrunk(window_size, channels)
        self.body = nn.Sequential(nn.LayerNorm(self.trunk.features), _mlp([self.trunk.features, *hidden], nn.SiLU))
        self.head = nn.Linear(hidden[-1] if hidden else self.trunk.features, 6 + 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return _split(self.head(self.body(self.trunk(x))), self.latent_dim)


class ShiftEncoder(nn.Module):
    """Translation of the particle: a weighted centroid refined by a small CNN.

    The centroid is rotation-equivariant and needs no training, so the rotation branch can
    be sampled around the particle from the first step; the CNN learns what the centroid
    gets wrong (asymmetric shapes, neighbours entering the window).
    """

    def __init__(self, window_size: tuple[int, int], channels: Sequence[int] = (8, 16, 16)):
        super().__init__()
        wy, wx = window_size
        grid = pixel_grid(wy, wx)
        self.register_buffer("grid", grid, persistent=False)
        # A soft aperture keeps particles at the window's edge from pulling the centroid.
        self.register_buffer("aperture", torch.exp(-(grid ** 2).sum(-1) / (2 * 0.5 ** 2)), persistent=False)
        self.trunk = _ConvTrunk(window_size, channels)
        self.head = nn.Linear(self.trunk.features, 4)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def centroid(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        background = row_median(flat)[:, None, None]
        w = (x - background).clamp(min=0) * self.aperture
        total = w.sum(dim=(1, 2)).clamp(min=1e-6)
        cx = (w * self.grid[..., 0]).sum(dim=(1, 2)) / total
        cy = (w * self.grid[..., 1]).sum(dim=(1, 2)) / total
        return torch.stack([cx, cy], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.trunk(x))
        with torch.no_grad():
            c = self.centroid(x.float()).to(out.dtype)
        return c + 0.1 * out[:, :2], out[:, 2:] - 3.0


class EquivariantEncoder(nn.Module):
    """Rotation-equivariant encoder with a categorical posterior over r discrete rotations.

    The window is resampled on a polar grid (radius x angle) around its estimated centre,
    so a rotation of the window is a cyclic shift along the angle axis; convolutions that
    wrap around that axis keep the shift, hence each rotation component sees the same
    features as the upright particle would. Per component the head gives a logit and a
    continuous offset within its bin, so the full circle is identifiable for asymmetric
    particles. Content latents come from the features rolled back by the posterior over
    components, which makes them invariant to the rotation.
    """

    def __init__(self, window_size: tuple[int, int], latent_dim: int, rotations: int = 16,
                 hidden: Sequence[int] = (128,), channels: Sequence[int] = (16, 32, 32),
                 radii: int | None = None, samples_per_rotation: int | None = None):
        super().__init__()
        wy, wx = window_size
        self.latent_dim = latent_dim
        self.rotations = r = int(rotations)
        half = min(wy, wx) / 2
        # Rings two pixels apart; the valid (radius) convolutions need 2 rings per layer.
        self.radii = radii or max(2 * len(channels) + 2, round(half / 2))
        # About one angular sample every three pixels on the outer ring (anti-aliased below).
        self.per_rot = samples_per_rotation or max(1, round(2 * math.pi * half / (3 * r)))
        self.angles = a = r * self.per_rot
        h = 2.0 / (max(wx, 2) - 1)
        # Sampled at twice the resolution in both directions and averaged: cheap anti-aliasing.
        nr, na = 2 * self.radii, 2 * a
        rho = (torch.arange(nr, dtype=torch.float32) + 0.5) / nr * (half - 0.5) * h
        alpha = (torch.arange(na, dtype=torch.float32) - 0.5) * (2 * math.pi / na)
        self.register_buffer("polar", torch.stack([rho[:, None] * torch.cos(alpha)[None],
                                                   rho[:, None] * torch.sin(alpha)[None]], -1), persistent=False)
        # grid_sample's normalised coordinates: x over the width, y over the height.
        self.register_buffer("norm", torch.tensor([1.0, (wx - 1) / max(wy - 1, 1)]), persistent=False)
        self.shift = ShiftEncoder(window_size)
        convs = []
        cin = 1
        for c in channels:
            # Circular padding along the angle only; radius is convolved without padding.
            convs.append(nn.Conv2d(cin, c, 3, padding=(0, 1), padding_mode="circular"))
            cin = c
        self.trunk = nn.Sequential(*[m for conv in convs for m in (conv, nn.SiLU())])
        with torch.no_grad():
            f = self._features(torch.zeros(1, 1, self.radii, a))
        self.features = f.shape[1]
        self.rot_head = nn.Sequential(nn.Conv1d(self.features, 64, 3, padding=1, padding_mode="circular"),
                                      nn.SiLU(), nn.Conv1d(64, 3, 1))
        # Normalised, non-saturating: thousands of unbounded features into tanh units go dead.
        self.z_body = nn.Sequential(nn.LayerNorm(self.features * a), _mlp([self.features * a, *hidden], nn.SiLU))
        self.z_head = nn.Linear(hidden[-1] if hidden else self.features * a, 2 * latent_dim)

    def _features(self, p: torch.Tensor) -> torch.Tensor:
        return self.trunk(p).flatten(1, 2)  # (B, C * rings, A): rings folded into channels

    def sample_polar(self, x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        pts = (self.polar[None] + centre[:, None, None, :]) * self.norm
        fine = F.grid_sample(x[:, None], pts.to(x.dtype), mode="bilinear", padding_mode="border",
                             align_corners=True)
        return F.avg_pool2d(fine, 2)

    def polar_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features (B, C, A) on the polar grid around the estimated centre, and the shift posterior.

        A rotation of the window by a multiple of 2 pi / A cyclically shifts the last axis.
        """
        t_mu, t_logsd = self.shift(x)
        return self._features(self.sample_polar(x, t_mu)), t_mu, t_logsd

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(x, *self.polar_features(x))

    def heads(self, x: torch.Tensor, feats: torch.Tensor, t_mu: torch.Tensor,
              t_logsd: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rotation, angle and content posteriors from :meth:`polar_features`."""
        b, _c, a = feats.shape
        r, s = self.rotations, self.per_rot
        head = self.rot_head(feats).view(b, 3, r, s).mean(-1)     # (B, 3, r)
        logits, offset, logsd = head[:, 0], head[:, 1], head[:, 2]
        centres = torch.arange(r, device=x.device, dtype=feats.dtype) * (2 * math.pi / r)
        # Unbounded: a tanh here saturates early in training and freezes the angle at the bin edges.
        theta_mu = centres[None] + (math.pi / r) * offset
        q = torch.softmax(logits.float(), dim=1)
        # aligned[a] = sum_k q_k feats[a + k s]: every component un-rotates by its own bins, so
        # the result is the same for any rotation of the input. A cross-correlation, via FFT.
        q_up = torch.zeros(b, a, device=x.device, dtype=torch.float32)
        q_up[:, ::s] = q
        aligned = torch.fft.irfft(torch.fft.rfft(feats.float(), dim=-1) * torch.fft.rfft(q_up, dim=-1).conj()[:, None],
                                  n=a, dim=-1).to(feats.dtype)
        zz = self.z_head(self.z_body(aligned.flatten(1)))
        k = self.latent_dim
        return {"logits": logits, "theta_mu": theta_mu, "theta_logsd": logsd - 4.0,
                "t_mu": t_mu, "t_logsd": t_logsd, "z_mu": zz[:, :k], "z_logsd": zz[:, k:]}


class NoPoseEncoder(nn.Module):
    """Wraps an encoder for the plain VAE baseline: angle and translation fixed at zero."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.inner(x)
        zero1 = torch.zeros_like(out["theta_mu"][:, :1])
        zero2 = torch.zeros_like(out["t_mu"])
        return {**out, "logits": zero1, "theta_mu": zero1, "theta_logsd": zero1,
                "t_mu": zero2, "t_logsd": zero2}


def build_encoder(kind: str, window_size: tuple[int, int], latent_dim: int, *, hidden: Sequence[int],
                  channels: Sequence[int], rotations: int) -> nn.Module:
    if kind == "mlp":
        return MLPEncoder(window_size, latent_dim, hidden)
    if kind == "conv":
        return ConvEncoder(window_size, latent_dim, hidden, channels)
    if kind == "equivariant":
        return EquivariantEncoder(window_size, latent_dim, rotations, hidden, channels)
    raise ValueError(f"unknown encoder kind {kind!r}")

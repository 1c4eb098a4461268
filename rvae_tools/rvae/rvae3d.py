"""An rVAE whose pose latent is a 3D rotation: a learned 3D density seen through a projection.

Generative model (``rvae.model: rvae3d``)
-----------------------------------------
Per window: a rotation ``R`` (unit quaternion ``q``, :mod:`.so3` conventions: body -> lab, lab
z = viewing axis), a shift ``d = (dx, dy)`` and content ``z ~ N(0, I_k)``. The decoder holds a
learned density on a ``D^3`` voxel grid (one voxel = one pixel), linear in ``z``:
``V_z = V_0 + sum_j z_j B_j``. The window is the projection of ``V_z`` rotated by ``R`` and
moved by ``d``::

    x(p) = integral V_z(R^T (p - d, s)) ds + background + noise,

with ``p`` the pixel position relative to the window centre (pixel ``(w - 1) / 2``). Voxel
``(a, b, c)`` of the volume array is body point ``(x, y, z) = (c - D/2, b - D/2, a - D/2)``
pixels (origin = voxel ``D/2`` along every axis).

The projection is computed with the Fourier slice theorem: the 2D Fourier transform of the
projection is the central slice of the volume's 3D transform normal to the viewing axis,
``X(k) = V^(R^T (k, 0))``. The volume is zero-padded to ``P = 2 D`` and pre-divided by the
``sinc^2`` apodisation of trilinear interpolation, its transform is read by trilinear
interpolation at the rotated slice points, the shift is a phase ramp and an inverse FFT gives
the window. A projection costs ``P (P/2 + 1)`` interpolations instead of ``D^3`` (a real-space
ray sum), which is what makes a search over thousands of rotations per batch affordable.

Posterior over SO(3)
--------------------
A mixture over a near-uniform grid of ``N`` rotations (:func:`.so3.super_fibonacci`, rotated
by a fresh random rotation for every training batch, so the grid's cells are covered
continuously). Every window is scored against every grid rotation on the low frequencies
(one matrix product per batch: the grid's slices are shared by all windows and, the volume
being linear in ``z``, by all contents); the ``pose_components`` best are decoded exactly and
the rotation is summed out over them:
``-log sum_n p(n) p(x | R_n, z, d)`` (a truncated mixture: a valid lower bound), exactly as
the 2D equivariant encoder's discrete rotations are marginalised. At encoding the grid's
``ENCODE_CANDIDATES`` best distinct peaks are each moved to the best rotation and shift of their
cell (a pattern search on the band-limited residual, radius halved per level), the best of them
is refined continuously (Gauss-Newton on the rotation vector and the shift, all frequencies).
On a grid of cells ~20 deg wide the best-scoring cell is often not the one holding the true
pose (its centre can be ~15 deg away from it), which is why several peaks are searched. The
mirror image of the best peak (:func:`.so3.mirror`) is searched as well, so the two branches a
projection cannot tell apart are both scored. Spreads and the mirror probability come from
the posterior over grid cells with every searched cell at its best pose
(:meth:`RVAE3D._cell_posterior`), plus, within the best mode, the refinement's Laplace
covariance (rotation, shift, in-plane angle) or a 1D likelihood profile (tilt).

Priors on the rotation: uniform on SO(3), or "lying flat" (:func:`.so3.watson_log_prior`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from . import losses, so3
from .model import RVAE
from .networks import ShiftEncoder, _ConvTrunk, _mlp

#: Frequencies (cycles per pixel) the grid search scores on: enough to tell rotations a grid
#: cell apart on particles of 10-30 px, few enough to score thousands of rotations per batch.
SEARCH_BAND = 0.2
#: Gauss-Newton steps of the continuous refinement at encoding, and its finite-difference steps.
REFINE_STEPS = 3
_EPS_ROT, _EPS_SHIFT = 1e-2, 0.05
#: Levels of the local pattern search that moves every grid component to the best rotation of
#: its cell (radius halved per level from half the covering radius: 1/16 of it at the end).
LOCAL_LEVELS = 4
#: Distinct grid peaks (non-maximum suppressed within one covering radius) searched locally at
#: encoding; the best after the local search is refined by Gauss-Newton. Several, because on a
#: coarse grid the cell holding the true pose need not be the best-scoring cell.
ENCODE_CANDIDATES = 8
MODEL_KIND = "rvae3d"
#: Tilt offsets (deg) of the 1D likelihood profile that gives the tilt's spread
#: (:meth:`RVAE3D._tilt_profile`): fine near the refined pose, out to where a 3D rod's
#: likelihood near the image plane still has mass.
TILT_PROFILE_DEG = (
    -30.0,
    -22.0,
    -16.0,
    -11.0,
    -7.0,
    -4.0,
    -2.0,
    0.0,
    2.0,
    4.0,
    7.0,
    11.0,
    16.0,
    22.0,
    30.0,
)
#: Smallest window (pixels per side) the projection model takes.
MIN_WINDOW = 8
#: Unit offsets (rotation vectors) of the local search: the centre, the six axis directions and
#: the eight cube diagonals, so every direction lies within 55 deg of an offset.
_PATTERN = np.concatenate(
    [
        np.zeros((1, 3)),
        np.eye(3),
        -np.eye(3),
        np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]) / math.sqrt(3),
    ]
)
#: Unit offsets (px) of the local search's shift step: the centre and its 8 neighbours.
_SHIFT_PATTERN = torch.tensor([[a, b] for a in (0.0, -1.0, 1.0) for b in (0.0, -1.0, 1.0)])


#: Poses (uniform over SO(3)) at which :meth:`RVAE3D.body_axis` reads the long axis of the
#: model's projections when the model has not read it at its training windows' poses.
AXIS_POSES = 576
AXIS_UNIFORM_WEIGHT = 0.1


def _image_axis_normal(image: np.ndarray) -> np.ndarray:
    """Unit lab direction (3,) in the image plane normal to ``image``'s long axis (2D second moment, x along columns)."""
    h, w = image.shape
    gy, gx = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    total = max(float(image.sum()), 1e-12)
    mx, my = (image * gx).sum() / total, (image * gy).sum() / total
    cxx = (image * (gx - mx) ** 2).sum() / total
    cyy = (image * (gy - my) ** 2).sum() / total
    cxy = (image * (gx - mx) * (gy - my)).sum() / total
    angle = 0.5 * math.atan2(2 * cxy, cxx - cyy)
    return np.array([-math.sin(angle), math.cos(angle), 0.0])


# --------------------------------------------------------------------------- sampling (torch)


def _trilinear(vol: torch.Tensor, pos: torch.Tensor, size: int) -> torch.Tensor:
    """Values (..., C) of ``vol`` (size^3, C) at index positions ``pos`` (..., 3) in (a, b, c) order."""
    i = pos.detach().floor().long().clamp(0, size - 2)
    f = (pos - i.to(pos.dtype)).clamp(0, 1)
    out = 0
    for da in (0, 1):
        wa = f[..., 0] if da else 1 - f[..., 0]
        for db in (0, 1):
            wb = wa * (f[..., 1] if db else 1 - f[..., 1])
            for dc in (0, 1):
                w = wb * (f[..., 2] if dc else 1 - f[..., 2])
                idx = ((i[..., 0] + da) * size + (i[..., 1] + db)) * size + (i[..., 2] + dc)
                out = out + w[..., None] * vol[idx]
    return out


# --------------------------------------------------------------------------- decoder


class ProjectionDecoder(nn.Module):
    """A learned 3D density, linear in ``z``, projected along the viewing axis (Fourier slice).

    Parameters
    ----------
    window_size : (int, int)
        Window height and width, pixels.
    latent_dim : int
        Content latents k (k basis volumes besides the mean volume).
    volume_size : int
        Voxels D per side (one voxel = one pixel); at most the window's smaller side.
    """

    def __init__(self, window_size: tuple[int, int], latent_dim: int, volume_size: int):
        super().__init__()
        wy, wx = window_size
        d = int(volume_size)
        self.window_size, self.latent_dim, self.size = (wy, wx), int(latent_dim), d
        self.pad = p = 2 * d
        coords = torch.arange(d, dtype=torch.float32) - d / 2
        zz, yy, xx = torch.meshgrid(coords, coords, coords, indexing="ij")
        r2 = xx**2 + yy**2 + zz**2
        # A sphere keeps the corners of the cube (which rotate out of the window) empty.
        self.register_buffer("support", (r2 <= (d / 2 - 0.5) ** 2).float(), persistent=False)
        # Trilinear interpolation in Fourier space multiplies the projected density by
        # sinc^2(u / P) per body axis; dividing first undoes it (gridding correction).
        apod = (torch.sinc(xx / p) * torch.sinc(yy / p) * torch.sinc(zz / p)) ** 2
        self.register_buffer("precomp", 1.0 / apod, persistent=False)
        sigma = d / 8
        blob = torch.exp(-r2 / (2 * sigma**2)) * (0.5 / (sigma * math.sqrt(2 * math.pi)))
        gen = torch.Generator().manual_seed(0)
        # A blob plus noise: the noise breaks the blob's symmetry so poses can be told apart.
        self.volume = nn.Parameter(blob + 0.002 * torch.randn(d, d, d, generator=gen))
        self.basis = nn.Parameter(0.002 * torch.randn(self.latent_dim, d, d, d, generator=gen))
        # Half-plane frequency grid of the padded window (rows: fftfreq order; columns 0..P/2).
        ky = torch.fft.fftfreq(p, d=1.0 / p)
        kx = torch.arange(p // 2 + 1, dtype=torch.float32)
        gky, gkx = torch.meshgrid(ky, kx, indexing="ij")
        radius = torch.sqrt(gkx**2 + gky**2)
        self.register_buffer("kx", gkx, persistent=False)
        self.register_buffer("ky", gky, persistent=False)
        self.register_buffer("disk", radius <= p / 2 - 1, persistent=False)
        band = radius <= max(2.0, SEARCH_BAND * p)
        # Parseval weights of the half plane: columns 1..P/2-1 stand for their conjugates too.
        weight = torch.where((gkx > 0) & (gkx < p // 2), 2.0, 1.0)
        self.register_buffer("band", band, persistent=False)
        self.register_buffer("band_k", torch.stack([gkx[band], gky[band]], -1), persistent=False)
        self.register_buffer("band_w", weight[band] / p**2, persistent=False)
        self.register_buffer(
            "disk_k", torch.stack([gkx[self.disk], gky[self.disk]], -1), persistent=False
        )

    def volumes(self) -> torch.Tensor:
        """The k + 1 real-space volumes (k + 1, D, D, D): mean, then the basis (masked)."""
        return torch.cat([self.volume[None], self.basis], 0) * self.support

    def spectrum(self) -> torch.Tensor:
        """The volumes' 3D transforms as a (P^3, 2 (k + 1)) table (real, imaginary per volume).

        Zero frequency at index P/2 along every axis; body origin at voxel D/2 (see module doc).
        """
        d, p = self.size, self.pad
        vol = self.volumes() * self.precomp
        big = vol.new_zeros(vol.shape[0], p, p, p)
        lo = p // 2 - d // 2
        big[:, lo : lo + d, lo : lo + d, lo : lo + d] = vol
        spec = torch.fft.fftshift(
            torch.fft.fftn(torch.fft.ifftshift(big, dim=(1, 2, 3)), dim=(1, 2, 3)), dim=(1, 2, 3)
        )
        return (
            torch.stack([spec.real, spec.imag], -1)
            .reshape(vol.shape[0], -1, 2)
            .permute(1, 0, 2)
            .reshape(p**3, -1)
        )

    def slices(self, spec: torch.Tensor, rot: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """Central slices (..., M, k + 1) (complex) at rotations ``rot`` (..., 3, 3) and 2D frequencies ``k2`` (M, 2)."""
        # Body-frame frequency: kx * (row 0 of R) + ky * (row 1 of R); array order (z, y, x).
        kb = (
            k2[:, 0, None] * rot[..., None, 0, :] + k2[:, 1, None] * rot[..., None, 1, :]
        )  # (..., M, 3)
        pos = kb.flip(-1) + self.pad / 2
        val = _trilinear(spec, pos, self.pad)
        val = val.view(*val.shape[:-1], -1, 2)
        return torch.complex(val[..., 0], val[..., 1])

    def phase(self, shift_px: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """exp(-2 pi i k . s / P) (..., M): moves the projection's origin to the window centre plus ``shift_px``."""
        wy, wx = self.window_size
        sx = shift_px[..., 0] + (wx - 1) / 2
        sy = shift_px[..., 1] + (wy - 1) / 2
        arg = -2 * math.pi * (k2[:, 0] * sx[..., None] + k2[:, 1] * sy[..., None]) / self.pad
        return torch.polar(torch.ones_like(arg), arg)

    def render(
        self, spec: torch.Tensor, rot: torch.Tensor, shift_px: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Windows (B, m, H, W) at rotations ``rot`` (B, m, 3, 3), shifts (B, m, 2) px, content ``z`` (B, k)."""
        b, m = rot.shape[:2]
        wy, wx = self.window_size
        sl = self.slices(spec, rot, self.disk_k)  # (B, m, M, k+1)
        coef = torch.cat([z.new_ones(z.shape[0], 1), z], 1).to(sl.real.dtype)
        plane = (sl * coef[:, None, None, :]).sum(-1) * self.phase(shift_px, self.disk_k)
        full = plane.new_zeros(b, m, self.pad, self.pad // 2 + 1)
        full[:, :, self.disk] = plane
        img = torch.fft.irfft2(full, s=(self.pad, self.pad))
        return img[..., :wy, :wx]

    def band_window(self, x: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
        """The band-limited transform (B, M) of windows ``x`` (B, H, W), moved back by their shifts (px)."""
        wy, wx = self.window_size
        big = x.new_zeros(x.shape[0], self.pad, self.pad)
        big[:, :wy, :wx] = x
        return torch.fft.rfft2(big)[:, self.band] * self.phase(shift_px, self.band_k).conj()

    def local_scores(
        self,
        spec: torch.Tensor,
        rot: torch.Tensor,
        xf: torch.Tensor,
        z: torch.Tensor,
        shift_px: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Band-limited squared residuals (B, L, S) at per-window rotations (B, L, 3, 3) and extra shifts (B, S, 2) px.

        ``xf`` (B, M) is :meth:`band_window`'s transform; the same quantity as
        :meth:`search_scores` (up to the window's band energy, a constant per window), for
        rotations and shifts that differ between windows. A shift only multiplies the window's
        transform by a phase ramp, so trying several costs no further slices.
        """
        sl = self.slices(spec, rot, self.band_k)  # (B, L, M, k+1)
        coef = torch.cat([z.new_ones(z.shape[0], 1), z], 1).to(sl.real.dtype)
        pred = (sl * coef[:, None, None, :]).sum(-1)  # (B, L, M)
        if shift_px is None:
            moved = xf[:, None]
        else:
            arg = (
                2
                * math.pi
                * (
                    shift_px[..., 0, None] * self.band_k[:, 0]
                    + shift_px[..., 1, None] * self.band_k[:, 1]
                )
                / self.pad
            )
            moved = xf[:, None] * torch.polar(torch.ones_like(arg), arg)  # (B, S, M)
        diff = moved[:, None] - pred[:, :, None]  # (B, L, S, M)
        return ((diff.real**2 + diff.imag**2) * self.band_w).sum(-1)

    def search_scores(
        self,
        spec: torch.Tensor,
        rot: torch.Tensor,
        x: torch.Tensor,
        shift_px: torch.Tensor,
        z: torch.Tensor,
    ) -> torch.Tensor:
        """Band-limited squared residuals (B, N) of windows ``x`` (B, H, W) against every rotation (N, 3, 3).

        Parseval on the padded window: ``sum |X - S|^2 / P^2`` over the frequencies below
        ``SEARCH_BAND``, with the window moved back by its shift (a phase ramp). Shared slices:
        one interpolation per grid rotation for the whole batch.
        """
        xf = self.band_window(x, shift_px)  # (B, M)
        sl = self.slices(spec, rot, self.band_k)  # (N, M, k+1)
        w = self.band_w
        coef = torch.cat([z.new_ones(z.shape[0], 1), z], 1)  # (B, k+1)
        xr = torch.cat([xf.real * w, xf.imag * w], 1)  # (B, 2M)
        sr = torch.cat([sl.real, sl.imag], 1)  # (N, 2M, k+1)
        cross = torch.einsum("bm,nmj->bnj", xr, sr)  # (B, N, k+1)
        gram = torch.einsum("nmi,m,nmj->nij", sr, torch.cat([w, w]), sr)  # (N, k+1, k+1)
        xx = (xr * torch.cat([xf.real, xf.imag], 1)).sum(1)  # (B,)
        quad = torch.einsum("bi,nij,bj->bn", coef, gram, coef)
        return xx[:, None] - 2 * (cross * coef[:, None, :]).sum(-1) + quad


# --------------------------------------------------------------------------- encoder


class ContentEncoder(nn.Module):
    """Shift (centroid + CNN correction, as the 2D model) and content posteriors of a window."""

    def __init__(self, window_size: tuple[int, int], latent_dim: int, hidden, channels):
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.shift = ShiftEncoder(window_size)
        # Without content latents the trunk is not built (it would only cost time).
        if self.latent_dim:
            self.trunk = _ConvTrunk(window_size, channels)
            self.body = nn.Sequential(
                nn.LayerNorm(self.trunk.features), _mlp([self.trunk.features, *hidden], nn.SiLU)
            )
            self.head = nn.Linear(hidden[-1], 2 * self.latent_dim)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t_mu, t_logsd = self.shift(x)
        if not self.latent_dim:
            empty = x.new_zeros(x.shape[0], 0)
            return {"t_mu": t_mu, "t_logsd": t_logsd, "z_mu": empty, "z_logsd": empty}
        zz = self.head(self.body(self.trunk(x)))
        k = self.latent_dim
        return {"t_mu": t_mu, "t_logsd": t_logsd, "z_mu": zz[:, :k], "z_logsd": zz[:, k:]}


# --------------------------------------------------------------------------- model


class RVAE3D(RVAE):
    """The out-of-plane rVAE (``rvae.model: rvae3d``); the API of :class:`.model.RVAE`.

    Parameters are the ``rvae`` section's keys (see the schema: ``so3_grid``,
    ``pose_components``, ``volume_size``, ``orientation_prior``,
    ``orientation_prior_concentration``, ``latent_dim``, ...). ``decode`` takes quaternions
    instead of angles; ``encode`` returns quaternions, tilts and in-plane angles.
    """

    KIND = MODEL_KIND

    def __init__(
        self,
        window_size: int | tuple[int, int] = 32,
        latent_dim: int | None = None,
        **settings: Any,
    ):
        settings = {**settings, "model": MODEL_KIND}
        settings.pop("encoder", None)
        settings.pop("rotations", None)
        super().__init__(window_size, latent_dim, **settings)

    def _build(self) -> None:
        s = self.settings
        if s["model"] != MODEL_KIND:
            raise InputError(f"rvae.model {s['model']!r}: RVAE3D is the {MODEL_KIND} model")
        wy, wx = self.window_size
        if min(wy, wx) < MIN_WINDOW:
            raise InputError(
                f"window {wy}x{wx} px is too small for rvae3d; expected at least {MIN_WINDOW}x{MIN_WINDOW}"
            )
        d = int(s["volume_size"] or min(wy, wx))
        if d > min(wy, wx):
            raise InputError(
                f"window {wy}x{wx} px is too small for rvae.volume_size {d} voxels (one voxel = one "
                f"pixel); expected a window of at least {d}x{d} or volume_size <= {min(wy, wx)}"
            )
        if d % 2:
            raise InputError(f"rvae.volume_size {d} is odd; expected an even number of voxels")
        k = int(s["latent_dim"])
        self.grid = so3.super_fibonacci(int(s["so3_grid"]))
        self.covering = so3.covering_radius(len(self.grid))
        self.concentration = float(s["orientation_prior_concentration"])
        if s["orientation_prior"] == "flat":
            limit = 1.0 / (2.0 * self.covering**2)
            if not (0.0 <= self.concentration <= limit):
                raise InputError(
                    f"rvae.orientation_prior_concentration {self.concentration:g} is out of range for so3_grid "
                    f"{len(self.grid)} (covering radius {math.degrees(self.covering):.1f} deg); expected 0 .. "
                    f"{limit:.3g} (a prior narrower than the grid's cells cannot be represented)"
                )
        self.encoder = ContentEncoder(
            self.window_size, k, s["encoder_hidden"], s["encoder_channels"]
        )
        self.decoder = ProjectionDecoder(self.window_size, k, d)
        self.rotations = len(self.grid)
        self.pixel = 2.0 / (max(wx, 2) - 1)
        self.noise = torch.nn.Parameter(torch.zeros(()))
        self.net = torch.nn.ModuleDict({"encoder": self.encoder, "decoder": self.decoder})
        self.net.register_parameter("log_noise", self.noise)
        if s["likelihood_sd"] is not None:
            self.noise.requires_grad_(False)
        if s["likelihood"] != "gaussian":
            raise InputError(
                "rvae.likelihood: rvae3d supports only the gaussian likelihood (a projection is a sum "
                "of densities, not a probability)"
            )
        self.log_rotation_prior = torch.zeros(
            1
        )  # unused; the 3D prior depends on the grid (see _log_prior)
        self._rng = np.random.default_rng(int(s["seed"]) + 3)

    # ------------------------------------------------------------------ helpers

    def _log_prior(self, grid: np.ndarray) -> np.ndarray:
        """log p(n) of grid rotations (N, 4) under the configured prior (cells of equal mass)."""
        if self.settings["orientation_prior"] == "flat":
            return so3.watson_log_prior(grid, self.concentration)
        return np.full(len(grid), -math.log(len(grid)))

    def _grid_tensors(self, grid: np.ndarray, dev) -> tuple[torch.Tensor, torch.Tensor]:
        rot = torch.from_numpy(so3.to_matrix(grid).astype(np.float32)).to(dev)
        return rot, torch.from_numpy(self._log_prior(grid).astype(np.float32)).to(dev)

    def _centred(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = torch.isfinite(x)
        x0 = torch.nan_to_num(x, nan=0.0)
        background = self._background(x0, mask)
        return torch.where(mask, x0 - background[:, None, None], 0.0), mask, background

    def _nll(self, xc: torch.Tensor, decoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mm = mask[:, None].float() if not bool(mask.all()) else None
        return losses.gaussian_nll(xc[:, None], decoded, self._noise_sd(), mm)

    # ------------------------------------------------------------------ objective

    def loss(
        self, x: torch.Tensor, beta: float = 1.0, sample: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Negative ELBO per window (nats), batch mean, and its parts; rotation summed out over the top components."""
        xc, mask, _ = self._centred(x.float())
        enc = {key: v.float() for key, v in self.encoder(xc).items()}
        eps = (lambda t: torch.randn_like(t)) if sample else (lambda t: torch.zeros_like(t))
        z = enc["z_mu"] + enc["z_logsd"].exp() * eps(enc["z_mu"])
        t = enc["t_mu"] + enc["t_logsd"].exp() * eps(enc["t_mu"])
        grid = self.grid
        if self.net.training:
            # A fresh random rotation of the whole grid per batch: still uniform, and over the
            # batches every rotation is reached, not only the grid's own.
            grid = so3.multiply(grid, so3.random_rotations(1, self._rng))
        rot, log_prior = self._grid_tensors(grid, x.device)
        spec = self.decoder.spectrum()
        shift_px = t / self.pixel
        with torch.no_grad():
            score = self.decoder.search_scores(
                spec.detach(), rot, xc, shift_px.detach(), z.detach()
            )
            top = min(int(self.settings["pose_components"]), len(grid))
            keep = (
                (log_prior[None] - score / (2 * self._noise_sd().detach() ** 2))
                .topk(top, dim=1)
                .indices
            )
        decoded = self.decoder.render(spec, rot[keep], shift_px[:, None].expand(-1, top, -1), z)
        rec = self._nll(xc, decoded, mask)  # (B, top)
        log_w = log_prior[keep] - rec
        total_rot = -torch.logsumexp(log_w, dim=1)
        resp = torch.softmax(log_w.detach(), dim=1)
        rec_w = (resp * rec).sum(1)
        kl_rot = (resp * (torch.log(resp.clamp(min=1e-30)) - log_prior[keep])).sum(1)
        kl_t = losses.kl_normal(
            enc["t_mu"], enc["t_logsd"], 0.0, float(self.settings["translation_prior"]) * self.pixel
        ).sum(-1)
        kl_z = losses.kl_normal(enc["z_mu"], enc["z_logsd"]).sum(-1)
        total = total_rot + beta * (kl_t + kl_z)
        parts = {"rec": rec_w, "kl_z": kl_z, "kl_angle": kl_rot, "kl_shift": kl_t}
        return total.mean(), parts

    def _local_search(
        self,
        spec: torch.Tensor,
        xf: torch.Tensor,
        z: torch.Tensor,
        q: np.ndarray,
        levels: int | None = None,
    ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """Move every candidate rotation (B, T, 4) to the best rotation of its grid cell, and its shift with it.

        A pattern search on the band-limited residual (:meth:`ProjectionDecoder.local_scores`):
        per level the candidate and its 14 neighbours at radius ``r`` (perturbations in the body
        frame) are scored and the best kept, then the shift's 8 neighbours at ``h`` px, then
        ``r`` and ``h`` are halved, from half the grid's covering radius and 1 px. The shift is
        searched too because the encoder's shift is only a first guess (a wrong shift drags the
        rotation off). The current point is among those scored, so no residual grows.

        Returns the rotations (B, T, 4), the extra shifts (B, T, 2) px (added to the shift
        ``xf`` was moved back by) and their band-limited residuals (B, T).
        """
        levels = LOCAL_LEVELS if levels is None else int(levels)
        b, t = q.shape[:2]
        dev = xf.device
        radius, h = 0.5 * self.covering, 1.0
        shift = xf.new_zeros(b, t, 2, dtype=torch.float32)
        rows = torch.arange(b, device=dev)[:, None]
        score = None
        for _ in range(levels):
            step = so3.from_rotvec(_PATTERN * radius)  # (15, 4)
            cand = so3.multiply(q[:, :, None], step[None, None])  # (B, T, 15, 4)
            rot = (
                torch.from_numpy(so3.to_matrix(cand).astype(np.float32))
                .to(dev)
                .reshape(b, t * len(step), 3, 3)
            )
            # Each candidate's own shift: score all (rotation, shift) pairs and keep the diagonal.
            sc = self.decoder.local_scores(spec, rot, xf, z, shift).reshape(b, t, len(step), t)
            sc = sc[:, torch.arange(t), :, torch.arange(t)].permute(1, 0, 2)  # (B, T, 15)
            _, best = sc.min(-1)
            q = np.take_along_axis(cand, best.cpu().numpy()[..., None, None], 2)[:, :, 0]
            rot = torch.from_numpy(so3.to_matrix(q).astype(np.float32)).to(dev)  # (B, T, 3, 3)
            trial = (shift[:, :, None] + h * _SHIFT_PATTERN.to(dev)[None, None]).reshape(
                b, t * 9, 2
            )
            sc = self.decoder.local_scores(spec, rot, xf, z, trial).reshape(b, t, t, 9)
            sc = sc[:, torch.arange(t), torch.arange(t)]  # (B, T, 9)
            score, best = sc.min(-1)
            shift = trial.reshape(b, t, 9, 2)[rows, torch.arange(t, device=dev)[None], best]
            radius, h = 0.5 * radius, 0.5 * h
        if score is None:
            rot = torch.from_numpy(so3.to_matrix(q).astype(np.float32)).to(dev)
            score = self.decoder.local_scores(spec, rot, xf, z)[..., 0]
        return q, shift, score

    def _peaks(self, logpost: torch.Tensor, count: int) -> np.ndarray:
        """Indices (B, count) of distinct grid peaks: greedy non-maximum suppression within one covering radius."""
        lp = logpost.clone()
        grid = torch.from_numpy(self.grid.astype(np.float32)).to(lp.device)
        near = math.cos(0.5 * self.covering)
        picks = []
        for _ in range(min(int(count), lp.shape[1])):
            idx = lp.argmax(1)
            picks.append(idx)
            close = (grid[idx] @ grid.T).abs() >= near  # (B, N)
            lp = lp.masked_fill(close, -math.inf)
            lp[torch.arange(len(idx)), idx] = -math.inf
        return torch.stack(picks, 1).cpu().numpy()

    # ------------------------------------------------------------------ inference

    def _axis_scatter(self, poses: np.ndarray, z: np.ndarray | None) -> np.ndarray:
        """Mean of ``(R_i^T n_i)(R_i^T n_i)^T`` (3, 3) over the model's projections at ``poses`` (n, 4) (see :meth:`body_axis`)."""
        grid = so3.normalise(np.asarray(poses, dtype=np.float64))
        with torch.no_grad():
            spec = self.decoder.spectrum()
            rot = torch.from_numpy(so3.to_matrix(grid).astype(np.float32)).to(spec.device)
            zero = spec.new_zeros(len(grid), 1, 2)
            content = (
                spec.new_zeros(len(grid), self.latent_dim)
                if z is None or self.latent_dim == 0
                else torch.as_tensor(np.asarray(z, np.float32), device=spec.device)
            )
            images = torch.cat(
                [
                    self.decoder.render(
                        spec, rot[i : i + 256, None], zero[i : i + 256], content[i : i + 256]
                    )[:, 0]
                    for i in range(0, len(grid), 256)
                ]
            )
            images = images.double().cpu().clamp(min=0).numpy()
        normals = np.stack([_image_axis_normal(img) for img in images])  # (N, 3) lab
        body = np.einsum("nji,nj->ni", so3.to_matrix(grid), normals)  # R^T n
        return body.T @ body / max(len(body), 1)

    def body_axis(self, poses: np.ndarray | None = None, z: np.ndarray | None = None) -> np.ndarray:
        """The learned density's long axis (3,) in body coordinates, as its projections show it.

        The body direction that projects onto the long axis of the model's own projections at
        a set of poses: with ``n_i`` the image direction normal to projection i's long axis
        (its 2D second moment) and ``R_i`` its pose, the axis ``a`` minimises
        ``sum_i (R_i a . n_i)^2`` (least eigenvector). End-on views, whose long axis is
        arbitrary, do not pull it: there ``n_i`` is normal to the viewing direction, which is
        ``a`` itself. Not the volume's largest 3D second moment: a rod's learned volume carries
        spurious density (voxel noise over the whole support, a weaker crossing copy of the rod
        where its unobservable roll leaves the volume unconstrained) that pulled the 3D moment
        axis 7-13 deg off the axis the encoded poses follow.

        The poses: ``AXIS_POSES`` rotations uniform over SO(3) (mean content); given ``poses``
        (n, 4) with contents ``z`` (n, k) are joined by the uniform ones at weight
        ``AXIS_UNIFORM_WEIGHT``. Reading the axis at the encoded poses of the training windows
        instead was tried and left out: it was 0.9 deg off the axis the poses follow where the
        uniform poses were 9 deg off (bench/orientation3d.py rod, 800 windows, grid 576), but 8.4
        deg off against 2.6 at the bench's default size (1500 windows, grid 1152), where it took
        the rod's tilt error from 3.6 to 5.4 deg.

        The sign points to the heavier end (third moment of the volume along the axis), so the
        axis is a direction for an asymmetric body (and arbitrary but fixed for an end-symmetric rod).
        """
        scatter = self._axis_scatter(so3.super_fibonacci(AXIS_POSES), None)
        if poses is not None:
            # The uniform poses with a small weight only settle what the given poses leave open:
            # particles that stay flat turn about the viewing axis only, and their projections
            # alone cannot tell the long axis from the viewing direction.
            scatter = self._axis_scatter(poses, z) + AXIS_UNIFORM_WEIGHT * scatter
        axis = np.linalg.eigh(scatter)[1][:, 0]
        with torch.no_grad():
            vol = self.decoder.volumes()[0].detach().cpu().double().clamp(min=0).numpy()
        d = vol.shape[0]
        c = np.arange(d) - d / 2
        zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
        pts = np.stack([xx, yy, zz], -1).reshape(-1, 3)
        w = vol.reshape(-1)
        rel = pts - (w[:, None] * pts).sum(0) / max(w.sum(), 1e-12)
        if float((w * (rel @ axis) ** 3).sum()) < 0:
            axis = -axis
        return axis

    def encode(
        self,
        windows,
        batch_size: int | None = None,
        device: str | torch.device = "auto",
        method: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Posterior summaries of every window.

        Returns
        -------
        dict of ndarray
            ``quaternion`` (n, 4): canonical (w >= 0) unit quaternion of the refined best pose;
            ``quaternion_sd`` (n,) rad: geodesic spread of the posterior about it (cell
            posterior on the same mirror branch plus the refinement's Laplace covariance);
            ``mirror_prob``: posterior mass nearer the mirror pose (:func:`.so3.mirror`) than
            the pose itself (NaN where the two are within two covering radii of the grid, e.g.
            a particle lying flat): 1/2 where the learned volume is its own mirror image (a
            rod), near 0 for a chiral one; ``rotation_prob``: mass of the most probable cell;
            ``tilt``, ``tilt_sd`` (rad): angle between the body axis (:meth:`body_axis`) and
            the image plane, and its spread (cell posterior on the same branch plus
            :meth:`_tilt_profile`); ``in_plane_angle`` / ``angle`` (rad, from +x towards +y) of the
            projected body axis, ``angle_sd``; ``dx``, ``dy``, ``dx_sd``, ``dy_sd`` (px);
            ``z``, ``z_sd`` (n, k); ``background``.
        """
        from ..device import to_device

        batch_size = int(batch_size or self.settings["encode_batch_size"])
        source, batches = self._batches(windows, batch_size)
        dev = self._prepare(device)
        n, k = len(source), self.latent_dim
        out = {
            name: np.empty(n, dtype=np.float64)
            for name in (
                "quaternion_sd",
                "mirror_prob",
                "rotation_prob",
                "tilt",
                "tilt_sd",
                "in_plane_angle",
                "angle_sd",
                "dx",
                "dy",
                "dx_sd",
                "dy_sd",
                "background",
            )
        }
        out["quaternion"] = np.empty((n, 4))
        out["z"] = np.empty((n, k), dtype=np.float32)
        out["z_sd"] = np.empty((n, k), dtype=np.float32)
        axis = self.body_axis()
        rot, log_prior = self._grid_tensors(self.grid, dev)
        with torch.inference_mode():
            spec = self.decoder.spectrum()
            for idx, block in batches:
                x = to_device(torch.from_numpy(block), dev).float()
                xc, mask, background = self._centred(x)
                enc = self.encoder(xc)
                shift_px = enc["t_mu"] / self.pixel
                score = self.decoder.search_scores(spec, rot, xc, shift_px, enc["z_mu"])
                logpost = log_prior[None] - score / (2 * self._noise_sd() ** 2)
                # Several distinct peaks, each moved to the best rotation of its cell; the best of
                # them (band-limited residual plus the cell's prior) starts the Gauss-Newton refinement.
                peaks = self._peaks(logpost, ENCODE_CANDIDATES)
                xf = self.decoder.band_window(xc, shift_px)
                q_peaks, d_peaks, sc = self._local_search(spec, xf, enc["z_mu"], self.grid[peaks])
                lp = log_prior[torch.from_numpy(peaks).to(dev)] - sc / (2 * self._noise_sd() ** 2)
                pick = lp.argmax(1).cpu().numpy()
                rows = np.arange(len(pick))
                q0 = q_peaks[rows, pick]
                shift0 = shift_px + d_peaks[torch.from_numpy(rows), torch.from_numpy(pick)]
                # The mirror branch of the best peak (Deliver 2's ambiguity) need not be among the
                # peaks (the grid is not mirror-symmetric): it is searched from the mirror image of
                # the best, and the best searched on with it, so the two branches get the same search
                # (a branch searched longer fits better for that reason alone).
                xf0 = self.decoder.band_window(xc, shift0)
                q_pair, d_pair, sc_pair = self._local_search(
                    spec, xf0, enc["z_mu"], np.stack([q0, so3.mirror(q0)], 1)
                )
                q0, shift0 = q_pair[:, 0], shift0 + d_pair[:, 0]
                pair_cells = torch.from_numpy(
                    so3.nearest(self.grid, q_pair.reshape(-1, 4))[0].reshape(-1, 2)
                ).to(dev)
                pair_lp = log_prior[pair_cells] - sc_pair / (2 * self._noise_sd() ** 2)
                cand_q = np.concatenate([q_peaks, q_pair], 1)
                cand_lp = torch.cat([lp, pair_lp], 1)
                # The best peak's own entry is superseded by its continued search.
                cand_lp[torch.from_numpy(rows), torch.from_numpy(pick)] = -math.inf
                post, cell_q = self._cell_posterior(logpost, cand_q, cand_lp)
                best = post.argmax(1)
                q, shift, cov = self._refine(spec, xc, mask, q0, shift0, enc["z_mu"])
                profile = self._tilt_profile(
                    spec,
                    xc,
                    mask,
                    q,
                    torch.from_numpy(shift.astype(np.float32)).to(dev),
                    enc["z_mu"],
                    axis,
                )
                res = self._summaries(q, cov, post, axis, cell_q, profile)
                res.update(
                    {
                        "dx": shift[:, 0],
                        "dy": shift[:, 1],
                        "dx_sd": np.sqrt(cov[:, 3, 3]),
                        "dy_sd": np.sqrt(cov[:, 4, 4]),
                        "background": background.cpu().numpy(),
                        "rotation_prob": post[np.arange(len(best)), best],
                        "quaternion": q,
                        "z": enc["z_mu"].cpu().numpy(),
                        "z_sd": enc["z_logsd"].exp().cpu().numpy(),
                    }
                )
                for name, value in res.items():
                    out[name][idx] = value
        out["angle"] = out["in_plane_angle"]
        return {key: (v.astype(np.float32) if key != "quaternion" else v) for key, v in out.items()}

    def _cell_posterior(
        self, logpost: torch.Tensor, cand_q: np.ndarray, cand_lp: torch.Tensor
    ) -> tuple[np.ndarray, np.ndarray]:
        """The posterior over grid cells (B, N) and each cell's pose (B, N, 4), searched cells at their best pose.

        ``logpost`` (B, N): log prior plus band-limited log likelihood at the grid rotations;
        ``cand_q`` (B, C, 4) / ``cand_lp`` (B, C): the locally searched candidates and the same
        quantity at them. A cell's mass is its prior times the likelihood at the best pose known
        in it: a searched candidate's where one landed in the cell (and fits better), else the
        grid rotation's. Why: at a trained model's noise level the likelihood is much narrower
        than a cell, so the grid rotations' own scores pick cells almost at random (a cell whose
        centre is 20 deg from the pose can lose to one far away that happens to overlap) and the
        raw grid posterior put nearly all its mass on a cell 50-160 deg from the refined pose.
        """
        b, c = cand_q.shape[:2]
        cells = so3.nearest(self.grid, cand_q.reshape(-1, 4))[0].reshape(b, c)
        lp = logpost.clone()
        cell_q = np.broadcast_to(self.grid, (b, *self.grid.shape)).copy()
        rows = np.arange(b)
        cl = cand_lp.cpu().numpy()
        for j in np.argsort(cl, axis=1).T:  # ascending: best written last
            cj, lj = cells[rows, j], cand_lp[torch.from_numpy(rows), torch.from_numpy(j)]
            cur = lp[torch.from_numpy(rows), torch.from_numpy(cj)]
            better = (lj > cur).cpu().numpy()
            lp[torch.from_numpy(rows[better]), torch.from_numpy(cj[better])] = lj[
                torch.from_numpy(better)
            ]
            cell_q[rows[better], cj[better]] = cand_q[rows[better], j[better]]
        return torch.softmax(lp, dim=1).cpu().numpy(), cell_q

    def _tilt_profile(
        self,
        spec: torch.Tensor,
        xc: torch.Tensor,
        mask: torch.Tensor,
        q: np.ndarray,
        shift_px: torch.Tensor,
        z: torch.Tensor,
        axis: np.ndarray,
    ) -> np.ndarray:
        """Posterior variance (B,) rad^2 of the tilt about the refined pose's, on a 1D profile of the likelihood.

        The pose is tilted by each ``TILT_PROFILE_DEG`` offset (its body axis turned in the
        vertical plane that holds it, so the in-plane angle stays), the window's Gaussian
        likelihood is evaluated there (residual variance ``s^2`` at the refined pose, as the
        Laplace covariance) and weighted by ``cos(tilt)`` (the uniform prior's mass at that tilt:
        the circle of axis directions at elevation t) and the offsets' spacing. The variance is
        that of the tilt (folded at the image plane) about the refined pose's tilt.

        Why not the Laplace covariance: near the image plane a projection's length changes with
        ``cos(tilt)``, flat to first order, so the likelihood is far from Gaussian in the tilt and
        the curvature at the refined pose said 3 deg where tilts were 10 deg off (rod, true
        tilt below 10 deg, bench/orientation3d.py).
        """
        b = len(q)
        dev = xc.device
        d = so3.axis_direction(q, axis)  # (B, 3) lab
        u = np.stack([-d[:, 1], d[:, 0], np.zeros(b)], 1)  # z x d: horizontal, normal to d
        norm = np.linalg.norm(u, axis=1, keepdims=True)
        u = np.where(norm > 1e-6, u / np.maximum(norm, 1e-12), np.array([1.0, 0.0, 0.0]))
        delta = np.radians(np.asarray(TILT_PROFILE_DEG, dtype=np.float64))  # (K,)
        turned = so3.multiply(
            so3.from_rotvec(u[:, None, :] * delta[None, :, None]), q[:, None, :]
        )  # (B, K, 4)
        rot = torch.from_numpy(so3.to_matrix(turned).astype(np.float32)).to(dev)
        img = self.decoder.render(
            spec, rot, shift_px[:, None].expand(-1, len(delta), -1), z
        ).flatten(2)
        m = mask.flatten(1).float()
        rss = (
            (((xc.flatten(1)[:, None] - img) * m[:, None]) ** 2).sum(-1).double().cpu().numpy()
        )  # (B, K)
        centre = int(np.argmin(np.abs(delta)))
        s2 = np.maximum(rss[:, centre] / np.maximum(m.sum(1).double().cpu().numpy() - 5, 1), 1e-12)
        t = so3.tilt(turned.reshape(-1, 4), axis).reshape(b, len(delta))
        spacing = np.gradient(delta)
        logw = (
            -(rss - rss.min(1, keepdims=True)) / (2 * s2[:, None])
            + np.log(np.maximum(np.cos(t), 1e-6))
            + np.log(spacing)
        )
        w = np.exp(logw - logw.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        return (w * (t - t[:, centre : centre + 1]) ** 2).sum(1)

    def _summaries(
        self,
        q: np.ndarray,
        cov: np.ndarray,
        post: np.ndarray,
        axis: np.ndarray,
        cell_q: np.ndarray,
        tilt_profile: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Spreads, mirror probability, tilt and in-plane angle from the refined poses and the cell posterior.

        ``post`` (B, N) and ``cell_q`` (B, N, 4) are :meth:`_cell_posterior`'s, ``tilt_profile``
        (B,) :meth:`_tilt_profile`'s variance.
        """
        d_self = np.arccos(np.clip(np.abs(np.einsum("bi,bni->bn", q, cell_q)), 0, 1)) * 2  # (B, N)
        mq = so3.mirror(q)
        d_mirror = np.arccos(np.clip(np.abs(np.einsum("bi,bni->bn", mq, cell_q)), 0, 1)) * 2
        grid_tilt = so3.tilt(cell_q.reshape(-1, 4), axis).reshape(cell_q.shape[:2])
        same = d_self <= d_mirror
        mass = np.maximum((post * same).sum(1), 1e-12)
        rot_var = np.trace(cov[:, :3, :3], axis1=1, axis2=2)
        q_var = (post * same * d_self**2).sum(1) / mass + rot_var
        mirror_p = 1.0 - (post * same).sum(1)
        mirror_p = np.where(so3.geodesic(q, mq) < 2 * self.covering, np.nan, mirror_p)
        t_hat = so3.tilt(q, axis)
        t_var = (post * same * (grid_tilt - t_hat[:, None]) ** 2).sum(1) / mass
        a_hat = so3.in_plane_angle(q, axis)
        # Within the best mode the tilt's spread is the likelihood profile's (not the Laplace
        # covariance's, see _tilt_profile); the in-plane angle's is the Laplace part: the
        # angle's derivatives with respect to the rotation vector.
        t_var = t_var + tilt_profile
        g_a = np.empty((len(q), 3))
        for i in range(3):
            dq = so3.multiply(q, so3.from_rotvec(np.eye(3)[i] * 1e-4)[None])
            g_a[:, i] = (np.angle(np.exp(1j * (so3.in_plane_angle(dq, axis) - a_hat)))) / 1e-4
        a_var = np.einsum("bi,bij,bj->b", g_a, cov[:, :3, :3], g_a)
        return {
            "quaternion_sd": np.sqrt(q_var),
            "mirror_prob": mirror_p,
            "tilt": t_hat,
            "tilt_sd": np.sqrt(t_var),
            "in_plane_angle": a_hat,
            "angle_sd": np.sqrt(a_var),
        }

    def _refine(
        self,
        spec: torch.Tensor,
        xc: torch.Tensor,
        mask: torch.Tensor,
        q0: np.ndarray,
        shift_px: torch.Tensor,
        z: torch.Tensor,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gauss-Newton refinement of (rotation vector, dx, dy) from a grid pose; Laplace covariance.

        The rotation is perturbed in the body frame (``R = R_0 R(v)``); derivatives by forward
        differences (six projections per window and step). The covariance is
        ``s^2 (J^T J)^-1`` with ``s^2`` the window's residual variance, as the 2D model's.

        Returns canonical quaternions (B, 4), shifts (B, 2) px and covariances (B, 5, 5) (rad^2, px^2).
        """
        dev = xc.device
        b = xc.shape[0]
        q = q0.copy()
        shift = shift_px.clone()
        m = mask.flatten(1).float()
        xflat = xc.flatten(1)
        eps = np.array([_EPS_ROT] * 3 + [_EPS_SHIFT] * 2)
        cov = np.zeros((b, 5, 5))
        for step in range(REFINE_STEPS + 1):
            qs = (
                [q]
                + [
                    so3.multiply(q, so3.from_rotvec(np.eye(3)[i] * _EPS_ROT)[None])
                    for i in range(3)
                ]
                + [q, q]
            )
            rots = torch.from_numpy(so3.to_matrix(np.stack(qs, 1)).astype(np.float32)).to(
                dev
            )  # (B, 6, 3, 3)
            shifts = shift[:, None].repeat(1, 6, 1)
            shifts[:, 4, 0] += _EPS_SHIFT
            shifts[:, 5, 1] += _EPS_SHIFT
            img = self.decoder.render(spec, rots, shifts, z).flatten(2)  # (B, 6, P)
            base = img[:, 0]
            jac = (img[:, 1:] - base[:, None]) / torch.from_numpy(eps.astype(np.float32)).to(dev)[
                None, :, None
            ]
            jac = jac.transpose(1, 2) * m[..., None]  # (B, P, 5)
            resid = (xflat - base) * m
            jtj = jac.transpose(1, 2) @ jac
            jtj = jtj + 1e-6 * torch.eye(5, device=dev) * jtj.diagonal(dim1=1, dim2=2).mean(1)[
                :, None, None
            ].clamp(min=1e-12)
            if step == REFINE_STEPS:
                dof = (m.sum(1) - 5).clamp(min=1)
                s2 = (resid**2).sum(1) / dof
                cov = (torch.linalg.inv(jtj) * s2[:, None, None]).double().cpu().numpy()
                break
            delta = torch.linalg.solve(jtj, (jac * resid[..., None]).sum(1)).double().cpu().numpy()
            # A step never leaves the grid cell it started in (a cell is one covering radius).
            rv = delta[:, :3]
            norm = np.linalg.norm(rv, axis=1, keepdims=True)
            rv = rv * np.minimum(1.0, 0.5 * self.covering / np.maximum(norm, 1e-12))
            trial = so3.multiply(q, so3.from_rotvec(rv))
            trial_shift = shift + torch.from_numpy(
                np.clip(delta[:, 3:], -1, 1).astype(np.float32)
            ).to(dev)
            # Keep the step only where it lowers the residual.
            rt = torch.from_numpy(so3.to_matrix(trial).astype(np.float32)).to(dev)[:, None]
            new = self.decoder.render(spec, rt, trial_shift[:, None], z).flatten(2)[:, 0]
            better = (((xflat - new) * m) ** 2).sum(1) < (resid**2).sum(1)
            bn = better.cpu().numpy()
            q = np.where(bn[:, None], trial, q)
            shift = torch.where(better[:, None], trial_shift, shift)
        return so3.canonical(so3.normalise(q)), shift.cpu().numpy().astype(np.float64), cov

    def decode(
        self,
        z,
        quaternion=None,
        dx=None,
        dy=None,
        device: str | torch.device = "cpu",
        *,
        angle=None,
    ) -> np.ndarray:
        """Images (n, wy, wx) of content ``z`` (n, k) at poses ``quaternion`` (n, 4) and shifts (px); None = identity / 0.

        ``angle`` (rad, instead of ``quaternion``): the body frame turned by that angle about the
        viewing axis, as the 2D models' ``decode(z, angle=...)`` (which stages such as the
        species templates call).
        """
        if angle is not None:
            if quaternion is not None:
                raise InputError("rvae3d decode: give quaternion or angle, not both")
            quaternion = so3.from_axis_angle(
                [0.0, 0.0, 1.0], np.atleast_1d(np.asarray(angle, dtype=np.float64))
            )
        if self.latent_dim == 0:
            rows = 1 if quaternion is None else np.atleast_2d(np.asarray(quaternion)).shape[0]
            z = np.zeros((max(np.asarray(z).shape[0] if np.ndim(z) else 1, rows), 0), np.float32)
        else:
            z = self._content(z)
        n = z.shape[0]
        q = (
            np.tile([1.0, 0, 0, 0], (n, 1))
            if quaternion is None
            else np.broadcast_to(so3.normalise(quaternion), (n, 4))
        )

        def column(v):
            return (
                np.zeros(n, np.float32)
                if v is None
                else np.broadcast_to(np.asarray(v, np.float32).reshape(-1), (n,))
            )

        dev = self._prepare(device)
        shift = torch.from_numpy(np.stack([column(dx), column(dy)], 1).astype(np.float32)).to(dev)
        rot = torch.from_numpy(so3.to_matrix(q).astype(np.float32)).to(dev)
        images = []
        with torch.inference_mode():
            spec = self.decoder.spectrum()
            zt = torch.from_numpy(z).to(dev)
            for start in range(0, n, 512):
                sl = slice(start, start + 512)
                images.append(
                    self.decoder.render(spec, rot[sl, None], shift[sl, None], zt[sl])[:, 0]
                    .cpu()
                    .numpy()
                )
        return np.concatenate(images) if images else np.empty((0, *self.window_size), np.float32)

    def reconstruct(
        self, windows, batch_size: int | None = None, device: str | torch.device = "auto"
    ) -> np.ndarray:
        """Each window decoded at its encoded pose, shift and content (plus its background)."""
        enc = self.encode(windows, batch_size=batch_size, device=device)
        images = self.decode(enc["z"], enc["quaternion"], enc["dx"], enc["dy"])
        return images + enc["background"][:, None, None]

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_state(cls, payload: dict[str, Any], source: str = "checkpoint") -> RVAE3D:
        kind = payload.get("kind") if isinstance(payload, dict) else None
        if kind != MODEL_KIND:
            raise InputError(
                f"{source}: checkpoint holds a {kind!r} model (in-plane angle), not an {MODEL_KIND} model "
                "(3D rotation); train rvae3d or load it with rvae.model: " + str(kind)
            )
        return super().from_state(payload, source)

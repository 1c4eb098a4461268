"""Baselines the original work compared against: a plain VAE and a Gaussian mixture on windows.

Both have the RVAE interface (fit / encode / decode / reconstruct / save / load), so the
workflow can swap them in with ``rvae.model: vae`` or ``rvae.model: gmm``. Neither infers a
pose, so both report angle, shifts and their spreads as NaN ("no angle", not angle 0, which
downstream order parameters would read as perfect alignment); the plain VAE must spend its
latents on orientation. Comparing their ``z`` against the rVAE's shows why rotation invariance
matters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from .checkpoint import FORMAT, FORMAT_VERSION, check_compatible, read_checkpoint
from .data import WindowSource
from .model import RVAE

#: encode() outputs that describe a pose; NaN for models that infer none.
POSE_OUTPUTS = ("angle", "angle_sd", "rotation_prob", "dx", "dy", "dx_sd", "dy_sd")


class PlainVAE(RVAE):
    """A VAE without rotation or translation latents (same encoder and decoder families)."""

    def __init__(self, window_size=32, latent_dim=None, encoder=None, rotations=None, **settings):
        settings["model"] = "vae"
        super().__init__(window_size, latent_dim, encoder, rotations, **settings)

    def encode(self, windows, batch_size: int | None = None, device="auto") -> dict[str, np.ndarray]:
        """As :meth:`RVAE.encode`, with every pose output NaN: this model infers no pose."""
        out = super().encode(windows, batch_size=batch_size, device=device)
        for name in POSE_OUTPUTS:
            if name in out:
                out[name] = np.full_like(out[name], np.nan)
        return out

    def reconstruct(self, windows, batch_size: int | None = None, device="auto") -> np.ndarray:
        """Each window decoded from its content latents (the decoder's own frame: no pose)."""
        enc = super().encode(windows, batch_size=batch_size, device=device)
        images = self.decode(enc["z"], enc["angle"], enc["dx"], enc["dy"])
        return images + enc["background"][:, None, None]


class WindowGMM:
    """Gaussian mixture on PCA-reduced windows.

    ``z`` of :meth:`encode` is the (n, components) matrix of posterior component probabilities;
    ``decode`` maps such a probability vector back to the probability-weighted mixture mean.
    """

    def __init__(self, window_size=32, components: int | None = None, **settings: Any):
        from .model import _default_settings

        if components is not None:
            settings["gmm_components"] = components
        settings["model"] = "gmm"
        settings.pop("window_size", None)
        self.settings = _default_settings(settings)
        if isinstance(window_size, (int, np.integer)):
            window_size = (int(window_size), int(window_size))
        self.window_size = (int(window_size[0]), int(window_size[1]))
        self.checksum: str | None = None
        self.normalisation: dict[str, float] = {}
        self._params: dict[str, np.ndarray] | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any], window_size) -> WindowGMM:
        return cls(window_size, **settings)

    @property
    def latent_dim(self) -> int:
        return int(self.settings["gmm_components"])

    @property
    def config(self) -> dict[str, Any]:
        return {**self.settings, "window_size": list(self.window_size)}

    def fit(self, windows, *, epochs=None, batch_size=None, checkpoint_dir=None, resume=True, device="auto",
            progress=True, history_path=None, callback=None) -> pd.DataFrame:
        """Fit PCA + mixture on the training fraction of the windows (in memory)."""
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        from .trainer import _write_history, split_indices

        source = windows if isinstance(windows, WindowSource) else WindowSource(windows)
        if tuple(source.window_size) != self.window_size:
            raise InputError(f"windows are {source.window_size} pixels but the model is built for {self.window_size}")
        stats = source.check_content()
        self.normalisation = {"data_min": stats["min"], "data_max": stats["max"], "n_windows": len(source)}
        seed = int(self.settings["seed"])
        train_idx, val_idx = split_indices(len(source), float(self.settings["train_fraction"]), seed)
        x = np.nan_to_num(source.read(train_idx).reshape(len(train_idx), -1))
        ncomp = int(min(20, x.shape[0] - 1, x.shape[1]))
        if ncomp < 1:
            raise InputError(f"{len(train_idx)} training window(s) are too few for the Gaussian mixture")
        pca = PCA(ncomp, random_state=seed).fit(x)
        k = int(self.settings["gmm_components"])
        if x.shape[0] < k:
            raise InputError(f"{x.shape[0]} training windows are fewer than gmm_components = {k}")
        gmm = GaussianMixture(k, covariance_type="full", random_state=seed, n_init=3).fit(pca.transform(x))
        self._params = {
            "pca_mean": pca.mean_, "pca_components": pca.components_,
            "weights": gmm.weights_, "means": gmm.means_, "covariances": gmm.covariances_,
            "precisions_cholesky": gmm.precisions_cholesky_,
        }
        row = {"epoch": 1, "train_loss": -float(gmm.score(pca.transform(x))), "val_loss": np.nan}
        if len(val_idx):
            xv = np.nan_to_num(source.read(val_idx).reshape(len(val_idx), -1))
            row["val_loss"] = -float(gmm.score(pca.transform(xv)))
        history = [row]
        if history_path is not None:
            _write_history(history, history_path)
        return pd.DataFrame(history)

    def _mixture(self):
        from sklearn.mixture import GaussianMixture

        if self._params is None:
            raise RuntimeError("the Gaussian mixture is not fitted yet; call fit() first")
        p = self._params
        gmm = GaussianMixture(len(p["weights"]), covariance_type="full")
        gmm.weights_, gmm.means_, gmm.covariances_ = p["weights"], p["means"], p["covariances"]
        gmm.precisions_cholesky_ = p["precisions_cholesky"]
        return gmm

    def encode(self, windows, batch_size: int | None = None, device="auto") -> dict[str, np.ndarray]:
        source = windows if isinstance(windows, WindowSource) else WindowSource(windows)
        if tuple(source.window_size) != self.window_size:
            raise InputError(f"windows are {source.window_size} pixels but the model was trained on {self.window_size}")
        gmm, p = self._mixture(), self._params
        n = len(source)
        z = np.empty((n, self.latent_dim), np.float32)
        for idx, block in source.iter_batches(np.arange(n), int(batch_size or self.settings["encode_batch_size"])):
            flat = np.nan_to_num(block.reshape(len(block), -1)) - p["pca_mean"]
            z[idx] = gmm.predict_proba(flat @ p["pca_components"].T)
        nan = np.full(n, np.nan, np.float32)
        return {"angle": nan, "angle_sd": nan.copy(), "rotation_prob": nan.copy(), "dx": nan.copy(),
                "dy": nan.copy(), "dx_sd": nan.copy(), "dy_sd": nan.copy(), "z": z,
                "z_sd": np.zeros_like(z)}

    def decode(self, z, angle=None, dx=None, dy=None, device="cpu") -> np.ndarray:
        p = self._params
        z = np.atleast_2d(np.asarray(z, np.float64))
        flat = z @ p["means"] @ p["pca_components"] + p["pca_mean"]
        return flat.reshape(len(z), *self.window_size).astype(np.float32)

    def reconstruct(self, windows, batch_size=None, device="auto") -> np.ndarray:
        return self.decode(self.encode(windows, batch_size)["z"])

    def save(self, path: str | os.PathLike) -> str:
        from ..io import atomic_output
        from ..provenance import file_sha256, provenance_attrs

        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "gmm", "config": self.config,
                   "state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in self._params.items()},
                   "normalisation": self.normalisation,
                   "provenance": provenance_attrs(settings=self.settings, seed=int(self.settings["seed"]), stage="train")}
        with atomic_output(path) as tmp:
            torch.save(payload, tmp)
        self.checksum = file_sha256(path)
        return self.checksum

    @classmethod
    def load(cls, path: str | os.PathLike, *, window_size=None, latent_dim=None) -> WindowGMM:
        from ..provenance import file_sha256

        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: model checkpoint not found")
        payload = read_checkpoint(path)
        if payload.get("kind") != "gmm":
            raise InputError(f"{path}: not a Gaussian-mixture checkpoint (kind {payload.get('kind')!r})")
        config = dict(payload["config"])
        check_compatible(config, str(path), window_size=window_size, latent_dim=None)
        model = cls(tuple(config.pop("window_size")), **config)
        if latent_dim is not None and int(latent_dim) != model.latent_dim:
            raise InputError(f"{path}: checkpoint has {model.latent_dim} mixture components, but latent_dim {latent_dim} was asked for")
        model._params = {k: v.numpy() for k, v in payload["state_dict"].items()}
        model.normalisation = dict(payload.get("normalisation") or {})
        model.checksum = file_sha256(path)
        return model

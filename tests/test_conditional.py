"""The angle-conditional rVAE (rvae.condition: angle): exact sum over the two senses, flips resolved,
angles from patches.zarr, bad input, save/load, training from the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_ssrvae import SMALL, _write_patches, shape

from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.rvae import build_model, load_model
from rvae_tools.rvae.conditional import AngleConditionedRVAE


def _model(**extra) -> AngleConditionedRVAE:
    return build_model(validate_section("rvae", {**SMALL, "condition": "angle", "seed": 0, **extra},
                                        source="test"), 24)


def tadpoles(n: int, seed: int):
    """Tadpoles (one-fold) at uniform angles with small shifts; their true angle and their axis (mod pi)."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-math.pi, math.pi, n)
    x = np.stack([shape(0, a, *rng.uniform(-1, 1, 2)) for a in angle])
    x = (0.1 + 0.8 * x + rng.normal(0, 0.03, x.shape)).astype(np.float32)
    return x, angle, (angle + math.pi / 2) % math.pi - math.pi / 2


def test_the_two_senses_are_summed_out_exactly():
    model = _model(background="none", likelihood_sd=0.2, latent_dim=2)
    model.net.eval()
    x, _, axis = tadpoles(3, seed=1)
    with torch.no_grad():
        loss, parts = model.loss(torch.from_numpy(x), sample=False, angles=torch.from_numpy(axis))
        enc = model.encoder(torch.from_numpy(x))
    z, t = enc["z_mu"].numpy(), enc["t_mu"].numpy() / model.pixel
    # Brute force, from decoded images and the Gaussian density written out: -log of the mean
    # over the two senses of p(x | z, sense), plus the KL terms the parts report.
    nll = []
    for sense in (0.0, math.pi):
        img = model.decode(z, axis + sense, t[:, 0], t[:, 1])
        sq = ((x - img) ** 2).sum((1, 2))
        nll.append(sq / (2 * 0.2 ** 2) + x[0].size * math.log(0.2 * math.sqrt(2 * math.pi)))
    nll = np.stack(nll, 1)
    marginal = -np.log(0.5 * np.exp(-(nll - nll.min(1, keepdims=True))).sum(1)) + nll.min(1)
    expected = marginal + (parts["kl_z"] + parts["kl_shift"] + parts["centre"]).numpy()
    np.testing.assert_allclose(loss.item(), expected.mean(), rtol=1e-4)
    # The reported parts add up to the same ELBO: E_q[rec] + KL(q(sense) || 1/2) = the marginal.
    np.testing.assert_allclose((parts["rec"] + parts["kl_angle"]).numpy(), marginal, rtol=1e-4)
    assert ((parts["kl_angle"] >= -1e-6) & (parts["kl_angle"] <= math.log(2) + 1e-6)).all()


def test_known_axes_train_a_model_that_tells_the_sense():
    torch.manual_seed(0)
    x, angle, axis = tadpoles(120, seed=2)
    model = _model(epochs=10, lr=3e-3, latent_dim=1)
    model.fit(x, angles=axis, device="cpu", progress=False)
    xt, at, axt = tadpoles(60, seed=3)
    enc = model.encode(xt, angles=axt, device="cpu")
    # Reported angles are the given axes or their opposite, nothing in between ...
    off = np.angle(np.exp(1j * (enc["angle"] - axt)))
    assert np.all(np.minimum(np.abs(off), math.pi - np.abs(off)) < 1e-4)
    assert np.all(enc["angle_sd"] == 0) and np.all((enc["flip_prob"] >= 0) & (enc["flip_prob"] <= 0.5))
    # ... and the sense the model picks is the tadpole's own, up to one convention for all
    # (the template's head may point either way): chance would be 0.5.
    right = np.abs(np.angle(np.exp(1j * (enc["angle"] - at)))) < math.pi / 2
    assert max(right.mean(), 1 - right.mean()) > 0.9
    # A model told the full angle reports it as is.
    full = _model(known_angle="full", epochs=1)
    full.fit(x, angles=angle, device="cpu", progress=False)
    enc = full.encode(xt, angles=at, device="cpu")
    np.testing.assert_allclose(np.angle(np.exp(1j * (enc["angle"] - at))), 0, atol=1e-5)
    assert np.all(enc["flip_prob"] == 0)


def test_angles_come_from_the_patches_orientation_and_bad_ones_are_named(tmp_path):
    from rvae_tools.io import open_zarr

    x, _, axis = tadpoles(8, seed=4)
    store = tmp_path / "m" / "patches.zarr"
    _write_patches(store, x, np.repeat(np.arange(4), 2), np.tile(np.arange(2), 4))
    model = _model(epochs=1)
    with pytest.raises(InputError, match="no orientation coordinate"):
        model.fit(str(store), device="cpu", progress=False)
    ds = open_zarr(store).load().assign_coords(orientation=("obs", axis.astype(np.float32)))
    good = tmp_path / "g" / "patches.zarr"
    ds.to_zarr(good)
    model.fit(str(good), device="cpu", progress=False)
    a = model.encode(str(good), device="cpu")["angle"]
    b = model.encode(x, angles=axis, device="cpu")["angle"]
    np.testing.assert_allclose(a, b, atol=1e-6)
    bad = tmp_path / "b" / "patches.zarr"
    ds.assign_coords(orientation=("obs", np.where(np.arange(8) == 5, np.nan, axis))).to_zarr(bad)
    with pytest.raises(InputError, match=r"patches.zarr: orientation is NaN at obs 5 \(1 of 8"):
        model.encode(str(bad), device="cpu")
    with pytest.raises(InputError, match="7 known angles for 8 windows"):
        model.encode(x, angles=axis[:7], device="cpu")
    with pytest.raises(InputError, match="needs the known angle of every window"):
        model.encode(x, device="cpu")
    with pytest.raises(InputError, match="window\\(s\\) 2 have no finite angle"):
        model.fit(x, angles=np.where(np.arange(8) == 2, np.inf, axis), device="cpu", progress=False)


def test_only_the_rvae_is_conditioned_on_the_angle():
    with pytest.raises(InputError, match="condition: angle is a variant of rvae.model rvae"):
        AngleConditionedRVAE(24, **{**SMALL, "model": "vae", "condition": "angle"})


def test_save_load_round_trip_and_training_from_the_command_line(tmp_path):
    from rvae_tools.cli import main
    from rvae_tools.io import open_zarr

    x, _, axis = tadpoles(16, seed=5)
    store = tmp_path / "movieA" / "patches.zarr"
    _write_patches(store, x, np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4))
    ds = open_zarr(store).load().assign_coords(orientation=("obs", axis.astype(np.float32)))
    store = tmp_path / "movieB" / "patches.zarr"
    ds.to_zarr(store)
    path = tmp_path / "model.pt"
    settings = json.dumps({**SMALL, "condition": "angle", "epochs": 1})
    assert main(["train", str(store), "-o", str(path), "--settings", settings, "--device", "cpu",
                 "--no-progress"]) == 0
    model = load_model(path)
    assert isinstance(model, AngleConditionedRVAE) and model.settings["known_angle"] == "axis"
    again = load_model(path)
    a, b = model.encode(str(store), device="cpu"), again.encode(x, angles=axis, device="cpu")
    for key in ("angle", "z", "dx", "flip_prob"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    # The encode stage gives the model each window's orientation: angle_raw is that axis or its opposite.
    latents = tmp_path / "latents.zarr"
    assert main(["encode", str(store), str(path), "-o", str(latents), "--device", "cpu", "--no-progress"]) == 0
    lat = open_zarr(latents)
    raw = lat["angle_raw"].values[np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4)]
    off = np.angle(np.exp(1j * (raw - axis)))
    np.testing.assert_allclose(np.minimum(np.abs(off), math.pi - np.abs(off)), 0, atol=1e-4)

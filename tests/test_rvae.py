"""The rVAE: decoder equivariance, KL terms, angle inference, persistence, resume, bad input."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from scipy import ndimage

from rvae_tools.errors import InputError
from rvae_tools.rvae import RVAE, load_model, losses, wrap_angle
from rvae_tools.rvae.baselines import PlainVAE, WindowGMM
from rvae_tools.rvae.networks import CoordinateMLPDecoder, TemplateDecoder

# --------------------------------------------------------------------------- synthetic windows


def render_l(angle: float, dx: float = 0.0, dy: float = 0.0, size: int = 24, ss: int = 3) -> np.ndarray:
    """An anti-aliased L (no rotational symmetry) rotated by ``angle`` from +x towards +y, moved by (dx, dy) px."""
    c = (np.arange(size * ss) + 0.5) / ss - 0.5 - (size - 1) / 2
    gy, gx = np.meshgrid(c, c, indexing="ij")
    px, py = gx - dx, gy - dy
    ux = math.cos(angle) * px + math.sin(angle) * py + 1.0
    uy = -math.sin(angle) * px + math.cos(angle) * py + 1.0
    m = ((ux > -4) & (ux < 5) & (uy > -4) & (uy < -1)) | ((ux > -4) & (ux < -1) & (uy > -4) & (uy < 5))
    return m.reshape(size, ss, size, ss).mean((1, 3)).astype(np.float32)


def l_windows(n: int, seed: int, size: int = 24):
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-np.pi, np.pi, n)
    shifts = rng.uniform(-1, 1, (n, 2))
    x = np.stack([render_l(a, *d, size=size) for a, d in zip(angles, shifts)])
    x = 0.1 + 0.8 * x + rng.normal(0, 0.03, x.shape).astype(np.float32)
    return x.astype(np.float32), angles, shifts


TINY = {"encoder_hidden": [32], "encoder_channels": [8, 16], "decoder_hidden": [32, 32], "rotations": 8,
            "epochs": 3, "batch_size": 32, "kl_warmup_epochs": 1, "patience": 0}


@pytest.fixture(scope="module")
def trained():
    """A small equivariant rVAE trained briefly on L shapes at uniform angles."""
    torch.manual_seed(0)
    x, _angles, _shifts = l_windows(768, seed=1)
    model = RVAE(24, latent_dim=1, seed=0, **{**TINY, "epochs": 5, "rotations": 16, "lr": 3e-3})
    model.fit(x, device="cpu", progress=False)
    return model


# --------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("kind", [TemplateDecoder, CoordinateMLPDecoder])
def test_decoding_at_90_degrees_is_the_rotated_upright_decoding(kind):
    torch.manual_seed(0)
    dec = kind((20, 20), 2, [16, 16])
    z = torch.randn(3, 2)
    zero = dec(z, torch.zeros(3, 1), torch.zeros(3, 2))[:, 0].detach().numpy()
    quarter = dec(z, torch.full((3, 1), math.pi / 2), torch.zeros(3, 2))[:, 0].detach().numpy()
    # Rotating content by +90 degrees from +x towards +y: new[row, col] = old[w - 1 - col, row].
    assert np.allclose(quarter, np.rot90(zero, -1, axes=(1, 2)), atol=1e-5)
    assert not np.allclose(quarter, np.rot90(zero, 1, axes=(1, 2)), atol=1e-3)


def test_decoding_at_any_angle_is_the_upright_decoding_rotated():
    torch.manual_seed(1)
    size = 21
    dec = CoordinateMLPDecoder((size, size), 2, [32, 32])
    z = torch.randn(1, 2)
    phi = 0.7
    zero = dec(z, torch.zeros(1, 1), torch.zeros(1, 2))[0, 0].detach().numpy().astype(np.float64)
    turned = dec(z, torch.full((1, 1), phi), torch.zeros(1, 2))[0, 0].detach().numpy()
    # Rotate the upright image with scipy: new(p) = old(R(-phi) p), p in pixels about the centre.
    c = np.arange(size) - (size - 1) / 2
    py, px = np.meshgrid(c, c, indexing="ij")
    ux = math.cos(phi) * px + math.sin(phi) * py
    uy = -math.sin(phi) * px + math.cos(phi) * py
    ref = ndimage.map_coordinates(zero, [uy + (size - 1) / 2, ux + (size - 1) / 2], order=3, mode="nearest")
    inner = px ** 2 + py ** 2 < (size / 2 - 2) ** 2
    err = np.abs(turned - ref)[inner]
    assert err.max() < 0.02 * np.ptp(zero[inner]) + 1e-4
    assert np.abs(zero - turned)[inner].max() > 10 * err.max()  # the rotation did change the image


def test_a_shift_of_one_pixel_moves_the_decoding_by_one_column():
    torch.manual_seed(2)
    dec = TemplateDecoder((16, 16), 2, [16])
    z = torch.randn(2, 2)
    h = 2 / 15
    zero = dec(z, torch.zeros(2, 1), torch.zeros(2, 2))[:, 0].detach().numpy()
    moved = dec(z, torch.zeros(2, 1), torch.tensor([[h, 0.0], [h, 0.0]]))[:, 0].detach().numpy()
    assert np.allclose(moved[:, 2:-2, 3:-2], zero[:, 2:-2, 2:-3], atol=1e-5)


# --------------------------------------------------------------------------- losses


def test_kl_terms_match_closed_forms():
    D = torch.distributions
    mu, logsd = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([-0.5, 0.2, -2.0])
    expect = D.kl_divergence(D.Normal(mu, logsd.exp()), D.Normal(0.5, 0.1))
    assert torch.allclose(losses.kl_normal(mu, logsd, 0.5, 0.1), expect, atol=1e-5)
    assert torch.allclose(losses.kl_normal(mu, logsd), D.kl_divergence(D.Normal(mu, logsd.exp()), D.Normal(0.0, 1.0)), atol=1e-6)
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    prior = torch.log_softmax(torch.tensor([0.0, 1.0, 0.0, -1.0]), 0)
    expect = D.kl_divergence(D.Categorical(logits=logits), D.Categorical(logits=prior))
    assert torch.allclose(losses.kl_categorical(logits, prior), expect, atol=1e-6)
    # Narrow normal on the circle vs uniform: log(2 pi) - entropy.
    assert torch.allclose(losses.kl_uniform_angle(logsd), math.log(2 * math.pi) - D.Normal(mu, logsd.exp()).entropy(), atol=1e-6)
    assert torch.allclose(losses.rotation_log_prior(8, "uniform", 0.1).exp(), torch.full((8,), 1 / 8))
    narrow = losses.rotation_log_prior(8, "normal", 0.1).exp()
    assert narrow[0] > 0.99 and torch.isclose(narrow.sum(), torch.tensor(1.0))


def test_likelihoods_match_closed_forms():
    D = torch.distributions
    torch.manual_seed(3)
    x = torch.rand(2, 5, 6)
    mean = torch.rand(2, 5, 6)
    expect = -D.Normal(mean, 0.2).log_prob(x).sum((-2, -1))
    assert torch.allclose(losses.gaussian_nll(x, mean, 0.2), expect, atol=1e-4)
    mask = torch.ones_like(x)
    mask[0, 0, 0] = 0
    masked = losses.gaussian_nll(x, mean, 0.2, mask)
    assert torch.isclose(masked[0], expect[0] + D.Normal(mean[0, 0, 0], 0.2).log_prob(x[0, 0, 0]), atol=1e-4)
    logits = torch.randn(2, 5, 6)
    p = torch.sigmoid(logits)
    expect = -(x * p.log() + (1 - x) * (1 - p).log()).sum((-2, -1))
    assert torch.allclose(losses.bernoulli_nll(x, logits), expect, atol=1e-4)


# --------------------------------------------------------------------------- inference


def _rotation_hits(model, x_a, x_b, phi):
    """Fraction of windows whose encoded angle moved by phi to within 10 degrees."""
    a = model.encode(x_a, device="cpu")["angle"]
    b = model.encode(x_b, device="cpu")["angle"]
    err = np.abs(np.angle(np.exp(1j * (b - a - phi))))
    return float(np.mean(err < np.radians(10)))


def test_rotating_the_input_moves_the_encoded_angle(trained):
    rng = np.random.default_rng(5)
    phi = 1.0  # not a multiple of the 2 pi / 16 the encoder is equivariant to by construction
    base = rng.uniform(-np.pi, np.pi, 64)
    shifts = rng.uniform(-0.5, 0.5, (64, 2))
    x_a = np.stack([render_l(a, *d) for a, d in zip(base, shifts)]) * 0.8 + 0.1
    x_b = np.stack([render_l(a + phi, *d) for a, d in zip(base, shifts)]) * 0.8 + 0.1
    assert _rotation_hits(trained, x_a, x_b, phi) > 0.85
    # Equivariance by construction alone (an untrained encoder) gets whole bins, not the angle.
    untrained = RVAE(24, latent_dim=1, seed=0, **{**TINY, "rotations": 16})
    assert _rotation_hits(untrained, x_a, x_b, phi) < 0.5
    # The encoded shift follows the true one (px, dx along columns).
    d = np.array([[1.0, -0.5]])
    moved = trained.encode(np.stack([render_l(0.3, *d[0]), render_l(0.3)]) * 0.8 + 0.1, device="cpu")
    assert moved["dx"][0] - moved["dx"][1] == pytest.approx(1.0, abs=0.35)
    assert moved["dy"][0] - moved["dy"][1] == pytest.approx(-0.5, abs=0.35)


def test_encode_outputs_and_reconstruction(trained):
    x, _, _ = l_windows(40, seed=9)
    out = trained.encode(x, batch_size=16, device="cpu")
    for name in ("angle", "angle_sd", "dx", "dy", "dx_sd", "dy_sd"):
        assert out[name].shape == (40,) and np.isfinite(out[name]).all(), name
    assert out["z"].shape == (40, 1) and out["z_sd"].shape == (40, 1)
    assert (out["angle"] >= -np.pi).all() and (out["angle"] < np.pi).all()
    rec = trained.reconstruct(x)
    assert rec.shape == x.shape
    # Much better than the mean image: the pose is used.
    assert np.mean((rec - x) ** 2) < 0.5 * np.mean((x - x.mean(0)) ** 2)
    dec = trained.decode(out["z"][:2])
    assert dec.shape == (2, 24, 24)


def _angle_coverage(model, cal_x, x, angles, refine):
    """Calibrated 68 % / 95 % coverage of the true angles, the calibration and the raw encoding."""
    from scipy.stats import norm

    from rvae_tools.rvae.uncertainty import apply_calibration, fit_calibration

    def encode(w):
        return model.encode(w, device="cpu", method="exact", refine=refine)

    # Refined angles are calibrated on copies with fresh noise, as encode calibrates them.
    reconstruct = (lambda w: model.reconstruct(w, device="cpu")) if refine else None
    calibration = fit_calibration(encode, cal_x, seed=0, reconstruct=reconstruct)
    raw = encode(x)
    out = apply_calibration(raw, calibration)
    # The model's angle origin is learned: one constant offset relative to the truth.
    offset = np.angle(np.mean(np.exp(1j * (angles - out["angle"]))))
    err = np.abs(np.angle(np.exp(1j * (angles - out["angle"] - offset))))
    coverage = {c: float(np.mean(err <= norm.ppf(0.5 + c / 2) * out["angle_sd"])) for c in (0.68, 0.95)}
    return coverage, calibration, raw, out, err


@pytest.mark.parametrize("refine", [False, True])
def test_calibrated_intervals_cover_the_true_angles(trained, refine):
    """68 % / 95 % angle intervals on windows of known truth (a tiny set: within 10 / 5 points),
    for grid angles and for angles refined off the grid (which follow the pixels closely enough
    that a window and a rotated copy sharing its noise agree far better than either with the truth)."""
    cal_x, _, _ = l_windows(200, seed=11)
    x, angles, _ = l_windows(200, seed=7)
    coverage, calibration, raw, out, err = _angle_coverage(trained, cal_x, x, angles, refine)
    assert abs(coverage[0.68] - 0.68) <= 0.10 and abs(coverage[0.95] - 0.95) <= 0.05, coverage
    # The L has one end: no flip, and the uncalibrated spread alone is far too narrow.
    assert np.median(out["flip_prob"]) < 0.1
    assert np.mean(err <= 1.96 * raw["angle_sd"]) < 0.8
    assert set(calibration) >= {"angle", "shift", "flip_rate"} and calibration["angle"]["n"] > 150
    assert ("angle_noise" in calibration) == refine


def _l_windows_other_noise(n: int, seed: int, kind: str):
    """L windows whose noise is not the model's independent Gaussian: spatially correlated
    (white noise blurred by a 1 px Gaussian, sd 0.03) or shot noise (Poisson, 300 counts at 1)."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(-np.pi, np.pi, n)
    shifts = rng.uniform(-1, 1, (n, 2))
    x = 0.1 + 0.8 * np.stack([render_l(a, *d) for a, d in zip(angles, shifts)])
    if kind == "shot":
        x = rng.poisson(x * 300.0) / 300.0
    else:
        noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, x.shape), (0, 1.0, 1.0))
        x = x + 0.03 * noise / noise.std()
    return x.astype(np.float32), angles


@pytest.mark.parametrize("kind", ["correlated", "shot"])
def test_calibrated_intervals_cover_the_true_angles_under_other_noise(trained, kind):
    """The refined angle's calibration makes its fresh noise from each window's residual, not from
    the model's noise model: windows with correlated or shot noise (the model was trained on
    neither, and independent pixel noise of the windows' noise sd covered 0.48 / 0.83 of the
    correlated ones) are covered as well."""
    # 400 windows each (encode calibrates on 512): over calibration seeds the 68 % coverage
    # of 200 + 200 windows moved by +/- 0.05, under correlated noise from 0.55 to 0.68.
    cal_x, _ = _l_windows_other_noise(400, 11, kind)
    x, angles = _l_windows_other_noise(400, 7, kind)
    coverage, calibration, _, _, _ = _angle_coverage(trained, cal_x, x, angles, refine=True)
    assert abs(coverage[0.68] - 0.68) <= 0.10 and abs(coverage[0.95] - 0.95) <= 0.05, coverage
    assert calibration["angle_noise"]["median_sd"] > 0.02


def test_wrap_angle_respects_symmetry():
    assert wrap_angle(np.pi + 0.1, 2) == pytest.approx(0.1)
    assert wrap_angle(-0.1, 1) == pytest.approx(-0.1)
    assert wrap_angle(2 * np.pi / 3 + 0.2, 3) == pytest.approx(0.2)


# --------------------------------------------------------------------------- persistence


def test_save_load_round_trip(trained, tmp_path):
    path = tmp_path / "model.pt"
    checksum = trained.save(path)
    import hashlib

    assert checksum == hashlib.sha256(path.read_bytes()).hexdigest() == trained.checksum
    loaded = RVAE.load(path)
    assert loaded.checksum == checksum
    assert loaded.config == trained.config and loaded.window_size == (24, 24) and loaded.latent_dim == 1
    x, _, _ = l_windows(16, seed=3)
    a, b = trained.encode(x, device="cpu"), loaded.encode(x, device="cpu")
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert load_model(path).checksum == checksum
    with pytest.raises(InputError, match="24x24 windows, but the windows are 32x32"):
        RVAE.load(path, window_size=32)
    with pytest.raises(InputError, match="latent_dim 1"):
        RVAE.load(path, latent_dim=3)
    with pytest.raises(InputError, match="32x32 pixels but the model was trained on 24x24"):
        loaded.encode(np.random.rand(2, 32, 32).astype(np.float32))


class _Sneaky:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoints_never_unpickle_arbitrary_objects(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "rvae-tools/rvae-checkpoint", "payload": _Sneaky()}, bad)
    with pytest.raises(InputError, match="cannot be read as a model checkpoint"):
        RVAE.load(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(InputError):
        RVAE.load(junk)
    with pytest.raises(InputError, match="not found"):
        RVAE.load(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- training


class _Interrupt(Exception):
    pass


def _tiny(**extra):
    return RVAE(16, latent_dim=2, seed=3, **{**TINY, "epochs": 4, "lr_schedule": "plateau", **extra})


def test_interrupted_then_resumed_training_equals_uninterrupted(tmp_path):
    x, _, _ = l_windows(96, seed=4, size=16)
    full = _tiny()
    h_full = full.fit(x, checkpoint_dir=tmp_path / "a", device="cpu", progress=False)

    def stop(epoch, row):
        if epoch == 2:
            raise _Interrupt

    first = _tiny()
    with pytest.raises(_Interrupt):
        first.fit(x, checkpoint_dir=tmp_path / "b", device="cpu", progress=False, callback=stop)
    resumed = _tiny()
    h_res = resumed.fit(x, checkpoint_dir=tmp_path / "b", device="cpu", progress=False)
    a, b = full.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(h_res) == len(h_full) == 4
    assert np.allclose(h_res["train_loss"], h_full["train_loss"])
    assert sorted(p.name for p in (tmp_path / "b").glob("*/epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt", "epoch-0004.pt"]
    # Training is deterministic on the CPU for a seed, and a different seed differs.
    again = _tiny()
    again.fit(x, device="cpu", progress=False)
    assert all(torch.equal(a[k], again.net.state_dict()[k]) for k in a)
    other = RVAE(16, latent_dim=2, seed=4, **{**TINY, "epochs": 4, "lr_schedule": "plateau"})
    other.fit(x, device="cpu", progress=False)
    assert not torch.equal(a["decoder.out.weight"], other.net.state_dict()["decoder.out.weight"])


def test_checkpoints_of_another_model_or_windows_start_afresh(tmp_path, caplog):
    x, _, _ = l_windows(48, seed=4, size=16)
    _tiny(epochs=1).fit(x, checkpoint_dir=tmp_path, device="cpu", progress=False)
    caplog.set_level("INFO", logger="rvae_tools.rvae.trainer")
    changed = RVAE(16, latent_dim=3, seed=3, **{**TINY, "epochs": 1, "lr_schedule": "plateau"})
    changed.fit(x, checkpoint_dir=tmp_path, device="cpu", progress=False)
    assert "changed: settings.latent_dim" in caplog.text and "resuming" not in caplog.text
    assert len(list(tmp_path.glob("*/epoch-*.pt"))) == 1  # the other model's folder is gone
    caplog.clear()
    _tiny(epochs=1).fit(x[:40], checkpoint_dir=tmp_path, device="cpu", progress=False)
    assert "windows.checksum" in caplog.text and "resuming" not in caplog.text


def test_history_and_early_stopping(tmp_path):
    x, _, _ = l_windows(64, seed=6, size=16)
    model = _tiny(epochs=30, patience=2, kl_warmup_epochs=0, lr=1e-10)
    hist = model.fit(x, device="cpu", progress=False, history_path=tmp_path / "history.csv")
    assert len(hist) < 30 and bool(hist["stopped_early"].iloc[-1])
    for col in ("epoch", "train_loss", "val_loss", "lr", "beta", "windows_per_s"):
        assert col in hist
    assert (tmp_path / "history.csv").read_text().startswith("epoch,")


# --------------------------------------------------------------------------- bad input


def test_bad_windows_are_clear_errors():
    model = _tiny()
    with pytest.raises(InputError, match="constant"):
        model.fit(np.full((10, 16, 16), 0.3, np.float32), device="cpu", progress=False)
    with pytest.raises(InputError, match="NaN"):
        model.fit(np.full((10, 16, 16), np.nan, np.float32), device="cpu", progress=False)
    with pytest.raises(InputError, match="zero windows"):
        model.fit(np.zeros((0, 16, 16), np.float32), device="cpu", progress=False)
    with pytest.raises(InputError, match="zero windows"):
        model.fit([], device="cpu", progress=False)
    with pytest.raises(InputError, match="built for 16x16"):
        model.fit(np.random.rand(8, 20, 20).astype(np.float32), device="cpu", progress=False)
    with pytest.raises(InputError, match="3-D"):
        model.fit(np.random.rand(8, 16).astype(np.float32), device="cpu", progress=False)


def test_missing_pixels_are_left_out_of_the_likelihood():
    x, _, _ = l_windows(48, seed=7, size=16)
    x[:5, :3, :] = np.nan  # windows padded with NaN at a frame edge
    model = _tiny(epochs=1)
    hist = model.fit(x, device="cpu", progress=False)
    assert np.isfinite(hist["train_loss"]).all()
    assert np.isfinite(model.encode(x, device="cpu")["angle"]).all()


# --------------------------------------------------------------------------- baselines, zarr, CLI


def test_baselines_fit_and_encode(tmp_path):
    x, _, _ = l_windows(64, seed=8, size=16)
    vae = PlainVAE(16, latent_dim=2, **{**TINY, "epochs": 1})
    vae.fit(x, device="cpu", progress=False)
    out = vae.encode(x)
    # No pose is inferred: "no angle" (NaN), never angle 0 (which reads as perfect alignment).
    for name in ("angle", "angle_sd", "rotation_prob", "dx", "dy", "dx_sd", "dy_sd"):
        assert np.isnan(out[name]).all(), name
    assert out["z"].shape == (64, 2) and np.isfinite(out["z"]).all()
    vae.save(tmp_path / "vae.pt")
    loaded = load_model(tmp_path / "vae.pt")
    assert isinstance(loaded, PlainVAE) and np.isnan(loaded.encode(x)["angle"]).all()
    assert np.allclose(loaded.encode(x)["z"], out["z"], atol=1e-6)
    assert np.isfinite(loaded.reconstruct(x)).all()
    gmm = WindowGMM(16, components=2)
    gmm.fit(x)
    enc = gmm.encode(x)
    assert enc["z"].shape == (64, 2) and np.allclose(enc["z"].sum(1), 1, atol=1e-5)
    gmm.save(tmp_path / "gmm.pt")
    again = load_model(tmp_path / "gmm.pt")
    assert isinstance(again, WindowGMM) and np.allclose(again.encode(x)["z"], enc["z"])


def _write_patches(path, windows):
    import xarray as xr

    from rvae_tools.io import write_zarr

    n = len(windows)
    ds = xr.Dataset(
        {"window": (("obs", "wy", "wx"), windows)},
        coords={"particle": ("obs", np.arange(n)), "frame": ("obs", np.zeros(n, int)),
                "x": ("obs", np.zeros(n)), "y": ("obs", np.zeros(n))},
    )
    write_zarr(ds, path, encoding={"window": {"chunks": (16, *windows.shape[1:])}})


def test_zarr_windows_stream_in_chunks(tmp_path):
    from rvae_tools.rvae.data import WindowSource

    x, _, _ = l_windows(50, seed=10, size=16)
    _write_patches(tmp_path / "a.zarr", x[:30])
    _write_patches(tmp_path / "b.zarr", x[30:])
    source = WindowSource([tmp_path / "a.zarr", tmp_path / "b.zarr"], memory_mb=0)
    assert not source.in_memory and len(source) == 50
    seen = []
    for idx, block in source.iter_batches(np.arange(50), 8, np.random.default_rng(0), buffer_batches=2):
        assert np.array_equal(block, x[idx])
        seen.extend(idx)
    assert sorted(seen) == list(range(50)) and seen != list(range(50))


def test_train_cli_writes_model_history_and_resumes(tmp_path, capsys):
    import json

    from rvae_tools.cli import main

    x, _, _ = l_windows(64, seed=11, size=16)
    _write_patches(tmp_path / "m1" / "patches.zarr", x[:40])
    _write_patches(tmp_path / "m2" / "patches.zarr", x[40:])
    settings = json.dumps({**TINY, "epochs": 2, "latent_dim": 2})
    out = tmp_path / "models" / "model.pt"
    args = ["train", str(tmp_path / "m1" / "patches.zarr"), str(tmp_path / "m2" / "patches.zarr"),
            "-o", str(out), "--settings", settings, "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    assert out.exists() and (out.parent / "history.csv").exists()
    assert len(list((out.parent / "model.checkpoints").glob("*/epoch-*.pt"))) == 2
    model = load_model(out)
    assert model.window_size == (16, 16) and model.normalisation["n_windows"] == 64
    first = out.read_bytes()
    assert main(args) == 0  # everything done: resumes at the end, same weights
    assert RVAE.load(out).net.state_dict()["decoder.out.bias"].equal(model.net.state_dict()["decoder.out.bias"])
    assert len(first) > 0
    _write_patches(tmp_path / "flat.zarr", np.ones((8, 16, 16), np.float32))
    assert main(["train", str(tmp_path / "flat.zarr"), "-o", str(tmp_path / "flat.pt"), "--settings", settings]) == 2
    assert "constant" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "x.pt")]) == 2


@pytest.mark.gpu
def test_gpu_training_with_mixed_precision():
    x, _, _ = l_windows(128, seed=12, size=16)
    model = _tiny(epochs=2)
    hist = model.fit(x, device="cuda", progress=False)
    assert np.isfinite(hist["train_loss"]).all()
    assert model.device.type == "cuda"
    out = model.encode(x, device="cuda")
    assert np.isfinite(out["angle"]).all()


# --------------------------------------------------------------------------- lab frame


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_lab_frame_angle_of_a_rotated_particle_is_its_known_angle(trained, method):
    from rvae_tools.calibration import calibrate_species, to_lab

    x, _, _ = l_windows(256, seed=7)
    zmean = trained.encode(x, device="cpu")["z"].mean(0)
    # The L is mirror-symmetric about its corner's diagonal, so its major axis (second moments)
    # lies across that diagonal: at 3 pi / 4 from +x towards +y when upright, modulo pi.
    cal = calibrate_species(trained, zmean, 2)  # the template fit: no reference angles needed
    assert cal["method"] == "template" and cal["residual"] < np.radians(3)
    known = np.array([0.3, 1.1, -0.7, 2.0, -2.5, 3.0])
    rng = np.random.default_rng(2)
    errors = []
    for a in known:
        # The same particle seen 16 times (sub-pixel positions, noise), as along a trajectory.
        shifts = rng.uniform(-0.5, 0.5, (16, 2))
        obs = np.stack([render_l(a, *d) for d in shifts]) * 0.8 + 0.1 + rng.normal(0, 0.03, (16, 24, 24))
        lab = to_lab(trained.encode(obs.astype(np.float32), device="cpu", method=method)["angle"],
                     cal["sense"], cal["offset"])
        axis = a + 3 * np.pi / 4
        errors.append(np.degrees(np.angle(np.mean(np.exp(2j * (lab - axis)))) / 2))
    assert np.max(np.abs(errors)) < 3.0, np.round(errors, 2)


@pytest.fixture(scope="module")
def converged():
    """The L-shape rVAE trained until its encoder's rotation posterior has learned the
    responsibilities (after 5 epochs it picks the exact rotation for 14 % of windows, after 20
    for all of them)."""
    torch.manual_seed(0)
    x, _angles, _shifts = l_windows(768, seed=1)
    model = RVAE(24, latent_dim=1, seed=0, **{**TINY, "epochs": 20, "rotations": 16, "lr": 3e-3})
    model.fit(x, device="cpu", progress=False)
    return model


def test_encoder_method_decodes_nothing_and_keeps_the_rotation(converged, monkeypatch):
    x, _, _ = l_windows(128, seed=13)
    exact = converged.encode(x, device="cpu", method="exact")

    def no_decoding(*args, **kwargs):
        raise AssertionError("encode(method='encoder') decoded a window")

    monkeypatch.setattr(converged.decoder, "forward", no_decoding)
    monkeypatch.setattr(converged.decoder, "template", no_decoding)
    fast = converged.encode(x, device="cpu", method="encoder")
    for name in ("angle_sd", "dx_sd", "dy_sd", "flip_prob"):
        assert np.isfinite(fast[name]).all() and (fast[name] >= 0).all(), name
    gap = np.abs(np.angle(np.exp(1j * (fast["angle"] - exact["angle"]))))
    assert np.mean(gap < np.radians(5)) > 0.95, np.degrees(np.median(gap))
    with pytest.raises(InputError, match="encoder"):
        converged.encode(x, device="cpu", method="decoder-free")

"""rvae3d: projection equivariance, quaternion signs, the SO(3) grid, KL terms, pose recovery, bad input.

The reference projections here are computed independently of the model: a density made of
isotropic Gaussian blobs projects to a sum of 2D Gaussians, evaluated directly in pixel space
(the model projects voxels through the Fourier slice theorem).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from rvae_tools.errors import InputError
from rvae_tools.rvae import RVAE, build_model, load_model, so3
from rvae_tools.rvae.rvae3d import RVAE3D

#: A chiral blob body (centres px, sd px, amplitude): no rotation maps it onto itself.
CENTRES = np.array([[4.0, 0.0, 0.0], [-5.0, 2.0, 1.0], [0.0, -4.0, 3.0], [1.0, 5.0, -3.0]])
SD = np.array([2.0, 1.5, 2.5, 1.8])
AMP = np.array([1.0, 0.7, 0.5, 0.9])


def quat_matrix(q):
    """Rotation matrix of one unit quaternion (w, x, y, z), written out independently of so3."""
    w, x, y, z = np.asarray(q, float) / np.linalg.norm(q)
    return np.array(
        [
            [w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z],
        ]
    )


def voxelise(centres, size=32):
    """The blob density on the model's voxel grid (voxel (a, b, c) = body point (c, b, a) - size/2)."""
    c = np.arange(size) - size / 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    return sum(
        a * np.exp(-((xx - p[0]) ** 2 + (yy - p[1]) ** 2 + (zz - p[2]) ** 2) / (2 * s * s))
        for p, s, a in zip(centres, SD, AMP)
    )


def analytic_projection(q, shift, size=32):
    """Line integral along lab z of the blobs rotated by R(q), origin at the window centre plus shift."""
    px = np.arange(size) - (size - 1) / 2
    gy, gx = np.meshgrid(px, px, indexing="ij")
    lab = CENTRES @ quat_matrix(q).T
    return sum(
        a
        * s
        * math.sqrt(2 * math.pi)
        * np.exp(-((gx - c[0] - shift[0]) ** 2 + (gy - c[1] - shift[1]) ** 2) / (2 * s * s))
        for c, s, a in zip(lab, SD, AMP)
    )


def model_with_volume(volume, **kw):
    m = RVAE3D(volume.shape[0], latent_dim=0, so3_grid=kw.pop("so3_grid", 576), **kw)
    with torch.no_grad():
        m.decoder.volume.copy_(torch.tensor(volume, dtype=torch.float32))
    return m


def test_projection_matches_the_line_integral_at_any_pose_and_shift():
    m = model_with_volume(voxelise(CENTRES))
    rng = np.random.default_rng(3)
    q = rng.normal(size=(4, 4))
    shifts = np.array([[0.0, 0.0], [1.5, -0.7], [-2.0, 2.5], [0.3, 0.3]])
    img = m.decode(np.zeros((4, 0)), q, shifts[:, 0], shifts[:, 1])
    for i in range(4):
        ref = analytic_projection(q[i], shifts[i])
        assert np.abs(img[i] - ref).max() < 0.02 * ref.max()


def test_rotating_the_volume_then_projecting_equals_decoding_at_that_pose():
    q = np.array([0.8, 0.3, -0.4, 0.33])
    rotated = CENTRES @ quat_matrix(q).T
    at_pose = model_with_volume(voxelise(CENTRES)).decode(np.zeros((1, 0)), q[None])[0]
    upright = model_with_volume(voxelise(rotated)).decode(np.zeros((1, 0)), [1.0, 0, 0, 0])[0]
    # Each side is within 2 % of the line integral (test above), so within 4 % of each other.
    assert np.abs(at_pose - upright).max() < 0.04 * upright.max()
    # ... and a pose is not a no-op: a different pose gives a different image.
    other = model_with_volume(voxelise(CENTRES)).decode(np.zeros((1, 0)), [1.0, 0, 0, 0])[0]
    assert np.abs(other - upright).max() > 0.2 * upright.max()


def test_q_and_minus_q_decode_alike_and_give_the_same_loss():
    m = model_with_volume(voxelise(CENTRES))
    q = np.random.default_rng(0).normal(size=(5, 4))
    assert np.allclose(m.decode(np.zeros((5, 0)), q), m.decode(np.zeros((5, 0)), -q), atol=1e-5)
    x = torch.from_numpy(np.stack([analytic_projection(v, (0, 0)) for v in q]).astype(np.float32))
    m.net.eval()
    loss_plus, _ = m.loss(x, sample=False)
    m.grid = -m.grid  # every grid rotation by its other sign
    loss_minus, _ = m.loss(x, sample=False)
    assert torch.allclose(loss_plus, loss_minus, rtol=1e-5)
    assert np.all(so3.canonical(-q)[:, 0] >= 0) and np.allclose(so3.canonical(-q), so3.canonical(q))


def test_grid_is_uniform_and_its_covering_radius_is_as_documented():
    rng = np.random.default_rng(1)
    for n in (576, 2304):
        grid = so3.super_fibonacci(n)
        _, dist = so3.nearest(grid, rng.normal(size=(40000, 4)))
        assert dist.max() <= so3.covering_radius(n)
        assert dist.max() >= so3.covering_radius_lower_bound(n)
        # Haar measure: E[q q^T] = I / 4 (a clustered grid fails this).
        assert np.abs(grid.T @ grid / n - np.eye(4) / 4).max() < 0.01
    assert math.degrees(so3.covering_radius(4608)) < 15.0
    # A clumped grid of the same size has a larger covering radius than documented.
    clumped = so3.normalise(np.array([1.0, 0, 0, 0]) + 0.3 * rng.normal(size=(576, 4)))
    assert so3.nearest(clumped, rng.normal(size=(4000, 4)))[1].max() > so3.covering_radius(576)


def test_flat_prior_on_the_grid_matches_the_watson_density():
    grid = so3.super_fibonacci(4608)
    k = 3.0
    log_p = so3.watson_log_prior(grid, k)
    normal_z = np.array([quat_matrix(q)[2, 2] for q in grid])
    # Closed form: density exp(k t^2) / M(1/2, 3/2, k) relative to Haar; a cell holds 1/n of Haar.
    closed = k * normal_z**2 - math.log(special.hyp1f1(0.5, 1.5, k)) - math.log(len(grid))
    assert np.abs(log_p - closed).max() < 0.01
    assert np.allclose(so3.watson_log_prior(grid, 0.0), -math.log(len(grid)))


def test_kl_terms_against_closed_forms():
    m = model_with_volume(voxelise(CENTRES), pose_components=4)
    rng = np.random.default_rng(2)
    q = rng.normal(size=(3, 4))
    x = torch.from_numpy(np.stack([analytic_projection(v, (0, 0)) for v in q]).astype(np.float32))
    m.net.eval()
    total, parts = m.loss(x, sample=False)
    # kl_angle is KL(r || p(n)) of the responsibilities over the kept components; with the
    # uniform prior that is log N - H(r) >= log(N / top) (r lives on 4 of N cells).
    assert torch.all(parts["kl_angle"] >= math.log(len(m.grid) / 4) - 1e-4)
    assert torch.all(parts["kl_angle"] <= math.log(len(m.grid)) + 1e-4)
    enc = m.encoder(x)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(enc["t_mu"], enc["t_logsd"].exp()),
        torch.distributions.Normal(0.0, 2.0 * m.pixel),
    ).sum(-1)
    assert torch.allclose(parts["kl_shift"], ref, rtol=1e-4)
    # The negative ELBO is rec + KL(rotation) + KL(shift) (no content latents here).
    assert torch.allclose(
        total, (parts["rec"] + parts["kl_angle"] + parts["kl_shift"]).mean(), rtol=1e-4
    )


def _pose_windows(n, seed):
    from rvae_tools.simulate import body_3d, project_body_3d

    rng = np.random.default_rng(seed)
    q = so3.random_rotations(n, rng)
    x = project_body_3d(body_3d("asymmetric", 5.0), q, 16)
    return (x + rng.normal(0, 0.05, x.shape)).astype(np.float32), q


def test_a_briefly_trained_model_recovers_poses_an_untrained_one_does_not(tmp_path):
    torch.set_num_threads(1)
    x, q = _pose_windows(400, 0)
    m = RVAE3D(
        16,
        latent_dim=0,
        so3_grid=576,
        epochs=16,
        batch_size=32,
        lr=0.01,
        kl_warmup_epochs=0,
        likelihood_sd=0.1,
        patience=0,
        seed=0,
    )
    within = lambda model: float(
        (so3.align(model.encode(x)["quaternion"], q)["errors"] < math.radians(15)).mean()
    )
    untrained = within(m)
    m.fit(x, progress=False)
    trained = within(m)
    # Chance: a 15-degree ball holds 0.1 % of SO(3).
    assert untrained < 0.05
    assert trained > 0.3
    # Encoded tilts are measured from the body axis, and a saved model reads the same axis.
    axis = m.body_axis()
    assert np.isclose(np.linalg.norm(axis), 1.0)
    m.save(tmp_path / "m.pt")
    again = load_model(tmp_path / "m.pt")
    assert np.allclose(again.body_axis(), axis)
    enc = again.encode(x[:8])
    assert np.allclose(enc["tilt"], so3.tilt(enc["quaternion"], axis), atol=1e-5)


def test_bad_input_is_one_line():
    with pytest.raises(InputError, match="too small for rvae.volume_size 32"):
        RVAE3D(16, volume_size=32)
    with pytest.raises(InputError, match="too small for rvae3d"):
        RVAE3D(6)
    with pytest.raises(InputError, match="orientation_prior_concentration 500 is out of range"):
        RVAE3D(16, orientation_prior="flat", orientation_prior_concentration=500.0, so3_grid=576)
    with pytest.raises(InputError, match="orientation_prior_concentration"):
        RVAE3D(16, orientation_prior="flat", orientation_prior_concentration=-1.0)


def test_checkpoints_say_which_kind_of_model_they_hold(tmp_path):
    m3 = RVAE3D(16, latent_dim=1, so3_grid=576)
    p3 = tmp_path / "m3.pt"
    m3.save(p3)
    again = load_model(p3)
    assert isinstance(again, RVAE3D)
    z = np.zeros((2, 1), np.float32)
    q = np.array([[1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]])
    assert np.allclose(again.decode(z, q), m3.decode(z, q), atol=1e-6)
    assert isinstance(build_model({"model": "rvae3d", "so3_grid": 576}, 16), RVAE3D)
    p2 = tmp_path / "m2.pt"
    RVAE(16, latent_dim=1).save(p2)
    with pytest.raises(InputError, match="not an rvae3d model") as err:
        RVAE3D.load(p2)
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="holds an rvae3d model") as err:
        RVAE.load(p3)
    assert "\n" not in str(err.value)


def test_encoding_finds_the_best_pose_between_grid_rotations_and_outside_the_best_grid_cell():
    # The true volume, a coarse grid (covering radius ~29 deg) and noisy windows: the encoded
    # pose must fit each window at least as well as the true pose does (the search found the
    # likelihood's optimum, even where the best-scoring grid cell is not the true pose's cell),
    # and land far inside a grid cell.
    torch.set_num_threads(1)
    m = model_with_volume(voxelise(CENTRES), so3_grid=576, likelihood_sd=0.3)
    rng = np.random.default_rng(7)
    q = so3.random_rotations(60, rng)
    clean = np.stack([analytic_projection(v, (0, 0)) for v in q])
    x = (clean + rng.normal(0, 0.1 * clean.max(), clean.shape)).astype(np.float32)
    enc = m.encode(x, device="cpu")
    fitted = (
        m.decode(enc["z"], enc["quaternion"], enc["dx"], enc["dy"])
        + enc["background"][:, None, None]
    )
    at_truth = m.decode(enc["z"], q) + enc["background"][:, None, None]
    assert (((fitted - x) ** 2).sum((1, 2)) <= ((at_truth - x) ** 2).sum((1, 2))).mean() >= 0.95
    err = np.degrees(so3.geodesic(enc["quaternion"], q))
    assert np.median(err) < 0.25 * math.degrees(m.covering)
    assert (err < 15.0).mean() >= 0.85


def rod_volume(direction, size=32, noise=0.0, seed=0):
    """A voxelised rod (half length 9 px, radius sd 1.4 px) along ``direction`` (body x, y, z), plus voxel noise."""
    c = np.arange(size) - size / 2
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    p = np.stack([xx, yy, zz], -1)
    s = p @ direction
    along = np.clip(1 - np.maximum(np.abs(s) - 9, 0) / 1.5, 0, 1)
    v = along * np.exp(-((p**2).sum(-1) - s**2) / (2 * 1.4**2))
    return v + noise * v.max() * np.random.default_rng(seed).normal(size=v.shape)


def test_body_axis_is_a_rods_axis_and_tilt_follows_it():
    rng = np.random.default_rng(5)
    for k in range(3):
        u = rng.normal(size=3)
        u /= np.linalg.norm(u)
        m = model_with_volume(rod_volume(u, noise=0.03, seed=k), so3_grid=576)
        axis = m.body_axis()
        assert math.degrees(math.acos(min(1.0, abs(float(axis @ u))))) < 3.0
        # Tilt at a pose, written out here: the lab z component of R u.
        q = rng.normal(size=(5, 4))
        expected = np.degrees(np.arcsin(np.abs([quat_matrix(v)[2] @ u for v in q])))
        assert np.abs(np.degrees(so3.tilt(q, axis)) - expected).max() < 3.0


def _mirror_blend(alpha, size=32):
    """The chiral blobs blended with their mirror image through the body plane z = 0: (1 - alpha) (V + V_M) / 2 + alpha V.

    alpha = 0: a body with a mirror plane, whose projection at ``so3.mirror(q)`` equals the one
    at ``q`` (the two branches tie); alpha = 1: the chiral body (the mirror pose fits badly).
    """
    mirrored = CENTRES * np.array([1.0, 1.0, -1.0])
    return (1 - alpha) * (
        voxelise(CENTRES, size) + voxelise(mirrored, size)
    ) / 2 + alpha * voxelise(CENTRES, size)


def _band_residual(a, b, pad):
    """Squared residual of images a - b (n, H, W) over the frequencies below SEARCH_BAND (zero-padded to pad x pad, Parseval)."""
    from rvae_tools.rvae.rvae3d import SEARCH_BAND

    big = np.zeros((len(a), pad, pad))
    big[:, : a.shape[1], : a.shape[2]] = a - b
    k = np.fft.fftfreq(pad)
    band = np.hypot(k[:, None], k[None, :]) <= max(2 / pad, SEARCH_BAND)
    return (np.abs(np.fft.fft2(big)) ** 2 * band).sum((1, 2)) / pad**2


def _encode_blend(alpha, n=12, seed=0):
    rng = np.random.default_rng(seed)
    q = so3.random_rotations(n, rng)
    probe = model_with_volume(_mirror_blend(alpha))
    clean = probe.decode(np.zeros((n, 0)), q)
    sd = 0.1 * float(clean.max())
    m = model_with_volume(_mirror_blend(alpha), likelihood_sd=sd)
    x = (clean + rng.normal(0, sd, clean.shape)).astype(np.float32)
    return m, x, m.encode(x, device="cpu"), sd


def test_mirror_prob_is_one_half_for_a_mirror_symmetric_body_and_zero_for_a_chiral_one():
    # Deliver 2: a projection cannot tell pose q of a body from so3.mirror(q) of its mirror image.
    # For a body that is its own mirror image the two branches fit equally (mass 1/2 each); for
    # a chiral body only one of them fits. A constant mirror_prob fails one of the two.
    torch.set_num_threads(1)
    for alpha, lo, hi in ((0.0, 0.4, 0.6), (1.0, 0.0, 0.05)):
        _, _, enc, _ = _encode_blend(alpha)
        mp = enc["mirror_prob"]
        finite = mp[np.isfinite(mp)]
        # NaN only where q and its mirror are too close to tell apart (nearly flat): a few windows.
        assert len(finite) >= 8
        assert np.all((finite >= lo) & (finite <= hi)), (alpha, finite)


def test_mirror_prob_is_the_posterior_mass_of_the_mirror_branch():
    # A body slightly chiral: the mirror branch fits a little worse, by an amount that differs
    # between poses. Its posterior mass, worked out here from the band-limited Gaussian
    # likelihood at the encoded pose and at its mirror (two branches, uniform prior), must be
    # what encode reports.
    torch.set_num_threads(1)
    m, x, enc, sd = _encode_blend(0.04, n=16, seed=1)
    fit_self = m.decode(enc["z"], enc["quaternion"], enc["dx"], enc["dy"])
    fit_mirror = m.decode(enc["z"], so3.mirror(enc["quaternion"]), enc["dx"], enc["dy"])
    xc = x - enc["background"][:, None, None]
    pad = 2 * m.decoder.size
    gap = (_band_residual(xc, fit_mirror, pad) - _band_residual(xc, fit_self, pad)) / (2 * sd**2)
    expected = 1 / (1 + np.exp(np.clip(gap, -50, 50)))
    mp = enc["mirror_prob"]
    ok = np.isfinite(mp)
    assert ok.sum() >= 12
    # The poses span the transition, so a constant cannot pass.
    assert np.ptp(expected[ok]) > 0.3
    assert np.mean(np.abs(mp[ok] - expected[ok])) < 0.1
    from scipy.stats import spearmanr

    assert spearmanr(mp[ok], expected[ok])[0] > 0.7


def test_tilt_sd_is_calibrated_when_the_volume_is_right():
    # The true rod volume, noisy windows (SNR 5) at poses uniform over SO(3): the true tilt lies
    # within 1 / 2 tilt_sd of the encoded tilt about as often as a calibrated spread says
    # (68 / 95 %), near the image plane too, where the tilt is poorly determined (a projection's
    # length changes with cos(tilt)) and a Laplace spread was too narrow.
    torch.set_num_threads(1)
    u = np.array([1.0, 0.0, 0.0])
    rng = np.random.default_rng(4)
    q = so3.random_rotations(40, rng)
    clean = model_with_volume(rod_volume(u)).decode(np.zeros((40, 0)), q)
    sd = 0.2 * float(clean.max())
    m = model_with_volume(rod_volume(u), likelihood_sd=sd)
    enc = m.encode((clean + rng.normal(0, sd, clean.shape)).astype(np.float32), device="cpu")
    true = np.arcsin(np.abs([quat_matrix(v)[2] @ u for v in q]))
    z = np.abs(enc["tilt"] - true) / enc["tilt_sd"]
    assert 0.5 <= np.mean(z <= 1) <= 0.9
    assert np.mean(z <= 2) >= 0.85

"""bench/orientation3d.py: the references on the tumbling bodies (conditional VAE, 2D rVAE) and the tilt_sd coverage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._bench import BENCH, load_bench

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_bench("orientation3d")


def test_in_plane_errors_allow_offset_sense_and_symmetry(bench):
    rng = np.random.default_rng(1)
    true = rng.uniform(-np.pi, np.pi, 2000)
    # Another frame and the other sense, 3 deg of noise: the errors are the noise.
    est = -(true - 0.7) + np.radians(3.0) * rng.standard_normal(true.size)
    err = bench.in_plane_errors(true, est, 1)
    assert np.median(err) == pytest.approx(
        3.0 * 0.6745, rel=0.15
    )  # median of abs(normal) = 0.6745 sd
    # A rod's two ends look alike: windows reported a half turn off are still right.
    flipped = true + np.pi * (rng.random(true.size) < 0.3)
    assert np.max(bench.in_plane_errors(true, flipped, 2)) < 1e-6
    assert np.mean(bench.in_plane_errors(true, flipped, 1) > 179) == pytest.approx(0.3, abs=0.04)
    # Angles unrelated to the truth: errors uniform over 0..180/order deg.
    assert np.median(
        bench.in_plane_errors(true, rng.uniform(-np.pi, np.pi, true.size), 1)
    ) == pytest.approx(90, abs=10)


def test_tilt_coverage_of_calibrated_and_overconfident_spreads(bench):
    rng = np.random.default_rng(2)
    true = rng.uniform(0, np.pi / 2, 5000)
    sd = rng.uniform(0.02, 0.2, true.size)
    est = true + sd * rng.standard_normal(true.size)
    cov = bench.tilt_coverage(true, est, sd)
    assert cov["tilt_within_1sd"] == pytest.approx(0.683, abs=0.03)
    assert cov["tilt_within_2sd"] == pytest.approx(0.954, abs=0.02)
    over = bench.tilt_coverage(true, est, sd / 3)
    assert over["tilt_within_1sd"] < 0.35 and over["tilt_within_2sd"] < 0.55


def test_conditional_vae_uses_the_true_rotations(bench):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x, q, clean, sd = bench.make_windows("asymmetric", 160, 5.0, 0)
    model = bench.PoseConditionedVAE(
        32,
        latent_dim=0,
        so3_grid=72,
        epochs=4,
        batch_size=64,
        lr=0.01,
        kl_warmup_epochs=0,
        likelihood_sd=sd,
        patience=0,
        seed=0,
    )
    model.fit_posed(x, q, progress=False)
    given = bench.rmse_vs_clean(model.reconstruct_posed(x[:100], q[:100]), clean[:100], sd)
    rng = np.random.default_rng(3)
    wrong = bench.rmse_vs_clean(
        model.reconstruct_posed(x[:100], bench.so3.random_rotations(100, rng)), clean[:100], sd
    )
    # The learned volume is the body in the truth's frame: right poses reconstruct it, random ones do not.
    assert given < 0.5 < 0.8 * wrong


def test_tiny_run_reports_the_references_as_numbers():
    cmd = [
        sys.executable,
        str(BENCH / "orientation3d.py"),
        "--windows",
        "64",
        "--epochs",
        "1",
        "--grid",
        "72",
        "--encode",
        "32",
        "--no-asymmetric",
        "--flat",
        "--rvae2d-epochs",
        "1",
        "--threads",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    (cond,), (ref2d,), (rod,) = (
        out["conditional_vae_reference"],
        out["rvae2d_reference"],
        out["runs"],
    )
    for key in ("reconstruction_rmse_vs_clean_conditional", "reconstruction_rmse_vs_clean_rvae3d"):
        assert 0 < cond[key] < 5
    assert cond["reconstruction_rmse_vs_clean_rvae3d"] == rod["reconstruction_rmse_vs_clean"]
    assert ref2d["body"] == "rod" and ref2d["symmetry"] == 2
    for model in ("rvae2d", "rvae3d", "rvae3d_aligned_poses"):
        assert 0 <= ref2d[f"in_plane_median_deg_{model}"] <= 90  # a rod's angle is modulo 180 deg
        assert 0 <= ref2d[f"in_plane_within_15deg_{model}"] <= 1
    assert 0 < ref2d["reconstruction_rmse_vs_clean_rvae2d"] < 5
    assert 0 <= rod["tilt_within_1sd"] <= rod["tilt_within_2sd"] <= 1

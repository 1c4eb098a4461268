"""Particles tilting out of the image plane in the simulator (species[].body_3d)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.transform import Rotation

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.simulate import body_3d, project_body_3d, simulate

CLEAN = {"noise": {"snr": None}, "render": {"blur": 0.0, "scan_line_offset": 0.0, "tilt": 0.0}}


def tilted(seed=0, kind="rod", shape="rod", concentration=8.0, diffusion=0.05, **overrides):
    species = [
        {
            "name": "r3",
            "shape": shape,
            "length": 14.0,
            "width": 5.0,
            "contrast": 1.5,
            "body_3d": {
                "kind": kind,
                "tilt_concentration": concentration,
                "tilt_diffusion": diffusion,
            },
        }
    ]
    s = validate_section(
        "simulate",
        {"frames": 6, "height": 96, "width": 96, "n_particles": 8, "species": species, **overrides},
    )
    return s | {"seed": seed}


def z_of_axis(truth):
    """Signed z of the body x axis in the lab, from the truth quaternions, by scipy (x, y, z, w)."""
    q = truth[["qx", "qy", "qz", "qw"]].to_numpy()
    return Rotation.from_quat(q).apply([1.0, 0.0, 0.0])[:, 2]


@pytest.mark.parametrize("kind, shape", [("rod", "rod"), ("asymmetric", "tadpole")])
def test_truth_pose_re_rendered_reproduces_the_movie(kind, shape):
    sim = simulate(tilted(seed=1, kind=kind, shape=shape, **CLEAN))
    truth = sim.truth
    assert {"qw", "qx", "qy", "qz", "tilt"} <= set(truth.columns)
    assert np.allclose(np.linalg.norm(truth[["qw", "qx", "qy", "qz"]].to_numpy(), axis=1), 1.0)
    assert np.allclose(truth.tilt, np.arcsin(np.abs(z_of_axis(truth))))
    body = body_3d(kind, 7.0)
    half = 7
    checked = 0
    for row in truth.itertuples():
        ix, iy = int(np.rint(row.x)), int(np.rint(row.y))
        if not (half <= ix < 96 - half and half <= iy < 96 - half):
            continue
        crop = (
            sim.movie[row.frame, iy - half : iy + half + 1, ix - half : ix + half + 1] - 1.0
        )  # mica level 1
        want = (
            1.5
            * project_body_3d(
                body,
                np.array([[row.qw, row.qx, row.qy, row.qz]]),
                2 * half + 1,
                np.array([[row.x - ix, row.y - iy]]),
            )[0]
        )
        # Neighbours may reach into the corners of the crop; the particle's own pixels must match.
        own = want > 0.2
        assert np.allclose(crop[own], want[own], atol=1e-4), (row.frame, row.particle)
        checked += 1
    assert checked >= 10


def test_a_tilted_rod_looks_shorter_and_brighter():
    sim = simulate(tilted(seed=2, concentration=2.0, frames=3, **CLEAN))
    truth = sim.truth
    lengths, peaks = [], []
    for row in truth.itertuples():
        ix, iy = int(np.rint(row.x)), int(np.rint(row.y))
        if not (10 <= ix < 86 and 10 <= iy < 86):
            continue
        crop = sim.movie[row.frame, iy - 10 : iy + 11, ix - 10 : ix + 11] - 1.0
        lengths.append(int((crop > 0.5).sum()))
        peaks.append(float(crop.max()))
    keep = [
        r
        for r in truth.itertuples()
        if 10 <= int(np.rint(r.x)) < 86 and 10 <= int(np.rint(r.y)) < 86
    ]
    flat = np.array([r.tilt for r in keep])
    assert stats.spearmanr(flat, peaks).statistic > 0.5  # blobs stack along the view when tilted
    assert stats.spearmanr(flat, lengths).statistic < -0.3


def test_tilt_follows_the_configured_concentration_and_diffusion():
    # Fast diffusion: frames are nearly independent draws from the stationary law.
    for kappa in (4.0, 16.0):
        sim = simulate(
            tilted(
                seed=3,
                concentration=kappa,
                diffusion=2.0,
                frames=40,
                render={"supersample": 1},
                noise={"snr": None},
            )
        )
        tilt = np.arcsin(np.abs(z_of_axis(sim.truth)))
        assert len(tilt) > 200
        # Elevation ~ N(0, 1/kappa), so the tilt is half-normal with scale 1/sqrt(kappa).
        assert stats.kstest(tilt, stats.halfnorm(scale=1 / np.sqrt(kappa)).cdf).pvalue > 1e-3
        assert np.mean(tilt**2) == pytest.approx(1 / kappa, rel=0.2)
    # Slow diffusion: the frame-to-frame correlation of the elevation is exp(-D kappa).
    sim = simulate(
        tilted(
            seed=4,
            concentration=8.0,
            diffusion=0.05,
            frames=30,
            render={"supersample": 1},
            noise={"snr": None},
        )
    )
    truth = sim.truth.assign(z=z_of_axis(sim.truth)).sort_values(["particle", "frame"])
    nxt = truth.groupby("particle").shift(-1)
    step = (nxt.frame - truth.frame) == 1
    r = np.corrcoef(truth.z[step], nxt.z[step])[0, 1]
    assert r == pytest.approx(np.exp(-0.05 * 8.0), abs=0.12)


def test_movie_without_body_3d_is_unchanged():
    # Digests of this movie recorded with the simulator before body_3d existed.
    s = validate_section(
        "simulate", {"frames": 6, "height": 96, "width": 96, "n_particles": 15}
    ) | {"seed": 3}
    sim = simulate(s, masks=True)
    assert hashlib.sha256(sim.movie.tobytes()).hexdigest() == (
        "23b4faa2e27d203c452392e832c1dc7b5ca589d51e42f77a99c92b107a9ae5d1"
    )
    assert hashlib.sha256(sim.masks.tobytes()).hexdigest() == (
        "32fa3fac7bfe967bce9b79110b236eae941ca740b446dcd0b5285be57795bd5b"
    )
    assert list(sim.truth.columns) == [
        "frame",
        "particle",
        "x",
        "y",
        "angle",
        "cls",
        "angle_unwrapped",
    ]


@pytest.mark.parametrize(
    "body, key",
    [
        (
            {"kind": "disc", "tilt_concentration": 1, "tilt_diffusion": 1},
            "simulate.species.0.body_3d.kind",
        ),
        (
            {"kind": "rod", "tilt_concentration": 0, "tilt_diffusion": 1},
            "simulate.species.0.body_3d.tilt_concentration",
        ),
        (
            {"kind": "rod", "tilt_concentration": 1, "tilt_diffusion": -1},
            "simulate.species.0.body_3d.tilt_diffusion",
        ),
        ({"kind": "rod", "tilt_concentration": 1}, "tilt_diffusion"),
        (
            {"kind": "asymmetric", "tilt_concentration": 1, "tilt_diffusion": 1},
            "simulate.species.0.body_3d.kind",
        ),
    ],
)
def test_bad_body_3d_is_a_one_line_error(tmp_path, capsys, body, key):
    species = [{"name": "r3", "shape": "rod", "body_3d": body}]
    code = main(
        [
            "simulate",
            "--outdir",
            str(tmp_path),
            "--settings",
            json.dumps({"species": species, "frames": 2}),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err, err


def test_bad_body_3d_in_python_names_the_field():
    bad = [
        {
            "name": "r3",
            "shape": "rod",
            "length": 14.0,
            "body_3d": {"kind": "rod", "tilt_concentration": float("nan"), "tilt_diffusion": 1.0},
        }
    ]
    with pytest.raises(InputError, match=r"simulate\.species\.0\.body_3d\.tilt_concentration"):
        simulate({"species": bad, "frames": 2, "seed": 0})


def test_projection_cannot_tell_the_mirror_pose_of_the_mirrored_body():
    # Issue 14 Deliver 2: the chiral body at q and its mirror image (z -> -z) at so3.mirror(q)
    # give the same window, while the body itself at so3.mirror(q) does not.
    from rvae_tools.rvae import so3

    centres, sd, amp = body_3d("asymmetric", 8.0)
    mirrored = (centres * np.array([1.0, 1.0, -1.0]), sd, amp)
    q = so3.random_rotations(20, np.random.default_rng(0))
    a = project_body_3d((centres, sd, amp), q, 33)
    assert np.allclose(a, project_body_3d(mirrored, so3.mirror(q), 33), atol=1e-5)
    assert np.abs(a - project_body_3d((centres, sd, amp), so3.mirror(q), 33)).max() > 0.1

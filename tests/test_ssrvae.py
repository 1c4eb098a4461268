"""Class latents: invariant classifier, exact sum over classes, few-label learning, labels files, classify."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from rvae_tools.errors import InputError
from rvae_tools.labels import WindowIndex, read_labels, window_labels
from rvae_tools.rvae import build_model, load_model
from rvae_tools.rvae.semisupervised import ClassRVAE

SMALL = {"encoder_hidden": [32], "encoder_channels": [8, 16], "decoder_hidden": [32, 32], "rotations": 8,
         "batch_size": 32, "kl_warmup_epochs": 1, "patience": 0, "train_fraction": 1.0, "latent_dim": 1}


def shape(cls: int, angle: float, dx: float = 0.0, dy: float = 0.0, size: int = 24, ss: int = 3) -> np.ndarray:
    """Anti-aliased tadpole (0), triangle (1) or L (2), rotated by ``angle`` and moved by (dx, dy) px."""
    c = (np.arange(size * ss) + 0.5) / ss - 0.5 - (size - 1) / 2
    gy, gx = np.meshgrid(c, c, indexing="ij")
    px, py = gx - dx, gy - dy
    u = math.cos(angle) * px + math.sin(angle) * py
    v = -math.sin(angle) * px + math.cos(angle) * py
    if cls == 0:
        m = ((np.abs(u + 1) < 5) & (np.abs(v) < 1.5)) | ((u - 4) ** 2 + v ** 2 < 3.0 ** 2)
    elif cls == 1:
        m = (v > -4) & (v < 4) & (np.abs(u) < (4 - v) * 0.7)
    else:
        m = ((np.abs(u) < 5) & (np.abs(v - 3.5) < 1.5)) | ((np.abs(u + 3.5) < 1.5) & (np.abs(v) < 5))
    return m.reshape(size, ss, size, ss).mean((1, 3)).astype(np.float32)


def shape_set(per_class: int, max_angle: float, max_shift: float, seed: int, classes: int = 3):
    rng = np.random.default_rng(seed)
    x, y = [], []
    for c in range(classes):
        for _ in range(per_class):
            x.append(shape(c, rng.uniform(-max_angle, max_angle), *rng.uniform(-max_shift, max_shift, 2)))
            y.append(c)
    x = 0.1 + 0.8 * np.stack(x) + rng.normal(0, 0.03, (len(x), 24, 24))
    return x.astype(np.float32), np.array(y)


def _model(kind: str = "ssrvae", **extra) -> ClassRVAE:
    return build_model({**_settings(kind, **extra)}, 24)


def _settings(kind: str, **extra):
    from rvae_tools.config import validate_section

    return validate_section("rvae", {**SMALL, "model": kind, "classes": 3, "seed": 0, **extra}, source="test")


# --------------------------------------------------------------------------- invariance


def _logits(model, x):
    with torch.no_grad():
        return model.encoder(torch.from_numpy(x))["class_logits"].numpy()


def _relative_change(model, reference, changed, cls):
    """Mean change of the (centred) class logits, in units of their mean difference between shapes."""
    ref, out = _logits(model, reference), _logits(model, changed)
    ref, out = ref - ref.mean(1, keepdims=True), out - out.mean(1, keepdims=True)
    means = [ref[cls == c].mean(0) for c in np.unique(cls)]
    between = np.mean([np.abs(a - b).mean() for i, a in enumerate(means) for b in means[i + 1:]])
    return float(np.abs(out - ref).mean() / between)


def test_classifier_is_invariant_to_rotation_and_shift_by_construction():
    ours, plain = _model("ssrvae", rotations=16), _model("ssvae")
    ours.net.eval(), plain.net.eval()
    rng = np.random.default_rng(3)
    cls = np.repeat([0, 1, 2], 4)
    upright = np.stack([shape(c, 0.0) for c in cls])
    moved = np.stack([shape(c, rng.uniform(-np.pi, np.pi), *rng.uniform(-1.5, 1.5, 2)) for c in cls])
    turned = np.ascontiguousarray(np.rot90(upright, 1, axes=(1, 2)))
    # A quarter turn is a multiple of the angular sampling: exact up to float rounding.
    assert _relative_change(ours, upright, turned, cls) < 1e-4
    # Any angle and sub-pixel shifts: only interpolation error (measured 0.24) ...
    assert _relative_change(ours, upright, moved, cls) < 0.4
    # ... while an untrained CNN head changes about as much as between shapes (measured 0.68).
    assert _relative_change(plain, upright, moved, cls) > 0.5
    assert _relative_change(plain, upright, turned, cls) > 0.5


# --------------------------------------------------------------------------- objective


def test_unlabelled_term_sums_over_classes_exactly():
    """The unlabelled objective equals sum_y q(y|x) [L(x, y) + log K] + sum_y q log q, with L computed by hand."""
    torch.manual_seed(1)
    model = _model("ssvae", likelihood_sd=0.2, background="none", class_weight=0.0)
    model.net.eval()
    x, _ = shape_set(2, np.pi, 1.0, seed=2)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        enc = model.encoder(xt)
        q = torch.softmax(enc["class_logits"], 1).double()
        total = torch.zeros(len(x), dtype=torch.float64)
        for y in range(3):
            zy = torch.cat([enc["z_mu"], torch.nn.functional.one_hot(torch.full((len(x),), y), 3).float()], 1)
            dec = model.decoder(zy, torch.zeros(len(x), 1), torch.zeros(len(x), 2))[:, 0].double()
            sd = 0.2
            nll = ((xt.double() - dec) ** 2).sum((1, 2)) / (2 * sd ** 2) + x[0].size * (math.log(sd) + 0.5 * math.log(2 * math.pi))
            mu, logsd = enc["z_mu"].double(), enc["z_logsd"].double()
            kl = (0.5 * (mu ** 2 + torch.exp(2 * logsd)) - logsd - 0.5).sum(1)
            total += q[:, y] * (nll + kl + math.log(3))
        brute = total + (q * torch.log(q)).sum(1)
        for i in range(len(x)):
            loss, _ = model.loss(xt[i:i + 1], beta=1.0, sample=False, labels=torch.tensor([-1]))
            assert float(loss) == pytest.approx(float(brute[i]), rel=1e-5)


def test_unlabelled_term_is_the_posterior_average_of_labelled_terms_with_rotations():
    torch.manual_seed(2)
    model = _model("ssrvae", class_weight=0.0)
    model.net.eval()
    x, _ = shape_set(1, np.pi, 1.0, seed=4)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        q = torch.softmax(model.encoder(xt)["class_logits"], 1)
        for i in range(len(x)):
            per = [float(model.loss(xt[i:i + 1], sample=False, labels=torch.tensor([y]))[0]) for y in range(3)]
            unl = float(model.loss(xt[i:i + 1], sample=False, labels=torch.tensor([-1]))[0])
            qi = q[i].double().numpy()
            assert unl == pytest.approx(float((qi * per).sum() + (qi * np.log(qi)).sum()), rel=1e-5)


# --------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    xl, yl = shape_set(10, math.radians(4), 0.0, seed=10)
    xu, yu = shape_set(60, math.pi, 2.0, seed=11)
    x = np.concatenate([xl, xu])
    labels = np.concatenate([yl, -np.ones(len(xu), int)])
    model = _model("ssrvae", rotations=16, epochs=6, lr=3e-3)
    model.class_names = ["tadpole", "triangle", "L"]
    model.fit(x, labels=labels, device="cpu", progress=False)
    return model, xu, yu


def test_few_upright_labels_classify_rotated_unlabelled_windows(trained):
    model, xu, yu = trained
    accuracy = (model.class_probabilities(xu, device="cpu").argmax(1) == yu).mean()
    assert accuracy > 0.85  # chance: 1/3
    xt, yt = shape_set(20, math.pi, 2.0, seed=12)  # unseen windows
    assert (model.class_probabilities(xt, device="cpu").argmax(1) == yt).mean() > 0.85


def test_save_load_round_trip(trained, tmp_path):
    model, xu, _ = trained
    path = tmp_path / "model.pt"
    model.save(path)
    back = load_model(path)
    assert isinstance(back, ClassRVAE) and back.class_names == ["tadpole", "triangle", "L"]
    np.testing.assert_allclose(back.class_probabilities(xu[:20], device="cpu"),
                               model.class_probabilities(xu[:20], device="cpu"), atol=1e-6)
    enc = back.encode(xu[:5], device="cpu")
    assert enc["cls_prob"].shape == (5, 3) and np.allclose(enc["cls_prob"].sum(1), 1, atol=1e-5)
    assert back.templates().shape == (3, 24, 24)


def _white_noise_shift_sd(model, x: np.ndarray, enc: dict, step: float = 0.05) -> np.ndarray:
    """Shift sd (px) of the independent-pixel Laplace form, computed by hand from the model's decode.

    Central differences of the decoded window in (angle, dx, dy) at the encoded pose and most
    probable class, ``s^2 (J^T J)^-1`` with ``s^2`` the residual's mean square: the narrowest
    spread the likelihood allows; correlated residuals can only widen it.
    """
    cls = enc["cls_prob"].argmax(1)
    base = {"angle": enc["angle"], "dx": enc["dx"], "dy": enc["dy"]}

    def decoded(**moved):
        return model.decode(enc["z"], cls=cls, **{**base, **moved}) + enc["background"][:, None, None]

    jac = np.stack([(decoded(**{k: base[k] + h}) - decoded(**{k: base[k] - h})) / (2 * h)
                    for k, h in (("angle", 1e-2), ("dx", step), ("dy", step))], 1).reshape(len(x), 3, -1)
    resid = (x - decoded()).reshape(len(x), -1)
    s2 = (resid ** 2).sum(1) / (resid.shape[1] - 3)
    cov = np.linalg.inv(np.einsum("bip,bjp->bij", jac, jac)) * s2[:, None, None]
    return np.sqrt(cov[:, 1, 1])


def test_class_models_give_pose_spreads_as_the_rvae_does(trained):
    """ssrvae's encode reports angle_sd, dx_sd, dy_sd (NaN before), no narrower than the hand-made Laplace form."""
    model, _, _ = trained
    x, _ = shape_set(6, math.pi, 1.5, seed=13)
    enc = model.encode(x, device="cpu")
    for name in ("angle_sd", "dx_sd", "dy_sd"):
        assert np.isfinite(enc[name]).all() and (enc[name] > 0).all(), name
    white = _white_noise_shift_sd(model, x, enc)
    assert (enc["dx_sd"] >= 0.9 * white).all()
    # Noisier windows are placed less precisely: their spreads widen with the noise.
    noisy = x + np.random.default_rng(14).normal(0, 0.4, x.shape).astype(np.float32)
    wide = model.encode(noisy, device="cpu")
    assert np.median(wide["dx_sd"]) > 2 * np.median(enc["dx_sd"])
    assert np.median(wide["dy_sd"]) > 2 * np.median(enc["dy_sd"])


def test_class_models_need_labels_of_every_class():
    model = _model("ssrvae")
    x, y = shape_set(4, 0.1, 0.0, seed=5)
    labels = np.where(y == 2, -1, y)
    with pytest.raises(InputError, match="class.*2.*no labelled window"):
        model.fit(x, labels=labels, epochs=1, progress=False)
    with pytest.raises(InputError, match="condition: class"):
        _model("ssrvae", condition="class").fit(x, labels=np.where(np.arange(len(y)) == 0, -1, y), epochs=1, progress=False)
    with pytest.raises(InputError, match="classes"):
        build_model(_settings("ssrvae", classes=None), 24)


# --------------------------------------------------------------------------- labels files


def _index():
    particle = np.array([1, 1, 1, 2, 2, 5])
    frame = np.array([0, 1, 2, 0, 2, 1])
    return WindowIndex("m1", particle, frame, attrs={"n_frames": 4, "frame_first": 0, "frame_step": 1, "n_dropped_edge": 3})


def test_labels_by_window_and_by_trajectory(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("movie,particle,frame,class\nm1,1,,rod\nm1,2,2,triangle\nm1,5,1,rod\n")
    labels, names = window_labels(read_labels(path), [_index()], source=str(path))
    assert names == ["rod", "triangle"]
    assert labels.tolist() == [0, 0, 0, -1, 1, 0]
    pq = tmp_path / "labels.parquet"
    pd.DataFrame({"particle": [2], "class": [7]}).to_parquet(pq)
    labels, names = window_labels(read_labels(pq), [_index()], source=str(pq))
    assert names == [7] and labels.tolist() == [-1, -1, -1, 0, 0, -1]


@pytest.mark.parametrize("text, classes, message", [
    ("particle,class\n1,a\n9,b\n", None, r"row 2: unknown particle id\(s\) 9"),
    ("particle,frame,class\n1,0,a\n1,7,b\n", None, r"row 2: frame 7 does not exist"),
    ("particle,frame,class\n1,0,a\n2,1,b\n", None, r"row 2: particle 2 has no window in frame 1.*frame edge"),
    ("particle,class\n1,a\n2,b\n", 3, r"rvae.classes is 3 but the labels give examples of only 2"),
    ("particle,class\n1,a\n2,b\n5,c\n", 2, r"name 3 classes .* rvae.classes is 2"),
    ("particle,frame,class\n1,0,a\n1,,b\n", None, r"row 2: particle 1 frame 0 is labelled 'b' here but 'a' in row 1"),
    ("movie,particle,class\nm2,1,a\n", None, r"row 1: movie 'm2' is not among"),
    ("particle,class\nx,a\n", None, r"row 1: particle 'x' is not a non-negative integer"),
    ("particle,kind\n1,a\n", None, r"lack column\(s\) class"),
    ("particle,class\n1,\n", None, r"row 1: empty class"),
])
def test_bad_labels_name_file_row_and_expectation(tmp_path, text, classes, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as err:
        window_labels(read_labels(path), [_index()], source=str(path), classes=classes)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- commands


def _write_patches(path, windows, particle, frame, x=None, y=None):
    import xarray as xr

    from rvae_tools.io import write_zarr

    n = len(windows)
    x = np.full(n, 50.0) if x is None else np.asarray(x, np.float64)
    y = np.full(n, 40.0) if y is None else np.asarray(y, np.float64)
    ds = xr.Dataset({"window": (("obs", "wy", "wx"), windows)},
                    coords={"particle": ("obs", particle), "frame": ("obs", frame), "x": ("obs", x), "y": ("obs", y)})
    write_zarr(ds, path, encoding={"window": {"chunks": (32, *windows.shape[1:])}})


def test_train_classify_and_encode_write_the_class_contract(tmp_path, capsys):
    import xarray as xr

    from rvae_tools.cli import main

    x, y = shape_set(12, math.pi, 1.0, seed=20)
    particle = np.repeat(np.arange(len(x) // 4), 4)  # trajectories of 4 frames, one shape each (x is by class)
    frame = np.tile(np.arange(4), len(x) // 4)
    patches = tmp_path / "movieA" / "patches.zarr"
    _write_patches(patches, x, particle, frame)
    labels = tmp_path / "labels.csv"
    first = {c: int(particle[np.flatnonzero(y == c)[0]]) for c in range(3)}
    labels.write_text("movie,particle,class\n" + "".join(f"movieA,{p},{'abc'[c]}\n" for c, p in first.items()))
    model = tmp_path / "model.pt"
    settings = json.dumps({**SMALL, "model": "ssrvae", "epochs": 1})
    assert main(["train", str(patches), "-o", str(model), "--labels", str(labels), "--settings", settings,
                 "--device", "cpu", "--no-progress"]) == 0
    out = tmp_path / "classes.parquet"
    assert main(["classify", str(patches), str(model), "-o", str(out), "--device", "cpu", "--no-progress",
                 "--labels", str(labels), "--figures", str(tmp_path / "figures")]) == 0
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == {"class_templates.png", "class_fractions.png",
                                                                      "class_confusion.png", "class_manifold.png"}
    table = pd.read_parquet(out)
    assert {"particle", "frame", "cls", "cls_index", "cls_prob", "prob_a", "prob_b", "prob_c"} <= set(table.columns)
    # The pose and its spreads, as encode writes them (here the model's own, uncalibrated).
    spreads = ["angle", "angle_sd", "flip_prob", "dx", "dy", "dx_sd", "dy_sd"]
    assert set(spreads) <= set(table.columns)
    assert np.isfinite(table[spreads].to_numpy()).all() and (table[["angle_sd", "dx_sd", "dy_sd"]] > 0).all().all()
    assert len(table) == len(x) and set(table["cls"]) <= {"a", "b", "c"}
    np.testing.assert_allclose(table[["prob_a", "prob_b", "prob_c"]].sum(axis=1), 1, atol=1e-5)
    latents = tmp_path / "latents.zarr"
    assert main(["encode", str(patches), str(model), "-o", str(latents), "--device", "cpu", "--no-progress"]) == 0
    ds = xr.open_zarr(latents).load()
    assert ds["cls_prob"].dims == ("particle", "frame", "class") and list(ds["class"].values) == ["a", "b", "c"]
    assert ds["cls"].dims == ("particle",) and ds["cls_confidence"].dims == ("particle",)
    row = table[table["particle"] == 0].sort_values("frame")
    np.testing.assert_allclose(ds["cls_prob"].sel(particle=0).values, row[["prob_a", "prob_b", "prob_c"]].values, atol=1e-5)
    votes = row["cls"].value_counts()
    assert ds["cls"].sel(particle=0).item() in set(votes[votes == votes.max()].index)
    # The class manifold spans each class's windows' z when the latents are given; latents of
    # other windows are refused.
    assert main(["classify", str(patches), str(model), "-o", str(tmp_path / "c2.parquet"), "--device", "cpu",
                 "--no-progress", "--latents", str(latents), "--figures", str(tmp_path / "fig2")]) == 0
    assert (tmp_path / "fig2" / "class_manifold.png").stat().st_size > 0
    # With the latents, the table's pose and spreads are encode's (calibrated) values, window by window.
    with_latents = pd.read_parquet(tmp_path / "c2.parquet")
    for name in spreads:
        want = ds[name].values[np.searchsorted(ds["particle"].values, with_latents["particle"]),
                               np.searchsorted(ds["frame"].values, with_latents["frame"])]
        assert np.isfinite(want).all(), name
        np.testing.assert_allclose(with_latents[name], want, rtol=1e-6, err_msg=name)
    other = tmp_path / "other" / "patches.zarr"
    _write_patches(other, x, particle + 100, frame)
    assert main(["classify", str(other), str(model), "-o", str(tmp_path / "c3.parquet"), "--device", "cpu",
                 "--no-progress", "--latents", str(latents), "--figures", str(tmp_path / "fig3")]) == 2
    assert "does not hold the windows of" in capsys.readouterr().err
    # A model without classes cannot classify; a labels file with an unknown particle is refused.
    bad = tmp_path / "bad.csv"
    bad.write_text("particle,class\n999,a\n")
    assert main(["train", str(patches), "-o", str(tmp_path / "m2.pt"), "--labels", str(bad), "--settings", settings]) == 2
    assert "unknown particle id(s) 999" in capsys.readouterr().err

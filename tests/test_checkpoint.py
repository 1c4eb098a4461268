"""Checkpoints: the model never silently disagrees with its config, and foreign files are clear errors.

The windows here are Gaussian blobs drawn with numpy (not the test_rvae shapes), so the
checks share no assumption with the model's own test data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rvae_tools.errors import InputError
from rvae_tools.rvae import RVAE, load_model
from rvae_tools.rvae.data import WindowSource, sample_windows

TINY = {"encoder_hidden": [16], "encoder_channels": [4, 8], "decoder_hidden": [16, 16], "rotations": 4,
        "latent_dim": 1, "batch_size": 16, "kl_warmup_epochs": 1, "patience": 0, "lr_schedule": "plateau"}


def blobs(n: int, seed: int = 0, size: int = 12) -> np.ndarray:
    """Elongated Gaussian blobs at random angles and offsets (float32, n x size x size)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    out = np.empty((n, size, size), np.float32)
    for i in range(n):
        a, dx, dy = rng.uniform(0, np.pi), *rng.uniform(-1, 1, 2)
        u = (xx - dx) * np.cos(a) + (yy - dy) * np.sin(a)
        v = -(xx - dx) * np.sin(a) + (yy - dy) * np.cos(a)
        out[i] = np.exp(-(u / 3.0) ** 2 - (v / 1.2) ** 2) + rng.normal(0, 0.05, (size, size))
    return out


def model(**extra) -> RVAE:
    return RVAE(12, **{**TINY, "seed": 1, "epochs": 2, **extra})


def same(a: RVAE, b: RVAE) -> bool:
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def fit(m: RVAE, x, folder=None) -> RVAE:
    m.fit(x, checkpoint_dir=folder, device="cpu", progress=False)
    return m


@pytest.fixture(scope="module")
def x():
    return blobs(40, seed=5)


def test_raising_or_lowering_epochs_equals_a_fresh_run(tmp_path, x, caplog):
    caplog.set_level("INFO", logger="rvae_tools.rvae.trainer")
    fresh2, fresh3 = fit(model(epochs=2), x), fit(model(epochs=3), x)
    fit(model(epochs=2), x, tmp_path)
    caplog.clear()
    raised = fit(model(epochs=3), x, tmp_path)  # plateau schedule: epoch 3 does not depend on the total
    assert "resuming from" in caplog.text and "epoch 3/3" in caplog.text and "epoch 1/3" not in caplog.text
    assert same(raised, fresh3)
    caplog.clear()
    lowered = fit(model(epochs=2), x, tmp_path)  # continues from the kept epoch-2 checkpoint
    assert "resuming from" in caplog.text and "epoch 1/2" not in caplog.text and same(lowered, fresh2)
    # A cosine schedule's period is the number of epochs: a raise trains afresh.
    fit(model(epochs=2, lr_schedule="cosine"), x, tmp_path)
    caplog.clear()
    cosine3 = fit(model(epochs=3, lr_schedule="cosine"), x, tmp_path)
    assert "changed: settings.epochs" in caplog.text and "resuming" not in caplog.text
    assert same(cosine3, fit(model(epochs=3, lr_schedule="cosine"), x))


@pytest.mark.parametrize("change", [{"seed": 2}, {"lr": 0.01}, {"kl_weight": 0.5}, {"max_windows": 30}])
def test_a_changed_setting_trains_afresh_and_says_so(tmp_path, x, caplog, change):
    fit(model(), x, tmp_path)
    caplog.set_level("INFO", logger="rvae_tools.rvae.trainer")
    changed = fit(model(**change), x, tmp_path)
    key = next(iter(change))
    assert f"settings.{key}" in caplog.text and "resuming" not in caplog.text
    assert same(changed, fit(model(**change), x))
    assert len(list(tmp_path.iterdir())) == 1  # the stale folder is gone


def test_changed_window_values_train_afresh(tmp_path, x, caplog):
    fit(model(), x, tmp_path)
    caplog.set_level("INFO", logger="rvae_tools.rvae.trainer")
    y = x.copy()
    y[0, 0, 0] += 0.5  # same count and size, one value differs (e.g. another interpolation)
    fit(model(), y, tmp_path)
    assert "windows.checksum" in caplog.text and "resuming" not in caplog.text


def test_a_broken_epoch_checkpoint_is_skipped(tmp_path, x, caplog):
    reference = fit(model(epochs=1), x)
    fit(model(epochs=1), x, tmp_path)
    (ckpt,) = tmp_path.glob("*/epoch-0001.pt")
    torch.save(torch.zeros(3), ckpt)  # right name, foreign content
    caplog.set_level("INFO", logger="rvae_tools.rvae.trainer")
    again = fit(model(epochs=1), x, tmp_path)
    assert "skipping unreadable checkpoint" in caplog.text and same(again, reference)


# --------------------------------------------------------------------------- foreign files


@pytest.fixture(scope="module")
def good_payload(x):
    return fit(model(epochs=1), x).state()


def _crafted(good):
    sd = dict(good["state_dict"])
    return {
        "bare tensor": (torch.zeros(4), "holds a Tensor"),
        "another tool's state dict": ({"conv.weight": torch.zeros(2, 2)}, "not an rvae-tools checkpoint"),
        "marker but no weights": ({k: v for k, v in good.items() if k != "state_dict"}, "lacks 'state_dict'"),
        "marker but no config": ({k: v for k, v in good.items() if k != "config"}, "lacks 'config'"),
        "config of the wrong type": ({**good, "config": [1, 2]}, "'config' is a list"),
        "weights of the wrong type": ({**good, "state_dict": {"encoder.x": 3}}, "not a named tensor"),
        "missing window size": ({**good, "config": {"latent_dim": 1}}, "window_size"),
        "wrong weight shapes": ({**good, "state_dict": {k: v[..., :1] if v.ndim else v for k, v in sd.items()}},
                                "weights do not fit"),
        "unknown setting": ({**good, "config": {**good["config"], "colour": "red"}}, "configuration is not valid"),
        "future format": ({**good, "format_version": 99}, "newer than this"),
        "kind as a number": ({**good, "kind": 7}, "'kind' is a int"),
    }


@pytest.mark.parametrize("case", list(_crafted({"state_dict": {}, "config": {}}).keys()))
def test_crafted_checkpoints_are_one_line_errors(tmp_path, good_payload, case):
    payload, expected = _crafted(good_payload)[case]
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    with pytest.raises(InputError) as err:
        load_model(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and expected in message, message


def test_non_checkpoint_files_are_one_line_errors(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a torch file\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (text, empty):
        with pytest.raises(InputError, match="cannot be read as a model checkpoint") as err:
            load_model(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- training budget


def _store(path, windows, frames):
    import xarray as xr

    from rvae_tools.io import write_zarr

    n = len(windows)
    ds = xr.Dataset({"window": (("obs", "wy", "wx"), windows)},
                    coords={"particle": ("obs", np.arange(n) % 7), "frame": ("obs", frames),
                            "x": ("obs", np.zeros(n)), "y": ("obs", np.zeros(n))})
    write_zarr(ds, path, encoding={"window": {"chunks": (16, *windows.shape[1:])}})


def test_training_budget_spreads_over_movies_and_frames(tmp_path):
    # Movie a: 10 frames x 6 windows; movie b: 5 frames x 12 windows (same total).
    _store(tmp_path / "a.zarr", blobs(60, seed=1), np.repeat(np.arange(10), 6))
    _store(tmp_path / "b.zarr", blobs(60, seed=2), np.repeat(np.arange(100, 105), 12))
    source = WindowSource([tmp_path / "a.zarr", tmp_path / "b.zarr"])
    pick = sample_windows(source, 30, seed=0)
    assert len(pick) == 30 and len(np.unique(pick)) == 30
    in_a = pick[pick < 60]
    assert len(in_a) == 15
    assert set(np.bincount(in_a // 6, minlength=10)) <= {1, 2}  # every frame of a, evenly
    assert np.all(np.bincount((pick[pick >= 60] - 60) // 12, minlength=5) == 3)  # every frame of b
    assert np.array_equal(pick, sample_windows(source, 30, seed=0))
    assert not np.array_equal(pick, sample_windows(source, 30, seed=1))
    assert np.array_equal(sample_windows(source, 500, seed=0), np.arange(120))
    # The trainer trains and validates on the sample only; encoding covers every window.
    m = RVAE(12, seed=1, **{**TINY, "epochs": 1, "max_windows": 30})
    m.fit(source, checkpoint_dir=tmp_path / "ckpt", device="cpu", progress=False)
    (ckpt,) = (tmp_path / "ckpt").glob("*/epoch-0001.pt")
    saved = torch.load(ckpt, weights_only=True)
    used = np.sort(np.concatenate([saved["train_index"].numpy(), saved["val_index"].numpy()]))
    assert np.array_equal(used, sample_windows(source, 30, seed=1))  # the model's seed
    assert m.normalisation["n_training_windows"] == 30 and m.normalisation["n_windows"] == 120
    assert len(m.encode(source, device="cpu")["z"]) == 120


# --------------------------------------------------------------------------- the trainer's contract


class LinearAutoencoder:
    """Not an rVAE: the smallest object with the methods the trainer documents."""

    def __init__(self, size: int = 12, seed: int = 0):
        from rvae_tools.rvae.checkpoint import FORMAT

        torch.manual_seed(seed)
        self.window_size = (size, size)
        self.settings = {"epochs": 3, "batch_size": 8, "seed": seed, "lr": 1e-2, "lr_schedule": "none", "patience": 0,
                         "kl_weight": 1.0, "kl_warmup_epochs": 0, "train_fraction": 0.75, "amp": False,
                         "restore_best": False, "memory_mb": 64, "max_windows": None}
        self.config = {**self.settings, "window_size": [size, size], "kind": "linear"}
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size * size, 2), torch.nn.Linear(2, size * size))
        self.normalisation = {}
        self._format = FORMAT

    def to(self, device):
        self.net.to(device)
        return self

    def loss(self, x, beta=1.0, sample=True):
        rec = ((self.net(x) - x.flatten(1)) ** 2).sum(1)
        return rec.mean(), {"rec": rec}

    def state(self):
        return {"format": self._format, "format_version": 1, "kind": "linear", "config": self.config,
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}


def test_the_trainer_trains_and_resumes_any_model_with_the_documented_methods(tmp_path, x):
    from rvae_tools.rvae.trainer import fit as train

    class Stop(Exception):
        pass

    def stop(epoch, row):
        if epoch == 2:
            raise Stop

    whole = LinearAutoencoder()
    hist = train(whole, x, device="cpu", progress=False)
    assert len(hist) == 3 and hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    first = LinearAutoencoder()
    with pytest.raises(Stop):
        train(first, x, checkpoint_dir=tmp_path, device="cpu", progress=False, callback=stop)
    resumed = LinearAutoencoder()
    train(resumed, x, checkpoint_dir=tmp_path, device="cpu", progress=False)
    a, b = whole.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

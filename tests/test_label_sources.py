"""Labels from a folder of window images (one subfolder per class) and per-movie labels files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_ssrvae import SMALL, shape_set

from rvae_tools.cli import main
from rvae_tools.errors import InputError
from rvae_tools.labels import read_label_images
from rvae_tools.rvae import load_model

NORMALISED = {"normalize": "percentile", "percentiles": [1.0, 99.5], "clip": True}


def write_store(path, windows, particle, frame, attrs=None):
    import xarray as xr

    from rvae_tools.io import write_zarr

    n = len(windows)
    ds = xr.Dataset({"window": (("obs", "wy", "wx"), windows)},
                    coords={"particle": ("obs", particle), "frame": ("obs", frame),
                            "x": ("obs", np.full(n, 50.0)), "y": ("obs", np.full(n, 40.0))}, attrs=attrs or {})
    write_zarr(ds, path, encoding={"window": {"chunks": (32, *windows.shape[1:])}})


def normalised(x):
    """As the windows stage maps a movie: its 1st and 99.5th percentiles to 0 and 1, clipped."""
    lo, hi = np.percentile(x, [1.0, 99.5])
    return np.clip((x - lo) / (hi - lo), 0, 1).astype(np.float32)


def write_folder(root, images, classes, names=("tadpole", "triangle", "L")):
    """8-bit PNGs root/<class name>/<i>.png of images in [0, 1]."""
    for i, (img, c) in enumerate(zip(images, classes)):
        sub = root / names[c]
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(sub / f"{i}.png")


def test_folder_images_are_read_by_class_and_normalised_as_the_windows(tmp_path):
    x, y = shape_set(2, 0.0, 0.0, seed=1)
    write_folder(tmp_path / "lab", x, y)
    images, classes, paths = read_label_images(tmp_path / "lab", (24, 24), NORMALISED)
    assert images.shape == (6, 24, 24) and sorted(set(classes)) == ["L", "tadpole", "triangle"]
    assert all(p.endswith(".png") and f"/{c}/" in p for p, c in zip(paths, classes))
    # The folder's own 1st and 99.5th percentiles become 0 and 1, as the windows stage does.
    np.testing.assert_allclose(np.percentile(images, [1.0, 99.5]), [0, 1], atol=0.02)
    raw, _, _ = read_label_images(tmp_path / "lab", (24, 24), {"normalize": "none"})
    assert raw.max() > 200  # kept as read: 8-bit values


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "labels folder not found"),
    (lambda root: root.mkdir(), "no class subfolders"),
    (lambda root: (root / "a").mkdir(parents=True), "class 'a' has no labelled example"),
    (lambda root: ((root / "a").mkdir(parents=True),
                   Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "a" / "0.png")),
     r"image is 20x24 pixels; expected the windows' 24x24"),
    (lambda root: ((root / "a").mkdir(parents=True), (root / "a" / "0.png").write_text("not an image")),
     "cannot be read as an image"),
])
def test_bad_folders_name_the_path_and_the_expectation(tmp_path, make, message):
    make(tmp_path / "lab")
    with pytest.raises(InputError, match=message):
        read_label_images(tmp_path / "lab", (24, 24))


def test_labelled_images_teach_the_classifier_of_a_movie(tmp_path, capsys):
    torch.manual_seed(0)
    xl, yl = shape_set(10, math.radians(4), 0.0, seed=10)   # upright examples, as images
    xu, yu = shape_set(60, math.pi, 2.0, seed=11)           # the movie's windows, any angle
    store = tmp_path / "movieA" / "patches.zarr"
    write_store(store, normalised(xu), np.arange(len(xu)), np.zeros(len(xu), int), NORMALISED)
    write_folder(tmp_path / "examples", xl, yl)
    model = tmp_path / "model.pt"
    settings = json.dumps({**SMALL, "model": "ssrvae", "rotations": 16, "epochs": 6, "lr": 3e-3, "seed": 0})
    assert main(["train", str(store), "-o", str(model), "--movie-labels", "movieA", str(tmp_path / "examples"),
                 "--settings", settings, "--device", "cpu", "--no-progress"]) == 0
    m = load_model(model)
    assert m.class_names == ["L", "tadpole", "triangle"]
    found = np.array(m.class_names)[m.class_probabilities(normalised(xu), device="cpu").argmax(1)]
    truth = np.array(["tadpole", "triangle", "L"])[yu]
    assert (found == truth).mean() > 0.85  # chance: 1/3; no window of the movie was labelled

    # A labels file of one movie: its rows are that movie's; another movie named in it is refused.
    bad = tmp_path / "other.csv"
    bad.write_text("movie,particle,class\nmovieB,0,tadpole\n")
    assert main(["train", str(store), "-o", str(tmp_path / "m2.pt"), "--movie-labels", "movieA", str(bad),
                 "--settings", settings]) == 2
    assert "row 1: movie 'movieB', but this file holds the labels of movie 'movieA'" in capsys.readouterr().err
    # Two sources that label one window differently.
    one = tmp_path / "one.csv"
    one.write_text("particle,class\n0,tadpole\n1,triangle\n2,L\n")
    two = tmp_path / "two.csv"
    two.write_text("particle,class\n0,L\n")
    assert main(["train", str(store), "-o", str(tmp_path / "m3.pt"), "--labels", str(one), "--movie-labels",
                 "movieA", str(two), "--settings", settings]) == 2
    assert "one.csv labels it 'tadpole'; expected one class per window" in capsys.readouterr().err
    # A class count the labels contradict.
    three = json.dumps({**json.loads(settings), "classes": 4})
    assert main(["train", str(store), "-o", str(tmp_path / "m4.pt"), "--movie-labels", "movieA",
                 str(tmp_path / "examples"), "--settings", three]) == 2
    assert "the labels name 3 classes (L, tadpole, triangle) but rvae.classes is 4" in capsys.readouterr().err

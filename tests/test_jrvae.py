"""jrvae: classes found without labels (invariant descriptors, initial classes, no collapse)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from test_ssrvae import SMALL, shape, shape_set

from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.rvae import build_model
from rvae_tools.rvae.semisupervised import initial_classes, polar_descriptors


def best_accuracy(found: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of found classes to true ones."""
    k = int(max(found.max(), truth.max())) + 1
    counts = np.zeros((k, k))
    np.add.at(counts, (found, truth), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(truth))


def _jrvae(**extra):
    return build_model(validate_section("rvae", {**SMALL, "model": "jrvae", "classes": 3, "seed": 0, **extra},
                                        source="test"), 24)


def test_descriptors_do_not_change_when_the_window_turns():
    upright = np.stack([shape(c, 0.3) for c in range(3)]) + 0.1
    turned = np.ascontiguousarray(np.rot90(upright, 1, axes=(1, 2)))
    a, b = polar_descriptors(upright), polar_descriptors(turned)
    # A quarter turn is 8 of the 32 angular samples: exact up to rounding ...
    np.testing.assert_allclose(a, b, atol=1e-5)
    # ... while the shapes themselves differ by far more.
    assert np.abs(a[0] - a[1]).max() > 0.05 and np.abs(a[1] - a[2]).max() > 0.05


def test_initial_classes_separate_rotated_shapes():
    x, y = shape_set(40, math.pi, 1.0, seed=30)
    prob = initial_classes(polar_descriptors(x), 3, seed=0)
    assert prob.shape == (len(x), 3) and np.allclose(prob.sum(1), 1, atol=1e-5)
    assert best_accuracy(prob.argmax(1), y) > 0.8
    with pytest.raises(InputError, match="cannot be split into 3 classes"):
        initial_classes(polar_descriptors(x[:4]), 3, seed=0)


def test_jrvae_finds_every_class_without_labels():
    torch.manual_seed(0)
    x, y = shape_set(40, math.pi, 1.5, seed=31)
    model = _jrvae(rotations=16, epochs=6, lr=3e-3)
    model.fit(x, device="cpu", progress=False)
    assert model.train_progress == pytest.approx(6.0)  # the trainer tells the model how far it is
    found = model.class_probabilities(x, device="cpu").argmax(1)
    assert len(np.unique(found)) == 3  # no collapse into one class
    assert best_accuracy(found, y) > 0.85  # chance: 1/3
    xt, yt = shape_set(15, math.pi, 1.5, seed=32)  # unseen windows
    assert best_accuracy(model.class_probabilities(xt, device="cpu").argmax(1), yt) > 0.85


def test_jrvae_refuses_labels_and_needs_a_class_count():
    x, y = shape_set(4, 0.1, 0.0, seed=5)
    with pytest.raises(InputError, match="jrvae finds its 3 classes without labels"):
        _jrvae().fit(x, labels=y, epochs=1, progress=False)
    with pytest.raises(InputError, match="needs a number of classes"):
        _jrvae(classes=None)


def test_train_and_classify_a_jrvae_from_the_command_line(tmp_path, capsys):
    import json

    import pandas as pd
    from test_ssrvae import _write_patches

    from rvae_tools.cli import main

    x, _ = shape_set(8, math.pi, 1.0, seed=33)
    patches = tmp_path / "movieA" / "patches.zarr"
    _write_patches(patches, x, np.repeat(np.arange(len(x) // 4), 4), np.tile(np.arange(4), len(x) // 4))
    model = tmp_path / "model.pt"
    settings = json.dumps({**SMALL, "model": "jrvae", "classes": 3, "epochs": 1})
    assert main(["train", str(patches), "-o", str(model), "--settings", settings, "--device", "cpu",
                 "--no-progress"]) == 0
    out = tmp_path / "classes.parquet"
    assert main(["classify", str(patches), str(model), "-o", str(out), "--device", "cpu", "--no-progress"]) == 0
    table = pd.read_parquet(out)
    assert len(table) == len(x) and {"prob_0", "prob_1", "prob_2"} <= set(table.columns)
    labels = tmp_path / "labels.csv"
    labels.write_text("particle,class\n0,a\n")
    assert main(["train", str(patches), "-o", str(tmp_path / "m2.pt"), "--labels", str(labels),
                 "--settings", settings]) == 2
    assert "finds its classes without labels" in capsys.readouterr().err


def test_matched_accuracy_pairs_classes_with_species_one_to_one():
    from rvae_tools.classify import matched_accuracy

    assert matched_accuracy(np.array([[0, 5], [3, 0]])) == 1.0   # the classes swapped: still all right
    assert matched_accuracy(np.array([[2, 2], [2, 2]])) == 0.5
    # Three classes for two species: the extra class's windows count as wrong.
    assert matched_accuracy(np.array([[4, 0, 1], [0, 5, 0]])) == pytest.approx(0.9)


def test_classify_against_simulated_truth_draws_the_confusion_matrix(tmp_path, caplog):
    import json
    import logging

    import pandas as pd
    from test_ssrvae import _write_patches

    from rvae_tools.classify import true_species
    from rvae_tools.cli import main
    from rvae_tools.io import write_table

    x, y = shape_set(8, math.pi, 1.0, seed=34)            # 24 windows, 8 per shape, by shape
    particle = np.arange(len(x)) // 4                     # 6 particles of 4 frames, one shape each
    frame = np.tile(np.arange(4), len(x) // 4)
    cx, cy = 20.0 + 30.0 * particle, np.full(len(x), 30.0)
    patches = tmp_path / "sim" / "patches.zarr"
    _write_patches(patches, x, particle, frame, cx, cy)
    # The true centres lie within a pixel of the windows'; a second particle 5 px away is not
    # taken; particle 5 has no true counterpart in frame 3 (nearest true particle 5 px away).
    rows = [{"frame": f, "particle": p, "x": 20.0 + 30.0 * p + 0.6, "y": 30.0 - 0.5, "cls": int(y[4 * p])}
            for p in range(6) for f in range(4) if (p, f) != (5, 3)]
    rows += [{"frame": f, "particle": 100, "x": 20.0 + 30.0 * 5, "y": 35.0, "cls": 0} for f in range(4)]
    truth = tmp_path / "sim" / "truth.parquet"
    write_table(pd.DataFrame(rows), truth, metadata={"species": [{"name": n, "cls": k} for k, n in
                                                               enumerate(("tadpole", "triangle", "L"))]})
    species, names = true_species(truth, frame, cx, cy)
    want = y.copy()
    want[(particle == 5) & (frame == 3)] = -1
    assert species.tolist() == want.tolist() and names == ["tadpole", "triangle", "L"]

    model = tmp_path / "model.pt"
    settings = json.dumps({**SMALL, "model": "jrvae", "classes": 3, "epochs": 1})
    assert main(["train", str(patches), "-o", str(model), "--settings", settings, "--device", "cpu",
                 "--no-progress"]) == 0
    figures = tmp_path / "figures"
    with caplog.at_level(logging.INFO, logger="rvae_tools.classify"):
        assert main(["classify", str(patches), str(model), "-o", str(tmp_path / "classes.parquet"), "--device", "cpu",
                     "--no-progress", "--truth", str(truth), "--figures", str(figures)]) == 0
    assert (figures / "class_confusion.png").stat().st_size > 0
    assert "against the simulated species on 23 windows" in caplog.text
    # A truth table without the species column is refused with the file and what it lacks.
    bad = tmp_path / "bad.parquet"
    pd.DataFrame(rows).drop(columns="cls").to_parquet(bad)
    assert main(["classify", str(patches), str(model), "-o", str(tmp_path / "c2.parquet"), "--device", "cpu",
                 "--no-progress", "--truth", str(bad)]) == 2

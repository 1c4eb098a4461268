"""Tests of the segmentation stage: metrics, post-processing, U-Net training, locate, bad input, CLI."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rvae_tools.cli import main
from rvae_tools.config import validate_section
from rvae_tools.errors import InputError
from rvae_tools.segment import SegmentationWarning, segment_movie, train_segmenter
from rvae_tools.segment.metrics import detection_scores, match_points
from rvae_tools.segment.postprocess import DETECTION_COLUMNS, blobs_to_detections
from rvae_tools.segment.synthetic import render_frames
from rvae_tools.segment.unet import UNet, load_checkpoint, save_checkpoint

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BULK_WATER = DATA / "bulk_water"

#: Tiny frames and a tiny network: trains in a few seconds on one CPU core.
TINY_SYNTHETIC = {"shape": [64, 64], "length": 12.0, "width": 5.0, "asymmetric_fraction": 0.0,
                  "density": 12.0, "noise": 0.1, "scan_lines": 0.0, "min_gap": 1.0}
TINY = {
    "seed": 3, "classes": 1, "model": {"depth": 2, "width": 6},
    "train": {"source": "synthetic", "frames": 6, "steps": 120, "batch_size": 6, "crop": 32, "lr": 0.01},
    "synthetic": TINY_SYNTHETIC,
}


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model():
    torch.set_num_threads(1)
    settings = validate_section("segment", TINY)
    model, config, history = train_segmenter(settings, device=torch.device("cpu"), progress=False)
    return settings, model, config, history


def _held_out(noise=0.1, seed=99):
    syn = validate_section("segment", {"synthetic": dict(TINY_SYNTHETIC, density=10.0, noise=noise)})["synthetic"]
    return render_frames(syn, 4, seed)


# --------------------------------------------------------------------------- metrics


def test_matching_is_one_to_one_and_respects_the_radius():
    truth = np.array([[10.0, 10.0], [20.0, 10.0]])
    # One prediction sits between both true points; the other is near the second only.
    pred = np.array([[15.0, 10.0], [20.5, 10.0], [50.0, 50.0]])
    ti, pi = match_points(truth, pred, radius=6.0)
    pairs = sorted(zip(ti.tolist(), pi.tolist()))
    assert pairs == [(0, 0), (1, 1)]
    ti, pi = match_points(truth, pred, radius=1.0)
    assert list(zip(ti, pi)) == [(1, 1)]


def test_scores_on_a_hand_made_case():
    truth = pd.DataFrame({"frame": [0, 0, 0, 1], "x": [10.0, 30.0, 50.0, 10.0], "y": [10.0, 10.0, 10.0, 10.0]})
    det = pd.DataFrame({"frame": [0, 0, 0, 1], "x": [10.3, 30.0, 80.0, 10.0], "y": [10.4, 9.0, 10.0, 10.0]})
    s = detection_scores(truth, det, radius=2.0)
    assert (s["tp"], s["fp"], s["fn"]) == (3, 1, 1)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.75)
    assert s["f1"] == pytest.approx(0.75)
    # Errors 0.5, 1.0 and 0 px.
    assert s["rmse"] == pytest.approx(np.sqrt((0.25 + 1.0 + 0.0) / 3))
    empty = detection_scores(truth, det.iloc[:0], radius=2.0)
    assert (empty["tp"], empty["fn"], empty["f1"]) == (0, 4, 0.0)


def test_border_margin_ignores_cut_particles():
    truth = pd.DataFrame({"frame": [0, 0], "x": [1.0, 30.0], "y": [30.0, 30.0]})
    det = pd.DataFrame({"frame": [0, 0], "x": [2.0, 30.0], "y": [33.0, 30.0]})
    s = detection_scores(truth, det, 2.0)
    assert (s["tp"], s["fp"], s["fn"], s["f1"]) == (1, 1, 1, 0.5)
    s = detection_scores(truth, det, 2.0, shape=(64, 64), margin=5)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0)


# --------------------------------------------------------------------------- post-processing


def test_centroids_of_synthetic_probability_blobs_are_exact():
    yy, xx = np.mgrid[0:96, 0:96]
    centres = np.array([[20.3, 20.8], [70.55, 25.1], [30.9, 70.35], [75.2, 72.6]])
    prob = np.zeros((96, 96))
    for cx, cy in centres:
        prob += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.6**2))
    det = blobs_to_detections(prob, threshold=0.5).sort_values("y").reset_index(drop=True)
    assert list(det.columns) == DETECTION_COLUMNS
    assert len(det) == len(centres)
    got = det[["x", "y"]].to_numpy()
    ti, pi = match_points(centres, got, radius=1.0)
    assert len(ti) == len(centres)
    assert np.abs(got[pi] - centres[ti]).max() < 0.03
    # An elongated blob reports its orientation (from +x towards +y) and a high eccentricity.
    angle = 0.6
    u = np.cos(angle) * (xx - 40.2) + np.sin(angle) * (yy - 50.7)
    v = -np.sin(angle) * (xx - 40.2) + np.cos(angle) * (yy - 50.7)
    rod = blobs_to_detections(np.exp(-u**2 / 18 - v**2 / 2))
    assert len(rod) == 1
    assert rod.x[0] == pytest.approx(40.2, abs=0.03) and rod.y[0] == pytest.approx(50.7, abs=0.03)
    assert rod.orientation[0] == pytest.approx(angle, abs=0.02)
    assert rod.eccentricity[0] > 0.9


def test_touching_particles_are_split_and_filters_apply():
    yy, xx = np.mgrid[0:64, 0:64]
    disc = lambda cx, cy, r: ((xx - cx) ** 2 + (yy - cy) ** 2 <= r**2).astype(float)
    # Two discs that touch (a dumbbell) among single discs of the same size.
    prob = np.clip(disc(20, 20, 4) + disc(27, 20, 4) + disc(45, 45, 4) + disc(15, 50, 4) + disc(45, 12, 4), 0, 1)
    det = blobs_to_detections(prob, threshold=0.5, split=True)
    assert len(det) == 5
    merged = blobs_to_detections(prob, threshold=0.5, split=False)
    assert len(merged) == 4
    # Size filter and edge exclusion.
    assert len(blobs_to_detections(prob, min_area=70, split=False)) == 1
    assert len(blobs_to_detections(prob, max_area=60, split=False)) == 3
    assert len(blobs_to_detections(prob, edge=16, split=True)) == 3


# --------------------------------------------------------------------------- U-Net


def test_tiny_unet_learns_to_find_particles(tiny_model):
    settings, model, config, history = tiny_model
    images, _, truth = _held_out()
    trained, _ = segment_movie(images, settings, model=model, model_config=config, device=torch.device("cpu"))
    f1 = detection_scores(truth, trained, radius=2.5)["f1"]
    torch.manual_seed(0)
    untrained_model = UNet(classes=1, depth=2, width=6).eval()
    untrained, _ = segment_movie(images, settings, model=untrained_model, model_config=config, device=torch.device("cpu"))
    f1_untrained = detection_scores(truth, untrained, radius=2.5)["f1"]
    assert f1_untrained < 0.3
    assert f1 >= 0.8, f"tiny U-Net F1 {f1:.3f} (untrained {f1_untrained:.3f})"
    assert history[-1]["loss"] < history[0]["loss"]
    # Dark particles on a bright background: `invert` describes the movie, the network
    # trained on bright particles still finds them.
    dark, _ = segment_movie(5.0 - images, dict(settings, invert=True), model=model, model_config=config)
    assert detection_scores(truth, dark, radius=2.5)["f1"] >= 0.8


def test_annotation_masks_and_their_errors(tmp_path):
    from rvae_tools.segment import annotation_training_data, disc_masks

    centres = pd.DataFrame({"frame": [0, 0, 1], "x": [5.0, 20.2, 10.0], "y": [5.0, 10.7, 3.0], "cls": [0, 1, 0]})
    masks = disc_masks(centres, 2, (16, 32), radius=2.0)
    assert masks.shape == (2, 16, 32)
    assert masks[0, 5, 5] == 1 and masks[0, 11, 20] == 2 and masks[1, 3, 10] == 1
    assert (masks[0] == 1).sum() == 13  # the pixels within 2 px of an integer centre
    images = np.zeros((2, 16, 32), np.float32)
    np.savez(tmp_path / "ok.npz", image=images, mask=masks)
    _, got_masks = annotation_training_data({"annotations": str(tmp_path / "ok.npz")})
    assert np.array_equal(got_masks, masks)
    np.savez(tmp_path / "nomask.npz", image=images)
    with pytest.raises(InputError, match="no 'mask'.*centres"):
        annotation_training_data({"annotations": str(tmp_path / "nomask.npz"), "centres": None})
    centres.to_csv(tmp_path / "c.csv", index=False)
    _, from_centres = annotation_training_data({"annotations": str(tmp_path / "nomask.npz"),
                                                "centres": str(tmp_path / "c.csv"), "disc_radius": 2.0})
    assert np.array_equal(from_centres, masks)
    np.savez(tmp_path / "badmask.npz", image=images, mask=masks[:1, :8])
    with pytest.raises(InputError, match="badmask.npz: 'mask' has shape"):
        annotation_training_data({"annotations": str(tmp_path / "badmask.npz")})
    with pytest.raises(InputError, match="annotation file not found"):
        annotation_training_data({"annotations": str(tmp_path / "missing.npz")})


def test_probability_map_and_tiling_agree(tiny_model):
    settings, model, config, _ = tiny_model
    images, _, _ = _held_out()
    whole, p_whole = segment_movie(images, settings, model=model, model_config=config, keep_probability=True)
    tiled_settings = dict(settings, inference={"tile": 32, "overlap": 16, "batch_size": 3})
    tiled, p_tiled = segment_movie(images, tiled_settings, model=model, model_config=config, keep_probability=True)
    assert p_whole.shape == images.shape and p_whole.min() >= 0 and p_whole.max() <= 1
    # Tiles see less context at their borders; blended maps still agree closely.
    assert np.mean(np.abs(p_whole - p_tiled)) < 0.03
    assert abs(len(whole) - len(tiled)) <= 0.1 * len(whole)


def test_streamed_probability_store_equals_the_in_memory_map(tiny_model, tmp_path):
    from rvae_tools.io import open_zarr
    from rvae_tools.segment.store import ProbabilityStore

    settings, model, config, _ = tiny_model
    images, _, _ = _held_out()
    images = np.concatenate([images, images[:1]])  # 5 frames: two full chunks of 2 and a partial one
    _, whole = segment_movie(images, settings, model=model, model_config=config, keep_probability=True)
    with ProbabilityStore(tmp_path / "p.zarr", {"pixel_size": 1.0}, chunk_frames=2) as store:
        segment_movie(images, settings, model=model, model_config=config, probability_sink=store)
        assert store.frames_written == 4  # only one chunk's frames wait in memory
    streamed = open_zarr(tmp_path / "p.zarr", required=["probability"])["probability"].values
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), ProbabilityStore(tmp_path / "q.zarr", {}, chunk_frames=1) as store:
        store(0, whole[0])
        raise RuntimeError("boom")
    assert not (tmp_path / "q.zarr").exists()  # a failed run leaves no half-written map


def test_checkpoint_roundtrip_and_bad_checkpoints(tiny_model, tmp_path):
    _, model, config, _ = tiny_model
    path = tmp_path / "seg.pt"
    sha = save_checkpoint(path, model, config, {"stage": "test"})
    loaded, cfg, sha2 = load_checkpoint(path, classes=1)
    assert sha == sha2 and cfg["classes"] == 1 and cfg["normalisation"]["invert"] is False
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.cpu()(x), loaded(x), atol=1e-5)
    with pytest.raises(InputError, match="classes=1.*classes is 3"):
        load_checkpoint(path, classes=3)
    with pytest.raises(InputError, match="channels=1.*3 channel"):
        load_checkpoint(path, channels=3)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(InputError, match="corrupt.pt: not a readable segmenter checkpoint"):
        load_checkpoint(corrupt)
    # A checkpoint holding a pickled object is refused, not executed.
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "config": config, "payload": _Evil()}, evil)
    with pytest.raises(InputError, match="evil.pt"):
        load_checkpoint(evil)
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": model.state_dict(), "config": dict(config, width=12)}, wrong)
    with pytest.raises(InputError, match="do not fit"):
        load_checkpoint(wrong)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled",))


# --------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize("method", ["unet", "locate"])
def test_blank_constant_nan_and_empty_frames_give_no_rows_and_a_warning(tiny_model, method):
    settings, model, config, _ = tiny_model
    images, _, _ = _held_out()
    frames = np.stack([
        images[0],
        np.zeros((64, 64), np.float32),                      # blank
        np.full((64, 64), 7.5, np.float32),                  # constant
        np.full((64, 64), np.nan, np.float32),               # all NaN
        np.random.default_rng(0).normal(0, 0.05, (64, 64)).astype(np.float32) + 0.2,  # noise, no particles
    ])
    s = dict(settings, method=method, locate=dict(settings["locate"], minmass=5.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det, _ = segment_movie(frames, s, model=model, model_config=config)
    messages = [str(w.message) for w in caught if issubclass(w.category, SegmentationWarning)]
    for frame in (1, 2, 3):
        assert any(m.startswith(f"frame {frame}:") for m in messages), messages
    assert set(det["frame"]) <= {0, 4}
    assert (det["frame"] == 0).sum() > 0
    assert list(det.columns[: len(DETECTION_COLUMNS)]) == DETECTION_COLUMNS


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not BULK_WATER.is_dir(), reason=f"real data not found at {BULK_WATER} (../shared/data/bulk_water)")
@pytest.mark.parametrize("frame, count", [(29, 599), (299, 624)])
def test_bulk_water_locate_counts_match_the_trackpy_walkthrough(frame, count):
    from skimage.io import imread

    path = BULK_WATER / f"bulk_water_{frame:03d}.png"
    if not path.exists():
        pytest.skip(f"{path} not found")
    image = imread(path)[:, :, 1].astype(np.float32)[None]  # green channel, float32 as ingest stores it
    settings = validate_section("segment", {"method": "locate", "invert": True, "locate": {"diameter": 11, "minmass": 20}})
    det, _ = segment_movie(image, settings)
    assert len(det) == count


# --------------------------------------------------------------------------- CLI


def _write_movie(path: Path, images: np.ndarray) -> None:
    import xarray as xr

    from rvae_tools.io import write_zarr

    ds = xr.Dataset({"image": (("frame", "y", "x"), images.astype(np.float32))},
                    attrs={"pixel_size": 1.5, "pixel_unit": "nm", "frame_interval": 1.0})
    write_zarr(ds, path)


def test_cli_trains_segments_and_rejects_bad_input(tmp_path, capsys):
    import json

    from rvae_tools.io import open_zarr, read_table, table_metadata

    images, _, _ = _held_out()
    movie = tmp_path / "movie.zarr"
    _write_movie(movie, images)
    settings = json.dumps(dict(TINY, train=dict(TINY["train"], steps=60)))
    ckpt = tmp_path / "models" / "seg.pt"
    assert main(["train-segmenter", "-o", str(ckpt), "--history", str(tmp_path / "h.csv"), "--device", "cpu",
                 "--threads", "1", "--settings", settings]) == 0
    assert ckpt.exists() and len(pd.read_csv(tmp_path / "h.csv")) == 60
    out = tmp_path / "detections.parquet"
    prob = tmp_path / "probability.zarr"
    assert main(["segment", str(movie), "-o", str(out), "--checkpoint", str(ckpt), "--probability", str(prob),
                 "--device", "cpu", "--settings", settings]) == 0
    det = read_table(out, required=DETECTION_COLUMNS)
    assert det["frame"].dtype == np.int64 and len(det) > 0
    assert table_metadata(out)["method"] == "unet"
    p = open_zarr(prob, required=["probability"])
    assert p["probability"].shape == images.shape and "config_hash" in p.attrs

    capsys.readouterr()
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    assert main(["segment", str(movie), "-o", str(out), "--checkpoint", str(bad), "--settings", settings]) == 2
    assert "bad.pt: not a readable segmenter checkpoint" in capsys.readouterr().err
    three = json.dumps(dict(TINY, classes=3))
    assert main(["segment", str(movie), "-o", str(out), "--checkpoint", str(ckpt), "--settings", three]) == 2
    assert "trained for classes=1" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "missing.zarr"), "-o", str(out), "--settings", settings]) == 2
    assert main(["segment", str(movie), "-o", str(out), "--settings", json.dumps({"method": "sobel"})]) == 2

    # The QC figures read what the stage wrote.
    from rvae_tools.plots.segmentation import FIGURES, draw

    movie_dir = tmp_path
    written = draw(movie_dir, tmp_path / "figures", formats=("png",), dpi=60)
    assert sorted(p.stem for p in written) == sorted(FIGURES)
    assert all(p.stat().st_size > 1000 for p in written)


# --------------------------------------------------------------------------- classical detector


@pytest.mark.parametrize("dark", [False, True])
def test_classical_detector_with_inspected_settings_finds_rods_and_their_axes(dark):
    from rvae_tools.inspect import inspect_frames, resolve_settings

    syn = validate_section("segment", {"synthetic": dict(TINY_SYNTHETIC, shape=[128, 128])})["synthetic"]
    images, _, truth = render_frames(syn, 4, 11)
    movie = (1.0 - images) if dark else images
    inspection, _ = inspect_frames({i: movie[i] for i in range(len(movie))})
    settings, _ = resolve_settings("segment", validate_section("segment", {}), inspection)
    assert settings["method"] == "classical" and settings["invert"] is dark
    det, prob = segment_movie(movie, settings)
    assert prob is None and {"length", "width", "major_axis", "minor_axis"} <= set(det.columns)
    assert detection_scores(det, truth, 3.0)["f1"] >= 0.9
    t, p = match_points(truth[["x", "y"]].to_numpy(), det[["x", "y"]].to_numpy(), 3.0)
    same = truth["frame"].to_numpy()[t] == det["frame"].to_numpy()[p]
    delta = truth["angle"].to_numpy()[t][same] - det["orientation"].to_numpy()[p][same]
    assert abs(np.mean(np.exp(2j * delta))) >= 0.95  # axes agree modulo pi


@pytest.mark.parametrize(("length", "width", "dark"), [(8.0, 3.0, False), (10.0, 4.0, True), (30.0, 8.0, False)])
def test_user_movie_default_detector_finds_small_and_long_simulated_rods(length, width, dark):
    """A plain movie entry (inspect, then every segment setting at auto) on the project's simulator."""
    from rvae_tools.inspect import inspect_frames, resolve_settings
    from rvae_tools.simulate import simulate

    species = [{"name": "rod", "shape": "rod", "length": length, "width": width}]
    n = 15 if length > 20 else 25  # 25 rods of 30 px fill the view to its excluded-volume limit
    sim = simulate(validate_section("simulate", {"frames": 4, "seed": 5, "n_particles": n, "species": species,
                                                 "height": 192, "width": 192}))
    movie = sim.movie.astype(np.float64)
    if dark:
        movie = 2 * np.median(movie) - movie
    inspection, _ = inspect_frames({i: movie[i] for i in range(len(movie))})
    settings, _ = resolve_settings("segment", validate_section("segment", {}), inspection)
    assert settings["method"] == "classical" and settings["classical"]["width"] > 0
    det, _ = segment_movie(movie, settings)
    assert detection_scores(sim.truth, det, 0.5 * width)["f1"] >= 0.9


def test_streamed_detections_equal_the_in_memory_table(tmp_path):
    from rvae_tools.io import read_table, table_metadata
    from rvae_tools.segment.postprocess import empty_detections
    from rvae_tools.segment.store import DetectionStore

    images, _, _ = _held_out()
    settings = validate_section("segment", {"method": "classical", "invert": False,
                                            "classical": {"min_distance": 2.5, "min_area": 6, "max_area": None,
                                                          "background": None, "block": None}})
    whole, _ = segment_movie(images, settings)
    with DetectionStore(tmp_path / "d.parquet", DETECTION_COLUMNS, empty_detections(), chunk_rows=5) as store:
        rest, _ = segment_movie(images, settings, detections_sink=store)
        store.finish({"method": "classical"})
    assert len(rest) == 0 and store.rows == len(whole) > 10
    streamed = read_table(tmp_path / "d.parquet", required=DETECTION_COLUMNS)
    pd.testing.assert_frame_equal(streamed, whole[streamed.columns.tolist()], check_dtype=True)
    assert table_metadata(tmp_path / "d.parquet")["method"] == "classical"
    with DetectionStore(tmp_path / "e.parquet", DETECTION_COLUMNS, empty_detections()) as store:
        pass  # a movie without any detection still gives a table with the contract's columns
    assert list(read_table(tmp_path / "e.parquet").columns) == DETECTION_COLUMNS


def test_self_training_on_classical_regions_of_a_dark_movie():
    """A user movie without a simulator: the U-Net learns the classical detector's particles."""
    from rvae_tools.inspect import inspect_frames, resolve_settings

    syn = validate_section("segment", {"synthetic": dict(TINY_SYNTHETIC, shape=[96, 96])})["synthetic"]
    images, _, truth = render_frames(syn, 6, 21)
    movie = 1.0 - images  # dark particles: nothing like the simulator's bright ones
    inspection, _ = inspect_frames({i: movie[i] for i in range(len(movie))})
    settings, _ = resolve_settings("segment", validate_section("segment", {
        "method": "unet", "seed": 4, "model": {"depth": 2, "width": 6},
        "train": {"frames": 6, "steps": 150, "batch_size": 6, "crop": 32, "lr": 0.01}}), inspection)
    assert settings["train"]["source"] == "pseudo" and settings["invert"] is True
    model, config, _ = train_segmenter(settings, movie=movie, device=torch.device("cpu"), progress=False)
    assert config["source"] == "pseudo" and config["normalisation"]["invert"] is True
    det, _ = segment_movie(movie, settings, model=model, model_config=config)
    assert detection_scores(det, truth, 3.0)["f1"] >= 0.85


def _capsule(shape, p0, p1, radius):
    """Mask of a rod with round caps from ``p0`` to ``p1`` ((x, y) px), ``radius`` px."""
    yy, xx = np.indices(shape, dtype=np.float64)
    p0, d = np.asarray(p0, np.float64), np.subtract(p1, p0).astype(np.float64)
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / (d @ d), 0, 1)
    return np.hypot(xx - p0[0] - t * d[0], yy - p0[1] - t * d[1]) <= radius


def _phase_contrast(cells, shape, *, seed=0, texture=0.0):
    """Dark cells (contrast 0.6) with a bright halo on a bright background, drawn without the
    project's simulator: a blurred body, a ring of the difference of two blurs, optional
    smooth texture inside the cells, and 2 % pixel noise."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    body = np.max(np.stack(cells), axis=0).astype(np.float64)
    image = 1.0 - 0.6 * ndimage.gaussian_filter(body, 1.0)
    image += 1.5 * np.clip(ndimage.gaussian_filter(body, 3.0) - ndimage.gaussian_filter(body, 1.0), 0, None)
    image += texture * ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * body
    return image + 0.02 * rng.normal(size=shape)


def _count_cells(image, width):
    from rvae_tools.segment.classical import classical_frame

    settings = dict(validate_section("segment", {})["classical"], width=width, background=None, block=None,
                    min_area=0.75 * width**2, max_area=None)
    return classical_frame(image, settings, invert=True)


@pytest.mark.parametrize("gap", [1, 2])
def test_classical_detector_splits_touching_phase_contrast_cells_side_by_side_and_end_to_end(gap):
    """Two 9 px wide cells a halo line apart, side by side or pole to pole: two detections each,
    centred on the cells."""
    shape = (96, 128)
    side = [_capsule(shape, (40, 40), (80, 40), 4.5), _capsule(shape, (40, 49 + gap), (80, 49 + gap), 4.5)]
    ends = [_capsule(shape, (20, 48), (55, 48), 4.5), _capsule(shape, (64 + gap, 48), (100 + gap, 48), 4.5)]
    for cells in (side, ends):
        det = _count_cells(_phase_contrast(cells, shape), 9.0)
        assert len(det) == 2
        truth = pd.DataFrame({"frame": 0, "x": [np.nonzero(c)[1].mean() for c in cells],
                              "y": [np.nonzero(c)[0].mean() for c in cells]})
        assert detection_scores(truth, det, 3.0)["f1"] == 1.0


def test_classical_detector_keeps_a_textured_curved_cell_whole():
    """A curved 9 px wide cell with texture inside (about 6 % of its contrast, as the granules
    of a real bacterium): one detection, whatever the noise. A split on every dip of the signal
    cut it in three to five pieces."""
    shape = (96, 128)
    yy, xx = np.indices(shape)
    arc = (np.abs(np.hypot(xx - 64, yy - 90) - 50) <= 4.5) & (yy < 70)
    counts = [len(_count_cells(_phase_contrast([arc], shape, seed=s, texture=0.2), 9.0)) for s in range(5)]
    assert counts == [1] * 5


def test_refine_markers_takes_finer_cores_and_keeps_coarse_ones_they_miss():
    """A coarse core the narrow look cuts in two becomes two markers; a coarse core with no
    narrow core inside (its narrow cores fell under their area limit) is kept whole."""
    from rvae_tools.segment.classical import refine_markers

    coarse = np.zeros((10, 30), np.int64)
    coarse[2:8, 2:14] = 1
    coarse[2:8, 18:26] = 2
    fine = np.zeros_like(coarse)
    fine[2:8, 2:7] = 1
    fine[2:8, 9:14] = 2
    out = refine_markers(coarse, fine)
    assert len(np.unique(out[2:8, 2:14][out[2:8, 2:14] > 0])) == 2
    assert (out[2:8, 18:26] > 0).all() and len(np.unique(out[2:8, 18:26])) == 1
    assert out[2:8, 18:26][0, 0] not in (1, 2)
    assert (out[coarse == 0] == 0).all()

"""Real-data benchmark: every real movie read as a user's movie, with only its path declared.

Each movie goes through the data contract as a user's would: ``inspect`` (polarity, size, the
settings left at ``auto``), then ``segment_movie`` with the resolved settings, giving a
detections table. Scored against references made another way:

- ``omnipose_rods`` (real phase-contrast bacteria, label masks made by Omnipose): detection F1
  against the centroids of the masks' cell bodies (:func:`mask_reference`: stalks cut off;
  labels without a body, such as bare stalks and border slivers, are left out together with
  the detections on them; match radius half the median body minor axis), orientation
  consistency ``mean cos(2 (theta_det - theta_mask))`` over matched cells (1 = every axis
  along its mask's ellipse, 0 = random, -1 = all perpendicular; a constant offset lowers it,
  unlike ``|mean exp(2i delta)|``), inspected length / mask tip-to-tip length (Feret diameter)
  and inspected width / mask width (twice the largest inscribed radius), and the polarity
  (the cells are dark);
- ``bulk_water`` frame 299 (real latex spheres, bright field): the number of particles against
  the trackpy walkthrough's 624 features (diameter 11, minmass 20);
- ``trackpy_testdata`` T76S3F00001 (real latex spheres): detection F1 against trackpy's stored
  ``tp.locate(diameter=9, minmass=140)`` positions (arr_3; match radius 3 px), and the
  polarity (dark).

- ``omnipose_rotated`` (:func:`score_rotated`): the dense colony ``ec_5I_t141xy5c1`` turned by
  2.5 degrees more each frame and shifted by about 1 px (10 frames), through the whole chain
  from a plain movie entry (inspect, detect, track, windows, rVAE, encode; only the rVAE's
  epochs given): the lab-frame rVAE angle and the detector's moment orientation against each
  window's mask ellipse, the rVAE angle's change against the known turn, and the symmetry
  order found for the rods.

Prints one line per figure and ends with ONE line holding a JSON object of every figure.

Usage: python bench/realdata.py [--skip-spheres] [--rotated-epochs N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RODS = DATA / "omnipose_rods"


def detect_as_user(frames: dict[int, np.ndarray]) -> tuple[dict, pd.DataFrame]:
    """Inspect the frames and run the detector with every setting at ``auto`` (a plain movie entry).

    Returns the inspection and the detections table (the detections contract).
    """
    from rvae_tools.config import validate_section
    from rvae_tools.inspect import inspect_frames, resolve_settings
    from rvae_tools.segment import segment_movie
    from rvae_tools.segment.postprocess import DETECTION_COLUMNS

    inspection, _ = inspect_frames(frames)
    settings, _ = resolve_settings("segment", validate_section("segment", {}), inspection)
    movie = np.stack([frames[i] for i in sorted(frames)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det, _ = segment_movie(movie, settings)
    missing = set(DETECTION_COLUMNS) - set(det.columns)
    if missing:
        raise RuntimeError(f"detections lack contract columns {sorted(missing)}")
    return inspection, det


def score_static_beads(movie: np.ndarray) -> dict[str, float]:
    """Immobile beads (trackpy's ``stuck.tif``) as a user gets them: inspect, detect, track.

    The beads do not move, so the ensemble MSD of the drift-corrected tracks must sit at the
    localisation noise floor at every lag: 2 (var x + var y) of each trajectory's positions
    about its own mean (px^2), whatever the lag.
    """
    from rvae_tools.track import track

    inspection, det = detect_as_user({i: movie[i] for i in range(len(movie))})
    settings, _ = resolve_track_settings(inspection)
    result = track(det, settings)
    tracks = result.tracks
    by = tracks.groupby("particle")[["x_corrected", "y_corrected"]]
    floor = float(2 * (by.var(ddof=1).sum(axis=1)).median())
    msd = result.msd.set_index("lag")["msd"]
    return {
        "per_frame": float(det.groupby("frame").size().mean()), "trajectories": float(tracks["particle"].nunique()),
        "frames": float(len(movie)), "length": float(inspection["length"]),
        "orientation_meaningful": float(inspection["orientation_meaningful"]),
        "size_from_spot_profile": float(inspection["size_source"] == "spot profile"),
        "noise_floor_px2": floor, "msd_lag1_px2": float(msd.iloc[0]), "msd_last_px2": float(msd.iloc[-1]),
        "msd_floor_ratio_max": float((msd / floor).max()), "msd_floor_ratio_min": float((msd / floor).min()),
    }


def resolve_track_settings(inspection: dict) -> tuple[dict, list]:
    """The ``track`` section with every setting at ``auto``, resolved from the inspection."""
    from rvae_tools.config import validate_section
    from rvae_tools.inspect import resolve_settings

    settings = validate_section("track", {})
    settings["seed"] = 0
    return resolve_settings("track", settings, inspection)


def mask_reference(masks: np.ndarray) -> pd.DataFrame:
    """Per label of an integer mask: where its cell body is, which way it points, how big it is.

    The body is the label opened by a disc of 0.7 times its largest inscribed radius (its
    largest piece): thin parts (a Caulobacter's stalk, up to 253 px long in caulo_15) go, so
    the centre and the axis are the body's, not the stalk's. A label whose largest inscribed
    width is under 3/4 of the median label's (a stalk without a body, a sliver cut by the
    frame border) has ``body`` False: there is no cell to find there.

    Columns: ``x``, ``y`` (px, the body's centroid), ``orientation`` (rad, the body's major
    axis from +x towards +y, from its central second moments), ``length`` (px, Feret
    diameter of the body; of the whole label where the opening took off less than a fifth), ``width`` (px, twice the largest inscribed radius), ``minor``
    (px, the body's ellipse minor axis), ``body`` (bool).
    """
    from scipy import ndimage
    from skimage.measure import regionprops
    from skimage.morphology import disk

    rows = []
    for p in regionprops(masks):
        image = np.pad(p.image, 1)
        inscribed = ndimage.distance_transform_edt(image).max()
        body = ndimage.binary_opening(image, structure=disk(max(1, int(np.round(0.7 * inscribed)))))
        pieces, n = ndimage.label(body)
        if n:
            body = pieces == 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
        else:
            body = image
        (b,) = regionprops(body.astype(np.uint8))
        mu = b.moments_central  # mu[i, j] = sum (row - r0)^i (col - c0)^j
        theta = 0.5 * np.arctan2(2 * mu[1, 1], mu[0, 2] - mu[2, 0])
        r0, c0 = p.bbox[0] - 1, p.bbox[1] - 1
        # The opening also blunts the tips; where it took off no thin part, the label is the body.
        length = b.feret_diameter_max if b.area < 0.8 * p.area else p.feret_diameter_max
        rows.append({"frame": 0, "x": c0 + b.centroid[1], "y": r0 + b.centroid[0], "orientation": theta,
                     "length": length, "width": 2 * inscribed, "minor": b.axis_minor_length})
    ref = pd.DataFrame(rows)
    ref["body"] = ref["width"] >= 0.75 * ref["width"].median() if len(ref) else pd.Series([], dtype=bool)
    return ref


def orientation_consistency(reference: pd.DataFrame, detections: pd.DataFrame, radius: float) -> tuple[float, int]:
    """``mean cos(2 delta)`` of the orientations of reference and detection pairs matched within
    ``radius`` px (modulo pi; 1 = all aligned), and the number of pairs."""
    from rvae_tools.segment.metrics import match_points

    ti, di = match_points(reference[["x", "y"]].to_numpy(), detections[["x", "y"]].to_numpy(), radius)
    if len(ti) == 0:
        return float("nan"), 0
    delta = reference["orientation"].to_numpy()[ti] - detections["orientation"].to_numpy()[di]
    return float(np.mean(np.cos(2 * delta))), len(ti)


def score_rods(image: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """All figures of one omnipose image (see the module docstring)."""
    from rvae_tools.segment.metrics import detection_scores, match_points

    every = mask_reference(masks)
    ref = every[every["body"]].reset_index(drop=True)
    inspection, det = detect_as_user({0: image})
    radius = 0.5 * float(ref["minor"].median())
    # A detection on a label without a body (a bare stalk, a border sliver) is neither right
    # nor wrong: it is left out before scoring.
    _, on_bare = match_points(every.loc[~every["body"], ["x", "y"]].to_numpy(), det[["x", "y"]].to_numpy(), radius)
    det = det.drop(index=det.index[on_bare]).reset_index(drop=True)
    sc = detection_scores(ref, det, radius)
    consistency, pairs = orientation_consistency(ref, det, radius)
    return {"f1": sc["f1"], "tp": sc["tp"], "fp": sc["fp"], "fn": sc["fn"], "orientation": consistency,
            "pairs": pairs, "length_ratio": inspection["length"] / float(ref["length"].median()),
            "width_ratio": inspection["width"] / float(ref["width"].median()),
            "polarity_dark": float(inspection["polarity"] == "dark")}


#: The rotated colony movie: frames (trajectories of the default ``track.min_length`` of 10
#: frames need 10), the turn per frame (rad, from +x towards +y, about the frame centre; 2.5
#: degrees moves a cell at the colony's rim by about 4.5 px, within the inspected search
#: range) and the shift of frame k (x, y) px.
ROTATED_FRAMES = 10
ROTATED_STEP = np.radians(2.5)


def rotated_shifts(frames: int) -> np.ndarray:
    """Known shift (x, y) px of every frame of the rotated movie: a wobble of about 1 px."""
    k = np.arange(frames)
    return np.c_[np.sin(1.3 * k), np.cos(0.7 * k) - 1.0]


def rotated_movie(image: np.ndarray, masks: np.ndarray, frames: int = ROTATED_FRAMES,
                  step: float = ROTATED_STEP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A short movie of one frame turned by ``step`` more each frame and shifted (:func:`rotated_shifts`).

    Returns the movie (frame, y, x), the label masks carried along (nearest neighbour) and the
    known turn of every frame (rad). The background poured in at the corners is the frame
    border's median.
    """
    from angles import transform  # bench/ is the script's folder, first on sys.path

    border = np.r_[image[0], image[-1], image[:, 0], image[:, -1]]
    fill = float(np.median(border))
    phis = step * np.arange(frames)
    shifts = rotated_shifts(frames)
    movie = np.stack([transform(image, phi, sh, 1, fill) for phi, sh in zip(phis, shifts)])
    labels = np.stack([transform(masks.astype(np.float64), phi, sh, 0, 0.0).astype(np.int64)
                       for phi, sh in zip(phis, shifts)])
    return movie, labels, phis


def encode_as_user(movie: np.ndarray, root: Path, *, epochs: int, seed: int = 0) -> dict:
    """The chain from a plain movie entry: inspect, detect, track, windows, rVAE (``epochs``), encode.

    Every stage setting is its default (``auto`` ones take the inspected value); only the
    rVAE's epochs and seed are given (a CI-sized run). Returns the inspection, the patches
    and latents datasets (each window's latent row on ``obs``) and the resolved window size.
    """
    import xarray as xr

    from rvae_tools.config import validate_section
    from rvae_tools.encode import encode_patches
    from rvae_tools.inspect import resolve_settings
    from rvae_tools.io import write_table, write_zarr
    from rvae_tools.rvae import RVAE
    from rvae_tools.track import track
    from rvae_tools.windows import make_windows

    inspection, det = detect_as_user({k: movie[k] for k in range(len(movie))})
    track_settings, _ = resolve_settings("track", validate_section("track", {}), inspection)
    tracks = track(det, track_settings).tracks
    write_zarr(xr.Dataset({"image": (("frame", "y", "x"), movie.astype(np.float32))},
                          attrs={"pixel_size": 1.0, "pixel_unit": "px", "frame_interval": 1.0, "sha256": "0" * 64}),
               root / "movie.zarr")
    write_table(tracks, root / "tracks.parquet")
    windows, _ = resolve_settings("windows", validate_section("windows", {}), inspection)
    make_windows(root / "movie.zarr", root / "tracks.parquet", root / "patches.zarr", windows, progress=False)
    settings = validate_section("rvae", {"epochs": epochs, "seed": seed})
    model = RVAE.from_settings(settings, int(windows["size"]))
    model.fit([str(root / "patches.zarr")], device="cpu", progress=False)
    latents = encode_patches(root / "patches.zarr", root / "model.pt", root / "latents.zarr", settings=settings,
                             device="cpu", progress=False, model=model)
    patches = xr.open_zarr(root / "patches.zarr")
    p = np.searchsorted(latents.particle.values, patches.particle.values)
    f = np.searchsorted(latents.frame.values, patches.frame.values)
    return {"inspection": inspection, "patches": patches, "latents": latents, "size": int(windows["size"]),
            "angle": latents["angle"].values[p, f].astype(np.float64),
            "species": latents["species"].values[p], "n_tracks": int(tracks["particle"].nunique())}


def score_rotated(image: np.ndarray, masks: np.ndarray, *, epochs: int = 3, frames: int = ROTATED_FRAMES) -> dict:
    """rVAE angles of a real frame turned and shifted by known amounts, through the chain from a plain entry.

    Each window is given the mask label under its centre in its own (turned) frame, so the
    references come from the masks, not from the tracks. Figures (``mean cos(2 delta)``, 1 =
    aligned modulo pi, 0 = random):

    - ``rvae_vs_mask``: the lab-frame ``angle`` against the window's mask ellipse
      (:func:`mask_reference` of the turned mask); ``moments_vs_mask`` the same for the
      detector's ``orientation`` of those windows;
    - ``rvae_follows_rotation``: each cell's angle change since its first window against the
      known turn between the two frames (no calibration enters);
    - ``symmetry``: the symmetry order of the species holding most windows (rods: 2),
      ``n_species``, ``windows``.
    """
    import tempfile

    from skimage.measure import regionprops

    movie, labels, phis = rotated_movie(image, masks, frames)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = encode_as_user(movie, Path(tmp), epochs=epochs)
        patches = run["patches"]
        frame = patches["frame"].values.astype(int)
        x, y = patches["x"].values, patches["y"].values
        moments = patches["orientation"].values.astype(np.float64)
    angle = run["angle"]
    reference = {}
    for k in range(frames):
        ref = mask_reference(labels[k])
        for p, (theta, body) in zip(regionprops(labels[k]), ref[["orientation", "body"]].to_numpy()):
            if body:
                reference[(k, p.label)] = float(theta)
    h, w = labels.shape[1:]
    row, col = np.clip(np.round(y).astype(int), 0, h - 1), np.clip(np.round(x).astype(int), 0, w - 1)
    cell = labels[frame, row, col]
    truth = np.array([reference.get((k, c), np.nan) for k, c in zip(frame, cell)])

    def agreement(a: np.ndarray, b: np.ndarray) -> float:
        ok = np.isfinite(a) & np.isfinite(b)
        return float(np.mean(np.cos(2 * (a[ok] - b[ok])))) if ok.any() else float("nan")

    first: dict[int, int] = {}
    turns = []
    for i in np.argsort(frame, kind="stable"):
        if not (np.isfinite(truth[i]) and np.isfinite(angle[i])):
            continue
        j = first.setdefault(int(cell[i]), int(i))
        if j != i:
            turns.append(angle[i] - angle[j] - (phis[frame[i]] - phis[frame[j]]))
    table = json.loads(run["latents"].attrs["species"])
    main_species = int(np.bincount(run["species"][run["species"] >= 0]).argmax())
    return {"rvae_vs_mask": agreement(angle, truth), "moments_vs_mask": agreement(moments, truth),
            "rvae_follows_rotation": float(np.mean(np.cos(2 * np.asarray(turns)))) if turns else float("nan"),
            "symmetry": float(table[main_species]["symmetry"]), "n_species": float(len(table)),
            "windows": float(len(angle)), "matched": float(np.isfinite(truth).sum()), "window_size": float(run["size"])}


def _grey(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    img = np.asarray(iio.imread(path), np.float64)
    return img[..., 1] if img.ndim == 3 else img  # the walkthrough's green channel


def main(argv: list[str] | None = None) -> int:
    import tifffile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-spheres", action="store_true", help="omnipose_rods only")
    parser.add_argument("--rotated-epochs", type=int, default=3,
                        help="rVAE epochs of the rotated-colony run (0 = skip it)")
    args = parser.parse_args(argv)
    out: dict[str, float] = {}

    def report(key: str, value: float) -> None:
        out[key] = float(value)
        print(f"{key}: {value:.3f}")

    start = time.perf_counter()
    if RODS.exists():
        tp = fp = fn = 0
        for tif in sorted(RODS.glob("*.tif")):
            s = score_rods(tifffile.imread(tif).astype(np.float64),
                           tifffile.imread(RODS / "masks" / f"{tif.stem}_cp_masks.tif"))
            tp, fp, fn = tp + s["tp"], fp + s["fp"], fn + s["fn"]
            for key in ("f1", "orientation", "length_ratio", "width_ratio", "polarity_dark"):
                report(f"omnipose_{tif.stem}_{key}", s[key])
            print(f"  {s['tp']} matched, {s['fp']} extra, {s['fn']} missed; orientation over {s['pairs']} pairs")
        report("omnipose_pooled_f1", 2 * tp / max(2 * tp + fp + fn, 1))
        if args.rotated_epochs > 0:
            name = "ec_5I_t141xy5c1"
            r = score_rotated(tifffile.imread(RODS / f"{name}.tif").astype(np.float64),
                              tifffile.imread(RODS / "masks" / f"{name}_cp_masks.tif"), epochs=args.rotated_epochs)
            for key in ("rvae_vs_mask", "moments_vs_mask", "rvae_follows_rotation", "symmetry", "n_species"):
                report(f"omnipose_rotated_{key}", r[key])
            print(f"  {r['windows']:.0f} windows ({r['matched']:.0f} on a cell body), window {r['window_size']:.0f} px, "
                  f"{args.rotated_epochs} epochs")
    if not args.skip_spheres:
        from rvae_tools.segment.metrics import detection_scores

        water = DATA / "bulk_water"
        if water.exists():
            frames = {i: _grey(water / f"bulk_water_{i:03d}.png") for i in (298, 299)}
            inspection, det = detect_as_user(frames)
            n299 = int((det["frame"] == 1).sum())
            report("bulk_water_299_count_ratio", n299 / 624.0)
            report("bulk_water_polarity_dark", inspection["polarity"] == "dark")
            report("bulk_water_orientation_meaningful", inspection["orientation_meaningful"])
        tpd = DATA / "trackpy_testdata"
        if tpd.exists():
            frame = _grey(tpd / "image_sequence" / "T76S3F00001.png")
            inspection, det = detect_as_user({0: frame})
            yx = np.load(tpd / "reproducibility_v0.4.npz")["arr_3"]
            ref = pd.DataFrame({"frame": 0, "x": yx[:, 1], "y": yx[:, 0]})
            report("trackpy_T76S3F00001_f1", detection_scores(ref, det, 3.0)["f1"])
            report("trackpy_T76S3F00001_polarity_dark", inspection["polarity"] == "dark")
            stuck = score_static_beads(tifffile.imread(tpd / "video" / "stuck.tif").astype(np.float64))
            for key, value in stuck.items():
                report(f"stuck_{key}", value)
    report("seconds", time.perf_counter() - start)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

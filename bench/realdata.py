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

Prints one line per figure and ends with ONE line holding a JSON object of every figure.

Usage: python bench/realdata.py [--skip-spheres]
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


def _grey(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    img = np.asarray(iio.imread(path), np.float64)
    return img[..., 1] if img.ndim == 3 else img  # the walkthrough's green channel


def main(argv: list[str] | None = None) -> int:
    import tifffile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-spheres", action="store_true", help="omnipose_rods only")
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
    report("seconds", time.perf_counter() - start)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

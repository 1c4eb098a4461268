"""Benchmark: lab-frame rVAE angles on a real dense colony, with and without the particle's aperture.

Data: ``../shared/data/omnipose_rods/ec_5I_t141xy5c1.tif`` (a real phase-contrast E. coli
microcolony, 159 touching cells) and its label mask. A short movie is made by turning the
frame about its centre by known angles (from +x towards +y) and shifting it by known amounts;
the mask gets the same transform (nearest neighbour), and every cell's reference position,
orientation (major axis of its mask region's second moments, modulo pi) and axes become the
detections of that frame, with the cell's label as its trajectory. The movie is binned 2 x 2
(cells then about 12 x 5 px, like the demo's) and inverted (dark cells on a bright background
become bright), as ``inspect`` suggests for phase contrast.

For ``windows.mask`` none and aperture, an rVAE is trained on the windows and they are encoded;
printed per variant:

- ``consistency``: ``|mean exp(2i (angle - mask orientation))|`` over elongated cells
  (eccentricity >= 0.8) of the calibrated lab-frame ``angle`` (1 = every window's angle equals
  the mask ellipse's, modulo pi, with no offset left to fit);
- ``consistency_window_moments``: the same for the intensity second moments of the raw window
  (the classical estimate from the same pixels the rVAE sees);
- ``rotation_following``: ``|mean exp(2i (angle_k - angle_0 - phi_k))|`` over cells and frames
  (the encoded angle follows the known rotation phi_k);
- the fitted sense, offset and residual, and the species' symmetry order.

Run: ``python bench/angles.py [--epochs N]``; ``--results results/demo`` instead scores a
finished run against its ``truth.parquet`` (lab-frame angle with nothing fitted, per true
class). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rvae_tools.config import validate_section
from rvae_tools.encode import encode_patches
from rvae_tools.io import write_table, write_zarr
from rvae_tools.windows import make_windows

DATA = REPO.parent / "shared" / "data" / "omnipose_rods"
ANGLES = np.array([0.0, 0.35, -0.6, 1.1, 1.9, -1.4])  # rad, from +x towards +y
SHIFTS = np.array([[0, 0], [3.2, -1.7], [-4.5, 2.1], [1.3, 5.0], [-2.2, -3.4], [4.1, 0.6]])  # px (x, y)


def transform(img: np.ndarray, phi: float, shift: np.ndarray, order: int, fill: float | None = None) -> np.ndarray:
    """``img`` turned by ``phi`` about its centre (from +x towards +y) and moved by ``shift`` (x, y) px.

    ``order`` 1 (linear) for an image, 0 for a label mask. Pixels from outside the frame get
    ``fill``; without it, an image repeats its edge and a mask gets 0.
    """
    h, w = img.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    px, py = xx - cx - shift[0], yy - cy - shift[1]
    # output pixel p samples the input at R(-phi) p
    sx = np.cos(phi) * px + np.sin(phi) * py + cx
    sy = -np.sin(phi) * px + np.cos(phi) * py + cy
    if fill is None:
        return ndimage.map_coordinates(img, [sy, sx], order=order, mode="nearest" if order else "constant", cval=0)
    return ndimage.map_coordinates(img, [sy, sx], order=order, mode="constant", cval=fill)


def regions(mask: np.ndarray, frame: int) -> pd.DataFrame:
    """Centre, orientation (rad, mod pi, from +x towards +y), axes (px) of every label region."""
    rows = []
    labels = np.unique(mask[mask > 0])
    yy, xx = np.indices(mask.shape, dtype=np.float64)
    for lab in labels:
        sel = mask == lab
        n = sel.sum()
        if n < 6:
            continue
        x, y = xx[sel], yy[sel]
        mx, my = x.mean(), y.mean()
        sxx, syy, sxy = ((x - mx) ** 2).mean(), ((y - my) ** 2).mean(), ((x - mx) * (y - my)).mean()
        tr, det = sxx + syy, sxx * syy - sxy ** 2
        disc = np.sqrt(max(tr ** 2 / 4 - det, 0))
        l1, l2 = tr / 2 + disc, max(tr / 2 - disc, 0)
        rows.append({"frame": frame, "x": mx, "y": my, "particle": int(lab), "area": float(n),
                     "orientation": 0.5 * np.arctan2(2 * sxy, sxx - syy),
                     "eccentricity": float(np.sqrt(1 - l2 / max(l1, 1e-12))),
                     "major_axis": 4 * np.sqrt(l1), "minor_axis": 4 * np.sqrt(l2)})
    return pd.DataFrame(rows)


def make_movie(root: Path, bin_by: int = 2) -> pd.DataFrame:
    import tifffile

    image = tifffile.imread(DATA / "ec_5I_t141xy5c1.tif").astype(np.float64)
    mask = tifffile.imread(DATA / "masks" / "ec_5I_t141xy5c1_cp_masks.tif")
    frames, tables = [], []
    for k, (phi, shift) in enumerate(zip(ANGLES, SHIFTS)):
        img = transform(image, phi, shift * bin_by, 1)
        lab = transform(mask.astype(np.float64), phi, shift * bin_by, 0).astype(np.int64)
        h, w = (s // bin_by * bin_by for s in img.shape)
        img = img[:h, :w].reshape(h // bin_by, bin_by, w // bin_by, bin_by).mean((1, 3))
        t = regions(lab[:h, :w], k)
        t[["x", "y"]] = (t[["x", "y"]] + 0.5) / bin_by - 0.5
        t[["major_axis", "minor_axis"]] /= bin_by
        t["area"] /= bin_by ** 2
        frames.append(img.max() - img)  # dark cells on bright -> bright cells
        tables.append(t)
    write_zarr(xr.Dataset({"image": (("frame", "y", "x"), np.asarray(frames, np.float32))},
                          attrs={"pixel_size": 1.0, "pixel_unit": "px", "frame_interval": 1.0, "sha256": "0" * 64}),
               root / "movie.zarr")
    tracks = pd.concat(tables, ignore_index=True)
    write_table(tracks, root / "tracks.parquet")
    return tracks


def window_moments(windows: np.ndarray) -> np.ndarray:
    """Major axis (rad, mod pi) of each window's intensity above its median."""
    n, h, w = windows.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    wts = np.clip(windows - np.median(windows.reshape(n, -1), 1)[:, None, None], 0, None)
    tot = wts.sum((1, 2)) + 1e-12
    mx, my = (wts * xx).sum((1, 2)) / tot, (wts * yy).sum((1, 2)) / tot
    dx, dy = xx - mx[:, None, None], yy - my[:, None, None]
    sxx, syy, sxy = ((wts * dx * dx).sum((1, 2)), (wts * dy * dy).sum((1, 2)), (wts * dx * dy).sum((1, 2)))
    return 0.5 * np.arctan2(2 * sxy, sxx - syy)


def consistency(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(np.mean(np.exp(2j * (a[ok] - b[ok]))))) if ok.any() else float("nan")


def run_variant(root: Path, tracks: pd.DataFrame, mask: str, epochs: int, size: int) -> dict:
    from rvae_tools.rvae import RVAE

    patches = root / f"patches_{mask}.zarr"
    make_windows(root / "movie.zarr", root / "tracks.parquet", patches,
                 validate_section("windows", {"size": size, "mask": mask}), progress=False)
    settings = validate_section("rvae", {"epochs": epochs, "latent_dim": 2, "seed": 0, "patience": 0})
    t0 = time.time()
    model = RVAE.from_settings(settings, size)
    model.fit([str(patches)], device="cpu", progress=False)
    train_s = time.time() - t0
    latents = root / f"latents_{mask}.zarr"
    ds = encode_patches(patches, root / "none.pt", latents, settings=settings, device="cpu", progress=False,
                        model=model)
    pds = xr.open_zarr(patches)
    p = np.searchsorted(ds.particle.values, pds.particle.values)
    f = np.searchsorted(ds.frame.values, pds.frame.values)
    angle = ds.angle.values[p, f].astype(np.float64)
    ref = pds.orientation.values.astype(np.float64)
    elongated = pds.eccentricity.values >= 0.8
    moments = window_moments(pds.window.values)
    # rotation following: each cell's angle change from its first frame against the known turn
    frame0 = {}
    diffs = []
    for i in np.argsort(pds.frame.values, kind="stable"):
        cell, k = int(pds.particle.values[i]), int(pds.frame.values[i])
        if not elongated[i]:
            continue
        if cell not in frame0:
            frame0[cell] = (k, angle[i])
            continue
        k0, a0 = frame0[cell]
        diffs.append(angle[i] - a0 - (ANGLES[k] - ANGLES[k0]))
    diffs = np.asarray(diffs)
    cal = json.loads(ds.attrs["angle_calibration"])[0]
    return {
        "mask": mask, "windows": int(pds.sizes["obs"]), "train_s": round(train_s, 1),
        "symmetry": ds.attrs["species_symmetry"], "n_species": len(ds.attrs["species_symmetry"]),
        "consistency": round(consistency(angle[elongated], ref[elongated]), 4),
        "consistency_window_moments": round(consistency(moments[elongated], ref[elongated]), 4),
        "rotation_following": round(float(np.abs(np.mean(np.exp(2j * diffs)))), 4) if diffs.size else float("nan"),
        "calibration": cal["method"], "sense": cal["sense"], "offset_deg": round(float(np.degrees(cal["offset"])), 1),
        "residual_deg": round(float(np.degrees(cal["residual"])), 1),
        "padded_windows": int(pds.padded.values.sum()),
    }


def _true_species(movie_dir: Path) -> list[dict]:
    """The simulated species (``name``, ``cls``, ``symmetry``, ...) of a run's raw/simulation.json, or []."""
    meta = movie_dir / "raw" / "simulation.json"
    return json.loads(meta.read_text()).get("species", []) if meta.exists() else []


def score_results(movie_dir: Path) -> dict:
    """Lab-frame angle of a finished run (results/NAME with truth.parquet) against the truth, per species.

    Reads ``latents.zarr``, ``truth.parquet`` and, when there, ``raw/simulation.json`` (the true
    species' names and symmetry orders); see :func:`score_latents`.
    """
    return score_latents(xr.open_zarr(movie_dir / "latents.zarr"), pd.read_parquet(movie_dir / "truth.parquet"),
                         _true_species(movie_dir))


def score_latents(ds: xr.Dataset, truth: pd.DataFrame, true_species: list[dict] | None = None) -> dict:
    """Lab-frame angles of latents against the simulated truth, per TRUE species.

    Every figure is per true species (``cls`` of the truth), over the windows whose centre lies
    within 2 px of a true particle. ``lab_*``: ``|mean exp(i n (angle - truth))|`` with nothing
    fitted (the lab frame must hold as stored), n the true symmetry order when ``true_species``
    gives it (else the order found for the species holding most of its windows, ``n_found_*``),
    and ``lab_offset_deg_*`` the constant offset left (deg, modulo 360 / n; 0 when the lab frame
    holds);
    ``free_*``: the same maximised over a sense and an offset (as bench/rvae.py);
    ``species_of_*``: the found species holding most of the true species' windows (-1: none),
    ``species_share_*``: the share of its windows that species holds; ``true_name_*``.
    """
    from scipy.spatial import cKDTree

    table = json.loads(ds.attrs["species"])
    out = {"symmetry_found": ds.attrs["species_symmetry"], "species_source": ds.attrs["species_source"],
           "offset_deg": [round(float(np.degrees(o)), 1) for o in ds.attrs["angle_offset"]],
           "sense": ds.attrs["angle_sense"]}
    ang = ds.angle.transpose("particle", "frame").values
    xs, ys = ds.x.transpose("particle", "frame").values, ds.y.transpose("particle", "frame").values
    sp = ds.species.values
    pairs = []
    for k, frame in enumerate(ds.frame.values):
        t = truth[truth.frame == frame]
        ok = np.isfinite(xs[:, k])
        if t.empty or not ok.any():
            continue
        dist, j = cKDTree(t[["x", "y"]].to_numpy()).query(np.c_[xs[ok, k], ys[ok, k]])
        good = dist < 2.0
        pairs.append(pd.DataFrame({"angle": ang[ok, k][good], "truth": t.angle.to_numpy()[j[good]],
                                   "true_cls": t.cls.to_numpy()[j[good]], "species": sp[ok][good]}))
    pairs = pd.concat(pairs, ignore_index=True)
    known = {int(s["cls"]): s for s in true_species or []}
    for cls, g in pairs.groupby("true_cls"):
        found = int(g.species.mode().iloc[0])
        n_found = 2 if found < 0 else max(int(table[found]["symmetry"]), 1)
        n = int(known[int(cls)]["symmetry"]) if int(cls) in known else n_found
        out[f"true_name_cls{cls}"] = known.get(int(cls), {}).get("name", str(cls))
        out[f"species_of_cls{cls}"] = found
        out[f"species_share_cls{cls}"] = round(float(np.mean(g.species.to_numpy() == found)), 4)
        out[f"windows_cls{cls}"] = len(g)
        d = g.angle.to_numpy() - g.truth.to_numpy()
        resultant = np.nanmean(np.exp(1j * n * d))
        out[f"lab_consistency_cls{cls}"] = round(float(np.abs(resultant)), 4)
        # the constant offset left between stored and true angles (0 when the lab frame holds)
        out[f"lab_offset_deg_cls{cls}"] = round(float(np.degrees(np.angle(resultant) / n)), 1)
        free = max(float(np.abs(np.nanmean(np.exp(1j * n * (g.truth.to_numpy() - s * g.angle.to_numpy())))))
                   for s in (1, -1))
        out[f"free_consistency_cls{cls}"] = round(free, 4)
        out[f"n_cls{cls}"] = n
        out[f"n_found_cls{cls}"] = n_found
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--masks", default="none,aperture")
    parser.add_argument("--results", type=Path, default=None,
                        help="instead: score a finished run's results/NAME (latents.zarr + truth.parquet)")
    args = parser.parse_args(argv)
    if args.results is not None:
        res = score_results(args.results)
        print(json.dumps({"bench": "angles_results", **res}))
        return 0
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tracks = make_movie(root)
        print(f"movie: {len(ANGLES)} frames, {tracks.particle.nunique()} cells, {len(tracks)} detections")
        for mask in args.masks.split(","):
            res = run_variant(root, tracks, mask, args.epochs, args.size)
            print(f"mask={mask}: " + ", ".join(f"{k}={v}" for k, v in res.items() if k != "mask"), flush=True)
            out[mask] = res
    print(json.dumps({"bench": "angles", "epochs": args.epochs, **{f"{m}_{k}": v for m, r in out.items()
                                                                   for k, v in r.items() if k != "mask"}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

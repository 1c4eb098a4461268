"""User-movie segmentation benchmark: inspect, then the classical detector, from a plain movie entry.

Every movie is read as a user's movie with nothing but its path: ``rvae-tools inspect`` decides
polarity, size and the detector's settings (everything left at ``auto``), then the classical
detector runs with them. Scored against references made another way:

- ``omnipose_rods`` (real phase-contrast bacteria, ../shared/data/omnipose_rods): detection F1
  against the centroids of the label masks (match radius: half the median mask minor axis),
  per image and pooled, and the inspected length/width against the masks' ellipse fits;
- simulated movies with other physics than the demo's (dark particles on a bright background,
  long rods, triangles) from the project's simulator: detection F1 against the truth (match
  radius: half the particle width) and the inspected size against the simulated one.

Prints one line per figure and ends with ONE line holding a JSON object of every figure printed.

Usage: python bench/user_movies.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from realdata import detect_as_user  # bench/ is the script's folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
RODS = ROOT.parent / "shared" / "data" / "omnipose_rods"


def main() -> int:
    import tifffile
    from skimage.measure import regionprops

    from rvae_tools.config import validate_section
    from rvae_tools.segment.metrics import detection_scores
    from rvae_tools.simulate import simulate

    out: dict[str, float] = {}

    def report(key: str, value: float) -> None:
        out[key] = float(value)
        print(f"{key}: {value:.3f}")

    start = time.perf_counter()
    if RODS.exists():
        tp = fp = fn = 0
        for tif in sorted(RODS.glob("*.tif")):
            image = tifffile.imread(tif).astype(np.float64)
            masks = tifffile.imread(RODS / "masks" / f"{tif.stem}_cp_masks.tif")
            props = regionprops(masks)
            ref = pd.DataFrame({"frame": 0, "x": [p.centroid[1] for p in props], "y": [p.centroid[0] for p in props]})
            width = float(np.median([p.axis_minor_length for p in props]))
            length = float(np.median([p.axis_major_length for p in props]))
            inspection, det = detect_as_user({0: image})
            sc = detection_scores(det, ref, 0.5 * width)
            tp, fp, fn = tp + sc["tp"], fp + sc["fp"], fn + sc["fn"]
            report(f"omnipose_{tif.stem}_f1", sc["f1"])
            report(f"omnipose_{tif.stem}_length_ratio", inspection["length"] / length)
            report(f"omnipose_{tif.stem}_width_ratio", inspection["width"] / width)
            print(f"  polarity {inspection['polarity']} (certain: {inspection['polarity_certain']}); "
                  f"{len(det)} detections, {len(ref)} cells")
        report("omnipose_pooled_f1", 2 * tp / max(2 * tp + fp + fn, 1))

    cases = {
        "dark_rods": ([{"name": "rod", "shape": "rod", "length": 14.0, "width": 5.0}], True),
        "long_rods": ([{"name": "rod", "shape": "rod", "length": 30.0, "width": 8.0}], False),
        "triangles": ([{"name": "tri", "shape": "triangle", "length": 14.0}], False),
    }
    for name, (species, dark) in cases.items():
        sim = simulate(validate_section("simulate", {"frames": 6, "seed": 321, "n_particles": 30, "species": species,
                                                     "height": 256, "width": 256}))
        movie = sim.movie.astype(np.float64)
        if dark:
            movie = 2 * np.median(movie) - movie
        inspection, det = detect_as_user({i: movie[i] for i in range(len(movie))})
        width = species[0].get("width", species[0]["length"])
        sc = detection_scores(det, sim.truth, 0.5 * min(width, species[0]["length"]))
        report(f"sim_{name}_f1", sc["f1"])
        report(f"sim_{name}_length_ratio", inspection["length"] / species[0]["length"])
        print(f"  polarity {inspection['polarity']} (truth {'dark' if dark else 'bright'})")
    report("seconds", time.perf_counter() - start)
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

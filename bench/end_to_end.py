"""End-to-end scores of a finished simulated run, read only through the data contract.

A run of the workflow on a simulated movie (``results/NAME`` with ``truth.parquet`` and
``raw/simulation.json``, as the ``simulate`` rule writes them) is scored stage by stage from
its contract files, against the simulation's truth:

- ``detection_*``: precision, recall, F1 and localisation RMSE (px) of ``detections.parquet``
  (match radius: half the narrowest simulated particle width, as bench/segmentation.py);
- ``link_*``: link accuracy and trajectory purity of ``tracks.parquet`` (match radius 3 px,
  as bench/tracking.py);
- per TRUE species (``cls`` of the truth): the found species that holds its windows and its
  share, and the lab-frame angle consistency ``|mean exp(i n (angle - truth))|`` with nothing
  fitted (bench/angles.py ``score_results``);
- ``transition_*``: the estimate in ``dynamics.zarr``'s attrs against the simulated
  transition frame (``transition_error``, frames) and whether its interval holds it.

Targets checked (the demo's, issue 10): detection F1 >= 0.99, angle consistency >= 0.99 per
true species, transition error <= 1 frame; ``meets_targets`` says whether all hold.

Run: ``python bench/end_to_end.py --results results/demo``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from angles import score_results  # bench/ is the script's folder, first on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rvae_tools.segment.metrics import detection_scores
from rvae_tools.track import link_accuracy

TARGETS = {"detection_f1": 0.99, "angle_consistency": 0.99, "transition_error": 1.0}


def score_detection(run: Path, truth: pd.DataFrame, meta: dict) -> dict:
    """Detection precision / recall / F1 / RMSE (px) at half the narrowest particle width."""
    radius = 0.5 * min(float(s.get("width") or s["length"]) for s in meta["species"])
    det = pd.read_parquet(run / "detections.parquet")
    sc = detection_scores(truth, det, radius)
    return {"detection_radius_px": radius, **{f"detection_{k}": round(float(sc[k]), 4)
                                              for k in ("precision", "recall", "f1", "rmse")}}


def score_links(run: Path, truth: pd.DataFrame) -> dict:
    """Link accuracy and purity of the trajectories (match radius 3 px)."""
    sc = link_accuracy(pd.read_parquet(run / "tracks.parquet"), truth, max_distance=3.0)
    return {"link_accuracy": round(sc["link_accuracy"], 4), "link_purity": round(sc["purity"], 4),
            "link_n_links": sc["n_links"], "link_trajectories": sc["n_trajectories"]}


def score_transition(run: Path, meta: dict) -> dict:
    """The estimated transition frame against the simulated one (frames)."""
    attrs = xr.open_zarr(run / "dynamics.zarr").attrs
    true_tc = meta.get("transition_frame")
    out = {"transition_true": true_tc, "transition_detected": bool(attrs["transition_detected"]),
           "transition_model": attrs.get("transition_model"), "transition_signal": attrs.get("transition_signal")}
    est, low, high = (float(attrs[k]) for k in ("transition_frame", "transition_frame_low", "transition_frame_high"))
    out.update({"transition_est": round(est, 3), "transition_low": round(low, 3), "transition_high": round(high, 3)})
    if true_tc is not None:
        # a transition there but not found has no error to give (None; it misses the target)
        found = out["transition_detected"] and np.isfinite(est)
        out["transition_error"] = round(abs(est - float(true_tc)), 3) if found else None
        out["transition_interval_covers"] = bool(found and low <= true_tc <= high)
    return out


def _plain(value):
    """NaN as None, so the last line is strict JSON."""
    return None if isinstance(value, float) and not np.isfinite(value) else value


def targets_met(res: dict) -> bool:
    """Whether the run meets the demo's targets (see TARGETS)."""
    angles = [v for k, v in res.items() if k.startswith("lab_consistency_cls")]
    ok = res["detection_f1"] >= TARGETS["detection_f1"]
    ok &= bool(angles) and min(angles) >= TARGETS["angle_consistency"]
    if res["transition_true"] is None:  # a movie without ordering must not report one
        return bool(ok and not res["transition_detected"])
    return bool(ok and res["transition_error"] is not None
                and res["transition_error"] <= TARGETS["transition_error"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "results" / "demo",
                        help="a finished run's results/NAME (truth.parquet, raw/simulation.json)")
    args = parser.parse_args(argv)
    run = args.results
    for need in ("truth.parquet", "raw/simulation.json"):
        if not (run / need).exists():
            print(f"end_to_end: {run / need} is missing; score a run of a simulated movie", file=sys.stderr)
            return 2
    truth = pd.read_parquet(run / "truth.parquet")
    meta = json.loads((run / "raw" / "simulation.json").read_text())
    res = {**score_detection(run, truth, meta), **score_links(run, truth)}
    print(f"detection: F1 {res['detection_f1']:.4f} (precision {res['detection_precision']:.4f}, recall "
          f"{res['detection_recall']:.4f}, RMSE {res['detection_rmse']:.3f} px, radius {res['detection_radius_px']} px)")
    print(f"tracking: link accuracy {res['link_accuracy']:.4f} ({res['link_n_links']} links), "
          f"purity {res['link_purity']:.4f}")
    angles = score_results(run)
    res.update(angles)
    print(f"species found: symmetry {angles['symmetry_found']} ({angles['species_source']})")
    for s in meta["species"]:
        c = s["cls"]
        if f"lab_consistency_cls{c}" not in angles:
            print(f"  true species {c} ({s['name']}): no window matched")
            continue
        print(f"  true species {c} ({s['name']}, symmetry {s['symmetry']}): found species "
              f"{angles[f'species_of_cls{c}']} holds {angles[f'species_share_cls{c}']:.3f} of its "
              f"{angles[f'windows_cls{c}']} windows; lab angle consistency (n = {angles[f'n_cls{c}']}) "
              f"{angles[f'lab_consistency_cls{c}']:.4f}, free {angles[f'free_consistency_cls{c}']:.4f}")
    res.update(score_transition(run, meta))
    if res["transition_true"] is None:
        print(f"transition: none in the truth; detected: {res['transition_detected']}")
    elif res["transition_error"] is None:
        print(f"transition: truth frame {res['transition_true']}, not detected")
    else:
        print(f"transition: estimate {res['transition_est']:.2f} [{res['transition_low']:.2f}, "
              f"{res['transition_high']:.2f}] ({res['transition_model']}, {res['transition_signal']}) vs truth "
              f"{res['transition_true']} -> error {res['transition_error']:.2f} frames")
    res["meets_targets"] = targets_met(res)
    print(json.dumps({"bench": "end_to_end", "results": str(run), **{k: _plain(v) for k, v in res.items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

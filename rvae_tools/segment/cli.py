"""``rvae-tools train-segmenter`` and ``rvae-tools segment``: read the movie, call the stage, write its outputs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time

import pandas as pd

from ..config import add_settings_arguments, settings_from_args
from ..errors import InputError
from .detect import segment_movie
from .fit import train_segmenter
from .postprocess import DETECTION_COLUMNS, empty_detections
from .store import DetectionStore, ProbabilityStore

log = logging.getLogger(__name__)


def configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="checkpoint to write (.pt)")
    parser.add_argument("--history", help="training history to write (CSV: step, loss, seconds)")
    parser.add_argument("--input", help="movie.zarr (needed for train.source: pseudo)")
    parser.add_argument("--simulate-settings", metavar="JSON",
                        help="the movie's validated 'simulate' section (JSON): train on the simulator with these settings")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    add_settings_arguments(parser, "segment")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def run_train(args: argparse.Namespace) -> int:
    from ..config import validate_section
    from ..device import select_device
    from ..provenance import provenance_attrs
    from .unet import save_checkpoint

    settings = settings_from_args(args, "segment")
    _set_threads(args.threads)
    sim_settings = None
    if args.simulate_settings:
        try:
            sim_settings = validate_section("simulate", json.loads(args.simulate_settings), source="--simulate-settings")
        except json.JSONDecodeError as exc:
            raise InputError(f"--simulate-settings: not valid JSON ({exc})") from None
    movie = None
    if settings["train"]["source"] == "pseudo":
        if not args.input:
            raise InputError("train.source: pseudo needs --input movie.zarr")
        from ..io import open_zarr
        movie = open_zarr(args.input, required=["image"], what="movie store")["image"]
    device = select_device(args.device)
    start = time.perf_counter()
    model, config, history = train_segmenter(settings, sim_settings=sim_settings, movie=movie, device=device)
    prov = provenance_attrs(settings=settings, seed=settings["seed"], stage="train-segmenter",
                            inputs={"simulate": sim_settings} if sim_settings else None)
    sha = save_checkpoint(args.output, model, config, prov, history)
    if args.history:
        from ..io import atomic_output
        with atomic_output(args.history) as tmp:
            pd.DataFrame(history).to_csv(tmp, index=False)
    log.info("trained %d steps in %.1f s on %s; final loss %.3f; checkpoint %s (sha256 %s)",
             len(history), time.perf_counter() - start, device, history[-1]["loss"] if history else float("nan"),
             args.output, sha[:12])
    return 0


def configure_segment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="movie.zarr (image(frame, y, x))")
    parser.add_argument("-o", "--output", required=True, help="detections table to write (.parquet)")
    parser.add_argument("--checkpoint", help="U-Net checkpoint (overrides segment.checkpoint)")
    parser.add_argument("--probability", help="also write the foreground probability map here (Zarr; unet only)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps or cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--frames", type=int, nargs=2, metavar=("START", "STOP"),
                        help="segment only frames START..STOP-1 (numbered as in the whole movie; a workflow "
                             "chunk, joined by segment-gather)")
    add_settings_arguments(parser, "segment")


def _frame_range(frames: list[int] | None, n: int, path: str) -> tuple[int, int]:
    """The frame range [start, stop) asked for with --frames, checked against the movie's n frames."""
    if frames is None:
        return 0, n
    start, stop = frames
    if not 0 <= start < stop <= n:
        raise InputError(f"--frames: {start} {stop} is not a frame range of {path} ({n} frames); "
                         f"expected 0 <= START < STOP <= {n}")
    return start, stop


def run_segment(args: argparse.Namespace) -> int:
    from ..io import open_zarr
    from ..provenance import provenance_attrs

    # settings_from_args drops segment.frame_chunk (how the workflow splits the movie, not what
    # is computed): a chunk and the whole movie get one config_hash; the range is recorded below.
    settings = settings_from_args(args, "segment")
    _set_threads(args.threads)
    ds = open_zarr(args.input, required=["image"], what="movie store")
    image = ds["image"]
    if image.ndim != 3:
        raise InputError(f"{args.input}: image has dims {image.dims}; expected (frame, y, x)")
    start, stop = _frame_range(args.frames, int(image.shape[0]), args.input)
    model = config = device = None
    checksum = None
    checkpoint = args.checkpoint or settings["checkpoint"]
    if settings["method"] == "unet":
        from ..device import select_device
        from .unet import load_checkpoint
        if not checkpoint:
            raise InputError("segment.checkpoint: method unet needs a checkpoint (train one with train-segmenter)")
        model, config, checksum = load_checkpoint(checkpoint, classes=settings["classes"], channels=1)
        device = select_device(args.device)
    if args.probability and settings["method"] != "unet":
        raise InputError("--probability: only method unet produces a probability map")
    n = stop - start
    prov = provenance_attrs(settings=settings, seed=settings["seed"], model_checksum=checksum, stage="segment",
                            inputs={"movie": str(args.input), "checkpoint": str(checkpoint) if checkpoint else None,
                                    "inspect": str(args.inspect) if args.inspect else None})
    frames = image.data[start:stop]  # dask or numpy; indexed one frame at a time
    # A chunk records where it lies, so segment-gather can check the chunks tile the movie.
    chunk = {} if args.frames is None else {"frame_range": [start, stop], "movie_frames": int(image.shape[0])}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # Both outputs are written a chunk of frames at a time: memory stays flat with the movie.
        sink = None
        if args.probability:
            units = {k: ds.attrs[k] for k in ("pixel_size", "pixel_unit", "frame_interval") if k in ds.attrs}
            sink = stack.enter_context(ProbabilityStore(args.probability, dict(units, **prov, **chunk)))
        table = stack.enter_context(DetectionStore(args.output, DETECTION_COLUMNS, empty_detections()))
        segment_movie(frames, settings, model=model, model_config=config, device=device,
                      probability_sink=sink, detections_sink=table, progress=True, first_frame=start)
        seconds = time.perf_counter() - t0
        table.finish(dict(prov, method=settings["method"], frames=int(n), seconds=seconds,
                          class_names=(config or {}).get("class_names", ["particle"]), **chunk))
    count = table.rows
    log.info("%d detections in %d frames (%.1f per frame) in %.1f s (%.1f frames/s) with %s",
             count, n, count / max(n, 1), seconds, n / max(seconds, 1e-9), settings["method"])
    return 0


def configure_gather(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="detections table to write (.parquet)")
    parser.add_argument("--parts", nargs="+", required=True,
                        help="the chunks' detections tables (segment --frames), together covering every frame once")
    parser.add_argument("--probability", help="also join the chunks' probability maps into this Zarr store")
    parser.add_argument("--probability-parts", nargs="+", default=[],
                        help="the chunks' probability maps (Zarr), one per --parts table")


def run_gather(args: argparse.Namespace) -> int:
    from .store import gather_detections, gather_probability

    if bool(args.probability) != bool(args.probability_parts):
        raise InputError("--probability and --probability-parts go together (the joined map and its parts)")
    start = time.perf_counter()
    chunks = gather_detections(args.parts, args.output)
    if args.probability:
        gather_probability(args.probability_parts, args.probability, chunks)
    log.info("joined %d chunks (%s) into %s in %.1f s", len(chunks),
             ", ".join(f"{a}-{b - 1}" for a, b in chunks), args.output, time.perf_counter() - start)
    return 0


COMMANDS = {
    "train-segmenter": (configure_train, run_train),
    "segment": (configure_segment, run_segment),
    "segment-gather": (configure_gather, run_gather),
}

"""``rvae-tools figures``: draw every figure of one movie from the stage outputs present.

Each stage has a module in :mod:`rvae_tools.plots` exporting ``FIGURES = {stem: caption}``
and ``draw(movie_dir, figures_dir, formats=..., dpi=...)``. This command imports those
modules (a stage whose module is not installed is skipped) and calls each ``draw`` whose
inputs exist under ``results/{movie}``; missing inputs are logged, not fatal, so the figures
of a partial run can still be drawn. PNG is always written: the Snakemake report shows it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from .config import add_settings_arguments, settings_from_args
from .errors import InputError

log = logging.getLogger(__name__)

#: stage -> (module under rvae_tools.plots, inputs under results/{movie} when the module does
#: not declare ``INPUTS`` itself), in pipeline order.
STAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "segmentation": ("segmentation", ("movie.zarr", "detections.parquet")),
    "tracking": ("tracking", ("tracks.parquet", "drift.parquet", "trajectories.parquet", "msd.parquet")),
    "rvae": ("rvae", ("patches.zarr", "latents.zarr")),
    "dynamics": ("dynamics", ("latents.zarr", "dynamics.zarr")),
}


def stage_module(stage: str) -> ModuleType | None:
    """The plots module of a stage, or None when it is not (yet) part of the package."""
    name = f"rvae_tools.plots.{STAGES[stage][0]}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def stage_inputs(stage: str, module: ModuleType | None = None) -> tuple[str, ...]:
    """Files under ``results/{movie}`` a stage's figures are drawn from."""
    module = module or stage_module(stage)
    return tuple(getattr(module, "INPUTS", STAGES[stage][1]))


def figure_stems() -> dict[str, dict[str, str]]:
    """stage -> {stem: caption} of every stage whose plots module is installed (pipeline order)."""
    out = {}
    for stage in STAGES:
        module = stage_module(stage)
        if module is not None:
            out[stage] = dict(module.FIGURES)
    return out


def write_captions(directory: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``<stem>.rst`` report captions from the modules' ``FIGURES`` (existing files kept)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, figures in figure_stems().items():
        for stem, caption in figures.items():
            path = directory / f"{stem}.rst"
            if path.exists() and not overwrite:
                continue
            path.write_text(f"{caption}\n\nMovie ``{{{{ snakemake.wildcards.movie }}}}``, stage *{stage}*.\n")
            written.append(path)
    return written


def draw_all(movie_dir: str | Path, figures_dir: str | Path | None = None, *, formats=("png", "svg"),
             dpi: int = 150, options: dict[str, Any] | None = None) -> list[Path]:
    """Draw the figures of every stage whose inputs exist.

    Parameters
    ----------
    movie_dir : path
        ``results/{movie}``.
    figures_dir : path, optional
        Output folder (default ``movie_dir/figures``).
    formats : sequence of str
        File formats; PNG is added when missing.
    dpi : int
        Raster resolution.
    options : dict, optional
        Extra keyword arguments, passed to a stage's ``draw`` when it accepts them.

    Returns
    -------
    list of Path
        Every file written.
    """
    movie_dir = Path(movie_dir)
    figures_dir = Path(figures_dir) if figures_dir is not None else movie_dir / "figures"
    formats = ["png"] + [f for f in formats if f != "png"]
    options = options or {}
    written: list[Path] = []
    for stage in STAGES:
        module = stage_module(stage)
        if module is None:
            log.info("%s: no figures module (rvae_tools.plots.%s) installed; skipped", stage, STAGES[stage][0])
            continue
        missing = [name for name in stage_inputs(stage, module) if not (movie_dir / name).exists()]
        if missing:
            log.warning("%s: figures skipped, missing input(s) %s under %s", stage, ", ".join(missing), movie_dir)
            continue
        accepted = inspect.signature(module.draw).parameters
        kwargs = {k: v for k, v in options.items() if k in accepted}
        start = time.perf_counter()
        try:
            paths = module.draw(movie_dir, figures_dir, formats=tuple(formats), dpi=dpi, **kwargs)
        except InputError as exc:
            # One stage's unusable input must not cost the figures of the others; the workflow
            # still fails on the figure files it declared and did not get.
            log.warning("%s: figures skipped: %s", stage, exc)
            continue
        log.info("%s: %d figure file(s) in %.1f s", stage, len(paths), time.perf_counter() - start)
        written += list(paths)
    return written


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("movie_dir", help="results/{movie}: the folder holding the stage outputs")
    parser.add_argument("-o", "--output", help="folder for the figures (default: MOVIE_DIR/figures)")
    parser.add_argument("--model", metavar="MODEL.pt",
                        help="the model the movie was encoded with (needed for the rVAE figures)")
    parser.add_argument("--write-captions", metavar="DIR",
                        help="also write <stem>.rst report captions for every known figure into DIR (existing kept)")
    add_settings_arguments(parser, "figures")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, "figures")
    if args.write_captions:
        for path in write_captions(args.write_captions):
            log.info("wrote caption %s", path)
    if not Path(args.movie_dir).is_dir():
        raise InputError(f"{args.movie_dir}: movie results folder not found")
    written = draw_all(args.movie_dir, args.output, formats=settings["formats"], dpi=int(settings["dpi"]),
                       options={"trajectories": settings["trajectories"], "max_points": settings["max_points"],
                                "max_windows": settings["max_windows"],
                                "seed": settings["seed"], "model_path": args.model})
    if not written:
        raise InputError(f"{args.movie_dir}: no stage output found to draw figures from "
                         f"(expected e.g. latents.zarr and dynamics.zarr)")
    log.info("wrote %d figure file(s) under %s", len(written), args.output or Path(args.movie_dir) / "figures")
    return 0


COMMANDS = {"figures": (configure, run)}

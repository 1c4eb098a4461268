"""The ``rvae-tools`` command line: one subcommand per stage.

Each stage module defines ``COMMANDS = {name: (configure_parser, run)}``. The module is
imported only when its command is called, so ``rvae-tools --help`` stays fast and only the
stages that need torch import it.

Exit codes: 0 success, 1 unexpected failure, 2 bad input or config, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import InputError

#: command -> (module, one-line summary), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate-config": ("rvae_tools.config_cli", "check a config file against the schema"),
    "simulate": ("rvae_tools.simulate", "simulate a movie of particles assembling, with ground truth"),
    "ingest": ("rvae_tools.ingest", "read a movie (TIFF, image folder, npy/npz, video, Zarr) into movie.zarr"),
    "inspect": ("rvae_tools.inspect", "measure a movie's particles (polarity, size, density, SNR, drift) and suggest settings"),
    "train-segmenter": ("rvae_tools.segment", "train the U-Net segmenter (simulated frames, annotations or pseudo-labels)"),
    "segment": ("rvae_tools.segment", "detect particles in every frame -> detections.parquet"),
    "segment-gather": ("rvae_tools.segment", "join frame chunks of segment --frames -> detections.parquet"),
    "track": ("rvae_tools.track", "link detections into trajectories -> tracks.parquet"),
    "windows": ("rvae_tools.windows", "cut a window around every tracked detection -> patches.zarr"),
    "checkpoint-folder": ("rvae_tools.train", "create the rVAE trainer's checkpoint folder (a workflow output)"),
    "train": ("rvae_tools.train", "train the rotationally invariant VAE on windows"),
    "encode": ("rvae_tools.encode", "encode every window -> per-trajectory latents.zarr"),
    "classify": ("rvae_tools.classify", "class of every window from a model with classes -> classes.parquet"),
    "dynamics": ("rvae_tools.dynamics", "ensemble dynamics, order parameters, ordering transition -> dynamics.zarr"),
    "figures": ("rvae_tools.figures", "draw the figures of one movie"),
    "explorer": ("rvae_tools.explorer", "interactive latent explorer of one movie -> explorer.html"),
    "export-napari": ("rvae_tools.napari_export", "write a movie's detections, tracks and orientations as napari layers (CSV)"),
    "provenance": ("rvae_tools.provenance_cli", "print the provenance attributes of a store"),
}

EXIT_OK, EXIT_FAILURE, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _top_parser() -> argparse.ArgumentParser:
    lines = [f"  {name:<16} {summary}" for name, (_, summary) in COMMANDS.items()]
    parser = argparse.ArgumentParser(
        prog="rvae-tools",
        description="Rotationally invariant particle dynamics for microscopy movies of self-assembly.",
        epilog="commands:\n" + "\n".join(lines) + "\n\nRun 'rvae-tools COMMAND --help' for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"rvae-tools {__version__}")
    parser.add_argument("command", nargs="?", help="the stage to run (see below)")
    return parser


def build_command_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser of one command and its run function."""
    module_name, summary = COMMANDS[command]
    module = importlib.import_module(module_name)
    configure, run = module.COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"rvae-tools {command}", description=summary)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    configure(parser)
    return parser, run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rvae-tools`` executable."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv)  # handles --help / --version and exits
        top.print_help()
        return EXIT_INPUT
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top.print_usage(sys.stderr)
        print(f"rvae-tools: error: unknown command {command!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_INPUT
    parser, run = build_command_parser(command)
    args = parser.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(run(args) or 0)
    except InputError as exc:
        print(f"rvae-tools {command}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"rvae-tools {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `rvae-tools provenance ... | head`): not an error of ours.
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

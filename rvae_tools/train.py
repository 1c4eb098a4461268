"""``rvae-tools train``: train the rotationally invariant VAE (or a baseline) on windows.

Writes the model checkpoint, ``history.csv`` next to it and per-epoch checkpoints in the
folder ``<model stem>.checkpoints/<fingerprint>/`` beside it; running the same command again
after an interruption resumes from the newest checkpoint, but only when the fingerprint (the
windows' values, every training setting, the versions) is the same: any change trains afresh
and the log says what changed (see :mod:`rvae_tools.rvae.trainer`).

``rvae-tools checkpoint-folder DIR`` creates an empty checkpoint folder. The workflow makes the
folder the output of its own rule (``train_checkpoints``) and an input of ``train``, because
Snakemake deletes a job's outputs before it runs it: as an output of ``train`` the epoch
checkpoints would be gone exactly when a killed training is rerun. As an output of its own
rule, ``--delete-all-output`` and ``--forcerun train_checkpoints`` (or ``--forceall``) remove it
and so start a fresh training.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .config import add_settings_arguments, settings_from_args
from .errors import InputError

log = logging.getLogger(__name__)


def checkpoint_dir_for(model_path: str | Path) -> Path:
    """The folder of per-epoch checkpoints that belongs to ``model_path``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + ".checkpoints")


def history_path_for(model_path: str | Path) -> Path:
    """The training history CSV written next to ``model_path``."""
    return Path(model_path).with_name("history.csv")


def train(patches: list[str | Path], output: str | Path, settings: dict, *, device: str = "auto",
          progress: bool = True, resume: bool = True, labels: str | Path | None = None,
          movies: list[str] | None = None, checkpoints: str | Path | None = None):
    """Train on the windows of ``patches`` (patches.zarr stores) and save the model at ``output``.

    ``labels`` (a CSV/Parquet labels file, see :mod:`rvae_tools.labels`) trains the class models
    (``rvae.model`` ssrvae, ssvae; jrvae takes none); ``movies`` names the stores in the labels'
    movie column (default: each store's folder name); ``checkpoints``: the per-epoch checkpoint
    folder (default :func:`checkpoint_dir_for`). Returns the trained model; its ``checksum`` is
    the SHA-256 of ``output``.
    """
    from .rvae import build_model
    from .rvae.data import WindowSource
    from .rvae.semisupervised import CLASS_MODELS, UNSUPERVISED_MODELS

    if not patches:
        raise InputError("no patches.zarr store was given; expected at least one")
    if movies is not None and len(movies) != len(patches):
        raise InputError(f"--labels-movie: {len(movies)} movie name(s) for {len(patches)} patches store(s); expected one per store")
    source = WindowSource([str(p) for p in patches], memory_mb=float(settings["memory_mb"]))
    fit_labels, names = None, None
    if settings["model"] in UNSUPERVISED_MODELS:
        if labels is not None:
            raise InputError(f"{labels}: rvae.model {settings['model']} finds its classes without labels; expected "
                             "no labels file (rvae.model ssrvae learns from labels)")
    elif settings["model"] in CLASS_MODELS and labels is not None:
        from .labels import read_labels, store_index, window_labels

        stores = [store_index(p, m) for p, m in zip(patches, movies or [None] * len(patches))]
        fit_labels, names = window_labels(read_labels(labels), stores, source=str(labels), classes=settings["classes"])
        settings = {**settings, "classes": settings["classes"] or len(names)}
    elif settings["model"] in CLASS_MODELS:
        raise InputError(f"rvae.model {settings['model']} learns classes from labelled windows; expected a labels "
                         "file (--labels, or labels: in the movie's config entry)")
    elif labels is not None:
        log.warning("%s: rvae.model %s does not use labels; they are ignored", labels, settings["model"])
    model = build_model(settings, source.window_size)
    if names is not None:
        model.class_names = names
    output = Path(output)
    extra = {"labels": fit_labels} if settings["model"] in CLASS_MODELS else {}
    folder = Path(checkpoints) if checkpoints is not None else checkpoint_dir_for(output)
    model.fit(source, checkpoint_dir=folder, resume=resume, device=device,
              progress=progress, history_path=history_path_for(output), **extra)
    model.save(output)
    log.info("wrote %s (sha256 %s)", output, model.checksum)
    return model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patches", nargs="+", help="patches.zarr store(s) of the windows stage (one model over all)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.pt", help="model checkpoint to write")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    parser.add_argument("--checkpoints", metavar="DIR",
                        help="per-epoch checkpoint folder (default: <model stem>.checkpoints beside the model)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even when checkpoints exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--labels", default=None, metavar="LABELS",
                        help="CSV/Parquet of (movie, particle, frame, class) or (movie, particle, class) "
                             "for rvae.model ssrvae / ssvae")
    parser.add_argument("--labels-movie", action="append", default=None, metavar="NAME",
                        help="movie name of each patches store in the labels' movie column, in order "
                             "(default: the store's folder name)")
    add_settings_arguments(parser, "rvae")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, "rvae")
    train(args.patches, args.output, settings, device=args.device, progress=not args.no_progress,
          resume=not args.no_resume, labels=args.labels, movies=args.labels_movie,
          checkpoints=args.checkpoints)
    return 0


_FOLDER_NOTE = """Per-epoch training checkpoints of the model beside this folder, one sub-folder per
training fingerprint (fingerprint.json inside says what it covers). rvae-tools train resumes
from them only when the fingerprint matches. Delete this folder to train from scratch.
"""


def checkpoint_folder(path: str | Path) -> Path:
    """Create the (empty) checkpoint folder ``path`` with a note on what it holds."""
    from .io import atomic_output

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a folder; expected a checkpoint folder")
    path.mkdir(parents=True, exist_ok=True)
    with atomic_output(path / "README.txt") as tmp:
        Path(tmp).write_text(_FOLDER_NOTE)
    log.info("checkpoint folder %s ready", path)
    return path


def configure_folder(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="the checkpoint folder to create, e.g. results/models/rvae/pooled/model.checkpoints")


def run_folder(args: argparse.Namespace) -> int:
    checkpoint_folder(args.folder)
    return 0


COMMANDS = {"train": (configure, run), "checkpoint-folder": (configure_folder, run_folder)}

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
          movies: list[str] | None = None, checkpoints: str | Path | None = None,
          movie_labels: list[tuple[str, str | Path]] | None = None):
    """Train on the windows of ``patches`` (patches.zarr stores) and save the model at ``output``.

    ``labels`` (a CSV/Parquet labels file, see :mod:`rvae_tools.labels`, or a folder of labelled
    window images, one subfolder per class) trains the class models (``rvae.model`` ssrvae,
    ssvae; jrvae takes none); ``movie_labels``: (movie, labels file or folder) pairs, the labels
    of one movie each (a file's rows belong to that movie), as the workflow passes a movie's
    ``labels`` entry; every source's classes are pooled. ``movies`` names the stores in the
    labels' movie column (default: each store's folder name); ``checkpoints``: the per-epoch
    checkpoint folder (default :func:`checkpoint_dir_for`). Returns the trained model; its
    ``checksum`` is the SHA-256 of ``output``.
    """
    from .rvae import build_model
    from .rvae.data import WindowSource
    from .rvae.semisupervised import CLASS_MODELS, UNSUPERVISED_MODELS

    if not patches:
        raise InputError("no patches.zarr store was given; expected at least one")
    if movies is not None and len(movies) != len(patches):
        raise InputError(f"--labels-movie: {len(movies)} movie name(s) for {len(patches)} patches store(s); expected one per store")
    source = WindowSource([str(p) for p in patches], memory_mb=float(settings["memory_mb"]))
    specs = ([(None, labels)] if labels is not None else []) + [(m, p) for m, p in (movie_labels or [])]
    fit_labels, names = None, None
    if settings["model"] in UNSUPERVISED_MODELS:
        if specs:
            raise InputError(f"{specs[0][1]}: rvae.model {settings['model']} finds its classes without labels; expected "
                             "no labels file (rvae.model ssrvae learns from labels)")
    elif settings["model"] in CLASS_MODELS and specs:
        source, fit_labels, names = _labelled_windows(source, patches, movies, specs, settings["classes"])
        settings = {**settings, "classes": settings["classes"] or len(names)}
    elif settings["model"] in CLASS_MODELS:
        raise InputError(f"rvae.model {settings['model']} learns classes from labelled windows; expected a labels "
                         "file (--labels, or labels: in the movie's config entry)")
    elif specs:
        log.warning("%s: rvae.model %s does not use labels; they are ignored", specs[0][1], settings["model"])
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


def _labelled_windows(source, patches, movies, specs, classes):
    """The training windows (labelled example images appended) and the class index of each, with the class names.

    ``specs``: (movie or None, labels file or folder) pairs. Classes are pooled over every
    source (folder names are classes as text, so a table's classes are compared as text too
    when a folder is among the sources); a window labelled differently by two sources is an
    error naming both.
    """
    import numpy as np

    from .labels import read_label_images, read_labels, store_index, window_labels

    stores = [store_index(p, m) for p, m in zip(patches, movies or [None] * len(patches))]
    has_folder = any(Path(path).is_dir() for _, path in specs)
    tables, folders = [], []
    for movie, path in specs:
        if Path(path).is_dir():
            folders.append((path, *read_label_images(path, source.window_size, stores[0].attrs)))
            continue
        table = read_labels(path)
        if movie is not None:
            if movie not in [s.movie for s in stores]:
                raise InputError(f"{path}: labels of movie {movie!r}, which is not among the movies trained on "
                                 f"({', '.join(s.movie for s in stores)})")
            if "movie" in table.columns and (table["movie"] != movie).any():
                r = int(table.loc[table["movie"] != movie, "row"].iloc[0])
                raise InputError(f"{path}: row {r}: movie {table.loc[table['row'] == r, 'movie'].iloc[0]!r}, but this "
                                 f"file holds the labels of movie {movie!r}; expected {movie!r} or no movie column")
            table["movie"] = movie
        if has_folder:
            table["class"] = table["class"].astype(str)
        tables.append((path, table))
    seen = {v for _, t in tables for v in t["class"].tolist()} | {c for _, _, cs, _ in folders for c in cs}
    names = sorted(seen, key=lambda v: (isinstance(v, str), v))
    where = ", ".join(str(p) for _, p in specs)
    if classes is not None and len(names) != int(classes):
        raise InputError(f"{where}: the labels name {len(names)} classes ({', '.join(map(str, names))}) but "
                         f"rvae.classes is {classes}; expected {classes} classes, each with a labelled window "
                         f"(or set rvae.classes to {len(names)})")
    lab = np.full(len(source), -1, dtype=np.int64)
    origin = np.full(len(source), -1, dtype=np.int64)
    for k, (path, table) in enumerate(tables):
        found, _ = window_labels(table, stores, source=str(path), class_names=names)
        clash = (found >= 0) & (lab >= 0) & (found != lab)
        if clash.any():
            i = int(np.flatnonzero(clash)[0])
            raise InputError(f"{path}: labels window {i} {names[found[i]]!r} but {tables[origin[i]][0]} labels it "
                             f"{names[lab[i]]!r}; expected one class per window")
        origin = np.where(found >= 0, k, origin)
        lab = np.where(found >= 0, found, lab)
    index = {v: i for i, v in enumerate(names)}
    for path, images, image_classes, _ in folders:
        source = source.appended(images, str(path))
        lab = np.concatenate([lab, np.array([index[c] for c in image_classes], dtype=np.int64)])
        log.info("%s: %d labelled example windows of %d classes added to the training windows", path, len(images),
                 len(set(image_classes)))
    return source, lab, names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patches", nargs="+", help="patches.zarr store(s) of the windows stage (one model over all)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.pt", help="model checkpoint to write")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:N, mps or cpu")
    parser.add_argument("--checkpoints", metavar="DIR",
                        help="per-epoch checkpoint folder (default: <model stem>.checkpoints beside the model)")
    parser.add_argument("--no-resume", action="store_true", help="start afresh even when checkpoints exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--labels", default=None, metavar="LABELS",
                        help="CSV/Parquet of (movie, particle, frame, class) or (movie, particle, class), or a "
                             "folder of labelled window images (one subfolder per class), for rvae.model ssrvae / ssvae")
    parser.add_argument("--movie-labels", nargs=2, action="append", default=None, metavar=("MOVIE", "LABELS"),
                        help="the labels of one movie (a file of (particle, frame, class) or (particle, class) "
                             "rows, or a folder of labelled window images); repeat for several movies")
    parser.add_argument("--labels-movie", action="append", default=None, metavar="NAME",
                        help="movie name of each patches store in the labels' movie column, in order "
                             "(default: the store's folder name)")
    add_settings_arguments(parser, "rvae")


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, "rvae")
    train(args.patches, args.output, settings, device=args.device, progress=not args.no_progress,
          resume=not args.no_resume, labels=args.labels, movies=args.labels_movie,
          checkpoints=args.checkpoints, movie_labels=[tuple(p) for p in args.movie_labels or []])
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

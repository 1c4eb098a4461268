"""Train the U-Net segmenter of one movie from the ``segment`` settings."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import InputError
from .training_data import (
    annotation_training_data,
    pseudo_label_training_data,
    simulated_training_data,
)

log = logging.getLogger(__name__)


def train_segmenter(settings: dict[str, Any], *, sim_settings: dict[str, Any] | None = None,
                    movie: np.ndarray | None = None, device: Any = None, progress: bool = True):
    """Train a U-Net for the ``segment`` settings.

    Parameters
    ----------
    settings : dict
        Validated ``segment`` section.
    sim_settings : dict, optional
        Validated ``simulate`` section of a simulated movie; with ``train.source: simulate``
        the network is trained on a fresh simulation with these settings (another seed).
        Without it, ``simulate`` falls back to the ``segment.synthetic`` renderer.
    movie : ndarray (frame, y, x), optional
        The movie itself, needed for ``train.source: pseudo``.
    device : torch.device, optional (default: automatic choice)

    Returns
    -------
    model : UNet
    config : dict (checkpoint config)
    history : list of dict
    """
    from ..device import select_device
    from ..inspect import resolve_settings
    from . import synthetic
    from .train import train_unet
    from .unet import model_config, normalise

    settings, _ = resolve_settings("segment", settings)  # an 'auto' left by a direct caller: its fallback
    device = device or select_device("auto")
    train = settings["train"]
    seed = int(settings["seed"])
    source = train["source"]
    names = None
    if source == "simulate" and sim_settings is not None:
        images, truth, dims, names = simulated_training_data(sim_settings, train, seed + 7919)
        masks = synthetic.core_masks(truth, len(images), images.shape[1:], dims, train["core"])
    elif source in ("simulate", "synthetic"):
        if source == "simulate":
            log.warning("train.source: simulate, but this movie has no simulator settings (a user movie): training "
                        "on segment.synthetic frames (%g x %g px particles); train.source: pseudo trains on the "
                        "movie's own particles", settings["synthetic"]["length"], settings["synthetic"]["width"])
        images, _, truth = synthetic.render_frames(settings["synthetic"], train["frames"], seed + 7919)
        dims = {k: (sp["length"], sp["width"]) for k, sp in enumerate(synthetic.species_from_settings(settings["synthetic"]))}
        names = ["rod", "asymmetric"][: len(dims)]
        masks = synthetic.core_masks(truth, len(images), images.shape[1:], dims, train["core"])
    elif source == "annotations":
        if not train.get("annotations"):
            raise InputError("segment.train.annotations: required with train.source: annotations "
                             "(a .npz or .zarr with 'image' and 'mask' or centres)")
        images, masks = annotation_training_data(train)
    elif source == "pseudo":
        if movie is None:
            raise InputError("segment.train.source: pseudo needs the movie (train-segmenter --input movie.zarr)")
        images, masks = pseudo_label_training_data(movie, settings)
    else:  # the schema's enum makes this unreachable from the CLI
        raise InputError(f"segment.train.source: {source!r} is not one of simulate, synthetic, annotations, pseudo")

    found = int(masks.max()) if masks.size else 0
    classes = settings["classes"] if settings["classes"] is not None else max(found, 1)
    if source in ("simulate", "synthetic") and settings["classes"] == 1:
        masks = (masks > 0).astype(np.uint8)
    elif found > classes:
        raise InputError(f"segment.classes: {classes}, but the training masks hold {found} classes; "
                         f"set classes to {found} or 1 (all species as one class)")
    # The network always sees bright particles: simulated and synthetic frames have them,
    # frames of the user's movie (annotations, pseudo-labels) are inverted like the movie.
    invert = settings["invert"] if source in ("annotations", "pseudo") else False
    images = np.stack([normalise(frame, invert=invert)[0] for frame in images])
    if not (masks > 0).any():
        raise InputError("segment.train: the training frames hold no particles; check the training source settings")
    model, history = train_unet(
        images, masks, classes=classes, depth=settings["model"]["depth"], width=settings["model"]["width"],
        steps=train["steps"], batch_size=train["batch_size"], crop=train["crop"], lr=train["lr"],
        augment=train["augment"], seed=seed, device=device, progress=progress,
    )
    config = model_config(classes, 1, settings["model"]["depth"], settings["model"]["width"], invert=invert,
                          species=names if names and len(names) == classes else None)
    config["core"] = train["core"] if source in ("simulate", "synthetic", "pseudo") else None
    config["source"] = source
    return model, config, history

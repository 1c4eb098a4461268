"""Segmentation: find every particle in every frame -> ``detections.parquet``.

Two methods (``segment.method``):

``unet``
    A small U-Net (:mod:`.unet`) gives each pixel a probability of belonging to the *core*
    of a particle of each class (a shrunken copy of the footprint centred on the particle's
    reference point); blobs of the foreground probability become particles, centred at
    their probability-weighted centroids (:mod:`.postprocess`). The network is trained by
    ``rvae-tools train-segmenter`` on frames from the simulator (the movie's own simulator
    settings for a simulated movie, the ``segment.synthetic`` settings otherwise), on user
    annotations, or on pseudo-labels that ``trackpy.locate`` finds in the movie itself.
``locate``
    ``trackpy.locate`` (:mod:`.locate`), the classical baseline.

Frames without usable signal (all NaN, constant) or without particles give no rows and a
:class:`SegmentationWarning`, never an error.

Modules: :mod:`.detect` (``segment_movie``), :mod:`.fit` (``train_segmenter``),
:mod:`.training_data` (simulated frames, annotations, pseudo-labels), :mod:`.cli` (the
``segment`` and ``train-segmenter`` commands); the network in :mod:`.unet`, :mod:`.train`,
:mod:`.infer`, blobs to particles in :mod:`.postprocess`.
"""

from .cli import COMMANDS
from .detect import SegmentationWarning, segment_movie
from .fit import train_segmenter
from .training_data import (
    annotation_training_data,
    disc_masks,
    pseudo_label_training_data,
    simulated_training_data,
)

__all__ = [
    "COMMANDS",
    "SegmentationWarning",
    "annotation_training_data",
    "disc_masks",
    "pseudo_label_training_data",
    "segment_movie",
    "simulated_training_data",
    "train_segmenter",
]

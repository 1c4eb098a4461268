"""Tiled, batched U-Net inference: frames of any size in bounded memory."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..device import autocast
from .unet import UNet, normalise


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = max(tile - overlap, 1)
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def _ramp(n: int, overlap: int) -> np.ndarray:
    """Blending weight along one tile axis: rises over ``overlap/2`` px from each edge."""
    if overlap <= 0:
        return np.ones(n, np.float32)
    ramp = np.minimum(np.arange(n) + 0.5, n - np.arange(n) - 0.5) / (overlap / 2)
    return np.clip(ramp, 1e-3, 1.0).astype(np.float32)


def predict_frames(
    model: UNet,
    frames: Iterable[np.ndarray],
    *,
    invert: bool,
    device: torch.device,
    tile: int = 512,
    overlap: int = 32,
    batch_size: int = 4,
    progress: bool = False,
    total: int | None = None,
) -> Iterator[tuple[np.ndarray, bool]]:
    """Per-pixel class probabilities of every frame, in order.

    Parameters
    ----------
    model : UNet
        In eval mode, on ``device``.
    frames : iterable of ndarray (y, x)
        Raw frames (any size, NaNs allowed).
    invert : bool
        Particles darker than the background (as the model was trained).
    device : torch.device
    tile, overlap : int
        Frames larger than ``tile`` px are cut into overlapping tiles blended with linear
        ramps over the overlap (px); memory is bounded by ``batch_size`` tiles.
    batch_size : int
        Tiles per forward pass.
    progress : bool
        Show a progress bar on stderr.

    Yields
    ------
    prob : ndarray (classes + 1, y, x) float32
        Softmax probabilities (background first); all background for an unusable frame.
    usable : bool
        False for an all-NaN or constant frame.
    """
    from tqdm import tqdm

    multiple = model.multiple
    tile = max(multiple, int(math.ceil(tile / multiple) * multiple))
    overlap = min(overlap, tile // 2)
    n_out = model.head.out_channels
    bar = tqdm(total=total, desc="segment", unit="frame", file=sys.stderr, disable=not progress, mininterval=2.0)
    for frame in frames:
        image, usable = normalise(frame, invert=invert)
        h, w = image.shape
        if not usable:
            prob = np.zeros((n_out, h, w), np.float32)
            prob[0] = 1.0
            bar.update()
            yield prob, False
            continue
        # Reflect-pad so both sides are multiples of the network's stride and at least
        # one tile wide where the frame is smaller than a tile.
        ph = max(int(math.ceil(h / multiple) * multiple), h)
        pw = max(int(math.ceil(w / multiple) * multiple), w)
        padded = np.pad(image, ((0, ph - h), (0, pw - w)), mode="reflect" if min(h, w) > 1 else "edge")
        th, tw = min(tile, ph), min(tile, pw)
        ys, xs = _starts(ph, th, overlap), _starts(pw, tw, overlap)
        weight = np.outer(_ramp(th, overlap if len(ys) > 1 else 0), _ramp(tw, overlap if len(xs) > 1 else 0))
        acc = np.zeros((n_out, ph, pw), np.float32)
        norm = np.zeros((ph, pw), np.float32)
        origins = [(y0, x0) for y0 in ys for x0 in xs]
        for b in range(0, len(origins), batch_size):
            chunk = origins[b:b + batch_size]
            batch = np.stack([padded[y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk])[:, None]
            with torch.inference_mode(), autocast(device):
                logits = model(torch.from_numpy(batch).to(device))
                out = torch.softmax(logits.float(), dim=1).cpu().numpy()
            for (y0, x0), p in zip(chunk, out):
                acc[:, y0:y0 + th, x0:x0 + tw] += p * weight
                norm[y0:y0 + th, x0:x0 + tw] += weight
        prob = (acc / norm)[:, :h, :w]
        bar.update()
        yield prob, True
    bar.close()

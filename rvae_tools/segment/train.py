"""Training the U-Net on (image, mask) frames with augmentation.

Every step draws a batch of random crops; each crop is cut through one affine map
(random rotation, flip and scale jitter) so the geometry of image and mask stays exact, then
intensity augmentation is applied to the image only: contrast and gamma, a background
gradient, blur, Poisson and Gaussian noise, and scan-line jitter.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..device import autocast, grad_scaler
from .unet import UNet

log = logging.getLogger(__name__)


def augment_crop(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    crop: int,
    augment: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented crop of a normalised frame and its label mask.

    Parameters
    ----------
    image : ndarray (y, x) float32
        Normalised frame (background 0, particles about 1).
    mask : ndarray (y, x) uint8
        Labels (0 background, k+1 class k).
    rng : numpy.random.Generator
    crop : int
        Output side in pixels.
    augment : dict
        The ``segment.train.augment`` settings (all amplitudes; 0 switches one off).

    Returns
    -------
    image, mask : ndarray (crop, crop)
    """
    h, w = image.shape
    angle = rng.uniform(0, 2 * np.pi) if augment["rotate"] else 0.0
    scale = float(np.exp(rng.uniform(-1, 1) * math.log1p(augment["scale"])))
    flip = -1.0 if (augment["flip"] and rng.random() < 0.5) else 1.0
    c, s = math.cos(angle), math.sin(angle)
    # Output pixel (i, j) samples input (row, col) = matrix @ (i, j) + offset.
    matrix = np.array([[c, -s], [s, c]]) @ np.diag([1.0, flip]) / scale
    centre_out = np.array([crop / 2 - 0.5, crop / 2 - 0.5])
    centre_in = np.array([rng.uniform(0, h), rng.uniform(0, w)])
    offset = centre_in - matrix @ centre_out
    img = ndimage.affine_transform(image, matrix, offset, output_shape=(crop, crop), order=1, mode="reflect")
    lab = ndimage.affine_transform(mask, matrix, offset, output_shape=(crop, crop), order=0, mode="reflect")

    if augment["contrast"] > 0:
        img = img * float(np.exp(rng.uniform(-1, 1) * math.log1p(augment["contrast"])))
    if augment["gamma"] > 0:
        gamma = float(np.exp(rng.uniform(-1, 1) * math.log1p(augment["gamma"])))
        img = np.sign(img) * np.abs(img) ** gamma
    if augment["gradient"] > 0:
        yy, xx = np.mgrid[0:crop, 0:crop] / crop - 0.5
        theta = rng.uniform(0, 2 * np.pi)
        img = img + rng.uniform(-1, 1) * augment["gradient"] * (math.cos(theta) * xx + math.sin(theta) * yy) * 2
        img = img + rng.uniform(-1, 1) * augment["gradient"] * 0.5
    if augment["blur"] > 0:
        sigma = rng.uniform(0, augment["blur"])
        if sigma > 0.2:
            img = ndimage.gaussian_filter(img, sigma)
    if augment["poisson"] > 0 and rng.random() < 0.5:
        photons = float(np.exp(rng.uniform(math.log(augment["poisson"]), math.log(augment["poisson"] * 20))))
        base = img.min()
        img = rng.poisson((img - base) * photons) / photons + base
    if augment["noise"] > 0:
        img = img + rng.normal(0.0, rng.uniform(0, augment["noise"]), size=img.shape)
    if augment["scan_lines"] > 0 and rng.random() < 0.5:
        amp = rng.uniform(0, augment["scan_lines"])
        shifts = rng.normal(0.0, amp, size=crop)
        rows = np.arange(crop, dtype=float)[None, :] - shifts[:, None]
        img = np.stack([np.interp(r, np.arange(crop), row) for r, row in zip(rows, img)])
        img = img + rng.normal(0.0, amp * 0.2, size=(crop, 1))
    return img.astype(np.float32), lab.astype(np.int64)


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice of the foreground (any particle class)."""
    prob = torch.softmax(logits.float(), dim=1)
    fg = 1.0 - prob[:, 0]
    tgt = (target > 0).float()
    inter = (fg * tgt).sum()
    return 1.0 - (2 * inter + 1.0) / (fg.sum() + tgt.sum() + 1.0)


def train_unet(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    classes: int,
    depth: int,
    width: int,
    steps: int,
    batch_size: int,
    crop: int,
    lr: float,
    augment: dict[str, Any],
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[UNet, list[dict[str, float]]]:
    """Train a U-Net on normalised frames and label masks.

    Parameters
    ----------
    images : ndarray (frame, y, x) float32
        Normalised frames (see :func:`rvae_tools.segment.unet.normalise`).
    masks : ndarray (frame, y, x) integer
        0 background, k+1 inside a particle of class k (k < ``classes``).
    classes, depth, width : int
        Network size (see :class:`UNet`).
    steps, batch_size, crop : int
        Optimiser steps, crops per step, crop side (px; rounded up to a multiple of 2**depth).
    lr : float
        Peak learning rate of AdamW (one-cycle schedule).
    augment : dict
        ``segment.train.augment`` settings.
    seed : int
        Seeds the crop sampler and the weight initialisation (CPU runs are deterministic).
    device : torch.device

    Returns
    -------
    model : UNet (eval mode, on ``device``)
    history : list of dict (step, loss, seconds)
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet(classes=classes, channels=1, depth=depth, width=width).to(device)
    multiple = model.multiple
    crop = int(math.ceil(crop / multiple) * multiple)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    scaler = grad_scaler(device)
    ce = nn.CrossEntropyLoss()
    history: list[dict[str, float]] = []
    # Frames are sampled in proportion to how much foreground they hold, so frames
    # without particles still appear (they teach the background) but do not dominate.
    fg_frac = np.array([(m > 0).mean() for m in masks]) + 0.02
    weights = fg_frac / fg_frac.sum()
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc="train segmenter", file=sys.stderr, disable=not progress, mininterval=2.0)
    for step in bar:
        xs, ys = [], []
        for _ in range(batch_size):
            i = int(rng.choice(len(images), p=weights))
            x, y = augment_crop(images[i], masks[i], rng, crop, augment)
            xs.append(x)
            ys.append(y)
        xb = torch.from_numpy(np.stack(xs)[:, None]).to(device)
        yb = torch.from_numpy(np.stack(ys)).to(device)
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            logits = model(xb)
            loss = ce(logits.float(), yb) + _dice_loss(logits, yb)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        value = float(loss.detach())
        history.append({"step": step + 1, "loss": value, "seconds": time.perf_counter() - start})
        if step % 20 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    return model, history

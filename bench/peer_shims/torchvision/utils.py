"""``make_grid``: tile a batch of images (B, C, H, W) into one image, as torchvision does."""

from __future__ import annotations

import math

import torch


def make_grid(tensor, nrow: int = 8, padding: int = 2, normalize: bool = False, value_range=None,
              scale_each: bool = False, pad_value: float = 0.0, **kwargs) -> torch.Tensor:
    if isinstance(tensor, (list, tuple)):
        tensor = torch.stack(list(tensor))
    if tensor.dim() == 2:
        tensor = tensor[None, None]
    elif tensor.dim() == 3:
        tensor = tensor[:, None] if tensor.shape[0] not in (1, 3) else tensor[None]
    if tensor.shape[1] == 1:
        tensor = tensor.repeat(1, 3, 1, 1)
    tensor = tensor.clone().float()
    if normalize:
        lo, hi = value_range if value_range is not None else (float(tensor.min()), float(tensor.max()))
        tensor = (tensor.clamp(lo, hi) - lo) / max(hi - lo, 1e-5)
    b, c, h, w = tensor.shape
    ncol = min(nrow, b)
    nrows = math.ceil(b / ncol)
    grid = torch.full((c, h * nrows + padding * (nrows + 1), w * ncol + padding * (ncol + 1)), float(pad_value))
    for i in range(b):
        r, q = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y0:y0 + h, x0:x0 + w] = tensor[i]
    return grid

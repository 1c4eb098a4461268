"""Compute device selection, mixed precision and data-loader settings shared by the networks."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from .errors import InputError

log = logging.getLogger(__name__)


def select_device(preference: str = "auto") -> torch.device:
    """Pick the device to run on.

    Parameters
    ----------
    preference : {"auto", "cuda", "mps", "cpu"} or a torch device string such as "cuda:1"
        ``"auto"`` takes CUDA when available, then Apple MPS, then the CPU. An explicit
        device that is not available is an error rather than a silent fallback, so a cluster
        job that was promised a GPU fails loudly when it did not get one.
    """
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device: '{preference}' was requested but no CUDA device is available")
    if pref == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError("device: 'mps' was requested but Apple MPS is not available")
    try:
        return torch.device(pref)
    except RuntimeError:
        raise InputError(f"device: '{preference}' is not a device; expected auto, cuda, cuda:N, mps or cpu") from None


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision used on ``device`` (bf16 where supported, else fp16), or None on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes on GPU; a no-op on CPU (keeps CPU runs exact)."""
    dtype = autocast_dtype(device)
    if not enabled or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for fp16 autocast (bf16 and fp32 need none)."""
    active = enabled and autocast_dtype(device) == torch.float16 and device.type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=active)


def loader_kwargs(device: torch.device, num_workers: int = 0) -> dict[str, Any]:
    """DataLoader keyword arguments: pinned host memory when copying to a CUDA device."""
    kwargs: dict[str, Any] = {"pin_memory": device.type == "cuda", "num_workers": num_workers}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
    return kwargs


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device``; asynchronous when the source is pinned host memory."""
    return tensor.to(device, non_blocking=tensor.is_pinned() if device.type == "cuda" else False)

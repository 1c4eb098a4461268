"""The U-Net segmenter: architecture, intensity normalisation and checkpoints.

The network maps a normalised single-channel frame to per-pixel logits over
``1 + classes`` labels (background first). Depth (number of down-sampling steps) and width
(channels of the first level, doubled at every level) are configurable; the defaults are
small so the demo trains on a laptop CPU in a minute or two.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError

#: Checkpoint format version; bumped when the saved config changes meaning.
CHECKPOINT_VERSION = 1


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net with ``depth`` pooling levels and ``width * 2**level`` channels per level.

    Parameters
    ----------
    classes : int
        Particle classes; the output has ``classes + 1`` channels (background first).
    channels : int
        Input channels (1 for grey-scale microscopy).
    depth : int
        Down-sampling steps; inputs must be divisible by ``2**depth`` (see :meth:`multiple`).
    width : int
        Feature channels of the first level.
    """

    def __init__(self, classes: int = 1, channels: int = 1, depth: int = 3, width: int = 16):
        super().__init__()
        self.depth = depth
        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_Block(channels, widths[0])] + [_Block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([_Block(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(widths[0], classes + 1, 1)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def normalise(frame: np.ndarray, *, invert: bool = False, low: float = 1.0, high: float = 99.8) -> tuple[np.ndarray, bool]:
    """Scale a frame so the background median is 0 and bright particles are near 1.

    Parameters
    ----------
    frame : ndarray (y, x)
        Raw intensities (any unit).
    invert : bool
        Particles are darker than the background.
    low, high : float
        Percentiles: ``(frame - median) / (p_high - median)``; ``low`` is used only to detect
        a frame without contrast.

    Returns
    -------
    normalised : ndarray float32
        NaNs replaced by the median.
    usable : bool
        False for an all-NaN or constant frame (nothing can be detected in it).
    """
    frame = np.asarray(frame, np.float32)
    if invert:
        frame = -frame
    finite = np.isfinite(frame)
    if not finite.any():
        return np.zeros_like(frame, np.float32), False
    values = frame[finite]
    med = float(np.median(values))
    lo, hi = np.percentile(values, [low, high])
    span = float(hi - med)
    if not np.isfinite(span) or span <= 1e-12 * max(1.0, abs(med)) or hi - lo <= 0:
        return np.zeros_like(frame, np.float32), False
    out = np.where(finite, (frame - med) / span, 0.0).astype(np.float32)
    return out, True


def model_config(classes: int, channels: int, depth: int, width: int, *, invert: bool,
                 species: list[str] | None = None) -> dict[str, Any]:
    """The JSON-able description stored in a checkpoint (everything needed to rebuild and apply it)."""
    return {
        "version": CHECKPOINT_VERSION,
        "architecture": "unet",
        "classes": int(classes),
        "channels": int(channels),
        "depth": int(depth),
        "width": int(width),
        "class_names": list(species) if species else [f"class{k}" for k in range(classes)],
        # Frames are scaled as (frame - median) / (p99.8 - median), inverted first when the
        # particles are dark; `invert` records whether the training frames were inverted.
        "normalisation": {"method": "median-percentile", "low": 1.0, "high": 99.8, "invert": bool(invert)},
    }


def build(config: dict[str, Any]) -> UNet:
    """A U-Net for a checkpoint ``config``."""
    return UNet(classes=config["classes"], channels=config["channels"], depth=config["depth"], width=config["width"])


def save_checkpoint(path: str | Path, model: UNet, config: dict[str, Any], provenance: dict[str, Any],
                    history: list[dict[str, float]] | None = None) -> str:
    """Write a checkpoint atomically and return its SHA-256."""
    from ..io import atomic_output
    from ..provenance import file_sha256

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        # Wall-clock timings stay in the history CSV: in the checkpoint they would change its
        # checksum between otherwise identical reruns.
        steps = [{k: v for k, v in row.items() if k != "seconds"} for row in history or []]
        torch.save({"state_dict": state, "config": config, "provenance": provenance,
                    "history": steps}, tmp)
    return file_sha256(path)


def load_checkpoint(path: str | Path, *, classes: int | None = None, channels: int = 1) -> tuple[UNet, dict[str, Any], str]:
    """Load a checkpoint without unpickling arbitrary objects.

    Parameters
    ----------
    path : path-like
    classes : int, optional
        Particle classes the caller expects; a checkpoint for another number is an error.
    channels : int
        Input channels of the movie.

    Returns
    -------
    model : UNet (in eval mode, on the CPU)
    config : dict
    sha256 : str

    Raises
    ------
    InputError
        Missing, corrupt or incompatible checkpoint.
    """
    from ..provenance import file_sha256

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: segmenter checkpoint not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
        raise InputError(f"{path}: not a readable segmenter checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob or "config" not in blob:
        raise InputError(f"{path}: not a segmenter checkpoint; expected keys 'state_dict' and 'config'")
    config = blob["config"]
    needed = ("architecture", "classes", "channels", "depth", "width", "normalisation")
    missing = [k for k in needed if k not in config]
    if config.get("architecture", "unet") != "unet" or missing:
        raise InputError(f"{path}: checkpoint config lacks {', '.join(missing) or 'a unet architecture'}; "
                         f"expected a U-Net segmenter checkpoint with {', '.join(needed)}")
    if classes is not None and int(config["classes"]) != int(classes):
        raise InputError(f"{path}: checkpoint was trained for classes={config['classes']}, "
                         f"but segment.classes is {classes}; retrain or set classes: {config['classes']}")
    if int(config["channels"]) != int(channels):
        raise InputError(f"{path}: checkpoint was trained for channels={config['channels']}, "
                         f"but the movie has {channels} channel(s)")
    model = build(config)
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: checkpoint weights do not fit its config "
                         f"(depth={config['depth']}, width={config['width']}): {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, config, file_sha256(path)


def state_checksum(model: nn.Module) -> str:
    """SHA-256 of a model's weights (for provenance when no file exists)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()

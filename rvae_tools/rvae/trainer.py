"""Training loop: device, mixed precision, batches from memory or Zarr, checkpoints and resume.

Determinism: the train/validation split comes from the seed; every epoch reseeds torch and
draws its batch order from ``(seed, epoch)``, so an epoch's result depends only on the weights
and optimiser state it starts from. A checkpoint after every epoch holds those (plus the
scheduler, early-stopping state, split and history), hence an interrupted run resumed from its
last checkpoint ends with the same weights as one that was never interrupted (on the CPU; GPU
kernels are not bit-reproducible).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..errors import InputError
from .data import WindowSource

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^epoch-(\d{4,})\.pt$")
KEEP_CHECKPOINTS = 3


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random split of ``n`` windows into train and validation indices (sorted)."""
    order = np.random.default_rng([int(seed), 7919]).permutation(n)
    n_train = min(n, max(1, round(train_fraction * n)))
    return np.sort(order[:n_train]), np.sort(order[n_train:])


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([int(seed), int(epoch)]).integers(0, 2 ** 62))


def _make_scheduler(kind: str, optimizer, epochs: int, patience: int):
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=max(1, patience // 2))
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=0.0)
    return None


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for p in folder.glob("epoch-*.pt"):
        m = _CKPT.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def fit(model, windows, *, epochs: int | None = None, batch_size: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, device: str = "auto",
        progress: bool = True, history_path: str | os.PathLike | None = None, callback=None) -> pd.DataFrame:
    """Train ``model`` in place.

    Parameters
    ----------
    model : RVAE
    windows : ndarray (n, wy, wx), list of arrays, or patches.zarr path(s)
    epochs, batch_size : int, optional
        Override the settings' ``epochs`` / ``batch_size``.
    checkpoint_dir : path, optional
        A checkpoint ``epoch-NNNN.pt`` is written here after every epoch (the last three are
        kept); with ``resume`` the newest one is continued from.
    device : str
        "auto", "cpu", "cuda", "cuda:N" or "mps".
    progress : bool
        Show a progress bar (stderr).
    history_path : path, optional
        CSV rewritten after every epoch.
    callback : callable(epoch, row) -> None, optional
        Called after every epoch's checkpoint (raising stops training there).

    Returns
    -------
    pandas.DataFrame
        One row per epoch: losses (per window, nats), KL parts, beta, lr, seconds, windows/s.
    """
    from ..device import autocast, grad_scaler, loader_kwargs, select_device, to_device
    from ..io import atomic_output

    s = model.settings
    epochs = int(epochs if epochs is not None else s["epochs"])
    batch_size = int(batch_size if batch_size is not None else s["batch_size"])
    seed = int(s["seed"])
    source = windows if isinstance(windows, WindowSource) else WindowSource(windows, memory_mb=float(s["memory_mb"]))
    if tuple(source.window_size) != model.window_size:
        raise InputError(f"{', '.join(source.names)}: windows are {source.window_size[0]}x{source.window_size[1]} "
                         f"pixels but the model is built for {model.window_size[0]}x{model.window_size[1]}")
    stats = source.check_content()
    model.normalisation = {"data_min": stats["min"], "data_max": stats["max"], "data_mean": stats["mean"],
                           "finite_fraction": stats["finite_fraction"], "n_windows": len(source)}
    dev = select_device(device)
    model.to(dev)
    use_amp = bool(s["amp"]) and dev.type != "cpu"
    pin = loader_kwargs(dev)["pin_memory"]

    train_idx, val_idx = split_indices(len(source), float(s["train_fraction"]), seed)
    params = [p for p in model.net.parameters() if p.requires_grad]
    if s["likelihood_sd"] is not None:
        model.noise.requires_grad_(False)
        params = [p for p in params if p is not model.noise]
    optimizer = torch.optim.Adam(params, lr=float(s["lr"]))
    scheduler = _make_scheduler(s["lr_schedule"], optimizer, epochs, int(s["patience"]))
    scaler = grad_scaler(dev, use_amp)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / batch_size))
    warmup_steps = float(s["kl_warmup_epochs"]) * steps_per_epoch
    history: list[dict[str, Any]] = []
    start_epoch, best_loss, bad_epochs, best_state = 0, math.inf, 0, None

    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = {"n_windows": len(source), "window_size": list(model.window_size)}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        found = _checkpoints(folder)
        if resume and found:
            ckpt = _load_resumable(found, model, fingerprint)
            if ckpt is not None:
                model.net.load_state_dict(ckpt["state_dict"])
                optimizer.load_state_dict(ckpt["optimizer"])
                if scheduler is not None and ckpt.get("scheduler"):
                    scheduler.load_state_dict(ckpt["scheduler"])
                if ckpt.get("scaler"):
                    scaler.load_state_dict(ckpt["scaler"])
                train_idx = ckpt["train_index"].numpy()
                val_idx = ckpt["val_index"].numpy()
                start_epoch = int(ckpt["epoch"]) + 1
                best_loss, bad_epochs = float(ckpt["best_loss"]), int(ckpt["bad_epochs"])
                best_state = ckpt.get("best_state_dict")
                history = [dict(row) for row in ckpt["history"]]
                log.info("resuming from %s (epoch %d of %d)", found[-1][1], start_epoch, epochs)
        elif not resume:
            for _, p in found:
                p.unlink()

    stopped = bool(history) and bool(history[-1].get("stopped_early", False))
    bar = None
    # A bar only where a person watches a terminal; in a log file its carriage-return updates
    # are unreadable, so there each epoch gets one log line instead (below).
    if progress and start_epoch < epochs and not stopped and _is_terminal(sys.stderr):
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, unit="batch",
                   desc="train", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    run_start, epochs_run = time.perf_counter(), 0
    try:
        for epoch in range(start_epoch, epochs):
            if stopped:
                break
            torch.manual_seed(_epoch_seed(seed, epoch))
            rng = np.random.default_rng([seed, epoch, 1])
            model.net.train()
            t0 = time.perf_counter()
            sums = {"loss": 0.0, "rec": 0.0, "kl_z": 0.0, "kl_angle": 0.0, "kl_shift": 0.0}
            seen = 0
            step = epoch * steps_per_epoch
            beta = float(s["kl_weight"])
            for _, block in source.iter_batches(train_idx, batch_size, rng):
                beta = float(s["kl_weight"]) * (min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
                xb = torch.from_numpy(block)
                if pin:
                    xb = xb.pin_memory()
                xb = to_device(xb, dev)
                with autocast(dev, use_amp):
                    loss, parts = model.loss(xb, beta=beta)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch + 1}; "
                                             "try a lower lr or check the windows' normalisation")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, 100.0)
                scaler.step(optimizer)
                scaler.update()
                nb = xb.shape[0]
                seen += nb
                sums["loss"] += float(loss.detach()) * nb
                for key in ("rec", "kl_z", "kl_angle", "kl_shift"):
                    sums[key] += float(parts[key].detach().sum())
                step += 1
                if bar is not None:
                    bar.update(1)
            train_seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch + 1}
            row.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
            val_loss = _evaluate(model, source, val_idx, batch_size, dev, use_amp, seed, epoch) if len(val_idx) else math.nan
            row["val_loss"] = val_loss
            row["beta"] = beta
            row["lr"] = float(optimizer.param_groups[0]["lr"])
            row["seconds"] = train_seconds
            row["windows_per_s"] = seen / train_seconds if train_seconds > 0 else math.nan
            monitored = val_loss if len(val_idx) else row["train_loss"]
            # The KL weight still grows during warm-up, so losses there are not comparable.
            in_warmup = (epoch + 1) * steps_per_epoch < warmup_steps
            if monitored < best_loss - 1e-4 * abs(best_loss) or in_warmup or best_state is None:
                best_loss, bad_epochs = (monitored, 0)
                best_state = {k: v.detach().cpu().clone() for k, v in model.net.state_dict().items()}
            else:
                bad_epochs += 1
            if scheduler is not None:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    if not in_warmup:
                        scheduler.step(monitored)
                else:
                    scheduler.step()
            patience = int(s["patience"])
            stopped = patience > 0 and bad_epochs >= patience
            row["stopped_early"] = stopped
            history.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['train_loss']:.1f}", val=f"{val_loss:.1f}")
            epochs_run += 1
            left = (time.perf_counter() - run_start) / epochs_run * (epochs - epoch - 1)
            log.info("epoch %d/%d: loss %.2f, validation loss %.2f, %.0f windows/s, %s left%s",
                     epoch + 1, epochs, row["train_loss"], val_loss, row["windows_per_s"],
                     _duration(0.0 if stopped else left), " (stopped early)" if stopped else "")
            if folder is not None:
                payload = {
                    **model.state(),
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                    "train_index": torch.from_numpy(train_idx),
                    "val_index": torch.from_numpy(val_idx),
                    "best_loss": best_loss,
                    "bad_epochs": bad_epochs,
                    "best_state_dict": best_state,
                    "history": history,
                    "fingerprint": fingerprint,
                    "torch_rng": torch.get_rng_state(),
                }
                with atomic_output(folder / f"epoch-{epoch + 1:04d}.pt") as tmp:
                    torch.save(payload, tmp)
                for _, old in _checkpoints(folder)[:-KEEP_CHECKPOINTS]:
                    old.unlink(missing_ok=True)
            if history_path is not None:
                _write_history(history, history_path)
            if callback is not None:
                callback(epoch + 1, row)
    finally:
        if bar is not None:
            bar.close()
    # Early stopping and a noisy last epoch: keep the weights that did best on held-out windows.
    if best_state is not None and s["restore_best"]:
        model.net.load_state_dict(best_state)
    model.net.eval()
    frame = pd.DataFrame(history)
    if history_path is not None:
        _write_history(history, history_path)
    return frame


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``12 s``: time left in a log line."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _evaluate(model, source, idx, batch_size, dev, use_amp, seed, epoch) -> float:
    from ..device import autocast, to_device

    model.net.eval()
    torch.manual_seed(_epoch_seed(seed, epoch) + 1)
    total, n = 0.0, 0
    with torch.no_grad():
        for _, block in source.iter_batches(idx, max(batch_size, 256)):
            xb = to_device(torch.from_numpy(block), dev)
            with autocast(dev, use_amp):
                loss, _ = model.loss(xb, beta=float(model.settings["kl_weight"]), sample=False)
            total += float(loss) * xb.shape[0]
            n += xb.shape[0]
    model.net.train()
    return total / max(n, 1)


def _load_resumable(found, model, fingerprint) -> dict[str, Any] | None:
    """The newest readable checkpoint, checked against this model and data."""
    from .model import check_compatible, read_checkpoint

    for _, path in reversed(found):
        try:
            ckpt = read_checkpoint(path)
        except InputError as exc:
            log.warning("skipping unreadable checkpoint: %s", exc)
            continue
        cfg = ckpt.get("config", {})
        check_compatible(cfg, str(path), window_size=model.window_size, latent_dim=model.latent_dim)
        mine = model.config
        differs = sorted(k for k in mine if k not in ("epochs", "seed", "window_size")
                         and k in cfg and cfg[k] != mine[k] and k not in _RESUME_TOLERANT)
        if differs:
            detail = ", ".join(f"{k}: {cfg[k]!r} there, {mine[k]!r} now" for k in differs)
            raise InputError(f"{path}: checkpoint was trained with other settings ({detail}); "
                             "delete the checkpoint folder or train without resume")
        if ckpt.get("fingerprint") != fingerprint:
            raise InputError(f"{path}: checkpoint was trained on other windows ({ckpt.get('fingerprint')}, now {fingerprint}); "
                             "delete the checkpoint folder or train without resume")
        return ckpt
    return None


# Settings that change how training runs or what is encoded, not what is being trained.
_RESUME_TOLERANT = {"encode_batch_size", "encode_method", "calibration_windows", "pooled", "memory_mb", "amp", "patience", "restore_best"}


def _write_history(history: list[dict[str, Any]], path) -> None:
    from ..io import atomic_output

    with atomic_output(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)

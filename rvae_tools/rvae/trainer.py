"""Training loop: device, mixed precision, batches from memory or Zarr, checkpoints and resume.

The trainer imports no model code. It trains any object that has (as :class:`~.model.RVAE`
and :class:`~.baselines.PlainVAE` do):

- ``settings``: dict with the training keys of the config's ``rvae`` section (``epochs``,
  ``batch_size``, ``seed``, ``lr``, ``lr_schedule``, ``patience``, ``kl_weight``,
  ``kl_warmup_epochs``, ``train_fraction``, ``amp``, ``restore_best``, ``memory_mb``,
  ``max_windows``);
- ``window_size``: (height, width) in pixels; ``config``: JSON-able description (hashed into
  the resume fingerprint);
- ``net``: a ``torch.nn.Module`` holding every parameter (those with ``requires_grad`` False
  are not trained); ``to(device)``;
- ``loss(x, beta=..., sample=...)``: (mean loss, dict of per-window parts in nats);
- ``state()``: dict of tensors and plain values saved in every checkpoint, with the keys
  :func:`.checkpoint.read_checkpoint` checks (``format``, ``format_version``, ``kind``,
  ``config`` holding ``window_size``, ``state_dict``);
- ``normalisation``: a dict attribute the trainer fills with the windows' statistics.

Resume: checkpoints go to ``checkpoint_dir/<fingerprint>/``, where the fingerprint
(:func:`.checkpoint.training_fingerprint`) hashes everything that determines the weights: the
checksum of the training windows' values, the stores' windows settings, every training
setting (seed included), the batch size, the rvae-tools and torch versions, and the number of
epochs when the learning-rate schedule depends on it (``cosine``). A run continues only
checkpoints of its own fingerprint; folders of any other are removed and the log says what
changed. Without a cosine schedule an epoch's result does not depend on how many epochs follow,
so raising ``epochs`` continues from the last checkpoint and lowering it restarts from the
checkpoint of that epoch when it is kept (else afresh): either way the model equals a fresh
run's.

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
from .checkpoint import fingerprint_changes, read_checkpoint, training_fingerprint
from .data import WindowSource, sample_windows

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^epoch-(\d{4,})\.pt$")
KEEP_CHECKPOINTS = 3
FINGERPRINT_FILE = "fingerprint.json"
#: Settings that do not change the trained weights: how encoding runs (batch, method,
#: angle refinement, calibration), which stores are pooled (the windows' checksum covers that),
#: the memory budget
#: (its effect on the batch order is recorded as ``in_memory``), whether the best epoch's
#: weights are restored at the end (checkpoints hold both), and ``epochs`` unless the schedule
#: depends on it.
RUN_ONLY_SETTINGS = {"encode_batch_size", "encode_method", "refine_angle", "encode_chunk_trajectories",
                     "calibration_windows", "pooled", "memory_mb", "restore_best", "epochs"}


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
    model : object
        Anything with the attributes and methods listed in the module docstring (RVAE, PlainVAE,
        the class models).
    windows : ndarray (n, wy, wx), list of arrays, patches.zarr path(s) or a WindowSource
        At most ``settings["max_windows"]`` of them are trained and validated on
        (:func:`.data.sample_windows`).
    epochs, batch_size : int, optional
        Override the settings' ``epochs`` / ``batch_size``.
    checkpoint_dir : path, optional
        A checkpoint ``<fingerprint>/epoch-NNNN.pt`` is written here after every epoch (the
        last three are kept); with ``resume`` the newest one of the same fingerprint is
        continued from (see the module docstring).
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
    if tuple(source.window_size) != tuple(model.window_size):
        raise InputError(f"{', '.join(source.names)}: windows are {source.window_size[0]}x{source.window_size[1]} "
                         f"pixels but the model is built for {model.window_size[0]}x{model.window_size[1]}")
    max_windows = s.get("max_windows")
    pool = sample_windows(source, max_windows, seed)
    if len(pool) < len(source):
        log.info("training budget: %d of %d windows (rvae.max_windows = %d), spread over %d store(s) and their "
                 "frames; encoding still covers all", len(pool), len(source), int(max_windows), len(source.counts))
    else:
        log.info("training budget: all %d windows (rvae.max_windows = %s)", len(source), max_windows)
    stats = source.check_content(pool, digest=True)
    model.normalisation = {"data_min": stats["min"], "data_max": stats["max"], "data_mean": stats["mean"],
                           "finite_fraction": stats["finite_fraction"], "n_windows": len(source),
                           "n_training_windows": len(pool)}
    dev = select_device(device)
    model.to(dev)
    use_amp = bool(s["amp"]) and dev.type != "cpu"
    pin = loader_kwargs(dev)["pin_memory"]

    train_pos, val_pos = split_indices(len(pool), float(s["train_fraction"]), seed)
    train_idx, val_idx = pool[train_pos], pool[val_pos]
    params = [p for p in model.net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(s["lr"]))
    scheduler = _make_scheduler(s["lr_schedule"], optimizer, epochs, int(s["patience"]))
    scaler = grad_scaler(dev, use_amp)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / batch_size))
    warmup_steps = float(s["kl_warmup_epochs"]) * steps_per_epoch
    history: list[dict[str, Any]] = []
    start_epoch, best_loss, bad_epochs, best_state = 0, math.inf, 0, None

    folder = None
    fingerprint = ""
    if checkpoint_dir is not None:
        description = _fingerprint_parts(model, source, stats, len(pool), epochs, batch_size, use_amp)
        fingerprint = training_fingerprint(description)
        folder = _checkpoint_folder(Path(checkpoint_dir), fingerprint, description, resume)
        ckpt = _load_resumable(_checkpoints(folder), fingerprint, epochs) if resume else None
        if ckpt is not None:
            try:
                model.net.load_state_dict(ckpt["state_dict"])
                optimizer.load_state_dict(ckpt["optimizer"])
                if scheduler is not None and ckpt.get("scheduler"):
                    scheduler.load_state_dict(ckpt["scheduler"])
                if ckpt.get("scaler"):
                    scaler.load_state_dict(ckpt["scaler"])
                train_idx = ckpt["train_index"].numpy()
                val_idx = ckpt["val_index"].numpy()
                best_state = ckpt.get("best_state_dict")
                history = [dict(row) for row in ckpt["history"]]
            except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise InputError(f"{ckpt['_path']}: cannot resume from this checkpoint ({first[:200]}); "
                                 f"delete {folder} to train afresh") from None
            start_epoch = int(ckpt["epoch"]) + 1
            best_loss, bad_epochs = float(ckpt["best_loss"]), int(ckpt["bad_epochs"])
            log.info("resuming from %s (epoch %d of %d)", ckpt["_path"], start_epoch, epochs)
        else:
            log.info("training afresh in %s", folder)

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
            sums: dict[str, float] = {"loss": 0.0}
            seen = 0
            step = epoch * steps_per_epoch
            beta = float(s["kl_weight"])
            for _, block in source.iter_batches(train_idx, batch_size, rng):
                beta = float(s["kl_weight"]) * (min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
                # Epochs done, for models with their own schedules (jrvae's fading guide); a
                # function of the step only, so a resumed run sees what an uninterrupted one did.
                model.train_progress = (step + 1) / steps_per_epoch
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
                for key, value in parts.items():
                    if key in _HISTORY_PARTS:
                        sums[key] = sums.get(key, 0.0) + float(value.detach().sum())
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
    seconds = max(0, round(seconds))
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


def _fingerprint_parts(model, source: WindowSource, stats: dict, n_training: int, epochs: int, batch_size: int,
                       use_amp: bool) -> dict[str, Any]:
    """Everything that determines the trained weights, as JSON-able values."""
    import hashlib

    from .. import __version__

    settings = {k: v for k, v in model.config.items() if k not in RUN_ONLY_SETTINGS}
    if model.settings.get("lr_schedule") == "cosine":
        settings["epochs"] = int(epochs)  # the schedule's period is the total number of epochs
    parts = {
        "rvae_tools": __version__,
        "torch": torch.__version__.split("+")[0],
        "settings": settings,
        "batch_size": int(batch_size),
        "amp": bool(use_amp),
        "windows": {"checksum": stats["sha256"], "n_training": int(n_training),
                    "n_total": len(source), "stores": source.store_settings(), "in_memory": bool(source.in_memory)},
        # A source may carry per-window targets (the class models' labels): they shape the weights too.
        "labels": (hashlib.sha256(np.ascontiguousarray(source.labels, dtype="<i8").tobytes()).hexdigest()
                   if getattr(source, "labels", None) is not None else None),
    }
    if getattr(source, "angles", None) is not None:
        # The angle-conditional model's known angles (a key only then: other fingerprints stay as they were).
        parts["angles"] = hashlib.sha256(np.ascontiguousarray(source.angles, dtype="<f4").tobytes()).hexdigest()
    return parts


def _checkpoint_folder(root: Path, fingerprint: str, description: dict, resume: bool) -> Path:
    """``root/<fingerprint>``, created; folders of other fingerprints (and loose epoch files
    of older rvae-tools) are removed, saying what changed."""
    import json
    import shutil

    folder = root / fingerprint[:16]
    root.mkdir(parents=True, exist_ok=True)
    for entry in sorted(root.iterdir()):
        if entry == folder:
            continue
        if entry.is_dir() and (entry / FINGERPRINT_FILE).exists():
            try:
                old = json.loads((entry / FINGERPRINT_FILE).read_text())
                changed = ", ".join(fingerprint_changes(old, description)) or "unknown"
            except (OSError, ValueError):
                changed = "unreadable fingerprint"
            log.info("the checkpoints in %s were trained with other settings or windows (changed: %s); "
                     "removed, training starts afresh", entry, changed)
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and _CKPT.match(entry.name):
            log.info("removing %s: an epoch checkpoint without a training fingerprint (older rvae-tools)", entry)
            entry.unlink(missing_ok=True)
    if not resume and folder.exists():
        log.info("--no-resume: removing the checkpoints in %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(exist_ok=True)
    if not (folder / FINGERPRINT_FILE).exists():
        from ..io import atomic_output

        with atomic_output(folder / FINGERPRINT_FILE) as tmp:
            Path(tmp).write_text(json.dumps(description, indent=1, sort_keys=True, default=str) + "\n")
    return folder


def _load_resumable(found, fingerprint: str, epochs: int) -> dict[str, Any] | None:
    """The newest readable checkpoint of this fingerprint that does not go past ``epochs``."""
    usable = [(e, p) for e, p in found if e <= epochs]
    if found and not usable:
        log.info("the kept checkpoints (epochs %s) are past epochs = %d; training afresh",
                 ", ".join(str(e) for e, _ in found), epochs)
    for _, path in reversed(usable):
        try:
            ckpt = read_checkpoint(path, epoch=True)
        except InputError as exc:
            log.warning("skipping unreadable checkpoint: %s", exc)
            continue
        if ckpt["fingerprint"] != fingerprint:
            log.warning("skipping %s: its fingerprint does not match its folder", path)
            continue
        ckpt["_path"] = str(path)
        return ckpt
    return None


#: Per-window loss parts reported in the history (the ones a model returns).
_HISTORY_PARTS = ("rec", "kl_z", "kl_angle", "kl_shift")


def _write_history(history: list[dict[str, Any]], path) -> None:
    from ..io import atomic_output

    with atomic_output(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)

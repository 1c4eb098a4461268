"""Windows for training and encoding: an in-memory array or patches.zarr stores read in batches.

Stores that fit in ``memory_mb`` are read once; larger ones are streamed: each epoch visits the
Zarr chunks in a random order, a few chunks at a time, and shuffles within that buffer, so
memory is bounded by the buffer and every chunk is read once per epoch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import InputError


class WindowSource:
    """Uniform access to windows (n, wy, wx) from an array or patches.zarr stores.

    Parameters
    ----------
    windows : ndarray (n, wy, wx), a list of 2-D arrays, or a path / list of paths to patches.zarr
    memory_mb : float
        Stores smaller than this (in total) are loaded into memory.
    """

    def __init__(self, windows, memory_mb: float = 2048.0):
        self.paths: list[Path] = []
        self._arrays: list = []
        self._stores: list = []
        self.names: list[str] = []
        if isinstance(windows, (str, os.PathLike)):
            windows = [windows]
        if isinstance(windows, np.ndarray) or _is_tensor(windows):
            arr = np.asarray(windows.detach().cpu() if _is_tensor(windows) else windows, dtype=np.float32)
            self._check_shape(arr.shape, "windows")
            self._arrays = [arr]
            self.names = ["windows"]
        elif isinstance(windows, Sequence) and windows and all(isinstance(w, (str, os.PathLike)) for w in windows):
            for path in windows:
                arr, attrs = _open_window_array(Path(path))
                self._check_shape(arr.shape, str(path))
                self._stores.append(attrs)
                self.paths.append(Path(path))
                self._arrays.append(arr)
                self.names.append(str(path))
        elif isinstance(windows, Sequence) and windows:
            try:
                arr = np.stack([np.asarray(w, dtype=np.float32) for w in windows])
            except ValueError as exc:
                raise InputError(f"windows: patches differ in shape ({exc})") from None
            self._check_shape(arr.shape, "windows")
            self._arrays = [arr]
            self.names = ["windows"]
        else:
            raise InputError("windows: zero windows were given; expected an array (n, wy, wx) or patches.zarr paths")
        shapes = {tuple(a.shape[1:]) for a in self._arrays}
        if len(shapes) != 1:
            detail = ", ".join(f"{n}: {tuple(a.shape[1:])}" for n, a in zip(self.names, self._arrays))
            raise InputError(f"windows: the stores have different window sizes ({detail})")
        self.window_size: tuple[int, int] = shapes.pop()
        self.counts = np.array([a.shape[0] for a in self._arrays], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.n = int(self.offsets[-1])
        if self.n == 0:
            raise InputError(f"{', '.join(self.names)}: zero windows; expected at least one (were there no tracks?)")
        nbytes = self.n * self.window_size[0] * self.window_size[1] * 4
        if self.paths and nbytes <= memory_mb * 2 ** 20:
            self._arrays = [np.asarray(a[:], dtype=np.float32) for a in self._arrays]
        self.in_memory = all(isinstance(a, np.ndarray) for a in self._arrays)
        self.chunk = [_chunk_length(a) for a in self._arrays]

    @staticmethod
    def _check_shape(shape, name: str) -> None:
        if len(shape) != 3:
            raise InputError(f"{name}: windows must be 3-D (n, wy, wx), got shape {tuple(shape)}")
        if shape[1] < 4 or shape[2] < 4:
            raise InputError(f"{name}: windows of {shape[1]}x{shape[2]} pixels are too small; expected at least 4x4")

    def __len__(self) -> int:
        return self.n

    def read(self, index: np.ndarray) -> np.ndarray:
        """Windows at global ``index`` (any order) as float32 (len, wy, wx)."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), *self.window_size), dtype=np.float32)
        store = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(store):
            sel = np.nonzero(store == s)[0]
            local = index[sel] - self.offsets[s]
            order = np.argsort(local, kind="stable")
            arr = self._arrays[s]
            if isinstance(arr, np.ndarray):
                out[sel] = arr[local]
            else:
                lo, hi = int(local[order[0]]), int(local[order[-1]]) + 1
                block = np.asarray(arr[lo:hi], dtype=np.float32)
                out[sel] = block[local - lo]
        return out

    def appended(self, windows: np.ndarray, name: str) -> WindowSource:
        """A source of these windows followed by ``windows`` (n, wy, wx), held in memory (e.g. labelled example images)."""
        import copy

        arr = np.asarray(windows, dtype=np.float32)
        self._check_shape(arr.shape, name)
        if tuple(arr.shape[1:]) != tuple(self.window_size):
            raise InputError(f"{name}: windows are {arr.shape[1]}x{arr.shape[2]} pixels; expected "
                             f"{self.window_size[0]}x{self.window_size[1]} as the other windows")
        out = copy.copy(self)
        out._arrays = [*self._arrays, arr]
        out.names = [*self.names, name]
        out.counts = np.append(self.counts, arr.shape[0]).astype(np.int64)
        out.offsets = np.concatenate([[0], np.cumsum(out.counts)])
        out.n = int(out.offsets[-1])
        out.in_memory = all(isinstance(a, np.ndarray) for a in out._arrays)
        out.chunk = [*self.chunk, _chunk_length(arr)]
        return out

    def store_settings(self) -> list:
        """The settings each patches.zarr store was cut with (its provenance ``config``), in order."""
        return [attrs.get("config") for attrs in self._stores]

    def frames(self) -> np.ndarray | None:
        """Frame number of every window (global order), or None when the windows carry none."""
        if not self.paths:
            return None
        import zarr

        parts = []
        for path in self.paths:
            group = zarr.open_group(str(path), mode="r")
            if "frame" not in group:
                return None
            parts.append(np.asarray(group["frame"][:], dtype=np.int64))
        # Windows appended without a store (labelled example images) belong to no frame: 0.
        parts += [np.zeros(len(a), dtype=np.int64) for a in self._arrays[len(self.paths):]]
        return np.concatenate(parts)

    def check_content(self, index: np.ndarray | None = None, digest: bool = False) -> dict:
        """Statistics of the windows; raise when they carry no signal (all NaN or all constant).

        ``index`` limits the check to those windows (default all); ``digest`` adds ``sha256``,
        a checksum of their values in that order.
        """
        import hashlib

        index = np.arange(self.n) if index is None else np.asarray(index, dtype=np.int64)
        sha = hashlib.sha256() if digest else None
        lo, hi, total, finite, count = np.inf, -np.inf, 0.0, 0, 0
        for _, block in self.iter_batches(index, 4096):
            if sha is not None:
                sha.update(np.ascontiguousarray(block, dtype="<f4").tobytes())
            ok = np.isfinite(block)
            count += block.size
            finite += int(ok.sum())
            if ok.any():
                vals = block[ok]
                lo, hi = min(lo, float(vals.min())), max(hi, float(vals.max()))
                total += float(vals.sum(dtype=np.float64))
        where = ", ".join(self.names)
        if finite == 0:
            raise InputError(f"{where}: every window value is NaN; expected intensities")
        if hi - lo <= 0:
            raise InputError(f"{where}: all windows are constant (every value is {lo:g}); expected particle images")
        stats = {"min": lo, "max": hi, "mean": total / finite, "finite_fraction": finite / count}
        if sha is not None:
            stats["sha256"] = sha.hexdigest()
        return stats

    def iter_batches(self, index: np.ndarray, batch_size: int,
                     rng: np.random.Generator | None = None, buffer_batches: int = 32) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (global index, windows) batches over ``index``; shuffled when ``rng`` is given."""
        index = np.asarray(index, dtype=np.int64)
        if self.in_memory or rng is None:
            order = rng.permutation(len(index)) if rng is not None else np.arange(len(index))
            for start in range(0, len(index), batch_size):
                sel = index[order[start:start + batch_size]]
                yield sel, self.read(sel)
            return
        # Streaming: group the requested windows by Zarr chunk, visit chunks in random order.
        store = np.searchsorted(self.offsets, index, side="right") - 1
        chunk_id = np.array([s * (1 << 40) + (i - self.offsets[s]) // self.chunk[s] for s, i in zip(store, index)])
        chunks = np.unique(chunk_id)
        rng_chunks = chunks[rng.permutation(len(chunks))]
        pending = np.empty(0, dtype=np.int64)
        target = batch_size * buffer_batches
        by_chunk = {c: index[chunk_id == c] for c in chunks}
        for c in rng_chunks:
            pending = np.concatenate([pending, by_chunk[c]])
            if len(pending) >= target:
                pending = pending[rng.permutation(len(pending))]
                while len(pending) >= batch_size and len(pending) > target - batch_size:
                    sel, pending = pending[:batch_size], pending[batch_size:]
                    yield sel, self.read(sel)
        pending = pending[rng.permutation(len(pending))]
        for start in range(0, len(pending), batch_size):
            sel = pending[start:start + batch_size]
            yield sel, self.read(sel)


class AnnotatedWindows(WindowSource):
    """Windows that carry per-window data for a model's loss (class labels, known angles).

    Built from ``windows`` as :class:`WindowSource` is, or taking over an existing source's
    state (its stores are not opened or read again). Subclasses add the data and set it for
    each batch in ``iter_batches``.
    """

    def __init__(self, windows, memory_mb: float = 2048.0):
        if isinstance(windows, WindowSource):
            self.__dict__.update(windows.__dict__)
        else:
            super().__init__(windows, memory_mb=memory_mb)


def _is_tensor(obj) -> bool:
    return type(obj).__module__.startswith("torch") and hasattr(obj, "detach")


def _chunk_length(arr) -> int:
    chunks = getattr(arr, "chunks", None)
    if chunks and isinstance(chunks[0], int):
        return max(1, int(chunks[0]))
    return 1024


def _open_window_array(path: Path):
    """The ``window`` array of a patches.zarr store (lazy zarr array), contract-checked."""
    if not path.exists():
        raise InputError(f"{path}: patches store not found")
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 (zarr raises many types for a broken store)
        raise InputError(f"{path}: cannot be read as a Zarr patches store ({type(exc).__name__}: {exc})") from None
    if "window" not in group:
        raise InputError(f"{path}: patches store lacks variable 'window'; expected window(obs, wy, wx)")
    arr = group["window"]
    dims = arr.attrs.get("_ARRAY_DIMENSIONS") or list(getattr(arr.metadata, "dimension_names", None) or [])
    if dims and list(dims) != ["obs", "wy", "wx"]:
        raise InputError(f"{path}: variable 'window' has dims {tuple(dims)}; expected ('obs', 'wy', 'wx')")
    return arr, dict(group.attrs)


def sample_windows(source: WindowSource, max_windows: int | None, seed: int) -> np.ndarray:
    """Indices (sorted) of at most ``max_windows`` windows spread over stores, frames and particles.

    Every store (movie) gets a share proportional to its windows, and within a store every
    frame a share proportional to its windows (largest remainders); the windows of a frame are
    drawn at random, so particles are spread too. Deterministic for ``seed``. All windows when
    ``max_windows`` is None or not smaller than their number.
    """
    n = len(source)
    if max_windows is None or int(max_windows) >= n:
        return np.arange(n)
    rng = np.random.default_rng([int(seed), 104729])
    frames = source.frames()
    # Stratum of every window: its store and (when known) its frame.
    store = np.searchsorted(source.offsets, np.arange(n), side="right") - 1
    key = store * (1 << 40) + (frames - frames.min() if frames is not None else 0)
    strata, inverse, sizes = np.unique(key, return_inverse=True, return_counts=True)
    quota = sizes * (int(max_windows) / n)
    take = np.floor(quota).astype(np.int64)
    short = int(max_windows) - int(take.sum())
    if short > 0:
        # Largest remainders first; ties broken at random so no frame is always favoured.
        order = np.lexsort((rng.random(len(strata)), -(quota - take)))
        take[order[:short]] += 1
    chosen = []
    by_stratum = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for s, k in enumerate(take):
        if k:
            members = by_stratum[bounds[s]:bounds[s + 1]]
            chosen.append(rng.choice(members, size=int(k), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)

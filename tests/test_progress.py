"""Training progress: one readable log line per epoch in a log file, a bar on a terminal."""

from __future__ import annotations

import io
import logging
import re

import numpy as np

from rvae_tools.rvae import RVAE


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _windows(n: int = 48, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    blobs = [np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / 6.0) for dx, dy in rng.uniform(-2, 2, (n, 2))]
    return (0.1 + 0.8 * np.stack(blobs) + rng.normal(0, 0.02, (n, size, size))).astype(np.float32)


def _model(epochs: int) -> RVAE:
    return RVAE(16, latent_dim=1, seed=0, encoder_hidden=[16], encoder_channels=[4, 8], decoder_hidden=[16],
                rotations=4, epochs=epochs, batch_size=16, kl_warmup_epochs=0, patience=0)


def test_log_file_gets_one_line_per_epoch_and_no_carriage_returns(monkeypatch, caplog):
    stderr = io.StringIO()  # what a Snakemake log file is: not a terminal
    monkeypatch.setattr("sys.stderr", stderr)
    with caplog.at_level(logging.INFO, logger="rvae_tools"):
        _model(epochs=3).fit(_windows(), device="cpu", progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 3
    pattern = re.compile(r"^epoch (\d)/3: loss -?[\d.]+, validation loss -?[\d.]+, \d+ windows/s, "
                         r"(\d+ s|\d+ min \d\d s|\d+ h \d\d min) left$")
    assert [int(pattern.match(line).group(1)) for line in lines] == [1, 2, 3]
    assert lines[-1].endswith(" 0 s left")
    assert "\r" not in stderr.getvalue()


def test_terminal_gets_the_bar(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    _model(epochs=2).fit(_windows(), device="cpu", progress=True)
    assert "\r" in terminal.getvalue() and "train" in terminal.getvalue()

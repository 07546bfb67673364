"""Exceptions the trainer raises and the CLI reports, importable without torch."""

from __future__ import annotations

from pathlib import Path


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinity; nothing from that step on was written."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during ``train()``: ``step`` reached, ``checkpoint_step`` saved in ``out_dir``
    (the same step after one signal, which lets the step in hand finish and checkpoints it);
    ``signum``: the signal (SIGINT for a KeyboardInterrupt raised by other means)."""

    def __init__(self, step: int, total: int, checkpoint_step: int, out_dir: Path, signum: int = 2):
        super().__init__(f"stopped at step {step} of {total}; last checkpoint at step {checkpoint_step} in {out_dir}")
        self.step, self.total, self.checkpoint_step, self.out_dir = step, total, checkpoint_step, out_dir
        self.signum = signum

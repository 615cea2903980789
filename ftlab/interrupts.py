"""SIGINT and SIGTERM stop a run cleanly: at the next batch boundary, with a checkpoint, a record
(``status: interrupted``) and the shell's exit status for the signal (130, 143); so does SIGUSR2 in
a SLURM job, submitit's warning that the time limit is near.

Schedulers and ``docker stop`` send SIGTERM and, after a grace period, SIGKILL; Ctrl-C sends
SIGINT. During training Lightning's own SIGTERM handler sets its stop flag
(``trainer.received_sigterm``, shared with every DDP rank), and a SIGINT is passed on to it as a
SIGTERM, so the loop stops after the current optimizer step, where the state is consistent, and
``StepCheckpoints`` saves it. A second signal,
or one that arrives before training started (while the model loads), stops the run at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any, Optional

import pytorch_lightning as pl

from ftlab.errors import Interrupted

__all__ = ["Interrupted", "SignalGuard"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def guarded_signals() -> tuple[signal.Signals, ...]:
    """SIGINT and SIGTERM; in a SLURM job also SIGUSR2, which submitit (``hydra/launcher=submitit_slurm``)
    sends ahead of the job's time limit: the run then stops with a checkpoint before SLURM kills it."""
    return (*SIGNALS, signal.SIGUSR2) if os.environ.get("SLURM_JOB_ID") else SIGNALS


class SignalGuard(pl.Callback):
    """Catches SIGINT/SIGTERM for the length of a ``with`` block (main thread only) and, as a
    Lightning callback, turns the first one during ``fit`` into Lightning's stop flag."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._trainer: Optional[pl.Trainer] = None
        self._previous: dict[int, Any] = {}
        self._echo = False  # a SIGTERM we raised ourselves, to be ignored when it comes back

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in guarded_signals():
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self._echo and signum == signal.SIGTERM:  # our own SIGINT, passed on to Lightning
            self._echo = False
            return
        if self.received is None:
            self.received = signum
            if self._trainer is not None:  # Lightning's SIGTERM handler sets its stop flag for every rank
                if signum != signal.SIGTERM:
                    self._echo = True
                    signal.raise_signal(signal.SIGTERM)
                return
        raise Interrupted(signum)  # before training, or a second signal: stop now

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer  # Lightning's SIGTERM handler is in place from here on

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None

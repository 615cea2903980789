"""Lightning callbacks ftlab adds by default."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl

from ftlab.data.packing import real_tokens


class TokenThroughput(pl.Callback):
    """Logs ``train/tokens_per_s``: real (non-padding) tokens processed per second of training.

    Counts real tokens (``attention_mask`` ones, or the packed examples), so padding does not inflate the number, and times only the
    training batches (validation and start-up are excluded). ``tokens`` are this rank's; the logged
    rate assumes every rank runs as many, and the run record sums the ranks' own counts
    (``ftlab.ranks.across_ranks``).
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._start = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.seconds += time.perf_counter() - self._start
        rollout = getattr(getattr(pl_module, "method", None), "last_step_tokens", None)  # an RL method's rollouts
        count = rollout if rollout is not None else real_tokens(batch) if isinstance(batch, dict) else 0
        self.tokens += count
        pl_module.log("train/tokens_per_s", self.tokens_per_s * trainer.world_size, on_step=True, prog_bar=True,
                      rank_zero_only=True)

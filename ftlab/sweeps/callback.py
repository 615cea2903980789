"""Hydra callback: when a sweep ends, compare its jobs in the sweep folder."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ftlab.sweeps.compare import write_comparison

log = logging.getLogger("ftlab")


class CompareSweep(Callback):
    """Writes results.csv, comparison.md and comparison.png into the sweep folder and prints the table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = config.hydra.sweep.dir
        try:
            table = write_comparison([sweep_dir], sweep_dir)
        except Exception as exc:  # a broken comparison must not hide the finished jobs
            log.error("could not compare the sweep in %s: %s: %s", sweep_dir, type(exc).__name__, exc)
            return
        print(table)
        log.info("comparison written to %s (comparison.md, comparison.png, results.csv)", sweep_dir)

"""Hydra callback: a sweep holds its folder's lock while it runs, and compares its jobs when it ends."""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ftlab.errors import FtlabError
from ftlab.locks import hold_folder
from ftlab.sweeps.compare import write_comparison
from ftlab.tables import print_markdown

log = logging.getLogger("ftlab")


class CompareSweep(Callback):
    """Locks the sweep folder for the sweep's length (in the launching process, so parallel jobs
    of a launcher do not contend for it; a second sweep into the folder is refused), then writes
    results.csv, comparison.md and comparison.png into it and prints the table (``ftlab.tables``:
    nothing cut, the markdown itself when stdout is not a terminal)."""

    def __init__(self) -> None:
        self._held = ExitStack()

    def __getstate__(self) -> dict[str, Any]:
        # a launcher that runs jobs in other processes (submitit) pickles Hydra's callbacks with
        # each job: the sweep folder's lock stays with the launching process
        return {k: v for k, v in self.__dict__.items() if k != "_held"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._held = ExitStack()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._held.enter_context(hold_folder(config.hydra.sweep.dir, "sweep"))
        except FtlabError as exc:
            raise SystemExit(f"ftlab: error: {exc}") from None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._held.close()
        sweep_dir = config.hydra.sweep.dir
        try:
            table = write_comparison([sweep_dir], sweep_dir)
        except Exception as exc:  # a broken comparison must not hide the finished jobs
            log.error("could not compare the sweep in %s: %s: %s", sweep_dir, type(exc).__name__, exc)
            return
        print_markdown(table)
        log.info("comparison written to %s (comparison.md, comparison.png, results.csv)", sweep_dir)

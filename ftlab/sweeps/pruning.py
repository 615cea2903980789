"""Optuna pruning of bad trials from inside ftlab's Lightning training loop.

hydra-optuna-sweeper keeps each trial object inside the sweeper and hands the job only the
sampled overrides. Its one public hook that sees the trial is ``custom_search_space``, a function
called with ``(cfg, trial)`` for every trial, in launch order, just before its job starts.
:func:`track_trial` is that function: it files the trial under the job number it will run as, so
that a job launched in the same process (Hydra's basic launcher) finds it and reports its
validation loss to it (:class:`OptunaPruning`). A pruned job stops early, is recorded with
``status: pruned``, and the sweeper is made to tell Optuna ``PRUNED`` rather than ``COMPLETE``.

Jobs in other processes (``hydra/launcher=joblib``) find no trial and simply run to the end.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger("ftlab")

_trials_by_job: dict[int, Any] = {}  # hydra.job.num -> optuna trial, for jobs of this process
_pruned: set[int] = set()  # numbers of trials a job has pruned
_sweep: dict[str, Any] = {"study": None, "next_job": 0}


def track_trial(cfg: DictConfig, trial: Any) -> None:
    """``hydra.sweeper.custom_search_space`` hook: remember which job will run ``trial``.

    The sweeper calls it once per trial, in job order, starting at job 0 for a new study, so a
    counter gives the job number. The study gets the pruner configured under ``pruner`` (none
    when it is null) and a ``tell`` that records pruned trials as pruned.
    """
    study = trial.study
    if _sweep["study"] is not study:
        _sweep.update(study=study, next_job=0)
        study.pruner = hydra.utils.instantiate(cfg.pruner) if cfg.get("pruner") is not None else _no_pruning()
        study.tell = _tell_pruned_as_pruned(study.tell)
    _trials_by_job[_sweep["next_job"]] = trial
    _sweep["next_job"] += 1


def _no_pruning() -> Any:
    from optuna.pruners import NopPruner

    return NopPruner()


def _tell_pruned_as_pruned(tell: Any) -> Any:
    from optuna.trial import TrialState

    def tell_with_pruning(trial: Any, values: Any = None, state: Any = TrialState.COMPLETE, **kwargs: Any) -> Any:
        number = trial if isinstance(trial, int) else trial.number
        if number in _pruned:  # Optuna keeps the last reported value as the trial's value
            return tell(trial, state=TrialState.PRUNED, **kwargs)
        return tell(trial, values=values, state=state, **kwargs)

    return tell_with_pruning


def trial_for_this_job() -> Any | None:
    """The Optuna trial the current Hydra job runs, when it was launched in this process."""
    if not HydraConfig.initialized():
        return None
    num = HydraConfig.get().job.get("num")
    return _trials_by_job.get(num) if num is not None else None


class OptunaPruning(pl.Callback):
    """Report ``val/loss`` to the trial at every validation; stop training when Optuna's pruner
    says the trial is worse than the others were at the same step."""

    def __init__(self, trial: Any, monitor: str = "val/loss") -> None:
        self.trial = trial
        self.monitor = monitor
        self.pruned_at_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or value is None or self.pruned_at_step is not None:
            return
        step = trainer.global_step
        self.trial.report(float(value), step=step)
        if self.trial.should_prune():
            self.pruned_at_step = step
            _pruned.add(self.trial.number)
            trainer.should_stop = True
            log.info("optuna: trial %d pruned at step %d (%s %.4f)", self.trial.number, step, self.monitor, float(value))

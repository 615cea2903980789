"""One training run, top to bottom: config -> model -> method -> data -> fit -> save -> record.

This is the training script, and only that: the run record, the Trainer and its callbacks,
``fit`` and Hydra's task function. Building the model, method, data and module from the config,
and scoring the base and the fine-tuned model, live in ``ftlab.build``, which ``ftlab eval``,
``ftlab export`` and the method contract share; library code imports that, never this module
(``tests/test_layout.py`` checks it), so nothing outside the entry point depends on the training
loop.

``task(cfg)`` is the function Hydra calls once per job; it runs ``train(cfg)``, which always leaves
a ``metrics.json`` in the run folder (``status: failed`` with the error when something breaks,
``pruned`` when an Optuna pruner stopped it early) and returns the validation loss, the metric a
Hydra sweeper minimises.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities import rank_zero_only

from ftlab.build import Run, build, final_scores, generation_records, pair_records, reward_records
from ftlab.callbacks import TokenThroughput
from ftlab.errors import FtlabError
from ftlab.sweeps.pruning import OptunaPruning, trial_for_this_job
from ftlab.models.quant import count_quantized_linear
from ftlab.results import PeakMemory, Stopwatch, folder_mb, loss_summary, read_metrics, write_metrics
from ftlab.evaluation.rewards import RolloutSamples
from ftlab.evaluation.samples import GenerationSamples

log = logging.getLogger("ftlab")
SAMPLES_FILE = "samples.jsonl"  # generations logged at every validation


def train(cfg: DictConfig) -> float:
    """Run one job and record it; re-raises failures after writing ``status: failed``."""
    out = Path(cfg.paths.output_dir)
    done = _completed_record(out) if cfg.get("resume") else None
    if done is not None:
        log.info("resume: %s already completed, skipping it", out)
        return objective_value(cfg, done)
    record = _base_record(cfg)
    watch = Stopwatch()
    with PeakMemory() as memory:
        try:
            record.update(fit(build(cfg), out))
            record["status"] = "pruned" if record.get("pruned_at_step") is not None else "completed"
        except BaseException as exc:
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            record["wall_s"] = round(watch.seconds, 2)
            record["peak_rss_mb"] = round(memory.peak_rss_mb, 1)
            record["peak_gpu_mb"] = memory.peak_gpu_mb
            if rank_zero_only.rank == 0:
                path = write_metrics(out, record)
                log.info("run record: %s (status: %s)", path, record["status"])
    return objective_value(cfg, record)


def objective_value(cfg: DictConfig, record: dict[str, Any]) -> float:
    """The number a sweeper optimises: ``record[cfg.objective]`` (``val_loss`` by default), NaN
    when the run has none (Optuna then records the trial as failed), with a warning naming it."""
    name = str(cfg.get("objective") or "val_loss")
    value = record.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        numbers = sorted(k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        log.warning("objective=%s: the run record has no number under that name (it has: %s)", name, ", ".join(numbers))
        return math.nan
    return float(value)


def _prunable(cfg: DictConfig) -> bool:
    """Pruning compares ``val/loss`` at every validation: only a sweep that optimises ``val_loss`` prunes."""
    name = str(cfg.get("objective") or "val_loss")
    if name != "val_loss":
        log.info("optuna: objective=%s is measured once, at the end of a run: trials are not pruned", name)
    return name == "val_loss"


def fit(run: Run, out: Path) -> dict[str, Any]:
    """Train, validate at the end, save the artifact; return the metrics for the run record."""
    cfg = run.cfg
    throughput = TokenThroughput()  # always on: tokens/s belongs in every run record
    callbacks = [throughput, *_instantiate_all(cfg.get("callbacks"))]
    records = generation_records(cfg, run.datamodule)
    if records and int(cfg.eval.num_samples) > 0:
        callbacks.append(GenerationSamples(records, run.tokenizer, num_samples=int(cfg.eval.num_samples),
                                           max_new_tokens=cfg.eval.max_new_tokens, out_file=out / SAMPLES_FILE,
                                           checker=cfg.eval.checker))
    prompts = reward_records(cfg, run.datamodule)
    if prompts and int(cfg.eval.num_samples) > 0:  # an RL method: sampled answers with their rewards
        m = cfg.method
        callbacks.append(RolloutSamples(prompts, run.tokenizer, run.method.reward_fn, num_prompts=int(cfg.eval.num_samples),
                                        num_generations=min(2, int(m.num_generations)), temperature=float(m.temperature),
                                        top_p=float(m.top_p), max_new_tokens=int(m.max_new_tokens), seed=int(cfg.seed),
                                        out_file=out / SAMPLES_FILE))
    trial = trial_for_this_job()
    pruning = OptunaPruning(trial) if trial is not None and _prunable(cfg) else None
    if pruning is not None:
        callbacks.append(pruning)
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer, final_validation = _trainer(cfg, callbacks, loggers)
    trainer.fit(run.module, datamodule=run.datamodule)
    if final_validation:
        trainer.validate(run.module, datamodule=run.datamodule, verbose=False)

    result: dict[str, Any] = {
        "trainable_params": run.trainable_params,
        "total_params": run.total_params,
        "quantized_linear": count_quantized_linear(run.model),
        "steps": trainer.global_step,
        "val_loss": _metric(trainer, "val/loss"),
        "train_losses": [round(x, 6) for x in run.module.train_losses],
        **loss_summary(run.module.train_losses),
        "tokens_per_s": round(throughput.tokens_per_s, 1),
        "train_tokens": throughput.tokens,
        # the last value of each metric the method logged during training (BaseMethod.log)
        "method_metrics": dict(run.module.method_metrics),
    }
    result.update(validation_record(trainer, run.module.validation_names))
    if pruning is not None:
        result["pruned_at_step"] = pruning.pruned_at_step
    result["data"] = run.datamodule.summary()
    result.update(final_scores(cfg, run.model, run.tokenizer, run.method,
                               classification=run.module.classification_metrics, records=records,
                               base_score=run.base_score, pairs=pair_records(cfg, run.datamodule),
                               base_preference=run.base_preference, prompts=prompts, base_reward=run.base_reward))
    if cfg.save_model and trainer.is_global_zero:
        saved = run.method.save(run.model, out / run.method.artifact)
        run.tokenizer.save_pretrained(saved)
        result["saved"] = str(saved)
        result["artifact_mb"] = round(folder_mb(saved, "*.safetensors"), 3)
        log.info("saved %s to %s", run.method.artifact, saved)
    return result


def validation_record(trainer: pl.Trainer, names: list[str]) -> dict[str, Any]:
    """The last validation's values of the method's ``validation_metrics``: all of them under
    ``val_metrics`` ({name: value}), and each but the loss (already ``val_loss``) also top-level as
    ``val_<name>`` with ``/`` spelt ``_`` (``rewards/accuracy`` -> ``val_rewards_accuracy``)."""
    values = {name: _metric(trainer, f"val/{name}") for name in names}
    out: dict[str, Any] = {"val_metrics": values}
    for name, value in values.items():
        if name != "loss":
            out[f"val_{name.replace('/', '_')}"] = value
    return out


def _completed_record(out: Path) -> dict[str, Any] | None:
    try:
        record = read_metrics(out)
    except (OSError, ValueError):
        return None
    return record if record.get("status") == "completed" else None


def _trainer(cfg: DictConfig, callbacks: list, loggers: list) -> tuple[pl.Trainer, bool]:
    """Instantiate the Trainer, validating every ``val_check_interval`` optimizer steps and
    always at the end (returns whether a validation after ``fit`` is needed for that)."""
    max_steps = int(cfg.trainer.max_steps)
    interval = int(cfg.trainer.val_check_interval or max_steps)
    if max_steps > 0:
        interval = min(interval, max_steps)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        val_check_interval=interval * accumulate,  # Lightning counts batches, ftlab counts steps
    )
    return trainer, max_steps > 0 and max_steps % interval != 0


def _instantiate_all(nodes: DictConfig | None) -> list:
    """Instantiate every ``_target_`` node of a group like ``callbacks`` or ``logger``."""
    if not nodes:
        return []
    return [hydra.utils.instantiate(node) for node in nodes.values() if node is not None and "_target_" in node]


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None


def _base_record(cfg: DictConfig) -> dict[str, Any]:
    """What ran: method, model, every group choice and the command-line overrides."""
    record: dict[str, Any] = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "status": "running",
        "train_loss_first": None,
        "train_loss_last": None,
        "val_loss": None,
        "trainable_params": None,
        "total_params": None,
        "peak_rss_mb": None,
        "tokens_per_s": None,
        "wall_s": None,
        "max_steps": cfg.trainer.max_steps,
        "method_metrics": None,
        "val_metrics": None,
    }
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        record["choices"] = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
        record["overrides"] = list(hc.overrides.task)
        record["job_num"] = hc.job.get("num")
    return record


def task(cfg: DictConfig) -> float:
    """Hydra's task function: one failed job of a sweep is recorded and the sweep goes on;
    in a single run, an input error is reported as one line and a non-zero exit."""
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train(cfg)
    except Exception as exc:
        if multirun:
            log.error("job failed, the sweep goes on: %s: %s", type(exc).__name__, exc)
            return math.nan
        if isinstance(exc, FtlabError):
            raise SystemExit(f"ftlab: error: {exc}") from None
        raise

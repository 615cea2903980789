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
import shutil
import signal
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ftlab.build import Run, build, final_scores, generation_records, pair_records, reward_records
from ftlab.callbacks import TokenThroughput
from ftlab.checkpoints import CHECKPOINT_DIR, AtomicCheckpointIO, StepCheckpoints, checkpoint_callbacks, newest_checkpoint, resolve_ckpt_path
from ftlab.errors import DivergedError, FtlabError
from ftlab.guards import DivergenceGuard
from ftlab.interrupts import Interrupted, SignalGuard
from ftlab.locks import hold_folder
from ftlab.manifest import data_fingerprint, write_manifest
from ftlab.sweeps.pruning import OptunaPruning, trial_for_this_job
from ftlab.models.architecture import model_label
from ftlab.models.quant import count_quantized_linear
from ftlab.precision import resolve_precision
from ftlab.config import task_of
from ftlab.ranks import across_ranks, check_rank_zero, final_peaks
from ftlab.strategies import build_strategy, check_can_run, gathered_state_dict, shards_weights, writes_through_checkpoint_io
from ftlab.results import PeakMemory, Stopwatch, folder_mb, loss_summary, read_metrics, write_metrics
from ftlab.evaluation.rewards import RolloutSamples
from ftlab.evaluation.samples import GenerationSamples

log = logging.getLogger("ftlab")
SAMPLES_FILE = "samples.jsonl"  # generations logged at every validation


def train(cfg: DictConfig) -> float:
    """Run one job and record it; re-raises failures after writing their status (``failed``,
    ``diverged``, ``interrupted``). The run folder is locked for the job's length."""
    out = Path(cfg.paths.output_dir)
    with ExitStack() as held:
        if rank_zero_only.rank == 0:  # DDP's other ranks are the same run: rank 0 holds its folder
            held.enter_context(hold_folder(out, "run"))
        signals = held.enter_context(SignalGuard())
        done = _completed_record(out) if cfg.get("resume") else None
        if done is not None:
            log.info("resume: %s already completed, skipping it", out)
            return objective_value(cfg, done)
        record = _base_record(cfg)
        watch = Stopwatch()
        run: Run | None = None
        with PeakMemory() as memory:
            try:
                ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), out, bool(cfg.get("resume")))
                if ckpt is not None:
                    record["resumed_from"] = str(ckpt)
                    log.info("continuing from checkpoint %s", ckpt)
                if rank_zero_only.rank == 0:
                    write_manifest(out, cfg, record.get("overrides", []))
                    write_metrics(out, record)  # status: running, until one of the endings below
                check_can_run(cfg)  # FSDP/DeepSpeed need CUDA (checked here, where the job runs)
                run = build(cfg)
                record["architecture"] = getattr(run.model.config, "model_type", None)
                if rank_zero_only.rank == 0:
                    write_manifest(out, cfg, record.get("overrides", []), data=data_fingerprint(run.datamodule))
                record.update(fit(run, out, ckpt, signals, memory))
                record["status"] = "pruned" if record.get("pruned_at_step") is not None else "completed"
            except (SIGTERMException, Interrupted) as exc:
                signum = signals.received or getattr(exc, "signum", signal.SIGTERM)
                record.update(_progress(run), status="interrupted", signal=signal.Signals(signum).name)
                checkpoint = newest_checkpoint(out)
                record["checkpoint"] = str(checkpoint) if checkpoint else None
                raise Interrupted(signum, _interrupted_message(record, out, checkpoint)) from None
            except DivergedError as exc:
                record.update(_progress(run), status="diverged", error=str(exc), diverged_at_step=exc.step,
                              divergence=exc.reason)
                raise
            except BaseException as exc:
                record.update(_progress(run), status="failed", error=f"{type(exc).__name__}: {exc}")
                raise
            finally:
                record["wall_s"] = round(watch.seconds, 2)
                record["peak_rss_mb"] = round(memory.peak_rss_mb, 1)
                record["peak_anon_mb"] = _rounded(memory.peak_anon_mb)  # what the run allocated
                record["peak_file_mb"] = _rounded(memory.peak_file_mb)  # touched pages of mapped files (weights)
                record["peak_gpu_mb"] = memory.peak_gpu_mb
                final_peaks(record, memory)
                if rank_zero_only.rank == 0:
                    path = write_metrics(out, record)
                    log.info("run record: %s (status: %s)", path, record["status"])
                    if record["status"] == "completed":
                        _drop_checkpoints(cfg, out)
    return objective_value(cfg, record)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _progress(run: Run | None) -> dict[str, Any]:
    """How far a run that did not complete got: its steps and training losses."""
    if run is None:
        return {}
    module = run.module
    steps = module.trainer.global_step if module._trainer is not None else 0
    return {"steps": steps, "train_losses": [round(x, 6) for x in module.train_losses], **loss_summary(module.train_losses)}


def _interrupted_message(record: dict[str, Any], out: Path, checkpoint: Path | None) -> str:
    where = f"at step {record['steps']}" if record.get("steps") is not None else "before training started"
    kept = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # a job of a sweep (its command line may be a launcher's, e.g. submitit's): the sweep goes on as a whole
        again = "the sweep's command again with resume=true (completed jobs are skipped)"
    else:
        again = " ".join(["python -m ftlab", *[a for a in sys.argv[1:] if not a.startswith("resume=")], "resume=true"])
    return f"interrupted by {record['signal']} {where} ({kept}); run record {out / 'metrics.json'}; to continue: {again}"


def _drop_checkpoints(cfg: DictConfig, out: Path) -> None:
    """A completed run's result is its saved model: its checkpoints go, unless asked to stay."""
    if (cfg.get("checkpoint") or {}).get("keep_after_success"):
        return
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)


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


def fit(run: Run, out: Path, ckpt: Path | None = None, signals: SignalGuard | None = None,
        memory: PeakMemory | None = None) -> dict[str, Any]:
    """Train (from checkpoint ``ckpt`` when given), validate at the end, save the artifact; return
    the metrics for the run record. ``signals`` turns SIGINT/SIGTERM into a stop at the next step.

    With several processes every rank trains and validates; the numbers all ranks contribute to
    (tokens, losses, memory) are combined in one collective, a sharded model's weights gathered in
    another, and then rank 0 alone scores, saves and returns the record (the others return
    theirs for form's sake; ``train`` writes nothing from them)."""
    cfg = run.cfg
    sharded = shards_weights(cfg)
    throughput = TokenThroughput()  # always on: tokens/s belongs in every run record
    callbacks = [throughput, *_instantiate_all(cfg.get("callbacks"))]
    if signals is not None:
        callbacks.append(signals)
    guard = DivergenceGuard.from_config(cfg)  # stops a diverged run: DivergedError -> status "diverged"
    if guard is not None:
        callbacks.append(guard)
    if cfg.trainer.get("enable_checkpointing", True):
        callbacks += checkpoint_callbacks(cfg, out)
    records = generation_records(cfg, run.datamodule)
    if sharded and int(cfg.eval.num_samples) > 0:  # rank 0 alone cannot run a model whose weights are sharded
        log.info("trainer.strategy shards the weights: no samples during training; the scores after it come "
                 "from the saved %s", run.method.artifact)
    if records and int(cfg.eval.num_samples) > 0 and not sharded:
        callbacks.append(GenerationSamples(records, run.tokenizer, num_samples=int(cfg.eval.num_samples),
                                           max_new_tokens=cfg.eval.max_new_tokens, out_file=out / SAMPLES_FILE,
                                           checker=cfg.eval.checker))
    prompts = reward_records(cfg, run.datamodule)
    if prompts and int(cfg.eval.num_samples) > 0 and not sharded:  # an RL method: sampled answers with their rewards
        m = cfg.method
        callbacks.append(RolloutSamples(prompts, run.tokenizer, run.method.reward_fn, num_prompts=int(cfg.eval.num_samples),
                                        num_generations=min(2, int(m.num_generations)), temperature=float(m.temperature),
                                        top_p=float(m.top_p), max_new_tokens=int(m.max_new_tokens), seed=int(cfg.seed),
                                        out_file=out / SAMPLES_FILE))
    trial = trial_for_this_job()
    pruning = OptunaPruning(trial) if trial is not None and _prunable(cfg) else None
    if pruning is not None:
        callbacks.append(pruning)
    callbacks = _progress_bar(cfg, callbacks)
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # Lightning refuses a learning-rate monitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer, final_validation = _trainer(cfg, callbacks, loggers, run.model)
    with warnings.catch_warnings():  # ResumableLoader continues mid-epoch, which Lightning cannot see
        warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt, weights_only=False)
    if final_validation:
        trainer.validate(run.module, datamodule=run.datamodule, verbose=False)

    # every rank: the numbers all ranks contribute to, then (sharded strategies) the whole weights
    ranks = across_ranks(trainer, tokens=throughput.tokens, seconds=throughput.seconds, losses=run.module.train_losses,
                         memory=memory, batch_size=int(cfg.data.batch_size))
    state = gathered_state_dict(trainer, run.model)
    result: dict[str, Any] = {
        "trainable_params": run.trainable_params,
        "total_params": run.total_params,
        "quantized_linear": count_quantized_linear(run.model),
        "steps": trainer.global_step,
        "train_precision": str(trainer.precision),  # what trained (trainer.precision=auto resolved)
        "val_loss": _metric(trainer, "val/loss"),  # validation is reduced over every rank's share
        **ranks,
        **loss_summary(ranks["train_losses"]),
        # the last value of each metric the method logged during training (BaseMethod.log)
        "method_metrics": dict(run.module.method_metrics),
    }
    result.update(validation_record(trainer, run.module.validation_names))
    if pruning is not None:
        result["pruned_at_step"] = pruning.pruned_at_step
    if not trainer.is_global_zero:  # the scores and the saved model are rank 0's to make, once
        return result
    result["data"] = run.datamodule.summary()
    saved = None
    if cfg.save_model or sharded:
        saved = _save(run, out / run.method.artifact if cfg.save_model else out / ".gathered", state)
        if cfg.save_model:
            result["saved"] = str(saved)
            result["artifact_mb"] = round(folder_mb(saved, "*.safetensors"), 3)
            log.info("saved %s to %s", run.method.artifact, saved)
    # a sharded model cannot generate on rank 0 alone: the scores come from the saved weights on a fresh base
    model = _reloaded(run, saved) if sharded else run.model
    result.update(final_scores(cfg, model, run.tokenizer, run.method,
                               classification=run.module.classification_metrics, records=records,
                               base_score=run.base_score, pairs=pair_records(cfg, run.datamodule),
                               base_preference=run.base_preference, prompts=prompts, base_reward=run.base_reward))
    if saved is not None and not cfg.save_model:
        shutil.rmtree(saved, ignore_errors=True)
    return result


def _progress_bar(cfg: DictConfig, callbacks: list) -> list:
    """One progress bar, ftlab's (steps, not Lightning's ``Epoch 0/-2``), while
    ``trainer.enable_progress_bar`` is true; none otherwise (Lightning refuses a bar then)."""
    from pytorch_lightning.callbacks import ProgressBar

    from ftlab.progress import StepProgressBar

    if not cfg.trainer.get("enable_progress_bar", True):
        return [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not any(isinstance(c, ProgressBar) for c in callbacks):  # else Lightning would add its own
        callbacks = [*callbacks, StepProgressBar()]
    return callbacks


def _save(run: Run, directory: Path, state: dict[str, Any] | None) -> Path:
    """The method's artifact in HF format, written whole or not at all: into a fresh folder beside
    ``directory``, renamed into place once complete (a crash leaves the previous one, or none)."""
    check_rank_zero(str(directory))
    partial = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    saved = run.method.save(run.model, partial) if state is None else run.method.save(run.model, partial, state_dict=state)
    run.tokenizer.save_pretrained(saved)
    if directory.exists():
        shutil.rmtree(directory)
    saved.rename(directory)
    return directory


def _reloaded(run: Run, saved: Path) -> Any:
    """The trained model rebuilt in this process from its saved artifact, as ``ftlab eval`` does."""
    from ftlab.build import load_base

    labels = run.datamodule.labels if task_of(run.cfg) == "classification" else None
    method, base, _ = load_base(run.cfg, labels=labels)
    return method.load(base, saved).eval()


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


def _trainer(cfg: DictConfig, callbacks: list, loggers: list, model: Any = None) -> tuple[pl.Trainer, bool]:
    """Instantiate the Trainer, validating every ``val_check_interval`` optimizer steps and
    always at the end (returns whether a validation after ``fit`` is needed for that); the
    strategy gets what only the ``model`` tells (FSDP's decoder-layer class)."""
    max_steps = int(cfg.trainer.max_steps)
    interval = int(cfg.trainer.val_check_interval or max_steps)
    if max_steps > 0:
        interval = min(interval, max_steps)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    checkpointing = any(isinstance(c, StepCheckpoints) for c in callbacks)
    strategy = build_strategy(cfg.trainer, model) if model is not None else cfg.trainer.get("strategy", "auto")
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        enable_checkpointing=checkpointing,
        plugins=[AtomicCheckpointIO()] if checkpointing and writes_through_checkpoint_io(strategy) else None,
        strategy=strategy,
        val_check_interval=interval * accumulate,  # Lightning counts batches, ftlab counts steps
        precision=resolve_precision(cfg.trainer.get("precision"), cfg.trainer.get("accelerator")),
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
        "model": model_label(cfg.model),  # the model's own name (the hub id, the folder's name, tiny-<family>)
        "model_group": cfg.model.name,
        "architecture": None,  # transformers' model_type, once the model is built
        "seed": cfg.seed,
        "status": "running",
        "train_loss_first": None,
        "train_loss_last": None,
        "val_loss": None,
        "trainable_params": None,
        "total_params": None,
        "peak_rss_mb": None,
        "peak_anon_mb": None,
        "peak_file_mb": None,
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
    except Interrupted as exc:  # a signal stops the sweep too; what finished is still compared
        if rank_zero_only.rank != 0:  # DDP's other ranks end the same way, silently
            raise
        print(f"ftlab: {exc.message}", file=sys.stderr)
        if multirun:
            _compare_what_ran(HydraConfig.get().sweep.dir)
        raise
    except Exception as exc:
        if multirun:
            log.error("job failed, the sweep goes on: %s: %s", type(exc).__name__, exc)
            return math.nan
        if isinstance(exc, FtlabError):
            raise SystemExit(f"ftlab: error: {exc}") from None
        raise


def _compare_what_ran(sweep_dir: str) -> None:
    """The comparison of an interrupted sweep: its finished jobs, and those that did not run."""
    from ftlab.sweeps.compare import write_comparison

    try:
        write_comparison([sweep_dir], sweep_dir)
        log.info("comparison of the finished jobs written to %s", sweep_dir)
    except Exception as exc:  # the interruption is what the user must hear about
        log.error("could not compare the sweep in %s: %s: %s", sweep_dir, type(exc).__name__, exc)

"""One training run, top to bottom: config -> model -> method -> data -> fit -> save -> record.

``train(cfg)`` is the task function Hydra calls once per job. It always leaves a
``metrics.json`` in the run folder (``status: failed`` with the error when something breaks,
``pruned`` when an Optuna pruner stopped it early),
and returns the validation loss, the metric a Hydra sweeper minimises.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities import rank_zero_only
from torch import nn
from transformers import PreTrainedTokenizerBase

from ftlab.callbacks import TokenThroughput
from ftlab.data.cache import fingerprint
from ftlab.config import task_of, validate
from ftlab.data.datamodule import FineTuneDataModule
from ftlab.errors import FtlabError
from ftlab.generation import GenerationScore, base_score_cached, reference_answer, score_generations
from ftlab.method import BaseMethod
from ftlab.models import count_parameters, load_model
from ftlab.module import FineTuneModule
from ftlab.pruning import OptunaPruning, trial_for_this_job
from ftlab.quant import count_quantized_linear
from ftlab.results import PeakMemory, Stopwatch, folder_mb, loss_summary, read_metrics, write_metrics
from ftlab.samples import GenerationSamples

log = logging.getLogger("ftlab")
SAMPLES_FILE = "samples.jsonl"  # generations logged at every validation


def train(cfg: DictConfig) -> float:
    """Run one job and record it; re-raises failures after writing ``status: failed``."""
    out = Path(cfg.paths.output_dir)
    done = _completed_record(out) if cfg.get("resume") else None
    if done is not None:
        log.info("resume: %s already completed, skipping it", out)
        return done["val_loss"] if done.get("val_loss") is not None else math.nan
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
    return record["val_loss"] if record.get("val_loss") is not None else math.nan


@dataclass
class Run:
    """Everything one job trains with, built from the config before ``fit`` touches it."""

    cfg: DictConfig
    method: BaseMethod
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    module: FineTuneModule
    datamodule: FineTuneDataModule
    trainable_params: int
    total_params: int
    base_score: GenerationScore | None = None


def load_base(
    cfg: DictConfig, labels: Sequence[str] | None = None
) -> tuple[BaseMethod, nn.Module, PreTrainedTokenizerBase]:
    """Validate, seed, load the base model (with a classification head for ``labels``); return
    it with the (not yet applied) method."""
    info = validate(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.model, cfg.quantization, cache_dir=cfg.paths.cache_dir, labels=labels)
    return info.cls(OmegaConf.to_object(cfg.method)), model, tokenizer


def build_model(cfg: DictConfig) -> tuple[BaseMethod, nn.Module, PreTrainedTokenizerBase]:
    """The base model with the method applied to it."""
    method, base, tokenizer = load_base(cfg)
    return method, method.apply(base), tokenizer


def build(cfg: DictConfig) -> Run:
    """Data first (a classifier's head needs the label set), then the base model, its score
    before fine-tuning, the method applied to it, the data connected to its tokenizer, the module."""
    datamodule = FineTuneDataModule(cfg.data)
    labels = datamodule.labels if task_of(cfg) == "classification" else None
    method, base, tokenizer = load_base(cfg, labels)
    base_score = score_base(cfg, base, tokenizer, datamodule)
    model = method.apply(base)
    trainable, total = count_parameters(model)
    log.info(
        "method %s on %s: trainable params %s || all params %s || trainable %.4f%%",
        cfg.method.name, cfg.model.name, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
    )
    packing = bool(cfg.data.get("packing", False))
    if packing and not method.packing:
        log.warning("method '%s' cannot take packed batches (%s): data.packing is off for this run",
                    cfg.method.name, method.no_packing)
        packing = False
    context = getattr(model.config, "max_position_embeddings", None)  # data.max_length is capped by it
    datamodule.connect(tokenizer, max_length=context, cache_dir=cfg.paths.cache_dir, packing=packing)
    module = FineTuneModule(
        model,
        method,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        labels=labels,
    )
    return Run(cfg, method, model, tokenizer, module, datamodule, trainable, total, base_score)


def generation_records(cfg: DictConfig, datamodule: FineTuneDataModule) -> list[dict]:
    """The held-out prompts whose answers are checked: the first ``eval.num_prompts`` validation
    chats with a reference answer (none for classification, text data or ``eval.generate=false``)."""
    ev = cfg.get("eval")
    if ev is None or not ev.generate or task_of(cfg) != "causal_lm" or datamodule.kind != "chat":
        return []
    records = [r for r in datamodule.val_records if reference_answer(r) is not None]
    return records if ev.num_prompts is None else records[: int(ev.num_prompts)]


def _score(cfg: DictConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict],
           method: BaseMethod | None = None) -> GenerationScore:
    ev = cfg.eval
    return score_generations(model, tokenizer, records, checker=ev.checker, max_new_tokens=ev.max_new_tokens,
                             batch_size=int(ev.batch_size), num_samples=int(ev.num_samples),
                             model_inputs=method.model_inputs if method is not None else None)


def score_base(cfg: DictConfig, base: nn.Module, tokenizer: PreTrainedTokenizerBase,
               datamodule: FineTuneDataModule) -> GenerationScore | None:
    """The base model's score on the held-out prompts, computed once per base, data and eval
    settings (a sweep over methods shares it through the cache)."""
    records = generation_records(cfg, datamodule)
    if not records:
        return None
    key = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "quantization": OmegaConf.to_container(cfg.quantization, resolve=True),
        "records": fingerprint([{k: v for k, v in r.items() if not k.startswith("_")} for r in records]),
        "eval": {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k != "num_samples"},
        # 2: 4-bit bases score in bitsandbytes' standard layout; scores cached while it repacked
        # them for CPU inference came from a slightly different model
        "format": 2,
    }
    score, hit = base_score_cached(Path(cfg.paths.cache_dir), key, lambda: _score(cfg, base, tokenizer, records))
    log.info("base model: %s %d/%d (%.1f%%)%s", score.checker, score.correct, score.total, 100 * score.score,
             " (cached)" if hit else "")
    return score


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
    trial = trial_for_this_job()
    pruning = OptunaPruning(trial) if trial is not None else None
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
    }
    if pruning is not None:
        result["pruned_at_step"] = pruning.pruned_at_step
    result["data"] = run.datamodule.summary()
    result.update(final_scores(run, records))
    if cfg.save_model and trainer.is_global_zero:
        saved = run.method.save(run.model, out / run.method.artifact)
        run.tokenizer.save_pretrained(saved)
        result["saved"] = str(saved)
        result["artifact_mb"] = round(folder_mb(saved, "*.safetensors"), 3)
        log.info("saved %s to %s", run.method.artifact, saved)
    return result


def final_scores(run: Run, records: list[dict]) -> dict[str, Any]:
    """Classification metrics, or exact match of the base and the fine-tuned model."""
    out: dict[str, Any] = {}
    metrics = run.module.classification_metrics
    if metrics:
        out["classification"] = metrics
        out.update({k: round(v, 6) for k, v in metrics.items() if k != "per_class"})
        log.info("validation: accuracy %.4f, macro precision %.4f recall %.4f F1 %.4f",
                 metrics["accuracy"], metrics["precision"], metrics["recall"], metrics["f1"])
    if records:
        tuned = _score(run.cfg, run.model, run.tokenizer, records, run.method)
        base = run.base_score
        out["exact_match"] = tuned.score
        out["base_exact_match"] = base.score if base is not None else None
        out["generation"] = {"checker": tuned.checker, "prompts": tuned.total, "finetuned_correct": tuned.correct,
                             "base_correct": base.correct if base is not None else None,
                             "samples": tuned.samples}
        log.info("fine-tuned model: %s %d/%d (%.1f%%); base model %s", tuned.checker, tuned.correct, tuned.total,
                 100 * tuned.score, f"{base.correct}/{base.total}" if base is not None else "not measured")
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

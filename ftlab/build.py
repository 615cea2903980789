"""Config -> model, method, data, module: what ``ftlab train``, ``ftlab eval`` and the exports share.

``load_base`` validates the config, seeds and loads the base model with the (not yet applied)
method; ``build_model`` applies the method; ``build`` assembles everything one training job needs
(data, base score, model, module) into a ``Run``. ``score_base`` and ``final_scores`` measure the
base and the fine-tuned model on the held-out prompts (or collect the classification metrics).

Why a module of its own: ``ftlab/train.py`` is the training script (Trainer, callbacks, the run
record, Hydra's task function). ``ftlab eval``, ``ftlab export``, ``ftlab methods --sizes`` and the
method contract need the same base model, method and scores but not the training loop, so they
import them from here; library code never imports the training script (``tests/test_layout.py``
checks it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from ftlab.config import task_of, validate
from ftlab.data.cache import rows_fingerprint
from ftlab.data.datamodule import FineTuneDataModule
from ftlab.evaluation.generation import GenerationScore, base_score_cached, reference_answer, score_generations
from ftlab.methods.base import BaseMethod
from ftlab.models.loading import count_parameters, load_model
from ftlab.module import FineTuneModule

__all__ = ["Run", "build", "build_model", "final_scores", "generation_records", "load_base", "score_base"]

log = logging.getLogger("ftlab")


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
        "records": rows_fingerprint(records),
        "eval": {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k != "num_samples"},
        # 2: 4-bit bases score in bitsandbytes' standard layout; scores cached while it repacked
        # them for CPU inference came from a slightly different model
        "format": 2,
    }
    score, hit = base_score_cached(Path(cfg.paths.cache_dir), key, lambda: _score(cfg, base, tokenizer, records))
    log.info("base model: %s %d/%d (%.1f%%)%s", score.checker, score.correct, score.total, 100 * score.score,
             " (cached)" if hit else "")
    return score


def final_scores(
    cfg: DictConfig,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    method: BaseMethod,
    *,
    classification: Mapping[str, Any] | None,
    records: list[dict],
    base_score: GenerationScore | None,
) -> dict[str, Any]:
    """Classification metrics (``classification``: the module's, None or empty when it has none),
    or exact match on ``records`` of the fine-tuned ``model`` next to ``base_score``, the base's."""
    out: dict[str, Any] = {}
    if classification:
        out["classification"] = classification
        out.update({k: round(v, 6) for k, v in classification.items() if k != "per_class"})
        log.info("validation: accuracy %.4f, macro precision %.4f recall %.4f F1 %.4f",
                 classification["accuracy"], classification["precision"], classification["recall"],
                 classification["f1"])
    if records:
        tuned = _score(cfg, model, tokenizer, records, method)
        base = base_score
        out["exact_match"] = tuned.score
        out["base_exact_match"] = base.score if base is not None else None
        out["generation"] = {"checker": tuned.checker, "prompts": tuned.total, "finetuned_correct": tuned.correct,
                             "base_correct": base.correct if base is not None else None,
                             "samples": tuned.samples}
        log.info("fine-tuned model: %s %d/%d (%.1f%%); base model %s", tuned.checker, tuned.correct, tuned.total,
                 100 * tuned.score, f"{base.correct}/{base.total}" if base is not None else "not measured")
    return out

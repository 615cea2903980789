"""Config -> model, method, data, module: what ``ftlab train``, ``ftlab eval`` and the exports share.

``load_base`` validates the config, seeds and loads the base model with the (not yet applied)
method; ``build_model`` applies the method; ``build`` assembles everything one training job needs
(data, base score, model, module) into a ``Run``. ``score_base`` and ``final_scores`` measure the
base and the fine-tuned model on the held-out prompts (or collect the classification metrics);
``score_base_preference`` and ``final_scores`` do the same for held-out preference pairs
(``preference_accuracy``, or ``reward_accuracy`` for a reward model).

The method's ``batch_kind`` selects the batches the data module gives (``"preference"``: pairs,
refused before the model loads when the data has none), and its ``head`` the model's output
layer (``"reward"``: a sequence classifier with one output, here and wherever a run is loaded).

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
from ftlab.errors import MethodError
from ftlab.evaluation.generation import GenerationScore, base_score_cached, reference_answer, score_generations
from ftlab.evaluation.preference import (PreferenceScore, base_preference_cached, preference_accuracy,
                                         preference_records, reward_accuracy)
from ftlab.evaluation.rewards import RewardScore, base_reward_cached, score_rewards
from ftlab.methods.base import BATCH_KINDS, HEADS, BaseMethod
from ftlab.models.architecture import architecture
from ftlab.models.loading import count_parameters, load_model
from ftlab.module import FineTuneModule

__all__ = ["CONNECT_KWARGS", "REWARD_LABELS", "Run", "build", "build_model", "check_batches", "final_scores", "generation_records",
           "load_base", "method_class", "pair_records", "score_base", "score_base_preference"]

log = logging.getLogger("ftlab")
REWARD_LABELS = ("reward",)  # the one output of a reward head (``head = "reward"``)
# what the data module is asked for, per batch_kind (``FineTuneDataModule.connect``)
CONNECT_KWARGS: dict[str, dict[str, Any]] = {"sft": {}, "preference": {"pairs": True}, "prompt": {"prompts": True}}


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
    base_preference: PreferenceScore | None = None  # the base's preference accuracy on held-out pairs
    base_reward: RewardScore | None = None  # an RL method's reward of the base's answers to held-out prompts


def load_base(
    cfg: DictConfig, labels: Sequence[str] | None = None
) -> tuple[BaseMethod, nn.Module, PreTrainedTokenizerBase]:
    """Validate, seed, load the base model (with a classification head for ``labels``, a scalar
    reward head for a method whose ``head`` is ``"reward"``); return it with the (not yet applied)
    method."""
    info = validate(cfg)
    _check_method_kinds(info.cls, info.name)
    if info.cls.head == "reward":
        labels = REWARD_LABELS
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.model, cfg.quantization, cache_dir=cfg.paths.cache_dir, labels=labels)
    return info.cls(OmegaConf.to_object(cfg.method)), model, tokenizer


def _check_method_kinds(cls: type[BaseMethod], name: str) -> None:
    if cls.batch_kind not in BATCH_KINDS:
        raise MethodError(f"method '{name}' sets batch_kind={cls.batch_kind!r}; ftlab gives {' | '.join(BATCH_KINDS)}")
    if cls.head not in HEADS:
        raise MethodError(f"method '{name}' sets head={cls.head!r}; ftlab builds {' | '.join(HEADS)}")


def method_class(cfg: DictConfig) -> type[BaseMethod]:
    """The class of the method the config selects (a preset's base method for a preset)."""
    from ftlab.registry import get_registry

    return get_registry().get(str(cfg.method.name)).cls


def check_batches(cfg: DictConfig, cls: type[BaseMethod], datamodule: FineTuneDataModule) -> None:
    """Refuse, before any model loads, a method whose batches the data cannot give: a preference
    method on data without pairs (the data module's ``DataError``, which the command line shows as
    one ``ftlab: error:`` line naming the method, the data and what works)."""
    if cls.batch_kind == "preference":  # the data module's refusal: a DataError naming what the data has
        datamodule.check_pairs(str(cfg.method.name))
    elif cls.batch_kind == "prompt":  # an RL method answers chat prompts
        datamodule.check_prompts(str(cfg.method.name))


def build_model(cfg: DictConfig) -> tuple[BaseMethod, nn.Module, PreTrainedTokenizerBase]:
    """The base model with the method applied to it."""
    method, base, tokenizer = load_base(cfg)
    return method, method.apply(base), tokenizer


def build(cfg: DictConfig) -> Run:
    """Data first (a classifier's head needs the label set), then the base model, its score
    before fine-tuning, the method applied to it, the data connected to its tokenizer, the module."""
    datamodule = FineTuneDataModule(cfg.data)
    validate(cfg)  # an unknown method or a bad field first, then what the data cannot give
    check_batches(cfg, method_class(cfg), datamodule)
    labels = datamodule.labels if task_of(cfg) == "classification" else None
    method, base, tokenizer = load_base(cfg, labels)
    base_score = score_base(cfg, base, tokenizer, datamodule)
    base_preference = score_base_preference(cfg, base, tokenizer, datamodule)
    base_reward = score_base_reward(cfg, base, tokenizer, datamodule, method)
    model = method.apply(base)
    trainable, total = count_parameters(model)
    log.info(
        "method %s on %s: trainable params %s || all params %s || trainable %.4f%%",
        cfg.method.name, architecture(cfg.model, cfg.paths.cache_dir).describe(), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1),
    )
    packing = bool(cfg.data.get("packing", False))
    if packing and not method.packing:
        log.warning("method '%s' cannot take packed batches (%s): data.packing is off for this run",
                    cfg.method.name, method.no_packing)
        packing = False
    context = getattr(model.config, "max_position_embeddings", None)  # data.max_length is capped by it
    datamodule.connect(tokenizer, max_length=context, cache_dir=cfg.paths.cache_dir, packing=packing,
                       **CONNECT_KWARGS[method.batch_kind])
    if method.batch_kind == "prompt":  # an RL method reads each prompt's example (reference answer) by index
        method.use_data(tokenizer, datamodule.train_records, datamodule.val_records)
    module = FineTuneModule(
        model,
        method,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        scheduler=hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        labels=labels,
    )
    return Run(cfg, method, model, tokenizer, module, datamodule, trainable, total, base_score, base_preference,
               base_reward)


def generation_records(cfg: DictConfig, datamodule: FineTuneDataModule) -> list[dict]:
    """The held-out prompts whose answers are checked: the first ``eval.num_prompts`` validation
    chats with a reference answer (none for classification, text data or ``eval.generate=false``)."""
    ev = cfg.get("eval")
    if ev is None or not ev.generate or task_of(cfg) != "causal_lm" or datamodule.kind != "chat":
        return []
    if method_class(cfg).head != "lm":  # a reward model scores answers, it does not write them
        return []
    records = [r for r in datamodule.val_records if reference_answer(r) is not None]
    return records if ev.num_prompts is None else records[: int(ev.num_prompts)]


def reward_records(cfg: DictConfig, datamodule: FineTuneDataModule) -> list[dict]:
    """The held-out prompts an RL method's reward scores (greedy answers of the base and of the
    trained model): the first ``eval.num_prompts`` validation chats; none for other methods."""
    ev = cfg.get("eval")
    if ev is None or task_of(cfg) != "causal_lm" or datamodule.kind != "chat" or method_class(cfg).batch_kind != "prompt":
        return []
    records = list(datamodule.val_records)
    return records if ev.num_prompts is None else records[: int(ev.num_prompts)]


def _reward_score(cfg: DictConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict],
                  method: BaseMethod | None = None) -> RewardScore:
    ev = cfg.eval
    return score_rewards(model, tokenizer, records, _reward_of(cfg, method), max_new_tokens=ev.max_new_tokens,
                         batch_size=int(ev.batch_size), num_samples=int(ev.num_samples),
                         model_inputs=method.model_inputs if method is not None else None)


def _reward_of(cfg: DictConfig, method: BaseMethod | None) -> Any:
    """The RL method's reward (``reward_fn``: a function, or a reward model), else ``method.reward``'s name."""
    reward = getattr(method, "reward_fn", None)
    return reward if reward is not None else str(cfg.method.reward)


def _base_key(cfg: DictConfig, **parts: Any) -> dict[str, Any]:
    """The cache key of a base-model score: the base (model and quantization) and ``parts``."""
    return {"model": OmegaConf.to_container(cfg.model, resolve=True),
            "quantization": OmegaConf.to_container(cfg.quantization, resolve=True), **parts}


def _eval_key(cfg: DictConfig) -> dict[str, Any]:
    """The eval settings a base score depends on (how many samples are logged is not one)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.eval, resolve=True).items() if k != "num_samples"}


def score_base_reward(cfg: DictConfig, base: nn.Module, tokenizer: PreTrainedTokenizerBase,
                      datamodule: FineTuneDataModule, method: BaseMethod | None = None) -> RewardScore | None:
    """An RL method's reward of the base model's greedy answers to the held-out prompts (None for
    other methods), cached per base, prompts, reward and eval settings like the base exact match."""
    records = reward_records(cfg, datamodule)
    if not records:
        return None
    reward = method.reward_key() if hasattr(method, "reward_key") else str(cfg.method.reward)
    key = _base_key(cfg, records=rows_fingerprint(records), reward=reward, eval=_eval_key(cfg), format=1)
    score, hit = base_reward_cached(Path(cfg.paths.cache_dir), key,
                                    lambda: _reward_score(cfg, base, tokenizer, records, method))
    log.info("base model: mean reward %.4f (%s) on %d held-out prompts%s", score.mean, score.reward, score.total,
             " (cached)" if hit else "")
    return score


def pair_records(cfg: DictConfig, datamodule: FineTuneDataModule) -> list[dict]:
    """The held-out preference pairs (validation chats with a rejected answer) whose preference
    (or reward) accuracy is measured; none for classification or text data."""
    if cfg.get("eval") is None or task_of(cfg) != "causal_lm" or datamodule.kind != "chat" or not datamodule.has_pairs:
        return []
    return list(preference_records(datamodule.val_records))


def _eval_max_length(cfg: DictConfig, model: nn.Module) -> int:
    """Pairs are cut as training cuts them: ``data.max_length``, capped by the model's context."""
    length = int(cfg.data.max_length)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(length, int(context)) if context else length


def _preference(cfg: DictConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[dict],
                method: BaseMethod | None = None, reward: bool = False) -> PreferenceScore:
    batch_size, length = int(cfg.eval.batch_size), _eval_max_length(cfg, model)
    if reward:
        return reward_accuracy(model, tokenizer, pairs, length, batch_size=batch_size)
    return preference_accuracy(model, tokenizer, pairs, length, batch_size=batch_size,
                               model_inputs=method.model_inputs if method is not None else None)


def score_base_preference(cfg: DictConfig, base: nn.Module, tokenizer: PreTrainedTokenizerBase,
                          datamodule: FineTuneDataModule) -> PreferenceScore | None:
    """The base model's preference accuracy on the held-out pairs (None without pairs, or when the
    base carries a new reward head, whose scores mean nothing yet); cached per base, pairs and
    max_length, so a sweep over methods measures it once."""
    pairs = pair_records(cfg, datamodule)
    if not pairs or method_class(cfg).head != "lm":
        return None
    key = _base_key(cfg, pairs=rows_fingerprint(pairs), max_length=_eval_max_length(cfg, base), format=1)
    score, hit = base_preference_cached(Path(cfg.paths.cache_dir), key, lambda: _preference(cfg, base, tokenizer, pairs))
    log.info("base model: preference accuracy %d/%d (%.1f%%)%s", score.correct, score.pairs, 100 * score.accuracy,
             " (cached)" if hit else "")
    return score


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
    # format 2: 4-bit bases score in bitsandbytes' standard layout; scores cached while it repacked
    # them for CPU inference came from a slightly different model
    key = _base_key(cfg, records=rows_fingerprint(records), eval=_eval_key(cfg), format=2)
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
    pairs: list[dict] | None = None,
    base_preference: PreferenceScore | None = None,
    prompts: list[dict] | None = None,
    base_reward: RewardScore | None = None,
) -> dict[str, Any]:
    """Classification metrics (``classification``: the module's, None or empty when it has none),
    or exact match on ``records`` of the fine-tuned ``model`` next to ``base_score``, the base's;
    with held-out preference ``pairs``: ``preference_accuracy`` (next to ``base_preference``) of a
    causal LM, or ``reward_accuracy`` and ``reward_margin`` of a reward model (``head="reward"``)."""
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
    if pairs:
        if method.head == "reward":
            score = _preference(cfg, model, tokenizer, pairs, method, reward=True)
            out["reward_accuracy"], out["reward_margin"] = round(score.accuracy, 6), round(score.margin, 6)
            out["preference"] = {"pairs": score.pairs, "reward_correct": score.correct}
            log.info("reward model: chosen scored higher in %d/%d held-out pairs (%.1f%%), mean margin %.4f",
                     score.correct, score.pairs, 100 * score.accuracy, score.margin)
        else:
            score = _preference(cfg, model, tokenizer, pairs, method)
            out["preference_accuracy"] = round(score.accuracy, 6)
            out["base_preference_accuracy"] = round(base_preference.accuracy, 6) if base_preference is not None else None
            out["preference"] = {"pairs": score.pairs, "finetuned_correct": score.correct,
                                 "base_correct": base_preference.correct if base_preference is not None else None,
                                 "logp_margin": round(score.margin, 6),
                                 "base_logp_margin": round(base_preference.margin, 6) if base_preference is not None else None}
            log.info("fine-tuned model: preference accuracy %d/%d (%.1f%%); base model %s", score.correct, score.pairs,
                     100 * score.accuracy,
                     f"{base_preference.correct}/{base_preference.pairs}" if base_preference is not None else "not measured")
    if prompts:  # an RL method: its reward of the trained model's greedy answers, next to the base's
        tuned = _reward_score(cfg, model, tokenizer, prompts, method)
        out["mean_reward"] = round(tuned.mean, 6)
        out["base_mean_reward"] = round(base_reward.mean, 6) if base_reward is not None else None
        out["reward_eval"] = {"reward": tuned.reward, "prompts": tuned.total, "samples": tuned.samples}
        log.info("fine-tuned model: mean reward %.4f (%s) on %d held-out prompts; base model %s", tuned.mean,
                 tuned.reward, tuned.total, f"{base_reward.mean:.4f}" if base_reward is not None else "not measured")
    return out

"""Held-out preference pairs: does the model prefer the chosen answer?

* ``preference_accuracy`` (any causal LM, whatever trained it): the share of pairs whose chosen
  answer has the higher summed log-probability under the model, the prompt being the same. It is
  measured for the base before training and for the fine-tuned model after, so an SFT run and a
  DPO run compare in one table. ``margin`` is the mean of log p(chosen) - log p(rejected).
* ``reward_accuracy`` (a reward model, one output per sequence): the share of pairs whose chosen
  conversation scores higher, and ``margin``, the mean score difference.

Pairs are the validation records that carry a ``rejected`` conversation (``data.format=preference``),
encoded as training encodes them (``encode_pair``: the chat template, the answer's tokens labelled);
a pair that truncation to ``max_length`` leaves without answer tokens on either side is skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ftlab.cache import cached_json, fingerprint
from ftlab.data.chat_masking import IGNORE_INDEX, num_label_tokens
from ftlab.data.encode import encode_pair, pad_id_of
from ftlab.evaluation.generation import eval_mode

__all__ = ["PreferenceScore", "base_preference_cached", "encode_pairs", "preference_accuracy", "preference_records",
           "reward_accuracy"]

ModelInputs = Callable[[dict[str, torch.Tensor]], dict[str, Any]]
Encoded = dict[str, list[int]]


@dataclass
class PreferenceScore:
    """``accuracy`` = ``correct`` / ``pairs``; ``margin``: mean of chosen minus rejected (log-prob or reward)."""

    accuracy: float
    correct: int
    pairs: int
    margin: float


def preference_records(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records that are pairs: a chosen conversation (``messages``) and a ``rejected`` one."""
    return [r for r in records if isinstance(r.get("messages"), list) and isinstance(r.get("rejected"), list)]


def encode_pairs(tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int) -> list[tuple[Encoded, Encoded]]:
    """(chosen, rejected) token ids and labels of every pair with answer tokens on both sides,
    encoded as the pair batches of training are (``ftlab.data.encode.encode_pair``: labels on the
    turns after the messages both sides share)."""
    out = []
    for record in preference_records(records):
        encoded = encode_pair(tokenizer, record, max_length)
        chosen, rejected = ({key: encoded[f"{side}_{key}"] for key in ("input_ids", "attention_mask", "labels")}
                            for side in ("chosen", "rejected"))
        if num_label_tokens(chosen) > 0 and num_label_tokens(rejected) > 0:
            out.append((chosen, rejected))
    return out


def _right_pad(rows: Sequence[Encoded], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {key: torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=torch.long, device=device)
            for key, value in fill.items()}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _summed_logps(model: nn.Module, batch: dict[str, torch.Tensor], model_inputs: ModelInputs | None) -> torch.Tensor:
    from ftlab.methods.preference_losses import sequence_logps

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model_inputs is not None:  # what the method adds (multitask prompt tuning's task_ids)
        extra = model_inputs(dict(inputs))
        inputs.update({k: v for k, v in extra.items() if k not in ("input_ids", "attention_mask", "labels")})
    logits = model(**inputs).logits
    width = batch["input_ids"].shape[1]
    if logits.shape[1] > width:  # prompt tuning puts its virtual tokens first: keep the sequence's positions
        logits = logits[:, -width:]
    return sequence_logps(logits, batch["labels"])


def _scored(pairs: Sequence[tuple[Encoded, Encoded]], score: Callable[[dict[str, torch.Tensor]], torch.Tensor],
            pad_id: int, device: torch.device, batch_size: int) -> PreferenceScore:
    diffs: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        chosen = score(_right_pad([c for c, _ in chunk], pad_id, device))
        rejected = score(_right_pad([r for _, r in chunk], pad_id, device))
        diffs.extend((chosen - rejected).float().cpu().tolist())
    correct = sum(1 for d in diffs if d > 0)
    total = len(diffs)
    return PreferenceScore(correct / total if total else 0.0, correct, total, sum(diffs) / total if total else 0.0)


def preference_accuracy(model: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int,
                        batch_size: int = 8, model_inputs: ModelInputs | None = None) -> PreferenceScore:
    """Share of the pairs in ``records`` whose chosen answer the causal LM ``model`` gives the
    higher summed log-probability (eval mode, no gradients)."""
    pairs = encode_pairs(tokenizer, records, max_length)
    with eval_mode(model), torch.no_grad():
        return _scored(pairs, lambda b: _summed_logps(model, b, model_inputs), pad_id_of(tokenizer), _device(model),
                       batch_size)


def reward_accuracy(model: nn.Module, tokenizer: Any, records: Sequence[Mapping[str, Any]], max_length: int,
                    batch_size: int = 8) -> PreferenceScore:
    """Share of the pairs in ``records`` whose chosen conversation the reward model ``model`` (one
    output per sequence) scores higher; ``margin`` is the mean score difference."""
    from ftlab.methods.reward import reward_scores

    pairs = encode_pairs(tokenizer, records, max_length)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    pad_id = int(pad) if pad is not None else pad_id_of(tokenizer)
    with eval_mode(model), torch.no_grad():
        return _scored(pairs, lambda b: reward_scores(model, b["input_ids"], b["attention_mask"]), pad_id,
                       _device(model), batch_size)


def base_preference_cached(cache_dir: str | Path, key: Mapping[str, Any],
                           compute: Callable[[], PreferenceScore]) -> tuple[PreferenceScore, bool]:
    """The base model's preference accuracy for ``key`` (base, quantization, pairs, max_length),
    computed once and shared by the jobs of a sweep, like the base's exact match."""
    path = Path(cache_dir) / "base_eval" / f"preference-{fingerprint(dict(key), strict=False)}.json"
    return cached_json(path, lambda: {"key": dict(key), "score": asdict(compute())},
                       lambda stored: PreferenceScore(**stored["score"]))

"""Greedy answers to held-out prompts, and their score against the reference answers.

Why: validation loss says the model fits the data; whether it now *answers* correctly (exact
match on the synthetic tasks) is what fine-tuning is for, and comparing the fine-tuned model
with its base shows what the run bought. Prompts are built with ``encode_prompt``, so the model
sees exactly the tokens it was trained on up to the answer.

Batches are left-padded, so every prompt ends where generation starts. Prompt-learning PEFT
models are not left to ``PeftModel.generate``: with transformers 5 it drops prefix tuning's
prefixes and feeds prompt tuning's last tokens twice into the cache (peft 0.21). Virtual-token
methods (prompt, p-tuning, multitask prompt) get their soft prompt prepended here as input
embeddings (after the padding, so positions match training) and generate through the base
model; prefix tuning, whose prefixes live in the cache, is decoded one record at a time with a
plain forward loop, the same computation the training loss sees.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ftlab.cache import cached_json, fingerprint
from ftlab.evaluation.checkers import get_checker
from ftlab.data.chat_masking import IGNORE_INDEX, encode_chat, encode_prompt
from ftlab.data.encode import pad_id_of
from ftlab.errors import ConfigError

__all__ = [
    "GenerationScore", "base_score_cached", "generate", "generate_batch", "generate_ids", "generation_config",
    "prompt_learning_config", "prompt_text", "reference_answer", "score_generations", "stop_token_ids", "until_stop",
]

ModelInputs = Callable[[dict[str, torch.Tensor]], dict[str, Any]]

ANSWER_SLACK_TOKENS = 8  # default max_new_tokens: the longest reference plus this much


def reference_answer(record: Mapping[str, Any]) -> str | None:
    """The content of the record's last assistant message; None when it has none."""
    for message in reversed(record.get("messages") or []):
        if message.get("role") == "assistant":
            return message.get("content")
    return None


def prompt_text(record: Mapping[str, Any]) -> str:
    """The last user message before the answer: what a person reading samples wants to see."""
    messages = list(record.get("messages") or [])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    for message in reversed(messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def stop_token_ids(tokenizer: Any, model: nn.Module | None = None) -> list[int]:
    """EOS ids plus the special token that closes an assistant turn in the chat template.

    The model learns to end its answer with the template's end-of-turn token (``encode_chat``
    labels it), which is not always the tokenizer's EOS (``<|im_end|>`` vs ``<|endoftext|>``).
    """
    ids: list[int] = []

    def add(value: Any) -> None:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))

    add(getattr(tokenizer, "eos_token_id", None))
    config = getattr(model, "generation_config", None)
    if config is not None:
        add(config.eos_token_id)
    try:
        chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        labels = [t for t in encode_chat(tokenizer, chat, max_length=1 << 20)["labels"] if t != IGNORE_INDEX]
        if labels and labels[-1] in set(getattr(tokenizer, "all_special_ids", [])):
            add(labels[-1])
    except Exception:  # a template this probe cannot render still has its EOS
        pass
    if not ids:
        raise ValueError("the tokenizer has no EOS token and its chat template no end-of-turn token to stop at")
    return ids


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the duration (generation, scoring, a reference pass), then every
    submodule back in the mode it was in: ``model.train()`` afterwards would also wake submodules
    a method keeps in eval mode on purpose."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prompt_learning_config(model: nn.Module) -> Any:
    """The active PEFT config when ``model`` is a prompt-learning PeftModel, else None."""
    config = getattr(model, "active_peft_config", None)
    return config if getattr(config, "is_prompt_learning", False) else None


def _left_pad(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def _extra_inputs(model_inputs: ModelInputs | None, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """What the method adds to a batch beyond ids and mask (multitask prompt's ``task_ids``)."""
    if model_inputs is None:
        return {}
    batch = model_inputs({"input_ids": ids, "attention_mask": mask})
    return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}


def generation_config(max_new_tokens: int, stop: list[int], pad_id: int, **sampling: Any) -> Any:
    """A fresh config, greedy unless ``sampling`` says otherwise (``do_sample=True,
    temperature=...``): sampling settings a checkpoint ships must not leak in."""
    from transformers import GenerationConfig

    settings = {"do_sample": False, **sampling}
    return GenerationConfig(
        max_new_tokens=max_new_tokens, num_beams=1, eos_token_id=stop, pad_token_id=pad_id, use_cache=True, **settings
    )


def generate_batch(
    model: nn.Module, prompts: Sequence[list[int]], config: Any, pad_id: int, model_inputs: ModelInputs | None = None,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """The new tokens ``model.generate`` gives each prompt (left-padded with ``pad_id``, plus what
    ``model_inputs`` adds, e.g. multitask prompt's ``task_ids``), stop tokens and all: cut them
    with ``until_stop``. ``generate_kwargs`` go to ``generate`` (e.g. a ``streamer``).

    A prompt-learning model gets its soft prompt here as input embeddings; prefix tuning, whose
    prefixes live in the cache, needs ``generate_ids`` (a forward loop) instead.
    """
    device = _device(model)
    ids, mask = _left_pad(prompts, pad_id, device)
    extra = _extra_inputs(model_inputs, ids, mask)
    peft_config = prompt_learning_config(model)
    if peft_config is None:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra, **generate_kwargs)
        return out[:, ids.shape[1]:].tolist()
    # [pad .. pad][virtual tokens][prompt]: the soft prompt sits right before each prompt, as
    # in training, and left padding keeps every row's positions those of an unpadded row
    prompt = model.get_prompt(batch_size=ids.shape[0], task_ids=extra.get("task_ids")).to(device)
    embeds = model.word_embeddings(ids)
    width, virtual = ids.shape[1], prompt.shape[1]
    rows, masks = [], []
    for row in range(ids.shape[0]):
        pad = width - int(mask[row].sum())
        rows.append(torch.cat([embeds[row, :pad], prompt[row].to(embeds.dtype), embeds[row, pad:]]))
        masks.append(torch.cat([mask[row, :pad], torch.ones(virtual, dtype=mask.dtype, device=device), mask[row, pad:]]))
    out = model.get_base_model().generate(
        inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), generation_config=config, **generate_kwargs
    )
    return out.tolist()  # generating from embeddings returns only the new tokens


def _greedy_loop(
    model: nn.Module, prompt: list[int], max_new_tokens: int, stop: list[int], model_inputs: ModelInputs | None
) -> list[int]:
    """Greedy decoding by full forward passes: slow (no cache) but exactly what training computes."""
    ids = torch.tensor([prompt], dtype=torch.long, device=_device(model))
    new: list[int] = []
    for _ in range(max_new_tokens):
        mask = torch.ones_like(ids)
        logits = model(input_ids=ids, attention_mask=mask, **_extra_inputs(model_inputs, ids, mask)).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in stop:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


def until_stop(tokens: list[int], stop: list[int]) -> list[int]:
    """``tokens`` up to (without) the first stop token."""
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[:i]
    return tokens


def generate_ids(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    max_new_tokens: int,
    batch_size: int = 16,
    model_inputs: ModelInputs | None = None,
) -> list[list[int]]:
    """The new tokens of each greedy answer, cut before the first stop token.

    ``model_inputs`` is the method's hook (``BaseMethod.model_inputs``) for models that need
    more than ids and mask, e.g. multitask prompt tuning's ``task_ids``.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [encode_prompt(tokenizer, record["messages"]) for record in records]
    stop = stop_token_ids(tokenizer, model)
    pad_id = pad_id_of(tokenizer)
    config = generation_config(max_new_tokens, stop, pad_id)
    peft_config = prompt_learning_config(model)
    prefix_in_cache = peft_config is not None and peft_config.peft_type in ("PREFIX_TUNING", "CARTRIDGE")
    answers: list[list[int]] = []
    with eval_mode(model), torch.no_grad():
        if prefix_in_cache:
            return [until_stop(_greedy_loop(model, p, max_new_tokens, stop, model_inputs), stop) for p in prompts]
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            answers.extend(until_stop(t, stop) for t in generate_batch(model, batch, config, pad_id, model_inputs))
    return answers


def generate(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    max_new_tokens: int,
    batch_size: int = 16,
    model_inputs: ModelInputs | None = None,
) -> list[str]:
    """The model's greedy answer to each record's prompt (its final assistant message, if any,
    is the reference and left out), decoded without special tokens.

    Prompts are left-padded here, not by the tokenizer, so its ``padding_side`` (right, for
    training batches) is never changed.
    """
    tokens = generate_ids(model, tokenizer, records, max_new_tokens, batch_size, model_inputs)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


@dataclass
class GenerationScore:
    score: float  # share of records the checker accepts
    correct: int
    total: int
    checker: str
    samples: list[dict] = field(default_factory=list)  # prompt, reference, prediction, correct


def default_max_new_tokens(tokenizer: Any, references: Sequence[str]) -> int:
    """Room for the longest reference answer plus a little: answers are short, and a model that
    rambles past that is wrong anyway."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references), default=0)
    return longest + ANSWER_SLACK_TOKENS


def score_generations(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    checker: str = "exact",
    max_new_tokens: int | None = None,
    batch_size: int = 16,
    num_samples: int = 5,
    model_inputs: ModelInputs | None = None,
) -> GenerationScore:
    """Generate an answer for every record that has a reference and let ``checker`` judge it."""
    check = get_checker(checker)
    scored = [(r, ref) for r in records if (ref := reference_answer(r)) is not None]
    references = [ref for _, ref in scored]
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, references)
    predictions = generate(model, tokenizer, [r for r, _ in scored], max_new_tokens, batch_size, model_inputs)
    verdicts = [bool(check(p, ref)) for p, ref in zip(predictions, references)]
    samples = [
        {"prompt": prompt_text(r), "reference": ref, "prediction": p, "correct": ok}
        for (r, ref), p, ok in list(zip(scored, predictions, verdicts))[:num_samples]
    ]
    correct, total = sum(verdicts), len(verdicts)
    return GenerationScore(correct / total if total else 0.0, correct, total, checker, samples)


def _cache_file(cache_dir: Path, key: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / "base_eval" / f"{fingerprint(dict(key), strict=False)}.json"


def _read_score(stored: Any) -> GenerationScore:
    """The score in a stored entry; raises (KeyError, TypeError) for one of an older layout."""
    return GenerationScore(**stored["score"])


def base_score_cached(
    cache_dir: Path, key: Mapping[str, Any], compute: Callable[[], GenerationScore]
) -> tuple[GenerationScore, bool]:
    """The base model's score for ``key``, computed once per key across runs; (score, hit).

    A sweep over methods shares one base (checkpoint, quantization, eval records, checker,
    max_new_tokens): its score is computed by the first job and read by the rest. The lock of
    ``ftlab.cache.cached_json`` makes parallel jobs wait for that first one instead of all
    generating; the file appears whole (temporary file + ``os.replace``) or not at all.
    """

    def entry() -> dict[str, Any]:
        return {"key": dict(key), "score": asdict(compute())}

    return cached_json(_cache_file(cache_dir, key), entry, _read_score)

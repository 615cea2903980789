"""Canonical examples -> token ids, one function per kind of example.

* chat (``{"messages": [...]}``): rendered with the tokenizer's chat template, loss on the
  assistant's tokens only (``ftlab.data.chat_masking``);
* text (``{"text": ...}``, continued pre-training): every token is trained on, and an EOS ends
  each document so the model learns where documents stop;
* classification (``{"text": ..., "label": ...}``): the text's tokens and the label's index in
  the label list; the model's sequence-classification head reads the last token;
* preference pairs (a chat with ``"rejected"``, for pair-taking methods): each side encoded as a
  chat, ``chosen_*`` and ``rejected_*`` keys, labels on each side's answer only (the turns after
  the messages both sides share), ``encode_pair``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ftlab.data.chat_masking import _tokenize, encode_chat
from ftlab.data.formats import shared_prefix
from ftlab.errors import DataError, ModelLoadError

__all__ = ["PAIR_SIDES", "encode_example", "encode_pair", "example_kind", "label_names", "pad_id_of"]

PAIR_SIDES = ("chosen", "rejected")


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad id, else its EOS id (padding is masked out, so any
    id works). Batches for training and prompts for generation both pad with it."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ModelLoadError("the tokenizer has neither a pad nor an eos token to pad batches or prompts with: set tokenizer.pad_token")


def example_kind(example: Mapping[str, Any]) -> str:
    """``chat``, ``classification`` or ``text``: what a canonical example holds."""
    if "messages" in example:
        return "chat"
    return "classification" if "label" in example else "text"


def encode_text(tokenizer: Any, text: str, max_length: int) -> dict[str, list[int]]:
    ids = _tokenize(tokenizer, text, offsets=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def encode_classification(
    tokenizer: Any, example: Mapping[str, Any], max_length: int, label_ids: Mapping[str, int]
) -> dict[str, Any]:
    label = example["label"]
    if label not in label_ids:
        where = example.get("_where", "an example")
        raise DataError(
            f"{where}: field 'label' is {label!r}, an unknown label (known labels: {', '.join(label_ids)});"
            " set data.labels to the full list of label names"
        )
    ids = _tokenize(tokenizer, example["text"], offsets=False)["input_ids"][:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": label_ids[label]}


def encode_example(
    tokenizer: Any, example: Mapping[str, Any], max_length: int, label_ids: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Token ids of one canonical example (see the module docstring for each kind)."""
    kind = example_kind(example)
    if kind == "chat":
        return encode_chat(tokenizer, example["messages"], max_length)
    if kind == "classification":
        if label_ids is None:
            raise DataError(
                f"{example.get('_where', 'an example')}: a labelled (classification) example in a causal-LM run;"
                " use task=classification, or data.format=text to train on the text alone"
            )
        return encode_classification(tokenizer, example, max_length, label_ids)
    return encode_text(tokenizer, example["text"], max_length)


def encode_pair(tokenizer: Any, example: Mapping[str, Any], max_length: int) -> dict[str, list[int]]:
    """``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels`` and the same for
    ``rejected_``: each side (``messages``, ``rejected``) encoded by ``encode_chat`` and cut to
    ``max_length`` on its own, labels on the assistant turns after the shared prompt only."""
    if not isinstance(example.get("rejected"), list):
        raise DataError(f"{example.get('_where', 'an example')}: no rejected conversation to pair with the chosen one")
    chosen, rejected = example["messages"], example["rejected"]
    start = shared_prefix(chosen, rejected)
    out: dict[str, list[int]] = {}
    for side, messages in zip(PAIR_SIDES, (chosen, rejected)):
        encoded = encode_chat(tokenizer, messages, max_length, train_from=start)
        out.update({f"{side}_{key}": value for key, value in encoded.items()})
    return out


def label_names(examples: Sequence[Mapping[str, Any]], given: Sequence[str] | None = None) -> list[str]:
    """The classes: ``given`` (``data.labels``) in its order, else the training labels sorted."""
    if given:
        names = [str(x) for x in given]
        if len(set(names)) != len(names):
            raise DataError(f"data.labels has duplicates: {names}")
        return names
    names = sorted({str(e["label"]) for e in examples if "label" in e})
    if len(names) < 2:
        raise DataError(
            f"classification needs at least two labels in the training data, found {names or 'none'}"
        )
    return names

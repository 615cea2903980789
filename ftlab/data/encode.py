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

Very long text is cut before it is tokenized (``keep_tokens``): a row of megabytes would take
minutes to tokenize only to be truncated to ``data.max_length`` tokens. Each string longer than
``CUT_CHARS_PER_TOKEN`` characters per kept token is cut to that many, and the cut is taken only
if the cut string alone still has more than ``keep_tokens + CUT_MARGIN`` tokens (else twice as
many characters are tried, up to the whole string). Everything before the first cut is then the
same text, so the first ``keep_tokens`` tokens and their labels are exactly those of the whole row:
its truncation, and its length checks against ``keep_tokens``, do not change. 32 characters per
token is about 10 times what real text takes (measured with SmolLM2's tokenizer: 3.3 characters
per token for English prose, 3.6 for Python, 1.2 for base64, 1 for digits, 0.7 for Chinese; the
tiny tokenizer 1.6 or fewer), so the first cut holds for them; text that packs more into a token
(SmolLM2 has single tokens for 64 spaces or '=') takes the retry, at worst a few tokenizations
of a few times the cut.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ftlab.data.chat_masking import _tokenize, encode_chat
from ftlab.data.formats import shared_prefix
from ftlab.errors import DataError, ModelLoadError

__all__ = [
    "CUT_CHARS_PER_TOKEN", "CUT_MARGIN", "PAIR_SIDES", "cut_example", "cut_text", "encode_example", "encode_pair",
    "example_kind", "label_names", "longest_text", "pad_id_of",
]

PAIR_SIDES = ("chosen", "rejected")
CUT_CHARS_PER_TOKEN = 32  # a string longer than this many characters per kept token is cut first
CUT_MARGIN = 16  # tokens beyond keep_tokens a cut string must still have: the cut may change its last few


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


def _texts(example: Mapping[str, Any]) -> list[str]:
    """The strings of an example that are tokenized: ``text``, and every message's content."""
    out = [example["text"]] if isinstance(example.get("text"), str) else []
    for key in ("messages", "rejected"):
        if isinstance(example.get(key), list):
            out += [m["content"] for m in example[key] if isinstance(m, Mapping) and isinstance(m.get("content"), str)]
    return out


def longest_text(example: Mapping[str, Any]) -> int:
    """Characters in the example's longest tokenized string (``cut_example`` cuts those over
    ``keep_tokens * CUT_CHARS_PER_TOKEN``)."""
    return max(map(len, _texts(example)), default=0)


def cut_text(tokenizer: Any, text: str, keep_tokens: int) -> str:
    """``text``, or its shortest prefix of ``keep_tokens * CUT_CHARS_PER_TOKEN * 2**k`` characters
    that still has more than ``keep_tokens + CUT_MARGIN`` tokens (see the module docstring)."""
    chars = keep_tokens * CUT_CHARS_PER_TOKEN
    while chars < len(text):
        head = text[:chars]
        ids = tokenizer(head, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if len(ids) > keep_tokens + CUT_MARGIN:
            return head
        chars *= 2
    return text


def cut_example(tokenizer: Any, example: Mapping[str, Any], keep_tokens: int | None) -> Mapping[str, Any]:
    """``example`` with every string too long to matter beyond ``keep_tokens`` tokens cut
    (``cut_text``); the example itself when none is (or ``keep_tokens`` is None)."""
    if keep_tokens is None or longest_text(example) <= keep_tokens * CUT_CHARS_PER_TOKEN:
        return example

    def cut(value: Any) -> Any:
        return cut_text(tokenizer, value, keep_tokens) if isinstance(value, str) else value

    out = dict(example)
    if "text" in out:
        out["text"] = cut(out["text"])
    for key in ("messages", "rejected"):
        if isinstance(out.get(key), list):
            out[key] = [{**m, "content": cut(m.get("content"))} if isinstance(m, Mapping) else m for m in out[key]]
    return out


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
    tokenizer: Any, example: Mapping[str, Any], max_length: int, label_ids: Mapping[str, int] | None = None,
    keep_tokens: int | None = None,
) -> dict[str, Any]:
    """Token ids of one canonical example (see the module docstring for each kind); with
    ``keep_tokens``, only as much of a very long example as decides its first ``keep_tokens``
    tokens is tokenized (``cut_example``)."""
    kind = example_kind(example)
    example = cut_example(tokenizer, example, keep_tokens)
    if kind == "chat":
        from jinja2 import TemplateError

        try:
            return encode_chat(tokenizer, example["messages"], max_length)
        except TemplateError as err:  # Gemma's template refuses a system message, for one
            raise DataError(
                f"{example.get('_where', 'an example')}: the model's chat template cannot render this conversation "
                f"({err}); set model.chat_template=chatml (or a Jinja template that can), or change the data"
            ) from err
    if kind == "classification":
        if label_ids is None:
            raise DataError(
                f"{example.get('_where', 'an example')}: a labelled (classification) example in a causal-LM run;"
                " use task=classification, or data.format=text to train on the text alone"
            )
        return encode_classification(tokenizer, example, max_length, label_ids)
    return encode_text(tokenizer, example["text"], max_length)


def encode_pair(
    tokenizer: Any, example: Mapping[str, Any], max_length: int, keep_tokens: int | None = None
) -> dict[str, list[int]]:
    """``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels`` and the same for
    ``rejected_``: each side (``messages``, ``rejected``) encoded by ``encode_chat`` and cut to
    ``max_length`` on its own, labels on the assistant turns after the shared prompt only.
    ``keep_tokens`` as for ``encode_example`` (the shared prompt is found before any cut)."""
    if not isinstance(example.get("rejected"), list):
        raise DataError(f"{example.get('_where', 'an example')}: no rejected conversation to pair with the chosen one")
    start = shared_prefix(example["messages"], example["rejected"])
    example = cut_example(tokenizer, example, keep_tokens)
    chosen, rejected = example["messages"], example["rejected"]
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

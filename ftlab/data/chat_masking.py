"""Turn a chat (list of messages) into token ids with labels on the assistant's tokens only.

Why: supervised fine-tuning should teach the model to produce answers, not to predict the user's
prompt or the template's boilerplate, so every token outside an assistant turn gets label -100
(ignored by the loss). Each assistant turn is trained on its content plus the end-of-turn token
the chat template puts after it, so the model also learns to stop.

How: the chat is rendered once with the tokenizer's own chat template. Assistant turns are
located as character spans by rendering prefixes of the conversation (the text up to the
generation prompt before turn i, and the text including turn i), which works with any template
that renders a conversation's prefix as a prefix of its text. The full text is tokenized once
with offsets (fast tokenizers), and a token is labelled when its characters overlap an assistant
span. Trailing whitespace after the end-of-turn token (ChatML's newline) is not labelled: the
model stops at the end-of-turn token and never generates it.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["IGNORE_INDEX", "assistant_spans", "encode_chat", "encode_prompt", "num_label_tokens"]

IGNORE_INDEX = -100

Messages = Sequence[dict[str, Any]]


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):  # some versions return a list for batched input
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


def assistant_spans(tokenizer: Any, messages: Messages, train_from: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the [start, end) character span of each assistant turn (of those at
    message index ``train_from`` or later)."""
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(upto) and upto.startswith(before)):
            raise ValueError(
                "the chat template does not render conversation prefixes as prefixes of the"
                f" full text (assistant message {i}); cannot locate the assistant's tokens"
            )
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def _tokenize(tokenizer: Any, text: str, offsets: bool) -> dict[str, list]:
    """Tokenize rendered chat text, adding a BOS only if the template did not render one.

    Chat templates usually render the special tokens themselves; letting the tokenizer add its
    own as well would start every example with two BOS tokens.
    """
    enc = tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=offsets, return_attention_mask=False
    )
    ids, offs = list(enc["input_ids"]), list(enc.get("offset_mapping", []))
    if _adds_bos(tokenizer) and not (ids and ids[0] == tokenizer.bos_token_id):
        ids.insert(0, tokenizer.bos_token_id)
        offs.insert(0, (0, 0))
    return {"input_ids": ids, "offset_mapping": offs}


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer normally starts a sequence with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def encode_chat(tokenizer: Any, messages: Messages, max_length: int, train_from: int = 0) -> dict[str, list[int]]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 outside assistant turns).

    ``train_from`` leaves the assistant turns before that message index unlabelled too: a
    preference pair labels only each side's answer, not assistant turns of the shared prompt.
    Sequences longer than ``max_length`` lose their tail. If that removes every assistant token,
    ``labels`` is all -100; callers must drop such examples (see ``num_label_tokens``), since a
    batch of them would give a NaN loss.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("encode_chat needs a fast tokenizer (it uses return_offsets_mapping)")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    text, spans = assistant_spans(tokenizer, messages, train_from)
    enc = _tokenize(tokenizer, text, offsets=True)
    ids = enc["input_ids"][:max_length]
    labels = []
    for token_id, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = end > start and any(start < e and end > s for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_prompt(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids to generate the final assistant answer from.

    Drops the final assistant message (the reference answer) if present and appends the
    template's generation prompt, tokenized exactly like ``encode_chat`` tokenizes training text.
    """
    prompt = list(messages[:-1]) if messages and messages[-1]["role"] == "assistant" else list(messages)
    return _tokenize(tokenizer, _render(tokenizer, prompt, add_generation_prompt=True), offsets=False)[
        "input_ids"
    ]


def num_label_tokens(encoded: dict[str, list[int]]) -> int:
    """How many tokens of an encoded example the loss is computed on."""
    return sum(1 for label in encoded["labels"] if label != IGNORE_INDEX)

"""Training-data augmentations, discovered through the ``ftlab.augmentations`` entry-point group.

An augmentation is a callable ``(example, rng) -> dict | None``: it returns an augmented copy of
a canonical example (see ``ftlab.data.formats``), never changing its input, or None when it
does not apply to that example. It draws randomness only from ``rng``, so the same seed gives
the same augmented data. A package registers one in its ``pyproject.toml``::

    [project.entry-points."ftlab.augmentations"]
    typos = "ftlab.data.augment:typos"

ftlab's own ``typos`` is registered exactly that way.
"""

from __future__ import annotations

import copy
import random
import re
from importlib import metadata
from typing import Callable, Iterable

from ftlab.errors import DataError
from ftlab.plugins import Discovered, discover_group

__all__ = ["ENTRY_POINT_GROUP", "Augmentation", "discover_augmentations", "typos"]

ENTRY_POINT_GROUP = "ftlab.augmentations"
Augmentation = Callable[[dict, random.Random], "dict | None"]


def discover_augmentations(entry_points: Iterable[metadata.EntryPoint] | None = None) -> Discovered[Augmentation]:
    """Every entry point of the group (or the given ones): usable augmentations in ``found``,
    plugins that fail in ``broken`` with why (recorded, not raised); a lookup by name raises DataError."""
    return discover_group(ENTRY_POINT_GROUP, "augmentation", DataError, entry_points=entry_points)


# ---------------------------------------------------------------- built-in: typos

_TYPO_SHARE = 0.1  # of a turn's words; typos in every other word would change what is asked
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


def _swappable(word: str) -> list[int]:
    """Positions i (not the first letter) where swapping letters i and i+1 changes the word."""
    return [i for i in range(1, len(word) - 1) if word[i] != word[i + 1]]


def _add_typos(text: str, rng: random.Random, protected: set[str]) -> str:
    """Swap two adjacent letters inside up to 10% of the words (at least one) of ``text``.

    Only words made of letters alone are touched: numbers, emails, URLs and code identifiers
    with digits or symbols keep their exact spelling, and so do ``protected`` words (those of
    the answer), so the answer can still be derived from the prompt.
    """
    tokens = list(re.finditer(r"\S+", text))
    candidates = []
    for match in tokens:
        core = _EDGE_PUNCT.sub("", match.group())
        if core.isalpha() and core.lower() not in protected and _swappable(core):
            start = match.start() + match.group().index(core)
            candidates.append((start, core))
    if not candidates:
        return text
    count = min(len(candidates), max(1, int(len(tokens) * _TYPO_SHARE)))
    chars = list(text)
    for start, core in rng.sample(candidates, count):
        i = start + rng.choice(_swappable(core))
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def typos(example: dict, rng: random.Random) -> dict | None:
    """A copy with letter-swap typos in what the user wrote; None when there is nothing to change.

    Why: real users mistype, and a model fine-tuned only on clean prompts can be thrown by a
    typo. Noise goes into the user turns only, never into the assistant's answer, and never
    into numbers, emails or words that also appear in an answer, so what the answer must be is
    unchanged and exact-match evaluation still holds. Chat examples get typos in their user
    turns (a preference example's rejected conversation gets the same ones); text and
    classification examples get them in ``text`` (the label is kept).
    """
    out = copy.deepcopy(example)
    if isinstance(out.get("messages"), list):
        conversations = [out["messages"]] + ([out["rejected"]] if isinstance(out.get("rejected"), list) else [])
        answers = " ".join(
            m.get("content", "") for conv in conversations for m in conv
            if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str)
        )
        protected = {w.lower() for w in re.findall(r"[^\W\d_]+", answers)}
        noisy: dict[str, str] = {}  # the same user text gets the same typos in both conversations
        changed = False
        for conv in conversations:
            for message in conv:
                if not (isinstance(message, dict) and message.get("role") == "user"):
                    continue
                content = message.get("content")
                if not isinstance(content, str):
                    continue
                if content not in noisy:
                    noisy[content] = _add_typos(content, rng, protected)
                message["content"] = noisy[content]
                changed = changed or noisy[content] != content
        return out if changed else None
    if isinstance(out.get("text"), str):
        text = _add_typos(out["text"], rng, set())
        if text == out["text"]:
            return None
        out["text"] = text
        return out
    return None

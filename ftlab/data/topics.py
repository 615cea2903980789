"""The default classification dataset: short news-like sentences labelled with their topic.

Why generated: a classification run (``task=classification``) needs labelled data that is
always there offline, reproducible from a seed and known to be correct. Each sentence is a
subject and an event from one topic, set in a context shared by every topic; a quarter of them
also mention a word of another topic in that context, so the label is not a bag-of-words lookup
and a linear probe, LoRA and full fine-tuning end up measurably apart.

Records are ``{"text": ..., "label": ...}`` (the ``classification`` format); the label names are
``LABELS``. Command line::

    python -m ftlab.data.topics --out DIR [--num-train N --num-val M --seed S]
"""

from __future__ import annotations

import random
from typing import Sequence

from ftlab.errors import ConfigError

__all__ = ["LABELS", "generate", "default_splits", "main"]

_TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # label: (subjects, events, stray words another topic's sentence may mention)
    "sports": (
        ("The striker", "The home team", "The coach", "The goalkeeper", "The young sprinter",
         "The tennis champion", "The captain", "The visiting side"),
        ("scored twice in the second half", "won the final on penalties", "was sent off after a late foul",
         "broke the national record", "signed a new three-year contract", "lost the semi-final in extra time",
         "trained hard before the season opener", "lifted the cup in front of the fans"),
        ("stadium", "league", "goal"),
    ),
    "weather": (
        ("A cold front", "The storm", "Heavy rain", "The morning fog", "A heat wave", "Strong winds",
         "The snowfall", "A sudden hailstorm"),
        ("flooded several roads near the river", "closed the mountain pass", "is expected to clear by noon",
         "brought the warmest day of the year", "knocked down power lines overnight",
         "delayed flights at the airport", "left a thick layer of ice on the streets",
         "moved slowly across the coast"),
        ("forecast", "rain", "temperature"),
    ),
    "food": (
        ("The new bakery", "The chef", "A family restaurant", "The food market", "The street vendor",
         "The pastry shop", "The cooking school", "The vegetarian cafe"),
        ("introduced a spicy noodle dish", "won an award for its sourdough bread",
         "serves fresh pasta every morning", "ran out of cheese by lunchtime",
         "added a seasonal soup to the menu", "baked a chocolate cake for the festival",
         "opened a second kitchen downtown", "sold hundreds of dumplings on Sunday"),
        ("recipe", "menu", "dessert"),
    ),
    "technology": (
        ("The startup", "The chip maker", "A software company", "The new smartphone", "The research lab",
         "The cloud provider", "The app developer", "The robotics team"),
        ("released a faster processor", "fixed a security flaw in its browser", "launched a cheaper laptop",
         "trained a larger language model", "updated its operating system", "recalled a batch of batteries",
         "opened its code to the public", "doubled the speed of its network"),
        ("software", "computer", "battery"),
    ),
}
LABELS: tuple[str, ...] = tuple(_TOPICS)
_CONTEXTS = ("on Tuesday", "last weekend", "this morning", "in the city", "according to local news",
             "despite the crowds", "after months of planning", "earlier than anyone expected")


def _sentence(rng: random.Random, label: str) -> str:
    subjects, events, _ = _TOPICS[label]
    context = rng.choice(_CONTEXTS)
    if rng.random() < 0.25:  # a stray word of another topic: the label must come from the event
        other = rng.choice([t for t in LABELS if t != label])
        context = f"{context}, near the {rng.choice(_TOPICS[other][2])} news"
    return f"{rng.choice(subjects)} {rng.choice(events)} {context}."


def _draw(n: int, rng: random.Random, exclude: set[str]) -> list[dict]:
    """Round-robin over labels (balanced classes); sentences in ``exclude`` are redrawn."""
    records = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        for _ in range(1000):
            text = _sentence(rng, label)
            if text not in exclude:
                break
        else:
            raise ValueError(f"topic {label!r}: could not draw a sentence not already used")
        exclude.add(text)
        records.append({"text": text, "label": label})
    return records


def generate(n: int, seed: int) -> list[dict]:
    """``n`` distinct labelled sentences, balanced over ``LABELS``, fully determined by ``seed``."""
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    return _draw(n, random.Random(f"ftlab-topics-{seed}"), set())


def default_splits(num_train: int, num_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Train and validation sets with no sentence in common (validation measures generalisation)."""
    seen: set[str] = set()
    train = _draw(num_train, random.Random(f"ftlab-topics-{seed}"), seen)
    val = _draw(num_val, random.Random(f"ftlab-topics-validation-{seed}"), seen)
    return train, val


def main(argv: Sequence[str] | None = None) -> None:
    """Write ``train.jsonl`` and ``validation.jsonl`` of the topic data to ``--out``."""
    from ftlab.data.sources import write_splits_main

    write_splits_main(argv, main.__doc__, default_splits, num_train=800, num_val=200)


if __name__ == "__main__":
    main()
